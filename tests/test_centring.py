"""Non-centring hierarchical sites: which sites, the exact map back to the model's own coordinates,
and NFMALA sampling a centred funnel right by choosing the non-centred coordinates itself."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro.infer import MCMC
from pyro.ops.stats import effective_sample_size

from pyro_nfmala import NFMALA, ChainSampler
from pyro_nfmala.examples.flow_cases import funnel
from pyro_nfmala.examples.inference_gym import AR1, brownian_motion_data, brownian_motion_unknown_scales
from pyro_nfmala.examples.posteriordb import (
    eight_schools_centered,
    eight_schools_centered_vector,
    eight_schools_data,
    reference_samples,
)
from pyro_nfmala.model.centring import NonCentring, hierarchical_sites
from pyro_nfmala.model.density import model_density


def regression(x, y):
    weight = pyro.sample("weight", dist.Normal(0.0, 1.0))
    scale = pyro.sample("scale", dist.HalfNormal(1.0))
    pyro.sample("y", dist.Normal(weight * x, scale).to_event(1), obs=y)


def positive_child():
    scale = pyro.sample("scale", dist.HalfNormal(1.0))
    pyro.sample("child", dist.LogNormal(0.0, scale))  # a transformed law whose base is Normal(0, scale)


def log_normal_hierarchy(num_groups=4):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    with pyro.plate("groups", num_groups):
        pyro.sample("x", dist.LogNormal(mu, tau))


def random_walk_with_a_fixed_scale(num_steps=5):
    pyro.sample("x", AR1(0.0, 1.0, 0.5, num_steps, initial_scale=0.5))


def test_hierarchical_sites_are_real_loc_scale_or_transformed_sites_with_latent_parents():
    data = eight_schools_data(torch.float64)
    assert hierarchical_sites(eight_schools_centered, (), data) == ["theta"]
    assert hierarchical_sites(eight_schools_centered_vector, (), data) == ["theta"]
    assert hierarchical_sites(funnel, (), {"d": 3}) == ["x"]
    assert (
        hierarchical_sites(regression, (torch.ones(3), torch.ones(3))) == []
    )  # priors with fixed parameters
    assert hierarchical_sites(random_walk_with_a_fixed_scale) == []
    # a Markov prior written as innovations through a recursion: its innovations are sampled
    assert hierarchical_sites(brownian_motion_unknown_scales, (), brownian_motion_data()) == ["x"]
    # a log-normal: its base Normal(mu, tau) is non-centred too
    assert hierarchical_sites(positive_child) == ["child", "child_base"]
    assert hierarchical_sites(log_normal_hierarchy) == ["x", "x_base"]


@pytest.mark.parametrize(
    "model, kwargs, dim",
    [
        (brownian_motion_unknown_scales, brownian_motion_data(), 32),
        (log_normal_hierarchy, {}, 6),
        (eight_schools_centered_vector, eight_schools_data(torch.float64), 10),
    ],
    ids=["AR1", "log-normal", "vector"],
)
def test_the_map_back_of_every_kind_of_site_is_a_bijection_whose_log_determinant_is_the_densities_difference(
    model, kwargs, dim
):
    """For a transformed law (the AR(1) path's innovations; a log-normal's base, itself non-centred) and
    the vector spelling: log p_nc(u) = log p(T(u)) + log|det J_T(u)|, J_T by central differences in
    float64, and T inverted by the model's own density (mapped back, then forward, a point is itself)."""
    original = model_density(model, (), kwargs)
    non_centring = NonCentring(model, hierarchical_sites(model, (), kwargs), (), kwargs, original)
    torch.manual_seed(0)
    u = 0.5 * torch.randn(dim, dtype=torch.float64)
    x = non_centring.to_original(u)
    h = 1e-6
    columns = [
        (non_centring.to_original(u + h * e) - non_centring.to_original(u - h * e)) / (2 * h)
        for e in torch.eye(dim, dtype=torch.float64)
    ]
    log_det = torch.linalg.slogdet(torch.stack(columns, 1))[1]
    difference = non_centring.density.log_prob(u) - original.log_prob(x)
    assert abs(float(difference - log_det)) < 1e-5 * max(1.0, abs(float(log_det)))


def test_the_map_back_is_exact_and_the_densities_differ_by_its_log_determinant():
    """log p_nc(u) = log p(T(u)) + log|det J_T(u)|, with J_T by central differences in float64: the
    non-centred chains sample the model's own posterior exactly."""
    data = eight_schools_data(torch.float64)
    original = model_density(eight_schools_centered, (), data, max_plate_nesting=1)
    non_centring = NonCentring(eight_schools_centered, ["theta"], (), data, original, max_plate_nesting=1)
    torch.manual_seed(0)
    u = torch.randn(10, dtype=torch.float64)
    x = non_centring.to_original(u)
    mu, log_tau = u[0], u[1]
    torch.testing.assert_close(x[:2], u[:2])
    torch.testing.assert_close(x[2:], mu + log_tau.exp() * u[2:])
    h = 1e-6
    columns = [
        (non_centring.to_original(u + h * e) - non_centring.to_original(u - h * e)) / (2 * h)
        for e in torch.eye(10, dtype=torch.float64)
    ]
    log_det = torch.linalg.slogdet(torch.stack(columns, 1))[1]
    difference = non_centring.density.log_prob(u) - original.log_prob(x)
    assert abs(float(difference - log_det)) < 1e-6
    assert abs(float(log_det - 8 * log_tau)) < 1e-6


