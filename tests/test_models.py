"""Pyro models end to end: vectorized model densities, flows fitted to models, simplex and
positive sites against closed forms, eight schools against posteriordb, NeuTra, bad models."""

import math
import time
import warnings

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro.infer import MCMC, config_enumerate
from pyro.infer.autoguide.initialization import init_to_value
from pyro.ops.stats import effective_sample_size

import pyro_nfmala

from pyro_nfmala import (
    NFMALA,
    default_flow,
    fit_flow_to_model,
    from_arrays,
    identity_flow,
    load_flow,
    save_flow,
)
from pyro_nfmala.examples.baselines import neutra_nuts
from pyro_nfmala.examples.posteriordb import (
    eight_schools_centered,
    eight_schools_data,
    eight_schools_noncentered,
    load_data,
    load_reference,
    low_dim_gauss_mix,
    reference_names,
    standardized_errors,
)
from pyro_nfmala.flows.staged import StagedFlow
from pyro_nfmala.model.density import model_density

# ----------------------------------------------------------------------------------------------
# models with closed-form posteriors (module level, so that worker processes can find them)

ALPHA = torch.tensor([1.0, 2.0, 3.0])
COUNTS = torch.tensor([5.0, 3.0, 8.0])
RATE_PRIOR = (2.0, 1.0)  # Gamma(shape, rate)
EVENTS = torch.tensor([3.0, 5.0, 4.0, 6.0])


def dirichlet_gamma(counts, events):
    """A simplex site (Dirichlet-multinomial) and a positive site (Gamma-Poisson), both conjugate."""
    probs = pyro.sample("probs", dist.Dirichlet(ALPHA))
    rate = pyro.sample("rate", dist.Gamma(*RATE_PRIOR))
    pyro.sample("counts", dist.Multinomial(int(counts.sum()), probs), obs=counts)
    with pyro.plate("intervals", len(events)):
        pyro.sample("events", dist.Poisson(rate), obs=events)


def dirichlet_gamma_moments() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Exact posterior means and sds: Dirichlet(alpha + counts), Gamma(a + sum y, b + n)."""
    alpha = ALPHA + COUNTS
    total = alpha.sum()
    probs_mean = alpha / total
    probs_sd = (alpha * (total - alpha) / (total**2 * (total + 1))).sqrt()
    shape, rate = RATE_PRIOR[0] + EVENTS.sum(), RATE_PRIOR[1] + len(EVENTS)
    return {"probs": (probs_mean, probs_sd), "rate": (shape / rate, shape.sqrt() / rate)}


def dynamic_support():
    """The number of latent sites depends on a latent value: no fixed unconstrained dimension."""
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    if a > 0:
        pyro.sample("b", dist.Normal(0.0, 1.0))


def assert_mean_and_sd(
    draws: torch.Tensor, mean: float, sd: float, label: str, ref_draws=None, check_sd: bool = True
) -> None:
    """Mean within 4.5 standard errors and (if ``check_sd``) sd within 4.5 relative errors, both from the ESS.

    ``draws`` is ``(chains, draws)``; with ``ref_draws`` (reference chains) their Monte Carlo
    error is added to the tolerance.
    """
    draws = draws.double()
    ess = float(effective_sample_size(draws.unsqueeze(-1)))
    assert ess > 50, f"{label}: too few effective samples ({ess:.0f})"
    mean_var, sd_rel_var = sd**2 / ess, 0.5 / ess
    if ref_draws is not None:
        ref_ess = float(effective_sample_size(torch.as_tensor(ref_draws).double().unsqueeze(-1)))
        mean_var, sd_rel_var = mean_var + sd**2 / ref_ess, sd_rel_var + 0.5 / ref_ess
    got_mean, got_sd = float(draws.mean()), float(draws.std())
    assert abs(got_mean - mean) < 4.5 * math.sqrt(mean_var), (
        f"{label}: mean {got_mean:.4f} vs {mean:.4f}, ESS {ess:.0f}"
    )
    if check_sd:
        assert abs(got_sd / sd - 1) < 4.5 * math.sqrt(sd_rel_var), (
            f"{label}: sd {got_sd:.4f} vs {sd:.4f}, ESS {ess:.0f}"
        )


def assert_mean(draws: torch.Tensor, ref_draws: np.ndarray, label: str) -> None:
    """Mean within 4.5 standard errors of the reference mean, both chains' ESS counted."""
    assert_mean_and_sd(
        draws, float(ref_draws.mean()), float(ref_draws.std()), label, ref_draws=ref_draws, check_sd=False
    )


