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
Gaussian fails the flow check), once per ``MCMC.run`` when chains run one after another (each
worker process fits its own when they run in parallel). ``kernel.fit_result`` holds it afterwards
(``.flow`` to save or reuse, ``.check``, ``.seconds``). With a given flow, the same flow check
runs at setup. Either way a Pareto k-hat above 0.7 warns, and both numbers, with the fit time,
are in ``mcmc.diagnostics()``. The step, its
adaptation, statistics and warnings are those of :class:`~pyro_nfmala.driver.Driver`, shared
with :class:`~pyro_nfmala.ChainSampler`; this module only speaks Pyro's kernel protocol.

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
import warnings

from collections.abc import Callable, Mapping

import pyro.util
import torch

from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from torch import Tensor

from .driver import (
    DEFAULT_PRECONDITIONER,
    SAMPLE_STATS,
    Driver,
    check_mass_matrix,
    check_step_size,
    check_target_accept_prob,
)
from .fit import NUM_STARTS, FitResult, fit_flow_to_model, fit_staged_map
from .flow import as_latent_flow
from .flowcheck import FlowCheck, check_flow
from .independence import check_independence
from .mala import MALAState, finite_chains
from .model import ModelDensity, ParamLayout, check_flow_dim, model_density
from .precond import Preconditioner, get_preconditioner
from .target import LatentTarget, PosteriorPullback, TemperedFlow, check_beta

logger = logging.getLogger(__name__)

