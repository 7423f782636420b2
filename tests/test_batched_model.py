"""A Pyro model's chains as one batch (ChainSampler.from_model): one vectorized model run per move for
every chain, right on a conjugate regression's exact posterior; a model that does not vectorize says so
once and is still right, point by point."""

import warnings

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro.ops.stats import effective_sample_size
from test_model_comparison import elpd_loo
from test_user_scales import PRIOR_SD, SIGMA, data, exact_posterior, regression

from pyro_nfmala import ChainSampler


class Counted:
    """A batch-safe regression that counts its runs."""

    def __init__(self) -> None:
        self.runs = 0

    def __call__(self, x, y):
        self.runs += 1
        beta = pyro.sample("beta", dist.Normal(0.0, PRIOR_SD).expand([x.shape[1]]).to_event(1))
        mean = (x * beta.unsqueeze(-2)).sum(-1)
        pyro.sample("y", dist.Normal(mean, SIGMA).to_event(1), obs=y)


def max_mean_error(idata, mean, covariance) -> float:
    beta = torch.as_tensor(idata.posterior["beta"].values).double()
    ess = effective_sample_size(beta)
    return float(
        ((beta.mean((0, 1)) - mean.double()) / (covariance.diagonal().double().sqrt() / ess.sqrt()))
        .abs()
        .max()
    )


@pytest.mark.statistical
def test_all_chains_advance_in_one_model_run_per_move_and_are_right():
    pyro.set_rng_seed(0)
    model = Counted()
    x, y = data(3)
    options = {"fit_options": {"progress": False}, "trace_density": False}  # traced, the model never runs
    sampler = ChainSampler.from_model(model, x, y, num_chains=16, seed=0, **options)
    assert sampler.density.vectorized and sampler.fit_result.stage == "laplace"
    assert sampler._driver.independence_every == 1  # the Laplace map passes the check: global moves on
    sampler.warmup(200, progress=False)
    before = model.runs
    idata = sampler.sample(300, log_likelihood=False, progress=False)
    assert model.runs - before == 2 * 300  # one run for all 16 chains per move (MALA, independence)
    assert idata.posterior["beta"].shape == (16, 300, 3)
    assert max_mean_error(idata, *exact_posterior(x, y)) < 4
    idata = sampler.sample(100, progress=False)  # with the pointwise log-likelihood that az.loo reads
    assert idata.log_likelihood["y"].shape == (16, 100, len(y))
    assert np.isfinite(elpd_loo(az.loo(idata)))


@pytest.mark.statistical
def test_a_model_that_does_not_vectorize_says_so_once_and_is_right_point_by_point():
    pyro.set_rng_seed(1)
    x, y = data(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sampler = ChainSampler.from_model(
            regression, x, y, num_chains=4, seed=1, fit_options={"progress": False}
        )
        idata = sampler.run(num_samples=200, warmup_steps=150, progress=False)
    messages = [str(w.message) for w in caught if "does not vectorize" in str(w.message)]
    assert len(messages) == 1 and "(x * beta.unsqueeze(-2)).sum(-1)" in messages[0]
    assert max_mean_error(idata, *exact_posterior(x, y)) < 4


def test_a_model_with_nothing_to_sample_is_a_clear_error():
    def nothing():
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.tensor(0.0))

    with pytest.raises(ValueError, match="no continuous latent sites"):
        ChainSampler.from_model(nothing)
