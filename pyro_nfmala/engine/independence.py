r"""Global moves: latent independence proposals drawn from the flow's base.

Latent MALA uses the flow only locally. Where the flow is close to the target, its base law is a
nearly exact proposal for the latent target :math:`\pi`: a draw of it is nearly a fresh,
independent draw of the target. The **independence move** proposes

.. math:: z' \sim \mathcal{N}(0, s^2 I) \quad \text{(independent of } z\text{; } s = 1
          \text{ is the flow's base)}

and accepts it with the exact Metropolis-Hastings ratio

.. math:: \log \alpha = \min\Bigl(0,\; \log \pi(z') - \log \pi(z)
          + \log \mathcal{N}(z; 0, s^2 I) - \log \mathcal{N}(z'; 0, s^2 I)\Bigr),

so it leaves :math:`\pi` invariant for any flow and any :math:`s > 0`, on the exact posterior
(T1) and on the tempered flow measure (T2) alike. Its acceptance rate measures the flow: about
one minus the total-variation distance between the base law and :math:`\pi`. A proposal that
jumps between modes of the target that the flow covers is accepted as readily as one within a
mode, which local steps never make. Where the flow is poor, proposals are rejected: the chain
keeps its local MALA moves, and the move costs one evaluation of the target.

The move is a :class:`~pyro_nfmala.engine.step.Move` (:class:`IndependenceProposal`): the generic
Metropolis-Hastings step (:func:`~pyro_nfmala.engine.step.metropolis_hastings_step`) accepts it, with the
same rejection of non-finite values and the same error policy as the Langevin moves. The states
it produces carry the cache of the Langevin move it is interleaved with, so the two kinds of
move alternate freely in one schedule (the samplers' ``independence_every``).

**Several tries per step.** A proposal does not depend on the state, so ``k`` of them can be drawn and
evaluated first, as one batch of ``k`` times the chains (:func:`~pyro_nfmala.engine.step.independence_steps`),
and the ``k`` moves then run in turn on the values: each is the exact move above, so their composition leaves
:math:`\pi` invariant too. One batched evaluation costs far less than ``k`` single ones, and a chain that one
proposal fails to move gets ``k - 1`` more chances: where the map is fair but not good (a Pareto k-hat of
0.5-0.7), the draws come out nearly independent all the same.

A wider proposal (:math:`s > 1`) is safer when the flow is too narrow (reverse-KL fits are), at
the price of a lower acceptance rate where the flow is good.

**Several modes.** A flow fitted at one mode has next to no mass at another, so its base law
never proposes there, and a chain that starts there is drawn to the mapped mode and never comes
back. Where the mode search found other modes :math:`\mu_k` with Laplace scales :math:`L_k`
(:class:`~pyro_nfmala.engine.independence.Mode`), the **mode mixture** (:class:`ModeMixtureProposal`)
proposes from the mixture, in data space, of the flow's push-forward and a Gaussian at each mode,

.. math:: q_X(x) = w_0\, q_\mathrm{flow}(x) + \sum_{k \ge 1} w_k\, \mathcal{N}(x; \mu_k, s^2 L_k L_k^T),
          \qquad z' = f^{-1}(x'),

whose latent density is :math:`\log q_Z(z) = \log q_X(f(z)) + \mathrm{ladj}(z)`, with
:math:`q_\mathrm{flow}(f(z))\, e^{\mathrm{ladj}(z)} = \mathcal{N}(z; 0, s^2 I)`. The same exact ratio
accepts it, so a chain jumps between the modes as often as the mixture matches the posterior
there. The weights are half each mode's share of the Laplace masses and half uniform, so that no
mode found goes unvisited.

Example:
    >>> from pyro_nfmala.engine.step import init_state
    >>> from pyro_nfmala.engine.langevin import IdentityPreconditioner
    >>> target = PosteriorPullback(identity_flow(2), lambda x: -0.5 * (x**2).sum(-1))
    >>> precond = IdentityPreconditioner()
    >>> state = init_state(target, precond, torch.zeros(8, 2))
    >>> state, info = independence_step(state, target, precond)
    >>> bool((info.accept_prob == 1).all())  # the proposal is the target itself
    True
"""

from __future__ import annotations

__all__ = [
    "AUTO_TRIES",
    "AUTO_TRIES_BELOW",
    "IndependenceProposal",
    "Mode",
    "ModeMixtureProposal",
    "auto_tries",
    "independence_proposal",
    "independence_step",
    "laplace_log_mass",
    "mode_mixture_weights",
    "tries_for_density",
]

import math

from typing import NamedTuple

import torch

from torch import Tensor

from ..flows.latent import LatentFlow
from .step import ChainState, Move, StepInfo, metropolis_hastings_step
from .targets import LatentTarget
from .validation import check_positive


