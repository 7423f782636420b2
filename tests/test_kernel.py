"""NFMALA through Pyro's MCMC: exact posteriors, chains in sequence and in parallel, ArviZ,
divergences, and clear errors for bad input."""

import math

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import zuko

from pyro.infer import MCMC
from pyro.ops.stats import effective_sample_size

from pyro_nfmala import NFMALA, identity_flow, to_inference_data

# ----------------------------------------------------------------------------------------------
# models (module level, so that worker processes can find them)

PRIOR_SCALE = 10.0
DATA = torch.tensor(
    [2.7, 3.9, 3.1, 1.6, 2.2, 3.5, 4.4, 2.9, 3.3, 2.5, 3.0, 3.8, 1.9, 2.6, 3.6, 4.1, 2.4, 3.2, 2.8, 3.4]
)


def normal_normal(data):
    loc = pyro.sample("loc", dist.Normal(0.0, PRIOR_SCALE))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=data)


def normal_normal_posterior(data):
    precision = 1 / PRIOR_SCALE**2 + len(data)
    return float(data.sum() / precision), 1 / math.sqrt(precision)


def beta_bernoulli(flips):
    p = pyro.sample("p", dist.Beta(2.0, 2.0))
    with pyro.plate("flips", len(flips)):
        pyro.sample("obs", dist.Bernoulli(p), obs=flips)


FLIPS = torch.tensor([1.0] * 20 + [0.0] * 10)

PRECISION = torch.tensor([[2.0, 1.2], [1.2, 1.0]])  # a correlated Gaussian, covariance PRECISION^-1


def gaussian_potential(params):
    x = params["x"]
    return 0.5 * x @ PRECISION @ x


def potential_with_a_hole(params):
    """Standard normal, with NaN energy to the right of 1.0: proposals there must be rejected."""
    x = params["x"]
    energy = 0.5 * x.square().sum()
    return torch.where(x[0] > 1.0, torch.full_like(energy, float("nan")), energy)


def run(kernel, *args, num_samples=500, warmup_steps=300, num_chains=1, **kwargs):
    mcmc = MCMC(
        kernel,
        num_samples=num_samples,
        warmup_steps=warmup_steps,
        num_chains=num_chains,
        disable_progbar=True,
        **kwargs,
    )
    mcmc.run(*args)
    return mcmc


def assert_moments(draws, mean, sd, label=""):
    """Mean and sd within 4.5 standard errors, the errors from the chain's effective sample size."""
    draws = draws.reshape(-1, draws.shape[-1]) if draws.dim() > 2 else draws
    ess = float(
        effective_sample_size(draws.reshape(1, -1, 1).double() if draws.dim() == 1 else draws.double()).min()
    )
    assert ess > 50, f"{label}: too few effective samples ({ess:.0f})"
    assert abs(float(draws.mean()) - mean) < 4.5 * sd / math.sqrt(ess), (
        f"{label}: mean {float(draws.mean()):.4f} vs {mean:.4f}, ESS {ess:.0f}"
    )
    assert abs(float(draws.std()) / sd - 1) < 4.5 * math.sqrt(0.5 / ess) + 0.02, (
        f"{label}: sd {float(draws.std()):.4f} vs {sd:.4f}"
    )


# ----------------------------------------------------------------------------------------------
# exact posteriors end to end


@pytest.mark.statistical
@pytest.mark.parametrize("preconditioner", ["identity", "jacobian", "data_space"])
def test_normal_normal_posterior(preconditioner):
    pyro.set_rng_seed(0)
    # an untrained flow fails the flow check, so "auto" would take Hamiltonian moves: MALA's adaptation
    # is what this test checks
    flow = zuko.flows.RealNVP(1, transforms=2)
    kernel = NFMALA(normal_normal, flow=flow, preconditioner=preconditioner, local_move="mala")
    mcmc = run(kernel, DATA, num_samples=600)
    mean, sd = normal_normal_posterior(DATA)
    assert_moments(mcmc.get_samples()["loc"], mean, sd, preconditioner)
    # Dual averaging aims at 0.574 but fixes the *averaged* iterate, whose acceptance is only near
    # the target: this band checks that adaptation reached the right regime (not 0.05 or 0.99).
    accept = mcmc.diagnostics()["acceptance rate"]["chain 0"]
    assert 0.35 < accept < 0.85
    # the adapted step size is exposed as HMC's is, and it is the one every draw used
    step_sizes = mcmc.diagnostics()["sample_stats"]["chain 0"]["step_size"]
    assert kernel.step_size == step_sizes[0] == step_sizes[-1] and kernel.step_size > 0


