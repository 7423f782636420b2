r"""Pure, batched MALA in latent space (DESIGN.md section 4). No Pyro in here.

One step from :math:`z`, with :math:`g = \nabla \log \pi(z)` and a preconditioner
:math:`A(z)` (see :mod:`pyro_nfmala.precond`):

.. math::
    \mu(z) = z + \epsilon A(z)^{-1} g, \qquad
    z' = \mu(z) + \sqrt{2 \epsilon}\, A(z)^{-1/2} \xi, \quad \xi \sim \mathcal{N}(0, I),

    \log \alpha = \min\left(0, \log \pi(z') - \log \pi(z)
        + \log q(z \mid z') - \log q(z' \mid z)\right).

A proposal whose log density, gradient or log acceptance ratio is not finite, or whose
evaluation raises, is rejected (:math:`\alpha = 0`) and counted as divergent: a chain
never moves to a NaN.

Everything works on one chain (``z`` of shape ``(d,)``) and on a batch of independent
chains (``(chains, d)``) alike.

Example:
    >>> flow = LatentFlow(zuko.flows.NSF(2, transforms=2))
    >>> target = PosteriorPullback(flow, lambda x: -0.5 * (x**2).sum(-1))
    >>> precond = IdentityPreconditioner()
    >>> state = init_state(target, precond, torch.zeros(8, 2))
    >>> state, info = mala_step(state, target, precond, step_size=0.1)
    >>> info.accept_prob.shape
    torch.Size([8])
"""

from __future__ import annotations

__all__ = ["MALAState", "StepInfo", "init_state", "mala_step", "evaluate"]

import logging

from typing import NamedTuple

import torch

from torch import Tensor

from .target import LatentTarget

logger = logging.getLogger(__name__)


class MALAState(NamedTuple):
    r"""The state of a batch of chains, with everything a step reuses.

    Attributes:
        z: Latent position, ``(..., d)``.
        x: Data-space point :math:`f(z)`, ``(..., d)``.
        ladj: :math:`\log|\det J_f(z)|`, ``(...)``.
        log_density: :math:`\log \pi(z)`, ``(...)``.
        grad: :math:`\nabla_z \log \pi(z)`, ``(..., d)``.
        grad_x: :math:`J_f(z)^{-T} \nabla_z \log \pi(z)`, the gradient in data space, filled
            in by preconditioners that need it (``None`` otherwise).
    """

    z: Tensor
    x: Tensor
    ladj: Tensor
    log_density: Tensor
    grad: Tensor
    grad_x: Tensor | None = None


class StepInfo(NamedTuple):
    """What happened in one step, per chain (shape ``(...)`` each)."""

    accept_prob: Tensor
    accepted: Tensor
    diverging: Tensor
    log_accept_ratio: Tensor


