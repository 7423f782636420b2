r"""The step module: states, the move protocol, and one generic Metropolis-Hastings step.

A **move** (:class:`Move`) proposes :math:`z'` from a state :math:`z` and gives the proposal
densities both ways; one generic step (:func:`metropolis_hastings_step`) evaluates the target
at :math:`z'` and accepts with

.. math::
    \log \alpha = \min\left(0, \log \pi(z') - \log \pi(z)
        + \log q(z \mid z') - \log q(z' \mid z)\right).

The Langevin moves (:mod:`pyro_nfmala.precond`: a preconditioner :math:`A(z)` and a step
:math:`\epsilon`),

.. math::
    \mu(z) = z + \epsilon A(z)^{-1} g, \qquad
    z' = \mu(z) + \sqrt{2 \epsilon}\, A(z)^{-1/2} \xi, \quad \xi \sim \mathcal{N}(0, I),

make it MALA (:func:`mala_step` is the same function); the independence move
(:mod:`pyro_nfmala.independence`) makes it independent Metropolis-Hastings. The protocol is
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
    >>> from pyro_nfmala.precond import IdentityPreconditioner
    >>> target = PosteriorPullback(zuko.flows.NSF(2, transforms=2), lambda x: -0.5 * (x**2).sum(-1))
    >>> move = IdentityPreconditioner()
    >>> state = init_state(target, move, torch.zeros(8, 2))
    >>> state, info = metropolis_hastings_step(state, target, move, step_size=0.1)
    >>> info.accept_prob.shape
    torch.Size([8])
"""

from __future__ import annotations

__all__ = [
    "MALAState",
    "Move",
    "StepInfo",
    "evaluate",
    "finite_chains",
    "init_state",
    "mala_step",
    "metropolis_hastings_step",
]


from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from torch import Tensor

from .errors import is_numerical_error, is_out_of_memory  # noqa: F401 - re-exported
from .flow import LatentFlow
from .target import NO_GRADIENT_WARNING, LatentTarget  # noqa: F401 - NO_GRADIENT_WARNING re-exported


class MALAState(NamedTuple):
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


