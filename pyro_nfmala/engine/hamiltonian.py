r"""The Hamiltonian move: many leapfrog steps in the latent space, accepted by the exact
Metropolis-Hastings ratio, for where the map is not good enough for one Langevin step to go far.

With a momentum :math:`p \sim \mathcal{N}(0, M)` (the constant mass matrix :math:`M`, :math:`C = M^{-1}`,
adapted in warmup as the Langevin moves' is) and the energy
:math:`H(z, p) = -\log \pi(z) + \frac12 p^T C p`, ``L`` leapfrog steps of size :math:`\epsilon`,

.. math:: p \leftarrow p + \tfrac{\epsilon}{2} \nabla \log \pi(z), \quad
          z \leftarrow z + \epsilon C p, \quad p \leftarrow p + \tfrac{\epsilon}{2} \nabla \log \pi(z),

take :math:`(z, p)` to :math:`(z', p')`, which is accepted with probability
:math:`\min(1, e^{H(z, p) - H(z', p')})`: the leapfrog map is reversible (with a flip of the momentum) and
keeps volume, so the move leaves :math:`\pi` invariant, for any flow. One leapfrog step is MALA
(:class:`~pyro_nfmala.engine.langevin.MassMatrixPreconditioner`, with :math:`\epsilon_\mathrm{MALA} =
\epsilon^2 / 2`); ``L`` of them go about ``L`` times as far for ``L`` evaluations of the target's
gradient, where MALA's random walk goes :math:`\sqrt L` times as far: what a map that is only fair (the
flow check's k-hat above 0.5) needs to mix.

**Trajectory length** (empirical HMC, Wu, Stoehr & Robert 2018). In warmup each chain runs until its
trajectory makes a U-turn (NUTS's criterion: the displacement from the start points against the velocity
at either end) and the times :math:`\tau = \epsilon L` it took are collected, anew after each change of
the mass matrix (:class:`~pyro_nfmala.engine.adaptation.WarmupAdaptation`). In sampling, each step draws
one :math:`u \sim \mathcal{U}(0, 1)` for all chains, independent of the state, takes the :math:`u`-quantile
:math:`\tau` of those times and runs :math:`L = \lceil \tau / \epsilon \rceil` leapfrog steps (at
most ``max_steps``): a mixture of fixed, exact kernels, whose lengths follow the target's own scales,
long where it is wide, as NUTS's do, with no tree to build. A fixed :math:`T` can be given instead,
jittered uniformly in :math:`(0, T]`.

A chain whose trajectory reaches a point where the target or its gradient is not finite, or where an
evaluation raises a numerical error, stops there and is rejected (divergent); so is one whose energy
grows by more than ``MAX_ENERGY_ERROR`` (1000, as Stan's). Errors follow the generic step's policy
(:func:`~pyro_nfmala.engine.step.metropolis_hastings_step`).

Example:
    >>> from pyro_nfmala.engine.step import advance, init_state
    >>> target = PosteriorPullback(identity_flow(3), lambda x: -0.5 * (x**2).sum(-1))
    >>> move = HamiltonianMove(trajectory_length=1.5)
    >>> state = init_state(target, move, torch.zeros(16, 3))
    >>> state, info = advance(state, target, move, 0.3)
    >>> info.accept_prob.shape, info.trajectory.num_steps >= 1
    (torch.Size([16]), True)
"""

from __future__ import annotations

__all__ = ["MAX_ENERGY_ERROR", "MAX_LEAPFROG_STEPS", "HamiltonianMove", "LatentMassMove", "Trajectory"]

import copy
import math

from typing import NamedTuple

import torch

from torch import Tensor

from ..flows.latent import LatentFlow
from .langevin import ConstantMetric
from .step import (
    ChainState,
    StepInfo,
    _accepts,
    _evaluate_isolating_failures,
    _rejecting,
    _select,
    _step_info,
    finite_chains,
)
from .targets import LatentTarget
from .validation import check_count, check_positive

#: A trajectory whose energy grows by more than this is divergent (Stan's bound).
MAX_ENERGY_ERROR = 1000.0
#: The most leapfrog steps a trajectory takes (a bound on the cost of a step).
MAX_LEAPFROG_STEPS = 256


class Trajectory(NamedTuple):
    """What a Hamiltonian step tells warmup."""

    start: Tensor  #: the chains' positions before the step, ``(chains, d)``
    end: Tensor  #: where their trajectories ended (the proposals, before acceptance), ``(chains, d)``
    num_steps: int  #: the leapfrog steps taken (the most any chain took)
    #: in a step until the U-turn, the time :math:`\epsilon L_c` each chain ran before its trajectory turned
    #: back (or hit ``max_steps``), ``(chains,)``; ``None`` otherwise
    u_turn_lengths: Tensor | None = None


