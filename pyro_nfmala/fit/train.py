r"""Fitting a zuko flow: to an unnormalized density by variational inference (reverse KL), or to samples by
maximum likelihood. (The staged map of a posterior, which uses the first: :mod:`pyro_nfmala.fit.staged`.)

With :math:`z \sim q_Z` and the latent pull-back :math:`\log \pi(z) = \log \pi_X(f(z)) +
\mathrm{ladj}(z)`, the flow :math:`f` is fitted by stochastic gradient descent on

.. math:: \mathcal{L}(f) = \mathbb{E}_{z \sim q_Z}\left[\log q_Z(z) - \log \pi_X(f(z))
          - \mathrm{ladj}(z)\right] = \mathrm{KL}(f_\# q_Z \,\|\, \pi_X) - \log Z ,

minus the ELBO. A poorly fitted flow never makes NFMALA wrong (the T1 target is exact for any
flow); it makes the latent target far from :math:`N(0, I)`, so chains mix slower: small
adapted step sizes and low ESS per draw are the signs to look for.

Both fits run Adam with cosine annealing of the learning rate. In reverse KL, draws where the log
density is not finite (out of the support, or an overflow) are left out of a step's loss while they
are fewer than half of them. A step whose loss or gradient is not finite is skipped; when none of
the first ``MAX_NONFINITE_STEPS`` (100) steps is finite, or
the flow's parameters end non-finite, the fit raises (for reverse KL the usual cause is a
posterior that is improper, or not finite where the flow puts its mass).

Reverse KL trains through the latent-to-data direction (:math:`f`, as the sampler uses it),
maximum likelihood through the data-to-latent one (:math:`f^{-1}`): prefer coupling flows
(``RealNVP``, ``NSF(..., passes=2)``), which are one pass in both directions.
"""

from __future__ import annotations

__all__ = ["FitResult", "deadline_after", "fit_flow", "fit_flow_to_samples"]

import math
import time
import warnings

from collections.abc import Callable
from typing import NamedTuple

import torch
import zuko

from torch import Tensor
from tqdm.auto import tqdm

from ..engine.independence import Mode
from ..engine.validation import check_positive
from ..flows.builders import default_flow
from .check import FlowCheck

#: A fit raises when this many steps in a row (from the start) have a non-finite loss.
MAX_NONFINITE_STEPS = 100


#: Steps per window of the settling test of reverse-KL fits.
SETTLE_WINDOW = 200


class FitResult(NamedTuple):
    """A fitted flow, its loss history (one value per step), and for staged fits what was kept."""

    flow: zuko.flows.Flow  #: the fitted flow (for a staged fit, the map kept)
    losses: list[float]  #: the loss at each step
    check: FlowCheck | None = None  #: the flow check of the map kept (staged fits)
    #: the map kept, ``"laplace"``, ``"gaussian"``, ``"diagonal"`` (the mode with the Hessian's
    #: diagonal, where no Gaussian could be fitted) or ``"flow"``
    stage: str | None = None
    seconds: float = math.nan  #: wall-clock time of the whole fit
    budget_spent: bool = False  #: whether the fit stopped because its time budget was spent
    #: the modes the mode search found (staged fits), each with its Laplace approximation, the map's first
    #: (:class:`~pyro_nfmala.engine.independence.Mode`); empty where the best has no positive definite Hessian
    modes: tuple[Mode, ...] = ()


def fit_flow(
    log_prob: Callable[[Tensor], Tensor],
    flow: zuko.flows.Flow,
    *,
    num_steps: int = 1000,
    num_particles: int = 32,
    lr: float = 5e-3,
    progress: bool = True,
    settle: bool = False,
    max_seconds: float | None = None,
) -> FitResult:
    r"""Fits ``flow`` (in place) to the unnormalized log density ``log_prob`` by reverse KL.

    Arguments:
        log_prob: :math:`\log \pi_X(x)` for ``x`` of shape ``(num_particles, d)``.
        flow: A zuko flow on :math:`\mathbb{R}^d`, trained in place.
        num_steps: Adam steps.
        num_particles: Latent draws per step for the Monte Carlo estimate of the loss.
        lr: Adam's learning rate (decayed by cosine annealing to 1% of it).
        progress: Show a progress bar with the running loss.
        settle: Stop as soon as the loss settles (see the module), before ``num_steps``.
        max_seconds: A time budget: the fit stops when it is spent (``budget_spent`` in the result).

    Example:
        >>> flow = zuko.flows.RealNVP(2)
        >>> log_prob = lambda x: -0.5 * ((x - 3.0) ** 2).sum(-1)
        >>> result = fit_flow(log_prob, flow, num_steps=200, progress=False)
        >>> bool(abs(flow().sample((500,)).mean() - 3.0) < 0.3)
        True
    """
    if num_steps < 1 or num_particles < 1:
        raise ValueError(f"num_steps and num_particles must be >= 1, got {num_steps} and {num_particles}")

    def loss() -> Tensor:
        distribution = flow()
        z = distribution.base.rsample((num_particles,))
        x, ladj = distribution.transform.inv.call_and_ladj(z)
        values = distribution.base.log_prob(z) - log_prob(x) - ladj
        finite = torch.isfinite(values)
        if int(finite.sum()) * 2 < num_particles:  # most draws outside the support: a non-finite step
            return values.mean()
        return values[finite].mean()

    deadline = deadline_after(max_seconds)
    return _train(
        flow,
        loss,
        num_steps=num_steps,
        lr=lr,
        progress=progress,
        name="loss",
        settle=settle,
        deadline=deadline,
    )


