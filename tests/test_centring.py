"""Non-centring hierarchical sites: which sites, the exact map back to the model's own coordinates,
and NFMALA sampling a centred funnel right by choosing the non-centred coordinates itself."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro.infer import MCMC

from pyro_nfmala import NFMALA
from pyro_nfmala.centring import NonCentring, hierarchical_sites
from pyro_nfmala.examples.flow_cases import funnel
from pyro_nfmala.examples.posteriordb import eight_schools_centered, load_data
from pyro_nfmala.model import model_density


def regression(x, y):
    weight = pyro.sample("weight", dist.Normal(0.0, 1.0))
    scale = pyro.sample("scale", dist.HalfNormal(1.0))
    pyro.sample("y", dist.Normal(weight * x, scale).to_event(1), obs=y)


def positive_child():
    scale = pyro.sample("scale", dist.HalfNormal(1.0))
    pyro.sample("child", dist.LogNormal(0.0, scale))  # a loc-scale law, but not on the real line


def test_hierarchical_sites_are_real_loc_scale_sites_with_latent_parents():
    data = load_data("eight_schools", dtype=torch.float64)
    assert hierarchical_sites(eight_schools_centered, (), data) == ["theta"]
    assert hierarchical_sites(funnel, (), {"d": 3}) == ["x"]
    assert (
        hierarchical_sites(regression, (torch.ones(3), torch.ones(3))) == []
    )  # priors with fixed parameters
    assert hierarchical_sites(positive_child) == []


def test_the_map_back_is_exact_and_the_densities_differ_by_its_log_determinant():
    """log p_nc(u) = log p(T(u)) + log|det J_T(u)|, with J_T by central differences in float64: the
    non-centred chains sample the model's own posterior exactly."""
    data = load_data("eight_schools", dtype=torch.float64)
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
    assert kernel._non_centred_sites == ["x"]
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
        assert kernel._non_centred_sites == []


def test_a_bad_parameterization_is_a_clear_error():
    with pytest.raises(ValueError, match="parameterization"):
        NFMALA(funnel, parameterization="sideways")
