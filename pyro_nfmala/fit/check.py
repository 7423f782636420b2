r"""The flow check: how well a map covers a target, from importance weights of its own draws.

With draws :math:`z_i \sim q_Z` and :math:`x_i = f(z_i)`, the importance weights of the target
:math:`\pi_X` against the map's law are

.. math:: \log w_i = \log \pi_X(x_i) + \mathrm{ladj}(z_i) - \log q_Z(z_i),

the latent target T1 over the base density. Two numbers summarize them:

- the **Pareto** :math:`\hat k` of their upper tail (Pareto smoothed importance sampling,
  Vehtari et al.; fitted with Pyro's :func:`~pyro.ops.stats.fit_generalized_pareto` as in
  :func:`pyro.infer.importance.psis_diagnostic`): below 0.5 the map is good; above 0.7 the
  weights have a heavy tail, the map misses part of the target (or puts mass where it has none),
  and MCMC on its latent target will mix slowly or, in a finite run, not at all;
- the **importance ESS** :math:`(\sum_i w_i)^2 / \sum_i w_i^2`: how many exact draws the map is
  worth. At 90% of the draws or more the weights are nearly equal and the map is good whatever
  the tail fit says (fitted to nearly equal weights, k-hat is noise), provided k-hat <= 0.7.

Three grades follow (:class:`FlowCheck`): **good** (k-hat below 0.5, or an importance ESS of 90% with
k-hat <= 0.7), **serviceable** (good, or k-hat <= 0.7 with an importance ESS of at least 30%: as the
proposal of independence moves, the map's draws are worth a third of exact draws or more, so chains
mix well with the map as it is) and **reliable** (k-hat <= 0.7: the weights, and the map's coverage,
can be trusted; above, a warning).

Example:
    >>> import zuko
    >>> check = check_flow(identity_flow(2), lambda x: -0.5 * (x**2).sum(-1), num_samples=2000)
    >>> check.khat < 0.5, round(check.ess_fraction, 2)  # the identity map *is* N(0, I)
    (True, 1.0)
"""

from __future__ import annotations

__all__ = [
    "FLOW_CHECK_SAMPLES",
    "GOOD_ESS_FRACTION",
    "KHAT_BAD",
    "KHAT_GOOD",
    "SERVICEABLE_ESS_FRACTION",
    "FlowCheck",
    "check_flow",
]

import math
import time
import warnings

from collections.abc import Callable
from typing import NamedTuple

import torch

from pyro.ops.stats import fit_generalized_pareto
from torch import Tensor

from ..engine.errors import is_out_of_memory
from ..flows.latent import as_latent_flow

#: Below this Pareto k-hat the map is good (PSIS).
KHAT_GOOD = 0.5
#: Above this Pareto k-hat the importance weights, and the map, are unreliable (PSIS).
KHAT_BAD = 0.7
#: Draws of the map used by default.
FLOW_CHECK_SAMPLES = 1000
#: An importance ESS of at least this share of the draws also makes a map good (with k-hat <= 0.7).
GOOD_ESS_FRACTION = 0.9
#: An importance ESS of at least this share of the draws makes a map serviceable (with k-hat <= 0.7).
SERVICEABLE_ESS_FRACTION = 0.3


class FlowCheck(NamedTuple):
    """The flow check of a map against a target (see the module)."""

    khat: float  #: Pareto k-hat of the importance weights' upper tail (inf with too few finite weights)
    ess: float  #: importance effective sample size, (sum w)^2 / sum w^2
    num_samples: int  #: draws of the map
    num_finite: int  #: draws with a finite weight

    @property
    def ess_fraction(self) -> float:
        """The importance ESS per draw, in [0, 1]."""
        return self.ess / self.num_samples

    @property
    def good(self) -> bool:
        """Whether the map alone is a good approximation of the target (k-hat below 0.5, or an
        importance ESS of at least 90% of the draws: nearly equal weights, whose tail fit is noise)."""
        return self.khat < KHAT_GOOD or (self.reliable and self.ess_fraction >= GOOD_ESS_FRACTION)

    @property
    def serviceable(self) -> bool:
        """Whether chains mix well with the map as it is, being good, or with k-hat at most 0.7 and an
        importance ESS of at least 30% of the draws (its draws, as independence proposals, are worth a
        third of exact draws or more). The staged fit adds no flow stage to a serviceable Gaussian map."""
        return self.good or (self.reliable and self.ess_fraction >= SERVICEABLE_ESS_FRACTION)

    @property
    def reliable(self) -> bool:
        """Whether k-hat is at most 0.7, so that the importance weights, and the map's coverage, can be
        trusted."""
        return self.khat <= KHAT_BAD

    def warn(self, what: str = "the flow", stacklevel: int = 2) -> None:
        """Warns, saying what it means and what to do, unless the check is :attr:`reliable`."""
        if self.reliable:
            return
        warnings.warn(
            f"{what} fails the flow check: Pareto k-hat {self.khat:.2f} > {KHAT_BAD} (importance ESS "
            f"{self.ess:.0f} of {self.num_samples} draws). It misses part of the posterior or puts mass "
            "where the posterior has none, so the chains may mix too slowly to be right in this run. "
            "Run longer chains and check R-hat across chains, or fit the map longer or with a more "
            "flexible flow.",
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )


def pareto_khat(log_weights: Tensor) -> float:
    """Pareto k-hat of the upper tail of ``log_weights`` (the tail size of PSIS: min(n/5, 3 sqrt n))."""
    log_weights = log_weights[torch.isfinite(log_weights)].double()
    n = len(log_weights)
    if n < 10:
        return math.inf
    log_weights = torch.sort(log_weights - log_weights.max()).values
    if float(log_weights[0]) > -1e-3:  # weights equal within 0.1% (rounding): no tail, the map is the target
        return 0.0
    cutoff_index = -math.ceil(min(0.2 * n, 3.0 * math.sqrt(n))) - 1
    cutoff = max(math.log(1e-15), float(log_weights[cutoff_index]))
    tail = log_weights[log_weights > cutoff]
    if len(tail) < 5:
        return math.inf
    return float(fit_generalized_pareto(tail.exp() - math.exp(cutoff))[0])


def _log_prob_or_minus_inf(log_prob: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``log_prob(x)``; where evaluating the batch raises, row by row, a row that raises counting as -inf."""
    try:
        return log_prob(x)
    except Exception as error:  # noqa: BLE001 - a diagnostic: points where the target fails get no weight
        if is_out_of_memory(error):
            raise
    values = []
    for row in x:
        try:
            values.append(log_prob(row[None]).reshape(()))
        except Exception as error:  # noqa: BLE001
            if is_out_of_memory(error):
                raise
            values.append(torch.tensor(-math.inf, dtype=x.dtype, device=x.device))
    return torch.stack(values)


def check_flow(
    flow,
    log_prob: Callable[[Tensor], Tensor],
    num_samples: int = FLOW_CHECK_SAMPLES,
    *,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    deadline: float = math.inf,
) -> FlowCheck:
    r"""The flow check of ``flow`` (a zuko flow or :class:`~pyro_nfmala.LatentFlow`) against the
    unnormalized log density ``log_prob`` of a batch ``(n, d)`` (see the module).

    The draws are evaluated ``batch_size`` at a time; past ``deadline`` (a ``time.perf_counter()``) no
    further batch is, once one has been (the check then holds fewer draws: its ``draws`` says how many).

    A draw where ``log_prob`` is not finite, or raises, has weight 0 (the map puts mass where the
    target has none, or cannot be evaluated), which counts against the map through the ESS. The
    draws come from ``generator``, by default a fixed seed: the check leaves the global random
    state alone, and gives the same answer for the same map.
    """
    flow = as_latent_flow(flow)
    if generator is None:
        generator = torch.Generator(device=flow.device).manual_seed(0)
    z = flow.sample_base((int(num_samples),), generator=generator)
    log_weights = []
    with torch.no_grad():
        for chunk in z.split(batch_size):
            if log_weights and time.perf_counter() > deadline:
                z = z[: sum(len(done) for done in log_weights)]
                break
            x, ladj = flow.to_data(chunk)
            log_weights.append(
                _log_prob_or_minus_inf(log_prob, x).to(ladj.dtype) + ladj - flow.base_log_prob(chunk)
            )
    log_weights = torch.cat(log_weights).double()
    finite = torch.isfinite(log_weights)
    if not finite.any():
        return FlowCheck(math.inf, 0.0, len(z), 0)
    weights = torch.softmax(torch.where(finite, log_weights, -math.inf), dim=0)
    return FlowCheck(pareto_khat(log_weights), float(1 / weights.square().sum()), len(z), int(finite.sum()))
