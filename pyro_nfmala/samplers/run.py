r"""The run both front ends share: a posterior prepared once, and chains started on it.

:class:`~pyro_nfmala.NFMALA` (Pyro's kernel protocol) and :meth:`ChainSampler.from_model
<pyro_nfmala.samplers.chains.ChainSampler.from_model>` (a batch of chains) sample the same thing, a
:class:`PosteriorRun`, prepared once per argument values of the model from the user's choices
(:class:`RunSpec`):

1. **the density**: the model's posterior on its flat unconstrained parameters
   (:func:`~pyro_nfmala.model.density.model_density`: Pyro's transforms, plate nesting, init strategy,
   the traced hot path), or a ``potential_fn``'s;
2. **the coordinates and the map**: with no flow given, the staged map, fitted in the coordinates that
   suit it (:func:`~pyro_nfmala.fit.staged.fit_in_better_coordinates`: a hierarchical model is sampled
   non-centred where that brings it nearer a Gaussian, and its draws mapped back to its own sites);
   a given flow after the flow check (:func:`~pyro_nfmala.fit.check.check_flow`);
3. **the latent target**: the exact posterior pull-back through the map (T1), evaluated as Pyro's MCMC
   evaluates a potential (Pyro's validation off), or with ``beta`` the flow's tempered measure (T2);
4. **the modes** the fit found, and **the schedule of moves** that they and the flow check decide
   (``independence_every="auto"``, ``independence_tries="auto"``).

:meth:`PosteriorRun.start` then starts any number of chains on it, as one batch (a
:class:`~pyro_nfmala.engine.driver.Driver`), by one policy: at the user's initial parameters, else at
draws of the model's init strategy (uniform in :math:`(-2, 2)` of the unconstrained space by default,
one per chain, as Stan does: apart from each other and from the map, so that R-hat sees a map that
missed part of the posterior), else (the tempered target) at draws of the flow; a chain's start is
also searched for a mode the fit missed (:func:`~pyro_nfmala.fit.laplace.with_mode_from`).

Example:
    >>> def model(y):
    ...     loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    ...     with pyro.plate("data", len(y)):
    ...         pyro.sample("y", dist.Normal(loc, 1.0), obs=y)
    >>> run = PosteriorRun(NFMALA(model, fit_options={"progress": False}).spec, (torch.ones(20),))
    >>> run.fit_result.stage, run.layout
    ('laplace', ParamLayout(dim=1, {loc: ()}))
    >>> driver = run.start(8)  # eight chains, one batch
    >>> driver.state.z.shape, run.params(driver.state.x)["loc"].shape
    (torch.Size([8, 1]), torch.Size([8]))
"""

from __future__ import annotations

__all__ = ["MODE_SEARCH_CHAINS", "PosteriorRun", "RunSpec"]

import logging
import math
import time
import warnings

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pyro
import torch

from torch import Tensor

from ..distributed import ChainParallel, Collective, ShardedData
from ..distributed.collectives import ONE_PROCESS
from ..engine.driver import Driver
from ..engine.independence import tries_for_density
from ..engine.options import SamplerOptions
from ..engine.targets import LatentTarget, PosteriorPullback, TemperedFlow, check_beta
from ..fit.check import FlowCheck, check_flow
from ..fit.laplace import with_mode_from
from ..fit.staged import FIT_SECONDS, PARAMETERIZATIONS, fit_in_better_coordinates
from ..fit.train import FitResult, deadline_after
from ..flows.latent import LatentFlow, as_latent_flow
from ..model.centring import NonCentring, hierarchical_sites
from ..model.density import ModelDensity, ParamLayout, check_flow_dim, model_density

logger = logging.getLogger(__name__)

#: The chains of a run whose starts are searched for a mode the fit missed (an L-BFGS ascent each).
MODE_SEARCH_CHAINS = 8
#: A run with fewer chains searches draws of the init strategy too, until this many starts were searched
#: (a run of one chain, MCMC's default, sees the modes that eight would) ...
MODE_SEARCH_STARTS = 8
#: ... for at most this fraction of the fit's time (and at least ``MODE_SEARCH_MIN_SECONDS``).
MODE_SEARCH_TIME_FRACTION = 0.1
MODE_SEARCH_MIN_SECONDS = 1.0
#: The share of the setup's time budget that the stages of the fit may take.
FIT_SHARE = 0.95
#: The draws of the map that :meth:`PosteriorRun.likely_causes` holds against the chains'.
MAP_DRAWS_COMPARED = 1000


