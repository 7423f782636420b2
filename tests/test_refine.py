"""Flow refinement in warmup: when it happens, what it changes (and what it must not), and errors."""

import math

import pytest
import torch
import zuko

from pyro_nfmala import ChainSampler, LatentFlow, PosteriorPullback, TemperedFlow
from pyro_nfmala.engine.refine import FlowRefiner
from pyro_nfmala.flows.staged import StagedFlow

LOC = torch.tensor([3.0, -2.0])


def shifted_normal(x):
    return -0.5 * (x - LOC).square().sum(-1)


def untrained_flow():
    torch.manual_seed(0)
    return zuko.flows.NSF(2, transforms=2, hidden_features=(16, 16))


@pytest.mark.statistical
def test_refinement_in_warmup_learns_the_target_and_then_the_flow_is_fixed():
    """A flow that knows nothing of N((3, -2), I): refined on the chains' states in warmup, its base
    becomes a good proposal (the independence moves are accepted far more often), the user's flow is
    not touched, and sampling runs with one fixed flow; the draws are right within 4 standard errors."""
    flow = untrained_flow()
    before = [p.detach().clone() for p in flow.parameters()]
    rates = {}
    for refine_every in (None, 10):
        sampler = ChainSampler(
            PosteriorPullback(flow, shifted_normal),
            256,
            independence_every=1,
            refine_every=refine_every,
            refine_options={"steps": 20, "lr": 1e-2},
            seed=0,
        )
        sampler.warmup(200, progress=False)
        warm_flow = sampler.flow
        idata = sampler.sample(50, progress=False)
        assert sampler.flow is warm_flow  # fixed after warmup
        rates[refine_every] = float(idata.sample_stats["independence_accept_prob"].mean())
        if refine_every:
            assert sampler.refinements == 150 // 10  # not in the last quarter of warmup
            x = torch.as_tensor(idata.posterior["x"].values).reshape(-1, 2)
            assert ((x.mean(0) - LOC).abs() < 4 / math.sqrt(256)).all()
    assert rates[None] < 0.3 < 0.6 < rates[10]
    assert all(torch.equal(a, b) for a, b in zip(before, flow.parameters()))


def test_refinement_is_for_the_posterior_pullback_only():
    with pytest.raises(ValueError, match="posterior pull-back"):
        ChainSampler(TemperedFlow(untrained_flow(), beta=1.0), 8, refine_every=5)


@pytest.mark.parametrize("every", [0, -3, 2.5, True])
def test_a_bad_refinement_schedule_is_a_clear_error(every):
    with pytest.raises(ValueError, match="refine_every"):
        ChainSampler(PosteriorPullback(untrained_flow(), shifted_normal), 8, refine_every=every)


@pytest.mark.parametrize("options, match", [({"steps": 0}, "steps"), ({"lr": -1.0}, "lr")])
def test_bad_refinement_options_are_clear_errors(options, match):
    with pytest.raises(ValueError, match=match):
        ChainSampler(
            PosteriorPullback(untrained_flow(), shifted_normal), 8, refine_every=5, refine_options=options
        )


def test_every_count_option_takes_numpy_integers_and_refuses_the_same_non_integers():
    """One rule for every count: ``refine_options={"steps": numpy.int64(20)}`` was refused where
    ``independence_tries=numpy.int64(8)`` was accepted (two rules in two modules)."""
    import numpy as np

    target = PosteriorPullback(untrained_flow(), shifted_normal)
    sampler = ChainSampler(
        target,
        np.int64(4),
        independence_every=np.int64(1),
        independence_tries=np.int64(8),
        refine_every=np.int64(5),
        refine_options={"steps": np.int64(20), "batch_size": np.int32(64), "buffer_size": np.int64(128)},
    )
    assert (sampler.num_chains, sampler.independence_tries, sampler.refine_every) == (4, 8, 5)
    assert (sampler.refiner.steps, sampler.refiner.batch_size) == (20, 64)
    for value in (np.float64(2.5), True, 0):
        for options in (
            {"refine_options": {"steps": value}},
            {"independence_tries": value},
            {"independence_every": value},
            {"refine_every": value},
        ):
            with pytest.raises(ValueError, match="must be"):
                ChainSampler(target, 4, **{"refine_every": 5, **options})


def test_a_flow_given_as_a_distribution_cannot_be_refined():
    flow = LatentFlow(untrained_flow()().__class__(untrained_flow()().transform, untrained_flow()().base))
    with pytest.raises(TypeError, match="trained further"):
        FlowRefiner(flow)


def test_a_refinement_that_breaks_the_flow_warns_and_keeps_the_flow():
    sampler = ChainSampler(
        PosteriorPullback(untrained_flow(), shifted_normal),
        16,
        refine_every=2,
        refine_options={"lr": 1e30, "steps": 3},  # Adam steps that send the parameters to inf
        seed=0,
    )
    flow = sampler.flow
    with pytest.warns(RuntimeWarning, match="refinement failed"):
        sampler.warmup(8, progress=False)
    assert sampler.flow is flow and sampler.refinements == 0
    assert torch.isfinite(sampler.state.x).all()


