"""The staged fit is bounded and never crashes: a time budget, fallbacks with a warning, the flow stage
adapted by chains; and a run that may be wrong says so at the end of each chain."""

import math
import time
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro.infer import MCMC

import pyro_nfmala
import pyro_nfmala.fit.staged as fit_module

from pyro_nfmala import NFMALA, ChainSampler
from pyro_nfmala.examples.posteriordb import (
    eight_schools_centered,
    eight_schools_centered_vector,
    eight_schools_data,
)
from pyro_nfmala.fit.check import check_flow
from pyro_nfmala.fit.staged import fit_staged_map
from pyro_nfmala.flows.staged import StagedFlow, affine_flow
from pyro_nfmala.samplers.run import PosteriorRun


def banana(x):
    """A curved ridge no Gaussian holds: x1 ~ N(0, 1.5^2), x2 | x1 ~ N(x1^2, 0.1^2)."""
    return -0.5 * (x[..., 0] / 1.5).square() - 0.5 * ((x[..., 1] - x[..., 0].square()) / 0.1).square()


def starts(d=2):
    return torch.zeros(2, d, dtype=torch.float64)


def test_a_failed_gaussian_fit_warns_and_keeps_the_laplace_map(monkeypatch):
    def failing_fit(*args, **kwargs):
        raise FloatingPointError("the loss or its gradient was not finite in any of 100 steps")

    monkeypatch.setattr(fit_module, "fit_flow", failing_fit)
    with pytest.warns(RuntimeWarning, match="gaussian stage of the staged fit failed"):
        result = fit_staged_map(banana, starts(), progress=False, flow_stage="reverse_kl")
    assert result.stage == "laplace"  # no crash: the best map so far


