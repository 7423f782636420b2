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
chains at setup (:func:`~pyro_nfmala.fit.chains.adapt_flow_with_chains`: 32 chains, one vectorized run
of the model per move), refitted to their draws and gradients, and then frozen; the chains then run
their own warmup (step size, mass matrix) on the frozen map and sample with one fixed, exact kernel.

**Chains.** Under Pyro's own :class:`~pyro.infer.MCMC`, each chain is one kernel run: one after
another in this process (the run, its density and map, prepared once and shared by all), or one per
worker process (each prepares its own). :class:`pyro_nfmala.MCMC`, Pyro's ``MCMC`` with one more way
to run chains, runs all of them as one batch instead (one vectorized model run per move), with the
same outputs.

**Hierarchical models** are sampled non-centred where that brings the posterior nearer a Gaussian
(``parameterization``, :mod:`pyro_nfmala.model.centring`); the draws come back as the model's own sites.

With a given flow, the same flow check runs at setup. Either way a Pareto k-hat above 0.7 warns,
and both numbers, with the fit time, are in ``mcmc.diagnostics()``. At the end of each chain, a
split R-hat above 1.01 or a bulk ESS below 100 over the chains drawn so far in the process warns.
What a run is, and how its chains start, is :class:`~pyro_nfmala.samplers.run.PosteriorRun`, shared with
:class:`~pyro_nfmala.ChainSampler`; the chains' bookkeeping for Pyro is
:class:`~pyro_nfmala.samplers.pyro_chains.RunChains`; this module only speaks Pyro's kernel protocol.

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

from collections.abc import Callable, Mapping

import numpy as np
import torch

from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

