r"""Reference posteriors from posteriordb, their models written in Pyro, and the comparison.

The models are code and ship with the package. posteriordb's data, gold-standard draws (long Stan
NUTS runs, 10 chains of 1,000 draws) and Stan files (BSD 3-Clause) do not: they are read from the
folder that the environment variable ``PYRO_NFMALA_POSTERIORDB`` names (:func:`data_dir`), a flat
folder of posteriordb's files (``{data}.data.json.zip``, ``{posterior}.draws.json.zip``,
``{posterior}.info.json``, ``{model}.stan``; the benchmarks' README says how to make it from a clone of
posteriordb). Where the variable is unset or the folder lacks a file, loading raises a
:class:`FileNotFoundError` that says so, and the tests that need the files skip (:func:`available`).
The eight schools' data alone, the classic numbers of Rubin (1981), are also here as code
(:func:`eight_schools_data`), so that the tests of the library's logic on that model run without the
folder.
Each posterior is named by its data set (the key of :func:`load_data`); :data:`MODELS` maps it to
its Pyro model, written from the Stan file with Stan's parameter names:

- ``"eight_schools"`` (10 dims): the hierarchical funnel :math:`(\mu, \tau, \theta_{1..8})`;
  :func:`eight_schools_centered` is the centred model (the hard one, with the funnel), which
  has the same posterior as the non-centred model that made the reference;
- ``"low_dim_gauss_mix"`` (5): a two-component 1-D mixture (ordered means, positive scales, a
  weight in (0, 1)): :func:`low_dim_gauss_mix`;
- ``"kilpisjarvi_mod"`` (3): a linear trend on calendar years (x around 2000): a posterior far
  from the origin, very narrow, with a correlation near 1: :func:`kilpisjarvi`;
- ``"earnings"`` (5): regression with an interaction term, correlated coefficients:
  :func:`logearn_interaction`;
- ``"kidiq_with_mom_work"`` (5): regression on indicator predictors: :func:`kidscore_mom_work`;
- ``"mesquite"`` (8): small-data regression, parameters on different scales:
  :func:`logmesquite_logvas`;
- ``"nes2000"`` (10): regression with 9 predictors on survey data: :func:`nes`;
- ``"arma"`` (4): an ARMA(1, 1) time series, a recursion through all 200 observations (only
  ``sigma`` is constrained, to be positive): :func:`arma11`;
- ``"gp_pois_regr"`` (13): a latent Gaussian process with Poisson counts, hyperparameters
  coupled to 11 latent values (funnel-like): :func:`gp_pois_regr`; the reference holds ``f``,
  not the latent ``f_tilde`` (see :func:`derived`);
- ``"hmm_example"`` (4): a two-state hidden Markov model with the states summed out, simplex
  and positive-ordered constraints: :func:`hmm_example`.

:func:`standardized_errors` compares any draws with the reference, per parameter, in units of
the reference standard deviation; :func:`derived` first adds the reference's transformed
parameters (the GP's ``f``) to draws of the latent sites, and :func:`comparable_reference`
leaves out reference entries that cannot be compared.

Example:
    >>> trace = pyro.poutine.trace(MODELS["eight_schools"]).get_trace(**eight_schools_data())
    >>> [name for name in trace.nodes if name in ("mu", "tau", "theta")]
    ['mu', 'tau', 'theta']
    >>> reference = load_reference("eight_schools")  # read from $PYRO_NFMALA_POSTERIORDB  # doctest: +SKIP
    >>> reference["tau"].shape  # 10 chains of 1,000 draws  # doctest: +SKIP
    (10, 1000)
"""

from __future__ import annotations

__all__ = [
    "MODELS",
    "OrderedNormal",
    "arma11",
    "available",
    "comparable_reference",
    "data_dir",
    "derived",
    "eight_schools_centered",
    "eight_schools_centered_vector",
    "eight_schools_data",
    "eight_schools_noncentered",
    "gp_pois_regr",
    "hmm_example",
    "kidscore_mom_work",
    "kilpisjarvi",
    "load_data",
    "load_reference",
    "logearn_interaction",
    "logmesquite_logvas",
    "low_dim_gauss_mix",
    "nes",
    "reference_names",
    "reference_samples",
    "standardized_errors",
]