@pytest.mark.statistical
def test_beta_bernoulli_constrained_site():
    pyro.set_rng_seed(1)
    mcmc = run(NFMALA(beta_bernoulli, flow=zuko.flows.RealNVP(1, transforms=2)), FLIPS, num_samples=800)
    p = mcmc.get_samples()["p"]
    assert torch.all((p > 0) & (p < 1))  # constrained space
    a, b = 2.0 + 20, 2.0 + 10
    mean, sd = a / (a + b), math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
    assert_moments(p, mean, sd, "beta-bernoulli")


def fitted_gaussian_flow():
    """A RealNVP fitted by maximum likelihood to draws of the correlated Gaussian: it whitens it."""
    flow = zuko.flows.RealNVP(2, transforms=2)
    gaussian = dist.MultivariateNormal(torch.zeros(2), precision_matrix=PRECISION)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(200):
        loss = -flow().log_prob(gaussian.sample((256,))).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return flow


@pytest.mark.statistical
def test_potential_fn_target():
    pyro.set_rng_seed(2)
    kernel = NFMALA(
        potential_fn=gaussian_potential, flow=fitted_gaussian_flow(), initial_params={"x": torch.zeros(2)}
    )
    mcmc = run(kernel, num_samples=800)
    x = mcmc.get_samples()["x"]
    covariance = torch.linalg.inv(PRECISION)
    for i in range(2):
        assert_moments(x[:, i], 0.0, float(covariance[i, i].sqrt()), f"x[{i}]")


def test_user_initial_params_are_honoured():
    pyro.set_rng_seed(3)
    start = {"x": torch.tensor([4.0, -4.0])}
    kernel = NFMALA(
        potential_fn=gaussian_potential,
        flow=zuko.flows.RealNVP(2),
        initial_params=start,
        step_size=1e-3,
        adapt_step_size=False,
    )
    kernel.setup(0)
    assert torch.allclose(kernel.initial_params["x"], start["x"], atol=1e-5)


# ----------------------------------------------------------------------------------------------
# chains: sequential (one kernel object) and parallel (worker processes)


def test_sequential_chains_do_not_leak_state():
    pyro.set_rng_seed(4)
    kernel = NFMALA(normal_normal, flow=zuko.flows.RealNVP(1, transforms=2))
    starts = []
    setup = kernel.setup

    def recording_setup(*args, **kwargs):
        setup(*args, **kwargs)
        starts.append(kernel.initial_params["loc"].clone())

    kernel.setup = recording_setup
    mcmc = run(kernel, DATA, num_samples=100, warmup_steps=100, num_chains=2)
    loc = mcmc.get_samples(group_by_chain=True)["loc"]
    assert loc.shape == (2, 100)
    assert len(starts) == 2 and not torch.equal(starts[1], loc[0, -1])  # chain 1 starts afresh
    for chain in mcmc.diagnostics()["sample_stats"].values():
        assert len(chain["accept_prob"]) == 100  # per-chain records, not accumulated
    assert kernel.initial_params is None  # the start it chose itself is forgotten

    # the first chain of a two-chain run is the same as a one-chain run with the same seed
    pyro.set_rng_seed(4)
    single = run(
        NFMALA(normal_normal, flow=zuko.flows.RealNVP(1, transforms=2)),
        DATA,
        num_samples=100,
        warmup_steps=100,
    )
    assert torch.equal(single.get_samples()["loc"], loc[0])


@pytest.mark.statistical
def test_parallel_chains(monkeypatch):
    import pyro.infer.mcmc.api as api

    monkeypatch.setattr(api.mp, "cpu_count", lambda: 4)
    pyro.set_rng_seed(5)
    kernel = NFMALA(normal_normal, flow=zuko.flows.RealNVP(1, transforms=2))
    mcmc = run(kernel, DATA, num_samples=150, warmup_steps=150, num_chains=2, mp_context="fork")
    assert isinstance(mcmc.sampler, api._MultiSampler)
    loc = mcmc.get_samples(group_by_chain=True)["loc"]
    assert loc.shape == (2, 150)
    assert not torch.equal(loc[0], loc[1])
    idata = to_inference_data(mcmc)
    assert idata.sample_stats["accept_prob"].shape == (2, 150)
    mean, sd = normal_normal_posterior(DATA)
    ess = float(effective_sample_size(loc.unsqueeze(-1).double()))
    assert abs(float(loc.mean()) - mean) < 4.5 * sd / math.sqrt(ess)


# ----------------------------------------------------------------------------------------------
# ArviZ