def test_with_no_gaussian_at_all_the_map_is_the_mode_with_diagonal_scales(monkeypatch):
    def flat_in_one_direction(x):  # no positive definite Hessian: no Laplace map
        return -0.5 * ((x[..., 0] - 3.0) / 0.1) ** 2 - 0.0 * x[..., 1]

    def failing_fit(*args, **kwargs):
        raise FloatingPointError("not finite")

    monkeypatch.setattr(fit_module, "fit_flow", failing_fit)
    monkeypatch.setattr(fit_module, "adapt_flow_with_chains", failing_fit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit_staged_map(flat_in_one_direction, starts(), progress=False)
    messages = [str(w.message) for w in caught]
    assert any("gaussian stage" in m for m in messages) and any("flow stage" in m for m in messages)
    assert result.stage == "diagonal"
    assert abs(float(result.flow.loc[0]) - 3.0) < 1e-3


def test_a_spent_budget_stops_the_fit_says_so_and_returns_a_map():
    with pytest.warns(RuntimeWarning, match="spent its time budget"):
        result = fit_staged_map(banana, starts(), progress=False, max_seconds=0.05)
    assert result.budget_spent
    assert result.stage in ("laplace", "gaussian", "flow")
    assert result.seconds < 30


def test_the_budget_stops_a_fit_whose_steps_are_mostly_not_finite():
    """Found on the 2,519-parameter stochastic volatility posterior: the dense Gaussian fit's steps were
    mostly non-finite, and a non-finite step skipped the budget's check: a 300 s budget ran 26 minutes.
    Here a loss finite for its first five steps and never after, 3,000 steps of at least 2 ms: the fit
    stops within its 2 s."""
    calls = []

    def soon_nan(x):
        calls.append(1)
        time.sleep(0.002)
        value = -0.5 * x.square().sum(-1)
        return value if len(calls) <= 5 else torch.full_like(value, float("nan"))

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flow = StagedFlow(torch.zeros(2), torch.eye(2), affine_flow(torch.zeros(2), torch.eye(2)))
        result = pyro_nfmala.fit_flow(soon_nan, flow, num_steps=3000, max_seconds=2.0, progress=False)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.2, elapsed  # 10% over the budget
    assert result.budget_spent and len(calls) < 3000


def test_the_budget_bounds_the_mode_search_and_the_centring_trials_together():
    """NFMALA's fit of the centred eight schools with a 1 s budget took 18 s: the mode search was not
    bounded, and the centred and non-centred trials had a budget each. Now one budget bounds them all
    (what is left over is the flow check of each map found, about a second each)."""
    torch.manual_seed(0)
    kernel = NFMALA(eight_schools_centered, fit_options={"max_seconds": 1.0, "progress": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        MCMC(kernel, num_samples=2, warmup_steps=2, disable_progbar=True).run(**eight_schools_data())
    assert kernel.fit_result.budget_spent
    assert kernel.fit_result.seconds < 9  # measured 3.1 s (18 s before); not a timing claim


def setup_seconds(model, max_seconds):
    """The wall time of a run's whole setup (density, coordinates, fit, flow check, the modes of the
    chains' starts) and of starting four chains on it, with ``max_seconds`` as its budget."""
    torch.manual_seed(0)
    spec = NFMALA(model, fit_options={"max_seconds": max_seconds, "progress": False}).spec
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PosteriorRun(spec, (), eight_schools_data()).start(4)
    return time.perf_counter() - start


@pytest.mark.parametrize("model", [eight_schools_centered, eight_schools_centered_vector])
def test_the_budget_bounds_the_whole_setup_within_ten_percent(model):
    """``max_seconds`` bounds every trial and stage of the setup, its flow checks and mode searches
    included, within 10%. Before, each stage got at least a second however late, each flow check
    evaluated all its 4,000 draws past the budget, and the chains' starts were searched for modes
    with no bound: the vector spelling of the eight schools (evaluated point by point) took 137 s of a
    120 s budget; with a 4 s budget the plate and vector spellings took 5.1 s and 8.6 s."""
    seconds = setup_seconds(model, 4.0)
    assert seconds <= 4.4, seconds


@pytest.mark.parametrize("seconds", [0, -1.0, "10", True])
def test_a_bad_budget_is_a_clear_error(seconds):
    with pytest.raises(ValueError, match="max_seconds"):
        fit_staged_map(banana, starts(), progress=False, max_seconds=seconds)


def test_a_bad_flow_stage_is_a_clear_error():
    with pytest.raises(ValueError, match="flow_stage"):
        fit_staged_map(banana, starts(), progress=False, flow_stage="magic")


@pytest.mark.statistical
def test_the_chains_adapt_a_flow_that_holds_the_curved_ridge():
    """The Gaussian stages fail the flow check on the banana; the flow adapted by the chains (score
    matching plus maximum likelihood on their draws and gradients) passes it, within the budget."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fit_staged_map(banana, starts(), progress=False)
    gaussian = check_flow(StagedFlow(result.flow.loc, result.flow.scale_tril), banana)
    assert result.stage == "flow" and not result.budget_spent
    assert result.check.khat < 0.55 < 0.6 < gaussian.khat  # measured: 0.49 and 0.66


# ----------------------------------------------------------------------------------------------
# a run that may be wrong says so


def normal_model(data):
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    pyro.sample("obs", dist.Normal(loc, 1.0).expand([len(data)]).to_event(1), obs=data)


@pytest.mark.statistical
def test_chains_too_short_to_trust_warn_at_the_end_of_the_run_and_good_chains_do_not():
    data = torch.randn(20, dtype=torch.float64) + 3.0
    pyro.set_rng_seed(0)
    kernel = NFMALA(normal_model, fit_options={"progress": False}, independence_every=None)
    short = MCMC(kernel, num_samples=30, warmup_steps=30, num_chains=2, disable_progbar=True)
    with pytest.warns(RuntimeWarning, match=r"NFMALA's chains \(2 in this process so far\) may not"):
        short.run(data)
    pyro.set_rng_seed(0)
    kernel = NFMALA(normal_model, fit_options={"progress": False})  # the exact map: nearly iid draws
    good = MCMC(kernel, num_samples=400, warmup_steps=100, num_chains=2, disable_progbar=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        good.run(data)
    assert not [w for w in caught if "may not have converged" in str(w.message)]
    assert math.isfinite(float(good.get_samples()["loc"].mean()))


def doubtful_warning(door: str) -> str:
    """The end-of-run warning of short chains on the centred eight schools, sampled centred through a
    Gaussian map, by either door."""
    pyro.set_rng_seed(0)
    options = {"parameterization": "centred", "fit_options": {"progress": False, "flow_stage": "none"}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if door == "ChainSampler":
            sampler = ChainSampler.from_model(
                eight_schools_centered, model_kwargs=eight_schools_data(), num_chains=4, seed=0, **options
            )
            sampler.run(100, 100, progress=False, log_likelihood=False)
        else:
            mcmc = pyro_nfmala.MCMC(NFMALA(eight_schools_centered, **options), 100, 100, num_chains=4)
            mcmc.run(**eight_schools_data())
    return " ".join(str(w.message) for w in caught if "may not have converged" in str(w.message))


@pytest.mark.parametrize("door", ["ChainSampler", "MCMC"])
def test_a_doubtful_run_names_the_failing_sites_and_the_likely_cause(door):
    """The warning named the worst site only and said to run longer. It now names every failing site
    with its R-hat and ESS, and what in the run most likely kept them from converging: here the centred
    hierarchical site (a funnel) and the map that fails the flow check, with the sites it misses."""
    message = doubtful_warning(door)
    assert "'tau' (R-hat" in message and "ESS" in message
    assert "'theta' is a location-scale site" in message and "parameterization='non-centred'" in message
    assert "fails the flow check" in message and "misses the chains' draws most on '" in message
