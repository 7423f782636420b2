r"""The end-of-run checks: a run whose chains may not have converged says so.

**Pooled** (:func:`warn_if_unconverged`): a split R-hat above ``RHAT_LIMIT`` (1.01: the chains disagree)
or a bulk effective sample size below ``MIN_ESS`` (100) for some coordinate, by Pyro's
:func:`~pyro.ops.stats.split_gelman_rubin` and :func:`~pyro.ops.stats.effective_sample_size`, as in
``mcmc.summary()``.

**Per chain** (:func:`chain_reports`): a chain that disagrees with the others, a chain far slower than
the others. Pooled diagnostics hide a single bad chain: R-hat over four chains rises only mildly when one of
them sits in a mode the others never visit. Each chain is held against the others, coordinate by
coordinate, by the z-score of its mean,

.. math:: z_{c,j} = \frac{\bar x_{c,j} - \bar x_{-c,j}}
          {\sqrt{s_{c,j}^2 / \mathrm{ESS}_{c,j} + s_{-c,j}^2 / \mathrm{ESS}_{-c,j}}},

where :math:`-c` pools the other chains and the ESS are Pyro's
(:func:`pyro.ops.stats.effective_sample_size`). Under chains of one law, each :math:`z` is about
standard normal; a chain whose :math:`|z| > 6` for some coordinate disagrees (stuck in one mode,
or not yet arrived). A chain whose time per draw is over three times the chains' median is slow
(a chain in a region of small steps, or sharing a core).

Example:
    >>> _ = torch.manual_seed(0)
    >>> good = torch.randn(3, 500)
    >>> stuck = torch.cat([good, 4 + 0.1 * torch.randn(1, 500)])
    >>> [report.chain for report in chain_reports({"loc": stuck}) if report.disagrees]
    [3]
"""

from __future__ import annotations

__all__ = [
    "DISAGREEMENT_Z",
    "MIN_ESS",
    "RHAT_LIMIT",
    "SLOW_FACTOR",
    "ChainReport",
    "chain_reports",
    "warn_about_chains",
    "warn_about_draws",
    "warn_if_unconverged",
]

import math
import warnings

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from pyro.ops.stats import effective_sample_size, split_gelman_rubin

#: A chain disagrees with the others where the z-score of one of its means is beyond this.
DISAGREEMENT_Z = 6.0
#: A chain is slow where its time per draw is over this many times the chains' median.
SLOW_FACTOR = 3.0


class ChainReport(NamedTuple):
    """What one chain of a run says about itself, against the others."""

    chain: int  #: the chain's index
    #: the coordinates where the chain's mean disagrees with the other chains', with their z-scores
    #: (``"loc"``, ``"theta[3]"``), worst first
    disagreements: dict[str, float]
    seconds_per_draw: float  #: the chain's sampling time per draw (NaN where unknown)
    slow: bool  #: whether that is over ``SLOW_FACTOR`` times the chains' median

    @property
    def disagrees(self) -> bool:
        """Whether some coordinate's mean disagrees with the other chains'."""
        return bool(self.disagreements)


def _coordinates(samples: Mapping[str, Any]) -> tuple[list[str], torch.Tensor]:
    """Names and values ``(chains, draws, coordinates)`` of every scalar coordinate of ``samples``."""
    names, columns = [], []
    for site, value in samples.items():
        value = torch.as_tensor(value).double()
        if value.dim() < 2:
            continue
        flat = value.reshape(value.shape[0], value.shape[1], -1)
        shape = tuple(value.shape[2:])
        for index in range(flat.shape[-1]):
            if shape:
                position = ",".join(str(int(i)) for i in torch.unravel_index(torch.tensor(index), shape))
                names.append(f"{site}[{position}]")
            else:
                names.append(site)
        columns.append(flat)
    if not columns:
        return [], torch.zeros(0, 0, 0, dtype=torch.float64)
    return names, torch.cat(columns, dim=-1)


