"""Scales the user has: a covariance (a mass matrix, as Pyro's NUTS takes one) given as NFMALA's map,
and a map fitted on one data set reused on new data of the same shape, both checked against the exact
posterior of a conjugate regression."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro.infer import MCMC
from pyro.ops.stats import effective_sample_size

from pyro_nfmala import NFMALA
from pyro_nfmala.flows.staged import StagedFlow

SIGMA, PRIOR_SD = 0.5, 10.0


def regression(x, y):
    beta = pyro.sample("beta", dist.Normal(0.0, PRIOR_SD).expand([x.shape[1]]).to_event(1))
    pyro.sample("y", dist.Normal(x @ beta, SIGMA).to_event(1), obs=y)


def data(seed: int, n: int = 40):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=generator)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + SIGMA * torch.randn(n, generator=generator)
    return x, y


def exact_posterior(x, y):
    precision = x.T @ x / SIGMA**2 + torch.eye(x.shape[1]) / PRIOR_SD**2
    covariance = torch.linalg.inv(precision)
    return covariance @ x.T @ y / SIGMA**2, covariance


def max_mean_error(mcmc, mean, covariance) -> float:
    """The largest error of a coordinate's posterior mean, in Monte Carlo standard errors."""
    beta = mcmc.get_samples(group_by_chain=True)["beta"].double()
    ess = effective_sample_size(beta)
    errors = (beta.mean((0, 1)) - mean.double()) / (covariance.diagonal().double().sqrt() / ess.sqrt())
    return float(errors.abs().max())


def run(kernel, x, y):
    mcmc = MCMC(kernel, num_samples=500, warmup_steps=200, num_chains=2, disable_progbar=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # more chains than CPUs: drawn one after another
        mcmc.run(x, y)
    return mcmc


def test_a_bad_covariance_is_a_clear_error():
    with pytest.raises(ValueError, match="symmetric positive definite"):
        StagedFlow.from_covariance(torch.zeros(2), torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="variances must be finite and > 0"):
        StagedFlow.from_covariance(torch.zeros(2), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"loc must have shape \(d,\) and scale_tril \(d, d\)"):
        StagedFlow.from_covariance(torch.zeros(3), torch.eye(2))


@pytest.mark.statistical
def test_a_covariance_you_have_is_the_map_and_nothing_is_fitted():
    """A rough covariance (1.5x too wide, the mean 0.3 sd off, as from a short earlier run): no fit at
    setup, the flow check passes it, and the draws are the exact posterior's."""
    pyro.set_rng_seed(0)
    x, y = data(0)
    mean, covariance = exact_posterior(x, y)
    rough = StagedFlow.from_covariance(mean + 0.3 * covariance.diagonal().sqrt(), 1.5 * covariance)
    kernel = NFMALA(regression, flow=rough)
    mcmc = run(kernel, x, y)
    assert kernel.fit_result is None and kernel.flow_check.good
    assert max_mean_error(mcmc, mean, covariance) < 4


@pytest.mark.statistical
def test_a_map_fitted_on_one_data_set_serves_new_data_of_the_same_shape():
    """Fit once, on the first data set; reuse the map on a second (same shapes, new values): no fit
    there, and each run's draws are its own exact posterior's."""
    pyro.set_rng_seed(1)
    first = NFMALA(regression)
    mcmc = run(first, *data(1))
    assert max_mean_error(mcmc, *exact_posterior(*data(1))) < 4
    second = NFMALA(regression, flow=first.fit_result.flow)
    mcmc = run(second, *data(2))
    assert second.fit_result is None and mcmc.diagnostics()["fit seconds"]["chain 0"] == 0.0
    # the new posterior sits about one of its sds away from the old one: the map is checked on it and
    # passes the reliability bar (k-hat 0.61 <= 0.7, where 0.5 would be good); a map that fails it warns
    assert second.flow_check.reliable and math.isfinite(second.flow_check.khat)
    mean, covariance = exact_posterior(*data(2))
    assert max_mean_error(mcmc, mean, covariance) < 4
