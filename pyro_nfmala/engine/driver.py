r"""The one driver layer under both samplers: chain start, the schedule of moves, warmup, the ledger.

:class:`~pyro_nfmala.NFMALA` (one chain per Pyro kernel) and :class:`~pyro_nfmala.ChainSampler`
(a batch of chains) are thin front ends on :class:`Driver`, which holds a ``(chains, d)``
batch of states and owns, once for both:

- the options (:class:`~pyro_nfmala.engine.options.SamplerOptions`, checked there);
- the start: where each chain begins (:meth:`Driver.start_state`, the one start policy: a point the
  map can reach, else an overdispersed draw of the map; or draws of the map), the target's batch
  check, finiteness, a first step size
  (:func:`~pyro_nfmala.engine.adaptation.find_reasonable_step_size`);
- the schedule of moves: every step is one local move (a Langevin move, the preconditioner of
  :mod:`pyro_nfmala.engine.langevin`, or a Hamiltonian one, :mod:`pyro_nfmala.engine.hamiltonian`:
  :func:`~pyro_nfmala.engine.step.advance`), and with ``independence_every=k`` every ``k``-th is followed by
  an independence step (:mod:`pyro_nfmala.engine.independence`: ``independence_tries`` moves in a row, their
  proposals evaluated as one batch); each move is the generic Metropolis-Hastings step
  (:func:`~pyro_nfmala.engine.step.metropolis_hastings_step`) or its batched form for independence moves
  (:func:`~pyro_nfmala.engine.step.independence_steps`);
- warmup, as one :class:`~pyro_nfmala.engine.adaptation.WarmupAdaptation` (step size, mass matrix, and
  the flow where it is refined), whose parameters the steps receive; fixed when warmup ends, so
  that sampling is one fixed, exact kernel;
- the ledger: per move and per phase (warmup, sampling) the proposals, acceptances and divergent
  proposals, and per sampling draw the statistics (``accept_prob``, ``step_size``, ``diverging``,
  ``lp``: the log density of :math:`x` under the target's push-forward up to a constant,
  :math:`\log \pi(z) - \mathrm{ladj}(z)`; with a Hamiltonian move ``n_steps``, its leapfrog steps; with
  independence moves ``independence_accept_prob``, the mean over the step's ``independence_tries``, NaN on
  a draw without one);
- the warnings: the first numerical error of each kind, with its message, and at the end of a
  run the divergences of warmup and sampling and any chain that never moved.

Example:
    >>> target = TemperedFlow(zuko.flows.RealNVP(2), beta=1.0)
    >>> driver = Driver(target, num_chains=16)
    >>> _ = driver.start(target.flow.sample_base((16,)), search_from=1.0)
    >>> driver.begin_warmup(20)
    >>> info = [driver.step() for _ in range(20)][-1]
    >>> driver.warming_up, tuple(driver.stats(info)["lp"].shape)
    (False, (16,))
"""

from __future__ import annotations

__all__ = ["DIVERGENCE_WARNING_RATE", "SAMPLE_STATS", "Driver", "MoveLedger", "Record"]

import logging
import warnings

from typing import TYPE_CHECKING

import torch

from torch import Tensor

from ..distributed.collectives import ONE_PROCESS, Collective
from .adaptation import FlowRefinement, KernelParameters, WarmupAdaptation, find_reasonable_step_size
from .independence import auto_tries, independence_proposal
from .options import SamplerOptions
from .refine import FlowRefiner
from .step import ChainState, StepInfo, advance, finite_chains, independence_steps, init_state
from .targets import LatentTarget, PosteriorPullback
from .validation import check_count

if TYPE_CHECKING:
    from ..distributed.sharded import ShardedData

logger = logging.getLogger(__name__)

#: Above this share of divergent proposals (in warmup or in sampling), the end of a run warns.
DIVERGENCE_WARNING_RATE = 0.01
#: Per-draw statistics of the Langevin move, in ArviZ's vocabulary; the independence move's carry
#: its name first (``independence_accept_prob``).
SAMPLE_STATS = ("accept_prob", "step_size", "diverging", "lp")
#: A chain that accepted nothing in this many steps after warmup is reported as stuck.
STUCK_AFTER_STEPS = 100
#: Draws of the map tried for a finite starting point before giving up.
START_TRIES = 100
#: A chain starts at its given point if that lies within this many of the map's sds ...
MAX_LATENT_START = 10.0
#: ... else at an overdispersed draw of the map, z0 ~ N(0, INITIAL_SPREAD^2 I).
INITIAL_SPREAD = 2.0