import json
import math
import os
import zipfile

from pathlib import Path
from typing import Callable

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from pyro.distributions import constraints

from ..model.recurrences import linear_recurrence, log_matrix_product

# the environment variable that names the data folder
ENV_VAR = "PYRO_NFMALA_POSTERIORDB"
POSTERIORS = {
    "eight_schools": ("eight_schools-eight_schools_noncentered", "eight_schools"),
    "low_dim_gauss_mix": ("low_dim_gauss_mix-low_dim_gauss_mix", "low_dim_gauss_mix"),
    "kilpisjarvi_mod": ("kilpisjarvi_mod-kilpisjarvi", "kilpisjarvi_mod"),
    "earnings": ("earnings-logearn_interaction", "earnings"),
    "kidiq_with_mom_work": ("kidiq_with_mom_work-kidscore_mom_work", "kidiq_with_mom_work"),
    "mesquite": ("mesquite-logmesquite_logvas", "mesquite"),
    "nes2000": ("nes2000-nes", "nes2000"),
    "arma": ("arma-arma11", "arma"),
    "gp_pois_regr": ("gp_pois_regr-gp_pois_regr", "gp_pois_regr"),
    "hmm_example": ("hmm_example-hmm_example", "hmm_example"),
}
# reference entries (by base name) that cannot be compared with draws of the latent sites: random
# or discrete generated quantities that :func:`derived` does not compute
NOT_COMPARABLE = {"hmm_example": ("z_star", "log_p_z_star")}


def data_dir() -> Path:
    """The folder the data and reference draws are read from: ``$PYRO_NFMALA_POSTERIORDB``. It is looked up
    at each load, so the variable may be set after import; raises a :class:`FileNotFoundError` that says
    how to get the files where it is unset."""
    folder = os.environ.get(ENV_VAR)
    if not folder:
        raise FileNotFoundError(
            f"posteriordb's reference data are read from the folder that the environment variable {ENV_VAR} "
            "names, and it is not set. They are not part of pyro_nfmala: clone posteriordb "
            "(https://github.com/stan-dev/posteriordb) and gather its files for these posteriors into one "
            "folder, as benchmarks/README.md of pyro_nfmala's repository says, then set the variable to it."
        )
    return Path(folder).expanduser()


def available() -> bool:
    """Whether ``$PYRO_NFMALA_POSTERIORDB`` names a folder holding every posterior's data and draws."""
    folder = os.environ.get(ENV_VAR)
    if not folder or not Path(folder).expanduser().is_dir():
        return False
    path = Path(folder).expanduser()
    return all(
        (path / f"{data}.data.json.zip").is_file() and (path / f"{posterior}.draws.json.zip").is_file()
        for posterior, data in POSTERIORS.values()
    )


def _data_file(filename: str) -> Path:
    path = data_dir() / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"posteriordb reference data {filename!r} not found in {path.parent} ({ENV_VAR}="
            f"{os.environ[ENV_VAR]}): that folder must hold posteriordb's files for this posterior, named as "
            "benchmarks/README.md of pyro_nfmala's repository says."
        )
    return path


def _read_zipped_json(path: Path):
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read(archive.namelist()[0]))


def _check_name(name: str) -> None:
    if name not in POSTERIORS:
        raise ValueError(f"unknown posterior {name!r}: expected one of {sorted(POSTERIORS)}")


def _raw_data(name: str) -> dict:
    _check_name(name)
    return _read_zipped_json(_data_file(f"{POSTERIORS[name][1]}.data.json.zip"))


def load_data(name: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor | int]:
    """The model's data as tensors of ``dtype`` (integer scalars stay Python ints; integer arrays,
    such as counts and category codes, become integer-valued tensors of ``dtype``)."""
    return {
        key: value if isinstance(value, int) else torch.tensor(value, dtype=dtype)
        for key, value in _raw_data(name).items()
    }