def scores_of_shifted_normal(flow, x):
    """The latent gradients of the posterior pull-back of N(LOC, I) at data points x, under flow."""
    z = flow.to_latent(x).detach().requires_grad_(True)
    x_of_z, ladj = flow.to_data(z)
    (grad,) = torch.autograd.grad((shifted_normal(x_of_z) + ladj).sum(), z)
    return grad


@pytest.mark.parametrize("loss", ["fisher", "fisher+likelihood"])
def test_score_matching_recovers_a_shifted_normal_from_points_and_their_gradients(loss):
    """Points of N(LOC, I) with their latent gradients under an untrained affine flow: the data-space
    scores recovered from them are exact, and refining on them moves the flow onto the target."""
    torch.manual_seed(0)
    flow = LatentFlow(zuko.flows.RealNVP(2, transforms=3, hidden_features=(16, 16)))
    x = torch.randn(2000, 2) + LOC
    refiner = FlowRefiner(flow, loss=loss, steps=300, lr=1e-2)
    refiner.add(x, scores_of_shifted_normal(flow, x), flow)
    assert torch.allclose(refiner._scores, -(x - LOC), atol=1e-4)
    refined = refiner.refine()
    draws = refined.to_data(torch.randn(4000, 2))[0]
    assert (draws.mean(0) - LOC).abs().max() < 0.1
    assert (draws.std(0) - 1).abs().max() < 0.1


def test_the_fisher_loss_needs_gradients_and_the_default_loss_depends_on_the_flow():
    flow = LatentFlow(zuko.flows.RealNVP(2, transforms=1))
    with pytest.raises(ValueError, match="latent gradients"):
        FlowRefiner(flow, loss="fisher").add(torch.randn(4, 2))
    assert FlowRefiner(flow).loss == "likelihood"
    staged = LatentFlow(StagedFlow(torch.zeros(2), torch.eye(2), zuko.flows.RealNVP(2, transforms=1)))
    assert FlowRefiner(staged).loss == "fisher+likelihood"
    with pytest.raises(ValueError, match="loss"):
        FlowRefiner(flow, loss="kl")


def test_the_buffer_keeps_the_most_recent_points():
    refiner = FlowRefiner(LatentFlow(zuko.flows.RealNVP(2, transforms=1)), buffer_size=5)
    refiner.add(torch.zeros(4, 2))
    refiner.add(torch.ones(3, 2))
    refiner.add(torch.full((1, 2), float("nan")))  # left out
    assert refiner.num_points == 5
    assert torch.equal(refiner._points, torch.tensor([[0.0, 0.0]] * 2 + [[1.0, 1.0]] * 3))


@pytest.mark.parametrize("loss", ["fisher+likelihood", "likelihood"])
def test_a_staged_maps_flow_stage_trains_in_single_precision_on_the_same_loss(loss):
    """The float32 path (points whitened by the Gaussian stage in float64, far from the origin here)
    gives the float64 loss to float32 accuracy, trains only the flow stage, and hands back a float64
    map whose flow stage holds the float32 parameters it learnt."""
    torch.manual_seed(0)
    loc = torch.tensor([1000.0, -3.0, 0.5], dtype=torch.float64)
    scale_tril = torch.tensor([[0.01, 0, 0], [0.005, 2.0, 0], [0.0, 0.3, 0.5]], dtype=torch.float64)
    staged = StagedFlow(
        loc, scale_tril, zuko.flows.RealNVP(3, transforms=2, hidden_features=(16, 16)).double()
    )
    points = loc + (scale_tril @ torch.randn(300, 3, 1, dtype=torch.float64)).squeeze(-1) * 1.3
    precision = torch.cholesky_inverse(scale_tril)
    scores = -((points - loc) @ precision) / 1.3**2  # the scores of N(loc, 1.3^2 L L^T)
    losses = {}
    for single in (False, True):
        refiner = FlowRefiner(
            LatentFlow(staged), loss=loss, steps=1, lr=1e-3, batch_size=512, single_precision=single
        )
        refiner._points, refiner._scores = (
            points,
            None if loss == "likelihood" else scores,
        )  # as add() keeps them
        refined = refiner.refine()
        losses[single] = refiner.losses[0]
        assert refined.dtype == torch.float64
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    module = refiner.module
    torch.testing.assert_close(module.loc, loc, rtol=0, atol=0)
    torch.testing.assert_close(module.scale_tril, scale_tril, rtol=0, atol=0)
    trained = list(refiner._stage32.transform.parameters())
    kept = list(module.transform.transforms[1].parameters())
    assert all(k.dtype == torch.float64 for k in kept)
    assert all(torch.equal(k, t.double()) for k, t in zip(kept, trained))
    before = list(staged.transform.transforms[1].parameters())
    assert any(not torch.equal(k, b) for k, b in zip(kept, before))  # it learnt; the given map is untouched
