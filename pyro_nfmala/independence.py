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

A wider proposal (:math:`s > 1`) is safer when the flow is too narrow (reverse-KL fits are), at
the price of a lower acceptance rate where the flow is good.

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

__all__ = ["IndependenceProposal", "check_independence", "independence_step"]

import math
import numbers

import torch

from torch import Tensor

from .flow import LatentFlow
from .mala import MALAState, Move, StepInfo, metropolis_hastings_step
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


def check_scale(scale: object) -> float:
    """The proposal scale as a float: a finite real number > 0."""
    if isinstance(scale, bool) or not isinstance(scale, (numbers.Real, Tensor)):
        raise ValueError(f"independence_scale must be a finite number > 0, got {scale!r}")
    value = float(scale)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"independence_scale must be a finite number > 0, got {scale!r}")
    return value


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
) -> tuple[MALAState, StepInfo]:
    r"""One independence Metropolis-Hastings move of every chain of ``state``.

    Arguments:
        state: The current state (its cache is ``precond``'s).
        target: The latent target :math:`\pi`.
        precond: The preconditioner of the MALA steps; the new state carries its cache.
        scale: The proposal's scale :math:`s` (1: the flow's base law).
        generator: Random generator of the proposal and the uniforms; the global one if ``None``.

    Returns:
        The next state and a :class:`~pyro_nfmala.mala.StepInfo`, as
        :func:`~pyro_nfmala.mala.metropolis_hastings_step`.
    """
    one = torch.ones((), dtype=state.z.dtype, device=state.z.device)
    return metropolis_hastings_step(
        state, target, IndependenceProposal(precond, scale), one, generator=generator
    )
