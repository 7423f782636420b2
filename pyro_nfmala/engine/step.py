r"""The step module: states, the move protocol, and one generic Metropolis-Hastings step.

A **move** (:class:`Move`) proposes :math:`z'` from a state :math:`z` and gives the proposal
densities both ways; one generic step (:func:`metropolis_hastings_step`) evaluates the target
at :math:`z'` and accepts with

.. math::
    \log \alpha = \min\left(0, \log \pi(z') - \log \pi(z)
        + \log q(z \mid z') - \log q(z' \mid z)\right).

The Langevin moves (:mod:`pyro_nfmala.engine.langevin`: a preconditioner :math:`A(z)` and a step
:math:`\epsilon`),

.. math::
    \mu(z) = z + \epsilon A(z)^{-1} g, \qquad
    z' = \mu(z) + \sqrt{2 \epsilon}\, A(z)^{-1/2} \xi, \quad \xi \sim \mathcal{N}(0, I),

make it MALA (:func:`mala_step` is the same function); the independence move
(:mod:`pyro_nfmala.engine.independence`) makes it independent Metropolis-Hastings. The protocol is
the step's own: moves import it from here.

A proposal whose log density, gradient or log acceptance ratio is not finite is rejected
(:math:`\alpha = 0`) and counted as divergent: a chain never moves to a NaN. Errors raised
while evaluating a proposal follow Pyro's policy for HMC and NUTS: those that a handler
registered with :func:`pyro.ops.integrator.register_exception_handler` accepts (by default,
singular or non-positive-definite matrices), and a distribution's argument check failing (a
parameter that under- or overflowed out of its support, such as a scale :math:`e^u = 0`), are
numerical failures, rejected and counted
like non-finite values, and returned in :attr:`StepInfo.errors`; every other error
(out of memory, a shape or programming error, a ``ValueError`` of the model) propagates at
once. In a batch, a failing evaluation is split in halves until the failing chains are found,
so the others still move: at most :math:`2 \log_2 n` extra evaluations per failing chain.

Everything works on one chain (``z`` of shape ``(d,)``) and on a batch of independent
chains (``(chains, d)``) alike.

Example:
    >>> from pyro_nfmala.engine.langevin import IdentityPreconditioner
    >>> target = PosteriorPullback(zuko.flows.NSF(2, transforms=2), lambda x: -0.5 * (x**2).sum(-1))
    >>> move = IdentityPreconditioner()
    >>> state = init_state(target, move, torch.zeros(8, 2))
    >>> state, info = metropolis_hastings_step(state, target, move, step_size=0.1)
    >>> info.accept_prob.shape
    torch.Size([8])
"""

from __future__ import annotations

__all__ = [
    "ChainState",
    "Move",
    "StepInfo",
    "advance",
    "evaluate",
    "finite_chains",
    "independence_steps",
    "init_state",
    "mala_step",
    "metropolis_hastings_step",
]


from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from torch import Tensor

from ..flows.latent import LatentFlow
from .errors import is_numerical_error, is_out_of_memory  # noqa: F401 - re-exported
from .targets import NO_GRADIENT_WARNING, LatentTarget  # noqa: F401 - NO_GRADIENT_WARNING re-exported


class ChainState(NamedTuple):
    """The state of a batch of chains, with everything a step reuses."""

    z: Tensor  #: latent position, ``(..., d)``
    x: Tensor  #: data-space point :math:`f(z)`, ``(..., d)``
    ladj: Tensor  #: :math:`\log|\det J_f(z)|`, ``(...)``
    log_density: Tensor  #: :math:`\log \pi(z)`, ``(...)``
    grad: Tensor  #: :math:`\nabla_z \log \pi(z)`, ``(..., d)``
    #: what the move keeps about this state
    #: (:meth:`Move.prepare`): ``None``, a tensor or a tuple of
    #: tensors, each with the batch shape first
    cache: Any = None


class StepInfo(NamedTuple):
    """What happened in one step, per chain (shape ``(...)`` each), and the numerical errors
    that evaluations raised and that were turned into rejections."""

    accept_prob: Tensor  #: :math:`\alpha`, 0 for a divergent proposal
    accepted: Tensor  #: whether the chain moved
    diverging: Tensor  #: whether the proposal was non-finite or raised a numerical error
    log_accept_ratio: Tensor  #: the log Metropolis-Hastings ratio before the min with 0; -inf if divergent
    errors: tuple[BaseException, ...] = ()  #: the numerical errors turned into rejections
    #: what a trajectory move tells its adaptation (:class:`~pyro_nfmala.engine.hamiltonian.Trajectory`), or
    #: ``None``
    trajectory: Any = None


