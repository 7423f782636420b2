"""ArviZ's model comparison on an NFMALA run: pointwise log-likelihood (the same as ArviZ's from_pyro),
observed data, posterior predictive and prior groups, and az.loo agreeing with NUTS within Monte Carlo
error."""

import math
import warnings

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro.infer import MCMC, NUTS, Predictive

from pyro_nfmala import NFMALA, to_inference_data
from pyro_nfmala.output.arviz import pointwise_log_likelihood

ARVIZ_MAJOR = int(az.__version__.split(".")[0])


def robust_regression(x, y=None):
    weight = pyro.sample("weight", dist.Normal(0.0, 1.0))
    scale = pyro.sample("scale", dist.HalfNormal(1.0))
    pyro.deterministic("twice", 2 * weight)  # not an observation
    pyro.factor("penalty", -0.1 * weight**2)  # nor this
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.StudentT(4.0, weight * x, scale), obs=y)


def vector_observation(n, y=None):
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    pyro.sample("y", dist.Normal(loc, 1.0).expand([n]).to_event(1), obs=y)


def data(n=30):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=generator)
    return x, 0.7 * x + 0.5 * torch.randn(n, generator=generator)


def group_names(idata) -> list[str]:
    """The groups of InferenceData (ArviZ 0.x) or of a DataTree (ArviZ 1.x)."""
    return list(idata.groups()) if ARVIZ_MAJOR < 1 else list(idata.children)


def run(kernel, *args, chains=2):
    mcmc = MCMC(kernel, num_samples=500, warmup_steps=300, num_chains=chains, disable_progbar=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mcmc.run(*args)
    return mcmc


def elpd_loo(loo) -> float:
    """``az.loo``'s elpd: ``elpd_loo`` on ArviZ 0.x, ``elpd`` on 1.x."""
    return float(loo.elpd_loo if hasattr(loo, "elpd_loo") else loo.elpd)


def elpd_mcse(log_likelihood: np.ndarray, ess: float) -> float:
    """The Monte Carlo standard error of the importance-sampling elpd_loo, by the delta method:
    sum over observations of Var(1/p_i) / (ESS * E[1/p_i]^2)."""
    draws = log_likelihood.reshape(-1, log_likelihood.shape[-1])
    inverse = np.exp(-(draws - draws.max(0)))  # 1/p_i up to a constant per observation
    return math.sqrt(float((inverse.var(0) / inverse.mean(0) ** 2).sum()) / ess)


@pytest.mark.statistical
def test_loo_of_an_nfmala_run_matches_nuts_within_monte_carlo_error():
    x, y = data()
    pyro.set_rng_seed(0)
    nuts = run(NUTS(robust_regression), x, y)
    pyro.set_rng_seed(1)
    nfmala = run(NFMALA(robust_regression, fit_options={"progress": False, "max_seconds": 10.0}), x, y)
    idata = to_inference_data(nfmala)
    assert list(idata.log_likelihood.data_vars) == ["y"]  # neither the deterministic nor the factor
    assert idata.log_likelihood["y"].shape == (2, 500, 30)
    np.testing.assert_array_equal(idata.observed_data["y"].values, y.numpy())
    ours, _ = pointwise_log_likelihood(robust_regression, nuts.get_samples(group_by_chain=True), (x, y))
    if ARVIZ_MAJOR < 1:  # the same numbers as ArviZ's own converter on the same draws
        np.testing.assert_allclose(az.from_pyro(nuts).log_likelihood["y"].values, ours["y"], rtol=1e-6)
    nuts_idata = az.from_dict(posterior={"weight": nuts.get_samples(group_by_chain=True)["weight"].numpy()},
                              log_likelihood=ours) if ARVIZ_MAJOR < 1 else None  # fmt: skip
    loo_ours = az.loo(idata)
    loo_nuts = az.loo(nuts_idata) if nuts_idata is not None else az.loo(to_nuts_tree(nuts, ours))
    ess = min(float(az.ess(idata)["weight"]), 500.0)
    tolerance = 4 * math.sqrt(
        elpd_mcse(idata.log_likelihood["y"].values, ess) ** 2 + elpd_mcse(ours["y"], ess) ** 2
    )
    assert abs(elpd_loo(loo_ours) - elpd_loo(loo_nuts)) < tolerance
    assert 0.05 < tolerance < 2  # a test that could fail: the tolerance is of the order of the MC error


def to_nuts_tree(nuts, log_likelihood):  # ArviZ 1.x: a DataTree with the same groups
    return az.from_dict(
        {
            "posterior": {"weight": nuts.get_samples(group_by_chain=True)["weight"].numpy()},
            "log_likelihood": log_likelihood,
        }
    )


@pytest.mark.statistical
def test_a_vector_observed_with_to_event_counts_as_its_elements_and_predictive_draws_get_chains():
    y = torch.randn(12) + 3.0
    pyro.set_rng_seed(0)
    mcmc = run(NFMALA(vector_observation, fit_options={"progress": False}), 12, y)
    predictive = Predictive(vector_observation, mcmc.get_samples())(12)
    prior = Predictive(vector_observation, num_samples=50)(12)
    idata = to_inference_data(mcmc, posterior_predictive=predictive, prior=prior)
    assert idata.log_likelihood["y"].shape == (2, 500, 12)
    assert idata.posterior_predictive["y"].shape == (2, 500, 12)
    assert idata.prior["loc"].shape == (1, 50) and idata.prior["y"].shape == (1, 50, 12)
    assert "log_likelihood" not in group_names(to_inference_data(mcmc, log_likelihood=False))
    with pytest.raises(ValueError, match="Predictive"):
        to_inference_data(mcmc, posterior_predictive={"y": predictive["y"][:10]})