class MoveLedger:
    """What one move did to each chain, by phase: ``proposals``, ``accepted`` and ``divergent`` counts per
    chain (``per_chain[phase][name]``, shape ``(chains,)``; ``counts`` holds their totals), and the sum of
    each chain's acceptance probabilities."""

    PHASES = ("warmup", "sampling")
    NAMES = ("proposals", "accepted", "divergent")

    def __init__(self, num_chains: int) -> None:
        zeros = torch.zeros(num_chains, dtype=torch.long)
        self.per_chain = {phase: {name: zeros.clone() for name in self.NAMES} for phase in self.PHASES}
        self.accept_prob_sum = torch.zeros(num_chains, dtype=torch.float64)

    def add(self, phase: str, info: StepInfo) -> None:
        """Counts a step's moves (``info``'s fields of shape ``(chains,)``, or ``(tries, chains)``)."""
        counts, n = self.per_chain[phase], len(self.accept_prob_sum)

        def per_chain(value: Tensor) -> Tensor:
            return value.detach().reshape(-1, n).cpu()

        counts["proposals"] += per_chain(info.accept_prob).shape[0]
        counts["accepted"] += per_chain(info.accepted).long().sum(0)
        counts["divergent"] += per_chain(info.diverging).long().sum(0)
        self.accept_prob_sum += per_chain(info.accept_prob).double().sum(0)

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """The counts over all chains, by phase."""
        return {
            phase: {name: int(v.sum()) for name, v in counts.items()}
            for phase, counts in self.per_chain.items()
        }

    def chain_total(self, name: str) -> Tensor:
        """A count per chain ``(chains,)``, over both phases."""
        return sum(self.per_chain[phase][name] for phase in self.PHASES)

    def total(self, name: str) -> int:
        """A count over all chains and both phases."""
        return int(self.chain_total(name).sum())

    @property
    def acceptance_rate(self) -> float:
        """The share of proposals accepted so far, all chains and both phases (NaN before the first)."""
        proposals = self.total("proposals")
        return self.total("accepted") / proposals if proposals else float("nan")

    @property
    def mean_accept_prob(self) -> float:
        """The mean acceptance probability so far, all chains and both phases (NaN before the first)."""
        proposals = self.total("proposals")
        return float(self.accept_prob_sum.sum()) / proposals if proposals else float("nan")

    def snapshot(self) -> dict:
        return {
            phase: {name: v.clone() for name, v in counts.items()} for phase, counts in self.per_chain.items()
        }


class Record:
    """What a batch of chains left at its kept sampling steps (every ``thin``-th): the per-draw
    statistics, and the states' ``x`` and ``z`` where ``keep`` names them, each a list of ``(chains, ...)``
    tensors on the CPU."""

    def __init__(self, stat_names: tuple[str, ...], thin: int = 1, keep: tuple[str, ...] = ()) -> None:
        self.thin, self.keep = thin, tuple(keep)
        self.values: dict[str, list[Tensor]] = {name: [] for name in (*self.keep, *stat_names)}
        self._steps = 0

    def add(self, state: ChainState, stats: dict[str, Tensor]) -> None:
        self._steps += 1
        if self._steps % self.thin:
            return
        for name in self.keep:
            self.values[name].append(getattr(state, name).detach().cpu())
        for name, value in stats.items():
            self.values[name].append(value.detach().cpu())

    @property
    def num_draws(self) -> int:
        """Draws recorded whole (a draw interrupted half-recorded does not count)."""
        return min((len(values) for values in self.values.values()), default=0)

    def stacked(self) -> dict[str, Tensor]:
        """The draws recorded whole, ``{name: (chains, draws, ...)}``."""
        n = self.num_draws
        return {name: torch.stack(values[:n], dim=1) for name, values in self.values.items() if n}


