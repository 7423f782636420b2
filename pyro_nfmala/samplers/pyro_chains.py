r"""Chains of a run as Pyro's MCMC sees them: one batch of chains that moves a step at a time and says,
per chain, what Pyro's ``MCMC`` asks of a kernel.

:class:`RunChains` wraps the :class:`~pyro_nfmala.engine.driver.Driver` that
:meth:`PosteriorRun.start <pyro_nfmala.samplers.run.PosteriorRun.start>` gives, with its warmup begun, and
gives each chain's unconstrained parameters in the model's own coordinates (:meth:`RunChains.params`),
the progress line (:meth:`RunChains.logging`), each chain's diagnostics with its per-draw statistics
(:meth:`RunChains.diagnostics`), and, when the chains end, the end-of-run checks (:meth:`RunChains.finish`).
:class:`~pyro_nfmala.NFMALA` runs one chain of them per Pyro chain; :class:`pyro_nfmala.MCMC` runs every
chain of a run as one of them.

Example:
    >>> def model(y):
    ...     loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    ...     with pyro.plate("data", len(y)):
    ...         pyro.sample("y", dist.Normal(loc, 1.0), obs=y)
    >>> run = NFMALA(model, fit_options={"progress": False}).prepare(torch.ones(20))
    >>> chains = RunChains(run, num_chains=3, warmup_steps=10)
    >>> for _ in range(20):
    ...     chains.step()
    >>> chains.params(0)["loc"].shape, len(chains.diagnostics(2)["sample_stats"]["accept_prob"])
    (torch.Size([]), 10)
"""

from __future__ import annotations

__all__ = ["RunChains"]

import math
import time

from collections.abc import Mapping

import torch

from torch import Tensor

from ..output.convergence import warn_about_draws
from .run import PosteriorRun