@dataclass(frozen=True)
class RunSpec:
    """What the user chose for a run, checked: the arguments of :class:`~pyro_nfmala.NFMALA` (documented
    there), which builds it; :meth:`ChainSampler.from_model
    <pyro_nfmala.samplers.chains.ChainSampler.from_model>`
    takes the same."""

    model: Callable | None
    potential_fn: Callable | None
    flow: LatentFlow | None
    fit_options: dict
    parameterization: str
    beta: float | None
    transforms: Mapping | None
    max_plate_nesting: int | None
    jit_compile: bool
    jit_options: dict | None
    ignore_jit_warnings: bool
    init_strategy: Callable | None
    initial_params: dict[str, Tensor] | None
    trace_density: bool
    options: SamplerOptions = field(default_factory=SamplerOptions)
    distributed: ChainParallel | ShardedData | tuple | None = None

    def __post_init__(self) -> None:
        if (self.model is None) == (self.potential_fn is None):
            raise ValueError("give exactly one of model or potential_fn")
        misplaced = sorted(set(self.fit_options) & {"init_strategy", "max_plate_nesting", "transforms"})
        if misplaced:
            raise ValueError(
                f"fit_options {misplaced}: the fit uses the kernel's own density, so pass them to NFMALA "
                "itself (NFMALA(model, init_strategy=..., max_plate_nesting=..., transforms=...))"
            )
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"parameterization must be one of {PARAMETERIZATIONS}, got {self.parameterization!r}"
            )
        groups = self.distributed if isinstance(self.distributed, (tuple, list)) else (self.distributed,)
        groups = tuple(group for group in groups if group is not None)
        kinds = [type(group) for group in groups]
        if not all(kind in (ChainParallel, ShardedData) for kind in kinds) or len(set(kinds)) < len(kinds):
            raise TypeError(
                "distributed must be a pyro_nfmala.distributed.ChainParallel (chains split over processes), "
                "a ShardedData (data split over processes), or one of each (chains over one group of "
                f"processes, each chain's data over another), got {self.distributed!r}"
            )
        object.__setattr__(self, "distributed", groups[0] if len(groups) == 1 else (groups or None))
        if self.sharded is not None:
            if self.fit_options.get("max_seconds") is not None:
                raise ValueError(
                    "a ShardedData run fits its map without a time budget (a deadline would stop the ranks "
                    "at different steps, and their collectives would no longer match): drop "
                    "fit_options['max_seconds'] and bound the fit by its step counts"
                )
            object.__setattr__(self, "fit_options", {**self.fit_options, "max_seconds": None})
        if self.beta is not None:
            if self.flow is None:
                raise ValueError("beta samples the flow's own tempered measure: it needs a flow")
            object.__setattr__(self, "beta", check_beta(self.beta))

    def replace(self, **changes: Any) -> RunSpec:
        """A copy with some choices changed (checked again)."""
        return replace(self, **changes)

    @property
    def fits_own_map(self) -> bool:
        return self.flow is None

    def _group(self, kind: type) -> Collective | None:
        groups = self.distributed if isinstance(self.distributed, tuple) else (self.distributed,)
        return next((group for group in groups if isinstance(group, kind)), None)

    @property
    def sharded(self) -> ShardedData | None:
        """The data's process group where the data are sharded (else ``None``)."""
        return self._group(ShardedData)

    @property
    def chain_group(self) -> Collective:
        """The process group the chains are split over
        (:data:`~pyro_nfmala.distributed.collectives.ONE_PROCESS` where they are not)."""
        return self._group(ChainParallel) or ONE_PROCESS

    def density_options(self) -> dict:
        """The keyword arguments of :func:`~pyro_nfmala.model.density.model_density` for this run."""
        return {
            "max_plate_nesting": self.max_plate_nesting,
            "jit_compile": self.jit_compile,
            "jit_options": self.jit_options,
            "skip_jit_warnings": self.ignore_jit_warnings,
            "init_strategy": self.init_strategy,
            "trace_density": self.trace_density,
            "shards": self.sharded,
        }


