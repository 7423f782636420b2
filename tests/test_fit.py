"""Fitting flows: a fit that cannot be finite is an error naming the cause, never NaN parameters."""

import pytest
import torch
import zuko

from pyro_nfmala import fit_flow


def test_a_loss_that_is_never_finite_raises_early():
    calls = []

    def log_prob(x):
        calls.append(1)
        return torch.full(x.shape[:-1], float("nan"))

    with pytest.raises(FloatingPointError, match="not finite in any of 100 steps"):
        fit_flow(log_prob, zuko.flows.RealNVP(2), num_steps=1000, progress=False)
    assert len(calls) == 100  # it stops there, not after 1,000 useless steps


def test_gradients_that_are_never_finite_raise_and_leave_finite_parameters():
    """A finite loss with NaN gradients (sqrt at 0) would have made every parameter NaN."""
    flow = zuko.flows.RealNVP(2)

    def log_prob(x):
        return -torch.sqrt((x - x).square().sum(-1))  # 0, with a NaN gradient

    with pytest.raises(FloatingPointError, match="or its gradient was not finite"):
        fit_flow(log_prob, flow, num_steps=150, progress=False)
    assert all(bool(torch.isfinite(p).all()) for p in flow.parameters())


def test_a_few_non_finite_steps_are_skipped_with_a_warning_when_most_are():
    generator = torch.Generator().manual_seed(0)

    def log_prob(x):  # NaN on 70% of the steps
        value = -0.5 * x.square().sum(-1)
        return value * float("nan") if float(torch.rand((), generator=generator)) < 0.7 else value

    with pytest.warns(RuntimeWarning, match="had a non-finite loss or gradient and were skipped"):
        result = fit_flow(log_prob, zuko.flows.RealNVP(2), num_steps=200, progress=False)
    assert all(bool(torch.isfinite(p).all()) for p in result.flow.parameters())
