r"""Reference posteriors from inference-gym, their models written in Pyro, and the comparison.

inference-gym (TensorFlow Probability's ``spinoffs/inference_gym``, Apache-2.0) ships models with
gold-standard posterior moments (long Stan runs). Four of them are here, harder than the posteriordb
set: sparse priors with heavy-tailed scales, a latent autoregressive state with unknown scales, a
501-parameter hierarchy. The models are code and ship with the package; the data and the stored
moments do not: they are read from the folder that the environment variable
``PYRO_NFMALA_INFERENCE_GYM`` names (:func:`data_dir`), which holds inference-gym's files as ``.npz``
(``german_credit_data.npz``, ``sp500_closing_prices.npz``, ``item_response_theory_data.npz`` and a
``*_truth.npz`` per posterior). Where the variable is unset or the folder lacks a file, loading raises a
:class:`FileNotFoundError` that says so, and the tests that need the files skip (:func:`available`).

Each posterior is named by a key of :data:`POSTERIORS`; :data:`MODELS` maps it to its Pyro model,
with inference-gym's site names, and :func:`load_data` gives the model's keyword arguments, prepared
as inference-gym prepares them:

- ``"german_credit_sparse_logistic"`` (51 dims): sparse logistic regression on UCI's German credit
  data, :func:`sparse_logistic_regression`; the 24 features standardized (population sd) and a column
  of ones appended last, :math:`y = \text{label} - 1`:

  .. math:: \tau \sim \mathrm{Gamma}(\tfrac12, \tfrac12), \quad
            \lambda_i \sim \mathrm{Gamma}(\tfrac12, \tfrac12), \quad \beta_i \sim N(0, 1), \quad
            y_n \sim \mathrm{Bernoulli}\bigl(\mathrm{logit}^{-1}(X_n \cdot (\tau \lambda \odot \beta))\bigr),

  :math:`i = 1..25` (sites ``global_scale``, ``local_scales``, ``unscaled_weights``; Gamma with
  concentration and *rate* 1/2); the same data serve the plain logistic regression,
  :func:`logistic_regression` (``weights`` :math:`w_i \sim N(0, 1)`, 25 dims; no stored reference);
- ``"stochastic_volatility_sp500_small"`` (103) and ``"stochastic_volatility_sp500"`` (2,519): a
  stochastic volatility model of the S&P 500's daily log returns (:math:`r = \Delta \log p`, the last
  100 or all 2,516, centred), :func:`stochastic_volatility`:

  .. math:: \phi = 2u - 1,\ u \sim \mathrm{Beta}(20, 1.5), \quad \mu \sim \mathrm{Cauchy}(0, 5), \quad
            \sigma \sim \mathrm{HalfCauchy}(2),

  .. math:: h_0 \sim N\bigl(\mu, \sigma / \sqrt{1 - \phi^2}\bigr), \quad
            h_t \sim N(\mu + \phi (h_{t-1} - \mu), \sigma), \quad r_t \sim N(0, e^{h_t / 2})

  (sites ``persistence_of_volatility`` :math:`\phi \in (-1, 1)`, ``mean_log_volatility`` :math:`\mu`,
  ``white_noise_shock_scale`` :math:`\sigma`, ``log_volatility`` :math:`h`; the latent AR(1) state is
  one site of law :class:`AR1`, whose log density is vectorized over time);
- ``"item_response_theory"`` (501): a one-parameter item response model on 30,012 synthetic answers
  of 400 students to 100 questions, :func:`item_response_theory`:

  .. math:: m \sim N(0.75, 1), \quad a_i \sim N(0, 1), \quad d_j \sim N(0, 1), \quad
            c_n \sim \mathrm{Bernoulli}\bigl(\mathrm{logit}^{-1}(m + a_{s_n} - d_{q_n})\bigr)

  (sites ``mean_student_ability``, ``centered_student_ability``, ``question_difficulty``).

:func:`reference` reads the stored moments (mean, sd and the Monte Carlo standard error of the mean,
per site, in the site's own constrained parameterization); :func:`standardized_errors` scores draws
against them, per entry, in units of the reference sd, and :func:`worst_errors` picks the worst.
One number is not scored (:data:`UNSCORED`): the sd of ``mean_log_volatility`` of the stochastic
volatility posteriors depends on how long the reference runs were (a heavy tail where the persistence
nears 1: long centred NUTS runs give about 1.3 against the stored 1.19 on the small posterior); its
mean is scored.

Besides these, a model of our own that needs no files: :func:`brownian_motion_unknown_scales`, the
inference-gym model "Brownian motion with missing middle observations, unknown scales" (32 dims) on
data generated with a fixed seed (:func:`brownian_motion_data`):

.. math:: s_x, s_y \sim \mathrm{LogNormal}(0, 2), \quad x_0 \sim N(0, s_x), \quad
          x_t \sim N(x_{t-1}, s_x), \quad y_t \sim N(x_t, s_y),

:math:`t = 0..29`, the observations :math:`y_{10..19}` missing. It has no stored reference.

Every model runs for a batch of parameter points at once (the library's outer particle plate): the
latent sites carry leading batch dimensions, data enter through plates or ``to_event`` sites, and the
products and indexing broadcast over the batch.

Example:
    >>> data = brownian_motion_data()
    >>> data["observations"].shape, int(data["observations"].isnan().sum())
    (torch.Size([30]), 10)
    >>> trace = pyro.poutine.trace(brownian_motion_unknown_scales).get_trace(**data)
    >>> latent = trace.stochastic_nodes
    >>> {name: tuple(trace.nodes[name]["value"].shape) for name in latent}
    {'innovation_scale': (), 'observation_scale': (), 'x': (30,)}
    >>> ar1 = AR1(torch.tensor([0.0, 1.0]), torch.tensor(0.9), torch.tensor(0.1), num_steps=5)
    >>> ar1.batch_shape, ar1.event_shape, ar1.log_prob(ar1.sample((3,))).shape
    (torch.Size([2]), torch.Size([5]), torch.Size([3, 2]))
    >>> data = load_data("item_response_theory")  # read from $PYRO_NFMALA_INFERENCE_GYM  # doctest: +SKIP
    >>> reference("item_response_theory")["question_difficulty"]["sd"].shape  # doctest: +SKIP
    (100,)
"""