def eight_schools_data(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor | int]:
    """The eight schools' data (Rubin, 1981; Gelman et al., *Bayesian Data Analysis*): the estimated
    coaching effects ``y`` and their standard errors ``sigma``, as :func:`load_data` gives posteriordb's
    ``eight_schools`` (the same numbers), without the data folder."""
    y = [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
    sigma = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]
    return {"J": 8, "y": torch.tensor(y, dtype=dtype), "sigma": torch.tensor(sigma, dtype=dtype)}


def load_reference(name: str) -> dict[str, np.ndarray]:
    """The reference draws: ``{parameter: array (10 chains, 1000 draws)}``, Stan's names
    (``theta[1]``, ...)."""
    _check_name(name)
    chains = _read_zipped_json(_data_file(f"{POSTERIORS[name][0]}.draws.json.zip"))
    return {key: np.array([chain[key] for chain in chains]) for key in chains[0]}


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of :func:`reference_names`: ``theta[1]`` ... ``theta[8]`` -> ``theta`` of shape
    ``(..., 8)``."""
    groups: dict[str, list] = {}
    for key, value in flat.items():
        base, _, index = key.partition("[")
        position = tuple(int(i) - 1 for i in index.rstrip("]").split(",")) if index else ()
        groups.setdefault(base, []).append((position, np.asarray(value, dtype=np.float64)))
    samples = {}
    for base, entries in groups.items():
        if entries[0][0] == ():
            samples[base] = entries[0][1]
            continue
        shape = tuple(max(position[d] for position, _ in entries) + 1 for d in range(len(entries[0][0])))
        array = np.full(entries[0][1].shape + shape, np.nan)
        for position, value in entries:
            array[(Ellipsis,) + position] = value
        samples[base] = array
    return samples


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


def comparable_reference(name: str) -> dict[str, np.ndarray]:
    """The reference draws that draws of the model can be compared with: :func:`load_reference`
    less the entries named in ``NOT_COMPARABLE`` (hmm_example's Viterbi path ``z_star`` and its
    ``log_p_z_star``, generated quantities). posteriordb's draws of the ten posteriors hold none
    of them, so for these nothing is dropped: every reference parameter is a latent site or, with
    :func:`derived`, a transformed parameter (the GP's ``f``)."""
    dropped = NOT_COMPARABLE.get(name, ())
    return {key: value for key, value in load_reference(name).items() if key.partition("[")[0] not in dropped}


def _gp_cholesky_np(x: np.ndarray, alpha: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """Cholesky factors ``(..., N, N)`` of ``gp_exp_quad_cov(x, alpha, rho) + 1e-10 I``."""
    squared = (x[:, None] - x[None, :]) ** 2
    cov = alpha[..., None, None] ** 2 * np.exp(-squared / (2 * rho[..., None, None] ** 2))
    return np.linalg.cholesky(cov + 1e-10 * np.eye(len(x)))


def derived(name: str, samples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    r"""``samples`` of the latent sites ``{site: (chains, draws, *shape)}`` with the transformed
    parameters that the reference draws hold added: for ``"gp_pois_regr"``,
    :math:`f = L f_\text{tilde}` with :math:`L L^T = K_{\alpha, \rho}(x) + 10^{-10} I`. The other
    references hold latent sites only (hmm_example's hold ``theta1``, ``theta2`` and ``mu``, not
    the stacked ``theta``).

    Example: ``standardized_errors(derived(name, samples), comparable_reference(name))``.
    """
    _check_name(name)
    samples = {key: np.asarray(value) for key, value in samples.items()}
    if name == "gp_pois_regr":
        x = np.asarray(_raw_data(name)["x"], dtype=np.float64)
        cholesky = _gp_cholesky_np(x, samples["alpha"].astype(np.float64), samples["rho"].astype(np.float64))
        samples["f"] = np.einsum("...ij,...j->...i", cholesky, samples["f_tilde"].astype(np.float64))
    return samples


def reference_samples(name: str) -> dict[str, np.ndarray]:
    """The reference draws as values of the Pyro model's latent sites, ``{site: (10, 1000, *shape)}``
    in float64: the inverse of :func:`derived` (the GP's ``f_tilde`` is solved from ``f``)."""
    samples = _unflatten(load_reference(name))
    if name == "gp_pois_regr":
        x = np.asarray(_raw_data(name)["x"], dtype=np.float64)
        cholesky = _gp_cholesky_np(x, samples["alpha"], samples["rho"])
        samples["f_tilde"] = np.linalg.solve(cholesky, samples.pop("f")[..., None])[..., 0]
    return samples


def eight_schools_centered(J: int, sigma: torch.Tensor, y: torch.Tensor | None = None) -> None:
    r"""The centred eight-schools model (posteriordb's ``eight_schools_centered.stan``).

    .. math:: \mu \sim N(0, 5), \quad \tau \sim \mathrm{HalfCauchy}(5), \quad
              \theta_j \sim N(\mu, \tau), \quad y_j \sim N(\theta_j, \sigma_j).
    """
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(sigma.new_tensor(5.0)))
    with pyro.plate("schools", J):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def eight_schools_centered_vector(J: int, sigma: torch.Tensor, y: torch.Tensor | None = None) -> None:
    r"""The centred eight-schools model of :func:`eight_schools_centered` written without a plate, as
    many users write it: ``theta`` one vector site, ``dist.Normal(mu, tau).expand([J]).to_event(1)``.
    The same posterior and the same funnel; Pyro sees one site of event shape ``(J,)``.
    """
    mu = pyro.sample("mu", dist.Normal(sigma.new_tensor(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(sigma.new_tensor(5.0)))
    theta = pyro.sample("theta", dist.Normal(mu, tau).expand([J]).to_event(1))
    pyro.sample("y", dist.Normal(theta, sigma).to_event(1), obs=y)


def eight_schools_noncentered(J: int, sigma: torch.Tensor, y: torch.Tensor | None = None) -> None:
    r"""The non-centred eight-schools model (posteriordb's ``eight_schools_noncentered.stan``), the
    same posterior as :func:`eight_schools_centered` without the funnel in its coordinates.

    .. math:: \mu \sim N(0, 5), \quad \tau \sim \mathrm{HalfCauchy}(5), \quad
              \tilde\theta_j \sim N(0, 1), \quad \theta_j = \mu + \tau \tilde\theta_j, \quad
              y_j \sim N(\theta_j, \sigma_j).
    """
    mu = pyro.sample("mu", dist.Normal(sigma.new_tensor(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(sigma.new_tensor(5.0)))
    with pyro.plate("schools", J):
        theta_trans = pyro.sample("theta_trans", dist.Normal(sigma.new_tensor(0.0), 1.0))
        theta = pyro.deterministic("theta", mu + tau * theta_trans)
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


# ----------------------------------------------------------------------------------------------
# posteriordb's regressions and time series. Shapes: run inside the library's outer particle
# plate, a latent site outside the data plate carries the particle dims and a size-1 dim at the
# data plate's position (``beta`` is ``(n, 1, 4)``, ``sigma`` ``(n, 1)``), so ``beta[..., k] * x``
# broadcasts to ``(n, N)``; models without a data plate (``arma11``, ``hmm_example``) see
# ``(n, *shape)``.


def _linear(beta: torch.Tensor, *columns: torch.Tensor) -> torch.Tensor:
    """Stan's ``beta[1] + beta[2] * columns[1] + ...``, batched over ``beta``'s leading dims."""
    loc = beta[..., 0]
    for k, column in enumerate(columns, 1):
        loc = loc + beta[..., k] * column
    return loc


def _flat_regression(observed: str, y: torch.Tensor, *columns: torch.Tensor) -> None:
    """``y ~ normal(beta[1] + beta[2] * columns[1] + ..., sigma)`` with flat priors on ``beta`` and
    on ``sigma > 0`` (Stan's parameters without prior statements)."""
    beta = pyro.sample("beta", dist.ImproperUniform(constraints.real, (), (len(columns) + 1,)))
    sigma = pyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
    with pyro.plate("data", len(y)):
        pyro.sample(observed, dist.Normal(_linear(beta, *columns), sigma), obs=y)


def kilpisjarvi(
    N: int,
    x: torch.Tensor,
    y: torch.Tensor,
    pmualpha: torch.Tensor | float,
    psalpha: torch.Tensor | float,
    pmubeta: torch.Tensor | float,
    psbeta: torch.Tensor | float,
    xpred: float | None = None,
) -> None:
    r"""posteriordb's ``kilpisjarvi.stan``: a linear trend on years :math:`x` (not centred).

    .. math:: \alpha \sim N(\mu_\alpha, s_\alpha), \quad \beta \sim N(\mu_\beta, s_\beta), \quad
              \sigma > 0 \text{ flat}, \quad y_n \sim N(\alpha + \beta x_n, \sigma).

    ``xpred`` (a prediction input) is unused.
    """
    alpha = pyro.sample("alpha", dist.Normal(pmualpha, psalpha))
    beta = pyro.sample("beta", dist.Normal(pmubeta, psbeta))
    sigma = pyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
    with pyro.plate("data", N):
        pyro.sample("y", dist.Normal(alpha + beta * x, sigma), obs=y)


def logearn_interaction(N: int, earn: torch.Tensor, height: torch.Tensor, male: torch.Tensor) -> None:
    r"""posteriordb's ``logearn_interaction.stan``, flat priors on :math:`\beta` and :math:`\sigma > 0`:

    .. math:: \log \mathrm{earn}_n \sim N(\beta_1 + \beta_2 h_n + \beta_3 m_n + \beta_4 h_n m_n,
              \sigma).
    """
    _flat_regression("log_earn", earn.log(), height, male, height * male)


def kidscore_mom_work(
    N: int,
    kid_score: torch.Tensor,
    mom_work: torch.Tensor,
    mom_hs: torch.Tensor | None = None,
    mom_iq: torch.Tensor | None = None,
) -> None:
    r"""posteriordb's ``kidscore_mom_work.stan``, flat priors on :math:`\beta` and :math:`\sigma > 0`:

    .. math:: \mathrm{kid\_score}_n \sim N(\beta_1 + \sum_{w=2}^4 \beta_w [\mathrm{mom\_work}_n = w],
              \sigma).

    ``mom_hs`` and ``mom_iq`` (in the data set, for other models) are unused.
    """
    work2, work3, work4 = ((mom_work == w).to(kid_score.dtype) for w in (2, 3, 4))
    _flat_regression("kid_score", kid_score, work2, work3, work4)


def logmesquite_logvas(
    N: int,
    weight: torch.Tensor,
    diam1: torch.Tensor,
    diam2: torch.Tensor,
    canopy_height: torch.Tensor,
    total_height: torch.Tensor,
    density: torch.Tensor,
    group: torch.Tensor,
) -> None:
    r"""posteriordb's ``logmesquite_logvas.stan``, flat priors on :math:`\beta` and
    :math:`\sigma > 0`: :math:`\log \mathrm{weight}` on the log canopy volume
    (:math:`d_1 d_2 h_c`), area (:math:`d_1 d_2`), shape (:math:`d_1 / d_2`), log total height,
    log density and the group:

    .. math:: \log w_n \sim N(\beta_1 + \beta_2 \log(d_1 d_2 h_c) + \beta_3 \log(d_1 d_2)
              + \beta_4 \log(d_1 / d_2) + \beta_5 \log h_t + \beta_6 \log \rho + \beta_7 g, \sigma).
    """
    _flat_regression(
        "log_weight",
        weight.log(),
        (diam1 * diam2 * canopy_height).log(),
        (diam1 * diam2).log(),
        (diam1 / diam2).log(),
        total_height.log(),
        density.log(),
        group,
    )


def nes(
    N: int,
    partyid7: torch.Tensor,
    real_ideo: torch.Tensor,
    race_adj: torch.Tensor,
    educ1: torch.Tensor,
    gender: torch.Tensor,
    income: torch.Tensor,
    age_discrete: torch.Tensor,
    year: torch.Tensor | None = None,
) -> None:
    r"""posteriordb's ``nes.stan``, flat priors on :math:`\beta` (9) and :math:`\sigma > 0`:

    .. math:: \mathrm{partyid7}_n \sim N(\beta_1 + \beta_2 \mathrm{ideo}_n + \beta_3 \mathrm{race}_n
              + \sum_{a=2}^4 \beta_{a+2} [\mathrm{age}_n = a] + \beta_7 \mathrm{educ}_n
              + \beta_8 \mathrm{gender}_n + \beta_9 \mathrm{income}_n, \sigma).

    ``year`` (in the data set) is unused.
    """
    age30_44, age45_64, age65up = ((age_discrete == a).to(partyid7.dtype) for a in (2, 3, 4))
    _flat_regression(
        "partyid7",
        partyid7,
        real_ideo,
        race_adj,
        age30_44,
        age45_64,
        age65up,
        educ1,
        gender,
        income,
    )


def arma11(T: int, y: torch.Tensor) -> None:
    r"""posteriordb's ``arma11.stan``: ARMA(1, 1) with :math:`\epsilon_0 = 0`.

    .. math:: \mu \sim N(0, 10), \quad \phi, \theta \sim N(0, 2), \quad
              \sigma \sim \mathrm{HalfCauchy}(2.5), \quad
              \nu_1 = \mu + \phi \mu, \quad \nu_t = \mu + \phi y_{t-1} + \theta \epsilon_{t-1},
              \quad \epsilon_t = y_t - \nu_t \sim N(0, \sigma).

    Written as :math:`y_t \sim N(\nu_t, \sigma)`, the same density as Stan's
    ``err ~ normal(0, sigma)``. The errors follow a linear recursion,
    :math:`\epsilon_t = -\theta \epsilon_{t-1} + (y_t - \mu - \phi y_{t-1})`, computed as one parallel
    scan (:func:`~pyro_nfmala.model.recurrences.linear_recurrence`) rather than a loop over :math:`t`.
    """
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    phi = pyro.sample("phi", dist.Normal(0.0, 2.0))
    theta = pyro.sample("theta", dist.Normal(0.0, 2.0))
    sigma = pyro.sample("sigma", dist.HalfCauchy(y.new_tensor(2.5)))
    # y_{t-1} for each t (mu before y_1, as nu_1 = mu + phi mu), broadcast over the chains' batch
    previous = torch.cat([mu.unsqueeze(-1), y[: T - 1].expand(mu.shape + (T - 1,))], -1)
    innovations = y[:T] - mu.unsqueeze(-1) - phi.unsqueeze(-1) * previous
    err = linear_recurrence(-theta.unsqueeze(-1), innovations)
    pyro.sample("y", dist.Normal(y[:T] - err, sigma.unsqueeze(-1)).to_event(1), obs=y)


def _gp_f(x: torch.Tensor, alpha: torch.Tensor, rho: torch.Tensor, f_tilde: torch.Tensor) -> torch.Tensor:
    """``f = L f_tilde``, ``L`` the Cholesky factor of ``gp_exp_quad_cov(x, alpha, rho) + 1e-10 I``.

    Computed in float64, as Stan does: the covariance of nearby inputs is nearly singular (the
    Cholesky factorization fails in float32 within the posterior); ``f`` comes back in
    ``f_tilde``'s dtype. ``alpha`` and ``rho`` carry a size-1 dim at the data plate's position.
    """
    x = x.double()
    squared = (x.unsqueeze(-1) - x) ** 2
    alpha, rho = alpha.double().unsqueeze(-1), rho.double().unsqueeze(-1)
    cov = alpha**2 * torch.exp(-squared / (2 * rho**2))
    cholesky = torch.linalg.cholesky(cov + 1e-10 * torch.eye(len(x), dtype=torch.float64))
    return (cholesky @ f_tilde.double().unsqueeze(-1)).squeeze(-1).to(f_tilde.dtype)


def gp_pois_regr(N: int, x: torch.Tensor, k: torch.Tensor, y: torch.Tensor | None = None) -> None:
    r"""posteriordb's ``gp_pois_regr.stan``: a latent GP (non-centred) with Poisson counts.

    .. math:: \rho \sim \mathrm{Gamma}(25, 4), \quad \alpha \sim N^+(0, 2), \quad
              \tilde f_n \sim N(0, 1), \quad f = L \tilde f, \quad
              L L^T = \Bigl(\alpha^2 e^{-(x_i - x_j)^2 / (2 \rho^2)}\Bigr)_{ij} + 10^{-10} I,
              \quad k_n \sim \mathrm{Poisson}(e^{f_n}).

    ``f`` is recorded as a deterministic site; ``y`` (in the data set) is unused.
    """
    rho = pyro.sample("rho", dist.Gamma(x.new_tensor(25.0), x.new_tensor(4.0)))
    alpha = pyro.sample("alpha", dist.HalfNormal(x.new_tensor(2.0)))
    with pyro.plate("data", N):
        f_tilde = pyro.sample("f_tilde", dist.Normal(0.0, 1.0))
        f = pyro.deterministic("f", _gp_f(x, alpha, rho, f_tilde))
        pyro.sample("k", dist.Poisson(f.exp()), obs=k)


def hmm_example(N: int, K: int, y: torch.Tensor) -> None:
    r"""posteriordb's ``hmm_example.stan``: a two-state HMM with unit-variance normal emissions,
    the hidden states summed out by the forward algorithm (no initial-state distribution).

    .. math:: \theta_1, \theta_2 \sim \mathrm{Dirichlet}(1, 1), \quad
              0 < \mu_1 < \mu_2 \text{ with density } N(\mu_1; 3, 1) N(\mu_2; 10, 1), \quad
              \gamma_1(k) = \log N(y_1; \mu_k, 1), \quad
              \gamma_t(k) = \log \textstyle\sum_j e^{\gamma_{t-1}(j)} \theta_{jk} N(y_t; \mu_k, 1),
              \quad \log p(y) = \log \textstyle\sum_k e^{\gamma_N(k)}.
    """
    if K != 2:
        raise ValueError(f"hmm_example has two states (theta1, theta2), got K={K}")
    theta1 = pyro.sample("theta1", dist.Dirichlet(y.new_ones(K)))
    theta2 = pyro.sample("theta2", dist.Dirichlet(y.new_ones(K)))
    mu = pyro.sample("mu", dist.ImproperUniform(constraints.positive_ordered_vector, (), (K,)))
    pyro.factor(
        "mu_prior", dist.Normal(3.0, 1.0).log_prob(mu[..., 0]) + dist.Normal(10.0, 1.0).log_prob(mu[..., 1])
    )
    log_theta = torch.stack([theta1, theta2], -2).log()  # [..., j, k]: from state j to state k
    log_emission = dist.Normal(mu.unsqueeze(-2), 1.0).log_prob(y.unsqueeze(-1))  # (..., N, K)
    # the forward recursion as a product of log-semiring matrices, multiplied pairwise (log_matrix_product),
    # not in a loop over t: gamma_N = gamma_1 (x) M_2 (x) ... (x) M_N, M_t(j, k) = log theta_jk + e_t(k)
    steps = log_matrix_product(log_theta.unsqueeze(-3) + log_emission[..., 1:N, None, :])
    pyro.factor("forward", (log_emission[..., 0, :, None] + steps).logsumexp((-2, -1)))


#: The ten Pyro models, by data set name.
MODELS: dict[str, Callable[..., None]] = {
    "eight_schools": eight_schools_centered,
    "low_dim_gauss_mix": low_dim_gauss_mix,
    "kilpisjarvi_mod": kilpisjarvi,
    "earnings": logearn_interaction,
    "kidiq_with_mom_work": kidscore_mom_work,
    "mesquite": logmesquite_logvas,
    "nes2000": nes,
    "arma": arma11,
    "gp_pois_regr": gp_pois_regr,
    "hmm_example": hmm_example,
}