@pytest.mark.statistical
def test_arviz_from_pyro_and_our_inference_data():
    pyro.set_rng_seed(6)
    mcmc = run(
        NFMALA(beta_bernoulli, flow=zuko.flows.RealNVP(1)),
        FLIPS,
        num_samples=120,
        warmup_steps=100,
        num_chains=3,
    )
    ours = to_inference_data(mcmc)
    for name in ("accept_prob", "step_size", "diverging", "lp"):
        assert ours.sample_stats[name].shape == (3, 120)
    assert ours.posterior["p"].shape == (3, 120)
    assert (
        float(ours.sample_stats["accept_prob"].min()) >= 0
        and float(ours.sample_stats["accept_prob"].max()) <= 1
    )
    # the step size is fixed after warmup, one per chain
    step = ours.sample_stats["step_size"].values
    assert (step == step[:, :1]).all()
    # lp is minus Pyro's potential energy of the draw (in unconstrained space)
    unconstrained = torch.logit(torch.as_tensor(ours.posterior["p"].values[0, :5]))
    pyro_lp = [
        float(-pyro.infer.mcmc.util.initialize_model(beta_bernoulli, (FLIPS,))[1]({"p": u}))
        for u in unconstrained
    ]
    ours_lp = torch.as_tensor(ours.sample_stats["lp"].values[0, :5], dtype=torch.float64)
    assert torch.allclose(torch.tensor(pyro_lp, dtype=torch.float64), ours_lp, atol=1e-4)
    summary = az.summary(ours)
    assert "p" in summary.index

    if hasattr(az, "from_pyro"):  # ArviZ 0.x; 1.x has no Pyro converter (our own output is the way there)
        theirs = az.from_pyro(mcmc, log_likelihood=False)
        assert theirs.posterior["p"].shape == (3, 120)
        assert theirs.sample_stats["diverging"].shape == (3, 120)


def test_to_inference_data_needs_a_finished_run():
    mcmc = MCMC(NFMALA(beta_bernoulli, flow=zuko.flows.RealNVP(1)), num_samples=10)
    with pytest.raises(ValueError, match="finished MCMC run"):
        to_inference_data(mcmc)


# ----------------------------------------------------------------------------------------------
# NaN during sampling


@pytest.mark.statistical
def test_nan_potential_is_rejected_counted_and_reported():
    pyro.set_rng_seed(7)
    kernel = NFMALA(
        potential_fn=potential_with_a_hole, flow=zuko.flows.RealNVP(2), initial_params={"x": torch.zeros(2)}
    )
    with pytest.warns(RuntimeWarning, match="divergent"):
        mcmc = run(kernel, num_samples=400, warmup_steps=200)
    x = mcmc.get_samples()["x"]
    assert torch.isfinite(x).all()
    assert torch.all(x[:, 0] <= 1.0)
    divergences = mcmc.diagnostics()["divergences"]["chain 0"]
    assert len(divergences) > 0
    idata = to_inference_data(mcmc)
    assert int(idata.sample_stats["diverging"].sum()) == len(divergences)
    assert float(idata.sample_stats["accept_prob"].values[0, divergences].max()) == 0.0


# ----------------------------------------------------------------------------------------------
# bad input: clear errors naming the problem


def flow1():
    return zuko.flows.RealNVP(1)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(flow=None), ValueError, "exactly one of model or potential_fn"),
        (
            dict(model=normal_normal, potential_fn=gaussian_potential, flow=None),
            ValueError,
            "exactly one of model or potential_fn",
        ),
        (dict(model=normal_normal, flow=torch.nn.Linear(1, 1)), ValueError, "Linear, read as a callable"),
        (dict(model=normal_normal, flow=zuko.flows.NSF(1, context=2)), ValueError, "context"),
        (dict(model=normal_normal, step_size=0.0), ValueError, "step_size"),
        (dict(model=normal_normal, step_size=-0.1), ValueError, "step_size"),
        (dict(model=normal_normal, step_size=float("nan")), ValueError, "step_size"),
        (dict(model=normal_normal, target_accept_prob=0.0), ValueError, "target_accept_prob"),
        (dict(model=normal_normal, target_accept_prob=1.2), ValueError, "target_accept_prob"),
        (dict(model=normal_normal, preconditioner="newton"), ValueError, "unknown preconditioner 'newton'"),
        (dict(model=normal_normal, beta=-1.0), ValueError, "beta"),
        (
            dict(potential_fn=gaussian_potential, initial_params={"x": torch.zeros(2)}),
            ValueError,
            "dimension 1 .* dimension 2",
        ),
    ],
)
def test_bad_arguments(kwargs, error, match):
    kwargs.setdefault("flow", flow1())
    if kwargs["flow"] is None:
        kwargs["flow"] = flow1()
    with pytest.raises(error, match=match):
        NFMALA(**kwargs)


def test_flow_of_the_wrong_dimension_for_the_model():
    kernel = NFMALA(normal_normal, flow=zuko.flows.RealNVP(3))
    with pytest.raises(
        ValueError, match="flow has dimension 3 but the model's unconstrained parameters have dimension 1"
    ):
        run(kernel, DATA, num_samples=5, warmup_steps=5)