from ..distributed import ChainParallel, ShardedData
from ..engine.options import DEFAULT_PRECONDITIONER, SamplerOptions
from ..engine.step import Move
from ..fit.check import FlowCheck
from ..fit.train import FitResult
from ..flows.latent import LatentFlow, as_latent_flow
from ..model.density import ModelDensity, check_flow_dim
from .pyro_chains import RunChains
from .run import PosteriorRun, RunSpec


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
        flow: A trained flow on :math:`\mathbb{R}^d`, :math:`d` the total unconstrained dimension: an
            unconditional zuko flow, a Pyro autoguide with ``get_transform`` (the map
            ``NeuTraReparam(guide)`` uses), or any flow :func:`~pyro_nfmala.as_latent_flow` reads (a
            transform or callable read with its base there). The kernel samples with a frozen deep copy of it
            (``eval()``, no parameter gradients): the user's flow is never changed. ``None``
            (the default): fit the staged map at setup (see the module); costs one mode search
            and, for a non-Gaussian posterior, a flow fit (seconds to a minute or two on a CPU).
        fit_options: Keyword arguments of :func:`~pyro_nfmala.fit.staged.fit_staged_map` when the kernel
            fits its own map (e.g. ``{"progress": False}``, ``{"max_seconds": 600}``); the fit uses
            the kernel's own density (its ``transforms``, ``init_strategy`` and
            ``max_plate_nesting``).
        parameterization: Where the kernel fits its own map of a model with hierarchical sites
            (a location-scale site whose parameters depend on other latent sites,
            :mod:`pyro_nfmala.model.centring`): ``"auto"`` (default) samples the model non-centred when
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
            batch shape (:mod:`pyro_nfmala.engine.traced`; default): the same arithmetic, checked against the
            model at the point traced, 2-6x faster on small models; a model whose Python branches on
            its parameters' values stays eager. ``False`` runs the model eagerly at every step.
        distributed: ``None`` (one process), or a run over the processes of a ``torch.distributed`` group
            (:mod:`pyro_nfmala.distributed`): :class:`~pyro_nfmala.distributed.parallel.ChainParallel`
            splits :class:`pyro_nfmala.MCMC`'s chains over them, warmup pooled, every rank holding every
            chain's draws at the end; :class:`~pyro_nfmala.distributed.sharded.ShardedData` sums the
            likelihood of data split over them (each rank runs the model on its own shard), every rank
            running the same chains; a tuple of one of each, on two process groups, does both (chain
            groups x data shards).

    The sampler's options, ``local_move``, ``step_size``, ``adapt_step_size``, ``target_accept_prob``,
    ``adapt``, ``preconditioner``, ``mass_matrix``, ``independence_every``, ``independence_scale``,
    ``independence_tries``, ``refine_every`` and ``refine_options``, are passed to
    :class:`~pyro_nfmala.engine.options.SamplerOptions` (documented there; ``independence_tries="auto"`` is
    one try for a ``potential_fn`` or a model that does not vectorize, whose tries would each cost a run).
    Here ``independence_every="auto"`` (the default) puts an independence move after every step on a posterior
    whose map passes the flow check's reliability bar (Pareto k-hat <= 0.7), none otherwise (and none on the
    tempered target); its acceptance rate is in the diagnostics and in
    ``sample_stats.independence_accept_prob``. A ``step_size`` given is where the search starts when warmup
    adapts it; after a run, ``kernel.step_size`` is the adapted value.

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
        local_move: str = "auto",
        step_size: float | None = None,
        adapt_step_size: bool = True,
        target_accept_prob: float | None = None,
        adapt: str = "shared",
        preconditioner: str | Move = DEFAULT_PRECONDITIONER,
        mass_matrix: str | None = "auto",
        independence_every: int | str | None = "auto",
        independence_scale: float = 1.0,
        independence_tries: int | str = "auto",
        refine_every: int | None = None,
        refine_options: dict | None = None,
        beta: float | None = None,
        transforms: Mapping | None = None,
        max_plate_nesting: int | None = None,
        jit_compile: bool = False,
        jit_options: dict | None = None,
        ignore_jit_warnings: bool = False,
        init_strategy: Callable | None = None,
        initial_params: Mapping[str, Tensor] | None = None,
        trace_density: bool = True,
        distributed: ChainParallel | ShardedData | None = None,
    ) -> None:
        self.spec = RunSpec(
            model=model,
            potential_fn=potential_fn,
            flow=None if flow is None else as_latent_flow(flow),
            fit_options=dict(fit_options or {}),
            parameterization=parameterization,
            beta=beta,
            transforms=transforms,
            max_plate_nesting=max_plate_nesting,
            jit_compile=jit_compile,
            jit_options=jit_options,
            ignore_jit_warnings=ignore_jit_warnings,
            init_strategy=init_strategy,
            initial_params=None if initial_params is None else dict(initial_params),
            trace_density=bool(trace_density),
            options=SamplerOptions.from_arguments(locals()),
            distributed=distributed,
        )
        if potential_fn is not None and initial_params is not None and flow is not None:
            check_flow_dim(self.spec.flow, ModelDensity.from_potential(potential_fn, initial_params).layout)
        # what Pyro's MCMC reads of a kernel
        self.model, self.potential_fn, self.transforms = model, potential_fn, transforms
        self._run: PosteriorRun | None = None
        self._run_arguments: tuple | None = None  # the arguments the run was prepared for, copied
        self._earlier: list[Tensor] = []  # draws of the run's chains that ended in this process
        self._step_size: float | None = None  # the last chain's adapted step size; kept after cleanup
        self._chain_initial_params: dict | None = None  # what MCMC gave this chain
        self._reset()

    # ----------------------------------------------------------------------------------------
    # what users read

    @property
    def options(self) -> SamplerOptions:
        return self.spec.options

    @property
    def step_size(self) -> float | None:
        """The step size of the running chains, else the last chains' adapted one, else the one given."""
        if self._chains is not None:
            return self._chains.step_size
        return self._step_size if self._step_size is not None else self.options.step_size

    @property
    def fit_result(self) -> FitResult | None:
        """The staged fit of the last run, where the kernel fitted its own map (``.flow`` to save or
        reuse, ``.check``, ``.seconds``, ``.budget_spent``)."""
        return None if self._run is None else self._run.fit_result

    @property
    def flow(self) -> LatentFlow | None:
        """The map the chains sample through (the one given, or the last run's fitted map)."""
        return self.spec.flow if self._run is None else self._run.flow

    @property
    def non_centred_sites(self) -> list[str]:
        """The sites the last run sampled non-centred (mapped back to the model's own in every draw)."""
        return [] if self._run is None else self._run.non_centred_sites

    @property
    def flow_check(self) -> FlowCheck | None:
        """The flow check of the last run's map."""
        return None if self._run is None else self._run.check

    def prepare(self, *args, **kwargs) -> PosteriorRun:
        """The run for the model's arguments (:class:`~pyro_nfmala.samplers.run.PosteriorRun`: density,
        coordinates, map and its check, target, modes), prepared once and kept while the arguments hold
        the same values (compared by value: a tensor changed in place is new data)."""
        given = self._chain_initial_params is not None and self.spec.initial_params is None
        arguments = (given, _copy(args), _copy(kwargs))
        if self._run is None or not _same_values(arguments, self._run_arguments):
            spec = self.spec.replace(initial_params=self._chain_initial_params) if given else self.spec
            self._run = PosteriorRun(spec, args, kwargs)
            self._run_arguments = arguments
            self._earlier = []
        if self.model is not None:
            self.transforms = self._run.transforms
        return self._run

    # ----------------------------------------------------------------------------------------
    # Pyro's MCMCKernel interface

    @property
    def initial_params(self) -> dict[str, Tensor] | None:
        if self._params is not None:
            return self._params
        return self._chain_initial_params or self.spec.initial_params

    @initial_params.setter
    def initial_params(self, params: Mapping[str, Tensor] | None) -> None:
        self._chain_initial_params = dict(params) if params is not None else None

    def setup(self, warmup_steps: int, *args, **kwargs) -> None:
        if isinstance(self.spec.chain_group, ChainParallel):
            raise ValueError(
                "distributed=ChainParallel() splits the chains of a run over processes, and Pyro's MCMC runs "
                "a kernel one chain at a time: run it with pyro_nfmala.MCMC (chain_method='vectorized', its "
                "default) or ChainSampler.from_model"
            )
        given = self._chain_initial_params
        batch = (
            None if given is None else {name: torch.as_tensor(value)[None] for name, value in given.items()}
        )
        self.setup_chains(1, warmup_steps, args, kwargs, batch)
        self._params = {} if self._chains is None else self._chains.params(0)

    def setup_chains(
        self,
        num_chains: int,
        warmup_steps: int,
        args: tuple = (),
        kwargs: Mapping | None = None,
        initial_params: Mapping[str, Tensor] | None = None,
    ) -> RunChains | None:
        """Starts ``num_chains`` chains of the run for the model's arguments as one batch (Pyro's
        :meth:`setup` starts one; :class:`pyro_nfmala.MCMC` every chain of a run), with ``warmup_steps``
        warmup steps ahead, at ``initial_params`` ``{site: (num_chains, *shape)}`` where given; returns them
        (``None`` for a model with nothing to sample)."""
        if initial_params is not None:
            self._chain_initial_params = {name: value[0] for name, value in initial_params.items()}
        run = self.prepare(*args, **dict(kwargs or {}))
        self._warmup_steps = warmup_steps
        if run.layout.dim > 0:
            self._chains = RunChains(
                run, num_chains, warmup_steps, initial_params=initial_params, earlier=self._earlier
            )
        return self._chains

    def sample(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self._chains is None:  # a model with no latent sites
            self._empty_steps += 1
            return {}
        if params is not self._params:  # the caller changed the state: start again from params
            self._chains.restart(0, params)
        self._chains.step()
        self._params = self._chains.params(0)
        return self._params

    def logging(self) -> dict[str, str]:
        if self._chains is None:
            return {"step size": "nan", "acc. prob": "1.000"}
        return self._chains.logging()

    def diagnostics(self) -> dict:
        if self._chains is not None:
            return self._chains.diagnostics(0)
        draws = max(self._empty_steps - self._warmup_steps, 0)  # every draw accepted, the same density
        lp = float(self._run.density.log_prob(torch.zeros(0))) if self._run is not None else float("nan")
        values = {"accept_prob": 1.0, "step_size": float("nan"), "diverging": False, "lp": lp}
        return {
            "divergences": [],
            "acceptance rate": 1.0,
            "step size": float("nan"),
            "sample_stats": {name: [value] * draws for name, value in values.items()},
        }

    def cleanup(self) -> None:
        """The end of a chain: its end-of-run checks (divergences, convergence over the run's chains so
        far in this process), then every per-chain state is forgotten."""
        if self._chains is not None:
            self._step_size = self._chains.step_size
            self._earlier = self._chains.finish()
        self._reset()

    def _reset(self) -> None:
        self._chains: RunChains | None = None
        self._params: dict[str, Tensor] | None = None
        self._warmup_steps = 0
        self._empty_steps = 0
        self._chain_initial_params = None

    def __getstate__(self) -> dict:  # to a worker process: the spec, not this process's run or chains
        return {**self.__dict__, "_run": None, "_run_arguments": None, "_earlier": [], "_chains": None}


def _copy(value: object) -> object:
    """A copy of the model's arguments that later changes in place do not reach (tensors and arrays
    copied, containers rebuilt)."""
    return tree_map(
        lambda leaf: (
            leaf.detach().clone()
            if isinstance(leaf, Tensor)
            else leaf.copy()
            if isinstance(leaf, np.ndarray)
            else leaf
        ),
        value,
    )


def _same_values(new: object, old: object) -> bool:
    """Whether two copies of the model's arguments hold the same values: the same structure, tensors and
    arrays of the same type, shape, dtype, device and numbers, other values equal (or, where ``==`` is
    not a truth value, the same object)."""
    new_leaves, new_structure = tree_flatten(new)
    old_leaves, old_structure = tree_flatten(old)
    return new_structure == old_structure and all(_same_leaf(a, b) for a, b in zip(new_leaves, old_leaves))


def _same_leaf(new: object, old: object) -> bool:
    if isinstance(new, Tensor) or isinstance(old, Tensor):
        return (
            isinstance(new, Tensor)
            and isinstance(old, Tensor)
            and (new.shape, new.dtype, new.device) == (old.shape, old.dtype, old.device)
            and bool(torch.equal(new, old))
        )
    if isinstance(new, np.ndarray) or isinstance(old, np.ndarray):
        return isinstance(new, np.ndarray) and isinstance(old, np.ndarray) and np.array_equal(new, old)
    try:
        return type(new) is type(old) and bool(new == old)
    except Exception:  # noqa: BLE001 - an object whose == is not a truth value: compare identities
        return new is old
