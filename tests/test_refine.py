"""Flow refinement in warmup: when it happens, what it changes (and what it must not), and errors."""

import math

import pytest
import torch
import zuko

from pyro_nfmala import ChainSampler, LatentFlow, PosteriorPullback, TemperedFlow
from pyro_nfmala.refine import FlowRefiner

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
