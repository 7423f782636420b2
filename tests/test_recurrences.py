"""linear_recurrence: the parallel scan equals the loop it replaces (values and gradients, float64), for
batches of chains; the GARCH example written with it is the loop's model."""

import pyro
import pytest
import torch

from pyro_nfmala import linear_recurrence
from pyro_nfmala.examples.flow_cases import garch11, garch_data
from pyro_nfmala.model.density import model_density


def loop(factors: torch.Tensor, shocks: torch.Tensor) -> torch.Tensor:
    factors, shocks = torch.broadcast_tensors(factors, shocks)
    values = [shocks[..., 0]]
    for t in range(1, shocks.shape[-1]):
        values.append(factors[..., t] * values[-1] + shocks[..., t])
    return torch.stack(values, -1)


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 8, 200])
def test_the_scan_equals_the_loop_in_value_and_gradient(steps):
    generator = torch.Generator().manual_seed(steps)
    factors = (torch.rand(4, steps, generator=generator, dtype=torch.float64) * 2 - 1).requires_grad_()
    shocks = torch.randn(4, steps, generator=generator, dtype=torch.float64).requires_grad_()
    weights = torch.randn(4, steps, generator=generator, dtype=torch.float64)
    scanned, looped = linear_recurrence(factors, shocks), loop(factors, shocks)
    assert torch.allclose(scanned, looped, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad((weights * scanned).sum(), [factors, shocks], allow_unused=True)
    expected = torch.autograd.grad((weights * looped).sum(), [factors, shocks], allow_unused=True)
    for got, want in zip(grads, expected):
        if want is None:  # one step: the factors are not used
            assert got is None or not got.any()
        else:
            assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    # the negative control: the loop with the factors shifted by one step is another recursion
    shifted = loop(torch.roll(factors, 1, -1), shocks)
    assert steps < 3 or not torch.allclose(scanned, shifted, rtol=1e-12, atol=1e-12)


def test_factors_broadcast_over_time_and_chains():
    beta = torch.tensor([[0.9], [0.5]], dtype=torch.float64)  # one factor per chain, all steps
    shocks = torch.randn(2, 9, dtype=torch.float64)
    assert torch.allclose(linear_recurrence(beta, shocks), loop(beta.expand(2, 9), shocks), rtol=1e-12)


@pytest.mark.parametrize("factor", [0.01, 0.999])
def test_long_recursions_stay_finite_where_a_closed_form_with_powers_would_not(factor):
    # y_t = sum_k a^(t - k) b_k written as a^t * cumsum(a^-k b_k) overflows for a = 0.01 beyond t ~ 150
    factors = torch.full((3000,), factor, dtype=torch.float64)
    shocks = torch.ones(3000, dtype=torch.float64)
    values = linear_recurrence(factors, shocks)
    assert torch.isfinite(values).all() and torch.allclose(values, loop(factors, shocks), rtol=1e-10)


def garch_loop(T, y, sigma1):
    """The GARCH(1, 1) model with its recursion as a Python loop (as a user writes it)."""
    import pyro.distributions as dist

    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 10.0))
    alpha0 = pyro.sample("alpha0", dist.HalfNormal(y.new_tensor(10.0)))
    alpha1 = pyro.sample("alpha1", dist.Uniform(y.new_tensor(0.0), 1.0))
    beta1_share = pyro.sample("beta1_share", dist.Uniform(y.new_tensor(0.0), 1.0))
    beta1 = pyro.deterministic("beta1", (1 - alpha1) * beta1_share)
    variance = [sigma1.expand(mu.shape) ** 2]
    for t in range(1, T):
        variance.append(alpha0 + alpha1 * (y[t - 1] - mu) ** 2 + beta1 * variance[-1])
    pyro.sample("y", dist.Normal(mu.unsqueeze(-1), torch.stack(variance, -1).sqrt()).to_event(1), obs=y)


def test_the_garch_example_is_the_loop_model_batched():
    data = {key: value.double() if torch.is_tensor(value) else value for key, value in garch_data().items()}
    scanned = model_density(garch11, (), data, trace_density=False)
    looped = model_density(garch_loop, (), data, trace_density=False)
    assert scanned.vectorized and scanned.layout.dim == looped.layout.dim == 4
    x = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.5
    assert torch.allclose(scanned.log_prob(x), looped.point_log_prob(x), rtol=1e-10)