# ----------------------------------------------------------------------------------------------
# the model density, vectorized


@pytest.mark.parametrize(
    "model, data",
    [
        (eight_schools_centered, eight_schools_data),
        pytest.param(
            low_dim_gauss_mix, lambda: load_data("low_dim_gauss_mix"), marks=pytest.mark.posteriordb
        ),
        (dirichlet_gamma, lambda: {"counts": COUNTS, "events": EVENTS}),
    ],
    ids=["eight_schools", "low_dim_gauss_mix", "dirichlet_gamma"],
)
def test_vectorized_density_equals_pyro_potential_point_by_point(model, data):
    kwargs = data()
    density = model_density(model, model_kwargs=kwargs)
    assert density.vectorized
    x = torch.randn(7, density.layout.dim)
    expected = torch.stack([-density.potential_fn(density.layout.unpack(row)) for row in x])
    torch.testing.assert_close(density.log_prob(x), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        density.log_prob(x.reshape(7, 1, -1)), expected.reshape(7, 1), rtol=1e-5, atol=1e-4
    )


def test_model_that_does_not_vectorize_falls_back_to_point_by_point():
    def scalar_only():
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(loc.item(), 1.0), obs=torch.tensor(0.5))  # .item(): not batchable

    density = model_density(scalar_only)
    x = torch.linspace(-1, 1, 5).unsqueeze(-1)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(x[:, 0]) + torch.distributions.Normal(
        x[:, 0], 1.0
    ).log_prob(torch.tensor(0.5))
    assert not density.vectorized
    torch.testing.assert_close(density.log_prob(x), expected)


def test_ordered_normal_is_a_normalized_density_on_the_ordered_cone():
    from pyro_nfmala.examples.posteriordb import OrderedNormal

    ordered = OrderedNormal(0.0, 2.0, 2)
    grid = torch.linspace(-12, 12, 801)
    a, b = torch.meshgrid(grid, grid, indexing="ij")
    points = torch.stack([a, b], -1)
    density = ordered.log_prob(points).exp() * ((a < b) + 0.5 * (a == b))  # half weight on the diagonal
    mass = float(torch.trapezoid(torch.trapezoid(density, grid), grid))
    assert abs(mass - 1) < 1e-3
    draws = ordered.sample((1000,))
    assert bool((draws[:, 0] <= draws[:, 1]).all())


# ----------------------------------------------------------------------------------------------
# flows fitted to models, end to end


@pytest.fixture(scope="module")
def dirichlet_gamma_flow():
    pyro.set_rng_seed(3)
    return fit_flow_to_model(
        dirichlet_gamma,
        model_kwargs={"counts": COUNTS, "events": EVENTS},
        num_steps=300,
        num_particles=32,
        progress=False,
    )


@pytest.mark.statistical
@pytest.mark.parametrize(
    "preconditioner, num_samples",
    # the jacobian step is a data-space Langevin step: it needs longer chains on a simplex
    [("identity", 800), pytest.param("jacobian", 3000, marks=pytest.mark.slow)],
)
def test_simplex_and_positive_sites_match_the_closed_form(dirichlet_gamma_flow, preconditioner, num_samples):
    pyro.set_rng_seed(4)
    kernel = NFMALA(dirichlet_gamma, flow=dirichlet_gamma_flow.flow, preconditioner=preconditioner)
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=300, disable_progbar=True)
    mcmc.run(COUNTS, EVENTS)
    samples = mcmc.get_samples(group_by_chain=True)
    assert samples["probs"].shape == (1, num_samples, 3) and samples["rate"].shape == (1, num_samples)
    torch.testing.assert_close(samples["probs"].sum(-1), torch.ones(1, num_samples))  # on the simplex
    assert bool((samples["rate"] > 0).all())
    moments = dirichlet_gamma_moments()
    for k in range(3):
        mean, sd = moments["probs"]
        assert_mean_and_sd(samples["probs"][..., k], float(mean[k]), float(sd[k]), f"probs[{k}]")
    mean, sd = moments["rate"]
    assert_mean_and_sd(samples["rate"], float(mean), float(sd), "rate")


def test_fitted_flow_round_trips_through_save_and_load(dirichlet_gamma_flow, tmp_path):
    path = tmp_path / "flow.pt"
    save_flow(dirichlet_gamma_flow.flow, path, model="dirichlet_gamma")
    flow, metadata = load_flow(path, with_metadata=True)
    assert metadata["model"] == "dirichlet_gamma"
    z = torch.randn(16, 3)
    torch.testing.assert_close(flow().transform.inv(z), dirichlet_gamma_flow.flow().transform.inv(z))
    kernel = NFMALA(dirichlet_gamma, flow=flow)
    MCMC(kernel, num_samples=5, warmup_steps=5, disable_progbar=True).run(COUNTS, EVENTS)


