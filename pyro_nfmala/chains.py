r"""The batch sampler: many latent MALA chains as one ``(chains, d)`` batch, without Pyro's driver.

Pyro's :class:`~pyro.infer.MCMC` runs one chain per process. Sampling a trained flow for
thousands of particles wants all chains as one batch, on the flow's device and dtype:
:class:`ChainSampler` does that for any latent target (T1 or T2) and any preconditioner, with
the same step, warmup, statistics and warnings as :class:`~pyro_nfmala.NFMALA` (both are front
ends on :class:`~pyro_nfmala.driver.Driver`), and returns ArviZ data with a real chain dimension.

Step-size adaptation is **shared** by default: dual averaging is fed the mean acceptance
probability over all chains, which is nearly noise-free with many chains, so it converges in
a few dozen steps and every chain runs the same kernel (chains stay exchangeable, and R-hat
compares like with like). ``adapt="per_chain"`` adapts one step size per chain instead, for
targets whose chains sit in regions of very different scales. Either way the step size is
fixed after warmup, so the sampling phase is an exact MCMC kernel for each chain.

The paper's own procedure (``N`` chains from naive draws, ``K`` steps, keep the last states)
is :meth:`ChainSampler.warmup` then :meth:`ChainSampler.advance`.

**A Pyro model's chains as one batch** (:meth:`ChainSampler.from_model`): where Pyro's ``MCMC``
runs ``NFMALA`` one chain per call of the model, the batch sampler evaluates every chain in one
vectorized run of the model per move (the model inside an outer particle plate, as
:func:`~pyro_nfmala.model.model_density` builds it), with the same staged map, flow check, mode
mixture and warnings; the posterior group holds the model's sites, constrained. A model that does
not vectorize (``x @ beta`` where ``beta`` gains a batch dimension) is evaluated point by point,
and the sampler says so once.

Example:
    >>> sampler = ChainSampler(TemperedFlow(zuko.flows.RealNVP(2), beta=1.0), num_chains=64, seed=0)
    >>> idata = sampler.run(num_samples=20, warmup_steps=20, progress=False)
    >>> idata.posterior["x"].shape
    (64, 20, 2)
    >>> sampler.advance(10, progress=False).x.shape  # the paper's way: the last states
    torch.Size([64, 2])
"""

from __future__ import annotations

__all__ = ["ChainSampler"]

import warnings

from collections.abc import Callable, Mapping

import pyro
import torch

from torch import Tensor
from tqdm.auto import tqdm

from .arviz import from_arrays, pointwise_log_likelihood, warn_about_draws
from .centring import PARAMETERIZATIONS, NonCentring, fit_in_better_coordinates, hierarchical_sites
from .driver import Driver
from .fit import FitResult
from .flow import as_latent_flow
from .flowcheck import FlowCheck, check_flow
from .independence import tries_for_density
from .mala import MALAState, Move, StepInfo
from .model import ModelDensity, check_flow_dim, model_density
from .options import DEFAULT_PRECONDITIONER, SamplerOptions, check_num_chains
from .refine import FlowRefiner
from .target import LatentTarget, PosteriorPullback