class PosteriorRun:
    r"""A posterior prepared for sampling (see the module): the density, the coordinates, the map and its
    flow check, the latent target and the modes, for the model's arguments ``args`` and ``kwargs``.

    Preparing it leaves the global random state as it found it, so that the chains' draws do not depend on
    whether a run was prepared before them.

    Attributes:
        density: The model's density in its own coordinates (its layout and transforms are the output's).
        sampled: The density the chains sample: ``density``, or the non-centred model's.
        non_centring: The non-centred coordinates (:class:`~pyro_nfmala.model.centring.NonCentring`), or
            ``None`` where the chains run in the model's own.
        fit_result: The staged fit, where the run fitted its own map (else ``None``).
        flow: The map (a :class:`~pyro_nfmala.LatentFlow`; ``None`` for a model with nothing to sample).
        check: The map's flow check (``None`` on the tempered target).
        target: The latent target the chains sample.
        modes: The posterior's modes found (the map's first), those of the chains' starts included.
    """

    def __init__(self, spec: RunSpec, args: tuple = (), kwargs: Mapping | None = None) -> None:
        self.spec, self.args, self.kwargs = spec, tuple(args), dict(kwargs or {})
        self.non_centring: NonCentring | None = None
        self.fit_result: FitResult | None = None
        self.flow: LatentFlow | None = spec.flow
        self.check: FlowCheck | None = None
        self.target: LatentTarget | None = None
        self.modes: tuple = ()
        #: When the setup's time budget (``fit_options["max_seconds"]``) is spent: it bounds the fit, the
        #: flow check and the mode search from the chains' starts together (the fit's stages stop at
        #: ``FIT_SHARE`` of it, which leaves the closing work of the stage they were in its time).
        self.deadline = deadline_after(spec.fit_options.get("max_seconds", FIT_SECONDS))
        self._fit_deadline = time.perf_counter() + FIT_SHARE * (self.deadline - time.perf_counter())
        self._starts_searched = 0
        #: The model's hierarchical sites (location-scale sites whose location or scale is another site).
        self.hierarchical_sites: list[str] = []
        self._said_point_by_point = False
        rng_state = pyro.util.get_rng_state()  # once per run: each chain's draws must not depend on it
        group = spec.chain_group
        try:
            with group.together():
                self.density = self.sampled = self._density()
                if self.layout.dim == 0:  # nothing to sample
                    return
                if group.active:
                    self._prepare_map_on_rank_0(group)
                else:
                    self._prepare_map()
        finally:
            pyro.util.set_rng_state(rng_state)
        check_flow_dim(self.flow, self.layout)
        if spec.beta is not None:
            self.target = TemperedFlow(self.flow, spec.beta)
        else:  # a sharded density's all-reduce cannot be traced: its local terms are
            trace = spec.trace_density and spec.sharded is None
            self.target = PosteriorPullback(self.flow, self._log_prob, trace=trace)

    # ------------------------------------------------------------------------------------------
    # preparation

    def _density(self) -> ModelDensity:
        spec = self.spec
        if spec.model is None:
            if spec.initial_params is None:
                raise ValueError(
                    "potential_fn needs initial parameters: pass initial_params to NFMALA or to MCMC "
                    "(a dict of unconstrained values, one per site)"
                )
            return ModelDensity.from_potential(
                spec.potential_fn, spec.initial_params, spec.transforms, trace_density=spec.trace_density
            ).shard(spec.sharded)
        return model_density(
            spec.model, self.args, self.kwargs, transforms=spec.transforms, **spec.density_options()
        )

    def _prepare_map(self) -> None:
        spec = self.spec
        if spec.beta is not None:
            return
        if spec.fits_own_map:
            sites = self.hierarchical_sites = self._hierarchical_sites()
            self.fit_result, self.non_centring = fit_in_better_coordinates(
                spec.model,
                self.args,
                self.kwargs,
                self.density,
                sites,
                spec.parameterization,
                spec.fit_options,
                spec.density_options(),
                stacklevel=8,
                deadline=self._fit_deadline,
            )
            if self.non_centring is not None:
                self.sampled = self.non_centring.density
            self.flow = as_latent_flow(self.fit_result.flow)
            self.check = self.fit_result.check
            self.modes = self.fit_result.modes
            logger.info(
                "fitted the %s map in %.1f s; sites sampled non-centred: %s",
                self.fit_result.stage,
                self.fit_result.seconds,
                ", ".join(self.non_centred_sites) or "none",
            )
        else:
            check_flow_dim(self.flow, self.layout)
            self.check = check_flow(self.flow, self._log_prob, deadline=self.deadline)
            self.check.warn("NFMALA's flow", stacklevel=7)

    def _prepare_map_on_rank_0(self, group: Collective) -> None:
        """Chains split over processes: rank 0 prepares the map (:meth:`_prepare_map`), and every other rank
        takes it (the fit, the coordinates it chose, the flow check and the modes), so that every rank
        samples through the same map."""
        prepared = None
        if group.rank == 0:
            self._prepare_map()
            prepared = (
                self.fit_result,
                self.non_centred_sites,
                self.check,
                self.modes,
                self.hierarchical_sites,
            )
        prepared = group.broadcast_object(prepared)
        if group.rank == 0:
            return
        self.fit_result, sites, self.check, self.modes, self.hierarchical_sites = prepared
        spec = self.spec
        if sites:
            self.non_centring = NonCentring(
                spec.model, sites, self.args, self.kwargs, self.density, **spec.density_options()
            )
            self.sampled = self.non_centring.density
        if self.fit_result is not None:
            self.flow = as_latent_flow(self.fit_result.flow)

    def _hierarchical_sites(self) -> list[str]:
        """The sites that may be sampled non-centred (none where the user fixed the coordinates:
        ``parameterization="centred"``, ``initial_params`` or ``transforms``, or a ``potential_fn``)."""
        spec = self.spec
        if (
            spec.model is None
            or spec.parameterization == "centred"
            or spec.initial_params is not None
            or spec.transforms is not None
        ):
            return []
        return hierarchical_sites(spec.model, self.args, self.kwargs, spec.init_strategy)

    def _log_prob(self, x: Tensor) -> Tensor:
        """The sampled density at ``x``, in the map's dtype, as Pyro's MCMC evaluates a potential (no
        argument checks)."""
        with pyro.validation_enabled(False):
            return self.sampled.log_prob(x).to(self.flow.dtype)

    # ------------------------------------------------------------------------------------------
    # what a run is

    @property
    def layout(self) -> ParamLayout:
        """The layout of the model's own unconstrained sites (the output's)."""
        return self.density.layout

    @property
    def transforms(self) -> dict:
        """Pyro's transforms of the model's sites, constrained to unconstrained."""
        return self.density.transforms

    @property
    def non_centred_sites(self) -> list[str]:
        return [] if self.non_centring is None else list(self.non_centring.sites)

    @property
    def vectorized(self) -> bool:
        """Whether the chains' density takes a batch in one model run."""
        return self.spec.model is not None and self.sampled.vectorized

    def options(self) -> SamplerOptions:
        """The sampler's options with this run's schedule: ``independence_every="auto"`` is an
        independence move after every step where the map passes the flow check's reliability bar (Pareto
        k-hat <= 0.7) or the fit found several modes (the mode mixture then jumps between them), none
        otherwise and none on the tempered target; ``independence_tries="auto"`` is one try where the
        density is evaluated point by point; ``local_move="auto"`` is MALA where the map is serviceable by
        the flow check (or the preconditioner is not the identity, or there is no check: the tempered
        target), HMC where it is not."""
        options = self.spec.options
        every = options.independence_every
        if every == "auto":
            reliable = self.check is not None and self.check.reliable
            every = 1 if self.spec.beta is None and (len(self.modes) > 1 or reliable) else None
        tries = tries_for_density(options.independence_tries, self.vectorized)
        local_move = options.local_move
        if local_move == "auto":
            serviceable = self.check is None or self.check.serviceable
            local_move = "mala" if serviceable or options.preconditioner.name != "identity" else "hmc"
        return options.replace(independence_every=every, independence_tries=tries, local_move=local_move)

    # ------------------------------------------------------------------------------------------
    # chains

    def start(
        self,
        num_chains: int,
        *,
        initial_params: Mapping[str, Tensor] | None = None,
        adapting: bool = True,
        generator: torch.Generator | None = None,
        label: str = "NFMALA",
    ) -> Driver:
        """``num_chains`` chains started on this run, as one batch: a
        :class:`~pyro_nfmala.engine.driver.Driver` with their first state and step size.

        ``initial_params``: the chains' unconstrained initial parameters ``{site: (num_chains, *shape)}``,
        or one value per site for all; by default the spec's, else the start policy of the module. A
        step size given in the options is where the search for a first one starts when warmup adapts it
        (``adapting``), else the step size itself.
        """
        given = self.spec.initial_params if initial_params is None else initial_params
        if num_chains > 1 and self.spec.model is not None and not self.sampled.vectorized:
            self._say_point_by_point()
        group = self.spec.chain_group
        with group.together():
            points = self._starting_points(num_chains, given, group)
            driver = Driver(
                self.target,
                num_chains,
                self.options(),
                generator=group.generator(self.flow.device, generator),
                label=label,
                modes=self.modes,
                pool=group,
                shards=self.spec.sharded,
            )
            state = driver.start_state(points, fallback=given is None, describe=self.describe_start)
            step_size = driver.options.step_size
            if step_size is None or (adapting and driver.options.adapt_step_size):
                driver.start(state, search_from=step_size or 1.0)
            else:
                driver.start(state, step_size=step_size)
        return driver

    def _starting_points(self, num_chains: int, given, group: Collective) -> Tensor | None:
        """The chains' starting points (:meth:`_points`), searched for modes the fit missed; with chains
        split over processes (``num_chains`` of them on this rank), drawn and searched on rank 0 for every
        rank's chains, as one process would, and split."""
        if not group.active:
            points = self._points(num_chains, given)
            self._search_modes_from(points)
            return points
        counts = group.gather_rows(torch.tensor([num_chains])).tolist()
        first = sum(counts[: group.rank])
        shared = None
        if group.rank == 0:
            points = self._points(sum(counts), given)
            self._search_modes_from(points)
            shared = (points, self.modes)
        points, self.modes = group.broadcast_object(shared)
        if self.fit_result is not None:
            self.fit_result = self.fit_result._replace(modes=self.modes)
        return None if points is None else points[first : first + num_chains]

    def _say_point_by_point(self) -> None:
        if self._said_point_by_point:
            return
        self._said_point_by_point = True
        reasons = "; ".join(self.sampled.unbatched_reasons)
        warnings.warn(
            f"the model does not run for a batch of parameters at once ({reasons}), so the chains are "
            "evaluated point by point, one model run each. The usual causes: Python branching on a "
            "parameter's value (if sigma > 1, float(x), .item()), random numbers drawn in the model, "
            "in-place writes into a tensor that holds a parameter. Write the model with torch operations "
            "on whole tensors (torch.where for branches) for one batched run per move",
            UserWarning,
            stacklevel=4,
        )

    def _points(self, num_chains: int, given: Mapping[str, Tensor] | None) -> Tensor | None:
        """The chains' starting points ``(num_chains, d)`` in the sampled coordinates, ``None`` for draws
        of the flow (the tempered target)."""
        if given is not None:
            if self.non_centring is not None:
                raise ValueError(
                    "this run samples the model non-centred and cannot start from parameters in the model's "
                    "own coordinates: pass parameterization='centred'"
                )
            return self._pack(given, num_chains)
        if self.spec.beta is not None:
            return None
        return self.sampled.initial_points(num_chains)

    def _pack(self, params: Mapping[str, Tensor], num_chains: int) -> Tensor:
        """``params``, one value per site or one per chain, as points ``(num_chains, d)``."""
        params = {name: torch.as_tensor(value) for name, value in params.items()}
        shapes = self.layout.shapes
        per_chain = all(
            name in shapes and value.dim() == len(shapes[name]) + 1 and len(value) == num_chains
            for name, value in params.items()
        ) and bool(params)
        if per_chain:
            for i in range(num_chains):
                self.layout.check_point({name: value[i] for name, value in params.items()})
        else:
            self.layout.check_point(params)
        packed = self.layout.pack(params).detach()
        return packed if per_chain else packed.expand(num_chains, self.layout.dim)

    def _search_modes_from(self, points: Tensor | None) -> None:
        """Adds the modes that ascents from the first chains' starts reach, where a barrier separates them
        from the modes found (the fit's search may have missed one); a run of fewer chains than
        ``MODE_SEARCH_STARTS`` searches from draws of the init strategy too, for at most
        ``MODE_SEARCH_TIME_FRACTION`` of the fit's time. Within the setup's time budget."""
        if points is None or not self.modes:
            return
        found = len(self.modes)
        for point in points[:MODE_SEARCH_CHAINS]:
            self.modes = with_mode_from(self.sampled.log_prob, self.modes, point, deadline=self.deadline)
        self._starts_searched += len(points[:MODE_SEARCH_CHAINS])
        missing = MODE_SEARCH_STARTS - self._starts_searched
        if missing > 0 and self.sampled.initializer is not None:
            fit_seconds = self.fit_result.seconds if self.fit_result is not None else math.nan
            budget = MODE_SEARCH_TIME_FRACTION * fit_seconds if math.isfinite(fit_seconds) else 0.0
            deadline = min(self.deadline, time.perf_counter() + max(MODE_SEARCH_MIN_SECONDS, budget))
            if self.spec.sharded is not None:  # every rank must search the same starts: no clock
                deadline = self.deadline
            self._starts_searched = MODE_SEARCH_STARTS
            for point in self.sampled.initial_points(missing):
                self.modes = with_mode_from(self.sampled.log_prob, self.modes, point, deadline=deadline)
        if len(self.modes) > found and self.fit_result is not None:
            self.fit_result = self.fit_result._replace(modes=self.modes)

    def likely_causes(self, points: Tensor, failing: list[str]) -> str:
        """What most likely kept the chains at ``points`` ``(chains, draws, d)`` (in the sampled
        coordinates) from converging on the sites ``failing``, and what to do; empty where nothing in
        the run points to a cause. The causes looked for: a hierarchical site sampled centred (a funnel
        where the data say little of it), and a map that fails the flow check, with the sites where its
        draws and the chains' differ most (in means and log sds, in the chains' sds, unconstrained)."""
        causes = []
        centred = [site for site in self._scale_relations() if site not in self.non_centred_sites]
        if centred:
            kind = "is a location-scale site" if len(centred) == 1 else "are location-scale sites"
            causes.append(
                f"{_quoted(centred)} {kind} whose location or scale is another site, sampled centred (a "
                "funnel where the data say little of it): try parameterization='non-centred'"
            )
        if self.check is not None and not self.check.serviceable and self.flow is not None:
            missed = self._sites_the_map_misses(points)
            causes.append(
                f"the map fails the flow check (Pareto k-hat {self.check.khat:.2f}: above 0.7 its "
                f"importance weights, and the chains' mixing, are unreliable) and misses the chains' draws "
                f"most on {_quoted(missed)}: give the fit more time (fit_options={{'max_seconds': ...}}) "
                "and the chains more warmup"
            )
        if not causes:
            return ""
        return "Most likely cause: " + "; and ".join(causes) + "."

    def _scale_relations(self) -> list[str]:
        """The model's hierarchical sites, those the run did not look for (coordinates the user fixed)
        included."""
        if self.hierarchical_sites or self.spec.model is None or self.spec.transforms is not None:
            return self.hierarchical_sites
        try:
            return hierarchical_sites(self.spec.model, self.args, self.kwargs, self.spec.init_strategy)
        except Exception:  # noqa: BLE001 - advice only: a model that cannot be traced so gets none
            return []

    def _sites_the_map_misses(self, points: Tensor, count: int = 3) -> list[str]:
        """The ``count`` sites where ``MAP_DRAWS_COMPARED`` draws of the map and the chains' ``points``
        differ most: the largest ``|mean difference| / sd + |log sd ratio|`` over a site's elements."""
        points = points.reshape(-1, points.shape[-1])
        generator = torch.Generator(device=self.flow.device).manual_seed(0)
        with torch.no_grad():
            drawn, _ = self.flow.to_data(self.flow.sample_base((MAP_DRAWS_COMPARED,), generator=generator))
            chains = self.layout.unpack(self.model_points(points.to(drawn)))
            mapped = self.layout.unpack(self.model_points(drawn))
        distance = {}
        for site, ours in chains.items():
            ours, theirs = ours.reshape(len(points), -1), mapped[site].reshape(len(drawn), -1)
            sd, map_sd = ours.std(0).clamp_min(1e-12), theirs.std(0).clamp_min(1e-12)
            gap = (ours.mean(0) - theirs.mean(0)).abs() / sd + (map_sd / sd).log().abs()
            distance[site] = float(gap.nan_to_num(math.inf).max())
        return sorted(distance, key=lambda site: -distance[site])[:count]

    def describe_start(self) -> str:
        """What an error raised at a chain's initial parameters is told about them."""
        shapes = {name: tuple(shape) for name, shape in self.layout.shapes.items()}
        return (
            f"NFMALA: raised at the initial parameters (unconstrained shapes {shapes}, one value per site "
            "and no chain dimension)"
        )

    # ------------------------------------------------------------------------------------------
    # from the chains' points to the model's

    def model_points(self, x: Tensor) -> Tensor:
        """The chains' points ``(..., d)`` in the model's own unconstrained coordinates."""
        return x if self.non_centring is None else self.non_centring.to_original(x)

    def params(self, x: Tensor) -> dict[str, Tensor]:
        """The model's unconstrained parameters ``{site: (..., *shape)}`` at the chains' points ``x``
        ``(..., d)``, detached copies (Pyro's MCMC pickles and stores them)."""
        return {
            name: value.detach().clone() for name, value in self.layout.unpack(self.model_points(x)).items()
        }


def _quoted(names: list[str]) -> str:
    return ", ".join(repr(name) for name in names)