def test_the_staged_fit_keeps_the_cheapest_map_that_passes_the_check(dirichlet_gamma_flow):
    """Dirichlet-Gamma is close to Gaussian in the unconstrained space: the Laplace stage passes (its
    importance ESS is over 80% of the check's draws)."""
    assert dirichlet_gamma_flow.stage == "laplace" and dirichlet_gamma_flow.check.serviceable
    assert dirichlet_gamma_flow.losses == [] and dirichlet_gamma_flow.seconds > 0


@pytest.mark.statistical
def test_a_given_flow_is_fitted_in_front_of_the_gaussian_stage_until_its_loss_settles():
    pyro.set_rng_seed(3)
    fit = fit_flow_to_model(
        dirichlet_gamma,
        model_kwargs={"counts": COUNTS, "events": EVENTS},
        flow=default_flow(3, kind="affine", transforms=2),
        num_steps=3000,
        num_particles=32,
        progress=False,
    )
    losses = np.asarray(fit.losses)
    assert fit.stage == "flow" and isinstance(fit.flow, StagedFlow)
    assert 200 <= len(losses) < 3000 and np.isfinite(losses).all()  # stopped when settled
    assert losses[-50:].mean() <= losses[:50].mean()


def run_eight_schools(num_samples: int, num_chains: int, seed: int, **nfmala):
    """Runs NFMALA on the centred eight schools through our MCMC (the chains as one batch, the map fitted
    once); returns Stan-named draws and the reference."""
    data = eight_schools_data()
    pyro.set_rng_seed(seed)
    mcmc = pyro_nfmala.MCMC(
        NFMALA(eight_schools_centered, **nfmala),
        num_samples=num_samples,
        warmup_steps=400,
        num_chains=num_chains,
        disable_progbar=True,
    )
    mcmc.run(**data)
    samples = {name: value.numpy() for name, value in mcmc.get_samples(group_by_chain=True).items()}
    flat = reference_names(samples)
    flat["log tau"] = np.log(flat["tau"])  # tau is heavy-tailed: its log has well-behaved moments
    reference = load_reference("eight_schools")
    reference["log tau"] = np.log(reference["tau"])
    return samples, flat, reference


@pytest.mark.statistical
@pytest.mark.posteriordb
def test_eight_schools_means_match_the_posteriordb_reference():
    """The one-line NFMALA (staged map fitted at setup, two chains) on the non-centred eight schools:
    posterior means agree with posteriordb's reference draws within ESS-based tolerances.

    The centred model has the same posterior but a funnel in its coordinates, whose neck a flow
    fitted by reverse KL misses; it is the slow test below, and a row of benchmarks/posteriordb.py.
    """
    data = eight_schools_data()
    pyro.set_rng_seed(5)
    kernel = NFMALA(eight_schools_noncentered, fit_options={"progress": False})
    mcmc = MCMC(kernel, num_samples=1000, warmup_steps=400, num_chains=2, disable_progbar=True)
    mcmc.run(**data)
    samples = mcmc.get_samples(group_by_chain=True)
    theta = samples["mu"][..., None] + samples["tau"][..., None] * samples["theta_trans"]
    flat = reference_names(
        {"mu": samples["mu"].numpy(), "tau": samples["tau"].numpy(), "theta": theta.numpy()}
    )
    flat["log tau"] = np.log(flat["tau"])
    reference = load_reference("eight_schools")
    reference["log tau"] = np.log(reference["tau"])
    for name in ["mu", "log tau", "theta[1]", "theta[3]", "theta[8]"]:
        assert_mean(torch.as_tensor(flat[name]), reference[name], name)


@pytest.mark.slow
@pytest.mark.posteriordb
def test_eight_schools_matches_the_posteriordb_reference_in_mean_and_sd():
    """The long version, on the centred model as posteriordb writes it: the one line (the staged map in
    the coordinates it chooses, non-centred here), 4 chains as one batch; every mean and every sd, log
    tau's included (the funnel's neck: 1% of the reference mass lies below log tau = -3.2), and R-hat."""
    samples, flat, reference = run_eight_schools(num_samples=1000, num_chains=4, seed=5)
    for name, ref in reference.items():
        assert_mean_and_sd(
            torch.as_tensor(flat[name]), float(ref.mean()), float(ref.std()), name, ref_draws=ref
        )
    rhat = {
        name: float(np.max(np.asarray(az.rhat(from_arrays({"x": flat[name]}))["x"])))
        for name in ["mu", "log tau"]
    }
    assert max(rhat.values()) <= 1.01, rhat
    # Beyond the ESS-based checks above: the accuracy the tutorial states for this run, in reference
    # sd units (a documented claim, not a statistical tolerance).
    errors = standardized_errors(samples, {k: v for k, v in reference.items() if k != "log tau"})
    assert max(abs(e["mean_error"]) for e in errors.values()) < 0.15


