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

__all__ = ["SAMPLE_STATS", "diverging_draws", "from_arrays", "to_inference_data"]

from collections.abc import Mapping
from typing import Any

import numpy as np

from .driver import SAMPLE_STATS


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
            idata.add_groups({name: arviz.from_dict(posterior=group, coords=coords, dims=dims).posterior})
        return idata


def to_inference_data(mcmc, *, coords=None, dims=None):
    """InferenceData of a finished ``pyro.infer.MCMC`` run of :class:`~pyro_nfmala.NFMALA`.

    The posterior holds the model's sites in their constrained space (as
    ``mcmc.get_samples(group_by_chain=True)``); ``sample_stats`` holds, per chain and draw,
    ``accept_prob``, ``step_size``, ``diverging`` and ``lp`` (the log density of the draw's
    unconstrained parameters: minus Pyro's potential energy under the exact target), and with
    independence moves ``independence_accept_prob`` (NaN on draws without one). Works for
    sequential and parallel chains alike, for any number of chains.

    A run that may be wrong warns, saying what to do: split R-hat above 1.01 (chains disagree) or a
    bulk effective sample size below 100 for some parameter (Pyro's ``split_gelman_rubin`` and
    ``effective_sample_size``, as in ``mcmc.summary()``).

    Example:
        >>> mcmc = MCMC(NFMALA(model, flow=flow), num_samples=100, warmup_steps=100)  # doctest: +SKIP
        >>> mcmc.run(data)  # doctest: +SKIP
        >>> az.summary(to_inference_data(mcmc))  # doctest: +SKIP
    """
    per_chain = getattr(mcmc, "_diagnostics", None)
    if not per_chain or any(d is None or "sample_stats" not in d for d in per_chain):
        raise ValueError(
            "to_inference_data needs a finished MCMC run of an NFMALA kernel: run mcmc.run(...) first"
        )
    samples = mcmc.get_samples(group_by_chain=True)
    posterior = {name: value.detach().cpu().numpy() for name, value in samples.items()}
    stats = {
        name: np.stack([np.asarray(chain["sample_stats"][name]) for chain in per_chain])
        for name in per_chain[0]["sample_stats"]
    }
    warn_if_unconverged(samples)
    return from_arrays(posterior, stats, coords=coords, dims=dims)


#: Above this split R-hat, chains disagree.
RHAT_LIMIT = 1.01
#: Below this bulk ESS, estimates (and R-hat itself) are unreliable.
MIN_ESS = 100


def warn_if_unconverged(samples: Mapping[str, Any], stacklevel: int = 3, what: str = "this run") -> bool:
    """Warns when ``samples`` ``{site: (chains, draws, ...)}`` have a split R-hat above 1.01 or a bulk
    ESS below 100 for some coordinate (Pyro's diagnostics); ``what`` names the draws in the message.
    Returns whether it warned."""
    import torch

    from pyro.ops.stats import effective_sample_size, split_gelman_rubin

    worst_rhat, worst_ess = (None, 1.0), (None, float("inf"))
    for name, value in samples.items():
        value = torch.as_tensor(value).double()
        if value.dim() < 2 or value.shape[1] < 4 or not bool(torch.isfinite(value).all()):
            continue
        ess = effective_sample_size(value).min().item()
        if ess < worst_ess[1]:
            worst_ess = (name, ess)
        rhat = split_gelman_rubin(value).max().item()
        if rhat > worst_rhat[1]:
            worst_rhat = (name, rhat)
    problems = []
    if worst_rhat[1] > RHAT_LIMIT:
        problems.append(
            f"split R-hat {worst_rhat[1]:.3f} > {RHAT_LIMIT} for {worst_rhat[0]!r} (the chains disagree)"
        )
    if worst_ess[1] < MIN_ESS:
        problems.append(f"an effective sample size of {worst_ess[1]:.0f} < {MIN_ESS} for {worst_ess[0]!r}")
    if problems:
        import warnings

        warnings.warn(
            f"{what} may not have converged: {'; '.join(problems)}. Its estimates can be wrong: run longer "
            "chains (more warmup too), several chains started apart, and check the flow check and the "
            "divergences in mcmc.diagnostics().",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
    return bool(problems)


def diverging_draws(mcmc) -> np.ndarray:
    """The ``(chains, draws)`` boolean mask of divergent draws of any finished Pyro ``MCMC`` run
    (NUTS, HMC, NFMALA), from ``mcmc.diagnostics()["divergences"]``, for ``sample_stats``."""
    divergences = mcmc.diagnostics()["divergences"]
    mask = np.zeros((len(divergences), mcmc.num_samples), dtype=bool)
    for chain, indices in enumerate(divergences.values()):
        mask[chain, indices] = True
    return mask
