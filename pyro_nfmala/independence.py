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

The move is a :class:`~pyro_nfmala.mala.Move` (:class:`IndependenceProposal`): the generic
Metropolis-Hastings step (:func:`~pyro_nfmala.mala.metropolis_hastings_step`) accepts it, with the
same rejection of non-finite values and the same error policy as the Langevin moves. The states
it produces carry the cache of the Langevin move it is interleaved with, so the two kinds of
move alternate freely in one schedule (the samplers' ``independence_every``).

**Several tries per step.** A proposal does not depend on the state, so ``k`` of them can be drawn
and evaluated first, as one batch of ``k`` times the chains (:func:`independence_steps`), and the
``k`` moves then run in turn on the values: each is the exact move above, so their composition
leaves :math:`\pi` invariant too. One batched evaluation costs far less than ``k`` single ones,
and a chain that one proposal fails to move gets ``k - 1`` more chances: where the map is fair but
not good (a Pareto k-hat of 0.5-0.7), the draws come out nearly independent all the same.

A wider proposal (:math:`s > 1`) is safer when the flow is too narrow (reverse-KL fits are), at
the price of a lower acceptance rate where the flow is good.

**Several modes.** A flow fitted at one mode has next to no mass at another, so its base law
never proposes there, and a chain that starts there is drawn to the mapped mode and never comes
back. Where the mode search found other modes :math:`\mu_k` with Laplace scales :math:`L_k`
(:class:`~pyro_nfmala.gaussian.Mode`), the **mode mixture** (:class:`ModeMixtureProposal`)
proposes from the mixture, in data space, of the flow's push-forward and a Gaussian at each mode,

.. math:: q_X(x) = w_0\, q_\mathrm{flow}(x) + \sum_{k \ge 1} w_k\, \mathcal{N}(x; \mu_k, s^2 L_k L_k^T),
          \qquad z' = f^{-1}(x'),

whose latent density is :math:`\log q_Z(z) = \log q_X(f(z)) + \mathrm{ladj}(z)`, with
:math:`q_\mathrm{flow}(f(z))\, e^{\mathrm{ladj}(z)} = \mathcal{N}(z; 0, s^2 I)`. The same exact ratio
accepts it, so a chain jumps between the modes as often as the mixture matches the posterior
there. The weights are half each mode's share of the Laplace masses and half uniform, so that no
mode found goes unvisited.

Example:
    >>> from pyro_nfmala.mala import init_state
    >>> from pyro_nfmala.precond import IdentityPreconditioner
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
    "ModeMixtureProposal",
    "auto_tries",
    "check_independence",
    "check_tries",
    "independence_proposal",
    "independence_step",
    "independence_steps",
    "mode_mixture_weights",
    "tries_for_density",
]

import math
import numbers

import torch

from torch import Tensor

from .flow import LatentFlow
from .gaussian import Mode
from .mala import (
    MALAState,
    Move,
    StepInfo,
    _evaluate_isolating_failures,
    _flatten,
    _map_tensors,
    _select,
    _unflatten,
    finite_chains,
    metropolis_hastings_step,
)
from .target import LatentTarget


class IndependenceProposal:
    r"""The independence move :math:`z' \sim \mathcal{N}(0, s^2 I)`, a :class:`~pyro_nfmala.mala.Move`.

    :meth:`propose` and :meth:`log_proposal_density` ignore the step size and the state the
    proposal comes from; :meth:`prepare` is that of the Langevin move the independence move is
    interleaved with, so that the states of the schedule keep the cache its Langevin steps need.

    Arguments:
        precond: The Langevin move of the schedule (:mod:`pyro_nfmala.precond`).
        scale: :math:`s > 0`.
    """

    name = "independence"

    def __init__(self, precond: Move, scale: float = 1.0) -> None:
        self.precond = precond
        self.scale = check_scale(scale)

    def _log_normal(self, z: Tensor) -> Tensor:
        d = z.shape[-1]
        return (
            -0.5 * (z / self.scale).square().sum(-1)
            - d * math.log(self.scale)
            - 0.5 * d * math.log(2 * math.pi)
        )

    def prepare(self, flow: LatentFlow, state: MALAState):
        """The wrapped preconditioner's cache of ``state``."""
        return self.precond.prepare(flow, state)

    def propose(
        self, flow: LatentFlow, state: MALAState, step_size: Tensor, noise: Tensor
    ) -> tuple[Tensor, Tensor]:
        r"""``(z', log q(z'))`` with :math:`z' = s\,\xi`, whatever the state and step size."""
        z_new = self.scale * noise
        return z_new, self._log_normal(z_new)

    def log_proposal_density(
        self, flow: LatentFlow, state_to: MALAState, state_from: MALAState, step_size: Tensor
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
    mode (see the module), a :class:`~pyro_nfmala.mala.Move`.

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
        self, flow: LatentFlow, state: MALAState, step_size: Tensor, noise: Tensor
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
        self, flow: LatentFlow, state_to: MALAState, state_from: MALAState, step_size: Tensor
    ) -> Tensor:
        r""":math:`\log q_Z(z_\mathrm{to})`, whatever ``state_from``."""
        return self._log_mixture(state_to.z, state_to.x, state_to.ladj)


