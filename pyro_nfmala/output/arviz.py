r"""ArviZ output: InferenceData with per-draw ``sample_stats``, for ArviZ 0.x and 1.x.

ArviZ 0.23's ``az.from_pyro`` keeps only ``diverging`` in ``sample_stats`` (and misassigns
divergences to chains from 11 chains on); ArviZ 1.x has no ``from_pyro`` and returns an
``xarray.DataTree``. So this module builds the data from plain arrays, with one code path
per ArviZ major version: :func:`from_arrays` is the common core, :func:`to_inference_data`
reads a finished Pyro ``MCMC`` run of :class:`~pyro_nfmala.NFMALA`.

Example:
    >>> import numpy as np
    >>> idata = from_arrays(
    ...     posterior={"mu": np.zeros((2, 10))},
    ...     sample_stats={"accept_prob": np.full((2, 10), 0.6)},
    ... )
    >>> idata.posterior["mu"].shape
    (2, 10)
"""

from __future__ import annotations

__all__ = [
    "SAMPLE_STATS",
    "diverging_draws",
    "from_arrays",
    "pointwise_log_likelihood",
    "posterior_inference_data",
    "to_inference_data",
]

import math

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..engine.driver import SAMPLE_STATS
from .convergence import warn_about_draws


def _arviz_major() -> int:
    import arviz

    return int(arviz.__version__.split(".")[0])


def from_arrays(
    posterior: Mapping[str, Any],
    sample_stats: Mapping[str, Any] | None = None,
    *,
    groups: Mapping[str, Mapping[str, Any]] | None = None,
    coords: Mapping[str, Any] | None = None,
    dims: Mapping[str, list[str]] | None = None,
    attrs: Mapping[str, Any] | None = None,
):
    """InferenceData (ArviZ 0.x) or DataTree (ArviZ 1.x) from arrays of shape ``(chains, draws, ...)``.

    Arguments:
        posterior: Variables of the posterior group.
        sample_stats: Per-draw statistics, each ``(chains, draws)``.
        groups: More groups, e.g. ``{"latent": {"z": z}}`` (kept as they are).
        coords, dims, attrs: As in ``az.from_dict``.
    """
    import warnings

    import arviz

    data = {"posterior": {name: np.asarray(value) for name, value in posterior.items()}}
    if sample_stats:
        data["sample_stats"] = {name: np.asarray(value) for name, value in sample_stats.items()}
    for name, group in (groups or {}).items():
        data[name] = {key: np.asarray(value) for key, value in group.items()}
    attrs = {"inference_library": "pyro_nfmala", **(attrs or {})}

    with warnings.catch_warnings():
        # Thousands of short chains are normal for the vectorized sampler (ArviZ 0.x and 1.x say so
        # in other words).
        warnings.filterwarnings("ignore", message="More chains .* than draws")
        warnings.filterwarnings("ignore", message="Found chain dimension to be longer than draw dimension")
        if _arviz_major() >= 1:
            group_attrs = {name: dict(attrs) for name in data}  # ArviZ 1.x takes attrs per group
            return arviz.from_dict(data, coords=coords, dims=dims, attrs=group_attrs)

        main = {key: data.pop(key) for key in ("posterior", "sample_stats") if key in data}
        idata = arviz.from_dict(**main, coords=coords, dims=dims, attrs=attrs)
        for name, group in data.items():
            if name in _ARVIZ_GROUPS:  # ArviZ's own groups, with their conventions (observed data: no draws)
                idata.add_groups(
                    {name: getattr(arviz.from_dict(**{name: group}, coords=coords, dims=dims), name)}
                )
            else:
                idata.add_groups({name: arviz.from_dict(posterior=group, coords=coords, dims=dims).posterior})
        return idata


#: Groups that ArviZ 0.x's ``from_dict`` builds itself.
_ARVIZ_GROUPS = ("log_likelihood", "observed_data", "posterior_predictive", "prior", "prior_predictive")


