r"""NFMALA: latent-space MALA under a zuko flow, as a Pyro MCMC kernel. Pyro glue only.

The kernel moves a latent state :math:`z` and hands Pyro the unconstrained parameters of
:math:`x = f(z)`; Pyro's :class:`~pyro.infer.mcmc.api.MCMC` maps them to the constrained
space with the kernel's ``transforms``. By default it samples the exact posterior pull-back
(T1),

.. math:: \log \pi(z) = -U(f(z)) + \log|\det J_f(z)|,

where :math:`U` is Pyro's potential energy, so :math:`f(z)` follows the posterior exactly for
any flow: the flow's quality changes the mixing speed, not the target.

``NFMALA(model)`` with no flow fits the map itself at setup: the staged map of
:func:`~pyro_nfmala.fit_flow_to_model` (a Laplace or Gaussian stage, and a flow only where the
Gaussian fails the flow check) on the kernel's own density of the model (its ``transforms``
included), once per ``MCMC.run`` when chains run one after another (a later run refits when the
model's arguments hold other values; each worker process fits its own when chains run in
parallel), within a time budget (``fit_options={"max_seconds": ...}``). ``kernel.fit_result``
holds it afterwards (``.flow`` to save or reuse, ``.check``, ``.seconds``, ``.budget_spent``).

**Where the flow is adapted, and why there.** The flow stage is adapted by a small batch of warmup
chains at setup (:func:`~pyro_nfmala.refine.adapt_flow_with_chains`: 32 chains, one vectorized run
of the model per move), refitted to their draws and gradients, and then frozen; each of Pyro's
chains then runs its own warmup (step size, mass matrix) on the frozen map and samples with one
fixed, exact kernel. Pyro runs its chains one per process, in parallel, or one after another, so
chains that run cannot pool what they see; the batch at setup pools 32 chains for the cost of a
few hundred vectorized model runs, and gives every chain the same map.

**Hierarchical models** are sampled non-centred where that brings the posterior nearer a Gaussian
(``parameterization``, :mod:`pyro_nfmala.centring`); the draws come back as the model's own sites.

With a given flow, the same flow check runs at setup. Either way a Pareto k-hat above 0.7 warns,
and both numbers, with the fit time, are in ``mcmc.diagnostics()``. At the end of each chain, a
split R-hat above 1.01 or a bulk ESS below 100 over the chains drawn so far in the process warns.
The step, its adaptation, statistics and warnings are those of
:class:`~pyro_nfmala.driver.Driver`, shared with :class:`~pyro_nfmala.ChainSampler`; this module
only speaks Pyro's kernel protocol.

Example:
    >>> def model(data):
    ...     loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    ...     pyro.sample("obs", dist.Normal(loc, 1.0), obs=data)
    >>> kernel = NFMALA(model, flow=zuko.flows.NSF(1, transforms=2))
    >>> mcmc = MCMC(kernel, num_samples=200, warmup_steps=200, disable_progbar=True)
    >>> mcmc.run(torch.randn(20) + 3.0)
    >>> round(float(mcmc.get_samples()["loc"].mean()))
    3
"""

from __future__ import annotations

__all__ = ["NFMALA"]

import logging
import time

from collections.abc import Callable, Mapping

import numpy as np
import pyro.util
import torch

from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from torch import Tensor

from .arviz import warn_about_draws
from .centring import PARAMETERIZATIONS, NonCentring, fit_in_better_coordinates, hierarchical_sites
from .driver import Driver
from .fit import FitResult
from .flow import as_latent_flow
from .flowcheck import FlowCheck, check_flow
from .gaussian import with_mode_from
from .independence import tries_for_density
from .mala import MALAState, Move
from .model import ModelDensity, ParamLayout, check_flow_dim, model_density
from .options import DEFAULT_PRECONDITIONER, SamplerOptions
from .target import LatentTarget, PosteriorPullback, TemperedFlow, check_beta

logger = logging.getLogger(__name__)