@pytest.mark.slow
@pytest.mark.posteriordb
def test_a_flow_fitted_in_the_funnels_own_coordinates_says_the_run_may_be_wrong():
    """The user's own flow, fitted to the centred model in its coordinates (a funnel whose neck a map
    misses), cannot be non-centred by the sampler: the run must say that it may be wrong, and what to do.
    (4 chains of 1,000 draws through this map: R-hat of log tau 1.05, the sd of log tau about 25% low.)"""
    data = eight_schools_data()
    pyro.set_rng_seed(5)
    fit = fit_flow_to_model(
        eight_schools_centered, model_kwargs=data, num_steps=3000, num_particles=32, progress=False
    )
    assert not fit.check.serviceable
    with pytest.warns(RuntimeWarning, match="non-centred") as caught:
        MCMC(
            NFMALA(eight_schools_centered, flow=fit.flow),
            num_samples=200,
            warmup_steps=100,
            disable_progbar=True,
        ).run(**data)
    assert any("Pareto k-hat" in str(w.message) for w in caught)


@pytest.mark.posteriordb
def test_standardized_errors_of_the_reference_itself_are_zero():
    reference = load_reference("eight_schools")
    samples = {
        "mu": reference["mu"],
        "tau": reference["tau"],
        "theta": np.stack([reference[f"theta[{j}]"] for j in range(1, 9)], -1),
    }
    errors = standardized_errors(samples, reference)
    assert set(errors) == set(reference)
    assert all(abs(e["mean_error"]) < 1e-12 and abs(e["sd_error"]) < 1e-12 for e in errors.values())
    shifted = dict(samples, mu=samples["mu"] + reference["mu"].std())
    assert abs(standardized_errors(shifted, reference)["mu"]["mean_error"] - 1) < 1e-9
    with pytest.raises(KeyError, match="tau"):
        standardized_errors({"mu": samples["mu"]}, reference)


@pytest.mark.statistical
def test_neutra_nuts_on_the_same_flow(dirichlet_gamma_flow):
    pyro.set_rng_seed(7)
    result = neutra_nuts(
        dirichlet_gamma,
        dirichlet_gamma_flow.flow,
        model_args=(COUNTS, EVENTS),
        num_samples=200,
        warmup_steps=100,
        disable_progbar=True,
    )
    assert result.samples["probs"].shape == (1, 200, 3) and result.latent.shape == (1, 200, 3)
    mean, sd = dirichlet_gamma_moments()["rate"]
    assert_mean_and_sd(result.samples["rate"], float(mean), float(sd), "rate")
    idata = result.to_inference_data()
    assert idata.posterior["probs"].shape == (1, 200, 3)
    assert idata.sample_stats["diverging"].shape == (1, 200)


# ----------------------------------------------------------------------------------------------
# bad models


def test_dynamic_support_is_a_clear_error():
    with pytest.raises(ValueError, match="dynamic support"):
        model_density(dynamic_support)


def below_theta(reparameterized: bool = False):
    """theta ~ LogNormal(0, 0.5), y | theta ~ Uniform(0, theta), 1 ~ Normal(y, 1): y's support moves
    with theta (reparameterized: y = theta u with u ~ Uniform(0, 1), the same joint law)."""
    theta = pyro.sample("theta", dist.LogNormal(0.0, 0.5))
    if reparameterized:
        y = pyro.deterministic("y", theta * pyro.sample("u", dist.Uniform(0.0, 1.0)))
    else:
        y = pyro.sample("y", dist.Uniform(0.0, theta))
    pyro.sample("obs", dist.Normal(y, 1.0), obs=torch.tensor(1.0))


def below_theta_moments() -> tuple[float, float]:
    """theta's posterior mean and sd by quadrature: p(theta) oc LogNormal(theta) / theta *
    (Phi(theta - 1) - Phi(-1)), y integrated out."""
    theta = np.linspace(1e-4, 12.0, 200_001)
    normal_cdf = np.vectorize(lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2))))
    lognormal = np.exp(-0.5 * (np.log(theta) / 0.5) ** 2) / theta
    weight = lognormal / theta * (normal_cdf(theta - 1.0) - normal_cdf(-1.0))
    weight /= weight.sum()
    mean = float((weight * theta).sum())
    return mean, float(np.sqrt((weight * (theta - mean) ** 2).sum()))