def deadline_after(max_seconds: float | None) -> float:
    """The ``time.perf_counter()`` at which a budget of ``max_seconds`` from now is spent (inf for none)."""
    if max_seconds is None:
        return math.inf
    return time.perf_counter() + check_positive("max_seconds", max_seconds)


def _settled(losses: list[float]) -> bool:
    """Whether the last window's mean loss improves on the window before by less than two standard errors."""
    if len(losses) < 2 * SETTLE_WINDOW or len(losses) % SETTLE_WINDOW:
        return False
    recent = torch.tensor(losses[-SETTLE_WINDOW:], dtype=torch.float64)
    previous = torch.tensor(losses[-2 * SETTLE_WINDOW : -SETTLE_WINDOW], dtype=torch.float64)
    recent, previous = recent[torch.isfinite(recent)], previous[torch.isfinite(previous)]
    if len(recent) < SETTLE_WINDOW // 2 or len(previous) < SETTLE_WINDOW // 2:
        return False
    standard_error = float(recent.std() / math.sqrt(len(recent)))
    return float(previous.mean() - recent.mean()) < 2 * standard_error


def _train(
    flow: zuko.flows.Flow,
    loss: Callable[[], Tensor],
    *,
    num_steps: int,
    lr: float,
    progress: bool,
    name: str,
    settle: bool = False,
    deadline: float = math.inf,
) -> FitResult:
    """Adam with cosine annealing on ``loss()``; non-finite steps skipped, a fit never finite raises; stops
    early (``budget_spent``) when ``time.perf_counter()`` passes ``deadline``."""
    optimizer = torch.optim.Adam(flow.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, num_steps, eta_min=lr / 100)
    losses: list[float] = []
    spent = False
    flow.train()
    bar = tqdm(range(num_steps), desc="fitting flow", disable=not progress)
    for step in bar:
        if step and time.perf_counter() > deadline:  # checked before every step, finite or not
            spent = True
            break
        value = loss()
        optimizer.zero_grad()
        if torch.isfinite(value):
            value.backward()
        if not torch.isfinite(value) or not _finite_gradients(flow):
            losses.append(float("nan"))
            if step + 1 == MAX_NONFINITE_STEPS and all(math.isnan(v) for v in losses):
                bar.close()
                flow.eval()
                raise FloatingPointError(_nonfinite_message(MAX_NONFINITE_STEPS))
            continue
        optimizer.step()
        schedule.step()
        losses.append(value.item())
        if len(losses) % 25 == 0:
            bar.set_postfix({name: f"{sum(losses[-25:]) / 25:.3f}"})
        if settle and _settled(losses):
            break
    bar.close()
    flow.eval()
    _check_fit(flow, losses)
    return FitResult(flow, losses, budget_spent=spent)


def _finite_gradients(flow: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p.grad).all()) for p in flow.parameters() if p.grad is not None)


def _nonfinite_message(steps: int) -> str:
    return (
        f"the loss or its gradient was not finite in any of {steps} steps. Fitting to a density (minus the "
        "ELBO): the log density is not finite where the flow puts its mass, or the posterior is improper "
        "(e.g. a flat prior on a parameter that the data do not constrain); check the model, or start the "
        "flow nearer the posterior. Fitting to samples: some samples are NaN or infinite."
    )


def _check_fit(flow: torch.nn.Module, losses: list[float]) -> None:
    """Raises when no step was finite or the parameters are not; warns when most steps were skipped."""
    skipped = sum(math.isnan(value) for value in losses)
    if skipped == len(losses):
        raise FloatingPointError(_nonfinite_message(len(losses)))
    if not all(bool(torch.isfinite(p).all()) for p in flow.parameters()):
        raise FloatingPointError("the flow's parameters became non-finite during the fit: lower lr")
    if skipped > len(losses) // 2:
        warnings.warn(
            f"{skipped} of {len(losses)} fitting steps had a non-finite loss or gradient and were skipped: "
            "the fit may be poor",
            RuntimeWarning,
            stacklevel=3,
        )


def fit_flow_to_samples(
    samples: Tensor,
    flow: zuko.flows.Flow | None = None,
    *,
    num_steps: int = 2000,
    batch_size: int = 512,
    lr: float = 1e-3,
    progress: bool = True,
    generator: torch.Generator | None = None,
    max_seconds: float | None = None,
) -> FitResult:
    r"""Fits ``flow`` (in place) to ``samples`` ``(n, d)`` by maximum likelihood,
    :math:`\max \sum \log q_X(x_i)`.

    With ``flow=None``, a :func:`~pyro_nfmala.default_flow` of the samples' dimension is built. Minibatches
    are drawn from ``samples`` with ``generator``; the loss history is the minibatch negative
    log-likelihood. Adam with cosine annealing of ``lr``. ``max_seconds``: a time budget (the fit
    stops when it is spent, ``budget_spent`` in the result).

    Example:
        >>> x = torch.randn(1000, 2) * torch.tensor([1.0, 0.1])
        >>> result = fit_flow_to_samples(x, zuko.flows.RealNVP(2), num_steps=300, progress=False)
        >>> result.losses[-1] < result.losses[0]
        True
    """
    if samples.dim() != 2:
        raise ValueError(f"samples must have shape (n, d), got {tuple(samples.shape)}")
    if flow is None:
        flow = default_flow(samples.shape[-1])

    def loss() -> Tensor:
        index = torch.randint(len(samples), (min(batch_size, len(samples)),), generator=generator)
        return -flow().log_prob(samples[index]).mean()

    deadline = deadline_after(max_seconds)
    return _train(flow, loss, num_steps=num_steps, lr=lr, progress=progress, name="nll", deadline=deadline)