@runtime_checkable
class Move(Protocol):
    r"""What :func:`metropolis_hastings_step` needs of a move: a proposal and its densities.

    ``step_size`` is a 0-d tensor or one per chain (shape ``(...)``; a move without a step, such as
    the independence move, ignores it); states are batched, ``(..., d)``. The noise :math:`\xi`
    is drawn by the step, so the proposal is a deterministic function of it.
    """

    name: str

    def prepare(self, flow: LatentFlow, state: ChainState) -> Any:
        """What to keep about ``state`` for later proposals from it (``None``, or tensors with the
        state's batch shape first): stored as ``state.cache``. Moves interleaved in one schedule
        share the cache of its Langevin move."""

    def propose(
        self, flow: LatentFlow, state: ChainState, step_size: Tensor, noise: Tensor
    ) -> tuple[Tensor, Tensor]:
        r"""Returns :math:`z'` and :math:`\log q(z' \mid z)`."""

    def log_proposal_density(
        self, flow: LatentFlow, state_to: ChainState, state_from: ChainState, step_size: Tensor
    ) -> Tensor:
        r"""Returns :math:`\log q(z_\mathrm{to} \mid z_\mathrm{from})` (the states carry :math:`x`,
        :math:`\mathrm{ladj}` and the gradient at both ends)."""


def _map_tensors(fn: Callable[..., Tensor], *caches: Any) -> Any:
    """Applies ``fn`` to the tensors of one or more caches of the same structure."""
    first = caches[0]
    if first is None:
        return None
    if isinstance(first, Tensor):
        return fn(*caches)
    return type(first)(*(_map_tensors(fn, *parts) for parts in zip(*caches)))


def _tensors(cache: Any) -> list[Tensor]:
    if cache is None:
        return []
    if isinstance(cache, Tensor):
        return [cache]
    return [tensor for part in cache for tensor in _tensors(part)]


def evaluate(target: LatentTarget, move: Move, z: Tensor) -> ChainState:
    r"""Evaluates :math:`\log \pi`, its gradient, :math:`f` and the move's cache at ``z``
    (:meth:`~pyro_nfmala.engine.targets.LatentTarget.evaluate`)."""
    log_density, x, ladj, grad = target.evaluate(z)
    state = ChainState(z.detach(), x, ladj, log_density, grad)
    return state._replace(cache=move.prepare(target.flow, state))


def init_state(target: LatentTarget, move: Move, z: Tensor) -> ChainState:
    """The state at ``z``, for the first step, after the target's check of a batch
    (:meth:`~pyro_nfmala.engine.targets.LatentTarget.check`).

    A target that computes on another device than the flow fails here with a ``ValueError``
    that names both, rather than with torch's error from deep inside the model.
    """
    try:
        target.check(z)
        return evaluate(target, move, z)
    except RuntimeError as error:
        if "device" not in str(error):
            raise
        raise ValueError(
            f"the flow is on {target.flow.device} but the target computes on another device "
            f"({error}). Put the flow and the model's data (or the potential's tensors) on one "
            "device: flow.to(device)."
        ) from error


def finite_chains(state: ChainState) -> Tensor:
    """Which chains of ``state`` have finite values everywhere (shape: the batch shape)."""
    batch_shape = state.log_density.shape
    ok = torch.ones(batch_shape, dtype=torch.bool, device=state.z.device)
    for tensor in [state.z, state.x, state.ladj, state.log_density, state.grad, *_tensors(state.cache)]:
        finite = torch.isfinite(tensor)
        if finite.dim() > len(batch_shape):
            finite = finite.flatten(len(batch_shape)).all(-1)
        ok = ok & finite
    return ok