class RunChains:
    """``num_chains`` chains of ``run``, one batch, with ``warmup_steps`` warmup steps ahead.

    Arguments:
        run: The prepared run.
        num_chains: How many chains.
        warmup_steps: Warmup steps before the draws.
        initial_params: The chains' unconstrained initial parameters (``{site: (num_chains, ...)}``, or
            one value per site), else the run's start policy.
        label: How warnings name the sampler.
        earlier: Draws ``(chains, draws, d)`` of chains of the same run that ended before these in this
            process (Pyro's chains one after another): the end-of-run check pools them with these.
    """

    def __init__(
        self,
        run: PosteriorRun,
        num_chains: int,
        warmup_steps: int,
        *,
        initial_params: Mapping[str, Tensor] | None = None,
        label: str = "NFMALA",
        earlier: list[Tensor] | None = None,
    ) -> None:
        self.run, self.num_chains, self.warmup_steps = run, num_chains, warmup_steps
        self.earlier = earlier if earlier is not None else []
        self.driver = run.start(
            num_chains, initial_params=initial_params, adapting=warmup_steps > 0, label=label
        )
        self.driver.begin_warmup(warmup_steps)
        self.record = self.driver.start_recording(keep=("x",))
        self.sampling_seconds = 0.0
        self._params: dict[str, Tensor] | None = None  # the chains' params now, computed when asked
        self._drawn: Tensor | None = None  # the draws so far, every process's, gathered when asked

    @property
    def step_size(self) -> float:
        """The step size the next step uses (the first chain's)."""
        return float(self.driver.step_size[0])

    def step(self) -> None:
        """One step of every chain (a warmup step while warmup lasts)."""
        sampling = not self.driver.warming_up
        started = time.perf_counter()
        self.driver.step()
        if sampling:
            self.sampling_seconds += time.perf_counter() - started
        self._params = self._drawn = None

    def restart(self, chain: int, params: Mapping[str, Tensor]) -> None:
        """Moves ``chain`` to the unconstrained ``params`` (the caller changed the state, as Pyro allows)."""
        if self.run.non_centring is not None:
            raise ValueError(
                "NFMALA samples this model non-centred and cannot restart from params in the model's own "
                "coordinates: pass parameterization='centred'"
            )
        x = self.driver.state.x.clone()
        x[chain] = self.run.layout.pack(params).detach().to(x)
        self.driver.state = self.driver.start_state(x, fallback=False, describe=self.run.describe_start)
        self._params = None

    def params(self, chain: int) -> dict[str, Tensor]:
        """``chain``'s unconstrained parameters now, in the model's own coordinates."""
        if self._params is None:
            self._params = self.run.params(self.driver.state.x)
        return {name: value[chain] for name, value in self._params.items()}

    def drawn(self) -> Tensor | None:
        """Every chain's draws after warmup, ``(chains, draws, d)`` in the sampled coordinates (``None``
        before the first); with the chains split over processes, every process's, gathered once."""
        if self._drawn is None:
            drawn = self.record.stacked().get("x")
            self._drawn = None if drawn is None else self.run.spec.chain_group.gather_rows(drawn)
        return self._drawn

    def drawn_params(self) -> dict[str, Tensor]:
        """Every chain's unconstrained parameters at every draw after warmup, ``{site: (chains, draws,
        *shape)}``, in the model's own coordinates (mapped back in one batch where the chains run
        non-centred); every process's chains with ``ChainParallel``."""
        return self.run.params(self.drawn())

    def logging(self) -> dict[str, str]:
        """The progress line: the step size, the mean acceptance probability and, with independence
        moves, their acceptance rate."""
        driver = self.driver
        accept = driver.ledgers["langevin"].mean_accept_prob
        shown = {
            "step size": f"{self.step_size:.2e}",
            "acc. prob": f"{0.0 if math.isnan(accept) else accept:.3f}",
        }
        if driver.independence_every is not None:
            shown["independence acc."] = f"{driver.independence_acceptance_rate:.3f}"
        return shown

    def sample_stats(self, chain: int) -> dict[str, list]:
        """``chain``'s per-draw statistics after warmup, as plain Python lists."""
        return {
            name: [value[chain].item() for value in values]
            for name, values in self.record.values.items()
            if name != "x"
        }

    def diagnostics(self, chain: int) -> dict:
        """What Pyro's ``MCMC`` keeps of ``chain`` (``mcmc.diagnostics()`` and
        :func:`~pyro_nfmala.to_inference_data` read it)."""
        driver, run = self.driver, self.run
        stats = self.sample_stats(chain)
        langevin, independence = driver.ledgers["langevin"], driver.ledgers["independence"]
        independent = int(independence.chain_total("proposals")[chain])
        accept = stats["accept_prob"]
        check = run.check
        return {
            "divergences": [i for i, diverging in enumerate(stats["diverging"]) if diverging],
            "acceptance rate": sum(accept) / len(accept) if accept else float("nan"),
            "flow check": {}
            if check is None
            else {"khat": check.khat, "ess": check.ess, "draws": check.num_samples},
            "fit seconds": run.fit_result.seconds if run.fit_result is not None else 0.0,
            "non-centred sites": run.non_centred_sites,
            "modes found": len(driver.modes),
            "seconds per draw": self.sampling_seconds / max(self.record.num_draws, 1),
            "warmup divergences": int(langevin.per_chain["warmup"]["divergent"][chain]),
            "numerical errors": driver.errors,
            "independence non-finite": int(independence.chain_total("divergent")[chain]),
            "independence acceptance rate": int(independence.chain_total("accepted")[chain]) / independent
            if independent
            else float("nan"),
            "independence tries": driver.independence_tries,
            "step size": float(driver.step_size[chain]),
            "sample_stats": stats,
        }

    def finish(self) -> list[Tensor]:
        """The end-of-run checks of these chains: divergences and stuck chains, then split R-hat, bulk ESS
        and per-chain disagreement over these chains and the ``earlier`` ones of the same run (each
        check warns with what to do). Returns the draws of every chain checked, for later chains."""
        self.driver.warn_divergences(stacklevel=4)
        drawn = self.drawn()  # chains over processes: every process's, checked on rank 0
        group = self.run.spec.chain_group
        if drawn is None or drawn.shape[1] < 4 or group.rank > 0:
            return self.earlier
        pooled = [*self.earlier, *drawn]
        if len({len(draws) for draws in pooled}) > 1:  # runs of other lengths on the same data: these alone
            pooled = list(drawn)
        count = len(pooled)
        where = f"on {group.size} processes" if group.active else "in this process so far"
        what = f"NFMALA's chain{'s' if count > 1 else ''} ({count} {where})"
        points = torch.stack(pooled)
        samples = self.run.layout.unpack(self.run.model_points(points))
        advice = lambda failing: self.run.likely_causes(points, failing)  # noqa: E731
        warn_about_draws(samples, stacklevel=5, what=what, advice=advice)
        return pooled
