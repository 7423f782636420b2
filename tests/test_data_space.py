"""The exact data-space move and the data-space mass matrix: gradients against autograd, the
acceptance ratio against an independent dense computation, invariance of an exact law with a
negative control, and adaptation of the data-space mass matrix."""

import math

import pytest
import torch

from dense_reference import data_log_density, dense_log_accept_ratio
from invariance import DataSpaceWithoutReverseLadj, JacobianWithoutReverseLadj, check_invariance

from pyro_nfmala import ChainSampler, LatentFlow, PosteriorPullback, TemperedFlow, identity_flow
from pyro_nfmala.engine.langevin import DataSpacePreconditioner, JacobianPreconditioner
from pyro_nfmala.engine.step import init_state, mala_step

INVERSE_MASS = torch.tensor([0.4, 3.0], dtype=torch.float64)


@pytest.fixture(params=["posterior", "tempered"])
def target(request, latent_flow, mixture):
    if request.param == "posterior":
        return PosteriorPullback(latent_flow, mixture.log_prob)
    return TemperedFlow(latent_flow, beta=1.0)


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


@pytest.mark.statistical
@pytest.mark.parametrize("inverse_mass", [None, INVERSE_MASS], ids=["no_mass", "data_mass"])
def test_exact_law_is_invariant_and_a_wrong_accept_ratio_is_caught(
    latent_flow, mixture, reference_statistics, inverse_mass
):
    target = PosteriorPullback(latent_flow, mixture.log_prob)
    correct, broken = DataSpacePreconditioner(inverse_mass), DataSpaceWithoutReverseLadj(inverse_mass)
    check_invariance(target, correct, broken, mixture, reference_statistics)


@pytest.mark.parametrize("name", ["data_space", "jacobian"])
def test_warmup_adapts_the_data_space_mass_matrix_to_the_scales_of_the_target(name):
    """Data-space scales 0.01 and 100 behind a flow that contracts by a constant factor (x = c z,
    c about 0.18, so latent and data-space variances differ by 1 / c^2, about 32): the adapted
    C = M^-1 recovers the data-space variances (not the latent ones), and the adapted step size is of
    order one instead of the 1e-4 an isotropic step needs."""
    scales = torch.tensor([0.01, 100.0], dtype=torch.float64)
    normal = torch.distributions.Normal(torch.zeros(2, dtype=torch.float64), scales)
    contraction = identity_flow(2).double()
    with torch.no_grad():
        list(contraction.parameters())[1].fill_(math.log(10.0))  # the element-wise scale parameter
    flow = LatentFlow(contraction)
    factor = float(flow.to_data(torch.ones(1, 2, dtype=torch.float64))[0][0, 0])
    assert abs(factor - 1) > 0.5  # latent and data space really differ
    target = PosteriorPullback(flow, lambda x: normal.log_prob(x).sum(-1))
    initial_z = flow.to_latent(normal.sample((64,)))
    sampler = ChainSampler(target, 64, preconditioner=name, initial_z=initial_z, seed=0)
    sampler.warmup(300, progress=False)
    inverse_mass = sampler.preconditioner.metric.inverse_mass
    ratio = inverse_mass / scales.square()
    assert torch.all((ratio > 0.5) & (ratio < 2.0)), ratio
    assert float(sampler.step_size.median()) > 0.1