def evaluate(target: LatentTarget, precond, z: Tensor) -> MALAState:
    r"""Evaluates :math:`\log \pi`, its gradient, :math:`f` and the preconditioner's cache at ``z``."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        log_density, x, ladj = target.log_density(z)
        (grad,) = torch.autograd.grad(log_density.sum(), z, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(z)
    state = MALAState(z.detach(), x.detach(), ladj.detach(), log_density.detach(), grad.detach())
    return precond.prepare(target.flow, state)


def init_state(target: LatentTarget, precond, z: Tensor) -> MALAState:
    """The state at ``z``, for the first step.

    A target that computes on another device than the flow fails here with a ``ValueError``
    that names both, rather than with torch's error from deep inside the model.
    """
    try:
        return evaluate(target, precond, z)
    except RuntimeError as error:
        if "device" not in str(error):
            raise
        raise ValueError(
            f"the flow is on {target.flow.device} but the target computes on another device "
            f"({error}). Put the flow and the model's data (or the potential's tensors) on one "
            "device: flow.to(device)."
        ) from error


def _finite(*tensors: Tensor, batch_shape: torch.Size) -> Tensor:
    ok = torch.ones(batch_shape, dtype=torch.bool, device=tensors[0].device)
    for tensor in tensors:
        if tensor is None:
            continue
        finite = torch.isfinite(tensor)
        if finite.dim() > len(batch_shape):
            finite = finite.flatten(len(batch_shape)).all(-1)
        ok = ok & finite
    return ok


def _select(accept: Tensor, new: Tensor | None, old: Tensor | None) -> Tensor | None:
    if new is None or old is None:
        return None
    mask = accept.reshape(accept.shape + (1,) * (new.dim() - accept.dim()))
    return torch.where(mask, new, old)


#: Errors of the target or the flow at a proposal that reject it instead of stopping the run.
EVALUATION_ERRORS = (ValueError, RuntimeError, ArithmeticError)


def _evaluate_proposal(target, precond, state: MALAState, z_new: Tensor, step_size: Tensor) -> tuple[MALAState, Tensor]:
    proposal = evaluate(target, precond, z_new)
    return proposal, precond.log_proposal_density(target.flow, state.z, proposal, step_size)


def _evaluate_chain_by_chain(target, precond, state: MALAState, z_new: Tensor, step_size: Tensor) -> tuple[MALAState, Tensor]:
    """Evaluates each chain's proposal alone; a chain whose evaluation raises gets a NaN log density."""
    batch_shape = state.log_density.shape
    n = batch_shape.numel()
    flat = MALAState(*(None if t is None else t.reshape((n,) + t.shape[len(batch_shape):]) for t in state))
    steps = step_size.expand(batch_shape).reshape(n, 1) if step_size.dim() else step_size
    pieces, log_qs = [], []
    for i in range(n):
        chain = MALAState(*(None if t is None else t[i : i + 1] for t in flat))
        chain_step = steps[i] if step_size.dim() else steps
        try:
            proposal, log_q = _evaluate_proposal(target, precond, chain, z_new.reshape(n, -1)[i : i + 1], chain_step)
        except EVALUATION_ERRORS as error:
            logger.debug("proposal of chain %d rejected, evaluation raised %s: %s", i, type(error).__name__, error)
            nan = torch.full((1,), float("nan"), dtype=state.z.dtype, device=state.z.device)
            proposal, log_q = chain._replace(log_density=nan), nan
        pieces.append(proposal)
        log_qs.append(log_q.reshape(1))
    fields = []
    for values, like in zip(zip(*pieces), state):
        fields.append(None if like is None or any(v is None for v in values) else torch.cat(values).reshape(like.shape))
    return MALAState(*fields), torch.cat(log_qs).reshape(batch_shape)


def mala_step(
    state: MALAState,
    target: LatentTarget,
    precond,
    step_size: float | Tensor,
    *,
    generator: torch.Generator | None = None,
) -> tuple[MALAState, StepInfo]:
    r"""One Metropolis-adjusted Langevin step for every chain of ``state``.

    Arguments:
        state: The current state (from :func:`init_state` or a previous step).
        target: The latent target :math:`\pi`.
        precond: The preconditioner (:mod:`pyro_nfmala.precond`).
        step_size: :math:`\epsilon > 0`, a number or a tensor of shape ``(...)`` (one per chain).
        generator: Random generator for the noise and the uniforms; the global one if ``None``.

    Returns:
        The next state and a :class:`StepInfo`.
    """
    batch_shape = state.log_density.shape
    step_size = torch.as_tensor(step_size, dtype=state.z.dtype, device=state.z.device)
    noise = torch.randn(state.z.shape, generator=generator, dtype=state.z.dtype, device=state.z.device)
    uniform = torch.rand(batch_shape, generator=generator, dtype=state.z.dtype, device=state.z.device)

    z_new, log_q_forward = precond.propose(target.flow, state, step_size, noise)
    try:
        proposal, log_q_backward = _evaluate_proposal(target, precond, state, z_new, step_size)
    except EVALUATION_ERRORS as error:
        # The model or the flow failed at a proposal (e.g. out of support). Find which chains
        # failed, one chain at a time, and reject only those.
        logger.debug("batch evaluation raised %s: %s; evaluating chain by chain", type(error).__name__, error)
        proposal, log_q_backward = _evaluate_chain_by_chain(target, precond, state, z_new, step_size)

    log_ratio = proposal.log_density - state.log_density + log_q_backward - log_q_forward
    finite = _finite(log_ratio, proposal.z, proposal.x, proposal.ladj, proposal.grad, proposal.grad_x, batch_shape=batch_shape)
    log_accept = torch.where(finite, log_ratio.clamp(max=0.0), torch.full_like(log_ratio, -float("inf")))
    accept = finite & (torch.log(uniform) < log_accept)

    new_state = MALAState(*(_select(accept, new, old) for new, old in zip(proposal, state)))
    info = StepInfo(
        accept_prob=log_accept.exp(),
        accepted=accept,
        diverging=~finite,
        log_accept_ratio=torch.where(finite, log_ratio, torch.full_like(log_ratio, -float("inf"))),
    )
    return new_state, info