class NFMALA(MCMCKernel):
    r"""Metropolis-adjusted Langevin in the latent space of a normalizing flow.

    Give either a Pyro ``model`` or a ``potential_fn``, as for Pyro's
    :class:`~pyro.infer.mcmc.HMC`. The flow lives on the model's unconstrained parameters,
    flattened into one vector :math:`x` in the order the model's latent sites run (for a
    ``potential_fn``: the order of the initial parameters), each site in row-major order.

    Arguments:
        model: A Pyro model with continuous latent sites.
        potential_fn: Alternatively, Pyro's potential energy :math:`U(\mathrm{params})`, minus
            the log density of a dict of unconstrained parameters. Its initial parameters come
            from ``initial_params`` here or in :class:`~pyro.infer.MCMC`.
        flow: An unconditional zuko flow on :math:`\mathbb{R}^d`, :math:`d` the total
            unconstrained dimension. The kernel samples with a frozen deep copy of it
            (``eval()``, no parameter gradients): the user's flow is never changed. ``None``
            (the default): fit the staged map at setup (see the module); costs one mode search
            and, for a non-Gaussian posterior, a flow fit (seconds to a minute or two on a CPU).
        fit_options: Keyword arguments of :func:`~pyro_nfmala.fit.fit_staged_map` when the kernel
            fits its own map (e.g. ``{"progress": False}``, ``{"max_seconds": 600}``); the fit uses
            the kernel's own density (its ``transforms``, ``init_strategy`` and
            ``max_plate_nesting``).
        parameterization: Where the kernel fits its own map of a model with hierarchical sites
            (a location-scale site whose parameters depend on other latent sites,
            :mod:`pyro_nfmala.centring`): ``"auto"`` (default) samples the model non-centred when
            the centred map fails the flow check and the non-centred one does better (a funnel),
            mapping every draw back to the model's own sites exactly; ``"centred"`` never does,
            ``"non-centred"`` always does. Chains started at ``initial_params`` and models with
            user ``transforms`` are sampled centred.
        beta: ``None`` (default) samples the exact posterior (T1). A number
            :math:`\beta \ge 0` samples instead the flow's tempered measure (T2),
            :math:`\log q_Z(z) - \beta\, \mathrm{ladj}(z)`, ignoring the model's density:
            this is not the posterior.
        transforms, max_plate_nesting, jit_compile, jit_options, ignore_jit_warnings: As in
            Pyro's :class:`~pyro.infer.mcmc.HMC`.
        init_strategy: A Pyro init strategy: each chain of a model's posterior starts at
            :math:`z_0 = f^{-1}(x_0)`, :math:`x_0` its own draw of the strategy (default: uniform in
            :math:`(-2, 2)` of the unconstrained space, as Stan does, also for improper
            ``ImproperUniform`` sites), if that is within 10 of the map's sds (:math:`|z_0|_\infty
            \le 10`); further out (a posterior much narrower than the init box), at an
            overdispersed draw of the map, :math:`z_0 \sim N(0, 2^2 I)`. Chains started apart let
            R-hat see a map that missed part of the posterior. The fit uses the strategy too. With
            ``beta`` (T2), chains start at draws of the flow, :math:`z_0 \sim q_Z`.
        initial_params: Unconstrained initial parameters, one value per site (no chain dimension).
        trace_density: Evaluate the model's log density and its gradient as one traced graph per
            batch shape (:mod:`pyro_nfmala.traced`; default): the same arithmetic, checked against the
            model at the point traced, 2-6x faster on small models; a model whose Python branches on
            its parameters' values stays eager. ``False`` runs the model eagerly at every step.

    The sampler's options, ``step_size``, ``adapt_step_size``, ``target_accept_prob``,
    ``preconditioner``, ``mass_matrix``, ``independence_every``, ``independence_scale`` and
    ``independence_tries``, are passed to :class:`~pyro_nfmala.options.SamplerOptions` (documented
    there; ``independence_tries="auto"`` is one try for a ``potential_fn`` or a model that does not
    vectorize, whose tries would each cost a run). Here
    ``independence_every="auto"`` (the default) puts an independence move after every step on a
    posterior whose map passes the flow check's reliability bar (Pareto k-hat <= 0.7), none otherwise
    (and none on the tempered target); its acceptance rate is in the diagnostics and in
    ``sample_stats.independence_accept_prob``. A ``step_size`` given is where the search starts when
    warmup adapts it; after a run, ``kernel.step_size`` is the adapted value.

    A model with no latent sites (all observed or collapsed) has nothing to sample: each draw
    is an empty dict, as with Pyro's HMC.
    """

    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable[[Mapping[str, Tensor]], Tensor] | None = None,
        *,
        flow=None,
        fit_options: Mapping | None = None,
        parameterization: str = "auto",
        step_size: float | None = None,
        adapt_step_size: bool = True,
        target_accept_prob: float = 0.574,
        preconditioner: str | Move = DEFAULT_PRECONDITIONER,
        mass_matrix: str | None = "auto",
        independence_every: int | str | None = "auto",
        independence_scale: float = 1.0,
        independence_tries: int | str = "auto",
        beta: float | None = None,
        transforms: Mapping | None = None,
        max_plate_nesting: int | None = None,
        jit_compile: bool = False,
        jit_options: dict | None = None,
        ignore_jit_warnings: bool = False,
        init_strategy: Callable | None = None,
        initial_params: Mapping[str, Tensor] | None = None,
        trace_density: bool = True,
    ) -> None:
        if (model is None) == (potential_fn is None):
            raise ValueError("give exactly one of model or potential_fn")
        self.model = model
        self.potential_fn = potential_fn
        self.flow = None if flow is None else as_latent_flow(flow)
        self._fits_own_map = flow is None
        self.fit_options = dict(fit_options or {})
        misplaced = sorted(set(self.fit_options) & {"init_strategy", "max_plate_nesting", "transforms"})
        if misplaced:
            raise ValueError(
                f"fit_options {misplaced}: the fit uses the kernel's own density, so pass them to NFMALA "
                "itself (NFMALA(model, init_strategy=..., max_plate_nesting=..., transforms=...))"
            )
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
        self.parameterization = parameterization
        self._non_centred_sites: list[str] = []  # the sites sampled non-centred in this run
        self._non_centring: NonCentring | None = None
        self.fit_result: FitResult | None = None
        self._fitted_for: tuple | None = None
        self._run_draws: list[Tensor] = []  # the draws of each chain on the same data, for R-hat
        self.flow_check: FlowCheck | None = None
        if flow is None and beta is not None:
            raise ValueError("beta samples the flow's own tempered measure: it needs a flow")
        self.options = SamplerOptions.from_arguments(locals())
        self.beta = None if beta is None else check_beta(beta)
        self.transforms = transforms
        self._user_transforms: bool | None = None  # whether the user gave transforms (known at setup)
        self.max_plate_nesting = max_plate_nesting
        self.jit_compile = jit_compile
        self.jit_options = jit_options
        self.ignore_jit_warnings = ignore_jit_warnings
        self.init_strategy = init_strategy
        self.trace_density = bool(trace_density)
        self._user_initial_params = dict(initial_params) if initial_params is not None else None
        self._step_size: float | None = None  # the last chain's adapted step size; kept after cleanup
        self.layout: ParamLayout | None = None
        if potential_fn is not None and initial_params is not None and self.flow is not None:
            self.layout = ModelDensity.from_potential(potential_fn, initial_params).layout
            check_flow_dim(self.flow, self.layout)
        self._reset()

    # ----------------------------------------------------------------------------------------
    # Pyro's MCMCKernel interface

    @property
    def initial_params(self) -> dict[str, Tensor] | None:
        if self._params is not None:
            return self._params
        return self._user_initial_params

    @initial_params.setter
    def initial_params(self, params: Mapping[str, Tensor] | None) -> None:
        self._user_initial_params = dict(params) if params is not None else None

    @property
    def step_size(self) -> float | None:
        """The step size, the one adapted in warmup once a chain has run, else the one given."""
        return self._step_size if self._step_size is not None else self.options.step_size

    def setup(self, warmup_steps: int, *args, **kwargs) -> None:
        self._reset()
        self._warmup_steps = int(warmup_steps)
        density = self._density(args, kwargs)
        self.layout = density.layout
        if self.layout.dim == 0:  # nothing to sample
            self._density_of_nothing = float(density.log_prob(torch.zeros(0)))
            self._params = {}
            return
        self._non_centring = None  # set by a fit that chose the non-centred coordinates
        if self.beta is None:
            self._prepare_map(density, args, kwargs)
        if self._non_centred_sites and self._non_centring is None:  # a fit reused from an earlier chain
            options = self._density_options()
            self._non_centring = NonCentring(
                self.model, self._non_centred_sites, args, kwargs, density, **options
            )
        sampled = density if self._non_centring is None else self._non_centring.density
        check_flow_dim(self.flow, self.layout)
        if self.beta is not None:
            target: LatentTarget = TemperedFlow(self.flow, self.beta)
        else:
            dtype = self.flow.dtype
            target = PosteriorPullback(
                self.flow, lambda x: sampled.log_prob(x).to(dtype), trace=self.trace_density
            )
        # A posterior's chains start where Pyro's init strategy puts them (by default uniform in
        # (-2, 2) of the unconstrained space, one draw per chain, as Stan does): apart from each other
        # and independent of the map, so that R-hat can see a map that missed part of the posterior.
        init_x = (
            sampled.layout.pack(sampled.initial_params)
            if self.model is not None and self.beta is None
            else None
        )
        if self._user_initial_params is not None:
            self.layout.check_point(self._user_initial_params)
            init_x = self.layout.pack(self._user_initial_params)
        self._chain_modes = self._modes()
        if init_x is not None and self._chain_modes:  # a mode the fit's search missed, seen from this start
            self._chain_modes = with_mode_from(sampled.log_prob, self._chain_modes, init_x)
            if len(self._chain_modes) > len(self._modes()):  # chains run after this one propose there too
                self.fit_result = self.fit_result._replace(modes=self._chain_modes)
        tries = tries_for_density(
            self.options.independence_tries, self.model is not None and sampled.vectorized
        )
        options = self.options.replace(
            independence_every=self._independence_schedule(), independence_tries=tries
        )
        self._driver = Driver(target, 1, options, label="NFMALA", modes=self._chain_modes)
        state = self._driver.start_at(
            init_x, fallback=self._user_initial_params is None, describe=self._describe_start
        )
        user_step = options.step_size
        if user_step is None or (options.adapt_step_size and self._warmup_steps > 0):
            self._driver.start(state, search_from=user_step or 1.0)
        else:
            self._driver.start(state, step_size=user_step)
        self._driver.begin_warmup(self._warmup_steps)
        self._driver.record()
        self._step_size = float(self._driver.step_size[0])
        self._params = self._to_params(self._model_point(state))
        logger.debug("setup: d=%d, initial step size %.3g", self.layout.dim, self._step_size)

    def sample(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self._driver is None:  # a model with no latent sites
            self._nothing_steps += 1
            if self._nothing_steps > self._warmup_steps:
                self._nothing_draws += 1
            return {}
        if params is not self._params:  # the caller changed the state: start again from params
            if self._non_centring is not None:
                raise ValueError(
                    "NFMALA samples this model non-centred and cannot restart from params in the model's own "
                    "coordinates: pass parameterization='centred'"
                )
            self._driver.state = self._driver.start_at(
                self.layout.pack(params), describe=self._describe_start
            )
        warming_up = self._driver.warming_up
        started = time.perf_counter()
        self._driver.step()
        if not warming_up:
            self._sampling_seconds += time.perf_counter() - started
        self._step_size = float(self._driver.step_size[0])
        x = self._model_point(self._driver.state)
        self._params = self._to_params(x)
        if not warming_up:
            self._chain_draws.append(x[0].detach().cpu())
        return self._params

    def logging(self) -> dict[str, str]:
        accept = self._driver.ledgers["langevin"].mean_accept_prob if self._driver is not None else 1.0
        shown = {
            "step size": f"{self.step_size or float('nan'):.2e}",
            "acc. prob": f"{accept if accept == accept else 0.0:.3f}",
        }
        if self._driver is not None and self._driver.independence_every is not None:
            shown["independence acc."] = f"{self._driver.independence_acceptance_rate:.3f}"
        return shown

    def diagnostics(self) -> dict:
        driver = self._driver
        draws = self._sample_stats()
        if driver is not None:
            driver.warn_divergences(stacklevel=3)
            ledger = driver.ledgers
            self._warn_if_unconverged()
        check = self.flow_check
        accept = draws["accept_prob"]
        return {
            "divergences": [i for i, diverging in enumerate(draws["diverging"]) if diverging],
            "acceptance rate": sum(accept) / len(accept) if accept else float("nan"),
            "flow check": {}
            if check is None
            else {"khat": check.khat, "ess": check.ess, "draws": check.num_samples},
            "fit seconds": self.fit_result.seconds if self.fit_result is not None else 0.0,
            "non-centred sites": list(self._non_centred_sites),
            "modes found": len(self._chain_modes),
            "seconds per draw": self._sampling_seconds
            / max(len(self._driver.draws.get("accept_prob", ())), 1)
            if driver
            else float("nan"),
            "warmup divergences": ledger["langevin"].counts["warmup"]["divergent"] if driver else 0,
            "numerical errors": driver.errors if driver else 0,
            "independence non-finite": ledger["independence"].total("divergent") if driver else 0,
            "independence acceptance rate": driver.independence_acceptance_rate if driver else float("nan"),
            "independence tries": driver.independence_tries if driver else 1,
            "step size": self.step_size,
            "sample_stats": draws,
        }

    def cleanup(self) -> None:
        self._reset()

    def _warn_if_unconverged(self) -> None:
        """At the end of a chain: the convergence check (split R-hat <= 1.01, bulk ESS >= 100 for every
        unconstrained coordinate) over the chains of this run drawn so far in this process (all of them
        when chains run one after another, this one alone in a worker process)."""
        if len(self._chain_draws) < 4:
            return
        self._run_draws.append(torch.stack(self._chain_draws))
        self._chain_draws = []
        lengths = {len(draws) for draws in self._run_draws}
        if len(lengths) > 1:  # runs of other lengths on the same data: check this chain alone
            self._run_draws = self._run_draws[-1:]
        pooled = torch.stack(self._run_draws)  # (chains, draws, d)
        count = len(self._run_draws)
        what = f"NFMALA's chain{'s' if count > 1 else ''} ({count} in this process so far)"
        samples = self.layout.unpack(pooled)
        warn_about_draws(samples, stacklevel=5, what=what)

    # ----------------------------------------------------------------------------------------
    # internals

    def _reset(self) -> None:
        """Forgets all per-chain state (but not what the user gave)."""
        self._driver: Driver | None = None
        self._params: dict[str, Tensor] | None = None
        self._warmup_steps = 0
        self._chain_draws: list[Tensor] = []
        self._nothing_steps = 0
        self._nothing_draws = 0
        self._chain_modes: tuple = ()
        self._sampling_seconds = 0.0

    def _sample_stats(self) -> dict[str, list]:
        """The statistics of every draw after warmup, as plain Python lists (one chain)."""
        if self._driver is None:  # a model with no latent sites: every draw accepted, the same density
            n = self._nothing_draws
            nothing = {"accept_prob": 1.0, "step_size": float("nan"), "diverging": False}
            values = {**nothing, "lp": getattr(self, "_density_of_nothing", float("nan"))}
            return {name: [value] * n for name, value in values.items()}
        return {name: [value[0].item() for value in values] for name, values in self._driver.draws.items()}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_driver=None, _params=None)
        return state

    def _independence_schedule(self) -> int | None:
        """``independence_every`` for this run: ``"auto"`` is 1 (an independence move after every Langevin
        step) on a posterior whose map passed the flow check's reliability bar (k-hat <= 0.7), else none."""
        if self.options.independence_every != "auto":
            return self.options.independence_every
        check = self.flow_check
        several_modes = len(self._chain_modes) > 1  # the mode mixture is what lets chains jump between them
        return 1 if self.beta is None and (several_modes or (check is not None and check.reliable)) else None

    def _modes(self) -> tuple:
        """The posterior's modes that the fit found (none for a map the user gave, or one mode)."""
        fit = self.fit_result
        return fit.modes if self._fits_own_map and fit is not None and self.beta is None else ()

    def _density(self, args: tuple, kwargs: dict) -> ModelDensity:
        """The run's one density: the chain evaluates it point by point (Pyro's potential), the fit and
        the flow check in batches (one vectorized model run where the model allows it)."""
        if self.model is None:
            if self._user_initial_params is None:
                raise ValueError(
                    "potential_fn needs initial parameters: pass initial_params to NFMALA or to MCMC "
                    "(a dict of unconstrained values, one per site)"
                )
            return ModelDensity.from_potential(
                self.potential_fn, self._user_initial_params, trace_density=self.trace_density
            )
        if self._user_transforms is None:
            self._user_transforms = self.transforms is not None
        options = self._density_options()
        density = model_density(self.model, args, kwargs, transforms=self.transforms, **options)
        self.transforms = density.transforms
        return density

    def _density_options(self) -> dict:
        return {
            "max_plate_nesting": self.max_plate_nesting,
            "jit_compile": self.jit_compile,
            "jit_options": self.jit_options,
            "skip_jit_warnings": self.ignore_jit_warnings,
            "init_strategy": self.init_strategy,
            "trace_density": self.trace_density,
        }

    def _prepare_map(self, density: ModelDensity, args: tuple, kwargs: dict) -> None:
        """Fits the staged map, or checks the given flow, once per run: chains run one after another
        reuse it while the model's arguments keep their values (compared by value, not by identity)."""
        arguments = _snapshot((args, kwargs))
        if self._fitted_for is not None and _same_values(arguments, self._fitted_for):
            return
        rng_state = pyro.util.get_rng_state()  # done once per run: each chain's draws must not depend on it
        try:
            self._fit_or_check(density, args, kwargs)
        finally:
            pyro.util.set_rng_state(rng_state)
        self._fitted_for = arguments
        self._run_draws = []

    def _fit_or_check(self, density: ModelDensity, args: tuple, kwargs: dict) -> None:
        if self._fits_own_map:
            sites = self._hierarchical_sites(args, kwargs)
            self.fit_result, self._non_centring = fit_in_better_coordinates(
                self.model,
                args,
                kwargs,
                density,
                sites,
                self.parameterization,
                self.fit_options,
                self._density_options(),
                stacklevel=7,
            )
            self._non_centred_sites = sites if self._non_centring is not None else []
            self.flow = as_latent_flow(self.fit_result.flow)
            self.flow_check = self.fit_result.check
            logger.info(
                "NFMALA: fitted the %s map in %.1f s; sites sampled non-centred: %s",
                self.fit_result.stage,
                self.fit_result.seconds,
                ", ".join(self._non_centred_sites) or "none",
            )
        else:
            check_flow_dim(self.flow, self.layout)
            self.flow_check = check_flow(self.flow, lambda x: density.log_prob(x).to(self.flow.dtype))
            self.flow_check.warn("NFMALA's flow", stacklevel=6)

    def _hierarchical_sites(self, args: tuple, kwargs: dict) -> list[str]:
        """The sites that may be sampled non-centred in this run (none where the user fixed the
        coordinates: ``parameterization="centred"``, ``initial_params`` or ``transforms``)."""
        if (
            self.model is None
            or self.parameterization == "centred"
            or self._user_initial_params is not None
            or self._user_transforms
        ):
            return []
        return hierarchical_sites(self.model, args, kwargs, self.init_strategy)

    def _describe_start(self) -> str:
        shapes = {name: tuple(shape) for name, shape in self.layout.shapes.items()}
        return (
            f"NFMALA: raised at the initial parameters (unconstrained shapes {shapes}, one value per site "
            "and no chain dimension)"
        )

    def _model_point(self, state: MALAState) -> Tensor:
        """The state's point ``(1, d)`` in the model's own unconstrained coordinates."""
        return state.x if self._non_centring is None else self._non_centring.to_original(state.x[0])[None]

    def _to_params(self, x: Tensor) -> dict[str, Tensor]:
        # Detached clones: MCMC pickles them in worker queues and stores them.
        return {name: value[0].detach().clone() for name, value in self.layout.unpack(x).items()}