from __future__ import annotations

__all__ = [
    "AR1",
    "AR1Transform",
    "DIMENSIONS",
    "ENV_VAR",
    "MODELS",
    "POSTERIORS",
    "UNSCORED",
    "available",
    "brownian_motion_data",
    "brownian_motion_unknown_scales",
    "data_dir",
    "item_response_theory",
    "load_data",
    "logistic_regression",
    "reference",
    "sparse_logistic_regression",
    "standardized_errors",
    "stochastic_volatility",
    "worst_errors",
]

import os

from pathlib import Path
from typing import Callable

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from pyro.distributions import constraints
from torch.distributions.transforms import AffineTransform
from torch.distributions.utils import broadcast_all

from ..model.recurrences import linear_recurrence

#: The environment variable that names the data folder.
ENV_VAR = "PYRO_NFMALA_INFERENCE_GYM"
#: posterior name -> (data file, truth file), both in :func:`data_dir`.
POSTERIORS = {
    "german_credit_sparse_logistic": ("german_credit_data.npz", "sparse_logistic_german_credit_truth.npz"),
    "stochastic_volatility_sp500_small": (
        "sp500_closing_prices.npz",
        "stochastic_volatility_log_sp500_small_truth.npz",
    ),
    "stochastic_volatility_sp500": ("sp500_closing_prices.npz", "stochastic_volatility_log_sp500_truth.npz"),
    "item_response_theory": ("item_response_theory_data.npz", "item_response_theory_truth.npz"),
}
#: posterior name -> number of parameters (the dimension of the unconstrained space).
DIMENSIONS = {
    "german_credit_sparse_logistic": 51,
    "stochastic_volatility_sp500_small": 103,
    "stochastic_volatility_sp500": 2519,
    "item_response_theory": 501,
}
#: posterior name -> sites whose sd :func:`standardized_errors` does not score (their mean it does): the
#: stored sd of ``mean_log_volatility`` depends on the length of the reference runs (see the module's text).
UNSCORED = {
    "stochastic_volatility_sp500_small": ("mean_log_volatility",),
    "stochastic_volatility_sp500": ("mean_log_volatility",),
}
#: how many returns the small stochastic volatility posterior keeps (the last ones)
_SMALL_RETURNS = 100
#: the Brownian motion's length, its missing observations and the scales its data are drawn with
_BROWNIAN_STEPS = 30
_BROWNIAN_MISSING = slice(10, 20)
_BROWNIAN_SCALES = (0.1, 0.15)


