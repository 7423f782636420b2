r"""The Laplace approximation: where a posterior is, and its scale, before any flow (the Gaussian stage
of the staged map).

For an unnormalized log density :math:`\log \pi_X` on :math:`\mathbb{R}^d`:

1. the mode :math:`\mu = \arg\max \log \pi_X` by L-BFGS (:class:`torch.optim.LBFGS`, strong Wolfe
   line search) from several starts, the best finite one kept; the other maxima that a barrier separates from
   it (the log density dips by over ``BARRIER`` nats on the segment between them) and that hold a Laplace mass
   of at least ``MIN_MODE_MASS`` of the best one's are kept as :attr:`LaplaceApproximation.others`
   (:class:`~pyro_nfmala.engine.independence.Mode`), so that a posterior with several modes is seen;
2. the Laplace approximation there: :math:`H = -\nabla^2 \log \pi_X(\mu)` by autograd
   (:func:`torch.autograd.functional.hessian`) and :math:`L L^T = H^{-1}` (Cholesky); where
   :math:`H` is not positive definite, a diagonal :math:`L` from the positive entries of its
   diagonal (1 elsewhere). Where an ascent runs off without bound (no mode: the joint density of a
   centred hierarchical model grows without bound as a scale goes to zero), the search stops at once
   and says so (``"unbounded"``); the staged fit then fits its Gaussian stage by reverse KL instead.

The map :math:`x = \mu + L u` (:class:`~pyro_nfmala.flows.staged.StagedFlow`) whitens the posterior:
in :math:`u` it is close to :math:`N(0, I)` wherever the posterior is close to Gaussian, however
far from the origin it sits and however its coordinates are scaled and correlated. A flow fitted
afterwards only has to learn what is left.

Example:
    >>> precision = torch.tensor([[2.0, 1.2], [1.2, 1.0]], dtype=torch.float64)
    >>> def log_prob(x):
    ...     y = x - torch.tensor([1000.0, -3.0], dtype=torch.float64)
    ...     return -0.5 * ((y @ precision) * y).sum(-1)
    >>> stage = laplace_approximation(log_prob, torch.zeros(2, 2, dtype=torch.float64))
    >>> stage.loc.round(decimals=6), stage.method
    (tensor([1000.,   -3.], dtype=torch.float64), 'laplace')
    >>> torch.allclose(stage.scale_tril @ stage.scale_tril.T, torch.linalg.inv(precision))
    True
"""

from __future__ import annotations

__all__ = ["LaplaceApproximation", "laplace_approximation", "with_mode_from"]

import math
import time
import warnings

from collections.abc import Callable
from typing import NamedTuple

import torch

from torch import Tensor

from ..engine.errors import is_out_of_memory
from ..engine.independence import Mode

#: Rounds of L-BFGS (each of up to ``max_iter`` iterations) while the log density still improves.
MAX_ROUNDS = 3
#: A search that ends a round with a coordinate far out (beyond ``UNBOUNDED_RADIUS`` in the unconstrained
#: space, a scale of ``e^-15``) has no mode to find, or a degenerate one (a hierarchical model's joint
#: density grows without bound as a scale goes to zero, or up to a spike where a prior stops it) where,
#: there, it still climbs outward (a gradient entry above ``UNBOUNDED_GRADIENT`` pointing away from the
#: origin) or its gradient is astronomical (an entry above ``SPIKE_GRADIENT``: the spike's curvature).
#: A search that merely passes far out and climbs back (L-BFGS on the 2,519-parameter stochastic
#: volatility posterior went to a log scale of -57 and came back to -1) is not stopped.
UNBOUNDED_GRADIENT = 1.0
SPIKE_GRADIENT = 1e8
UNBOUNDED_RADIUS = 15.0

#: Two maxima are separate modes where the log density dips by more than this (nats) between them.
BARRIER = 1.0
#: The least Laplace mass, relative to the best mode's, of another mode kept.
MIN_MODE_MASS = 1e-3


class LaplaceApproximation(NamedTuple):
    """A Gaussian approximation :math:`N(\\mu, L L^T)` of a posterior, and how it was found."""

    loc: Tensor  #: the mode found, (d,)
    scale_tril: Tensor  #: L, (d, d), lower triangular with a positive diagonal
    #: "laplace" (full Hessian), "diagonal" (the Hessian was not positive definite) or "unbounded" (the
    #: log density grows without bound: no mode, the identity scale)
    method: str
    log_density: float  #: log pi_X at the mode
    #: the other modes found, separated from this one (and from each other) by a barrier, best first
    others: tuple[Mode, ...] = ()

    @property
    def mode(self) -> Mode:
        """The mode found, as a :class:`~pyro_nfmala.engine.independence.Mode`."""
        return Mode(self.loc, self.scale_tril, self.log_density)


class _OutOfTime(Exception):
    """The mode search's deadline passed in the middle of an L-BFGS run."""


