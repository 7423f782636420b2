r"""Reference posteriors from posteriordb, their models written in Pyro, and the comparison.

posteriordb's gold-standard draws (long Stan NUTS runs, 10 chains of 1,000 draws) ship with the
package (``pyro_nfmala/examples/data/posteriordb``, BSD 3-Clause), so checks run offline:

- ``"eight_schools"``: the classic hierarchical funnel, :math:`(\mu, \tau, \theta_{1..8})`;
  :func:`eight_schools_centered` is the centred Pyro model (the hard one, with the funnel);
- ``"low_dim_gauss_mix"``: a two-component 1-D Gaussian mixture with ordered means, positive
  scales and a weight in (0, 1): :func:`low_dim_gauss_mix`.

:func:`standardized_errors` compares any draws with the reference, per parameter, in units of
the reference standard deviation.

Example:
    >>> data = load_data("eight_schools")
    >>> reference = load_reference("eight_schools")
    >>> reference["tau"].shape
    (10, 1000)
"""

from __future__ import annotations

__all__ = [
    "OrderedNormal",
    "eight_schools_centered",
    "load_data",
    "load_reference",
    "low_dim_gauss_mix",
    "reference_names",
    "standardized_errors",
]

import json
import math
import zipfile

from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from pyro.distributions import constraints

DATA = Path(__file__).resolve().parent / "data" / "posteriordb"
POSTERIORS = {
    "eight_schools": ("eight_schools-eight_schools_noncentered", "eight_schools"),
    "low_dim_gauss_mix": ("low_dim_gauss_mix-low_dim_gauss_mix", "low_dim_gauss_mix"),
}


def _read_zipped_json(path: Path):
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read(archive.namelist()[0]))


def _check_name(name: str) -> None:
    if name not in POSTERIORS:
        raise ValueError(f"unknown posterior {name!r}: expected one of {sorted(POSTERIORS)}")


def load_data(name: str) -> dict[str, torch.Tensor | int]:
    """The model's data as tensors (integers stay Python ints)."""
    _check_name(name)
    raw = _read_zipped_json(DATA / f"{POSTERIORS[name][1]}.data.json.zip")
    return {
        key: value if isinstance(value, int) else torch.tensor(value, dtype=torch.float32)
        for key, value in raw.items()
    }


def load_reference(name: str) -> dict[str, np.ndarray]:
    """The reference draws: ``{parameter: array (10 chains, 1000 draws)}``, Stan's names
    (``theta[1]``, ...)."""
    _check_name(name)
    chains = _read_zipped_json(DATA / f"{POSTERIORS[name][0]}.draws.json.zip")
    return {key: np.array([chain[key] for chain in chains]) for key in chains[0]}


def reference_names(samples: dict[str, np.ndarray], sample_dims: int = 2) -> dict[str, np.ndarray]:
    """Flattens ``{site: (chains, draws, *shape)}`` into Stan's names: ``theta`` of shape 8 ->
    ``theta[1]`` ... ``theta[8]``."""
    flat = {}
    for name, value in samples.items():
        value = np.asarray(value)
        shape = value.shape[sample_dims:]
        if not shape:
            flat[name] = value
            continue
        for index in np.ndindex(*shape):
            flat[f"{name}[{','.join(str(i + 1) for i in index)}]"] = value[(Ellipsis,) + index]
    return flat


def standardized_errors(
    samples: dict[str, np.ndarray], reference: dict[str, np.ndarray]
) -> dict[str, dict[str, float]]:
    """Per reference parameter: the error of the mean and of the sd, in units of the reference sd.

    ``samples`` maps site names to ``(chains, draws, *shape)`` arrays (as
    ``get_samples(group_by_chain=True)``).
    """
    flat = reference_names(samples)
    missing = set(reference) - set(flat)
    if missing:
        raise KeyError(f"samples lack the reference parameters {sorted(missing)}")
    errors = {}
    for name, ref in reference.items():
        ref_sd = float(ref.std())
        draws = np.asarray(flat[name], dtype=np.float64)
        errors[name] = {
            "mean_error": (float(draws.mean()) - float(ref.mean())) / ref_sd,
            "sd_error": (float(draws.std()) - ref_sd) / ref_sd,
        }
    return errors


def eight_schools_centered(J: int, sigma: torch.Tensor, y: torch.Tensor | None = None) -> None:
    r"""The centred eight-schools model (posteriordb's ``eight_schools_centered.stan``).

    .. math:: \mu \sim N(0, 5), \quad \tau \sim \mathrm{HalfCauchy}(5), \quad
              \theta_j \sim N(\mu, \tau), \quad y_j \sim N(\theta_j, \sigma_j).
    """
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", J):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


class OrderedNormal(dist.TorchDistribution):
    r"""``size`` iid :math:`N(\mathrm{loc}, \mathrm{scale}^2)` values, sorted: Stan's
    ``ordered[K] mu ~ normal(loc, scale)``.

    The density on the ordered cone is :math:`K! \prod_k N(\mu_k)`; sampling sorts iid draws.
    """

    support = constraints.ordered_vector
    arg_constraints = {}

    def __init__(self, loc: float, scale: float, size: int, validate_args=None) -> None:
        self.base = dist.Normal(
            torch.as_tensor(loc, dtype=torch.float32), torch.as_tensor(scale, dtype=torch.float32)
        )
        self.size = size
        super().__init__(torch.Size(), torch.Size([size]), validate_args=validate_args)

    def sample(self, sample_shape=torch.Size()):
        return self.base.sample(torch.Size(sample_shape) + (self.size,)).sort(-1).values

    def log_prob(self, value):
        return self.base.log_prob(value).sum(-1) + math.lgamma(self.size + 1)


def low_dim_gauss_mix(N: int, y: torch.Tensor) -> None:
    r"""posteriordb's ``low_dim_gauss_mix.stan``: a two-component mixture with ordered means.

    .. math:: \mu \sim N(0, 2) \text{ ordered}, \quad \sigma_k \sim N^+(0, 2), \quad
              \theta \sim \mathrm{Beta}(5, 5), \quad
              y_n \sim \theta N(\mu_1, \sigma_1) + (1 - \theta) N(\mu_2, \sigma_2).
    """
    mu = pyro.sample("mu", OrderedNormal(0.0, 2.0, 2))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0).expand([2]).to_event(1))
    theta = pyro.sample("theta", dist.Beta(5.0, 5.0))
    weights = torch.stack([theta, 1 - theta], -1)
    with pyro.plate("data", N):
        pyro.sample("y", dist.MixtureSameFamily(dist.Categorical(weights), dist.Normal(mu, sigma)), obs=y)