def data_dir() -> Path:
    """The folder the data and reference moments are read from: ``$PYRO_NFMALA_INFERENCE_GYM``. It is
    looked up at each load, so the variable may be set after import; raises a :class:`FileNotFoundError`
    that says where the files come from where it is unset."""
    folder = os.environ.get(ENV_VAR)
    if not folder:
        raise FileNotFoundError(
            "inference-gym's reference data are read from the folder that the environment variable "
            f"{ENV_VAR} names, and it is not set. They are not part of pyro_nfmala: they come from "
            "inference-gym (TensorFlow Probability's spinoffs/inference_gym, "
            "https://github.com/tensorflow/probability), its data sets and stored ground truth saved as .npz "
            "files; set the variable to a folder holding "
            f"them ({', '.join(_all_files())})."
        )
    return Path(folder).expanduser()


def _all_files() -> list[str]:
    return sorted({filename for files in POSTERIORS.values() for filename in files})


def available() -> bool:
    """Whether ``$PYRO_NFMALA_INFERENCE_GYM`` names a folder holding every posterior's data and truth file."""
    folder = os.environ.get(ENV_VAR)
    if not folder:
        return False
    path = Path(folder).expanduser()
    return path.is_dir() and all((path / filename).is_file() for filename in _all_files())


def _data_file(filename: str) -> Path:
    path = data_dir() / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"inference-gym reference data {filename!r} not found in {path.parent} ({ENV_VAR}="
            f"{os.environ[ENV_VAR]}): that folder must hold inference-gym's data and ground truth "
            "(TensorFlow Probability's spinoffs/inference_gym) as .npz files, named as pyro_nfmala's "
            "examples.inference_gym.POSTERIORS says."
        )
    return path


def _check_name(name: str) -> None:
    if name not in POSTERIORS:
        raise ValueError(f"unknown posterior {name!r}: expected one of {sorted(POSTERIORS)}")


def _load_npz(filename: str) -> dict[str, np.ndarray]:
    with np.load(_data_file(filename)) as archive:
        return {key: archive[key] for key in archive.files}


def load_data(name: str, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor | int]:
    """The model's keyword arguments, prepared as inference-gym prepares them, as tensors of ``dtype``
    (computed in float64 first); indices are ``long`` tensors and counts Python ints.

    - ``"german_credit_sparse_logistic"``: ``features`` (1000, 25), the 24 UCI features standardized
      with their population sd and a column of ones last; ``labels`` (1000,), ``uci_label - 1``
      (1 = bad credit);
    - ``"stochastic_volatility_sp500_small"``, ``"stochastic_volatility_sp500"``: ``returns`` (100,)
      or (2516,), the last 100 or all of ``diff(log(closing_prices))``, minus their mean;
    - ``"item_response_theory"``: ``student_ids``, ``question_ids`` (30012,) ``long``; ``correct``
      (30012,) 0/1 of ``dtype``; ``num_students`` (400) and ``num_questions`` (100).
    """
    _check_name(name)
    raw = _load_npz(POSTERIORS[name][0])
    if name == "german_credit_sparse_logistic":
        features = raw["features"].astype(np.float64)
        features = (features - features.mean(0)) / features.std(0)
        features = np.concatenate([features, np.ones((len(features), 1))], axis=1)
        labels = raw["uci_label"].astype(np.float64) - 1
        return {"features": torch.tensor(features, dtype=dtype), "labels": torch.tensor(labels, dtype=dtype)}
    if name.startswith("stochastic_volatility"):
        returns = np.diff(np.log(raw["closing_prices"].astype(np.float64)))
        if name == "stochastic_volatility_sp500_small":
            returns = returns[-_SMALL_RETURNS:]
        return {"returns": torch.tensor(returns - returns.mean(), dtype=dtype)}
    student_ids = torch.tensor(raw["student_ids"], dtype=torch.long)
    question_ids = torch.tensor(raw["question_ids"], dtype=torch.long)
    return {
        "student_ids": student_ids,
        "question_ids": question_ids,
        "correct": torch.tensor(raw["correct"], dtype=dtype),
        "num_students": int(student_ids.max()) + 1,
        "num_questions": int(question_ids.max()) + 1,
    }