def arma_loop(T, y):
    """posteriordb's ARMA(1, 1) with its recursion as a Python loop (as Stan writes it)."""
    import pyro.distributions as dist

    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    phi = pyro.sample("phi", dist.Normal(0.0, 2.0))
    theta = pyro.sample("theta", dist.Normal(0.0, 2.0))
    sigma = pyro.sample("sigma", dist.HalfCauchy(y.new_tensor(2.5)))
    nu = [mu + phi * mu]
    for t in range(1, T):
        nu.append(mu + phi * y[t - 1] + theta * (y[t - 1] - nu[-1]))
    pyro.sample("y", dist.Normal(torch.stack(nu, -1), sigma.unsqueeze(-1)).to_event(1), obs=y)


def test_the_arma_transcription_is_the_loop_model_batched():
    from pyro_nfmala.examples.posteriordb import arma11

    generator = torch.Generator().manual_seed(1)
    data = {"T": 60, "y": torch.randn(60, generator=generator, dtype=torch.float64).cumsum(0) * 0.3}
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the priors' constants in float64
    try:
        scanned = model_density(arma11, (), data, trace_density=False)
        looped = model_density(arma_loop, (), data, trace_density=False)
        x = torch.randn(16, 4, generator=generator, dtype=torch.float64) * 0.4
        assert scanned.vectorized
        assert torch.allclose(scanned.log_prob(x), looped.point_log_prob(x), rtol=1e-10)
    finally:
        torch.set_default_dtype(default)


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 8, 100])
def test_the_pairwise_log_matrix_product_equals_the_forward_loop(steps):
    from pyro_nfmala import log_matrix_product

    generator = torch.Generator().manual_seed(steps)
    log_matrices = torch.randn(4, steps, 3, 3, generator=generator, dtype=torch.float64).requires_grad_()
    product = log_matrices[:, 0]
    for t in range(1, steps):
        product = torch.logsumexp(product.unsqueeze(-1) + log_matrices[:, t].unsqueeze(-3), -2)
    paired = log_matrix_product(log_matrices)
    assert torch.allclose(paired, product, rtol=1e-12, atol=1e-12)
    weights = torch.randn(4, 3, 3, generator=generator, dtype=torch.float64)
    (got,) = torch.autograd.grad((weights * paired).sum(), log_matrices)
    (want,) = torch.autograd.grad((weights * product).sum(), log_matrices)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    # the negative control: the matrices in reverse order multiply to another product
    reverse = log_matrix_product(log_matrices.flip(1))
    assert steps < 2 or not torch.allclose(reverse, product, rtol=1e-12, atol=1e-12)


def test_a_log_matrix_product_of_nothing_is_a_clear_error():
    from pyro_nfmala import log_matrix_product

    with pytest.raises(ValueError, match=r"\(\.\.\., T, K, K\)"):
        log_matrix_product(torch.zeros(0, 2, 2))


def hmm_loop(N, K, y):
    """posteriordb's hmm_example with its forward recursion as a Python loop (as Stan writes it)."""
    import pyro.distributions as dist

    from pyro.distributions import constraints

    theta1 = pyro.sample("theta1", dist.Dirichlet(y.new_ones(K)))
    theta2 = pyro.sample("theta2", dist.Dirichlet(y.new_ones(K)))
    mu = pyro.sample("mu", dist.ImproperUniform(constraints.positive_ordered_vector, (), (K,)))
    pyro.factor(
        "mu_prior", dist.Normal(3.0, 1.0).log_prob(mu[..., 0]) + dist.Normal(10.0, 1.0).log_prob(mu[..., 1])
    )
    log_theta = torch.stack([theta1, theta2], -2).log()
    log_emission = dist.Normal(mu.unsqueeze(-2), 1.0).log_prob(y.unsqueeze(-1))
    gamma = log_emission[..., 0, :]
    for t in range(1, N):
        gamma = torch.logsumexp(gamma.unsqueeze(-1) + log_theta, -2) + log_emission[..., t, :]
    pyro.factor("forward", torch.logsumexp(gamma, -1))


def test_the_hmm_transcription_is_the_loop_model_batched():
    from pyro_nfmala.examples.posteriordb import hmm_example

    generator = torch.Generator().manual_seed(2)
    states = (torch.rand(50, generator=generator) < 0.5).double()
    data = {"N": 50, "K": 2, "y": 3 + 7 * states + torch.randn(50, generator=generator, dtype=torch.float64)}
    scanned = model_density(hmm_example, (), data, trace_density=False)
    looped = model_density(hmm_loop, (), data, trace_density=False)
    x = looped.layout.pack(looped.initial_params).detach() + 0.3 * torch.randn(
        16, looped.layout.dim, generator=generator, dtype=torch.float64
    )
    assert scanned.vectorized
    assert torch.allclose(scanned.log_prob(x), looped.point_log_prob(x), rtol=1e-10)