def to_inference_data(
    mcmc,
    *,
    coords=None,
    dims=None,
    log_likelihood: bool = True,
    posterior_predictive: Mapping[str, Any] | None = None,
    prior: Mapping[str, Any] | None = None,
):
    """InferenceData of a finished ``pyro.infer.MCMC`` run of :class:`~pyro_nfmala.NFMALA`.

    The posterior holds the model's sites in their constrained space (as
    ``mcmc.get_samples(group_by_chain=True)``); ``sample_stats`` holds, per chain and draw,
    ``accept_prob``, ``step_size``, ``diverging`` and ``lp`` (the log density of the draw's
    unconstrained parameters: minus Pyro's potential energy under the exact target), and with
    independence moves ``independence_accept_prob`` (NaN on draws without one). Works for
    sequential and parallel chains alike, for any number of chains.

    For a model, ``log_likelihood`` (default ``True``) adds the ``log_likelihood`` group, pointwise
    per observed site and draw (:func:`pointwise_log_likelihood`, as ArviZ's ``from_pyro``), and
    ``observed_data``: what ``az.loo`` and ``az.waic`` need. ``posterior_predictive`` and ``prior``
    take draws of Pyro's :class:`~pyro.infer.Predictive` (``{site: (num_samples, ...)}``): the
    posterior predictive ones, one per posterior draw in ``mcmc.get_samples()`` order, get the chain
    dimension back; the prior ones are one chain.

    A run that may be wrong warns, saying what to do: split R-hat above 1.01 (chains disagree) or a bulk
    effective sample size below 100 for some parameter (Pyro's ``split_gelman_rubin`` and
    ``effective_sample_size``, as in ``mcmc.summary()``); and per chain
    (:func:`~pyro_nfmala.output.convergence.chain_reports`), a chain whose mean disagrees with the other
    chains' by over 6 standard errors (stuck in one mode) or whose time per draw is over 3 times the median.

    Example:
        >>> mcmc = MCMC(NFMALA(model, flow=flow), num_samples=100, warmup_steps=100)  # doctest: +SKIP
        >>> mcmc.run(data)  # doctest: +SKIP
        >>> az.loo(to_inference_data(mcmc))  # doctest: +SKIP
    """
    per_chain = getattr(mcmc, "_diagnostics", None)
    if not per_chain or any(d is None or "sample_stats" not in d for d in per_chain):
        raise ValueError(
            "to_inference_data needs a finished MCMC run of an NFMALA kernel: run mcmc.run(...) first"
        )
    samples = mcmc.get_samples(group_by_chain=True)
    stats = {
        name: np.stack([np.asarray(chain["sample_stats"][name]) for chain in per_chain])
        for name in per_chain[0]["sample_stats"]
    }
    posterior = {name: _numpy(value) for name, value in samples.items()}
    chains, draws = next(iter(posterior.values())).shape[:2] if posterior else (len(per_chain), 0)
    groups = {}
    if posterior_predictive is not None:
        groups["posterior_predictive"] = {
            name: _by_chain(value, chains, draws, name) for name, value in posterior_predictive.items()
        }
    if prior is not None:
        groups["prior"] = {name: _numpy(value)[None] for name, value in prior.items()}
    return posterior_inference_data(
        samples,
        stats,
        model=getattr(mcmc.kernel, "model", None) if log_likelihood else None,
        model_args=mcmc._args or (),
        model_kwargs=mcmc._kwargs or {},
        groups=groups,
        seconds_per_draw=[chain.get("seconds per draw", math.nan) for chain in per_chain],
        coords=coords,
        dims=dims,
        stacklevel=3,
    )