def check_scale(scale: object) -> float:
    """The proposal scale as a float: a finite real number > 0."""
    if isinstance(scale, bool) or not isinstance(scale, (numbers.Real, Tensor)):
        raise ValueError(f"independence_scale must be a finite number > 0, got {scale!r}")
    value = float(scale)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"independence_scale must be a finite number > 0, got {scale!r}")
    return value


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


def check_tries(tries: object) -> int | str:
    """``independence_tries`` checked: an integer >= 1 (not a bool), or ``"auto"``."""
    if tries == "auto":
        return "auto"
    if isinstance(tries, bool) or not isinstance(tries, numbers.Integral) or tries < 1:
        raise ValueError(f"independence_tries must be 'auto' or an integer >= 1, got {tries!r}")
    return int(tries)


def check_independence(
    every: object, scale: object, *, allow_auto: bool = False
) -> tuple[int | str | None, float]:
    """``(every, scale)`` checked: ``every`` is ``None`` (no independence moves), an integer >= 1, or,
    with ``allow_auto``, ``"auto"``."""
    if allow_auto and every == "auto":
        return "auto", check_scale(scale)
    if every is not None and (
        isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1
    ):
        choices = "None, 'auto' or an integer >= 1" if allow_auto else "None or an integer >= 1"
        raise ValueError(f"independence_every must be {choices}, got {every!r}")
    return (None if every is None else int(every)), check_scale(scale)


