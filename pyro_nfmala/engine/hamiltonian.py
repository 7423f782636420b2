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

**Trajectory length.** Each step draws :math:`u \sim \mathcal{U}(0, 1)` (one for all chains, independent
of the state, so that the kernel is a mixture of exact kernels) and takes
:math:`L = \lceil u T / \epsilon \rceil` leapfrog steps (at most ``max_steps``): the trajectory length
:math:`T` is jittered, which keeps a fixed :math:`T` from resonating with a period of the target. In
warmup :math:`T` is adapted, chain-parallel, by the ChEES criterion (Hoffman, Radul & Sountsov, AISTATS
2021: the change of the chains' squared distance to their mean over a trajectory, whose expected square
grows while longer trajectories still decorrelate; :class:`~pyro_nfmala.engine.adaptation.TrajectoryAdapter`),
and fixed after.

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

__all__ = ["MAX_ENERGY_ERROR", "MAX_LEAPFROG_STEPS", "HamiltonianMove", "Trajectory"]

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
    """What a Hamiltonian step tells the adaptation of its trajectory length."""

    start: Tensor  #: the chains' positions before the step, ``(chains, d)``
    end: Tensor  #: where their trajectories ended (the proposals, before acceptance), ``(chains, d)``
    velocity: Tensor  #: :math:`C p'` at the end, ``(chains, d)``
    jitter: float  #: the step's :math:`u`
    num_steps: int  #: the leapfrog steps taken


class HamiltonianMove:
    r"""Jittered Hamiltonian Monte Carlo in the latent space, with a constant mass matrix (see the module).

    Arguments:
        inverse_mass: :math:`C = M^{-1}`, a vector ``(d,)`` (diagonal) or a matrix ``(d, d)``; ``None``:
            the identity.
        trajectory_length: :math:`T`; ``None`` until it is set (the samplers start it at the first step
            size and adapt it in warmup).
        max_steps: The most leapfrog steps a step takes.
    """

    name = "hmc"
    mass_space = "latent"
    #: The acceptance probability step-size adaptation aims at for this move (Stan's for HMC).
    target_accept_prob = 0.8

    def __init__(
        self,
        inverse_mass: Tensor | None = None,
        trajectory_length: float | None = None,
        max_steps: int = MAX_LEAPFROG_STEPS,
    ) -> None:
        self.metric = ConstantMetric(inverse_mass)
        self.trajectory_length = check_positive("trajectory_length", trajectory_length, allow_none=True)
        self.max_steps = check_count("max_steps", max_steps)

    @property
    def inverse_mass(self) -> Tensor | None:
        """:math:`C = M^{-1}` (``None``: the identity)."""
        return self.metric.inverse_mass

    def with_inverse_mass(self, inverse_mass: Tensor) -> HamiltonianMove:
        """The same move with :math:`C = M^{-1}`; this one is unchanged."""
        move = copy.copy(self)
        move.metric = ConstantMetric(inverse_mass)
        return move

    def with_trajectory_length(self, trajectory_length: float | None) -> HamiltonianMove:
        """The same move with trajectory length :math:`T` (``None``: one leapfrog step); this one is
        unchanged."""
        move = copy.copy(self)
        move.trajectory_length = check_positive("trajectory_length", trajectory_length, allow_none=True)
        return move

    def prepare(self, flow: LatentFlow, state: ChainState) -> None:
        return None

    def num_steps(self, step_size: Tensor, jitter: float) -> int:
        """:math:`L = \\lceil u T / \\epsilon \\rceil`, between 1 and ``max_steps`` (one step while
        :math:`T` is unset); ``step_size`` the chains' (their median decides)."""
        if self.trajectory_length is None:
            return 1
        steps = math.ceil(jitter * self.trajectory_length / float(step_size.median()))
        return min(max(steps, 1), self.max_steps)

    def step(
        self,
        state: ChainState,
        target: LatentTarget,
        step_size: float | Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[ChainState, StepInfo]:
        """One Hamiltonian step of every chain of ``state`` ``(chains, d)``: the noise of the momenta, then
        the jitter, then one uniform per chain are drawn from ``generator``."""
        unit = {"dtype": state.z.dtype, "device": state.z.device}
        step_size = torch.as_tensor(step_size, **unit)
        batch_shape = state.log_density.shape
        p = self.metric.momentum(torch.randn(state.z.shape, generator=generator, **unit))
        jitter = float(torch.rand((), generator=generator, **unit))
        uniform = torch.rand(batch_shape, generator=generator, **unit)
        num_steps = self.num_steps(step_size.reshape(-1), jitter)
        eps = step_size[..., None] if step_size.dim() else step_size
        start_energy = -state.log_density + self.metric.kinetic_energy(p)

        errors: list[BaseException] = []
        current, alive = state, torch.ones(batch_shape, dtype=torch.bool, device=state.z.device)
        p = p + 0.5 * eps * current.grad
        for i in range(num_steps):
            z = torch.where(alive[..., None], current.z + eps * self.metric.times_inverse_mass(p), current.z)
            new, _ = _evaluate_isolating_failures(
                target, self, current, z, step_size, errors, proposal_density=False
            )
            alive = alive & finite_chains(new)
            current = _select(alive, new, current)
            last = i == num_steps - 1
            p = torch.where(alive[..., None], p + (0.5 if last else 1.0) * eps * current.grad, p)
        end_energy = -current.log_density + self.metric.kinetic_energy(p)
        log_ratio = start_energy - end_energy
        finite = alive & torch.isfinite(log_ratio) & (log_ratio > -MAX_ENERGY_ERROR)
        log_ratio = _rejecting(log_ratio, finite)
        accept = _accepts(log_ratio, uniform)
        trajectory = Trajectory(state.z, current.z, self.metric.times_inverse_mass(p), jitter, num_steps)
        info = _step_info(log_ratio, finite, accept, errors)._replace(trajectory=trajectory)
        return _select(accept, current, state), info

    def __repr__(self) -> str:
        mass = "identity" if self.inverse_mass is None else ("dense" if self.metric.dense else "diagonal")
        return f"HamiltonianMove(mass={mass}, trajectory_length={self.trajectory_length})"