def _select(accept: Tensor, new: ChainState, old: ChainState) -> ChainState:
    def where(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(accept.reshape(accept.shape + (1,) * (a.dim() - accept.dim())), a, b)

    fields = [where(a, b) for a, b in zip(new[:5], old[:5])]
    return ChainState(*fields, _map_tensors(where, new.cache, old.cache))


def _evaluate_proposal(
    target, move, state: ChainState, z_new: Tensor, step_size: Tensor
) -> tuple[ChainState, Tensor]:
    proposal = evaluate(target, move, z_new)
    return proposal, move.log_proposal_density(target.flow, state, proposal, step_size)


def _rows(state: ChainState, index: slice) -> ChainState:
    """Rows ``index`` of a state whose batch shape is flattened to one dimension."""
    return ChainState(*(t[index] for t in state[:5]), _map_tensors(lambda t: t[index], state.cache))


def _flatten(state: ChainState, batch_shape: torch.Size) -> ChainState:
    n, dims = batch_shape.numel(), len(batch_shape)

    def flat(t: Tensor) -> Tensor:
        return t.reshape((n,) + t.shape[dims:])

    return ChainState(*(flat(t) for t in state[:5]), _map_tensors(flat, state.cache))


def _unflatten(state: ChainState, like: ChainState) -> ChainState:
    fields = [t.reshape(ref.shape) for t, ref in zip(state[:5], like[:5])]
    return ChainState(*fields, _map_tensors(lambda t, ref: t.reshape(ref.shape), state.cache, like.cache))


def _evaluate_isolating_failures(
    target,
    move,
    state: ChainState,
    z_new: Tensor,
    step_size: Tensor,
    errors: list[BaseException],
    proposal_density: bool = True,
) -> tuple[ChainState, Tensor]:
    """Evaluates the proposals (and, with ``proposal_density``, the move's reverse proposal density, else
    zeros); where that raises a numerical error, splits the batch in halves until the failing chains are
    found, and gives those a NaN log density (a rejection)."""
    try:
        if not proposal_density:
            new = evaluate(target, move, z_new)
            return new, torch.zeros_like(new.log_density)
        return _evaluate_proposal(target, move, state, z_new, step_size)
    except Exception as error:
        if not is_numerical_error(error):
            _explain(error)
            raise
        errors.append(error)
    batch_shape = state.log_density.shape
    n = batch_shape.numel()
    if n == 1:
        nan = torch.full_like(state.log_density, float("nan"))
        return state._replace(log_density=nan), nan
    flat_state = _flatten(state, batch_shape)
    flat_z = z_new.reshape(n, -1)
    flat_step = step_size.expand(batch_shape).reshape(n) if step_size.dim() else step_size
    halves = []
    for index in (slice(0, n // 2), slice(n // 2, n)):
        step = flat_step[index] if flat_step.dim() else flat_step
        rows = _rows(flat_state, index)
        halves.append(
            _evaluate_isolating_failures(target, move, rows, flat_z[index], step, errors, proposal_density)
        )
    (first, log_q_first), (second, log_q_second) = halves
    joined = ChainState(
        *(torch.cat([a, b]) for a, b in zip(first[:5], second[:5])),
        _map_tensors(lambda a, b: torch.cat([a, b]), first.cache, second.cache),
    )
    return _unflatten(joined, state), torch.cat([log_q_first, log_q_second]).reshape(batch_shape)


def _rejecting(log_ratio: Tensor, finite: Tensor) -> Tensor:
    """The log Metropolis-Hastings ratio, ``-inf`` where the proposal is not finite (a certain rejection)."""
    return torch.where(finite, log_ratio, torch.full_like(log_ratio, -float("inf")))


def _accepts(log_ratio: Tensor, uniform: Tensor) -> Tensor:
    r"""The Metropolis-Hastings rule: accept where :math:`\log u < \min(0, \log r)`."""
    return torch.log(uniform) < log_ratio.clamp(max=0.0)


def _step_info(log_ratio: Tensor, finite: Tensor, accepted: Tensor, errors: list[BaseException]) -> StepInfo:
    """The :class:`StepInfo` of moves whose log ratios (``-inf`` where not finite) and acceptances are
    known."""
    return StepInfo(
        accept_prob=log_ratio.clamp(max=0.0).exp(),
        accepted=accepted,
        diverging=~finite,
        log_accept_ratio=log_ratio,
        errors=tuple(errors),
    )


def _explain(error: BaseException) -> None:
    if hasattr(error, "add_note") and not getattr(error, "_nfmala_explained", False):
        error.add_note(
            "pyro_nfmala: this error was raised while evaluating a MALA proposal. If it is a numerical "
            "failure that should reject the proposal (a divergence), register it as for Pyro's HMC: "
            "pyro.ops.integrator.register_exception_handler(name, lambda e: ...)."
        )
        error._nfmala_explained = True


def metropolis_hastings_step(
    state: ChainState,
    target: LatentTarget,
    move: Move,
    step_size: float | Tensor,
    *,
    generator: torch.Generator | None = None,
) -> tuple[ChainState, StepInfo]:
    r"""One Metropolis-Hastings step of ``move`` (a :class:`Move`) for every chain of ``state``.

    The step draws the noise :math:`\xi \sim \mathcal{N}(0, I)` and one uniform per chain, in that
    order, from ``generator``.

    Arguments:
        state: The current state (from :func:`init_state` or a previous step).
        target: The latent target :math:`\pi`.
        move: The move: a Langevin move (:mod:`pyro_nfmala.engine.langevin`) makes this MALA, the
            independence move (:mod:`pyro_nfmala.engine.independence`) independent Metropolis-Hastings.
        step_size: :math:`\epsilon > 0`, a number or a tensor of shape ``(...)`` (one per chain).
        generator: Random generator for the noise and the uniforms; the global one if ``None``.

    Returns:
        The next state and a :class:`StepInfo`.
    """
    batch_shape = state.log_density.shape
    step_size = torch.as_tensor(step_size, dtype=state.z.dtype, device=state.z.device)
    noise = torch.randn(state.z.shape, generator=generator, dtype=state.z.dtype, device=state.z.device)
    uniform = torch.rand(batch_shape, generator=generator, dtype=state.z.dtype, device=state.z.device)

    z_new, log_q_forward = move.propose(target.flow, state, step_size, noise)
    errors: list[BaseException] = []
    proposal, log_q_backward = _evaluate_isolating_failures(target, move, state, z_new, step_size, errors)

    log_ratio = proposal.log_density - state.log_density + log_q_backward - log_q_forward
    finite = finite_chains(proposal) & torch.isfinite(log_ratio)
    log_ratio = _rejecting(log_ratio, finite)
    accept = _accepts(log_ratio, uniform)
    return _select(accept, proposal, state), _step_info(log_ratio, finite, accept, errors)


#: One Metropolis-adjusted Langevin step: :func:`metropolis_hastings_step` with a Langevin move.
mala_step = metropolis_hastings_step


def advance(
    state: ChainState,
    target: LatentTarget,
    move: Move,
    step_size: float | Tensor,
    *,
    generator: torch.Generator | None = None,
) -> tuple[ChainState, StepInfo]:
    """One step of ``move`` for every chain: the move's own ``step`` where it has one (a trajectory move,
    :class:`~pyro_nfmala.engine.hamiltonian.HamiltonianMove`, which evaluates the target along its
    way), else :func:`metropolis_hastings_step` on its proposal."""
    own = getattr(move, "step", None)
    if own is not None:
        return own(state, target, step_size, generator=generator)
    return metropolis_hastings_step(state, target, move, step_size, generator=generator)


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
        accept = _accepts(log_ratio, uniforms[j])
        log_weight = torch.where(accept, log_weights_new[j], log_weight)
        chosen = torch.where(accept, torch.full_like(chosen, j), chosen)
        log_ratios.append(log_ratio)
        accepted.append(accept)
    return chosen, torch.stack(log_ratios), torch.stack(accepted)


def independence_steps(
    state: ChainState,
    target: LatentTarget,
    move: Move,
    num_tries: int,
    *,
    generator: torch.Generator | None = None,
) -> tuple[ChainState, StepInfo]:
    r"""``num_tries`` independence moves of every chain in a row, their proposals evaluated as one
    batch of ``num_tries`` times the chains.

    The proposals do not depend on the state, so all are drawn (noise first, then one uniform per
    try and chain, from ``generator``) and evaluated before the moves run in turn, each with the exact
    ratio of the module: the composition of exact moves is exact. A proposal
    whose log density, gradient or ratio is not finite is rejected and counted as divergent, and
    numerical errors follow :func:`~pyro_nfmala.engine.step.metropolis_hastings_step`'s policy. With one try,
    this is :func:`~pyro_nfmala.engine.step.metropolis_hastings_step` itself.

    Returns:
        The state after the last try and a :class:`~pyro_nfmala.engine.step.StepInfo` whose fields have one
        row per try, ``(num_tries, ...)``.

    Example:
        >>> from pyro_nfmala.engine.independence import IndependenceProposal
        >>> from pyro_nfmala.engine.langevin import IdentityPreconditioner
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
    log_weights_new = _rejecting(log_weights_new, finite)
    log_weight = flat.log_density - move.log_proposal_density(target.flow, flat, flat, one)
    chosen, log_ratio, accepted = _run_tries(log_weight, log_weights_new.reshape(num_tries, n), uniforms)
    finite = finite.reshape(num_tries, n)
    log_ratio = _rejecting(log_ratio, finite)
    moved = chosen >= 0
    rows = torch.where(moved, chosen, torch.zeros_like(chosen)) * n + torch.arange(n, device=chosen.device)
    landed = _map_tensors(lambda t: t[rows], proposals)
    new_state = _unflatten(_select(moved, landed, flat), state)
    tries_shape = (num_tries, *batch_shape)
    info = _step_info(log_ratio, finite, accepted, errors)
    return new_state, StepInfo(*(field.reshape(tries_shape) for field in info[:4]), info.errors)