def independence_step(
    state: MALAState,
    target: LatentTarget,
    precond: Move,
    scale: float = 1.0,
    *,
    generator: torch.Generator | None = None,
    modes: tuple[Mode, ...] = (),
) -> tuple[MALAState, StepInfo]:
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
        The next state and a :class:`~pyro_nfmala.mala.StepInfo`, as
        :func:`~pyro_nfmala.mala.metropolis_hastings_step`.
    """
    one = torch.ones((), dtype=state.z.dtype, device=state.z.device)
    move = independence_proposal(precond, scale, modes, generator)
    return metropolis_hastings_step(state, target, move, one, generator=generator)


def _run_tries(
    log_weight: Tensor, log_weights_new: Tensor, uniforms: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    r"""``k`` independence moves in turn on precomputed importance log weights
    :math:`\log w = \log \pi(z) - \log q(z)`: try ``j`` moves the chain to proposal ``j`` with
    probability :math:`\min(1, w_j / w)`, :math:`w` the weight of where the chain is then.

    Arguments are the current ``(n,)``, the proposals' ``(k, n)`` (``-inf`` where not finite) and the
    uniforms ``(k, n)``. Returns the index of the proposal each chain ends at (``-1``: none
    accepted), and per try the log acceptance ratio and whether it was accepted, ``(k, n)`` each.
    """
    chosen = torch.full(log_weight.shape, -1, dtype=torch.long, device=log_weight.device)
    log_ratios, accepted = [], []
    for j in range(len(log_weights_new)):
        log_ratio = log_weights_new[j] - log_weight
        accept = torch.log(uniforms[j]) < log_ratio.clamp(max=0.0)
        log_weight = torch.where(accept, log_weights_new[j], log_weight)
        chosen = torch.where(accept, torch.full_like(chosen, j), chosen)
        log_ratios.append(log_ratio)
        accepted.append(accept)
    return chosen, torch.stack(log_ratios), torch.stack(accepted)


def independence_steps(
    state: MALAState,
    target: LatentTarget,
    move: IndependenceProposal,
    num_tries: int,
    *,
    generator: torch.Generator | None = None,
) -> tuple[MALAState, StepInfo]:
    r"""``num_tries`` independence moves of every chain in a row, their proposals evaluated as one
    batch of ``num_tries`` times the chains.

    The proposals do not depend on the state, so all are drawn (noise first, then one uniform per
    try and chain, from ``generator``) and evaluated before the moves run in turn, each with the exact
    ratio of the module: the composition of exact moves is exact. A proposal
    whose log density, gradient or ratio is not finite is rejected and counted as divergent, and
    numerical errors follow :func:`~pyro_nfmala.mala.metropolis_hastings_step`'s policy. With one try,
    this is :func:`~pyro_nfmala.mala.metropolis_hastings_step` itself.

    Returns:
        The state after the last try and a :class:`~pyro_nfmala.mala.StepInfo` whose fields have one
        row per try, ``(num_tries, ...)``.

    Example:
        >>> from pyro_nfmala.mala import init_state
        >>> from pyro_nfmala.precond import IdentityPreconditioner
        >>> target = PosteriorPullback(identity_flow(2), lambda x: -0.5 * (x**2).sum(-1))
        >>> move = IndependenceProposal(IdentityPreconditioner())
        >>> state = init_state(target, move, torch.zeros(8, 2))
        >>> state, info = independence_steps(state, target, move, 4)
        >>> tuple(info.accept_prob.shape), bool((info.accept_prob > 0.999).all())  # q is the target itself
        ((4, 8), True)
    """
    one = torch.ones((), dtype=state.z.dtype, device=state.z.device)
    if num_tries == 1:
        new_state, info = metropolis_hastings_step(state, target, move, one, generator=generator)
        return new_state, StepInfo(*(field.unsqueeze(0) for field in info[:4]), info.errors)
    batch_shape = state.log_density.shape
    n, dim = batch_shape.numel(), state.z.shape[-1]
    unit = {"dtype": state.z.dtype, "device": state.z.device}
    noise = torch.randn((num_tries * n, dim), generator=generator, **unit)
    uniforms = torch.rand((num_tries, n), generator=generator, **unit)
    flat = _flatten(state, batch_shape)
    repeated = _map_tensors(lambda t: t.repeat((num_tries,) + (1,) * (t.dim() - 1)), flat)  # try-major rows
    z_new, log_q_new = move.propose(target.flow, repeated, one, noise)
    errors: list[BaseException] = []
    proposals, _ = _evaluate_isolating_failures(target, move, repeated, z_new, one, errors)
    log_weights_new = proposals.log_density - log_q_new
    finite = finite_chains(proposals) & torch.isfinite(log_weights_new)
    log_weights_new = torch.where(finite, log_weights_new, torch.full_like(log_weights_new, -float("inf")))
    log_weight = flat.log_density - move.log_proposal_density(target.flow, flat, flat, one)
    chosen, log_ratio, accepted = _run_tries(log_weight, log_weights_new.reshape(num_tries, n), uniforms)
    finite = finite.reshape(num_tries, n)
    log_ratio = torch.where(finite, log_ratio, torch.full_like(log_ratio, -float("inf")))
    moved = chosen >= 0
    rows = torch.where(moved, chosen, torch.zeros_like(chosen)) * n + torch.arange(n, device=chosen.device)
    landed = _map_tensors(lambda t: t[rows], proposals)
    new_state = _unflatten(_select(moved, landed, flat), state)
    info = StepInfo(
        accept_prob=log_ratio.clamp(max=0.0).exp().reshape((num_tries, *batch_shape)),
        accepted=accepted.reshape((num_tries, *batch_shape)),
        diverging=(~finite).reshape((num_tries, *batch_shape)),
        log_accept_ratio=log_ratio.reshape((num_tries, *batch_shape)),
        errors=tuple(errors),
    )
    return new_state, info


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