def laplace_log_mass(log_density: float, scale_tril: Tensor) -> float:
    r""":math:`\log \pi_X(\mu) + \log|\det L|`: the log of a mode's Laplace mass, up to a constant
    shared by all modes of a posterior."""
    return log_density + float(torch.diagonal(scale_tril).log().sum())


class Mode(NamedTuple):
    r"""A mode of a posterior with its Laplace approximation :math:`N(\mu, L L^T)`."""

    loc: Tensor  #: :math:`\mu`, (d,)
    scale_tril: Tensor  #: :math:`L`, (d, d)
    log_density: float  #: :math:`\log \pi_X(\mu)`

    @property
    def log_mass(self) -> float:
        """The log of its Laplace mass (:func:`laplace_log_mass`)."""
        return laplace_log_mass(self.log_density, self.scale_tril)


class IndependenceProposal:
    r"""The independence move :math:`z' \sim \mathcal{N}(0, s^2 I)`, a :class:`~pyro_nfmala.engine.step.Move`.

    :meth:`propose` and :meth:`log_proposal_density` ignore the step size and the state the
    proposal comes from; :meth:`prepare` is that of the Langevin move the independence move is
    interleaved with, so that the states of the schedule keep the cache its Langevin steps need.

    Arguments:
        precond: The Langevin move of the schedule (:mod:`pyro_nfmala.engine.langevin`).
        scale: :math:`s > 0`.
    """

    name = "independence"

    def __init__(self, precond: Move, scale: float = 1.0) -> None:
        self.precond = precond
        self.scale = check_positive("independence_scale", scale)

    def _log_normal(self, z: Tensor) -> Tensor:
        d = z.shape[-1]
        return (
            -0.5 * (z / self.scale).square().sum(-1)
            - d * math.log(self.scale)
            - 0.5 * d * math.log(2 * math.pi)
        )

    def prepare(self, flow: LatentFlow, state: ChainState):
        """The wrapped preconditioner's cache of ``state``."""
        return self.precond.prepare(flow, state)

    def propose(
        self, flow: LatentFlow, state: ChainState, step_size: Tensor, noise: Tensor
    ) -> tuple[Tensor, Tensor]:
        r"""``(z', log q(z'))`` with :math:`z' = s\,\xi`, whatever the state and step size."""
        z_new = self.scale * noise
        return z_new, self._log_normal(z_new)

    def log_proposal_density(
        self, flow: LatentFlow, state_to: ChainState, state_from: ChainState, step_size: Tensor
    ) -> Tensor:
        r""":math:`\log \mathcal{N}(z_\mathrm{to}; 0, s^2 I)`, whatever ``state_from``."""
        return self._log_normal(state_to.z)


def mode_mixture_weights(log_masses: Tensor) -> Tensor:
    """The log weights of the mode mixture: half each mode's share of the Laplace masses
    (``log_masses``, the map's mode first), half uniform."""
    shares = torch.softmax(log_masses, dim=-1)
    return (0.5 * shares + 0.5 / len(log_masses)).log()


