"""Fault injection: NaN / inf potentials on random calls, a flow that overflows, a model that
raises, with the kernel and the vectorized sampler. Every faulty proposal is rejected and
counted; no returned draw is non-finite; frequent faults raise a warning at the end of the run.
Also: bit-identical reruns with the same seed, and float32 / float64 flows with float32 models."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
import zuko

from pyro.infer import MCMC

from pyro_nfmala import NFMALA, ChainSampler, LatentFlow, PosteriorPullback, identity_flow, to_inference_data


class FaultyPotential:
    """A standard normal potential that returns ``value`` (NaN or inf) on a random share of calls.

    Calls are only faulty once ``armed``; every fault is recorded.
    """

    def __init__(self, rate: float, value: float, seed: int = 0) -> None:
        self.rate, self.value, self.faults, self.armed = rate, value, 0, False
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, params):
        energy = 0.5 * params["x"].square().sum()
        if self.armed and float(torch.rand((), generator=self.generator)) < self.rate:
            self.faults += 1
            return energy * self.value
        return energy


def arm_after_warmup(potential: FaultyPotential, warmup_steps: int):
    """An MCMC hook that arms the faulty potential when the last warmup step is done."""

    def hook(kernel, params, stage, i):
        if stage == "Warmup" and i == warmup_steps - 1:
            potential.armed = True

    return hook


def run_faulty_kernel(potential: FaultyPotential, num_samples: int, independence_every):
    """The kernel on ``potential`` (armed after 100 warmup steps); returns the run and its RuntimeWarnings."""
    pyro.set_rng_seed(0)
    kernel = NFMALA(
        potential_fn=potential,
        flow=identity_flow(2),
        initial_params={"x": torch.zeros(2)},
        independence_every=independence_every,
        trace_density=False,  # the faults come from the potential's own state, which a trace would freeze
    )
    mcmc = MCMC(
        kernel,
        num_samples=num_samples,
        warmup_steps=100,
        disable_progbar=True,
        hook_fn=arm_after_warmup(potential, 100),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mcmc.run()
    assert torch.isfinite(mcmc.get_samples()["x"]).all()
    return mcmc, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.statistical
@pytest.mark.parametrize("rate", [0.01, 0.2])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_kernel_rejects_and_counts_random_faults(rate, value):
    potential = FaultyPotential(rate, value)
    mcmc, messages = run_faulty_kernel(potential, 500, independence_every=None)  # MALA's divergences only
    divergences = mcmc.diagnostics()["divergences"]["chain 0"]
    assert potential.faults > 0 and len(divergences) == potential.faults  # every fault, and only faults
    idata = to_inference_data(mcmc)
    assert int(idata.sample_stats["diverging"].sum()) == potential.faults
    assert any("divergent" in message for message in messages) == (potential.faults > 0.01 * 500)


@pytest.mark.statistical
def test_faults_in_independence_proposals_are_rejected_counted_and_reported():
    """With a global move after every MALA step, each fault is a rejection of one kind of move or the
    other: MALA's are divergences, the independence moves' are counted apart; both are reported."""
    potential = FaultyPotential(0.2, float("nan"))
    mcmc, messages = run_faulty_kernel(potential, 300, independence_every=1)
    diagnostics = mcmc.diagnostics()
    divergences = len(diagnostics["divergences"]["chain 0"])
    global_nonfinite = diagnostics["independence non-finite"]["chain 0"]
    assert divergences > 0 and global_nonfinite > 0
    assert divergences + global_nonfinite == potential.faults
    assert any("independence proposals" in message for message in messages)


@pytest.mark.parametrize("rate", [0.01, 0.2])
def test_vectorized_sampler_rejects_and_counts_random_faults(rate):
    faults, armed = [], []
    generator = torch.Generator().manual_seed(1)

    def log_prob(x):  # faulty only once armed: initial states must be finite
        faulty = (torch.rand(x.shape[:-1], generator=generator) < rate) & bool(armed)
        faults.append(int(faulty.sum()))
        return torch.where(faulty, torch.full_like(x[..., 0], float("nan")), -0.5 * x.square().sum(-1))

    flow = LatentFlow(identity_flow(2))
    sampler = ChainSampler(
        PosteriorPullback(flow, log_prob), 64, preconditioner="identity", step_size=0.5, seed=0
    )
    armed.append(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = sampler.sample(200, progress=False)
    assert torch.isfinite(torch.as_tensor(idata.posterior["x"].values)).all()
    assert int(idata.sample_stats["diverging"].sum()) == sum(faults) > 0
    assert any("divergent" in str(w.message) for w in caught) == (sum(faults) > 0.01 * 200 * 64)


class RaisesRightOf:
    """A model whose log density raises ``error`` (as a failed support check would) where loc > bound."""

    def __init__(self, bound: float, error: type[Exception]) -> None:
        self.bound, self.error = bound, error

    def __call__(self):
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        if loc.item() > self.bound:
            raise self.error("loc out of the model's domain")
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=torch.tensor(0.0))


def raising_kernel(bound, error):
    """Plain MALA (no fit) on :class:`RaisesRightOf`, started at -0.5 with a fixed step of 1."""
    return NFMALA(
        RaisesRightOf(bound, error),
        flow=identity_flow(1),
        initial_params={"loc": torch.tensor(-0.5)},
        step_size=1.0,
        adapt_step_size=False,
    )


@pytest.mark.statistical
def test_model_that_raises_a_registered_error_at_some_points_keeps_sampling(out_of_domain):
    pyro.set_rng_seed(2)
    kernel = raising_kernel(2.0, out_of_domain)
    mcmc = MCMC(kernel, num_samples=300, warmup_steps=0, disable_progbar=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mcmc.run()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    # the first error of its kind is shown with its message, once; the divergences are reported at the end
    assert sum("raised OutOfDomain: loc out of the model's domain" in m for m in messages) == 1
    assert any("divergent" in m for m in messages)
    loc = mcmc.get_samples()["loc"]
    assert torch.isfinite(loc).all() and bool((loc <= 2.0).all())
    diagnostics = mcmc.diagnostics()
    assert len(diagnostics["divergences"]["chain 0"]) > 0
    rejected = len(diagnostics["divergences"]["chain 0"]) + diagnostics["independence non-finite"]["chain 0"]
    assert diagnostics["numerical errors"]["chain 0"] == rejected  # MALA's and the global moves'


def test_model_that_raises_an_unregistered_error_stops_the_run():
    """A ValueError that no exception handler claims is a bug to see, not a divergence to count."""
    kernel = raising_kernel(2.0, ValueError)
    with pytest.raises(ValueError, match="out of the model's domain") as raised:
        MCMC(kernel, num_samples=300, warmup_steps=0, disable_progbar=True).run()
    assert any("register_exception_handler" in note for note in raised.value.__notes__)


@pytest.mark.parametrize("kind", ["MemoryError", "cpu allocator"])
def test_out_of_memory_stops_the_run_even_when_a_handler_claims_every_error(kind):
    """A handler registered to accept everything must not turn a machine out of memory into
    divergences: the hostile pass saw 42 MemoryErrors and 42 CPU allocator failures swallowed."""

    def allocator_failure(message):
        return RuntimeError(
            f"[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: {message}"
        )

    error = MemoryError if kind == "MemoryError" else allocator_failure
    pyro.ops.integrator.register_exception_handler(
        "pyro_nfmala_tests_all", lambda e: True, warn_on_overwrite=False
    )
    try:
        kernel = raising_kernel(0.5, error)
        with pytest.raises((MemoryError, RuntimeError), match="out of the model's domain"):
            MCMC(kernel, num_samples=300, warmup_steps=0, disable_progbar=True).run()
    finally:
        pyro.ops.integrator.register_exception_handler(
            "pyro_nfmala_tests_all", lambda e: False, warn_on_overwrite=False
        )


def test_a_chain_that_never_moves_is_reported_as_such(out_of_domain):
    """A potential that raises a registered error everywhere but at the start: no proposal can be accepted."""

    def potential(params):
        if not bool((params["x"] == 0.3).all()):
            raise out_of_domain("broken everywhere but at the start")
        return 0.5 * params["x"].square().sum()

    kernel = NFMALA(
        potential_fn=potential,
        flow=identity_flow(1),
        initial_params={"x": torch.tensor([0.3])},
        step_size=0.5,
        adapt_step_size=False,
    )
    mcmc = MCMC(kernel, num_samples=200, warmup_steps=0, disable_progbar=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mcmc.run()
    messages = " ".join(str(w.message) for w in caught)
    assert "200 of 200 proposals after warmup were divergent" in messages
    assert (
        "1 of 1 chain(s) accepted no proposal in 200 steps" in messages
        and "not samples of the target" in messages
    )
    assert torch.all(mcmc.get_samples()["x"] == 0.3)


def test_one_failing_chain_does_not_reject_the_whole_batch(out_of_domain):
    """A log density that raises for some points of a batch: only those chains are rejected."""

    def log_prob(x):
        if bool((x[..., 0] > 1.0).any()):
            raise out_of_domain("out of the domain")
        return -0.5 * x.square().sum(-1)

    flow = LatentFlow(identity_flow(2))
    z0 = torch.full((32, 2), -0.5)
    sampler = ChainSampler(
        PosteriorPullback(flow, log_prob), 32, preconditioner="identity", step_size=0.3, initial_z=z0, seed=0
    )
    with pytest.warns(RuntimeWarning, match="raised OutOfDomain: out of the domain"):
        idata = sampler.sample(100, progress=False)
    x = torch.as_tensor(idata.posterior["x"].values)
    diverging = idata.sample_stats["diverging"].values
    assert bool((x[..., 0] <= 1.0).all())
    assert diverging.any()
    # rejecting a whole batch when one chain fails would reject all 32 chains at that step
    assert diverging.sum(0).max() < 32
    assert sampler.num_errors >= diverging.sum()  # every failing chain's error, and the batches', counted


def test_a_transient_failure_is_counted(out_of_domain):
    """A batch evaluation that fails once, then succeeds chain by chain, still counts as an error."""
    glitches = []

    def log_prob(x):
        if len(x) > 1 and glitches:
            glitches.pop()
            raise out_of_domain("a passing glitch")
        return -0.5 * x.square().sum(-1)

    sampler = ChainSampler(
        PosteriorPullback(identity_flow(2), log_prob), 8, step_size=0.3, seed=0, initial_z=torch.zeros(8, 2)
    )
    glitches.append("once")
    with pytest.warns(RuntimeWarning, match="a passing glitch"):
        idata = sampler.sample(5, progress=False)
    assert sampler.num_errors == 1 and not idata.sample_stats["diverging"].values.any()


SCALE = 30.0  # x = exp(30 z): overflows in float32 for z > 88.7 / 30 = 2.96, a few % of N(0, 1)


def log_transform():
    """Data to latent: z = log(x) / 30 (zuko flows' transforms go data to latent)."""
    from torch.distributions.transforms import (
        AffineTransform,
        ComposeTransform,
        ExpTransform,
        IndependentTransform,
    )

    return IndependentTransform(ComposeTransform([ExpTransform().inv, AffineTransform(0.0, 1 / SCALE)]), 1)


def exponential_flow() -> zuko.flows.Flow:
    """x = exp(30 z) element-wise; its Jacobian overflows in part of the latent space."""
    transform = zuko.flows.UnconditionalTransform(log_transform)
    base = zuko.flows.UnconditionalDistribution(
        zuko.distributions.DiagNormal, torch.zeros(2), torch.ones(2), buffer=True
    )
    return zuko.flows.Flow([transform], base)


@pytest.mark.parametrize("preconditioner", ["identity", "jacobian"])
def test_flow_whose_jacobian_overflows_in_part_of_the_space(preconditioner):
    def log_normal(x):  # log x ~ N(0, 30^2): the flow is exact for it, the latent target is N(0, I)
        y = x.log()
        return (-0.5 * (y / SCALE).square() - y).sum(-1)

    flow = LatentFlow(exponential_flow())
    with torch.no_grad():
        assert not torch.isfinite(flow.to_data(torch.full((1, 2), 3.5))[0]).all()  # the overflow is real
    z0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)).clamp(-2.5, 2.5)  # finite starts
    sampler = ChainSampler(
        PosteriorPullback(flow, log_normal),
        64,
        preconditioner=preconditioner,
        step_size=1.0,
        initial_z=z0,
        seed=0,
    )
    with pytest.warns(RuntimeWarning, match="divergent"):
        idata = sampler.sample(100, progress=False)
    assert torch.isfinite(torch.as_tensor(idata.posterior["x"].values)).all()
    diverging = idata.sample_stats["diverging"].values
    if preconditioner == "identity":
        # With step size 1 on the N(0, I) latent target, z' = z + (-z) + sqrt(2) xi = sqrt(2) xi: every
        # proposal is an independent N(0, 2 I) draw, so the share of divergent proposals is the N(0, 2 I)
        # mass of the region where float32 overflows (x, its log density or gradient non-finite),
        # measured here on 200,000 fresh draws; the count is binomial: 4.5 standard errors.
        draws = math.sqrt(2.0) * torch.randn(200_000, 2, generator=torch.Generator().manual_seed(1))
        draws.requires_grad_(True)
        x, ladj = flow.to_data(draws)
        log_density = log_normal(x) + ladj
        (grad,) = torch.autograd.grad(log_density.sum(), draws)
        p = float(
            (~(torch.isfinite(log_density) & torch.isfinite(grad).all(-1) & torch.isfinite(x).all(-1)))
            .double()
            .mean()
        )
        assert 0.01 < p < 0.2  # the region is real, and not everything
        assert abs(diverging.mean() - p) < 4.5 * math.sqrt(p * (1 - p) / diverging.size)
    # structural, for both: the overflow region is rejected, the rest is not, so the chains keep moving
    assert 0 < diverging.mean() < 1
    assert float(idata.sample_stats["accept_prob"].values.max()) > 0