def _mean_and_error(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and Monte Carlo standard error of ``(chains, draws, k)``, per coordinate."""
    pooled = draws.reshape(-1, draws.shape[-1])
    ess = effective_sample_size(draws).clamp(min=1.0)
    return pooled.mean(0), pooled.std(0) / ess.sqrt()


def chain_reports(
    samples: Mapping[str, Any], seconds_per_draw: Sequence[float] | None = None
) -> list[ChainReport]:
    """One :class:`ChainReport` per chain of ``samples`` ``{site: (chains, draws, ...)}``
    (``mcmc.get_samples(group_by_chain=True)``), with each chain's sampling time per draw if given."""
    names, values = _coordinates(samples)
    chains = values.shape[0] if values.numel() else len(seconds_per_draw or ())
    seconds = [math.nan] * chains if seconds_per_draw is None else [float(s) for s in seconds_per_draw]
    known = [s for s in seconds if math.isfinite(s)]
    median = float(torch.tensor(known).median()) if len(known) >= 2 else math.nan
    finite = values.numel() > 0 and values.shape[1] >= 4 and bool(torch.isfinite(values).all())
    reports = []
    for chain in range(chains):
        disagreements = {}
        if finite and chains >= 2:
            mean, error = _mean_and_error(values[chain : chain + 1])
            others = torch.cat([values[:chain], values[chain + 1 :]])
            other_mean, other_error = _mean_and_error(others)
            spread = (error.square() + other_error.square()).sqrt()
            with torch.no_grad():
                z = torch.where(spread > 0, (mean - other_mean) / spread, (mean - other_mean) * math.inf)
            # a chain that never moved keeps its infinite z
            z = torch.nan_to_num(z, nan=0.0, posinf=math.inf, neginf=-math.inf)
            for j in torch.argsort(z.abs(), descending=True).tolist():
                if not abs(float(z[j])) > DISAGREEMENT_Z:
                    break
                disagreements[names[j]] = float(z[j])
        slow = math.isfinite(median) and seconds[chain] > SLOW_FACTOR * median
        reports.append(ChainReport(chain, disagreements, seconds[chain], slow))
    return reports


def _described(name: str, z: float) -> str:
    if math.isinf(z):  # no spread at all: the chain's draws of it never changed
        return f"{name!r} (z = {z:+}: its draws never changed, the chain is stuck)"
    return f"{name!r} (z = {z:+.1f})"


def warn_about_chains(reports: Sequence[ChainReport], stacklevel: int = 3, what: str = "this run") -> bool:
    """Warns once for the chains of ``reports`` that disagree with the others or are slow, naming each
    chain and its worst coordinates; returns whether it warned."""
    parts = []
    median = float(torch.tensor([r.seconds_per_draw for r in reports]).nanmedian()) if reports else math.nan
    for report in reports:
        if report.disagrees:
            worst = ", ".join(_described(name, z) for name, z in list(report.disagreements.items())[:3])
            parts.append(f"chain {report.chain} disagrees with the other chains on {worst}")
        if report.slow:
            parts.append(
                f"chain {report.chain} took {report.seconds_per_draw:.3g} s per draw, "
                f"{report.seconds_per_draw / median:.1f}x the chains' median"
            )
    if not parts:
        return False
    warnings.warn(
        f"{what}: {'; '.join(parts)}. A chain that disagrees may be stuck in one mode or not yet arrived "
        "(its draws are not those of the posterior the others see): run longer, start the chains "
        "apart, and look at its trace (az.plot_trace); a slow chain may sit where the steps are small "
        "(a funnel's neck) or share a core.",
        RuntimeWarning,
        stacklevel=stacklevel,
    )
    return True


#: Above this split R-hat, chains disagree.
RHAT_LIMIT = 1.01


#: Below this bulk ESS, estimates (and R-hat itself) are unreliable.
MIN_ESS = 100
#: The most failing sites a warning names.
MAX_NAMED = 5


def warn_if_unconverged(
    samples: Mapping[str, Any],
    stacklevel: int = 3,
    what: str = "this run",
    advice: Callable[[list[str]], str] | None = None,
) -> bool:
    """Warns when ``samples`` ``{site: (chains, draws, ...)}`` have a split R-hat above 1.01 or a bulk
    ESS below 100 for some coordinate (Pyro's diagnostics), naming every site that fails with its worst
    values; ``what`` names the draws in the message, and ``advice(failing sites)``, where given, says
    what most likely went wrong and what to do. Returns whether it warned."""
    failing: dict[str, tuple[float, float]] = {}
    for name, value in samples.items():
        value = torch.as_tensor(value).double()
        if value.dim() < 2 or value.shape[1] < 4 or not bool(torch.isfinite(value).all()):
            continue
        ess = effective_sample_size(value).min().item()
        rhat = split_gelman_rubin(value).max().item()
        if rhat > RHAT_LIMIT or ess < MIN_ESS:
            failing[name] = (rhat, ess)
    if not failing:
        return False
    ranked = sorted(failing, key=lambda name: (-failing[name][0], failing[name][1]))
    named = ", ".join(
        f"{name!r} (R-hat {failing[name][0]:.3f}, ESS {failing[name][1]:.0f})" for name in ranked[:MAX_NAMED]
    )
    more = f" and {len(ranked) - MAX_NAMED} more" if len(ranked) > MAX_NAMED else ""
    told = advice(ranked) if advice is not None else ""
    warnings.warn(
        f"{what} may not have converged: split R-hat above {RHAT_LIMIT} (the chains disagree) or a bulk "
        f"effective sample size under {MIN_ESS} for {named}{more}. Its estimates of them can be wrong. "
        + (
            told
            or "Run longer chains (more warmup too), several chains started apart, and check the flow "
            "check and the divergences in mcmc.diagnostics()."
        ),
        RuntimeWarning,
        stacklevel=stacklevel,
    )
    return True


def warn_about_draws(
    samples: Mapping[str, Any],
    seconds_per_draw: Sequence[float] | None = None,
    stacklevel: int = 3,
    what: str = "this run",
    advice: Callable[[list[str]], str] | None = None,
) -> bool:
    """The end-of-run checks of ``samples`` ``{site: (chains, draws, ...)}``: the pooled one
    (:func:`warn_if_unconverged`) and the per-chain one
    (:func:`~pyro_nfmala.output.convergence.chain_reports`,
    with each chain's time per draw if given), each warning once, the pooled one with ``advice``;
    returns whether either warned."""
    pooled = warn_if_unconverged(samples, stacklevel=stacklevel + 1, what=what, advice=advice)
    reports = chain_reports(samples, seconds_per_draw)
    return warn_about_chains(reports, stacklevel=stacklevel + 1, what=what) or pooled
