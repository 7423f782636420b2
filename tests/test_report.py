"""Per-chain reports: a chain that disagrees with the others or is slow is named, good chains are not."""

import warnings

import pyro
import pytest
import torch

from pyro.infer import MCMC
from test_independence import bimodal

from pyro_nfmala import NFMALA, identity_flow, to_inference_data
from pyro_nfmala.output.convergence import chain_reports, warn_about_chains


def autocorrelated(shape, rho=0.9, seed=0):
    """AR(1) chains of unit stationary variance along dim 1: chains of one law, as MCMC gives."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=generator, dtype=torch.float64) * (1 - rho**2) ** 0.5
    chains = torch.zeros(shape, dtype=torch.float64)
    chains[:, 0] = torch.randn(shape[0], *shape[2:], generator=generator, dtype=torch.float64)
    for t in range(1, shape[1]):
        chains[:, t] = rho * chains[:, t - 1] + noise[:, t]
    return chains


def test_a_chain_stuck_elsewhere_is_named_and_chains_of_one_law_are_not():
    """Negative control first: 40 runs of 4 AR(1) chains with 20 coordinates each flag nothing; a chain
    moved to another mode (one coordinate of a vector site) is named with that coordinate, the others not."""
    for seed in range(40):
        assert not any(
            report.disagrees for report in chain_reports({"x": autocorrelated((4, 500, 20), seed=seed)})
        )
    x = autocorrelated((4, 500, 3), seed=1)
    x[2, :, 1] += 6.0
    reports = chain_reports({"x": x, "y": autocorrelated((4, 500), seed=2)})
    assert [report.chain for report in reports if report.disagrees] == [2]
    assert list(reports[2].disagreements) == ["x[1]"] and reports[2].disagreements["x[1]"] > 6
    with pytest.warns(RuntimeWarning, match=r"chain 2 disagrees with the other chains on 'x\[1\]'"):
        assert warn_about_chains(reports)


def test_a_chain_that_never_moved_is_named_as_stuck_not_with_the_largest_double():
    """A stuck chain's draws have no spread: its z-score is infinite, and the warning says the chain is stuck
    (it printed z = -1797693134862315708..., the largest double, from nan_to_num)."""
    x = autocorrelated((4, 500), seed=3)
    x[1] = 2.0
    reports = chain_reports({"loc": x})
    assert reports[1].disagreements["loc"] == float("inf")
    with pytest.warns(RuntimeWarning) as caught:
        warn_about_chains(reports)
    message = str(caught[0].message)
    assert "z = +inf: its draws never changed, the chain is stuck" in message and "17976931" not in message


def test_a_slow_chain_is_named():
    reports = chain_reports({"x": autocorrelated((4, 100))}, [0.01, 0.012, 0.011, 0.05])
    assert [report.slow for report in reports] == [False, False, False, True]
    with pytest.warns(RuntimeWarning, match=r"chain 3 took 0.05 s per draw, 4.5x the chains' median"):
        warn_about_chains(reports)
    assert not any(
        report.slow for report in chain_reports({"x": autocorrelated((4, 100))}, [1.0, 1.1, 0.9, 2.5])
    )


def test_one_chain_or_no_draws_reports_nothing():
    assert not chain_reports({"x": autocorrelated((1, 100))})[0].disagrees
    assert chain_reports({}, [1.0, 2.0])[1].seconds_per_draw == 2.0


def test_an_nfmala_run_whose_chains_sit_in_different_modes_names_them():
    """Plain MALA (no fit, no global moves) started in each mode: the chains never cross, and both
    to_inference_data and the end of the run name the chains that disagree; the diagnostics give each
    chain's time per draw."""
    pyro.set_rng_seed(0)
    kernel = NFMALA(
        bimodal, flow=identity_flow(1), step_size=0.3, adapt_step_size=False, independence_every=None
    )
    mcmc = MCMC(
        kernel,
        num_samples=200,
        warmup_steps=0,
        num_chains=2,
        initial_params={"loc": torch.tensor([-3.0, 3.0])},
        disable_progbar=True,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mcmc.run()
        to_inference_data(mcmc, log_likelihood=False)
    messages = [str(w.message) for w in caught]
    assert sum("chain 0 disagrees with the other chains on 'loc'" in m for m in messages) == 2, messages
    seconds = mcmc.diagnostics()["seconds per draw"]
    assert all(0 < value < 1 for value in seconds.values())