class LatentMassMove:
    """What the trajectory moves share: the latent mass matrix (``metric``, a
    :class:`~pyro_nfmala.engine.langevin.ConstantMetric`), adapted in warmup, and no cache."""

    mass_space = "latent"
    metric: ConstantMetric

    @property
    def inverse_mass(self) -> Tensor | None:
        """:math:`C = M^{-1}` (``None``: the identity)."""
        return self.metric.inverse_mass

    def with_inverse_mass(self, inverse_mass: Tensor):
        """The same move with :math:`C = M^{-1}`; this one is unchanged."""
        move = copy.copy(self)
        move.metric = ConstantMetric(inverse_mass)
        return move

    def prepare(self, flow: LatentFlow, state: ChainState) -> None:
        return None

    def energy(self, state: ChainState, p: Tensor) -> Tensor:
        r""":math:`H(z, p) = -\log \pi(z) + \frac12 p^T C p` per chain."""
        return -state.log_density + self.metric.kinetic_energy(p)

    def leapfrog(
        self,
        target: LatentTarget,
        state: ChainState,
        p: Tensor,
        eps: Tensor,
        step_size: Tensor,
        moving: Tensor,
        errors: list[BaseException],
    ) -> tuple[ChainState, Tensor]:
        """One leapfrog step of size ``eps`` (per chain, signed: backwards in time where negative) from
        ``(state, p)``: the state reached, evaluated (the chains not ``moving`` evaluated where they are;
        numerical errors isolated and recorded in ``errors``), and its momentum."""
        half = p + 0.5 * eps * state.grad
        ahead = state.z + eps * self.metric.times_inverse_mass(half)
        z = torch.where(moving[..., None], ahead, state.z)
        new, _ = _evaluate_isolating_failures(
            target, self, state, z, step_size, errors, proposal_density=False
        )
        return new, half + 0.5 * eps * new.grad

    def _mass_name(self) -> str:
        return "identity" if self.inverse_mass is None else ("dense" if self.metric.dense else "diagonal")