class Driver:
    r"""A batch of latent MALA chains with their schedule of moves, warmup, ledger and warnings.

    Arguments:
        target: The latent target.
        num_chains: Number of chains in the batch.
        options: The sampler's options (:class:`~pyro_nfmala.engine.options.SamplerOptions`); or give them
            as keywords (``Driver(target, 8, independence_every=2)``).
        generator: Random generator of the steps; the global one if ``None``.
        label: How warnings name the sampler.
        modes: The posterior's modes found by the fit, the flow's first (``FitResult.modes``): with
            two or more, the independence moves propose from the mode mixture
            (:class:`~pyro_nfmala.engine.independence.ModeMixtureProposal`).
        pool: The processes whose chains adapt together
            (:class:`~pyro_nfmala.distributed.parallel.ChainParallel`: warmup's statistics pooled over them,
            so every process adapts the same kernel); one process by default.
        shards: Where the data are split over processes
            (:class:`~pyro_nfmala.distributed.sharded.ShardedData`), their group: the chains are checked to be
            the same on every process on its schedule.
    """

    def __init__(
        self,
        target: LatentTarget,
        num_chains: int = 1,
        options: SamplerOptions | None = None,
        *,
        generator: torch.Generator | None = None,
        label: str = "NFMALA",
        modes: tuple = (),
        pool: Collective = ONE_PROCESS,
        shards: ShardedData | None = None,
        **option_values,
    ) -> None:
        if not isinstance(target, LatentTarget):
            raise TypeError(
                "target must be a LatentTarget (PosteriorPullback, TemperedFlow), "
                f"got {type(target).__name__}"
            )
        if options is None:
            options = SamplerOptions(**option_values)
        elif option_values:
            raise TypeError("give the options either as a SamplerOptions or as keywords, not both")
        if options.independence_every == "auto" or options.local_move == "auto":
            raise ValueError(
                "independence_every='auto' and local_move='auto' are resolved by NFMALA's run from its flow "
                "check: give None or k, and 'mala' or 'hmc'"
            )
        if options.refine_every is not None and not isinstance(target, PosteriorPullback):
            raise ValueError(
                "refine_every changes the flow, and a tempered target (TemperedFlow) is defined by its flow: "
                "refinement is for the posterior pull-back (PosteriorPullback) only"
            )
        self.options = options
        self.target = target
        self.num_chains = check_count("num_chains", num_chains)
        self.generator = generator
        self.label = label
        self.pool, self.shards = pool, shards
        self.move = options.move  # the local move; adaptation replaces it by new ones
        if options.mass_matrix is not None:  # a move of this driver's own, with M = I until adapted
            unit = {"dtype": self.flow.dtype, "device": self.flow.device}
            dim = self.flow.dim
            eye = torch.ones(dim, **unit) if options.mass_matrix == "diagonal" else torch.eye(dim, **unit)
            self.move = self.move.with_inverse_mass(eye)
        #: The flow's refiner in warmup (:class:`~pyro_nfmala.engine.refine.FlowRefiner`, its Adam state kept
        #: from one warmup to the next), with ``refine_every``; else ``None``.
        self.refiner = (
            FlowRefiner(self.flow, generator=generator, **options.refine_options)
            if options.refine_every is not None
            else None
        )
        self.independence_every = options.independence_every
        self._tries: int | None = None if options.independence_tries == "auto" else options.independence_tries
        self.modes = tuple(modes)
        self.state: ChainState | None = None
        self.step_size: Tensor | None = None
        self.adaptation: WarmupAdaptation | None = None
        self.refinements = 0
        self.ledgers = {"langevin": MoveLedger(self.num_chains), "independence": MoveLedger(self.num_chains)}
        self.steps = 0
        self.errors = 0
        self._errors_seen: set[str] = set()
        self._last_step_size: Tensor | None = None
        self._last_independence: Tensor | None = None
        self._proposal: tuple | None = None  # (move, modes, the independence proposal built from them)
        self.sampling_steps = 0
        #: The sampling steps recorded since :meth:`start_recording` (``None``: not recording).
        self.record: Record | None = None

    @property
    def flow(self):
        """The flow of the current target."""
        return self.target.flow

    @property
    def parameters(self) -> KernelParameters:
        """The target, the Langevin move and the step size that the next step receives."""
        return KernelParameters(self.target, self.move, self.step_size)

    # ------------------------------------------------------------------------------------------
    # start

    def initial_state(self, z: Tensor) -> ChainState:
        """The state at latents ``z`` ``(num_chains, d)``, after the target's batch check."""
        return init_state(self.target, self.move, z)

    def start(
        self, state: ChainState | Tensor, *, step_size: float | None = None, search_from: float | None = None
    ) -> ChainState:
        """Starts the chains at ``state`` (or at latents ``z``); every chain must be finite.

        The step size is ``step_size``, or, with ``search_from``, found by doubling or halving
        from it (per chain, or their median when adaptation is shared).
        """
        if isinstance(state, Tensor):
            state = self.initial_state(state)
        bad = ~finite_chains(state)
        if bad.any():
            raise ValueError(
                f"{int(bad.sum())} of {self.num_chains} initial states have a non-finite log density or "
                "gradient: start the chains where the target is finite"
            )
        self.state = state
        if search_from is not None:
            step = self._find_step_size(self.parameters, search_from)
        elif step_size is not None:
            step = torch.as_tensor(step_size)
        else:
            raise ValueError("give a step_size or a value to search_from")
        self.step_size = (
            torch.as_tensor(step, dtype=self.flow.dtype, device=self.flow.device)
            .expand(self.num_chains)
            .clone()
        )
        return state

    def start_state(self, x: Tensor | None = None, *, fallback: bool = True, describe=None) -> ChainState:
        r"""The chains' first state, by the one start policy of every sampler:

        - at data-space points ``x`` ``(num_chains, d)``: each chain at :math:`z = f^{-1}(x)`. With
          ``fallback`` (points the sampler chose itself, such as draws of an init strategy), a chain whose
          point the map cannot reach (its inverse is not finite there: a warning), that lies beyond
          ``MAX_LATENT_START`` of the map's sds, or where the target is not finite, starts instead at an
          overdispersed draw of the map, :math:`z \sim N(0, \mathrm{INITIAL\_SPREAD}^2 I)`; without (the
          user's own initial parameters) such a chain is a ``ValueError``;
        - without ``x``: at draws of the map, :math:`z \sim q_Z`.

        A draw where the target or its gradient is not finite is drawn again, up to ``START_TRIES`` times,
        at half the spread after every ten failures (a map whose tails leave the support); after that, a
        ``ValueError``. ``describe()`` adds a note on what ``x`` was to an error raised at it.
        """
        flow, n = self.flow, self.num_chains
        spread = 1.0
        if x is None:
            z = flow.sample_base((n,), self.generator)
        else:
            point = x.detach().to(dtype=flow.dtype, device=flow.device).reshape(n, flow.dim)
            with torch.no_grad():
                z = flow.to_latent(point)
            reachable = torch.isfinite(z).all(-1)
            if not fallback:
                return self._start_at_given_points(z, reachable, describe)
            if not bool(reachable.all()):
                warnings.warn(
                    f"{self.label}: the map cannot reach the starting point of {int((~reachable).sum())} of "
                    f"{n} chain(s) (its inverse is not finite there): the map may miss that part of the "
                    "posterior. Those chains start at draws of the map instead; check R-hat across chains.",
                    RuntimeWarning,
                    stacklevel=4,
                )
            spread = INITIAL_SPREAD  # a start far out in the map's tails (a narrow posterior): overdispersed
            far = ~reachable | (z.abs().amax(-1) > MAX_LATENT_START)
            z = torch.where(far.unsqueeze(-1), spread * flow.sample_base((n,), self.generator), z)
        for attempt in range(START_TRIES):
            state = self._evaluated(z, describe)
            bad = ~finite_chains(state)
            if not bool(bad.any()):
                return state
            redrawn = spread * 0.5 ** (attempt // 10) * flow.sample_base((n,), self.generator)
            z = torch.where(bad.unsqueeze(-1), redrawn, z)
        raise ValueError(
            f"{START_TRIES} draws of the map all gave a non-finite log density or gradient for "
            f"{int(bad.sum())} of {n} chain(s): the map does not cover the posterior's support; pass "
            "initial_params or an init_strategy"
        )

    def _start_at_given_points(self, z: Tensor, reachable: Tensor, describe) -> ChainState:
        if not bool(reachable.all()):
            raise ValueError(
                "the map cannot reach the initial parameters (its inverse is not finite there): give a map "
                "that covers them, or start elsewhere"
            )
        state = self._evaluated(z, describe)
        bad = ~finite_chains(state)
        if bool(bad.any()):
            values = ", ".join(f"{float(value):.4g}" for value in state.log_density[bad][:3])
            raise ValueError(
                f"the initial parameters give a non-finite log density or gradient (log density {values}): "
                "start elsewhere"
            )
        return state

    def _evaluated(self, z: Tensor, describe) -> ChainState:
        try:
            return self.initial_state(z)
        except Exception as error:
            if describe is not None and hasattr(error, "add_note"):
                error.add_note(describe())
            raise

    # ------------------------------------------------------------------------------------------
    # warmup and steps

    @property
    def warming_up(self) -> bool:
        """Whether the coming step is a warmup step."""
        return self.adaptation is not None and not self.adaptation.done

    def begin_warmup(self, num_steps: int, *, adapt_step_size: bool | None = None) -> None:
        """The next ``num_steps`` steps are warmup (:class:`~pyro_nfmala.engine.adaptation.WarmupAdaptation`):
        they adapt the step size (``adapt_step_size``, by default the options'), the mass matrix, and, with
        ``refine_every``, the flow (:attr:`refiner`, every ``refine_every`` steps)."""
        options = self.options
        flow = None
        if self.refiner is not None:
            log_prob = self.target.log_prob
            flow = FlowRefinement(
                self.refiner, options.refine_every, lambda f: PosteriorPullback(f, log_prob), self.pool
            )
        self.adaptation = WarmupAdaptation(
            num_steps,
            adapt_step_size=options.adapt_step_size if adapt_step_size is None else adapt_step_size,
            mass_matrix=options.mass_matrix,
            target_accept_prob=options.accept_target,
            per_chain=options.adapt == "per_chain",
            find_step_size=self._find_step_size,
            flow=flow,
            pool=self.pool,
        )
        self._apply(self.adaptation.init(self.parameters))

    def _find_step_size(self, parameters: KernelParameters, start: float) -> Tensor:
        """A reasonable step size for each chain from its state now, searched from ``start``
        (:func:`~pyro_nfmala.engine.adaptation.find_reasonable_step_size`); where adaptation is shared, the
        median over every process's chains, for all."""
        found = find_reasonable_step_size(
            self.state, parameters.target, parameters.move, start, generator=self.generator
        )
        if self.options.adapt == "per_chain":
            return found
        return self.pool.gather_rows(found).median().expand(found.shape)

    def _apply(self, parameters: KernelParameters) -> None:
        """Takes the parameters adaptation returned; a new target (a refined flow) moves the chains to the
        same data-space points in its latent space, or is refused with a warning where any is not finite."""
        self.move, self.step_size = parameters.move, parameters.step_size
        if parameters.target is self.target:
            return
        target = parameters.target
        with torch.no_grad():
            z = target.flow.to_latent(self.state.x)
        state = init_state(target, self.move, z)
        bad = ~finite_chains(state)
        if bad.any():
            self._refinement_failed(
                f"{int(bad.sum())} of {self.num_chains} chains have a non-finite state under the new target"
            )
            return
        self.target, self.state = target, state
        self.refinements += 1

    def _refinement_failed(self, why: str) -> None:
        warnings.warn(
            f"{self.label}: a flow refinement failed ({why}); the chains go on with the flow as it was",
            RuntimeWarning,
            stacklevel=5,
        )

    def end_warmup(self) -> None:
        """Ends warmup now (also when interrupted): the step size adapted so far is kept and fixed."""
        if self.adaptation is not None and not self.adaptation.done:
            self._apply(self.adaptation.final(self.parameters))

    def step(self) -> StepInfo:
        """One local move of every chain (then, on schedule, an independence move); adapts and records
        as the schedule says."""
        warmup = self.warming_up
        phase = "warmup" if warmup else "sampling"
        step_size = self.step_size
        self.state, info = advance(self.state, self.target, self.move, step_size, generator=self.generator)
        self.steps += 1
        self._note_errors(info.errors)
        self.ledgers["langevin"].add(phase, info)
        if warmup:
            self._apply(self.adaptation.update(self.parameters, self.state, info))
        else:
            self.sampling_steps += 1
        self._last_step_size = step_size
        self._last_independence = None
        if self.independence_every is not None and self.steps % self.independence_every == 0:
            self._independence_move(phase)
        if warmup and self.adaptation.flow is not None:
            try:
                self._apply(self.adaptation.update_flow(self.parameters, self.state))
            except ValueError as error:
                self._refinement_failed(str(error))
        if self.record is not None and not warmup:
            self.record.add(self.state, self.stats(info))
        if self.shards is not None:
            self.shards.check_same_chains(self.steps, self.state.z)
        return info

    @property
    def independence_tries(self) -> int:
        """How many independence moves each independence step makes (the options' number, or for
        ``"auto"`` one until warmup ends and then :func:`~pyro_nfmala.engine.independence.auto_tries` of
        warmup's acceptance rate, fixed from the first sampling step on)."""
        if self._tries is not None:
            return self._tries
        if self.warming_up:
            return 1
        ledger = self.ledgers["independence"].counts["warmup"]
        pooled = self.pool.sum(torch.tensor([ledger["accepted"], ledger["proposals"]], dtype=torch.float64))
        accepted, proposals = pooled.tolist()
        rate = accepted / proposals if proposals else float("nan")
        self._tries = auto_tries(rate)
        logger.info(
            "%s: independence acceptance %.3f in warmup, so %d independence tries per step from now on",
            self.label, rate, self._tries,
        )  # fmt: skip
        return self._tries

    def _independence_move(self, phase: str) -> None:
        """The options' ``independence_tries`` independence moves of every chain in a row
        (:func:`~pyro_nfmala.engine.step.independence_steps`); the statistics keep their mean
        acceptance probability."""
        self.state, info = independence_steps(
            self.state,
            self.target,
            self._independence_proposal(),
            self.independence_tries,
            generator=self.generator,
        )
        self._note_errors(info.errors)
        self.ledgers["independence"].add(phase, info)
        self._last_independence = info.accept_prob.mean(0)

    def _independence_proposal(self):
        """The independence move's proposal, built again only when the Langevin move (its cache) or
        the modes change."""
        if (
            self._proposal is None
            or self._proposal[0] is not self.move
            or self._proposal[1] is not self.modes
        ):
            proposal = independence_proposal(
                self.move, self.options.independence_scale, self.modes, self.generator
            )
            self._proposal = (self.move, self.modes, proposal)
        return self._proposal[2]

    @property
    def stat_names(self) -> tuple[str, ...]:
        """The names of :meth:`stats`, in order."""
        extra = ("n_steps",) if hasattr(self.move, "one_step") else ()
        extra += ("independence_accept_prob",) if self.independence_every is not None else ()
        return SAMPLE_STATS + extra

    @property
    def independence_acceptance_rate(self) -> float:
        """The share of independence proposals accepted so far, warmup included (NaN before the first)."""
        return self.ledgers["independence"].acceptance_rate

    def stats(self, info: StepInfo) -> dict[str, Tensor]:
        """The per-draw statistics of the step that gave ``info``, one value per chain (``lp`` and, with
        independence moves, ``independence_accept_prob`` of the state after the step's independence move)."""
        stats = {
            "accept_prob": info.accept_prob,
            "step_size": self._last_step_size.expand(self.num_chains),
            "diverging": info.diverging,
            "lp": self.state.log_density - self.state.ladj,
        }
        if info.trajectory is not None:  # a Hamiltonian step: its leapfrog steps (ArviZ's n_steps)
            stats["n_steps"] = torch.full_like(info.accept_prob, float(info.trajectory.num_steps))
        if self.independence_every is not None:
            stats["independence_accept_prob"] = (
                self._last_independence
                if self._last_independence is not None
                else torch.full_like(info.accept_prob, float("nan"))
            )
        return stats

    def start_recording(self, *, thin: int = 1, keep: tuple[str, ...] = ()) -> Record:
        """From now on, keep every ``thin``-th sampling step's statistics (and the states' fields named in
        ``keep``, ``"x"`` or ``"z"``) in a new :class:`Record`, :attr:`record`; returns it."""
        self.record = Record(self.stat_names, check_count("thin", thin), keep)
        return self.record

    # ------------------------------------------------------------------------------------------
    # warnings

    def _note_errors(self, errors: tuple[BaseException, ...]) -> None:
        self.errors += len(errors)
        for error in errors:
            kind = type(error).__name__
            if kind in self._errors_seen:
                continue
            self._errors_seen.add(kind)
            warnings.warn(
                f"{self.label}: evaluating a proposal raised {kind}: {error}. Pyro's exception handlers "
                "class it as a numerical failure, so the proposals concerned are rejected and counted as "
                "divergent (a batch that raises is split in halves to find the failing chains). Further "
                f"{kind} errors are counted, not shown.",
                RuntimeWarning,
                stacklevel=4,
            )

    def checkpoint(self) -> dict:
        """The ledger so far, to report on what happens after this point (:meth:`warn_divergences`)."""
        return {
            "ledgers": {name: ledger.snapshot() for name, ledger in self.ledgers.items()},
            "errors": self.errors,
            "sampling_steps": self.sampling_steps,
        }

    def warn_divergences(self, since: dict | None = None, *, stacklevel: int = 3) -> None:
        """Warns about divergences in warmup and in sampling since the :meth:`checkpoint` ``since``
        (or the start), and about chains that accepted nothing after warmup."""
        since = since or {}
        before = since.get("ledgers", {})

        def per_chain(move: str, phase: str, name: str) -> Tensor:
            earlier = before.get(move, {}).get(phase, {}).get(name, 0)
            return self.ledgers[move].per_chain[phase][name] - earlier

        def count(move: str, phase: str, name: str) -> int:
            return int(per_chain(move, phase, name).sum())

        parts = []
        for phase, words in (("warmup", "during warmup"), ("sampling", "after warmup")):
            proposals, divergent = (
                count("langevin", phase, "proposals"),
                count("langevin", phase, "divergent"),
            )
            if proposals and divergent > DIVERGENCE_WARNING_RATE * proposals:
                parts.append(f"{divergent} of {proposals} proposals {words}")
        independent = sum(count("independence", phase, "proposals") for phase in MoveLedger.PHASES)
        nonfinite = sum(count("independence", phase, "divergent") for phase in MoveLedger.PHASES)
        if nonfinite > DIVERGENCE_WARNING_RATE * max(independent, 1):
            parts.append(f"{nonfinite} of {independent} independence proposals")
        if parts:
            cause = "a non-finite log density, gradient or acceptance ratio"
            errors = self.errors - since.get("errors", 0)
            if errors:
                cause += f", or one of {errors} numerical errors raised by an evaluation"
            warnings.warn(
                f"{self.label}: {' and '.join(parts)} were divergent ({cause}) and were rejected. "
                "A rejection leaves the chain where it was, which is exact where the density is finite and "
                "right, but many of them slow the chains down, and a region of the posterior where the "
                "density fails is never sampled: look at where the model or the flow fails "
                "(sample_stats.diverging marks the draws).",
                RuntimeWarning,
                stacklevel=stacklevel,
            )
        steps = self.sampling_steps - since.get("sampling_steps", 0)
        accepted = per_chain("langevin", "sampling", "accepted") + per_chain(
            "independence", "sampling", "accepted"
        )
        stuck = int((accepted == 0).sum()) if steps >= STUCK_AFTER_STEPS else 0
        if stuck:
            warnings.warn(
                f"{self.label}: {stuck} of {self.num_chains} chain(s) accepted no proposal in {steps} steps "
                "after warmup: they stayed at one point, and their draws are not samples of the target. "
                "Check the model at the starting point, the step size, and the warnings above.",
                RuntimeWarning,
                stacklevel=stacklevel,
            )
