"""The exact data-space move and the data-space mass matrix: gradients against autograd, the
acceptance ratio against an independent dense computation, invariance of an exact law with a
negative control, and adaptation of the data-space mass matrix."""

import math

import pytest
import torch

from invariance import DataSpaceWithoutReverseLadj, JacobianWithoutReverseLadj, check_invariance

from pyro_nfmala import ChainSampler, PosteriorPullback, TemperedFlow, identity_flow
from pyro_nfmala.mala import init_state, mala_step
from pyro_nfmala.precond import DataSpacePreconditioner, JacobianPreconditioner

INVERSE_MASS = torch.tensor([0.4, 3.0], dtype=torch.float64)


@pytest.fixture(params=["posterior", "tempered"])
def target(request, latent_flow, mixture):
    if request.param == "posterior":
        return PosteriorPullback(latent_flow, mixture.log_prob)
    return TemperedFlow(latent_flow, beta=1.0)


def data_log_density(target, x):
    """log p_X(x) = log pi(f^-1(x)) + log|det J_{f^-1}(x)| for one point, by the flow's inverse."""
    z, ladj_to_latent = target.flow.to_latent_and_ladj(x[None])
    return target.log_density(z)[0][0] + ladj_to_latent[0]


def test_data_space_density_is_the_targets_push_forward(latent_flow, mixture):
    """For T1, p_X is the posterior itself; for T2, log q_Z(z) - (1 + beta) ladj(z)."""
    z = torch.randn(5, 2, dtype=torch.float64)
    x, ladj = latent_flow.to_data(z)
    posterior = PosteriorPullback(latent_flow, mixture.log_prob)
    tempered = TemperedFlow(latent_flow, beta=0.5)
    for i in range(len(z)):
        torch.testing.assert_close(data_log_density(posterior, x[i]), mixture.log_prob(x[i]))
        expected = latent_flow.base_log_prob(z[i]) - 1.5 * ladj[i]
        torch.testing.assert_close(data_log_density(tempered, x[i]), expected)


def test_data_gradient_matches_autograd(target):
    state = init_state(target, DataSpacePreconditioner(), torch.randn(6, 2, dtype=torch.float64))
    expected = torch.stack(
        [torch.autograd.functional.jacobian(lambda v: data_log_density(target, v), x) for x in state.x]
    )
    torch.testing.assert_close(state.cache, expected, atol=1e-10, rtol=1e-10)


def dense_log_accept_ratio(target, name, z, step_size, noise, inverse_mass=None):
    """MALA's log acceptance ratio, one chain at a time, by dense algebra and torch's multivariate
    normal: independent of the preconditioners' matrix-free code.

    ``"data_space"``: MALA in data space on p_X with covariance 2 eps C, scored in x (the ratio of
    data-space MALA, which the latent step must reproduce). ``"jacobian"``: latent MALA with the
    metric A(z) = J^T M J, scored in z.
    """
    c = torch.ones(2, dtype=torch.float64) if inverse_mass is None else inverse_mass
    flow = target.flow

    def log_pi(u):
        return target.log_density(u[None])[0][0]

    def jacobian(u):
        return torch.autograd.functional.jacobian(lambda v: flow.to_data(v[None])[0][0], u)

    ratios = []
    for u, xi in zip(z, noise):
        if name == "data_space":

            def mean(v):
                return v + step_size * c * torch.autograd.functional.jacobian(
                    lambda w: data_log_density(target, w), v
                )

            x = flow.to_data(u[None])[0][0].detach()
            x_new = mean(x) + math.sqrt(2 * step_size) * c.sqrt() * xi
            covariance = 2 * step_size * torch.diag(c)
            forward = torch.distributions.MultivariateNormal(mean(x), covariance).log_prob(x_new)
            backward = torch.distributions.MultivariateNormal(mean(x_new), covariance).log_prob(x)
            gain = data_log_density(target, x_new) - data_log_density(target, x)
        else:

            def proposal(v):  # mean and covariance of q(. | v), and a square root of the metric
                root = jacobian(v) / c.sqrt()[:, None]  # M^(1/2) J
                metric = root.T @ root
                grad = torch.autograd.functional.jacobian(log_pi, v)
                return (
                    v + step_size * torch.linalg.solve(metric, grad),
                    2 * step_size * torch.linalg.inv(metric),
                    root,
                )

            mean, covariance, root = proposal(u)
            u_new = mean + math.sqrt(2 * step_size) * torch.linalg.solve(root, xi)
            mean_new, covariance_new, _ = proposal(u_new)
            forward = torch.distributions.MultivariateNormal(mean, covariance).log_prob(u_new)
            backward = torch.distributions.MultivariateNormal(mean_new, covariance_new).log_prob(u)
            gain = log_pi(u_new) - log_pi(u)
        ratios.append(gain + backward - forward)
    return torch.stack(ratios).detach()


@pytest.mark.parametrize("inverse_mass", [None, INVERSE_MASS], ids=["no_mass", "data_mass"])
@pytest.mark.parametrize(
    "name, correct, broken",
    [
        ("data_space", DataSpacePreconditioner, DataSpaceWithoutReverseLadj),
        ("jacobian", JacobianPreconditioner, JacobianWithoutReverseLadj),
    ],
)
def test_acceptance_ratio_matches_an_independent_dense_computation(
    target, name, correct, broken, inverse_mass
):
    """On fixed noise, the step's log acceptance ratio equals the dense one; a wrong reverse density
    does not."""
    z = 0.7 * torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    step_size = 0.05
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    expected = dense_log_accept_ratio(target, name, z, step_size, noise, inverse_mass)
    results = []
    for precond in (correct(inverse_mass), broken(inverse_mass)):
        state = init_state(target, precond, z)
        step = mala_step(state, target, precond, step_size, generator=torch.Generator().manual_seed(11))
        results.append(step[1].log_accept_ratio)
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(results[0], expected, atol=1e-7, rtol=1e-7)
    assert (results[1] - expected).abs().max() > 1e-3  # the comparison can fail


@pytest.mark.parametrize("inverse_mass", [None, INVERSE_MASS], ids=["no_mass", "data_mass"])
def test_exact_law_is_invariant_and_a_wrong_accept_ratio_is_caught(
    latent_flow, mixture, reference_statistics, inverse_mass
):
    target = PosteriorPullback(latent_flow, mixture.log_prob)
    correct, broken = DataSpacePreconditioner(inverse_mass), DataSpaceWithoutReverseLadj(inverse_mass)
    check_invariance(target, correct, broken, mixture, reference_statistics)


@pytest.mark.parametrize("name", ["data_space", "jacobian"])
def test_warmup_adapts_the_data_space_mass_matrix_to_the_scales_of_the_target(name):
    """Data-space scales 0.01 and 100 behind an identity flow: the adapted C = M^-1 recovers their
    variances, and the adapted step size is of order one instead of the 1e-4 an isotropic step needs."""
    scales = torch.tensor([0.01, 100.0], dtype=torch.float64)
    normal = torch.distributions.Normal(torch.zeros(2, dtype=torch.float64), scales)
    target = PosteriorPullback(identity_flow(2).double(), lambda x: normal.log_prob(x).sum(-1))
    sampler = ChainSampler(target, 64, preconditioner=name, initial_z=normal.sample((64,)), seed=0)
    sampler.warmup(300, progress=False)
    inverse_mass = sampler.preconditioner.metric.inverse_mass
    ratio = inverse_mass / scales.square()
    assert torch.all((ratio > 0.5) & (ratio < 2.0)), ratio
    assert float(sampler.step_size.median()) > 0.1
