"""The posteriordb suite, slow: the one-line NFMALA on each of the ten posteriors against its reference.

    python -m pytest -m slow tests/test_posteriordb_posteriors.py

Each posterior: ``MCMC(NFMALA(model))`` in float64, 4 chains x (500 warmup + 1000 draws). Every
reference parameter's mean within 4.5 Monte Carlo standard errors (ours from our bulk ESS, the
reference's from its) and its sd within 4.5 relative standard errors (``sqrt((kurtosis - 1)/(4 ESS))``
each, with ArviZ's ESS for the sd: ``sqrt(1/(2 ESS))`` for a Gaussian, twice that for a heavy tail),
and the rank-normalized R-hat at most 1.01; or, where a run misses, the library must have said so
(a RuntimeWarning): a result may be slow to come, never silently wrong. ``benchmarks/posteriordb.py``
runs the same against Pyro's NUTS and reports the numbers.
"""

import math
import warnings

import arviz as az
import numpy as np
import pyro
import pytest
import torch

from pyro.infer import MCMC

from pyro_nfmala import NFMALA, from_arrays, to_inference_data
from pyro_nfmala.examples.posteriordb import MODELS, comparable_reference, derived, load_data, reference_names

pytestmark = [pytest.mark.slow, pytest.mark.posteriordb]


def relative_sd_error(draws: np.ndarray, ess: float) -> float:
    """The standard error of the sd of ``draws`` over the sd, from its ESS: ``sqrt((kurtosis - 1) / (4 ESS))``
    (the variance of a sample variance is ``(mu_4 - sigma^4) / n``; for a Gaussian this is
    ``sqrt(1 / (2 ESS))``, for the eight schools' tau, kurtosis 9-12, over twice that)."""
    centred = np.asarray(draws, dtype=np.float64).reshape(-1)
    centred = centred - centred.mean()
    kurtosis = float((centred**4).mean() / centred.var() ** 2)
    return math.sqrt(max(kurtosis - 1, 0.0) / (4 * max(ess, 1.0)))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_posterior_matches_the_reference_or_the_library_warns(name):
    pyro.set_rng_seed(0)
    kernel = NFMALA(MODELS[name], fit_options={"progress": False}, max_plate_nesting=1)
    mcmc = MCMC(kernel, num_samples=1000, warmup_steps=500, num_chains=4, disable_progbar=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mcmc.run(**load_data(name, dtype=torch.float64))
        to_inference_data(mcmc)
    warned = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    samples = {key: value.double().numpy() for key, value in mcmc.get_samples(group_by_chain=True).items()}
    reference = comparable_reference(name)
    flat = reference_names(derived(name, samples))
    ours = from_arrays({key: flat[key] for key in reference})
    ess, rhat = az.ess(ours, method="bulk"), az.rhat(ours)
    ess_sd = az.ess(ours, method="sd")
    reference_ess = az.ess(from_arrays(reference), method="bulk")
    reference_ess_sd = az.ess(from_arrays(reference), method="sd")
    misses = []
    for key, ref in reference.items():
        draws, n, n_ref = np.asarray(flat[key]), float(ess[key]), float(reference_ess[key])
        mcse = math.sqrt(draws.var() / n + ref.var() / n_ref)
        if abs(draws.mean() - ref.mean()) > 4.5 * mcse:
            misses.append(f"{key}: mean {draws.mean():.4g} vs {ref.mean():.4g} (MCSE {mcse:.2g})")
        sd_error = (
            relative_sd_error(draws, float(ess_sd[key])) ** 2
            + relative_sd_error(ref, float(reference_ess_sd[key])) ** 2
        )
        if abs(draws.std() / ref.std() - 1) > 4.5 * math.sqrt(sd_error):
            misses.append(
                f"{key}: sd {draws.std():.4g} vs {ref.std():.4g} (ESS for the sd {float(ess_sd[key]):.0f})"
            )
        if float(rhat[key]) > 1.01:
            misses.append(f"{key}: R-hat {float(rhat[key]):.3f}")
    assert not misses or warned, f"{name}: silently wrong: {misses}"