def posterior_inference_data(
    posterior: Mapping[str, Any],
    sample_stats: Mapping[str, Any],
    *,
    model=None,
    model_args: tuple = (),
    model_kwargs: Mapping | None = None,
    groups: Mapping[str, Mapping[str, Any]] | None = None,
    seconds_per_draw=None,
    what: str = "this run",
    coords=None,
    dims=None,
    stacklevel: int = 2,
    advice=None,
):
    """The ArviZ data of a run of a posterior, as both front ends give it: ``posterior`` ``{site: (chains,
    draws, ...)}`` (constrained) and ``sample_stats``, after the end-of-run checks on the draws
    (:func:`~pyro_nfmala.output.convergence.warn_about_draws`, which warn, naming ``what``, with
    ``advice``); with a
    ``model``, its ``log_likelihood`` and ``observed_data`` groups (:func:`pointwise_log_likelihood`, what
    ``az.loo`` reads); and any other ``groups``."""
    warn_about_draws(posterior, seconds_per_draw, stacklevel=stacklevel + 1, what=what, advice=advice)
    groups = dict(groups or {})
    if model is not None and posterior:
        pointwise, observed = pointwise_log_likelihood(model, posterior, model_args, model_kwargs)
        if pointwise:
            groups["log_likelihood"], groups["observed_data"] = pointwise, observed
    posterior = {name: _numpy(value) for name, value in posterior.items()}
    return from_arrays(posterior, sample_stats, groups=groups, coords=coords, dims=dims)


def _numpy(value) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def _by_chain(value, chains: int, draws: int, name: str) -> np.ndarray:
    array = _numpy(value)
    if array.shape[0] != chains * draws:
        raise ValueError(
            f"posterior_predictive[{name!r}] has {array.shape[0]} draws where the run has {chains} chains x "
            f"{draws} draws: make it with Predictive(model, mcmc.get_samples())"
        )
    return array.reshape(chains, draws, *array.shape[1:])


def pointwise_log_likelihood(
    model, samples: Mapping[str, Any], model_args: tuple = (), model_kwargs: Mapping | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    r"""The log-likelihood of each observed site, pointwise, at each draw, and the observed values.

    For draws ``samples`` ``{site: (chains, draws, ...)}`` (constrained, as ``mcmc.get_samples
    (group_by_chain=True)``), the model runs once per draw conditioned on it; each observed site's
    :math:`\log p(y_i \mid \theta)` is kept per element (a site's ``to_event`` dimensions are not
    summed, so a vector observed with ``.to_event(1)`` counts as its elements; a joint law such as a
    multivariate normal counts as one). Deterministic and factor sites are not observations. Returns
    ``({site: (chains, draws, *shape)}, {site: value})``.
    """
    import torch

    from pyro import poutine

    model_kwargs = dict(model_kwargs or {})
    first = next(iter(samples.values()))
    chains, draws = first.shape[:2]
    pointwise: dict[str, list] = {}
    observed: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for chain in range(chains):
            for draw in range(draws):
                values = {name: torch.as_tensor(value[chain, draw]) for name, value in samples.items()}
                with poutine.block():
                    trace = poutine.trace(poutine.condition(model, data=values)).get_trace(
                        *model_args, **model_kwargs
                    )
                for name, site in trace.nodes.items():
                    if name in values or not _is_observation(site):  # a draw's value, conditioned on
                        continue
                    fn = site["fn"]
                    while isinstance(fn, torch.distributions.Independent):
                        fn = fn.base_dist
                    log_prob = fn.log_prob(site["value"])
                    pointwise.setdefault(name, []).append(log_prob.detach().cpu().numpy())
                    observed.setdefault(name, _numpy(site["value"]))
    stacked = {
        name: np.stack(values).reshape(chains, draws, *np.shape(values[0]))
        for name, values in pointwise.items()
    }
    return stacked, observed


def _is_observation(site: Mapping) -> bool:
    if site["type"] != "sample" or not site["is_observed"]:
        return False
    if site["infer"].get("_deterministic") or site["infer"].get("is_auxiliary"):
        return False
    fn = site["fn"]
    law = fn.base_dist if type(fn).__name__ == "MaskedDistribution" else fn
    return type(law).__name__ not in ("Unit", "Delta")  # pyro.factor's and pyro.deterministic's


def diverging_draws(mcmc) -> np.ndarray:
    """The ``(chains, draws)`` boolean mask of divergent draws of any finished Pyro ``MCMC`` run
    (NUTS, HMC, NFMALA), from ``mcmc.diagnostics()["divergences"]``, for ``sample_stats``."""
    divergences = mcmc.diagnostics()["divergences"]
    mask = np.zeros((len(divergences), mcmc.num_samples), dtype=bool)
    for chain, indices in enumerate(divergences.values()):
        mask[chain, indices] = True
    return mask