#: Draws of the flow tried for a finite starting point before giving up.
START_TRIES = 100
#: A chain starts at its init-strategy point if that lies within this many of the map's sds ...
MAX_LATENT_START = 10.0
#: ... else at an overdispersed draw of the map, z0 ~ N(0, INITIAL_SPREAD^2 I).
INITIAL_SPREAD = 2.0


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
        fit_options: Keyword arguments for :func:`~pyro_nfmala.fit_flow_to_model` when the
            kernel fits its own map (e.g. ``{"progress": False}``).
        step_size: MALA step :math:`\epsilon > 0`; if ``None``, found by doubling/halving
            from 1 at setup (from ``step_size`` when it is given and warmup adapts it).
            After a run, ``kernel.step_size`` is the adapted value.
        adapt_step_size: Adapt :math:`\epsilon` by dual averaging during warmup, then fix it.
        target_accept_prob: Acceptance probability that adaptation aims at (0.574 is optimal
            for MALA).
        preconditioner: ``"identity"`` (plain MALA on the latent target, the cheapest, right
            when the flow is fitted to the posterior so that :math:`\pi \approx N(0, I)`) or
            ``"jacobian"`` (:math:`A = J_f^T J_f`, a Langevin step in data space pulled back;
            small latent steps where the flow stretches). The jacobian step undoes the flow's
            whitening: on a posterior whose data space is badly scaled (a funnel) it mixes as
            poorly as MALA in data space. Use it for the tempered target (``beta``); keep
            ``"identity"`` for posteriors. ``"data_space"``: the same data-space Langevin step
            without the linearization, mapped back exactly through :math:`f^{-1}`
            (:class:`~pyro_nfmala.precond.DataSpacePreconditioner`): larger steps where the flow
            bends, for two more passes of :math:`f^{-1}`.
        mass_matrix: A constant mass matrix adapted in warmup on Stan's windows: ``"diagonal"``,
            ``"dense"`` or ``None``; ``"auto"`` (default): diagonal. It lives in latent space with
            the identity preconditioner, in data space with ``"jacobian"`` and ``"data_space"``.
        independence_every: ``k``: every ``k``-th MALA step is followed by a latent independence
            move :math:`z' \sim \mathcal{N}(0, s^2 I)` accepted by the exact Metropolis-Hastings
            ratio (:mod:`pyro_nfmala.independence`): where the map is close to the posterior, a
            nearly independent draw, across the modes it covers, for one more evaluation of the
            model. ``None``: MALA steps only. ``"auto"`` (default): after every step on a
            posterior whose map passes the flow check's reliability bar (Pareto k-hat <= 0.7),
            none otherwise (and none on the tempered target). Its acceptance rate is in the
            diagnostics and in ``sample_stats.global_accept_prob``.
        independence_scale: :math:`s > 0` (1: the map's base law; wider is safer for a map that
            is too narrow).
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
        step_size: float | None = None,
        adapt_step_size: bool = True,
        target_accept_prob: float = 0.574,
        preconditioner: str | Preconditioner = DEFAULT_PRECONDITIONER,
        mass_matrix: str | None = "auto",
        independence_every: int | str | None = "auto",
        independence_scale: float = 1.0,
        beta: float | None = None,
        transforms: Mapping | None = None,
        max_plate_nesting: int | None = None,
        jit_compile: bool = False,
        jit_options: dict | None = None,
        ignore_jit_warnings: bool = False,
        init_strategy: Callable | None = None,
        initial_params: Mapping[str, Tensor] | None = None,
    ) -> None:
        if (model is None) == (potential_fn is None):
            raise ValueError("give exactly one of model or potential_fn")
        self.model = model
        self.potential_fn = potential_fn
        self.flow = None if flow is None else as_latent_flow(flow)
        self._fits_own_map = flow is None
        self.fit_options = dict(fit_options or {})
        self.fit_result: FitResult | None = None
        self._fitted_for: tuple | None = None
        self.flow_check: FlowCheck | None = None
        if flow is None and beta is not None:
            raise ValueError("beta samples the flow's own tempered measure: it needs a flow")
        self.preconditioner = get_preconditioner(preconditioner)
        self.mass_matrix = check_mass_matrix(mass_matrix, self.preconditioner)
        self.independence_every, self.independence_scale = check_independence(
            independence_every, independence_scale, allow_auto=True
        )
        self._user_step_size = check_step_size(step_size)
        self.adapt_step_size = bool(adapt_step_size)
        self.target_accept_prob = check_target_accept_prob(target_accept_prob)
        self.beta = None if beta is None else check_beta(beta)
        self.transforms = transforms
        self.max_plate_nesting = max_plate_nesting
        self.jit_compile = jit_compile
        self.jit_options = jit_options
        self.ignore_jit_warnings = ignore_jit_warnings
        self.init_strategy = init_strategy
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
        return self._step_size if self._step_size is not None else self._user_step_size

    def setup(self, warmup_steps: int, *args, **kwargs) -> None:
        self._reset()
        self._warmup_steps = int(warmup_steps)
        density = self._density(args, kwargs)
        self.layout = density.layout
        if self.layout.dim == 0:  # nothing to sample
            self._density_of_nothing = float(density.log_prob(torch.zeros(0)))
            self._params = {}
            return
        if self.beta is None:
            self._prepare_map(density, args, kwargs)
        check_flow_dim(self.flow, self.layout)
        if self.beta is not None:
            target: LatentTarget = TemperedFlow(self.flow, self.beta)
        else:
            dtype = self.flow.dtype
            target = PosteriorPullback(self.flow, lambda x: density.log_prob(x).to(dtype))
        self._driver = Driver(
            target,
            1,
            preconditioner=self.preconditioner,
            mass_matrix=self.mass_matrix,
            independence_every=self._independence_schedule(),
            independence_scale=self.independence_scale,
            target_accept_prob=self.target_accept_prob,
            label="NFMALA",
        )
        # A posterior's chains start where Pyro's init strategy puts them (by default uniform in
        # (-2, 2) of the unconstrained space, one draw per chain, as Stan does): apart from each other
        # and independent of the map, so that R-hat can see a map that missed part of the posterior.
        init_x = (
            density.layout.pack(density.initial_params)
            if self.model is not None and self.beta is None
            else None
        )
        if self._user_initial_params is not None:
            self.layout.check_point(self._user_initial_params)
            init_x = self.layout.pack(self._user_initial_params)
        state = self._initial_state(init_x, fallback=self._user_initial_params is None)
        search = self._user_step_size is None or (self.adapt_step_size and self._warmup_steps > 0)
        if search:
            self._driver.start(state, search_from=self._user_step_size or 1.0)
        else:
            self._driver.start(state, step_size=self._user_step_size)
        self._driver.begin_warmup(self._warmup_steps, adapt_step_size=self.adapt_step_size)
        self._step_size = float(self._driver.step_size[0])
        self._params = self._to_params(state)
        logger.debug("setup: d=%d, initial step size %.3g", self.layout.dim, self._step_size)

    def sample(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self._driver is None:  # a model with no latent sites
            nothing = {"accept_prob": 1.0, "step_size": float("nan"), "diverging": False}
            self._record({**nothing, "lp": self._density_of_nothing}, warmup=self._steps < self._warmup_steps)
            return {}
        if params is not self._params:  # the caller changed the state: start again from params
            self._driver.state = self._initial_state(self.layout.pack(params))
        warmup = self._driver.warming_up
        info = self._driver.step()
        stats = self._driver.stats(info)
        self._step_size = float(self._driver.step_size[0])
        self._record({name: value[0].item() for name, value in stats.items()}, warmup=warmup)
        self._params = self._to_params(self._driver.state)
        return self._params

    def logging(self) -> dict[str, str]:
        shown = {
            "step size": f"{self.step_size or float('nan'):.2e}",
            "acc. prob": f"{self._accept_sum / max(self._steps, 1):.3f}",
        }
        if self._driver is not None and self._driver.independence_every is not None:
            shown["global acc."] = f"{self._driver.global_acceptance_rate:.3f}"
        return shown

    def diagnostics(self) -> dict:
        draws = len(self._stats["accept_prob"])
        counts = self._driver.counts if self._driver is not None else {}
        if self._driver is not None:
            self._driver.warn_divergences(stacklevel=3)
        check = self.flow_check
        return {
            "divergences": list(self._divergences),
            "acceptance rate": sum(self._stats["accept_prob"]) / draws if draws else float("nan"),
            "flow check": {}
            if check is None
            else {"khat": check.khat, "ess": check.ess, "draws": check.num_samples},
            "fit seconds": self.fit_result.seconds if self.fit_result is not None else 0.0,
            "warmup divergences": counts.get("warmup_divergent", 0),
            "numerical errors": counts.get("errors", 0),
            "global non-finite": counts.get("global_nonfinite", 0),
            "global acceptance rate": self._driver.global_acceptance_rate
            if self._driver is not None
            else float("nan"),
            "step size": self.step_size,
            "sample_stats": {name: list(values) for name, values in self._stats.items()},
        }

    def cleanup(self) -> None:
        self._reset()

    # ----------------------------------------------------------------------------------------
    # internals

    def _reset(self) -> None:
        """Forgets all per-chain state (but not what the user gave)."""
        self._driver: Driver | None = None
        self._params: dict[str, Tensor] | None = None
        self._warmup_steps = 0
        self._steps = 0
        self._accept_sum = 0.0
        self._divergences: list[int] = []
        self._stats: dict[str, list] = {name: [] for name in SAMPLE_STATS}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_driver=None, _params=None)
        return state

    def _independence_schedule(self) -> int | None:
        """``independence_every`` for this run: ``"auto"`` is 1 (a global move after every MALA step) on a
        posterior whose map passed the flow check's reliability bar (k-hat <= 0.7), else none."""
        if self.independence_every != "auto":
            return self.independence_every
        check = self.flow_check
        return 1 if self.beta is None and check is not None and check.reliable else None

    def _density(self, args: tuple, kwargs: dict) -> ModelDensity:
        if self.model is None:
            if self._user_initial_params is None:
                raise ValueError(
                    "potential_fn needs initial parameters: pass initial_params to NFMALA or to MCMC "
                    "(a dict of unconstrained values, one per site)"
                )
            return ModelDensity.from_potential(self.potential_fn, self._user_initial_params)
        density = model_density(
            self.model,
            args,
            kwargs,
            vectorize=False,
            transforms=self.transforms,
            max_plate_nesting=self.max_plate_nesting,
            jit_compile=self.jit_compile,
            jit_options=self.jit_options,
            skip_jit_warnings=self.ignore_jit_warnings,
            init_strategy=self.init_strategy,
        )
        self.transforms = density.transforms
        return density

    def _prepare_map(self, density: ModelDensity, args: tuple, kwargs: dict) -> None:
        """Fits the staged map (once for these arguments), or checks the given flow (once)."""
        key = (tuple(map(id, args)), tuple((name, id(value)) for name, value in sorted(kwargs.items())))
        if key == self._fitted_for:
            return
        rng_state = pyro.util.get_rng_state()  # done once per run: each chain's draws must not depend on it
        try:
            self._fit_or_check(density, args, kwargs)
        finally:
            pyro.util.set_rng_state(rng_state)
        self._fitted_for = key

    def _fit_or_check(self, density: ModelDensity, args: tuple, kwargs: dict) -> None:
        if self._fits_own_map:
            self.fit_result = self._fit(density, args, kwargs)
            self.flow = as_latent_flow(self.fit_result.flow)
            self.flow_check = self.fit_result.check
            logger.info("NFMALA: fitted the %s map in %.1f s", self.fit_result.stage, self.fit_result.seconds)
        else:
            check_flow_dim(self.flow, self.layout)
            log_prob = self._check_density(density, args, kwargs).log_prob
            self.flow_check = check_flow(self.flow, lambda x: log_prob(x).to(self.flow.dtype))
            self.flow_check.warn("NFMALA's flow", stacklevel=6)

    def _fit(self, density: ModelDensity, args: tuple, kwargs: dict) -> FitResult:
        options = dict(self.fit_options)
        if self.model is not None:
            options.setdefault("init_strategy", self.init_strategy)
            options.setdefault("max_plate_nesting", self.max_plate_nesting)
            return fit_flow_to_model(self.model, *args, model_kwargs=kwargs, **options)
        x0 = density.layout.pack(density.initial_params).detach()
        starts = torch.cat([x0[None], 4 * torch.rand(NUM_STARTS - 1, len(x0), dtype=x0.dtype) - 2])
        return fit_staged_map(density.log_prob, starts, **options)

    def _check_density(self, density: ModelDensity, args: tuple, kwargs: dict) -> ModelDensity:
        """A vectorized version of ``density`` for the flow check's thousand draws, where the model allows."""
        if self.model is None:
            return density
        return model_density(
            self.model,
            args,
            kwargs,
            transforms=self.transforms,
            max_plate_nesting=self.max_plate_nesting,
            init_strategy=self.init_strategy,
        )

    def _initial_state(self, init_x: Tensor | None, *, fallback: bool = False) -> MALAState:
        """The state at ``f^{-1}(init_x)``, or at a draw of the flow when ``init_x`` is ``None`` (or, with
        ``fallback``, when the map cannot reach ``init_x``)."""
        driver, flow = self._driver, self.flow
        if init_x is not None and fallback:
            x = init_x.detach().to(dtype=flow.dtype, device=flow.device).reshape(1, flow.dim)
            with torch.no_grad():
                z = flow.to_latent(x)
            reachable = bool(torch.isfinite(z).all())
            if reachable and float(z.abs().max()) <= MAX_LATENT_START:
                state = driver.initial_state(z)
                if bool(finite_chains(state).all()):
                    return state
            if not reachable:
                warnings.warn(
                    "NFMALA: the map cannot reach this chain's starting point (its inverse is not finite "
                    "there): the map may miss that part of the posterior. Starting at a draw of the map "
                    "instead; check R-hat across chains.",
                    RuntimeWarning,
                    stacklevel=4,
                )
            # a start far out in the map's tails (a narrow posterior): an overdispersed draw of the map
            for _ in range(START_TRIES):
                state = driver.initial_state(INITIAL_SPREAD * flow.sample_base().unsqueeze(0))
                if bool(finite_chains(state).all()):
                    return state
            init_x = None
        if init_x is not None:
            x = init_x.detach().to(dtype=flow.dtype, device=flow.device).reshape(1, flow.dim)
            try:
                state = driver.initial_state(flow.to_latent(x).detach())
            except Exception as error:
                if hasattr(error, "add_note"):
                    shapes = {name: tuple(shape) for name, shape in self.layout.shapes.items()}
                    error.add_note(
                        f"NFMALA: raised at the initial parameters (unconstrained shapes {shapes}, one value "
                        "per site and no chain dimension)"
                    )
                raise
            if not bool(finite_chains(state).all()):
                raise ValueError(
                    "the initial parameters give a non-finite log density or gradient "
                    f"(log density {float(state.log_density[0]):.4g}): start elsewhere"
                )
            return state
        for _ in range(START_TRIES):
            state = driver.initial_state(flow.sample_base().unsqueeze(0))
            if bool(finite_chains(state).all()):
                return state
        raise ValueError(
            f"{START_TRIES} draws of the flow all gave a non-finite log density or gradient: the flow does "
            "not cover the posterior's support; pass initial_params or an init_strategy"
        )

    def _record(self, values: Mapping[str, float | bool], *, warmup: bool) -> None:
        """Counts one step; after warmup, keeps its statistics (``accept_prob``, ``step_size``,
        ``diverging``, ``lp``, and ``global_accept_prob`` with independence moves)."""
        self._steps += 1
        self._accept_sum += values["accept_prob"]
        if warmup:
            return
        if values["diverging"]:
            self._divergences.append(len(self._stats["lp"]))
        for name, value in values.items():
            self._stats.setdefault(name, []).append(value)

    def _to_params(self, state: MALAState) -> dict[str, Tensor]:
        # Detached clones: MCMC pickles them in worker queues and stores them.
        return {name: value[0].detach().clone() for name, value in self.layout.unpack(state.x).items()}
