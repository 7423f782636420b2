r"""The staged map of a posterior, and the coordinates it is fitted in.

The staged map of a Pyro posterior (:func:`fit_flow_to_model`; of any log density: :func:`fit_staged_map`)
uses the cheapest map that passes the flow check (:mod:`pyro_nfmala.fit.check`; by default a *serviceable*
map: Pareto :math:`\hat k < 0.5`, or :math:`\hat k \le 0.7` with an importance ESS of at least 30% of the
draws, with which the chains mix well as it is; ``keep_gaussian="good"`` asks for :math:`\hat k < 0.5` or an
importance ESS of 90%, and so fits a flow stage more often):

1. the Laplace approximation at the mode (:mod:`pyro_nfmala.fit.laplace`), :math:`x = \mu + L u`;
2. if it fails the check, the full-rank Gaussian fitted by reverse KL, started from the Laplace
   approximation, or from the first start and the identity where the Hessian at the mode is not
   positive definite (an unbounded or degenerate mode, as in a funnel, makes Laplace useless);
3. if the better Gaussian still fails, a flow :math:`g` in front of it, :math:`x = \mu + L g(z)`
   (:class:`~pyro_nfmala.flows.staged.StagedFlow`), adapted by a batch of 32 chains that run 400 warmup
   steps in its latent space (all chains in one vectorized evaluation of the model) while the flow is
   refitted every 10 steps to the points they visit and the gradients they computed there (score
   matching plus maximum likelihood, :func:`~pyro_nfmala.fit.chains.adapt_flow_with_chains`): no extra
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
check; where none does, the serviceable one with the smallest :math:`\hat k`, and where none is
serviceable, the Gaussian map with the smallest :math:`\hat k` (the samplers then take
Hamiltonian moves, for which a smooth affine map serves better than a flow fitted to part of the
posterior: on a sparse logistic regression, R-hat 1.006 through the Gaussian map where the flow's gave
2.0), and the fit warns.

**Coordinates.** A hierarchical model (a location-scale site whose parameters depend on other latent
sites) is a funnel in its own coordinates where the data say little about each group;
:func:`fit_in_better_coordinates` fits the Gaussian stages centred and non-centred
(:mod:`pyro_nfmala.model.centring`) and keeps the coordinates whose map passes the flow check better.
"""

from __future__ import annotations

__all__ = [
    "FIT_SECONDS",
    "MAP_GRADES",
    "PARAMETERIZATIONS",
    "STAGED_CHECK_SAMPLES",
    "fit_flow_to_model",
    "fit_in_better_coordinates",
    "fit_map_to_density",
    "fit_staged_map",
    "passes",
]

import logging
import math
import time
import warnings

from collections.abc import Callable, Mapping

import torch
import zuko

from torch import Tensor

from ..flows.builders import default_flow
from ..flows.staged import StagedFlow, affine_flow
from ..model.centring import NonCentring
from ..model.density import ModelDensity, model_density
from .chains import adapt_flow_with_chains
from .check import FlowCheck, check_flow
from .laplace import laplace_approximation
from .train import FitResult, deadline_after, fit_flow

logger = logging.getLogger(__name__)

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
#: The grades of the flow check (:attr:`~pyro_nfmala.fit.check.FlowCheck.serviceable`, ``.good``) at which
#: a staged fit keeps a map without fitting a further stage.
MAP_GRADES = ("serviceable", "good")


#: The coordinates the samplers can sample a model in (:func:`fit_in_better_coordinates`).
PARAMETERIZATIONS = ("auto", "centred", "non-centred")


def passes(check: FlowCheck, grade: str = "serviceable") -> bool:
    """Whether ``check`` meets ``grade`` (one of :data:`MAP_GRADES`)."""
    return check.serviceable if _check_grade(grade) == "serviceable" else check.good