@runtime_checkable
class Move(Protocol):
    r"""What :func:`metropolis_hastings_step` needs of a move: a proposal and its densities.

    ``step_size`` is a 0-d tensor or one per chain (shape ``(...)``; a move without a step, such as
    the independence move, ignores it); states are batched, ``(..., d)``. The noise :math:`\xi`
    is drawn by the step, so the proposal is a deterministic function of it.
    """

    name: str

    def prepare(self, flow: LatentFlow, state: MALAState) -> Any:
        """What to keep about ``state`` for later proposals from it (``None``, or tensors with the
        state's batch shape first): stored as ``state.cache``. Moves interleaved in one schedule
        share the cache of its Langevin move."""

    def propose(
        self, flow: LatentFlow, state: MALAState, step_size: Tensor, noise: Tensor
    ) -> tuple[Tensor, Tensor]:
        r"""Returns :math:`z'` and :math:`\log q(z' \mid z)`."""

    def log_proposal_density(
        self, flow: LatentFlow, state_to: MALAState, state_from: MALAState, step_size: Tensor
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


def evaluate(target: LatentTarget, move: Move, z: Tensor) -> MALAState:
    r"""Evaluates :math:`\log \pi`, its gradient, :math:`f` and the move's cache at ``z``
    (:meth:`~pyro_nfmala.target.LatentTarget.evaluate`)."""
    log_density, x, ladj, grad = target.evaluate(z)
    state = MALAState(z.detach(), x, ladj, log_density, grad)
    return state._replace(cache=move.prepare(target.flow, state))


def init_state(target: LatentTarget, move: Move, z: Tensor) -> MALAState:
    """The state at ``z``, for the first step, after the target's check of a batch
    (:meth:`~pyro_nfmala.target.LatentTarget.check`).

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


def finite_chains(state: MALAState) -> Tensor:
    """Which chains of ``state`` have finite values everywhere (shape: the batch shape)."""
    batch_shape = state.log_density.shape
    ok = torch.ones(batch_shape, dtype=torch.bool, device=state.z.device)
    for tensor in [state.z, state.x, state.ladj, state.log_density, state.grad, *_tensors(state.cache)]:
        finite = torch.isfinite(tensor)
        if finite.dim() > len(batch_shape):
            finite = finite.flatten(len(batch_shape)).all(-1)
        ok = ok & finite
    return ok


def _select(accept: Tensor, new: MALAState, old: MALAState) -> MALAState:
    def where(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(accept.reshape(accept.shape + (1,) * (a.dim() - accept.dim())), a, b)

    fields = [where(a, b) for a, b in zip(new[:5], old[:5])]
    return MALAState(*fields, _map_tensors(where, new.cache, old.cache))


def _evaluate_proposal(
    target, move, state: MALAState, z_new: Tensor, step_size: Tensor
) -> tuple[MALAState, Tensor]:
    proposal = evaluate(target, move, z_new)
    return proposal, move.log_proposal_density(target.flow, state, proposal, step_size)


def _rows(state: MALAState, index: slice) -> MALAState:
    """Rows ``index`` of a state whose batch shape is flattened to one dimension."""
    return MALAState(*(t[index] for t in state[:5]), _map_tensors(lambda t: t[index], state.cache))


def _flatten(state: MALAState, batch_shape: torch.Size) -> MALAState:
    n, dims = batch_shape.numel(), len(batch_shape)

    def flat(t: Tensor) -> Tensor:
        return t.reshape((n,) + t.shape[dims:])

    return MALAState(*(flat(t) for t in state[:5]), _map_tensors(flat, state.cache))


def _unflatten(state: MALAState, like: MALAState) -> MALAState:
    fields = [t.reshape(ref.shape) for t, ref in zip(state[:5], like[:5])]
    return MALAState(*fields, _map_tensors(lambda t, ref: t.reshape(ref.shape), state.cache, like.cache))


def _evaluate_isolating_failures(
    target, move, state: MALAState, z_new: Tensor, step_size: Tensor, errors: list[BaseException]
) -> tuple[MALAState, Tensor]:
    """Evaluates the proposals; where that raises a numerical error, splits the batch in halves
    until the failing chains are found, and gives those a NaN log density (a rejection)."""
    try:
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
        halves.append(
            _evaluate_isolating_failures(target, move, _rows(flat_state, index), flat_z[index], step, errors)
        )
    (first, log_q_first), (second, log_q_second) = halves
    joined = MALAState(
        *(torch.cat([a, b]) for a, b in zip(first[:5], second[:5])),
        _map_tensors(lambda a, b: torch.cat([a, b]), first.cache, second.cache),
    )
    return _unflatten(joined, state), torch.cat([log_q_first, log_q_second]).reshape(batch_shape)


def _explain(error: BaseException) -> None:
    if hasattr(error, "add_note") and not getattr(error, "_nfmala_explained", False):
        error.add_note(
            "pyro_nfmala: this error was raised while evaluating a MALA proposal. If it is a numerical "
            "failure that should reject the proposal (a divergence), register it as for Pyro's HMC: "
            "pyro.ops.integrator.register_exception_handler(name, lambda e: ...)."
        )
        error._nfmala_explained = True


def metropolis_hastings_step(
    state: MALAState,
    target: LatentTarget,
    move: Move,
    step_size: float | Tensor,
    *,
    generator: torch.Generator | None = None,
) -> tuple[MALAState, StepInfo]:
    r"""One Metropolis-Hastings step of ``move`` (a :class:`Move`) for every chain of ``state``.

    The step draws the noise :math:`\xi \sim \mathcal{N}(0, I)` and one uniform per chain, in that
    order, from ``generator``.

    Arguments:
        state: The current state (from :func:`init_state` or a previous step).
        target: The latent target :math:`\pi`.
        move: The move: a Langevin move (:mod:`pyro_nfmala.precond`) makes this MALA, the
            independence move (:mod:`pyro_nfmala.independence`) independent Metropolis-Hastings.
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
    log_accept = torch.where(finite, log_ratio.clamp(max=0.0), torch.full_like(log_ratio, -float("inf")))
    accept = finite & (torch.log(uniform) < log_accept)

    info = StepInfo(
        accept_prob=log_accept.exp(),
        accepted=accept,
        diverging=~finite,
        log_accept_ratio=torch.where(finite, log_ratio, torch.full_like(log_ratio, -float("inf"))),
        errors=tuple(errors),
    )
    return _select(accept, proposal, state), info


#: One Metropolis-adjusted Langevin step: :func:`metropolis_hastings_step` with a Langevin move.
mala_step = metropolis_hastings_step
