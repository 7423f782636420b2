"""Checks that the NumPyro posteriordb models (``numpyro_models.POSTERIORDB_MODELS``) have the Pyro
models' potential energy: at 5 standard-normal points of the unconstrained space per model, Pyro's
``initialize_model`` potential and NumPyro's ``potential_energy`` agree to 1e-8 relative (float64).
Prints a table; exits 1 on any failure.

Usage: ``python benchmarks/check_numpyro_models.py``
"""

from __future__ import annotations

import sys

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402

from numpyro.infer.util import potential_energy  # noqa: E402
from numpyro_models import POSTERIORDB_MODELS  # noqa: E402
from pyro.infer.mcmc.util import initialize_model  # noqa: E402

from pyro_nfmala.examples.posteriordb import MODELS, load_data  # noqa: E402
from pyro_nfmala.model.density import default_init  # noqa: E402

POINTS = 5
TOLERANCE = 1e-8


def check(name: str, generator: torch.Generator) -> tuple[float, float]:
    """The largest absolute and relative difference of the two potentials over ``POINTS`` points."""
    data = load_data(name, dtype=torch.float64)
    init_params, potential_fn, _, _ = initialize_model(
        MODELS[name], model_kwargs=data, init_strategy=default_init, max_plate_nesting=1
    )
    model, numpyro_data = POSTERIORDB_MODELS[name]()
    worst_abs = worst_rel = 0.0
    for _ in range(POINTS):
        point = {
            site: torch.randn(value.shape, dtype=torch.float64, generator=generator)
            for site, value in init_params.items()
        }
        pyro_energy = float(potential_fn(point))
        numpyro_point = {site: jax.numpy.asarray(value.numpy()) for site, value in point.items()}
        numpyro_energy = float(potential_energy(model, (), numpyro_data, numpyro_point))
        difference = abs(pyro_energy - numpyro_energy)
        worst_abs = max(worst_abs, difference)
        worst_rel = max(worst_rel, difference / max(abs(pyro_energy), 1e-300))
    return worst_abs, worst_rel


def main() -> int:
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    pyro.set_rng_seed(0)
    generator = torch.Generator().manual_seed(0)
    failures = 0
    print(f"{'model':<22}{'max abs diff':>14}{'max rel diff':>14}  result")
    for name in POSTERIORDB_MODELS:
        worst_abs, worst_rel = check(name, generator)
        passed = worst_rel <= TOLERANCE and np.isfinite(worst_rel)
        failures += not passed
        print(f"{name:<22}{worst_abs:>14.3e}{worst_rel:>14.3e}  {'pass' if passed else 'FAIL'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
