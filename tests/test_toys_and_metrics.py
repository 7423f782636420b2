"""Toy targets (normalized densities that match their exact samplers) and metrics on cases with
known answers."""

import math

import pytest
import torch
import zuko

from pyro_nfmala import fit_flow_to_samples, load_flow, save_flow
from pyro_nfmala.examples.metrics import energy_distance, gap_mass, gap_threshold, mode_weights
from pyro_nfmala.examples.toys import (
    Banana,
    ConcentricRings,
    DoubleMoon,
    GaussianMixture,
    GaussianRing,
    NealFunnel,
)

TOYS_2D = [DoubleMoon(), GaussianRing(), ConcentricRings()]


def grid_integral(
    fn, half_width=6.0, n=1200
):  # even n: no node at the origin, where ConcentricRings has a (integrable) 1/r factor
    axis = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    xx = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1)
    values = fn(xx)
    return float(torch.trapezoid(torch.trapezoid(values, axis, dim=1), axis))


@pytest.mark.parametrize("toy", TOYS_2D, ids=lambda t: type(t).__name__)
def test_2d_densities_are_normalized_and_match_their_samplers(toy):
    density = lambda x: toy.log_prob(x).double().exp()  # noqa: E731
    assert grid_integral(density) == pytest.approx(1.0, abs=2e-3)
    # E[x1^2] and E[x2 * |x1|] by quadrature against the exact sampler, within 5 standard errors
    for h in (lambda x: x[..., 0] ** 2, lambda x: x[..., 1] * x[..., 0].abs() + x[..., 1] ** 2):
        expected = grid_integral(lambda x: density(x) * h(x))
        draws = h(toy.sample(200_000, generator=torch.Generator().manual_seed(0)).double())
        assert abs(float(draws.mean()) - expected) < 5 * float(draws.std()) / math.sqrt(len(draws))


def test_mixture_in_d_dimensions():
    toy = GaussianMixture(dim=16, weights=(0.7, 0.3))
    x = toy.sample(50_000, generator=torch.Generator().manual_seed(0))
    assert x.shape == (50_000, 16)
    weights = mode_weights(x, toy)
    assert torch.allclose(
        weights, torch.tensor([0.7, 0.3], dtype=torch.float64), atol=5 * math.sqrt(0.21 / 50_000)
    )
    assert float(torch.linalg.norm(toy.locs[0] - toy.locs[1])) == pytest.approx(6.0)


def test_banana_is_normalized_and_matches_its_sampler():
    banana = Banana(2, scale=3.0, curvature=0.5, dtype=torch.float64)
    u = torch.linspace(-18, 18, 1500, dtype=torch.float64)
    w = torch.linspace(-15, 90, 3000, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(u, w, indexing="ij"), -1)
    density = banana.log_prob(grid).exp()
    assert float(torch.trapezoid(torch.trapezoid(density, w, dim=1), u)) == pytest.approx(1.0, abs=1e-4)
    draws = banana.sample(200_000, generator=torch.Generator().manual_seed(0))
    # E[x2] = 0 and E[x2^2] = 1 + b^2 Var(u^2) = 1 + 2 b^2 a^4 = 41.5
    assert abs(float(draws[:, 1].mean())) < 5 * float(draws[:, 1].std()) / math.sqrt(len(draws))
    assert float(draws[:, 1].square().mean()) == pytest.approx(41.5, rel=0.03)
    assert Banana(20).sample(3).shape == (3, 20) and Banana(20).log_prob(torch.zeros(5, 20)).shape == (5,)
    with pytest.raises(ValueError, match="even"):
        Banana(3)


