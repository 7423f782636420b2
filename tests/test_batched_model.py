"""A Pyro model's chains as one batch (ChainSampler.from_model): one vectorized model run per move for
every chain, right on a conjugate regression's exact posterior; a model that does not broadcast runs
vmapped, once per batch, equal to the point-by-point density and gradient; a model that cannot batch
says why once and is still right, point by point."""

import pickle
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
from pyro_nfmala.model.density import model_density


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


class CountedMatmul:
    """The regression as users write it, ``x @ beta``: it does not broadcast over a particle plate."""

    def __init__(self) -> None:
        self.runs = 0

    def __call__(self, x, y):
        self.runs += 1
        regression(x, y)


def test_a_model_that_does_not_broadcast_runs_once_per_batch_by_vmap_and_agrees_point_by_point():
    x, y = data(3)
    model = CountedMatmul()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the model's constants in float64
    try:
        density = model_density(model, (x.double(), y.double()), trace_density=False)
        assert type(density.particles).__name__ == "_VmappedModel" and density.vectorized
        points = torch.randn(16, 3, dtype=torch.float64, requires_grad=True)
        before = model.runs
        batched = density.log_prob(points)
        assert model.runs - before == 1  # one run of the model for all 16 points
        (grad,) = torch.autograd.grad(batched.sum(), points)
        pointwise = density.point_log_prob(points)
        (point_grad,) = torch.autograd.grad(pointwise.sum(), points)
        copy = pickle.loads(pickle.dumps(density.particles))  # to worker processes, as the plate's model
        copied = copy.log_prob(points.detach())
    finally:
        torch.set_default_dtype(default)
    assert torch.allclose(batched, pointwise, rtol=1e-12, atol=1e-10)
    assert torch.allclose(grad, point_grad, rtol=1e-12, atol=1e-10)
    # the negative control: a density off by 1e-8 fails the same comparison
    assert not torch.allclose(batched + 1e-8, pointwise, rtol=1e-12, atol=1e-10)
    assert torch.equal(copied, batched.detach())


def branching_regression(x, y):
    """A regression that branches on a parameter's value: neither batched way can run it."""
    beta = pyro.sample("beta", dist.Normal(0.0, PRIOR_SD).expand([x.shape[1]]).to_event(1))
    scale = SIGMA if float(beta[0]) > -100.0 else 2 * SIGMA  # always SIGMA, decided by a value
    pyro.sample("y", dist.Normal(x @ beta, scale).to_event(1), obs=y)


@pytest.mark.statistical
def test_a_model_that_cannot_batch_says_why_once_and_is_right_point_by_point():
    pyro.set_rng_seed(1)
    x, y = data(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sampler = ChainSampler.from_model(
            branching_regression, x, y, num_chains=4, seed=1, fit_options={"progress": False}
        )
        idata = sampler.run(num_samples=200, warmup_steps=150, progress=False)
    messages = [str(w.message) for w in caught if "point by point" in str(w.message)]
    assert len(messages) == 1, messages
    assert "particle plate: " in messages[0] and "vmap: " in messages[0] and "torch.where" in messages[0]
    assert max_mean_error(idata, *exact_posterior(x, y)) < 4


def test_a_model_with_nothing_to_sample_is_a_clear_error():
    def nothing():
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.tensor(0.0))

    with pytest.raises(ValueError, match="no continuous latent sites"):
        ChainSampler.from_model(nothing)