# ----------------------------------------------------------------------------------------------
# reproducibility and dtypes


def normal_model():
    loc = pyro.sample("loc", dist.Normal(0.0, 2.0))
    pyro.sample("obs", dist.Normal(loc, 1.0), obs=torch.tensor([0.3, 0.9]))


@pytest.mark.statistical
@pytest.mark.parametrize("num_chains", [1, 2])
def test_kernel_runs_are_bit_identical_with_the_same_seed(num_chains):
    def draws(seed):
        pyro.set_rng_seed(seed)
        mcmc = MCMC(
            NFMALA(normal_model, flow=zuko.flows.RealNVP(1)),
            num_samples=50,
            warmup_steps=30,
            num_chains=num_chains,
            disable_progbar=True,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            mcmc.run()
        return mcmc.get_samples(group_by_chain=True)["loc"]

    first, second, other = draws(0), draws(0), draws(1)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_and_float64_flows_with_a_float32_model(dtype):
    pyro.set_rng_seed(3)
    flow = zuko.flows.RealNVP(1).to(dtype)
    mcmc = MCMC(NFMALA(normal_model, flow=flow), num_samples=100, warmup_steps=50, disable_progbar=True)
    mcmc.run()
    loc = mcmc.get_samples()["loc"]
    assert torch.isfinite(loc).all() and loc.shape == (100,)
    idata = to_inference_data(mcmc)
    assert float(idata.sample_stats["accept_prob"].mean()) > 0.3


def test_flow_and_target_on_different_devices_is_a_clear_error():
    # No GPU here: data on the "meta" device stands for data on another device than the flow;
    # torch raises the same kind of error ("... not on the expected device ...") as for cuda/cpu.
    data = torch.ones(1, device="meta")

    def potential(params):
        return ((params["x"] - data) ** 2).sum()

    kernel = NFMALA(potential_fn=potential, flow=zuko.flows.RealNVP(1), initial_params={"x": torch.zeros(1)})
    with pytest.raises(ValueError, match="the flow is on cpu but the target computes on another device"):
        MCMC(kernel, num_samples=2, warmup_steps=2, disable_progbar=True).run()

    target = PosteriorPullback(LatentFlow(zuko.flows.RealNVP(1)), lambda x: -((x - data) ** 2).sum(-1), 1)
    with pytest.raises(ValueError, match="flow.to\\(device\\)"):
        ChainSampler(target, 4)


def test_a_scale_that_underflows_to_zero_is_a_rejection_not_a_crash():
    """Deep in a funnel a scale exp(u) reaches 0 and a distribution's argument check raises ValueError
    (outside Pyro's MCMC, which turns validation off): a numerical failure, rejected and counted."""

    def log_prob(x):
        u = x[..., 0]
        scale = u.exp()
        return dist.Normal(0.0, 3.0).log_prob(u) + dist.Normal(0.0, scale, validate_args=True).log_prob(
            torch.full_like(u, 0.1)
        )

    target = PosteriorPullback(identity_flow(1), log_prob)
    # steps of 20,000: proposals far into the neck (u < -104), where exp(u) underflows to 0 in float32
    sampler = ChainSampler(target, 8, step_size=20000.0, mass_matrix=None, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        state = sampler.advance(5, progress=False)
    assert torch.isfinite(state.x).all()
    assert sampler.num_errors > 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_the_data_is_a_clear_error_naming_the_argument(bad):
    """Pyro's "cannot find valid initial params" is explained: the data, which argument, how many."""

    def model(y, scale=1.0):
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(loc, scale).expand([len(y)]).to_event(1), obs=y)

    y = torch.randn(10)
    y[3] = bad
    with pytest.raises(ValueError, match=r"NaN or infinite values \(argument 0: 1 of 10 values\)"):
        MCMC(NFMALA(model), num_samples=5, warmup_steps=5, disable_progbar=True).run(y)
    with pytest.raises(ValueError, match=r"'y': 1 of 10 values"):
        MCMC(NFMALA(model), num_samples=5, warmup_steps=5, disable_progbar=True).run(y=y)


def improper():
    mu = pyro.sample("mu", dist.ImproperUniform(dist.constraints.real, (), ()))
    scale = pyro.sample("scale", dist.HalfNormal(1.0))
    pyro.sample("y", dist.Normal(0.0, scale), obs=torch.tensor(0.5))
    return mu


def test_an_improper_flat_posterior_is_a_clear_error_naming_the_site():
    """A flat prior that nothing involves: torch's "element 0 of tensors does not require grad" (or "The
    differentiated Tensor ... appears to not have been used in the graph") from inside Pyro was the answer."""
    with pytest.raises(ValueError, match=r"does not depend on the latent site\(s\) \['mu'\].*improper"):
        MCMC(NFMALA(improper), num_samples=5, warmup_steps=5, disable_progbar=True).run()

    def flat():
        pyro.sample("x", dist.ImproperUniform(dist.constraints.real, (), ()))

    with pytest.raises(ValueError, match=r"\['x'\].*improper"):
        ChainSampler.from_model(flat, fit_options={"progress": False})


def test_a_potential_that_returns_a_python_float_warns_and_samples_with_a_zero_gradient():
    """torch's "element 0 of tensors does not require grad" was the answer; now a warning that says what
    happened and what to do, and the chain (a random walk then, still exact) runs."""

    def potential_fn(params):
        return float(0.5 * params["loc"].square().sum())

    kernel = NFMALA(potential_fn=potential_fn, flow=identity_flow(1), initial_params={"loc": torch.zeros(1)})
    with pytest.warns(RuntimeWarning, match="has no gradient"):
        MCMC(kernel, num_samples=20, warmup_steps=20, disable_progbar=True).run()