class HamiltonianMove(LatentMassMove):
    r"""Hamiltonian Monte Carlo in the latent space, with a constant mass matrix (see the module).

    The number of leapfrog steps of a step is, in order of precedence: until each chain's U-turn
    (``until_u_turn``, warmup only: not a fixed kernel); :math:`\lceil \tau / \epsilon \rceil` for
    :math:`\tau` drawn from the empirical ``trajectory_lengths`` (eHMC); :math:`\lceil u T / \epsilon
    \rceil` for a jittered ``trajectory_length`` :math:`T`; else one step.

    Arguments:
        inverse_mass: :math:`C = M^{-1}`, a vector ``(d,)`` (diagonal) or a matrix ``(d, d)``; ``None``:
            the identity.
        trajectory_length: :math:`T`, jittered uniformly in :math:`(0, T]`.
        max_steps: The most leapfrog steps a step takes.
        trajectory_lengths: The lengths (times) :math:`\tau` are drawn from, a tensor ``(n,)``; the
            samplers take them from warmup's U-turns.
        until_u_turn: Run each chain until its trajectory turns back (warmup).
    """

    name = "hmc"
    #: The acceptance probability step-size adaptation aims at for this move (Stan's for HMC).
    target_accept_prob = 0.8

    def __init__(
        self,
        inverse_mass: Tensor | None = None,
        trajectory_length: float | None = None,
        max_steps: int = MAX_LEAPFROG_STEPS,
        trajectory_lengths: Tensor | None = None,
        until_u_turn: bool = False,
    ) -> None:
        self.metric = ConstantMetric(inverse_mass)
        self.trajectory_length = check_positive("trajectory_length", trajectory_length, allow_none=True)
        self.max_steps = check_count("max_steps", max_steps)
        self.trajectory_lengths = _checked_lengths(trajectory_lengths)
        self.until_u_turn = bool(until_u_turn)

    def with_trajectory_length(self, trajectory_length: float | None) -> HamiltonianMove:
        """The same move with a jittered trajectory length :math:`T` (``None``: one leapfrog step), no
        empirical lengths and no U-turns; this one is unchanged."""
        move = copy.copy(self)
        move.trajectory_length = check_positive("trajectory_length", trajectory_length, allow_none=True)
        move.trajectory_lengths, move.until_u_turn = None, False
        return move

    def with_trajectory_lengths(self, lengths: Tensor) -> HamiltonianMove:
        """The same move drawing its lengths from ``lengths`` ``(n,)`` (a fixed kernel); this one is
        unchanged."""
        move = copy.copy(self)
        move.trajectory_lengths, move.until_u_turn = _checked_lengths(lengths), False
        return move

    def one_step(self) -> HamiltonianMove:
        """The same move with one leapfrog step (what the step-size search tries); this one is unchanged."""
        return self.with_trajectory_length(None)

    def with_u_turns(self) -> HamiltonianMove:
        """The same move run until each chain's U-turn (warmup); this one is unchanged."""
        move = copy.copy(self)
        move.until_u_turn = True
        return move

    def num_steps(self, step_size: Tensor, jitter: float) -> int:
        """The leapfrog steps of a step whose uniform draw is ``jitter`` (see the class), between 1 and
        ``max_steps``; ``step_size`` the chains' (their median decides)."""
        if self.until_u_turn:
            return self.max_steps
        if self.trajectory_lengths is not None:
            lengths = self.trajectory_lengths
            length = float(lengths[min(int(jitter * len(lengths)), len(lengths) - 1)])
        elif self.trajectory_length is not None:
            length = jitter * self.trajectory_length
        else:
            return 1
        return min(max(math.ceil(length / float(step_size.median())), 1), self.max_steps)

    def step(
        self,
        state: ChainState,
        target: LatentTarget,
        step_size: float | Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[ChainState, StepInfo]:
        """One Hamiltonian step of every chain of ``state`` ``(chains, d)``: the noise of the momenta, then
        the draw that sets the length, then one uniform per chain are drawn from ``generator``."""
        unit = {"dtype": state.z.dtype, "device": state.z.device}
        step_size = torch.as_tensor(step_size, **unit)
        batch_shape = state.log_density.shape
        p = self.metric.momentum(torch.randn(state.z.shape, generator=generator, **unit))
        jitter = float(torch.rand((), generator=generator, **unit))
        uniform = torch.rand(batch_shape, generator=generator, **unit)
        num_steps = self.num_steps(step_size.reshape(-1), jitter)
        eps = step_size[..., None] if step_size.dim() else step_size
        start_energy = self.energy(state, p)
        start_velocity = self.metric.times_inverse_mass(p)

        errors: list[BaseException] = []
        current = state
        alive = torch.ones(batch_shape, dtype=torch.bool, device=state.z.device)  # no failure so far
        moving = alive.clone()  # alive and, until the U-turn, not turned back
        steps = torch.zeros(batch_shape, **unit)
        taken = 0
        for _ in range(num_steps):
            new, new_p = self.leapfrog(target, current, p, eps, step_size, moving, errors)
            alive = alive & (~moving | finite_chains(new))
            moving = moving & alive
            current = _select(moving, new, current)
            p = torch.where(moving[..., None], new_p, p)
            steps = steps + moving.to(steps.dtype)
            taken += 1
            if self.until_u_turn:
                velocity = self.metric.times_inverse_mass(p)
                moving = moving & ~_turned(current.z - state.z, velocity, start_velocity)
            if not bool(moving.any()):
                break
        log_ratio = start_energy - self.energy(current, p)
        finite = alive & torch.isfinite(log_ratio) & (log_ratio > -MAX_ENERGY_ERROR)
        log_ratio = _rejecting(log_ratio, finite)
        accept = _accepts(log_ratio, uniform)
        u_turns = steps * step_size.expand(batch_shape) if self.until_u_turn else None
        trajectory = Trajectory(state.z, current.z, taken, u_turns)
        info = _step_info(log_ratio, finite, accept, errors)._replace(trajectory=trajectory)
        return _select(accept, current, state), info

    def __repr__(self) -> str:
        mass = self._mass_name()
        if self.until_u_turn:
            length = "until the U-turn"
        elif self.trajectory_lengths is not None:
            lengths = self.trajectory_lengths
            length = f"{len(lengths)} empirical, median {float(lengths.median()):.3g}"
        else:
            length = f"{self.trajectory_length}"
        return f"HamiltonianMove(mass={mass}, trajectory_length={length})"


def _turned(displacement: Tensor, velocity: Tensor, start_velocity: Tensor) -> Tensor:
    """NUTS's U-turn criterion on a trajectory from its start: the displacement from the start points
    against the velocity at either end."""
    return ((displacement * velocity).sum(-1) < 0) | ((displacement * start_velocity).sum(-1) < 0)


def _checked_lengths(lengths: Tensor | None) -> Tensor | None:
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths).detach().reshape(-1)
    if not len(lengths) or not bool(torch.isfinite(lengths).all() & (lengths > 0).all()):
        raise ValueError("trajectory_lengths must be a non-empty set of positive finite lengths")
    return lengths.sort().values