def reference(name: str) -> dict[str, dict[str, np.ndarray]]:
    """The stored moments: ``{site: {"mean": ..., "sd": ..., "mean_se": ...}}``, float64 arrays of the
    site's shape, in the site's own constrained parameterization (``mean_se`` is the Monte Carlo standard
    error of the stored mean)."""
    _check_name(name)
    raw = _load_npz(POSTERIORS[name][1])
    moments: dict[str, dict[str, np.ndarray]] = {}
    for key, value in raw.items():
        site, separator, statistic = key.rpartition("__")
        if separator and statistic in ("mean", "sd", "mean_se"):
            moments.setdefault(site, {})[statistic] = np.asarray(value, dtype=np.float64)
    return moments


def _entry_name(site: str, index: tuple[int, ...]) -> str:
    return f"{site}[{','.join(str(i) for i in index)}]" if index else site


def standardized_errors(
    samples: dict[str, np.ndarray], name: str, skip: tuple[str, ...] | list[str] = ()
) -> dict[str, dict[str, float]]:
    """Per reference entry, the error of the mean and of the sd in units of the reference sd:
    ``(mean - ref mean) / ref sd`` and ``sd / ref sd - 1``.

    Args:
        samples: Draws ``{site: (chains, draws, *shape)}`` (as ``get_samples(group_by_chain=True)``),
            in the sites' constrained parameterization; pooled over chains and draws (sd with ``ddof=0``).
            Sites that the reference lacks are ignored.
        name: The posterior (a key of :data:`POSTERIORS`).
        skip: Reference sites to leave out altogether (neither mean nor sd scored).

    Returns:
        ``{entry: {"mean_error": float, "sd_error": float}}``, entries named by site and 0-based index
        (``"local_scales[3]"``, ``"global_scale"``). Where :data:`UNSCORED` names the site (the sd of
        the stochastic volatility's ``mean_log_volatility``), the entry has no ``"sd_error"``: its mean is
        scored, its sd is not. :func:`worst_errors` gives the worst of each.

    Raises:
        KeyError: ``samples`` lack a reference site that ``skip`` does not name.
        ValueError: A site's draws do not have the reference's shape after ``(chains, draws)``.
    """
    moments = reference(name)
    missing = sorted(set(moments) - set(samples) - set(skip))
    if missing:
        raise KeyError(f"samples lack the reference sites {missing} of {name!r}")
    unscored = set(UNSCORED.get(name, ()))
    errors: dict[str, dict[str, float]] = {}
    for site, stats in moments.items():
        if site in skip:
            continue
        shape = stats["mean"].shape
        draws = np.asarray(samples[site], dtype=np.float64)
        if draws.ndim != len(shape) + 2 or draws.shape[2:] != shape:
            raise ValueError(
                f"draws of {site!r} have shape {draws.shape}: expected (chains, draws, *{shape}) for {name!r}"
            )
        pooled = draws.reshape((-1,) + shape)
        mean_error = (pooled.mean(0) - stats["mean"]) / stats["sd"]
        sd_error = pooled.std(0) / stats["sd"] - 1
        for index in np.ndindex(*shape):
            entry = {"mean_error": float(mean_error[index])}
            if site not in unscored:
                entry["sd_error"] = float(sd_error[index])
            errors[_entry_name(site, index)] = entry
    return errors


