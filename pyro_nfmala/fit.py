r"""Fitting a zuko flow: to an unnormalized density by variational inference (reverse KL), to a
Pyro posterior in stages, or to samples by maximum likelihood.

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

**The staged map of a Pyro posterior** (:func:`fit_flow_to_model`) uses the cheapest map that
passes the flow check (:mod:`pyro_nfmala.flowcheck`; by default a *serviceable* map: Pareto
:math:`\hat k < 0.5`, or :math:`\hat k \le 0.7` with an importance ESS of at least 30% of the draws,
with which the chains mix well as it is; ``keep_gaussian="good"`` asks for :math:`\hat k < 0.5` or an
importance ESS of 90%, and so fits a flow stage more often):

1. the Laplace approximation at the mode (:mod:`pyro_nfmala.gaussian`), :math:`x = \mu + L u`;
2. if it fails the check, the full-rank Gaussian fitted by reverse KL, started from the Laplace
   approximation, or from the first start and the identity where the Hessian at the mode is not
   positive definite (an unbounded or degenerate mode, as in a funnel, makes Laplace useless);
3. if the better Gaussian still fails, a flow :math:`g` in front of it, :math:`x = \mu + L g(z)`
   (:class:`~pyro_nfmala.flows.StagedFlow`), adapted by a batch of 32 chains that run 400 warmup
   steps in its latent space (all chains in one vectorized evaluation of the model) while the flow is
   refitted every 10 steps to the points they visit and the gradients they computed there (score
   matching plus maximum likelihood, :func:`~pyro_nfmala.refine.adapt_flow_with_chains`): no extra
   model evaluation for training, and the chains reach the parts of the posterior (a funnel's neck,
   a curved ridge) that reverse KL, mode-seeking, misses. ``flow_stage="reverse_kl"`` fits it by
   reverse KL instead.

**Bounded, never a crash.** After the mode search, the stages share a time budget, ``max_seconds``
(``FIT_SECONDS``, 120 s, by default): a stage stops when it is spent, the result records it
(``budget_spent``) and the fit warns. A stage whose fit fails (its loss never finite) is dropped
with a warning; where no Gaussian could be fitted at all, the mode with the Hessian's diagonal
scales is the map (stage ``"diagonal"``).

Each reverse-KL fit stops when its objective settles (the mean loss of the last
``SETTLE_WINDOW`` (200) steps no longer improves on the window before by more than two of its
standard errors), at the latest after ``num_steps``. The map kept is the first that passes the
check, else the one with the smallest :math:`\hat k`; when even that one is above 0.7, the fit
warns.

Reverse KL trains through the latent-to-data direction (:math:`f`, as the sampler uses it),
maximum likelihood through the data-to-latent one (:math:`f^{-1}`): prefer coupling flows
(``RealNVP``, ``NSF(..., passes=2)``), which are one pass in both directions.
"""

from __future__ import annotations

__all__ = [
    "FIT_SECONDS",
    "MAP_GRADES",
    "STAGED_CHECK_SAMPLES",
    "FitResult",
    "fit_flow",
    "fit_flow_to_model",
    "fit_flow_to_samples",
    "fit_map_to_density",
    "fit_staged_map",
    "passes",
]

import logging
import math
import time
import warnings

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import zuko

from torch import Tensor
from tqdm.auto import tqdm

from .flowcheck import FlowCheck, check_flow
from .flows import StagedFlow, default_flow
from .gaussian import GaussianFlow, Mode, gaussian_stage
from .model import ModelDensity, model_density
from .refine import adapt_flow_with_chains

logger = logging.getLogger(__name__)

#: A fit raises when this many steps in a row (from the start) have a non-finite loss.
MAX_NONFINITE_STEPS = 100
#: Steps per window of the settling test of reverse-KL fits.
SETTLE_WINDOW = 200
#: Starts of the mode search of the Gaussian stage.
NUM_STARTS = 4
#: The default time budget of a staged fit after its mode search, in seconds.
FIT_SECONDS = 120.0
#: Chains of the flow stage for a density evaluated point by point (each chain is one model run per move).
UNVECTORIZED_CHAINS = 8
#: How many draws each map's flow check in a staged fit takes. The decisions turn on k-hat near 0.5 and
#: 0.7, where 1,000 draws undersell the tail (the Laplace map of posteriordb's mesquite: k-hat 0.60 from
#: 1,000 draws, 0.72 from 4,000), and a batch of 4,000 evaluations costs milliseconds for a small model.
STAGED_CHECK_SAMPLES = 4000
#: How the flow stage of a staged fit can be fitted.
FLOW_STAGES = ("chains", "reverse_kl", "none")
#: The grades of the flow check (:attr:`~pyro_nfmala.flowcheck.FlowCheck.serviceable`, ``.good``) at which
#: a staged fit keeps a map without fitting a further stage.
MAP_GRADES = ("serviceable", "good")