def _snapshot(value: object) -> object:
    """A copy of the model's arguments that later changes in place do not reach (tensors, arrays cloned)."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, (list, tuple)):
        items = [_snapshot(item) for item in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {key: _snapshot(item) for key, item in value.items()}
    return value


def _same_values(new: object, old: object) -> bool:
    """Whether two snapshots of the model's arguments hold the same values (same types, shapes, dtypes,
    devices and numbers; other objects compared with ``==``, or by identity where that fails)."""
    if isinstance(new, Tensor) or isinstance(old, Tensor):
        return (
            isinstance(new, Tensor)
            and isinstance(old, Tensor)
            and new.shape == old.shape
            and new.dtype == old.dtype
            and new.device == old.device
            and bool(torch.equal(new, old))
        )
    if isinstance(new, np.ndarray) or isinstance(old, np.ndarray):
        return isinstance(new, np.ndarray) and isinstance(old, np.ndarray) and np.array_equal(new, old)
    if isinstance(new, (list, tuple)):
        return (
            type(new) is type(old)
            and len(new) == len(old)
            and all(_same_values(a, b) for a, b in zip(new, old))
        )
    if isinstance(new, dict):
        return (
            isinstance(old, dict)
            and new.keys() == old.keys()
            and all(_same_values(new[key], old[key]) for key in new)
        )
    try:
        return bool(new == old)
    except Exception:  # noqa: BLE001 - an object whose == is not a truth value: compare identities
        return new is old