MIXTURE_DATA = torch.tensor([-0.3, 0.4, 2.2, 0.1, 1.9, -0.8, 0.6, 2.5, 0.0, 0.3])


def mixture_with_enumerable_site(y):
    """loc ~ N(0, 3); each y_i ~ N(loc + 2 z_i, 1) with z_i ~ Bernoulli(0.3) latent: z is summed out."""
    loc = pyro.sample("loc", dist.Normal(0.0, 3.0))
    with pyro.plate("data", len(y)):
        z = pyro.sample("z", dist.Bernoulli(0.3))
        pyro.sample("y", dist.Normal(loc + 2.0 * z, 1.0), obs=y)


@pytest.mark.statistical
def test_enumerable_discrete_sites_are_summed_out():
    """NFMALA samples loc with z summed out of the potential, as Pyro's NUTS does: its moments match
    the marginal posterior's, computed by quadrature on a grid."""
    grid = torch.linspace(-6.0, 8.0, 20001, dtype=torch.float64)
    y = MIXTURE_DATA.double()
    mixture = torch.logsumexp(
        torch.stack(
            [
                math.log(0.7) + dist.Normal(grid[:, None], 1.0).log_prob(y),
                math.log(0.3) + dist.Normal(grid[:, None] + 2.0, 1.0).log_prob(y),
            ]
        ),
        dim=0,
    ).sum(-1)
    weights = torch.softmax(dist.Normal(0.0, 3.0).log_prob(grid) + mixture, 0)
    mean = float((weights * grid).sum())
    sd = float((weights * (grid - mean) ** 2).sum().sqrt())
    pyro.set_rng_seed(8)
    mcmc = run(NFMALA(mixture_with_enumerable_site, flow=identity_flow(1)), MIXTURE_DATA, num_samples=1500)
    samples = mcmc.get_samples()
    assert set(samples) == {"loc"}
    assert_moments(samples["loc"], mean, sd, "enumerated mixture")


def poisson_latent():
    n = pyro.sample("n", dist.Poisson(3.0))
    pyro.sample("x", dist.Normal(n, 1.0), obs=torch.tensor(2.0))


def test_discrete_sites_that_cannot_be_enumerated_are_refused():
    kernel = NFMALA(poisson_latent, flow=zuko.flows.RealNVP(1))
    with pytest.raises(ValueError, match=r"discrete latent sites \['n'\] with an infinite support"):
        run(kernel, num_samples=5, warmup_steps=5)


def test_potential_fn_needs_initial_params_by_setup():
    kernel = NFMALA(
        potential_fn=gaussian_potential, flow=zuko.flows.RealNVP(2)
    )  # Pyro's pattern: given to MCMC
    with pytest.raises(ValueError, match="potential_fn needs initial parameters"):
        run(kernel, num_samples=5, warmup_steps=5)


@pytest.mark.parametrize("step_size", [np.float32(0.1), np.float64(0.1), torch.tensor(0.1), 1])
def test_step_size_may_be_any_real_scalar(step_size):
    kernel = NFMALA(normal_normal, flow=zuko.flows.RealNVP(1), step_size=step_size, adapt_step_size=False)
    mcmc = run(kernel, DATA, num_samples=5, warmup_steps=0)
    assert mcmc.diagnostics()["sample_stats"]["chain 0"]["step_size"][0] == pytest.approx(
        float(step_size), rel=1e-6
    )


@pytest.mark.parametrize("step_size", [True, "0.1", torch.ones(2), complex(1, 1)])
def test_step_size_that_is_not_a_real_scalar_is_refused(step_size):
    with pytest.raises(ValueError, match="step_size"):
        NFMALA(normal_normal, flow=flow1(), step_size=step_size)


def test_initial_params_of_the_wrong_shape_are_refused():
    kernel = NFMALA(normal_normal, flow=flow1(), initial_params={"loc": torch.zeros(1, 1)})
    with pytest.raises(
        ValueError, match=r"initial_params\['loc'\] must have the site's unconstrained shape \(\)"
    ):
        run(kernel, DATA, num_samples=5, warmup_steps=5)
    two_sites = NFMALA(
        dirichlet_like,
        flow=zuko.flows.RealNVP(3),
        initial_params={"loc": torch.zeros(1, 2), "scale": torch.tensor(0.0)},
    )
    with pytest.raises(
        ValueError,
        match=r"initial_params\['loc'\] must have the site's unconstrained shape \(2,\), got \(1, 2\)",
    ):
        run(two_sites, num_samples=5, warmup_steps=5)
    missing = NFMALA(dirichlet_like, flow=zuko.flows.RealNVP(3), initial_params={"loc": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"missing \['scale'\]"):
        run(missing, num_samples=5, warmup_steps=5)


def dirichlet_like():
    pyro.sample("loc", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    pyro.sample("scale", dist.LogNormal(0.0, 1.0))