def passes(check: FlowCheck, grade: str = "serviceable") -> bool:
    """Whether ``check`` meets ``grade`` (one of :data:`MAP_GRADES`)."""
    return check.serviceable if _check_grade(grade) == "serviceable" else check.good


def _check_grade(grade: str) -> str:
    if grade not in MAP_GRADES:
        raise ValueError(f"keep_gaussian must be one of {MAP_GRADES}, got {grade!r}")
    return grade


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
    #: the modes the mode search found (staged fits), each with its Laplace approximation, the map's
    #: first (:class:`~pyro_nfmala.gaussian.Mode`); empty where the best has no positive definite Hessian
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

    deadline = _deadline(max_seconds)
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


def _deadline(max_seconds: float | None) -> float:
    """The ``time.perf_counter()`` at which a budget of ``max_seconds`` from now is spent (inf for none)."""
    return math.inf if max_seconds is None else time.perf_counter() + _check_seconds(max_seconds)


def _check_seconds(seconds: object) -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"max_seconds must be a number > 0 or None, got {seconds!r}")
    return float(seconds)


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
        if time.perf_counter() > deadline:
            spent = True
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


def fit_flow_to_model(
    model: Callable,
    *model_args,
    flow: zuko.flows.Flow | None = None,
    model_kwargs: dict | None = None,
    num_steps: int = 3000,
    num_particles: int = 64,
    lr: float = 5e-3,
    progress: bool = True,
    init_strategy: Callable | None = None,
    max_plate_nesting: int | None = None,
    transforms: dict | None = None,
    check_samples: int = STAGED_CHECK_SAMPLES,
    max_seconds: float | None = FIT_SECONDS,
    flow_stage: str = "chains",
    chain_options: Mapping | None = None,
    keep_gaussian: str = "serviceable",
) -> FitResult:
    """Fits the staged map of a Pyro model's posterior on its flat unconstrained parameters.

    The layout is the one :class:`~pyro_nfmala.NFMALA` uses, so the fitted map plugs straight
    into ``NFMALA(model, flow=result.flow)``; ``NFMALA(model)`` with no flow does this itself.
    With ``flow=None``, the cheapest of the staged maps that passes the flow check is kept (see
    the module; the flow stage is an affine coupling flow, :func:`~pyro_nfmala.default_flow` with
    ``kind="affine"``). With a ``flow``, it is fitted in front of the better Gaussian stage
    (:class:`~pyro_nfmala.flows.StagedFlow`) and kept. ``init_strategy``, ``max_plate_nesting``
    and ``transforms`` (Pyro's transforms to the unconstrained space, by site) are as for Pyro's
    NUTS (an init strategy that starts improper ``ImproperUniform`` sites is the default); the
    mode search starts there and at ``NUM_STARTS - 1`` uniform draws in ``(-2, 2)`` of the
    unconstrained space (:func:`fit_map_to_density`).

    The model is evaluated for all particles in one vectorized run when it allows it. Reverse KL
    is mode-seeking: a fitted flow tends to be too narrow (in a funnel, it misses the neck). The
    result's ``check`` holds the Pareto k-hat and importance ESS of the map kept; the fit warns
    when k-hat is above 0.7. ``keep_gaussian`` is :func:`fit_staged_map`'s.

    Example:
        >>> def model(data):
        ...     loc = pyro.sample("loc", dist.Normal(1000.0, 1.0).expand([2]).to_event(1))
        ...     pyro.sample("obs", dist.Normal(loc, 1.0).to_event(1), obs=data)
        >>> fit = fit_flow_to_model(model, torch.full((2,), 1000.5), progress=False)
        >>> fit.stage, fit.check.khat < 0.5  # a Gaussian posterior: Laplace is exact, no flow
        ('laplace', True)
    """
    density = model_density(
        model,
        model_args,
        model_kwargs,
        init_strategy=init_strategy,
        max_plate_nesting=max_plate_nesting,
        transforms=transforms,
    )
    return fit_map_to_density(
        density,
        flow=flow,
        num_steps=num_steps,
        num_particles=num_particles,
        lr=lr,
        progress=progress,
        check_samples=check_samples,
        max_seconds=max_seconds,
        flow_stage=flow_stage,
        chain_options=chain_options,
        keep_gaussian=keep_gaussian,
    )