def test_funnel_density_and_sampler():
    funnel = NealFunnel(10, dtype=torch.float64)
    draws = funnel.sample(100_000, generator=torch.Generator().manual_seed(0))
    v, rest = draws[:, 0], draws[:, 1:]
    assert float(v.var()) == pytest.approx(9.0, rel=0.03)
    assert float((rest / (v / 2).exp().unsqueeze(-1)).var()) == pytest.approx(1.0, rel=0.02)
    x = torch.randn(6, 10, dtype=torch.float64)
    expected = torch.distributions.Normal(0.0, 3.0).log_prob(x[:, 0]) + torch.distributions.Normal(
        0.0, (x[:, :1] / 2).exp()
    ).log_prob(x[:, 1:]).sum(-1)
    torch.testing.assert_close(funnel.log_prob(x), expected)
    # normalized: integrate out x_2 numerically for a 2-D funnel, then v
    funnel2 = NealFunnel(2, dtype=torch.float64)
    vs = torch.linspace(-12, 12, 601, dtype=torch.float64)
    marginal = []
    for v0 in vs:
        xs = torch.linspace(-10, 10, 2001, dtype=torch.float64) * (v0 / 2).exp()
        marginal.append(torch.trapezoid(funnel2.log_prob(torch.stack([v0.expand_as(xs), xs], -1)).exp(), xs))
    assert float(torch.trapezoid(torch.stack(marginal), vs)) == pytest.approx(1.0, abs=1e-4)
    # deep in the neck the conditional scale underflows to 0: a density of -inf, not an error (a
    # distribution object would raise there, and an unregistered error stops the samplers)
    deep = funnel.log_prob(torch.tensor([-1500.0] + [0.1] * 9, dtype=torch.float64))
    assert deep == -float("inf")


def test_energy_distance_known_answers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 1, generator=g)
    assert energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    # N(0,1) vs N(1,1): 2E|X-Y| - E|X-X'| - E|Y-Y'| with X-Y ~ N(-1, 2), X-X' ~ N(0, 2)
    s = math.sqrt(2.0)
    e_xy = s * math.sqrt(2 / math.pi) * math.exp(-1 / (2 * s * s)) + (
        1 - 2 * 0.5 * math.erfc(1 / s / math.sqrt(2))
    )
    expected = 2 * e_xy - 2 * s * math.sqrt(2 / math.pi)
    y = torch.randn(4000, 1, generator=g) + 1.0
    assert energy_distance(x, y) == pytest.approx(expected, abs=0.03)
    assert energy_distance(x, torch.randn(4000, 1, generator=g)) < 0.01


def test_gap_mass_known_answers():
    moon = DoubleMoon()
    g = torch.Generator().manual_seed(1)
    threshold = gap_threshold(moon, level=0.01, generator=g)
    n = 50_000
    assert gap_mass(moon.sample(n, generator=g), moon, threshold) == pytest.approx(
        0.01, abs=5 * math.sqrt(0.01 * 0.99 / n)
    )
    bridge = torch.stack([torch.zeros(100), torch.linspace(-2, 2, 100)], -1)  # the vertical line x1 = 0
    assert gap_mass(bridge, moon, threshold) == 1.0
    assert gap_mass(torch.full((3, 2), float("nan")), moon, threshold) == 1.0


def test_mode_weights_known_answers():
    moon = DoubleMoon()
    x = torch.tensor([[-2.0, 0.1], [-1.5, -1.0], [2.0, 0.0], [-2.1, 0.0]])
    assert mode_weights(x, moon).tolist() == [0.75, 0.25]
    ring = GaussianRing(num_modes=4, radius=4.0)
    assert mode_weights(torch.tensor([[4.0, 0.1], [0.0, 3.9], [0.1, -4.0], [0.0, -4.2]]), ring).tolist() == [
        0.25,
        0.25,
        0.0,
        0.5,
    ]


def test_fit_to_samples_improves_and_round_trips_through_save_and_load(tmp_path):
    torch.manual_seed(0)
    data = DoubleMoon().sample(2000)
    flow = zuko.flows.RealNVP(2)
    before = float(-flow().log_prob(data).mean())
    result = fit_flow_to_samples(data, flow, num_steps=150, progress=False)
    after = float(-flow().log_prob(data).mean())
    assert after < before - 0.5 and len(result.losses) == 150
    path = tmp_path / "flow.pt"
    save_flow(flow, path, spec={"name": "RealNVP", "args": [2]}, losses=result.losses)
    loaded, metadata = load_flow(path, with_metadata=True)
    z = torch.randn(10, 2)
    assert torch.equal(loaded().transform.inv(z), flow().transform.inv(z))
    assert metadata["losses"] == result.losses
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not written by pyro_nfmala.save_flow"):
        load_flow(tmp_path / "other.pt")