def _maximize(
    log_prob: Callable[[Tensor], Tensor], start: Tensor, max_iter: int, deadline: float = math.inf
) -> tuple[Tensor, float, bool]:
    """L-BFGS ascent of ``log_prob`` from ``start``; returns the point, its log density, and whether the
    ascent runs off without bound (a round ended still climbing steeply, far out: see
    ``UNBOUNDED_GRADIENT``; the search stops there). Past ``deadline`` (a ``time.perf_counter()``), the
    best point evaluated so far."""
    x = start.detach().clone().requires_grad_(True)
    best = [start.detach().clone(), math.inf]  # the point of the lowest finite loss evaluated

    def closure() -> Tensor:
        if time.perf_counter() > deadline:
            raise _OutOfTime
        x.grad = None
        if not bool(torch.isfinite(x).all()):  # the line search overshot to inf or NaN
            return torch.tensor(math.inf, dtype=x.dtype).requires_grad_()
        loss = -log_prob(x.unsqueeze(0))[0]
        if not torch.isfinite(loss):  # out of the support: an infinitely bad point, no direction
            return torch.full_like(loss, math.inf).detach().requires_grad_()
        if float(loss) < best[1]:
            best[:] = [x.detach().clone(), float(loss)]
        loss.backward()
        return loss

    start_value = _value(log_prob, start)
    unbounded = False
    try:
        previous = math.inf
        for _ in range(MAX_ROUNDS):  # L-BFGS can stop early on a long curved path: go on while it gains
            # a fresh optimizer each round: a history built where the line search met non-finite values
            # (the 2,519-parameter stochastic volatility model: 622 of a round's 626 evaluations) stalls
            # the next round at its first step, with the gradient still in the hundreds
            optimizer = torch.optim.LBFGS(
                [x], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                tolerance_grad=1e-9, tolerance_change=1e-12,
            )  # fmt: skip
            loss = float(optimizer.step(closure))
            if not math.isfinite(loss) or previous - loss <= 1e-9 * (1 + abs(loss)):
                break
            previous = loss
            if _runs_off(log_prob, x.detach()):
                unbounded = True
                break
    except _OutOfTime:
        x = best[0].requires_grad_(True)
    except Exception as error:  # noqa: BLE001 - a failed search (a model raising at a wild point): keep the start
        if is_out_of_memory(error):
            raise
        return start.detach().clone(), start_value, False
    x = x.detach()
    value = _value(log_prob, x)
    if not math.isfinite(value) or (math.isfinite(start_value) and value < start_value):
        return start.detach().clone(), start_value, False
    return x, value, unbounded


def _runs_off(log_prob: Callable[[Tensor], Tensor], x: Tensor) -> bool:
    """Whether the ascent at ``x``, at the end of a round that still gained, is running off without bound
    or into a spike: far out, and climbing outward there or with an astronomical gradient."""
    far = x.abs() > UNBOUNDED_RADIUS
    if not bool(far.any()):
        return False
    with torch.enable_grad():
        point = x.detach().clone().requires_grad_(True)
        value = log_prob(point.unsqueeze(0))[0]
        if not bool(torch.isfinite(value)):
            return False
        (grad,) = torch.autograd.grad(value, point)
    outward = (grad * torch.sign(x))[far]
    return bool((outward > UNBOUNDED_GRADIENT).any() or grad.abs().max() > SPIKE_GRADIENT)


def _value(log_prob: Callable[[Tensor], Tensor], x: Tensor) -> float:
    """``log_prob`` at ``x`` as a float; -inf where it is not finite or raises."""
    if not bool(torch.isfinite(x).all()):
        return -math.inf
    try:
        with torch.no_grad():
            value = float(log_prob(x.unsqueeze(0))[0])
    except Exception as error:  # noqa: BLE001 - a model that fails there
        if is_out_of_memory(error):
            raise
        return -math.inf
    return value if math.isfinite(value) else -math.inf


def _scale_tril(hessian: Tensor) -> tuple[Tensor, str]:
    """L with L L^T = H^{-1} (Cholesky), or a diagonal one where H is not positive definite."""
    hessian = 0.5 * (hessian + hessian.T)
    try:
        factor = torch.linalg.cholesky(hessian)
        covariance = torch.cholesky_inverse(factor)
        scale_tril = torch.linalg.cholesky(covariance)
        if bool(torch.isfinite(scale_tril).all()):
            return scale_tril, "laplace"
    except RuntimeError:  # torch.linalg.LinAlgError: not positive definite
        pass
    diagonal = torch.diagonal(hessian)
    scales = torch.where((diagonal > 0) & torch.isfinite(diagonal), diagonal.clamp(min=1e-300).rsqrt(), 1.0)
    return torch.diag(scales.to(hessian.dtype)), "diagonal"