def fit_map_to_density(density: ModelDensity, **options) -> FitResult:
    """The staged map of a :class:`~pyro_nfmala.model.ModelDensity` (a Pyro model's, or a
    ``potential_fn``'s), on its own layout and transforms; ``options`` are :func:`fit_staged_map`'s.

    The mode search starts at the density's initial point and at ``NUM_STARTS - 1`` uniform draws
    in ``(-2, 2)`` of the unconstrained space (from torch's global generator). A density evaluated point
    by point (a model that does not vectorize) adapts its flow stage with ``UNVECTORIZED_CHAINS`` (8)
    chains instead of 32.
    """
    x0 = density.layout.pack(density.initial_params).detach()
    starts = torch.cat([x0[None], 4 * torch.rand(NUM_STARTS - 1, len(x0), dtype=x0.dtype) - 2])
    if not density.vectorized:  # one model run per chain per move: fewer chains
        options["chain_options"] = {
            "num_chains": UNVECTORIZED_CHAINS,
            **dict(options.get("chain_options") or {}),
        }
    return fit_staged_map(density.log_prob, starts, **options)


def fit_staged_map(
    log_prob: Callable[[Tensor], Tensor],
    starts: Tensor,
    *,
    flow: zuko.flows.Flow | None = None,
    num_steps: int = 3000,
    num_particles: int = 64,
    lr: float = 5e-3,
    progress: bool = True,
    check_samples: int = STAGED_CHECK_SAMPLES,
    max_seconds: float | None = FIT_SECONDS,
    flow_stage: str = "chains",
    chain_options: Mapping | None = None,
    keep_gaussian: str = "serviceable",
) -> FitResult:
    """The staged map of an unnormalized log density of a batch ``(n, d)`` (see the module and
    :func:`fit_flow_to_model`); ``starts`` ``(k, d)`` are where the mode search begins.

    ``max_seconds`` bounds the whole fit (``None``: no bound): the mode search stops at the best point
    it has reached, and tries no further start once it has a finite one; a stage stopped by it is kept
    only if it passes or beats the others on the check, and the result says so (``budget_spent``,
    with a warning). Past the budget the flow check of each map found still runs.
    ``flow_stage`` is how the flow stage is fitted: ``"chains"``
    (:func:`~pyro_nfmala.refine.adapt_flow_with_chains`, ``chain_options`` its keyword arguments),
    ``"reverse_kl"``, or ``"none"`` (the Gaussian stages only). A stage whose fit fails (non-finite
    throughout) is dropped with a warning, and the best map so far is kept. ``keep_gaussian`` is the
    grade of the flow check (:data:`MAP_GRADES`) at which a map is kept without a further stage.
    """
    _check_grade(keep_gaussian)  # before any fitting
    if flow_stage not in FLOW_STAGES:
        raise ValueError(f"flow_stage must be one of {FLOW_STAGES}, got {flow_stage!r}")
    start_time = time.perf_counter()
    dim, dtype = starts.shape[-1], starts.dtype
    deadline = _deadline(max_seconds)
    laplace = gaussian_stage(log_prob, starts, deadline=deadline)
    spent = False

    def reverse_kl(map_flow: zuko.flows.Flow) -> FitResult:
        return fit_flow(
            log_prob,
            map_flow,
            num_steps=num_steps,
            num_particles=num_particles,
            lr=lr,
            progress=progress,
            settle=True,
            max_seconds=max(deadline - time.perf_counter(), 1e-3),
        )

    def checked(map_flow: zuko.flows.Flow) -> FlowCheck:
        return check_flow(map_flow, log_prob, num_samples=check_samples)

    def attempt(stage: str, fit: Callable[[], tuple[zuko.flows.Flow, list[float], bool]]) -> bool:
        """Fits a stage and adds it to the candidates; a failed fit warns and adds nothing."""
        nonlocal spent
        try:
            fitted, losses, stopped = _quietly(fit)
        except FloatingPointError as error:
            warnings.warn(
                f"the {stage} stage of the staged fit failed ({error}); keeping the best map so far",
                RuntimeWarning,
                stacklevel=4,
            )
            return False
        spent = spent or stopped
        candidates.append((stage, fitted, checked(fitted), losses))
        return True

    candidates = []  # (stage, flow, check, losses), cheapest first
    gaussian_start = StagedFlow(laplace.loc, laplace.scale_tril)
    if laplace.method == "laplace":
        candidates.append(("laplace", gaussian_start, checked(gaussian_start), []))
        variational = GaussianFlow(laplace.loc, laplace.scale_tril)
    else:  # no positive definite Hessian (a saddle, a flat or an unbounded mode): Laplace is
        # meaningless there (a spike's map collapses, and its draws' equal weights would pass the
        # check), so the Gaussian is fitted afresh from the first start
        variational = GaussianFlow(starts[0], torch.eye(dim, dtype=dtype))

    def fit_gaussian(start: GaussianFlow):
        result = reverse_kl(start)
        return StagedFlow(*start.stage()), result.losses, result.budget_spent

    if not candidates or not passes(candidates[-1][2], keep_gaussian):
        if time.perf_counter() >= deadline:
            spent = True
        elif not attempt("gaussian", lambda: fit_gaussian(variational)) and laplace.method != "laplace":
            # from the first start and the identity it failed: from the mode with its diagonal scales
            attempt("gaussian", lambda: fit_gaussian(GaussianFlow(laplace.loc, laplace.scale_tril)))
    if not candidates:  # no Laplace and no Gaussian fit: the mode with the Hessian's diagonal scales
        candidates.append(("diagonal", gaussian_start, checked(gaussian_start), []))
    best_gaussian = min(candidates, key=lambda candidate: candidate[2].khat)[1]
    wants_flow = flow is not None or not any(passes(candidate[2], keep_gaussian) for candidate in candidates)
    if wants_flow and flow_stage != "none":
        inner = flow if flow is not None else default_flow(dim, kind="affine").to(dtype)
        staged = StagedFlow(best_gaussian.loc, best_gaussian.scale_tril, inner)

        def fit_flow_stage():
            if flow_stage == "reverse_kl":
                result = reverse_kl(staged)
                return staged, result.losses, result.budget_spent
            adapted = adapt_flow_with_chains(
                log_prob,
                staged,
                progress=progress,
                max_seconds=max(deadline - time.perf_counter(), 1e-3),
                **dict(chain_options or {}),
            )
            return adapted.flow, adapted.losses, adapted.budget_spent

        if time.perf_counter() < deadline:
            attempt("flow", fit_flow_stage)
        else:
            spent = True
    if flow is not None and candidates[-1][0] == "flow":
        stage, kept, check, losses = candidates[-1]
    else:
        good = [candidate for candidate in candidates if passes(candidate[2], keep_gaussian)]
        stage, kept, check, losses = (
            good[0] if good else min(candidates, key=lambda candidate: candidate[2].khat)
        )
    seconds = time.perf_counter() - start_time
    if spent:
        warnings.warn(
            f"the staged fit spent its time budget (max_seconds={max_seconds}) after {seconds:.0f} s and "
            f"kept the {stage} map (Pareto k-hat {check.khat:.2f}); give more time "
            "(fit_options={'max_seconds': ...}) if the flow check or the chains say the map is poor",
            RuntimeWarning,
            stacklevel=3,
        )
    check.warn("the fitted map", stacklevel=3)
    modes = (laplace.mode, *laplace.others)
    return FitResult(kept, losses, check, stage, seconds, spent, modes if laplace.method == "laplace" else ())


def _quietly(fit: Callable, *args):
    """Runs a fit with the model's NaN warnings, and the adaptation chains' own warnings, silenced (its
    draws go far at first; the chains that adapt a flow are not the user's)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Encountered NaN")
        warnings.filterwarnings("ignore", message="the flow's adaptation")
        return fit(*args)


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

    deadline = _deadline(max_seconds)
    return _train(flow, loss, num_steps=num_steps, lr=lr, progress=progress, name="nll", deadline=deadline)