def test_a_support_that_depends_on_another_latent_site_is_refused():
    """Uniform(0, theta) with theta latent sampled the wrong law in silence (theta's sd 0.46 for 0.60):
    Pyro's transform for y is fixed at setup. Refused, naming the site and the way out."""
    with pytest.raises(ValueError, match=r"support of latent site\(s\) 'y' .*depends on other latent"):
        model_density(below_theta)
    with pytest.raises(ValueError, match="theta \\* u"):
        MCMC(NFMALA(below_theta), num_samples=5, warmup_steps=5, disable_progbar=True).run()
    assert model_density(below_theta, (True,)).layout.dim == 2  # the way out is accepted


def below_theta_errors(model) -> tuple[float, float]:
    """theta's mean and sd errors from a plain MALA run (the law, not the fit, is under test; the
    chains start at theta = 0.5), in units of their Monte Carlo standard errors."""
    kernel = NFMALA(
        model, flow=identity_flow(2), init_strategy=init_to_value(values={"theta": torch.tensor(0.5)})
    )
    mcmc = MCMC(kernel, num_samples=1500, warmup_steps=500, num_chains=2, disable_progbar=True)
    mcmc.run()
    theta = mcmc.get_samples(group_by_chain=True)["theta"].double()
    ess = float(effective_sample_size(theta))
    mean, sd = below_theta_moments()
    # the sd's standard error with the kurtosis of theta's right tail, not the Gaussian sd / sqrt(2 ess)
    kurtosis = float(((theta - mean) ** 4).mean()) / sd**4
    return (float(theta.mean()) - mean) / (sd / math.sqrt(ess)), (float(theta.std()) - sd) / (
        sd * math.sqrt((kurtosis - 1) / (4 * ess))
    )


@pytest.mark.statistical
def test_the_reparameterized_moving_support_samples_the_right_law(monkeypatch):
    """The way out the error gives samples theta's law (quadrature); the negative control: the same
    check catches the refused model sampled anyway (the check switched off), where Pyro's transform
    for y, fixed at setup with theta = 0.5, keeps y below 0.5 whatever theta is."""
    pyro.set_rng_seed(0)
    errors = below_theta_errors(lambda: below_theta(True))
    assert max(abs(error) for error in errors) < 4, errors
    monkeypatch.setattr("pyro_nfmala.model.density._check_fixed_supports", lambda *args: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrong = below_theta_errors(below_theta)
    assert max(abs(error) for error in wrong) > 4, wrong


@config_enumerate
def continuous_after_enumerated():
    """x's prior depends on an enumerated z: under parallel enumeration x would be drawn twice."""
    z = pyro.sample("z", dist.Bernoulli(0.3))
    x = pyro.sample("x", dist.Normal(3.0 * z, 1.0))
    pyro.sample("obs", dist.Normal(x, 2.0), obs=torch.tensor(1.0))


def test_a_continuous_site_after_an_enumerated_one_is_refused_at_once():
    """The hostile pass: 462 s of fitting another model (x of shape (2,)), ending far off. Pyro's
    enumeration cannot sum z out of x's prior: refused at setup, naming both sites."""
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"'x' \(shape \(\), \(2,\) under enumeration\).*\['z'\]"):
        MCMC(NFMALA(continuous_after_enumerated), num_samples=5, warmup_steps=5, disable_progbar=True).run()
    assert time.perf_counter() - start < 30  # a check at setup, not a fit; not a timing claim


def test_flow_fitted_on_another_model_is_a_dimension_error(dirichlet_gamma_flow):
    kernel = NFMALA(eight_schools_centered, flow=dirichlet_gamma_flow.flow)
    with pytest.raises(
        ValueError, match="dimension 3 but the model's unconstrained parameters have dimension 10"
    ):
        MCMC(kernel, num_samples=5, warmup_steps=5, disable_progbar=True).run(**eight_schools_data())
    with pytest.raises(ValueError, match="dimension 3"):
        neutra_nuts(
            eight_schools_centered,
            dirichlet_gamma_flow.flow,
            model_kwargs=eight_schools_data(),
            num_samples=5,
        )


def test_unknown_posterior_name():
    with pytest.raises(ValueError, match="unknown posterior 'eight_skools'"):
        load_data("eight_skools")