class ModeMixtureProposal(IndependenceProposal):
    r"""The independence move from the mixture of the flow's push-forward and a Gaussian at each other
    mode (see the module), a :class:`~pyro_nfmala.engine.step.Move`.

    Arguments:
        precond: The Langevin move of the schedule.
        locs: :math:`\mu_k`, ``(m, d)``: the other modes, in data space.
        scale_trils: :math:`L_k`, ``(m, d, d)``.
        log_weights: :math:`\log w_k`, ``(m + 1,)``: the flow's first (:func:`mode_mixture_weights`).
        scale: :math:`s > 0`, for the flow's base and the Gaussians alike.
        generator: Random generator of the components chosen; the global one if ``None``.
    """

    def __init__(
        self,
        precond: Move,
        locs: Tensor,
        scale_trils: Tensor,
        log_weights: Tensor,
        scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(precond, scale)
        if locs.ndim != 2 or scale_trils.shape != locs.shape + locs.shape[-1:]:
            raise ValueError(
                f"locs must be (m, d) and scale_trils (m, d, d), got {tuple(locs.shape)} and "
                f"{tuple(scale_trils.shape)}"
            )
        if log_weights.shape != (len(locs) + 1,):
            raise ValueError(f"log_weights must have {len(locs) + 1} entries (the flow's first)")
        self.locs, self.scale_trils, self.log_weights = locs, scale_trils, log_weights
        self.generator = generator
        self.gaussians = torch.distributions.MultivariateNormal(locs, scale_tril=self.scale * scale_trils)

    def _log_mixture(self, z: Tensor, x: Tensor, ladj: Tensor) -> Tensor:
        r""":math:`\log q_Z(z)`: the log-sum-exp of :math:`\log w_0 + \log \mathcal{N}(z; 0, s^2 I)` and
        :math:`\log w_k + \log \mathcal{N}(x; \mu_k, s^2 L_k L_k^T) + \mathrm{ladj}(z)`, :math:`x = f(z)`."""
        flow_term = self.log_weights[0] + self._log_normal(z)
        gaussians = self.gaussians.log_prob(x.unsqueeze(-2)) + ladj.unsqueeze(-1) + self.log_weights[1:]
        return torch.logsumexp(torch.cat([flow_term.unsqueeze(-1), gaussians], dim=-1), dim=-1)

    def propose(
        self, flow: LatentFlow, state: ChainState, step_size: Tensor, noise: Tensor
    ) -> tuple[Tensor, Tensor]:
        r"""``(z', log q(z'))``: a component :math:`k \sim w`; :math:`z' = s\,\xi` for the flow's,
        :math:`z' = f^{-1}(\mu_k + s L_k \xi)` for mode :math:`k`."""
        batch_shape = noise.shape[:-1]
        component = (
            torch.multinomial(
                self.log_weights.exp(), batch_shape.numel(), replacement=True, generator=self.generator
            )
            .reshape(batch_shape)
            .to(noise.device)
        )
        index = (component - 1).clamp(min=0)
        x_mode = self.locs[index] + self.scale * (self.scale_trils[index] @ noise.unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            z_new = torch.where((component == 0).unsqueeze(-1), self.scale * noise, flow.to_latent(x_mode))
            x_new, ladj_new = flow.to_data(z_new)
        return z_new, self._log_mixture(z_new, x_new, ladj_new)

    def log_proposal_density(
        self, flow: LatentFlow, state_to: ChainState, state_from: ChainState, step_size: Tensor
    ) -> Tensor:
        r""":math:`\log q_Z(z_\mathrm{to})`, whatever ``state_from``."""
        return self._log_mixture(state_to.z, state_to.x, state_to.ladj)


#: ``independence_tries="auto"``: this many tries per step after warmup ...
AUTO_TRIES = 8
#: ... where warmup's independence moves (one try each) accepted less than this share of proposals;
#: one try where they accepted more (the draws are nearly independent already, and more tries cost
#: time). Measured on the ten posteriordb posteriors (``benchmarks/independence_tries.py``): 8 tries
#: gave 1.1-1.5x the ESS per second where one-try acceptance was 0.62-0.84, and 0.5-0.9x where it
#: was 0.85-0.94.
AUTO_TRIES_BELOW = 0.85


def auto_tries(acceptance_rate: float) -> int:
    """The tries of ``independence_tries="auto"`` after a warmup whose independence moves accepted
    ``acceptance_rate`` of their proposals (NaN, no warmup moves: one try)."""
    return AUTO_TRIES if acceptance_rate < AUTO_TRIES_BELOW else 1


def tries_for_density(tries: int | str, vectorized: bool) -> int | str:
    """``independence_tries`` for a model's density: ``"auto"`` is one try where the density is
    evaluated point by point (``vectorized`` false), each try costing a model run of its own."""
    return 1 if tries == "auto" and not vectorized else tries


def independence_step(
    state: ChainState,
    target: LatentTarget,
    precond: Move,
    scale: float = 1.0,
    *,
    generator: torch.Generator | None = None,
    modes: tuple[Mode, ...] = (),
) -> tuple[ChainState, StepInfo]:
    r"""One independence Metropolis-Hastings move of every chain of ``state``.

    Arguments:
        state: The current state (its cache is ``precond``'s).
        target: The latent target :math:`\pi`.
        precond: The preconditioner of the MALA steps; the new state carries its cache.
        scale: The proposal's scale :math:`s` (1: the flow's base law).
        generator: Random generator of the proposal and the uniforms; the global one if ``None``.
        modes: The posterior's modes found, the flow's first (``FitResult.modes``): with two or
            more, the proposal is the mode mixture (:class:`ModeMixtureProposal`).

    Returns:
        The next state and a :class:`~pyro_nfmala.engine.step.StepInfo`, as
        :func:`~pyro_nfmala.engine.step.metropolis_hastings_step`.
    """
    one = torch.ones((), dtype=state.z.dtype, device=state.z.device)
    move = independence_proposal(precond, scale, modes, generator)
    return metropolis_hastings_step(state, target, move, one, generator=generator)


def independence_proposal(
    precond: Move,
    scale: float = 1.0,
    modes: tuple[Mode, ...] = (),
    generator: torch.Generator | None = None,
) -> IndependenceProposal:
    """The flow's base law, or with two or more ``modes`` (the flow's first) the mode mixture."""
    if len(modes) < 2:
        return IndependenceProposal(precond, scale)
    others = modes[1:]
    log_masses = torch.tensor([mode.log_mass for mode in modes], dtype=others[0].loc.dtype)
    return ModeMixtureProposal(
        precond,
        torch.stack([mode.loc for mode in others]),
        torch.stack([mode.scale_tril for mode in others]),
        mode_mixture_weights(log_masses).to(others[0].loc.device),
        scale,
        generator,
    )