class ChainSampler:
    r"""Many MALA chains in the latent space of a flow, as one batch.

    Arguments:
        target: A latent target (:class:`~pyro_nfmala.PosteriorPullback`,
            :class:`~pyro_nfmala.TemperedFlow`).
        num_chains: Number of chains, at least 1.
        initial_z: Initial latents ``(num_chains, d)``; by default :math:`z_0 \sim q_Z`.
        seed: Seed of the sampler's own random generator; the same seed gives the same chains
            (on the same machine and device).

    The sampler's options, ``preconditioner``, ``mass_matrix``, ``step_size``,
    ``target_accept_prob``, ``adapt``, ``independence_every``, ``independence_scale``,
    ``independence_tries``, ``refine_every`` and ``refine_options``, are passed to
    :class:`~pyro_nfmala.options.SamplerOptions` (documented there; ``independence_every`` is
    ``None`` or an integer here, and ``refine_every`` needs a posterior pull-back).

    The current state (``state``) and step sizes (``step_size``) persist between calls, so
    :meth:`warmup`, :meth:`sample` and :meth:`advance` can be called again to continue a run.
    After a warmup with ``refine_every``, ``sampler.flow`` is the refined flow, and
    ``sampler.flow_check`` its flow check (which warns when the flow is unreliable).
    """

    def __init__(
        self,
        target: LatentTarget,
        num_chains: int,
        *,
        preconditioner: str | Move = DEFAULT_PRECONDITIONER,
        mass_matrix: str | None = "auto",
        step_size: float | None = None,
        target_accept_prob: float = 0.574,
        adapt: str = "shared",
        independence_every: int | None = None,
        independence_scale: float = 1.0,
        independence_tries: int | str = 1,
        refine_every: int | None = None,
        refine_options: dict | None = None,
        initial_z: Tensor | None = None,
        seed: int | None = None,
        modes: tuple = (),
    ) -> None:
        options = SamplerOptions.from_arguments({k: v for k, v in locals().items() if k != "modes"})
        if options.independence_every == "auto":
            raise ValueError(
                "independence_every must be None or an integer >= 1 for ChainSampler ('auto' needs the "
                "flow check of NFMALA's own map)"
            )
        if not isinstance(target, LatentTarget):
            raise TypeError(
                "target must be a LatentTarget (PosteriorPullback, TemperedFlow), "
                f"got {type(target).__name__}"
            )
        self.num_chains = check_num_chains(num_chains)
        self.generator = torch.Generator(device=target.flow.device)
        self.generator.manual_seed(int(torch.randint(2**62, ())) if seed is None else seed)
        self._driver = Driver(
            target, self.num_chains, options, generator=self.generator, label="ChainSampler", modes=modes
        )
        #: For :meth:`from_model`: the model's density (its layout and transforms) and the staged fit
        #: (``None`` where a flow was given); ``None`` for a sampler built on a target.
        self.density: ModelDensity | None = None
        self.fit_result: FitResult | None = None
        #: For :meth:`from_model`: the non-centred coordinates the chains run in, ``None`` where they run
        #: in the model's own (the draws are mapped back to the model's sites either way).
        self.non_centring: NonCentring | None = None
        self._model: tuple | None = None
        if initial_z is None:
            z0 = self.flow.sample_base((self.num_chains,), self.generator)
        else:
            z0 = self._check_initial_z(initial_z)
        self._driver.start(
            z0, step_size=options.step_size, search_from=1.0 if options.step_size is None else None
        )
        self._reported = self._driver.checkpoint()
        #: The flow check (:func:`~pyro_nfmala.flowcheck.check_flow`) of the flow refined in the last
        #: warmup, ``None`` before one.
        self.flow_check: FlowCheck | None = None
        self.refiner = (
            FlowRefiner(self.flow, generator=self.generator, **options.refine_options)
            if options.refine_every is not None
            else None
        )

    @classmethod
    def from_model(
        cls,
        model: Callable,
        *model_args,
        num_chains: int = 4,
        model_kwargs: dict | None = None,
        flow=None,
        fit_options: Mapping | None = None,
        parameterization: str = "auto",
        init_strategy: Callable | None = None,
        independence_every: int | str | None = "auto",
        independence_tries: int | str = "auto",
        seed: int | None = None,
        trace_density: bool = True,
        **options,
    ) -> ChainSampler:
        r"""All chains of a Pyro model's posterior as one batch, one vectorized run of the model per move.

        ``flow=None`` fits the staged map (:func:`~pyro_nfmala.fit.fit_map_to_density`, with
        ``fit_options``) as ``NFMALA(model)`` does; any zuko flow on the unconstrained space is used as
        it is, after the flow check. ``independence_every="auto"`` is 1 where the map passes the flow
        check's reliability bar or the fit found several modes, else none (as ``NFMALA``'s);
        ``independence_tries="auto"`` chooses the tries per independence step from warmup's acceptance
        rate (:class:`~pyro_nfmala.options.SamplerOptions`), one try for a model that does not vectorize.
        ``options`` are the sampler's (``preconditioner``, ``mass_matrix``, ``step_size``, ...).
        The chains start at draws of the map. ``parameterization`` is :class:`~pyro_nfmala.NFMALA`'s: with
        ``flow=None``, a model with hierarchical sites is sampled non-centred where that brings its
        posterior nearer a Gaussian (:func:`~pyro_nfmala.centring.fit_in_better_coordinates`), and the
        draws come back as the model's own sites. ``trace_density`` is :class:`~pyro_nfmala.NFMALA`'s: the
        model's log density and gradient as one traced graph per batch shape (:mod:`pyro_nfmala.traced`).

        Example:
            >>> def model(y):
            ...     loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
            ...     with pyro.plate("data", len(y)):
            ...         pyro.sample("y", dist.Normal(loc, 1.0), obs=y)
            >>> sampler = ChainSampler.from_model(model, torch.ones(20), num_chains=8, seed=0,
            ...                                   fit_options={"progress": False})
            >>> idata = sampler.run(num_samples=50, warmup_steps=50, progress=False)
            >>> idata.posterior["loc"].shape
            (8, 50)
        """
        density = model_density(
            model, model_args, model_kwargs, init_strategy=init_strategy, trace_density=trace_density
        )
        if density.layout.dim == 0:
            raise ValueError("the model has no continuous latent sites to sample")
        if not density.vectorized:
            warnings.warn(
                "the model does not vectorize over a batch of parameters (see the log of "
                "pyro_nfmala.model for why), so the chains are evaluated point by point, one model run "
                "each: write its sites to broadcast over leading batch dimensions (e.g. "
                "(x * beta.unsqueeze(-2)).sum(-1) for x @ beta) for one run per move",
                UserWarning,
                stacklevel=2,
            )
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
        fit, non_centring, sampled = None, None, density
        if flow is None:
            sites = (
                []
                if parameterization == "centred"
                else hierarchical_sites(model, model_args, model_kwargs, init_strategy)
            )
            density_options = {"init_strategy": init_strategy, "trace_density": trace_density}
            fit, non_centring = fit_in_better_coordinates(
                model,
                model_args,
                model_kwargs,
                density,
                sites,
                parameterization,
                fit_options,
                density_options,
            )
            sampled = density if non_centring is None else non_centring.density
            flow, check = fit.flow, fit.check
        else:
            check_flow_dim(flow, density.layout)
            check = None
        latent = as_latent_flow(flow)

        def log_prob(x: Tensor) -> Tensor:  # as Pyro's MCMC evaluates a potential: no argument checks
            with pyro.validation_enabled(False):
                return sampled.log_prob(x).to(latent.dtype)

        target = PosteriorPullback(latent, log_prob, trace=trace_density)
        if check is None:
            check = check_flow(latent, target.log_prob)
            check.warn("ChainSampler's flow", stacklevel=3)
        modes = fit.modes if fit is not None else ()
        if independence_every == "auto":
            independence_every = 1 if check.reliable or len(modes) > 1 else None
        sampler = cls(
            target,
            num_chains,
            independence_every=independence_every,
            independence_tries=tries_for_density(independence_tries, density.vectorized),
            seed=seed,
            modes=modes,
            **options,
        )
        sampler.density, sampler.fit_result, sampler.flow_check = density, fit, check
        sampler.non_centring = non_centring
        sampler._model = (model, model_args, dict(model_kwargs or {}))
        return sampler

    @property
    def target(self) -> LatentTarget:
        """The latent target (after a warmup with refinement, the one of the refined flow)."""
        return self._driver.target

    @property
    def flow(self):
        """The flow of the target (after a warmup with refinement, the refined flow)."""
        return self._driver.flow

    @property
    def refine_every(self) -> int | None:
        return self._driver.options.refine_every

    @property
    def refinements(self) -> int:
        """How many flow refinements took effect."""
        return self._driver.refinements

    @property
    def preconditioner(self) -> Move:
        """The Langevin move (after warmup, with the adapted mass matrix)."""
        return self._driver.move

    @property
    def adapt(self) -> str:
        return self._driver.options.adapt

    @property
    def state(self) -> MALAState:
        """The chains' current state (``z``, ``x = f(z)``, log density, gradient, ...)."""
        return self._driver.state

    @property
    def step_size(self) -> Tensor:
        """The step size of each chain, ``(num_chains,)``."""
        return self._driver.step_size

    @property
    def num_steps(self) -> int:
        """Steps made so far, warmup included."""
        return self._driver.steps

    @property
    def independence_tries(self) -> int:
        """How many independence moves each independence step makes (for ``"auto"``, one in warmup,
        then the number chosen from warmup's acceptance rate)."""
        return self._driver.independence_tries

    @property
    def independence_acceptance_rate(self) -> float:
        """The share of independence proposals accepted so far, warmup included (NaN without any)."""
        return self._driver.independence_acceptance_rate

    @property
    def num_divergent(self) -> int:
        """Divergent (rejected non-finite or failed) Langevin proposals so far, warmup included."""
        return self._driver.ledgers["langevin"].total("divergent")

    @property
    def num_errors(self) -> int:
        """Evaluations that raised a numerical error so far (each failing batch or half-batch counts once)."""
        return self._driver.errors

    def _check_initial_z(self, z: Tensor) -> Tensor:
        if not isinstance(z, Tensor):
            raise TypeError(f"initial_z must be a tensor, got {type(z).__name__}")
        expected = (self.num_chains, self.flow.dim)
        if tuple(z.shape) != expected:
            raise ValueError(f"initial_z must have shape (num_chains, d) = {expected}, got {tuple(z.shape)}")
        if z.dtype != self.flow.dtype:
            raise TypeError(f"initial_z has dtype {z.dtype} but the flow has dtype {self.flow.dtype}")
        if z.device != self.flow.device:
            raise ValueError(f"initial_z is on {z.device} but the flow is on {self.flow.device}")
        return z

    def _report(self) -> None:
        self._driver.warn_divergences(self._reported, stacklevel=4)
        self._reported = self._driver.checkpoint()

    def warmup(self, num_steps: int, *, adapt_step_size: bool = True, progress: bool = True) -> Tensor:
        """Runs ``num_steps`` steps adapting the step size by dual averaging (and the mass matrix, and with
        ``refine_every`` the flow); returns the final step sizes.

        Interrupted (Ctrl-C), it keeps the step size adapted so far, fixed, and the state.
        """
        refinements = self.refinements
        self._driver.begin_warmup(num_steps, adapt_step_size=adapt_step_size, refiner=self.refiner)
        bar = tqdm(range(num_steps), desc="warmup", disable=not progress)
        try:
            for _ in bar:
                info = self._driver.step()
                step_size = f"{float(self.step_size.median()):.2e}"
                bar.set_postfix({**self._postfix(info), "step size": step_size}, refresh=False)
        finally:
            bar.close()
            self._driver.end_warmup()
        self._report()
        if self.refinements > refinements:  # the flow check again, on the flow the chains adapted
            self.flow_check = check_flow(self.flow, self.target.log_prob)
            self.flow_check.warn("ChainSampler's refined flow", stacklevel=3)
        return self.step_size

    def _postfix(self, info: StepInfo) -> dict[str, str]:
        postfix = {"acc. prob": f"{float(info.accept_prob.mean()):.3f}"}
        if self._driver.independence_every is not None:
            postfix["independence acc."] = f"{self.independence_acceptance_rate:.3f}"
        return postfix

    def _run(self, num_steps: int, desc: str, progress: bool):
        """Steps at fixed step size, yielding each step's :class:`~pyro_nfmala.mala.StepInfo`."""
        bar = tqdm(range(num_steps), desc=desc, disable=not progress)
        try:
            for _ in bar:
                info: StepInfo = self._driver.step()
                bar.set_postfix(self._postfix(info), refresh=False)
                yield info
        finally:
            bar.close()

    def sample(
        self,
        num_samples: int,
        *,
        thin: int = 1,
        keep_latent: bool = True,
        log_likelihood: bool = True,
        progress: bool = True,
    ):
        """Runs ``num_samples * thin`` steps at fixed step size; returns ArviZ data of every
        ``thin``-th state.

        Interrupted (``KeyboardInterrupt``, Ctrl-C) after at least one draw, it warns and
        returns the draws made so far; the sampler keeps its last state, so calling
        :meth:`sample` again continues the same chains.

        The posterior group holds ``x`` (data space, ``(chains, draws, d)``); the ``latent``
        group holds ``z``; ``sample_stats`` holds ``accept_prob``, ``step_size``,
        ``diverging`` and ``lp`` (the log density of ``x`` under the push-forward of the
        target, up to a constant), and with independence moves ``independence_accept_prob`` (NaN
        on draws without one). Stats are those of the step that produced each kept state.

        For a sampler built by :meth:`from_model`, the posterior group holds the model's sites
        (constrained) and the ``latent`` group ``x`` too; with ``log_likelihood`` (default), the
        ``log_likelihood`` and ``observed_data`` groups (pointwise per observed site, as
        :func:`~pyro_nfmala.to_inference_data` gives them), so ``az.loo`` runs on the result.
        """
        if num_samples < 1 or thin < 1:
            raise ValueError(f"num_samples and thin must be >= 1, got {num_samples} and {thin}")
        draws_x, draws_z = [], []
        stats = {name: [] for name in self._driver.stat_names}
        try:
            for i, info in enumerate(self._run(num_samples * thin, "sampling", progress)):
                if (i + 1) % thin:
                    continue
                draws_x.append(self.state.x.cpu())
                if keep_latent:
                    draws_z.append(self.state.z.cpu())
                for name, value in self._driver.stats(info).items():
                    stats[name].append(value.cpu())
        except KeyboardInterrupt:
            kept = min(
                len(values) for values in [draws_x, *stats.values()] + ([draws_z] if keep_latent else [])
            )
            if kept == 0:
                raise
            for values in [draws_x, draws_z, *stats.values()]:
                del values[kept:]  # a draw interrupted half-recorded is dropped
            warnings.warn(
                f"interrupted after {len(draws_x)} of {num_samples} draws: returning them; the sampler "
                "keeps its last state, so sample() again continues the chains",
                UserWarning,
                stacklevel=2,
            )
        self._report()

        def stack(values):  # list of (chains, ...) -> (chains, draws, ...)
            return torch.stack(values, dim=1).numpy()

        groups = {"latent": {"z": stack(draws_z)}} if keep_latent else None
        x = torch.stack(draws_x, dim=1)
        if self.density is None:
            posterior, dims = {"x": x.numpy()}, {"x": ["x_dim"], "z": ["z_dim"]}
        else:  # the model's sites, constrained (and "x", the unconstrained point, in the latent group)
            if self.non_centring is not None:
                x = self.non_centring.to_original(x)
            with torch.no_grad():
                posterior = {name: value.numpy() for name, value in self.density.constrain(x).items()}
            groups = {"latent": {**(groups or {}).get("latent", {}), "x": x.numpy()}}
            dims = {"x": ["x_dim"], "z": ["z_dim"]}
        sample_stats = {name: stack(values) for name, values in stats.items()}
        if self.density is not None:
            warn_about_draws(posterior, what="ChainSampler's chains")
            if log_likelihood:  # what az.loo and az.waic read, as to_inference_data gives for NFMALA
                model, model_args, model_kwargs = self._model
                pointwise, observed = pointwise_log_likelihood(model, posterior, model_args, model_kwargs)
                if pointwise:
                    groups = {**groups, "log_likelihood": pointwise, "observed_data": observed}
        return from_arrays(posterior, sample_stats, groups=groups, dims=dims)

    def advance(self, num_steps: int, *, progress: bool = True) -> MALAState:
        """Runs ``num_steps`` steps at fixed step size without recording them; returns the state."""
        for _ in self._run(num_steps, "sampling", progress):
            pass
        self._report()
        return self.state

    def run(self, num_samples: int, warmup_steps: int = 500, **kwargs):
        """:meth:`warmup` then :meth:`sample`; keyword arguments go to :meth:`sample` (and
        ``progress`` to both)."""
        self.warmup(warmup_steps, progress=kwargs.get("progress", True))
        return self.sample(num_samples, **kwargs)
