"""Checks that the NumPyro models have the Pyro models' potential energy (float64, at 5 standard-normal
points of the unconstrained space per model, Pyro's ``initialize_model`` potential against NumPyro's
``potential_energy``):

- the posteriordb models (``numpyro_models.POSTERIORDB_MODELS``): equal to 1e-8 relative;
- inference-gym's four posteriors and the Brownian motion with unknown scales
  (``numpyro_models.INFERENCE_GYM_MODELS``, Pyro's in ``pyro_nfmala.examples.inference_gym``): equal up to an
  additive constant, the differences between the points agreeing to 1e-8 relative to the potential's
  size (the constant is printed; both sides keep every normalizing constant, so it is about 0).

Prints a table for each set; exits 1 on any failure. The posteriordb models need ``$PYRO_NFMALA_POSTERIORDB``
and the inference-gym posteriors ``$PYRO_NFMALA_INFERENCE_GYM``; a set whose folder is not available is
skipped, saying so.

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
from numpyro_models import INFERENCE_GYM_MODELS, POSTERIORDB_MODELS  # noqa: E402
from pyro.infer.mcmc.util import initialize_model  # noqa: E402

from pyro_nfmala.examples import inference_gym, posteriordb  # noqa: E402
from pyro_nfmala.model.density import default_init  # noqa: E402

POINTS = 5
TOLERANCE = 1e-8


def energies(pyro_model, pyro_data, numpyro_model, numpyro_data, generator) -> tuple[np.ndarray, np.ndarray]:
    """Pyro's and NumPyro's potential energies at ``POINTS`` standard-normal unconstrained points."""
    init_params, potential_fn, _, _ = initialize_model(
        pyro_model, model_kwargs=pyro_data, init_strategy=default_init, max_plate_nesting=1
    )
    pyro_energy, numpyro_energy = [], []
    for _ in range(POINTS):
        point = {
            site: torch.randn(value.shape, dtype=torch.float64, generator=generator)
            for site, value in init_params.items()
        }
        pyro_energy.append(float(potential_fn(point)))
        numpyro_point = {site: jax.numpy.asarray(value.numpy()) for site, value in point.items()}
        numpyro_energy.append(float(potential_energy(numpyro_model, (), numpyro_data, numpyro_point)))
    return np.array(pyro_energy), np.array(numpyro_energy)


def check(name: str, generator: torch.Generator) -> tuple[float, float]:
    """posteriordb: the largest absolute and relative difference of the two potentials over the points."""
    data = posteriordb.load_data(name, dtype=torch.float64)
    model, numpyro_data = POSTERIORDB_MODELS[name]()
    pyro_energy, numpyro_energy = energies(posteriordb.MODELS[name], data, model, numpyro_data, generator)
    difference = np.abs(pyro_energy - numpyro_energy)
    return float(difference.max()), float((difference / np.maximum(np.abs(pyro_energy), 1e-300)).max())


def check_up_to_a_constant(name: str, generator: torch.Generator) -> tuple[float, float, float]:
    """inference-gym: the constant (NumPyro's potential minus Pyro's at the first point), and the largest
    absolute and relative (to the largest potential) spread of that difference over the points."""
    if name == "brownian_motion_unknown_scales":
        pyro_model, data = inference_gym.brownian_motion_unknown_scales, inference_gym.brownian_motion_data()
    else:
        pyro_model, data = inference_gym.MODELS[name], inference_gym.load_data(name, dtype=torch.float64)
    model, numpyro_data = INFERENCE_GYM_MODELS[name]()
    pyro_energy, numpyro_energy = energies(pyro_model, data, model, numpyro_data, generator)
    difference = numpyro_energy - pyro_energy
    spread = float(np.abs(difference - difference[0]).max())
    if not np.ptp(pyro_energy) > 0:  # the points must differ, or the check is vacuous
        spread = float("nan")
    return float(difference[0]), spread, spread / max(float(np.abs(pyro_energy).max()), 1.0)


def main() -> int:
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    pyro.set_rng_seed(0)
    generator = torch.Generator().manual_seed(0)
    failures = 0
    if posteriordb.available():
        print(f"{'model':<22}{'max abs diff':>14}{'max rel diff':>14}  result")
        for name in POSTERIORDB_MODELS:
            worst_abs, worst_rel = check(name, generator)
            passed = worst_rel <= TOLERANCE and np.isfinite(worst_rel)
            failures += not passed
            print(f"{name:<22}{worst_abs:>14.3e}{worst_rel:>14.3e}  {'pass' if passed else 'FAIL'}")
    else:
        print(f"posteriordb models skipped: {posteriordb.ENV_VAR} does not name a folder with their data")
    print()
    names = list(INFERENCE_GYM_MODELS)
    if not inference_gym.available():
        print(
            f"inference-gym posteriors skipped: {inference_gym.ENV_VAR} does not name a folder with their "
            "data"
        )
        names = ["brownian_motion_unknown_scales"]
    print(f"{'model (up to a constant)':<36}{'constant':>12}{'max abs diff':>14}{'max rel diff':>14}  result")
    for name in names:
        constant, spread, relative = check_up_to_a_constant(name, generator)
        passed = relative <= TOLERANCE and np.isfinite(relative) and np.isfinite(constant)
        failures += not passed
        print(f"{name:<36}{constant:>12.3e}{spread:>14.3e}{relative:>14.3e}  {'pass' if passed else 'FAIL'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