def worst_errors(errors: dict[str, dict[str, float]]) -> dict[str, tuple[str, float]]:
    """The worst (largest in absolute value) of each kind of :func:`standardized_errors`' output:
    ``{"mean_error": (entry, error), "sd_error": (entry, error)}``; unscored sds (absent) are passed over."""
    worst = {}
    for kind in ("mean_error", "sd_error"):
        scored = [(entry, values[kind]) for entry, values in errors.items() if kind in values]
        if scored:
            worst[kind] = max(scored, key=lambda item: abs(item[1]))
    return worst


# ----------------------------------------------------------------------------------------------
# the models. Run inside the library's outer particle plate, a latent site carries the particle
# dims first: with a data plate (nesting 1) a scalar site is ``(n, 1)`` and a plated vector site
# ``(n, K)``; without plates (the time series, nesting 0) a scalar is ``(n,)`` and an event-shaped
# site ``(n, T)``. The products, indexing and distributions below broadcast over those dims.


class AR1Transform(torch.distributions.Transform):
    r"""The innovations :math:`\varepsilon` of a Gaussian AR(1) path to the path :math:`x` (event shape
    ``(T,)``): with :math:`y = x - \mu`,

    .. math:: y_0 = s_0 \varepsilon_0, \qquad y_t = \phi\, y_{t-1} + \sigma \varepsilon_t ,

    computed as a parallel scan of the affine maps :math:`y \mapsto \phi y + \sigma\varepsilon_t`
    (:func:`~pyro_nfmala.model.recurrences.linear_recurrence`: :math:`\lceil \log_2 T \rceil` vectorized
    steps, stable for any :math:`\phi`). Its inverse is
    :math:`\varepsilon_0 = y_0 / s_0`, :math:`\varepsilon_t = (y_t - \phi y_{t-1}) / \sigma`, and its
    Jacobian is triangular: :math:`\log|\det J| = \log s_0 + (T - 1) \log \sigma`.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    def __init__(self, loc, persistence, scale, initial_scale, cache_size: int = 0) -> None:
        super().__init__(cache_size=cache_size)
        self.loc, self.persistence, self.scale, self.initial_scale = loc, persistence, scale, initial_scale

    def with_cache(self, cache_size: int = 1) -> AR1Transform:
        if self._cache_size == cache_size:
            return self
        return AR1Transform(self.loc, self.persistence, self.scale, self.initial_scale, cache_size)

    def _call(self, noise: torch.Tensor) -> torch.Tensor:
        shape = torch.broadcast_shapes(noise.shape, self.persistence.shape + (1,))
        shocks = torch.cat(
            [self.initial_scale.unsqueeze(-1) * noise[..., :1], self.scale.unsqueeze(-1) * noise[..., 1:]], -1
        ).expand(shape)
        return self.loc.unsqueeze(-1) + linear_recurrence(self.persistence.unsqueeze(-1), shocks)

    def _inverse(self, path: torch.Tensor) -> torch.Tensor:
        centred = path - self.loc.unsqueeze(-1)
        first = centred[..., :1] / self.initial_scale.unsqueeze(-1)
        rest = (centred[..., 1:] - self.persistence.unsqueeze(-1) * centred[..., :-1]) / self.scale.unsqueeze(
            -1
        )
        return torch.cat([first, rest], -1)

    def log_abs_det_jacobian(self, noise: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
        steps = path.shape[-1]
        log_det = torch.log(self.initial_scale) + (steps - 1) * torch.log(self.scale)
        return log_det.expand(torch.broadcast_shapes(log_det.shape, path.shape[:-1]))


class AR1(dist.TransformedDistribution):
    r"""A Gaussian AR(1) path :math:`x_{0..T-1}` as one event of shape ``(T,)``:

    .. math:: x_0 \sim N(\mu, s_0), \quad x_t \sim N(\mu + \phi (x_{t-1} - \mu), \sigma),

    with :math:`s_0 = \sigma / \sqrt{1 - \phi^2}` (the stationary law; needs :math:`|\phi| < 1`) unless
    ``initial_scale`` gives it (``loc=0, persistence=1, initial_scale=scale`` is a Gaussian random walk,
    a discretized Brownian motion). The parameters broadcast to the batch shape.

    It is standard normal innovations pushed through :class:`AR1Transform`, a
    :class:`~pyro.distributions.TransformedDistribution`: where its parameters are other latent sites,
    the samplers can sample its innovations instead (the non-centred coordinates,
    :mod:`pyro_nfmala.model.centring`). Its log density is vectorized over time and batch.

    Args:
        loc: :math:`\mu`, the level the path reverts to.
        persistence: :math:`\phi`.
        scale: :math:`\sigma > 0`, the innovations' sd.
        num_steps: :math:`T`.
        initial_scale: :math:`s_0 > 0`, the sd of :math:`x_0`; ``None``: the stationary sd.
    """

    arg_constraints = {
        "loc": constraints.real,
        "persistence": constraints.real,
        "scale": constraints.positive,
        "initial_scale": constraints.positive,
    }
    support = constraints.real_vector

    def __init__(
        self,
        loc: torch.Tensor | float,
        persistence: torch.Tensor | float,
        scale: torch.Tensor | float,
        num_steps: int,
        initial_scale: torch.Tensor | float | None = None,
        validate_args: bool | None = None,
    ) -> None:
        loc, persistence, scale = broadcast_all(loc, persistence, scale)
        if initial_scale is None:
            initial_scale = scale / torch.sqrt(1 - persistence**2)
        self.loc, self.persistence, self.scale, self.initial_scale = broadcast_all(
            loc, persistence, scale, initial_scale
        )
        self.num_steps = int(num_steps)
        noise = dist.Normal(
            torch.zeros_like(self.loc).unsqueeze(-1).expand(self.loc.shape + (self.num_steps,)), 1.0
        ).to_event(1)
        transform = AR1Transform(self.loc, self.persistence, self.scale, self.initial_scale)
        super().__init__(noise, [transform], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> AR1:
        """The same process with each parameter expanded to ``batch_shape``."""
        batch_shape = torch.Size(batch_shape)
        parameters = (getattr(self, name).expand(batch_shape) for name in self.arg_constraints)
        loc, persistence, scale, initial_scale = parameters
        return AR1(loc, persistence, scale, self.num_steps, initial_scale, validate_args=False)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """The log density, written out (the transformed innovations' density, in fewer operations)."""
        if self._validate_args:
            self._validate_sample(value)
        loc, persistence = self.loc.unsqueeze(-1), self.persistence.unsqueeze(-1)
        first = dist.Normal(self.loc, self.initial_scale).log_prob(value[..., 0])
        innovations = value[..., 1:] - loc - persistence * (value[..., :-1] - loc)
        rest = dist.Normal(torch.zeros_like(loc), self.scale.unsqueeze(-1)).log_prob(innovations)
        return first + rest.sum(-1)


class _SymmetricUnitInterval(dist.TransformedDistribution):
    """A law on (-1, 1) made by transforming one on (0, 1) with ``2u - 1``. torch gives a
    ``TransformedDistribution`` the support of its last transform's codomain, the real line for an
    ``AffineTransform``: the support is set here so that Pyro's samplers map the site to (-1, 1)."""

    support = constraints.interval(-1.0, 1.0)


def _persistence_prior(like: torch.Tensor) -> dist.TorchDistribution:
    r""":math:`2u - 1`, :math:`u \sim \mathrm{Beta}(20, 1.5)`, in ``like``'s dtype."""
    return _SymmetricUnitInterval(
        dist.Beta(like.new_tensor(20.0), like.new_tensor(1.5)), AffineTransform(-1.0, 2.0)
    )


def logistic_regression(features: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    r"""inference-gym's plain logistic regression (German credit's "numeric logistic regression"):

    .. math:: w_i \sim N(0, 1), \quad y_n \sim \mathrm{Bernoulli}\bigl(\mathrm{logit}^{-1}(X_n \cdot w)\bigr).

    Args:
        features: :math:`X`, ``(N, K)`` (for German credit, standardized with a column of ones last: the
            data of :func:`load_data` ``("german_credit_sparse_logistic")``).
        labels: :math:`y`, ``(N,)`` 0/1, or ``None`` to draw them.
    """
    weights = pyro.sample("weights", dist.Normal(features.new_zeros(features.shape[-1]), 1.0).to_event(1))
    with pyro.plate("data", features.shape[0]):
        pyro.sample("labels", dist.Bernoulli(logits=weights @ features.mT), obs=labels)


def sparse_logistic_regression(features: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    r"""inference-gym's sparse logistic regression (a horseshoe-like Gamma scale mixture):

    .. math:: \tau \sim \mathrm{Gamma}(\tfrac12, \tfrac12), \quad
              \lambda_i \sim \mathrm{Gamma}(\tfrac12, \tfrac12), \quad \beta_i \sim N(0, 1),

    .. math:: y_n \sim \mathrm{Bernoulli}\bigl(\mathrm{logit}^{-1}(X_n \cdot w)\bigr), \quad
              w = \tau \lambda \odot \beta.

    Args:
        features: :math:`X`, ``(N, K)`` (for German credit, standardized with a column of ones last).
        labels: :math:`y`, ``(N,)`` 0/1, or ``None`` to draw them.
    """
    half = features.new_tensor(0.5)
    global_scale = pyro.sample("global_scale", dist.Gamma(half, half))
    with pyro.plate("features", features.shape[-1]):
        local_scales = pyro.sample("local_scales", dist.Gamma(half, half))
        unscaled_weights = pyro.sample("unscaled_weights", dist.Normal(features.new_tensor(0.0), 1.0))
    weights = unscaled_weights * local_scales * global_scale  # (..., K)
    with pyro.plate("data", features.shape[0]):
        pyro.sample("labels", dist.Bernoulli(logits=weights @ features.mT), obs=labels)


def stochastic_volatility(returns: torch.Tensor) -> None:
    r"""inference-gym's stochastic volatility model with an AR(1) log volatility:

    .. math:: \phi = 2u - 1,\ u \sim \mathrm{Beta}(20, 1.5), \quad \mu \sim \mathrm{Cauchy}(0, 5), \quad
              \sigma \sim \mathrm{HalfCauchy}(2), \quad h \sim \mathrm{AR1}(\mu, \phi, \sigma), \quad
              r_t \sim N(0, e^{h_t / 2}).

    ``persistence_of_volatility`` is :math:`\phi` itself, a site with support (-1, 1) (Beta(20, 1.5)
    mapped by :math:`2u - 1`); ``log_volatility`` is one site of law :class:`AR1` (event shape ``(T,)``)
    and the returns one ``to_event(1)`` site.

    Args:
        returns: :math:`r`, ``(T,)`` centred log returns.
    """
    persistence = pyro.sample("persistence_of_volatility", _persistence_prior(returns))
    mean_log_volatility = pyro.sample("mean_log_volatility", dist.Cauchy(returns.new_tensor(0.0), 5.0))
    shock_scale = pyro.sample("white_noise_shock_scale", dist.HalfCauchy(returns.new_tensor(2.0)))
    log_volatility = pyro.sample(
        "log_volatility", AR1(mean_log_volatility, persistence, shock_scale, returns.shape[-1])
    )
    pyro.sample("returns", dist.Normal(0.0, torch.exp(log_volatility / 2)).to_event(1), obs=returns)


def item_response_theory(
    student_ids: torch.Tensor,
    question_ids: torch.Tensor,
    correct: torch.Tensor | None = None,
    num_students: int | None = None,
    num_questions: int | None = None,
) -> None:
    r"""inference-gym's one-parameter item response theory model:

    .. math:: m \sim N(0.75, 1), \quad a_i \sim N(0, 1), \quad d_j \sim N(0, 1), \quad
              c_n \sim \mathrm{Bernoulli}\bigl(\mathrm{logit}^{-1}(m + a_{s_n} - d_{q_n})\bigr).

    Args:
        student_ids: :math:`s`, ``(N,)`` long, the student of each answer.
        question_ids: :math:`q`, ``(N,)`` long, the question of each answer.
        correct: :math:`c`, ``(N,)`` 0/1, or ``None`` to draw them.
        num_students, num_questions: How many (default: the largest id plus one).
    """
    num_students = int(student_ids.max()) + 1 if num_students is None else num_students
    num_questions = int(question_ids.max()) + 1 if num_questions is None else num_questions
    zero = correct.new_tensor(0.0) if correct is not None else torch.tensor(0.0)
    mean_ability = pyro.sample("mean_student_ability", dist.Normal(zero + 0.75, 1.0))
    with pyro.plate("students", num_students):
        ability = pyro.sample("centered_student_ability", dist.Normal(zero, 1.0))
    with pyro.plate("questions", num_questions):
        difficulty = pyro.sample("question_difficulty", dist.Normal(zero, 1.0))
    logits = mean_ability + ability[..., student_ids] - difficulty[..., question_ids]
    with pyro.plate("answers", len(student_ids)):
        pyro.sample("correct", dist.Bernoulli(logits=logits), obs=correct)


def brownian_motion_unknown_scales(observations: torch.Tensor) -> None:
    r"""inference-gym's Brownian motion with missing middle observations and unknown scales (32 dims for
    30 steps):

    .. math:: s_x, s_y \sim \mathrm{LogNormal}(0, 2), \quad x_0 \sim N(0, s_x), \quad
              x_t \sim N(x_{t-1}, s_x), \quad y_t \sim N(x_t, s_y).

    Sites ``innovation_scale`` (:math:`s_x`), ``observation_scale`` (:math:`s_y`) and ``x`` (the path,
    law :class:`AR1` with persistence 1 and initial sd :math:`s_x`); ``observations`` is observed where
    it is not NaN (masked out elsewhere: the missing values are not parameters).

    Args:
        observations: :math:`y`, ``(T,)``, NaN where missing (:func:`brownian_motion_data`).
    """
    zero = observations.new_tensor(0.0)
    innovation_scale = pyro.sample("innovation_scale", dist.LogNormal(zero, 2.0))
    observation_scale = pyro.sample("observation_scale", dist.LogNormal(zero, 2.0))
    x = pyro.sample(
        "x", AR1(zero, zero + 1.0, innovation_scale, observations.shape[-1], initial_scale=innovation_scale)
    )
    observed = ~torch.isnan(observations)
    pyro.sample(
        "observations",
        dist.Normal(x, observation_scale.unsqueeze(-1)).mask(observed).to_event(1),
        obs=torch.where(observed, observations, zero),
    )


def brownian_motion_data(seed: int = 0, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Data for :func:`brownian_motion_unknown_scales`: a path of 30 steps drawn with innovation sd 0.1,
    observed with noise sd 0.15, the middle ten observations (indices 10-19) set to NaN (missing).
    Drawn in float64 from ``seed``, the same on every machine."""
    generator = torch.Generator().manual_seed(seed)
    innovation, observation = _BROWNIAN_SCALES
    noise = torch.randn(2, _BROWNIAN_STEPS, generator=generator, dtype=torch.float64)
    path = torch.cumsum(innovation * noise[0], 0)
    observations = path + observation * noise[1]
    observations[_BROWNIAN_MISSING] = float("nan")
    return {"observations": observations.to(dtype)}


#: The four Pyro models, by posterior name (the two stochastic volatility posteriors share one).
MODELS: dict[str, Callable[..., None]] = {
    "german_credit_sparse_logistic": sparse_logistic_regression,
    "stochastic_volatility_sp500_small": stochastic_volatility,
    "stochastic_volatility_sp500": stochastic_volatility,
    "item_response_theory": item_response_theory,
}