def _check_grade(grade: str) -> str:
    if grade not in MAP_GRADES:
        raise ValueError(f"keep_gaussian must be one of {MAP_GRADES}, got {grade!r}")
    return grade


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
    (:class:`~pyro_nfmala.flows.staged.StagedFlow`) and kept. ``init_strategy``, ``max_plate_nesting``
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
    """The staged map of a :class:`~pyro_nfmala.model.density.ModelDensity` (a Pyro model's, or a
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
    deadline: float | None = None,
    gaussian: FitResult | None = None,
) -> FitResult:
    """The staged map of an unnormalized log density of a batch ``(n, d)`` (see the module and
    :func:`fit_flow_to_model`); ``starts`` ``(k, d)`` are where the mode search begins.

    ``gaussian``: a fit of the same density's Gaussian stages already made (``flow_stage="none"``, as
    :func:`fit_in_better_coordinates` makes in each coordinates it tries): its map, check and modes stand
    for the mode search and the Gaussian stages, which are not run again.

    ``max_seconds`` bounds the whole fit (``None``: no bound), or ``deadline`` (a ``time.perf_counter()``,
    which takes precedence: a budget shared with other work): the mode search stops at the best point
    it has reached, and tries no further start once it has a finite one; no stage starts past it; a stage
    stopped by it is kept only if it passes or beats the others on the check, and the result says so
    (``budget_spent``, with a warning); the flow check of a map found past it evaluates one batch of
    draws.
    ``flow_stage`` is how the flow stage is fitted: ``"chains"``
    (:func:`~pyro_nfmala.fit.chains.adapt_flow_with_chains`, ``chain_options`` its keyword arguments),
    ``"reverse_kl"``, or ``"none"`` (the Gaussian stages only). A stage whose fit fails (non-finite
    throughout) is dropped with a warning, and the best map so far is kept. ``keep_gaussian`` is the
    grade of the flow check (:data:`MAP_GRADES`) at which a map is kept without a further stage.
    """
    _check_grade(keep_gaussian)  # before any fitting
    if flow_stage not in FLOW_STAGES:
        raise ValueError(f"flow_stage must be one of {FLOW_STAGES}, got {flow_stage!r}")
    start_time = time.perf_counter()
    dim, dtype = starts.shape[-1], starts.dtype
    deadline = deadline_after(max_seconds) if deadline is None else deadline
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
            max_seconds=_seconds_left(deadline),
        )

    def checked(map_flow: zuko.flows.Flow) -> FlowCheck:
        return check_flow(map_flow, log_prob, num_samples=check_samples, deadline=deadline)

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
    if gaussian is not None:
        candidates.append((gaussian.stage, gaussian.flow, gaussian.check, gaussian.losses))
        modes = gaussian.modes
    else:
        laplace = laplace_approximation(log_prob, starts, deadline=deadline)
        gaussian_start = StagedFlow(laplace.loc, laplace.scale_tril)
        if laplace.method == "laplace":
            candidates.append(("laplace", gaussian_start, checked(gaussian_start), []))
            variational = (laplace.loc, laplace.scale_tril)
        else:  # no positive definite Hessian (a saddle, a flat or an unbounded mode): Laplace is
            # meaningless there (a spike's map collapses, and its draws' equal weights would pass the
            # check), so the Gaussian is fitted afresh from the first start
            variational = (starts[0], torch.eye(dim, dtype=dtype))

        def fit_gaussian(loc: Tensor, scale_tril: Tensor):
            """The full-rank Gaussian by reverse KL, started at N(loc, L L^T): an affine flow stage behind an
            identity Gaussian stage, fitted, then folded into the Gaussian stage."""
            start = StagedFlow(
                torch.zeros_like(loc), torch.eye(dim, dtype=dtype), affine_flow(loc, scale_tril)
            )
            result = reverse_kl(start)
            return start.folded(), result.losses, result.budget_spent

        if not candidates or not passes(candidates[-1][2], keep_gaussian):
            if time.perf_counter() >= deadline:
                spent = True
            elif not attempt("gaussian", lambda: fit_gaussian(*variational)) and laplace.method != "laplace":
                # from the first start and the identity it failed: from the mode with its diagonal scales
                attempt("gaussian", lambda: fit_gaussian(laplace.loc, laplace.scale_tril))
        if not candidates:  # no Laplace and no Gaussian fit: the mode with the Hessian's diagonal scales
            candidates.append(("diagonal", gaussian_start, checked(gaussian_start), []))
        modes = (laplace.mode, *laplace.others) if laplace.method == "laplace" else ()
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
                max_seconds=_seconds_left(deadline),
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
        serviceable = [candidate for candidate in candidates if candidate[2].serviceable]
        gaussian = [candidate for candidate in candidates if candidate[0] != "flow"]
        fallback = serviceable or gaussian or candidates
        stage, kept, check, losses = (
            good[0] if good else min(fallback, key=lambda candidate: candidate[2].khat)
        )
    seconds = time.perf_counter() - start_time
    if spent:
        warnings.warn(
            f"the staged fit spent its time budget after {seconds:.0f} s and "
            f"kept the {stage} map (Pareto k-hat {check.khat:.2f}); give more time "
            "(fit_options={'max_seconds': ...}) if the flow check or the chains say the map is poor",
            RuntimeWarning,
            stacklevel=3,
        )
    check.warn("the fitted map", stacklevel=3)
    return FitResult(kept, losses, check, stage, seconds, spent, modes)


def _quietly(fit: Callable, *args):
    """Runs a fit with the model's NaN warnings, and the adaptation chains' own warnings, silenced (its
    draws go far at first; the chains that adapt a flow are not the user's)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Encountered NaN")
        warnings.filterwarnings("ignore", message="the flow's adaptation")
        return fit(*args)


def fit_in_better_coordinates(
    model: Callable,
    model_args: tuple,
    model_kwargs: dict | None,
    density: ModelDensity,
    sites: list[str],
    parameterization: str = "auto",
    fit_options: Mapping | None = None,
    density_options: Mapping | None = None,
    stacklevel: int = 2,
    deadline: float | None = None,
) -> tuple[FitResult, NonCentring | None]:
    """The staged map of the model's posterior in its own coordinates (``density``) or non-centred on
    ``sites`` (its hierarchical sites), and the :class:`~pyro_nfmala.model.centring.NonCentring` where
    non-centred (else ``None``); with no sites, the staged map of ``density``.

    ``"auto"`` fits the Gaussian stages in the centred coordinates, then (unless those pass the flow
    check, at the grade ``fit_options["keep_gaussian"]``) in the non-centred ones, keeps the coordinates
    whose Gaussian map has the smaller k-hat, and fits the flow stage there only where that map fails
    the check; ``"non-centred"`` fits there directly. One time budget bounds the trials and the flow stage
    together: ``deadline`` (a ``time.perf_counter()``) if given, else ``fit_options["max_seconds"]`` from
    now; the first trial may take half of it, so that the second has its turn. The warnings of the trial
    kept are given again at ``stacklevel``."""
    fit_options = dict(fit_options or {})
    budget = fit_options.pop("max_seconds", FIT_SECONDS)
    if deadline is None:
        deadline = deadline_after(budget)
    if not sites:
        return fit_map_to_density(density, deadline=deadline, **fit_options), None
    non_centring = NonCentring(model, sites, model_args, model_kwargs, density, **dict(density_options or {}))
    if parameterization == "non-centred":
        return fit_map_to_density(non_centring.density, deadline=deadline, **fit_options), non_centring

    def share_of_what_is_left(share: float) -> float:
        now = time.perf_counter()
        return deadline if math.isinf(deadline) else now + share * max(deadline - now, 0.0)

    gaussian_only = {**fit_options, "flow_stage": "none"}
    grade = fit_options.get("keep_gaussian", "serviceable")
    trials = {}
    for share, (name, trial_density) in zip(
        (0.5, 1.0), (("centred", density), ("non-centred", non_centring.density))
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fit_map_to_density(trial_density, deadline=share_of_what_is_left(share), **gaussian_only)
            trials[name] = (result, caught, trial_density)
        if passes(result.check, grade) or time.perf_counter() >= deadline:
            break
    name = min(trials, key=lambda key: trials[key][0].check.khat)
    result, caught, chosen = trials[name]
    chosen_centring = non_centring if name == "non-centred" else None
    trial_seconds = sum(trial[0].seconds for trial in trials.values())
    spent = any(trial[0].budget_spent for trial in trials.values())
    done = passes(result.check, grade) or fit_options.get("flow_stage") == "none"
    if done or time.perf_counter() >= deadline:
        for warning in caught:
            warnings.warn(warning.message, warning.category, stacklevel=stacklevel + 1)
        return result._replace(seconds=trial_seconds, budget_spent=spent), chosen_centring
    full = fit_map_to_density(chosen, deadline=deadline, gaussian=result, **fit_options)
    return full._replace(seconds=full.seconds + trial_seconds), chosen_centring


def _seconds_left(deadline: float) -> float | None:
    """The seconds until ``deadline`` (at least 1 ms), ``None`` where there is none."""
    return None if math.isinf(deadline) else max(deadline - time.perf_counter(), 1e-3)
