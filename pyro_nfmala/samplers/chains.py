r"""The batch sampler: many latent MALA chains as one ``(chains, d)`` batch, without Pyro's driver.

Pyro's :class:`~pyro.infer.MCMC` runs one chain per process. Sampling a trained flow for
thousands of particles wants all chains as one batch, on the flow's device and dtype:
:class:`ChainSampler` does that for any latent target (T1 or T2) and any preconditioner, with
the same step, warmup, statistics and warnings as :class:`~pyro_nfmala.NFMALA` (both are front
ends on :class:`~pyro_nfmala.engine.driver.Driver`), and returns ArviZ data with a real chain dimension.

Step-size adaptation is **shared** by default: dual averaging is fed the mean acceptance
probability over all chains, which is nearly noise-free with many chains, so it converges in
a few dozen steps and every chain runs the same kernel (chains stay exchangeable, and R-hat
compares like with like). ``adapt="per_chain"`` adapts one step size per chain instead, for
targets whose chains sit in regions of very different scales. Either way the step size is
fixed after warmup, so the sampling phase is an exact MCMC kernel for each chain.

The paper's own procedure (``N`` chains from naive draws, ``K`` steps, keep the last states)
is :meth:`ChainSampler.warmup` then :meth:`ChainSampler.advance`.

**A Pyro model's chains as one batch** (:meth:`ChainSampler.from_model`): the run that
:class:`~pyro_nfmala.NFMALA` prepares (:class:`~pyro_nfmala.samplers.run.PosteriorRun`: the same density,
coordinates, staged map, flow check, modes and schedule, from the same options), every chain evaluated
in one vectorized run of the model per move (the model inside an outer particle plate, as
:func:`~pyro_nfmala.model.density.model_density` builds it); the posterior group holds the model's sites,
constrained. A model that does not broadcast over that plate (``x @ beta`` where ``beta`` gains a batch
dimension) runs vmapped over the chains instead; one that cannot batch either way (it branches on a
parameter's value) is evaluated point by point, and the run says so once, with why.
:class:`pyro_nfmala.MCMC` runs the same batch behind Pyro's ``MCMC`` interface.

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

from collections.abc import Callable

import torch

from torch import Tensor
from tqdm.auto import tqdm

from ..engine.driver import Driver
from ..engine.options import DEFAULT_PRECONDITIONER, SamplerOptions
from ..engine.refine import FlowRefiner
from ..engine.step import ChainState, Move, StepInfo
from ..engine.targets import LatentTarget
from ..fit.check import FlowCheck, check_flow
from ..fit.train import FitResult
from ..model.centring import NonCentring
from ..model.density import ModelDensity
from ..output.arviz import from_arrays, posterior_inference_data
from .kernel import NFMALA
from .run import PosteriorRun


class ChainSampler:
    r"""Many MALA chains in the latent space of a flow, as one batch.

    Arguments:
        target: A latent target (:class:`~pyro_nfmala.PosteriorPullback`,
            :class:`~pyro_nfmala.TemperedFlow`).
        num_chains: Number of chains, at least 1.
        initial_z: Initial latents ``(num_chains, d)``; by default :math:`z_0 \sim q_Z` (the start
            policy of :meth:`~pyro_nfmala.engine.driver.Driver.start_state`).
        seed: Seed of the sampler's own random generator; the same seed gives the same chains
            (on the same machine and device).

    The sampler's options, ``local_move``, ``preconditioner``, ``mass_matrix``, ``step_size``,
    ``target_accept_prob``, ``adapt``, ``independence_every``, ``independence_scale``,
    ``independence_tries``, ``refine_every`` and ``refine_options``, are passed to
    :class:`~pyro_nfmala.engine.options.SamplerOptions` (documented there; ``independence_every`` is
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
        local_move: str = "mala",
        preconditioner: str | Move = DEFAULT_PRECONDITIONER,
        mass_matrix: str | None = "auto",
        step_size: float | None = None,
        target_accept_prob: float | None = None,
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
        if options.independence_every == "auto" or options.local_move == "auto":
            raise ValueError(
                "independence_every must be None or an integer >= 1, and local_move 'mala', 'hmc' or "
                "'nuts', for ChainSampler on a target ('auto' needs the flow check of a model's run: "
                "ChainSampler.from_model)"
            )
        if not isinstance(target, LatentTarget):
            raise TypeError(
                "target must be a LatentTarget (PosteriorPullback, TemperedFlow), "
                f"got {type(target).__name__}"
            )
        generator = _generator(target.flow.device, seed)
        driver = Driver(target, num_chains, options, generator=generator, label="ChainSampler", modes=modes)
        z0 = driver.start_state() if initial_z is None else _checked_initial_z(initial_z, driver)
        driver.start(z0, step_size=options.step_size, search_from=1.0 if options.step_size is None else None)
        self._attach(driver, None)

    @classmethod
    def from_model(
        cls,
        model: Callable,
        *model_args,
        num_chains: int = 4,
        model_kwargs: dict | None = None,
        seed: int | None = None,
        **options,
    ) -> ChainSampler:
        r"""All chains of a Pyro model's posterior as one batch, one vectorized run of the model per move.

        ``options`` are every keyword argument of :class:`~pyro_nfmala.NFMALA`, with its defaults and its
        meaning (``flow``, ``fit_options``, ``parameterization``, ``init_strategy``, ``transforms``,
        ``max_plate_nesting``, ``initial_params``, ``trace_density``, the sampler's options, ...): the run is
        the one NFMALA prepares (:class:`~pyro_nfmala.samplers.run.PosteriorRun`), its chains started by the
        same policy, all ``num_chains`` of them in one batch, from the sampler's own generator (``seed``).
        With ``distributed=ChainParallel()``, ``num_chains`` are split over the processes (each a batch of its
        share, warmup pooled), and :meth:`sample` gives every process every chain's draws.

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
        run = NFMALA(model, **options).prepare(*model_args, **dict(model_kwargs or {}))
        if run.layout.dim == 0:
            raise ValueError("the model has no continuous latent sites to sample")
        generator = _generator(run.flow.device, seed)
        sampler = cls.__new__(cls)
        count, _ = run.spec.chain_group.split(num_chains)  # with ChainParallel, this process's share
        sampler._attach(run.start(count, generator=generator, label="ChainSampler"), run)
        return sampler

    def _attach(self, driver: Driver, run: PosteriorRun | None) -> None:
        self._driver = driver
        #: The model's run this sampler samples (:meth:`from_model`), ``None`` for a sampler built on a
        #: target.
        self.model_run = run
        self.num_chains = driver.num_chains
        self.generator = driver.generator
        self._reported = driver.checkpoint()
        #: The flow check of the map: the run's (:meth:`from_model`), or, after a warmup with refinement,
        #: the refined flow's; ``None`` before.
        self.flow_check: FlowCheck | None = None if run is None else run.check

    # ------------------------------------------------------------------------------------------
    # what the sampler is

    @property
    def density(self) -> ModelDensity | None:
        """For :meth:`from_model`: the model's density (its layout and transforms)."""
        return None if self.model_run is None else self.model_run.density

    @property
    def fit_result(self) -> FitResult | None:
        """For :meth:`from_model`: the staged fit (``None`` where a flow was given)."""
        return None if self.model_run is None else self.model_run.fit_result

    @property
    def non_centring(self) -> NonCentring | None:
        """For :meth:`from_model`: the non-centred coordinates the chains run in, ``None`` where they run in
        the model's own (the draws are mapped back to the model's sites either way)."""
        return None if self.model_run is None else self.model_run.non_centring

    @property
    def target(self) -> LatentTarget:
        """The latent target (after a warmup with refinement, the one of the refined flow)."""
        return self._driver.target

    @property
    def flow(self):
        """The flow of the target (after a warmup with refinement, the refined flow)."""
        return self._driver.flow

    @property
    def refiner(self) -> FlowRefiner | None:
        """The flow's refiner in warmup (with ``refine_every``), else ``None``."""
        return self._driver.refiner

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
    def state(self) -> ChainState:
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

    # ------------------------------------------------------------------------------------------
    # running

    def _report(self) -> None:
        self._driver.warn_divergences(self._reported, stacklevel=4)
        self._reported = self._driver.checkpoint()

    def warmup(self, num_steps: int, *, adapt_step_size: bool = True, progress: bool = True) -> Tensor:
        """Runs ``num_steps`` steps adapting the step size by dual averaging (and the mass matrix, and with
        ``refine_every`` the flow); returns the final step sizes.

        Interrupted (Ctrl-C), it keeps the step size adapted so far, fixed, and the state.
        """
        refinements = self.refinements
        self._driver.begin_warmup(num_steps, adapt_step_size=adapt_step_size)
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
        """Steps at fixed step size, yielding each step's :class:`~pyro_nfmala.engine.step.StepInfo`."""
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
        record = self._driver.start_recording(thin=thin, keep=("x", "z") if keep_latent else ("x",))
        try:
            for _ in self._run(num_samples * thin, "sampling", progress):
                pass
        except KeyboardInterrupt:
            if record.num_draws == 0:
                raise
            warnings.warn(
                f"interrupted after {record.num_draws} of {num_samples} draws: returning them; the sampler "
                "keeps its last state, so sample() again continues the chains",
                UserWarning,
                stacklevel=2,
            )
        finally:
            self._driver.record = None
        self._report()
        group = self.model_run.spec.chain_group if self.model_run is not None else None
        draws = {
            name: (value if group is None else group.gather_rows(value)).numpy()
            for name, value in record.stacked().items()
        }
        x, z = draws.pop("x"), draws.pop("z", None)
        latent = {} if z is None else {"z": z}
        dims = {"x": ["x_dim"], "z": ["z_dim"]}
        if self.model_run is None:
            return from_arrays({"x": x}, draws, groups={"latent": latent} if latent else None, dims=dims)
        sampled = torch.as_tensor(x)
        x = self.model_run.model_points(sampled)  # the model's own unconstrained coordinates
        with torch.no_grad():
            posterior = {name: value.numpy() for name, value in self.model_run.density.constrain(x).items()}
        return posterior_inference_data(
            posterior,
            draws,
            model=self.model_run.spec.model if log_likelihood else None,
            model_args=self.model_run.args,
            model_kwargs=self.model_run.kwargs,
            groups={"latent": {**latent, "x": x.numpy()}},
            what="ChainSampler's chains",
            dims=dims,
            advice=lambda failing: self.model_run.likely_causes(sampled, failing),
        )

    def advance(self, num_steps: int, *, progress: bool = True) -> ChainState:
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


def _generator(device: torch.device, seed: int | None) -> torch.Generator:
    """The sampler's own random generator on ``device``, seeded (from the global generator if ``seed`` is
    ``None``)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(torch.randint(2**62, ())) if seed is None else seed)
    return generator


def _checked_initial_z(z: Tensor, driver: Driver) -> Tensor:
    if not isinstance(z, Tensor):
        raise TypeError(f"initial_z must be a tensor, got {type(z).__name__}")
    flow = driver.flow
    expected = (driver.num_chains, flow.dim)
    if tuple(z.shape) != expected:
        raise ValueError(f"initial_z must have shape (num_chains, d) = {expected}, got {tuple(z.shape)}")
    if z.dtype != flow.dtype:
        raise TypeError(f"initial_z has dtype {z.dtype} but the flow has dtype {flow.dtype}")
    if z.device != flow.device:
        raise ValueError(f"initial_z is on {z.device} but the flow is on {flow.device}")
    return z