def laplace_approximation(
    log_prob: Callable[[Tensor], Tensor], starts: Tensor, *, max_iter: int = 500, deadline: float = math.inf
) -> LaplaceApproximation:
    r"""The mode of ``log_prob`` by L-BFGS from each row of ``starts`` ``(k, d)``, and the Laplace
    approximation at the best one (see the module). Where an ascent runs off without bound (no mode: a
    hierarchical model's joint density as a scale goes to zero), the search stops and says so: method
    ``"unbounded"``, at the first start with the identity scale.

    ``log_prob`` takes a batch ``(n, d)``. Raises ``ValueError`` when it is not finite at the end of
    any of the runs. Past ``deadline`` (a ``time.perf_counter()``), a run stops at the best point it
    has evaluated, and no further start is tried once one has given a finite point.
    """
    best, found = None, []
    for start in starts:
        if best is not None and time.perf_counter() > deadline:
            break
        with warnings.catch_warnings():  # line searches probe far points, where models warn about NaN
            warnings.simplefilter("ignore")
            x, value, runs_off = _maximize(log_prob, start, max_iter, deadline)
        if runs_off:  # no mode: the other starts would run off too, or find a local bump
            first = starts[0].detach().clone()
            identity = torch.eye(len(first), dtype=first.dtype)
            return LaplaceApproximation(first, identity, "unbounded", -math.inf)
        if math.isfinite(value):
            found.append((x, value))
            if best is None or value > best[1]:
                best = (x, value)
    if best is None:
        raise ValueError(
            f"the log density is not finite at any of the {len(starts)} starts of the mode search, nor where "
            "L-BFGS went from them: check the model, or give an init strategy that starts where it is finite"
        )
    loc, value = best
    scale_tril, method = _laplace(log_prob, loc)
    stage = LaplaceApproximation(loc, scale_tril, method, value)
    if method != "laplace" or len(found) < 2:
        return stage
    return stage._replace(others=_other_modes(log_prob, stage, found, deadline))


def _laplace(log_prob: Callable[[Tensor], Tensor], loc: Tensor) -> tuple[Tensor, str]:
    hessian = torch.autograd.functional.hessian(lambda v: -log_prob(v.unsqueeze(0))[0], loc)
    scale_tril, method = _scale_tril(hessian.detach())
    return scale_tril.to(loc.dtype), method


def _other_modes(
    log_prob: Callable[[Tensor], Tensor],
    stage: LaplaceApproximation,
    found: list[tuple[Tensor, float]],
    deadline: float = math.inf,
) -> tuple[Mode, ...]:
    """The maxima of ``found`` that a barrier separates from the best mode and from each other, with a
    positive definite Hessian and a Laplace mass of at least ``MIN_MODE_MASS`` of the best one's (those
    looked at before ``deadline``)."""
    kept = [stage.mode]
    for x, value in sorted(found, key=lambda item: -item[1]):
        if time.perf_counter() > deadline:
            break
        if not all(_separated(log_prob, mode, x, value) for mode in kept):
            continue
        mode = _mode_at(log_prob, x, value, kept[0].log_mass)
        if mode is not None:
            kept.append(mode)
    return tuple(sorted(kept[1:], key=lambda mode: -mode.log_mass))


def with_mode_from(
    log_prob: Callable[[Tensor], Tensor],
    modes: tuple[Mode, ...],
    start: Tensor,
    max_iter: int = 200,
    deadline: float = math.inf,
) -> tuple[Mode, ...]:
    """``modes`` and, if an ascent from ``start`` reaches a maximum separated from all of them by a
    barrier, with a positive definite Hessian and at least ``MIN_MODE_MASS`` of the best one's mass,
    that mode too: a chain's own start checked for a mode the fit's search missed. An ascent that
    ``deadline`` (a ``time.perf_counter()``) stops adds nothing."""
    if not modes or time.perf_counter() > deadline:
        return modes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x, value, runs_off = _maximize(log_prob, start.to(modes[0].loc), max_iter, deadline)
    stopped = time.perf_counter() > deadline  # an ascent cut short: not a maximum
    if stopped or runs_off or not math.isfinite(value):
        return modes
    if not all(_separated(log_prob, mode, x, value) for mode in modes):
        return modes
    mode = _mode_at(log_prob, x, value, max(m.log_mass for m in modes))
    return modes if mode is None else (*modes, mode)


def _mode_at(
    log_prob: Callable[[Tensor], Tensor], x: Tensor, value: float, best_log_mass: float
) -> Mode | None:
    """The mode at the maximum ``x``, where its Hessian is positive definite and its Laplace mass is at
    least ``MIN_MODE_MASS`` of ``best_log_mass``'s."""
    scale_tril, method = _laplace(log_prob, x)
    mode = Mode(x, scale_tril, value)
    return mode if method == "laplace" and mode.log_mass >= best_log_mass + math.log(MIN_MODE_MASS) else None


def _separated(log_prob: Callable[[Tensor], Tensor], mode: Mode, b: Tensor, value_b: float) -> bool:
    """Whether the log density dips by more than ``BARRIER`` below its value at both ends on the segment
    from ``mode``'s location to ``b`` (nine points; a point where it is not finite or raises is a barrier)."""
    a, value_a = mode.loc, mode.log_density
    t = torch.linspace(0.1, 0.9, 9, dtype=a.dtype, device=a.device)[:, None]
    try:
        with torch.no_grad():
            between = log_prob(a + t * (b - a))
    except Exception as error:  # noqa: BLE001 - a model that fails between the modes
        if is_out_of_memory(error):
            raise
        return True
    between = torch.where(torch.isfinite(between), between, torch.full_like(between, -math.inf))
    return float(between.min()) < min(value_a, value_b) - BARRIER