def test_a_batch_maps_back_in_one_run_as_each_point_does_alone():
    """ChainSampler maps all its draws back in one vectorized run of the non-centred model: the same
    points as one run per point, and as the closed form theta = mu + tau * theta_tilde."""
    data = eight_schools_data(torch.float64)
    original = model_density(eight_schools_centered, (), data, max_plate_nesting=1)
    non_centring = NonCentring(eight_schools_centered, ["theta"], (), data, original, max_plate_nesting=1)
    torch.manual_seed(1)
    u = torch.randn(3, 5, 10, dtype=torch.float64)
    batch = non_centring.to_original(u)
    one_by_one = torch.stack([non_centring.to_original(point) for point in u.reshape(-1, 10)]).reshape(
        u.shape
    )
    torch.testing.assert_close(batch, one_by_one, rtol=0, atol=0)
    torch.testing.assert_close(batch[..., 2:], u[..., :1] + u[..., 1:2].exp() * u[..., 2:])


@pytest.mark.statistical
@pytest.mark.posteriordb
def test_the_batch_sampler_samples_the_centred_eight_schools_non_centred():
    """ChainSampler.from_model chooses the non-centred coordinates as NFMALA does, and its draws, mapped
    back to the model's sites, have the reference's means of mu, tau and theta (within 4.5 standard
    errors; left in the non-centred coordinates, theta's would be about 0, 30 standard errors off)."""
    data = eight_schools_data(torch.float64)
    pyro.set_rng_seed(0)
    options = {"progress": False, "flow_stage": "none"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler = ChainSampler.from_model(
            eight_schools_centered, model_kwargs=data, num_chains=8, seed=0, fit_options=options
        )
        idata = sampler.run(400, 300, progress=False, log_likelihood=False)
    assert sampler.non_centring is not None and sampler.non_centring.sites == ["theta"]
    assert idata.posterior["theta"].shape == (8, 400, 8)
    reference = reference_samples("eight_schools")
    posterior = {name: idata.posterior[name].values for name in ("mu", "tau")}
    posterior["theta[0]"] = idata.posterior["theta"].values[..., 0]  # mapped back: not theta's N(0, 1)
    reference["theta[0]"] = reference["theta"][..., 0]
    for name, values in posterior.items():
        draws = torch.as_tensor(values)
        standard_error = reference[name].std() / math.sqrt(float(effective_sample_size(draws)))
        error = (float(draws.mean()) - reference[name].mean()) / standard_error
        assert abs(error) < 4.5, (name, error)


@pytest.mark.statistical
def test_nfmala_samples_a_centred_funnel_right_in_non_centred_coordinates():
    """Neal's funnel written centred (d = 10): the centred Gaussian fails the flow check, the
    non-centred one is exact; the draws come back as the model's own sites, and log sigma ~ N(0, 3)
    within 4 Monte Carlo standard errors (ESS from the chains)."""
    pyro.set_rng_seed(0)
    kernel = NFMALA(funnel, fit_options={"progress": False})
    mcmc = MCMC(kernel, num_samples=400, warmup_steps=200, num_chains=2, disable_progbar=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mcmc.run(d=10)
    assert kernel.non_centred_sites == ["x"]
    assert all(chain["non-centred sites"] == ["x"] for chain in mcmc._diagnostics)
    samples = mcmc.get_samples(group_by_chain=True)
    assert set(samples) == {"log_sigma", "x"} and samples["x"].shape == (2, 400, 10)
    log_sigma = samples["log_sigma"].double()
    ess = float(pyro.ops.stats.effective_sample_size(log_sigma))
    assert ess > 300
    assert abs(float(log_sigma.mean())) < 4 * 3.0 / math.sqrt(ess)
    assert abs(float(log_sigma.std()) - 3.0) < 0.3
    ratio = samples["x"].double() / log_sigma.exp().unsqueeze(-1)  # exactly N(0, 1) given log sigma
    assert abs(float(ratio.std()) - 1.0) < 0.05


@pytest.mark.statistical
def test_centred_on_request_and_when_the_user_gives_initial_params():
    for options in ({"parameterization": "centred"}, {"initial_params": {"log_sigma": torch.tensor(0.0),
                                                                         "x": torch.zeros(3)}}):  # fmt: skip
        kernel = NFMALA(funnel, fit_options={"progress": False, "max_seconds": 5.0}, **options)
        mcmc = MCMC(kernel, num_samples=5, warmup_steps=5, disable_progbar=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mcmc.run(d=3)
        assert kernel.non_centred_sites == []


def test_a_bad_parameterization_is_a_clear_error():
    with pytest.raises(ValueError, match="parameterization"):
        NFMALA(funnel, parameterization="sideways")


def test_the_flow_stage_starts_from_the_chosen_trials_gaussian_fit_not_a_second_one(monkeypatch):
    import pyro_nfmala.fit.staged as staged

    calls = {"laplace_approximation": 0, "adapt_flow_with_chains": 0}
    for name in calls:
        original = getattr(staged, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(staged, name, counted)
    data = eight_schools_data(torch.float64)
    density = model_density(eight_schools_centered, (), data)
    sites = hierarchical_sites(eight_schools_centered, (), data)
    options = {"progress": False, "num_steps": 200, "check_samples": 256, "keep_gaussian": "good",
               "chain_options": {"num_steps": 20}, "max_seconds": 600}  # fmt: skip
    pyro.set_rng_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result, _ = staged.fit_in_better_coordinates(eight_schools_centered, (), data, density, sites,
                                                     fit_options=options)  # fmt: skip
    assert result is not None and calls["adapt_flow_with_chains"] == 1  # the full fit ran after the trials
    assert calls["laplace_approximation"] == 2  # one mode search per coordinate trial, none in the full fit
