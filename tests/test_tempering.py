"""The T2 preview (importance weights on naive draws) against T2 computed by quadrature."""

import math

import pytest
import torch
import zuko

from pyro_nfmala import LatentFlow, preview_tempering
from pyro_nfmala.engine.tempering import tempered_weights


def contracting_flow() -> LatentFlow:
    """A 1-D spline flow with random weights: its log-determinant ranges over several nats."""
    torch.manual_seed(0)
    flow = zuko.flows.NSF(1, transforms=2)
    for parameter in flow.parameters():
        torch.nn.init.normal_(parameter, std=1.0)
    return LatentFlow(flow).to(dtype=torch.float64)


def t2_mean_by_quadrature(flow: LatentFlow, beta: float) -> float:
    """E[f(z)] under pi_beta(z) ~ N(z; 0, 1) |det J_f(z)|^-beta, by the trapezoid rule in z."""
    z = torch.linspace(-10, 10, 40_001, dtype=torch.float64)[:, None]
    with torch.no_grad():
        x, ladj = flow.to_data(z)
    density = (flow.base_log_prob(z) - beta * ladj).exp()
    return float(torch.trapezoid(density * x[:, 0], z[:, 0]) / torch.trapezoid(density, z[:, 0]))


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_preview_matches_t2_by_quadrature(beta):
    flow = contracting_flow()
    preview = preview_tempering(
        flow, [0.0, beta], num_samples=100_000, generator=torch.Generator().manual_seed(1)
    )
    naive, tempered = preview.expect(preview.x[:, 0]).tolist()
    # standard error of a self-normalized estimate: sd under the weights / sqrt(ESS)
    mean_sq = preview.expect(preview.x[:, 0] ** 2)[1]
    standard_error = math.sqrt(float(mean_sq) - tempered**2) / math.sqrt(float(preview.ess[1]))
    exact = t2_mean_by_quadrature(flow, beta)
    assert abs(tempered - exact) < 5 * standard_error
    # negative control: the unweighted (naive) mean is far from T2's, so the test has power
    assert abs(naive - exact) > 20 * standard_error
    assert float(preview.ess[0]) == pytest.approx(100_000)
    assert float(preview.ess[1]) < 95_000  # the weights are not uniform


def test_weights_are_normalized_and_skip_non_finite_draws():
    weights, ess = tempered_weights(
        torch.tensor([0.0, math.log(2.0), float("nan"), -float("inf")], dtype=torch.float64), beta=1.0
    )
    assert weights.tolist() == pytest.approx([2 / 3, 1 / 3, 0.0, 0.0])
    assert float(ess) == pytest.approx(1 / (4 / 9 + 1 / 9))


@pytest.mark.parametrize("beta", [-0.5, float("nan"), float("inf")])
def test_invalid_beta_is_a_clear_error(beta):
    with pytest.raises(ValueError, match="beta must be"):
        tempered_weights(torch.zeros(3), beta)


def test_all_non_finite_is_a_clear_error():
    with pytest.raises(ValueError, match="no draw has a finite"):
        tempered_weights(torch.full((3,), float("nan")), 1.0)
