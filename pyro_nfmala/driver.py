r"""The one driver layer under both samplers: options, chain start, warmup, statistics, warnings.

:class:`~pyro_nfmala.NFMALA` (one chain per Pyro kernel) and :class:`~pyro_nfmala.ChainSampler`
(a batch of chains) are thin front ends on :class:`Driver`, which holds a ``(chains, d)``
batch of states and owns, once for both:

- the validation of the sampler's options (:func:`check_step_size`, ...);
- the start: the target's batch check, the initial state, its finiteness, a first step size
  (:func:`~pyro_nfmala.adaptation.find_reasonable_step_size`);
- the warmup schedule: dual averaging of the step size towards the target acceptance
  probability, shared by all chains (fed their mean acceptance probability) or per chain, and
  a latent mass matrix (diagonal or dense, estimated from all chains) on Stan's windows
  (:mod:`pyro_nfmala.adaptation`); both fixed when warmup ends, so that sampling is one fixed,
  exact kernel;
- the global moves: with ``independence_every=k``, every ``k``-th step is followed by a latent
  independence move from the flow's base (:mod:`pyro_nfmala.independence`), in warmup and in
  sampling alike (it adapts nothing);
- the per-draw statistics (``accept_prob``, ``step_size``, ``diverging``, ``lp``, the log
  density of :math:`x` under the target's push-forward up to a constant,
  :math:`\log \pi(z) - \mathrm{ladj}(z)`; with independence moves, ``global_accept_prob``,
  NaN on a draw without one);
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

__all__ = [
    "DEFAULT_PRECONDITIONER",
    "DIVERGENCE_WARNING_RATE",
    "SAMPLE_STATS",
    "Driver",
    "check_mass_matrix",
    "check_num_chains",
    "check_step_size",
    "check_target_accept_prob",
]

import copy
import math
import numbers
import warnings

import torch

from torch import Tensor

from .adaptation import BatchWelfordCovariance, StepSizeAdapter, adaptation_windows, find_reasonable_step_size
from .independence import check_independence, independence_step
from .mala import MALAState, StepInfo, finite_chains, init_state, mala_step
from .precond import MassMatrixPreconditioner, Preconditioner, get_preconditioner
from .target import LatentTarget

#: The preconditioner of both samplers unless told otherwise (plain MALA on the latent target).
DEFAULT_PRECONDITIONER = "identity"
#: Above this share of divergent proposals (in warmup or in sampling), the end of a run warns.
DIVERGENCE_WARNING_RATE = 0.01
#: Per-draw statistics both samplers record, in ArviZ's vocabulary.
SAMPLE_STATS = ("accept_prob", "step_size", "diverging", "lp")
#: A chain that accepted nothing in this many steps after warmup is reported as stuck.
STUCK_AFTER_STEPS = 100


def _as_real(value: object) -> float | None:
    """A Python float of a real number, NumPy scalar or one-element tensor; ``None`` otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, Tensor):
        return float(value) if value.numel() == 1 and not value.is_complex() else None
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def check_step_size(step_size: object) -> float | None:
    """``None``, or the step size as a float: a finite real number > 0 (NumPy scalar and 0-d
    tensor included)."""
    if step_size is None:
        return None
    value = _as_real(step_size)
    if value is None or not math.isfinite(value) or value <= 0:
        raise ValueError(f"step_size must be a finite number > 0 (or None), got {step_size!r}")
    return value


def check_target_accept_prob(target_accept_prob: object) -> float:
    """The target acceptance probability as a float in (0, 1)."""
    value = _as_real(target_accept_prob)
    if value is None or not 0 < value < 1:
        raise ValueError(f"target_accept_prob must lie in (0, 1), got {target_accept_prob!r}")
    return value


def check_mass_matrix(mass_matrix: object, preconditioner: Preconditioner) -> str | None:
    """``None``, ``"diagonal"`` or ``"dense"``; ``"auto"`` is diagonal for a preconditioner that takes a
    mass matrix (the identity's in latent space; ``"jacobian"``'s and ``"data_space"``'s in data space),
    else none."""
    takes_mass = _mass_space(preconditioner) is not None
    if mass_matrix == "auto":
        return "diagonal" if takes_mass else None
    if mass_matrix not in (None, "diagonal", "dense"):
        raise ValueError(f"mass_matrix must be 'auto', 'diagonal', 'dense' or None, got {mass_matrix!r}")
    if mass_matrix is not None and not takes_mass:
        raise ValueError(
            f"mass_matrix={mass_matrix!r} goes with the identity, jacobian or data_space preconditioners; "
            f"the {getattr(preconditioner, 'name', preconditioner)!r} preconditioner takes none: use "
            "mass_matrix=None with it"
        )
    return mass_matrix


def _mass_space(preconditioner: Preconditioner) -> str | None:
    """Where a preconditioner's mass matrix lives (``"latent"`` or ``"data"``), or ``None`` if it has none."""
    if getattr(preconditioner, "name", None) == "identity":
        return "latent"  # the samplers replace it by a MassMatrixPreconditioner of their own
    if hasattr(preconditioner, "set_inverse_mass"):
        return getattr(preconditioner, "space", "latent")
    return None


def check_num_chains(num_chains: object) -> int:
    """The number of chains: an integer >= 1 (not a bool)."""
    if isinstance(num_chains, bool) or not isinstance(num_chains, numbers.Integral) or num_chains < 1:
        raise ValueError(f"num_chains must be an integer >= 1, got {num_chains!r}")
    return int(num_chains)


class Driver:
    r"""A batch of latent MALA chains with their warmup schedule, statistics and warnings.

    Arguments:
        target: The latent target.
        num_chains: Number of chains in the batch.
        preconditioner: ``"identity"`` (default), ``"jacobian"``, ``"data_space"``,
            ``"dense_jacobian"``, or a :class:`~pyro_nfmala.precond.Preconditioner`.
        target_accept_prob: Acceptance probability that adaptation aims at (0.574, optimal for MALA).
        adapt: ``"shared"`` (one step size for all chains) or ``"per_chain"``.
        mass_matrix: ``"diagonal"`` or ``"dense"``: adapt a constant mass matrix in warmup, to the
            covariance of the chains' latent states with the identity preconditioner (which it
            then replaces by a :class:`~pyro_nfmala.precond.MassMatrixPreconditioner` of its own),
            of their data-space states with ``"jacobian"`` and ``"data_space"`` (a copy of the
            preconditioner holds it); ``None``: none; ``"auto"``: diagonal with those three,
            none with the others.
        independence_every: ``None`` (default): MALA steps only. ``k``: every ``k``-th step is
            followed by an independence move :math:`z' \sim \mathcal{N}(0, s^2 I)`.
        independence_scale: :math:`s > 0` (1: the flow's base law).
        generator: Random generator of the steps; the global one if ``None``.
        label: How warnings name the sampler.
    """

    def __init__(
        self,
        target: LatentTarget,
        num_chains: int = 1,
        *,
        preconditioner: str | Preconditioner = DEFAULT_PRECONDITIONER,
        target_accept_prob: float = 0.574,
        adapt: str = "shared",
        mass_matrix: str | None = None,
        independence_every: int | None = None,
        independence_scale: float = 1.0,
        generator: torch.Generator | None = None,
        label: str = "NFMALA",
    ) -> None:
        if not isinstance(target, LatentTarget):
            raise TypeError(
                "target must be a LatentTarget (PosteriorPullback, TemperedFlow), "
                f"got {type(target).__name__}"
            )
        if adapt not in ("shared", "per_chain"):
            raise ValueError(f"adapt must be 'shared' or 'per_chain', got {adapt!r}")
        self.target = target
        self.flow = target.flow
        self.num_chains = check_num_chains(num_chains)
        self.preconditioner = get_preconditioner(preconditioner)
        self.mass_matrix = check_mass_matrix(mass_matrix, self.preconditioner)
        if self.mass_matrix is not None:  # a fresh one: it holds this driver's adapted matrix
            options = {"dtype": self.flow.dtype, "device": self.flow.device}
            unit = (
                torch.ones(self.flow.dim, **options)
                if self.mass_matrix == "diagonal"
                else torch.eye(self.flow.dim, **options)
            )
            if getattr(self.preconditioner, "name", None) == "identity":
                self.preconditioner = MassMatrixPreconditioner(unit)
            else:
                self.preconditioner = copy.copy(self.preconditioner)
                self.preconditioner.set_inverse_mass(unit)
        self.target_accept_prob = check_target_accept_prob(target_accept_prob)
        self.independence_every, self.independence_scale = check_independence(
            independence_every, independence_scale
        )
        self.adapt = adapt
        self.generator = generator
        self.label = label
        self.state: MALAState | None = None
        self.step_size: Tensor | None = None
        self._adapter: StepSizeAdapter | None = None
        self._warmup_left = 0
        self._warmup_step = 0
        self._windows: list[tuple[int, int]] = []
        self._welford: BatchWelfordCovariance | None = None
        self._errors_seen: set[str] = set()
        self.counts = {
            "steps": 0,
            "warmup_proposals": 0,
            "warmup_divergent": 0,
            "proposals": 0,
            "divergent": 0,
            "errors": 0,
            "global_proposals": 0,
            "global_accepted": 0,
            "global_nonfinite": 0,
        }
        self._last_global: Tensor | None = None
        self.accepted = torch.zeros(self.num_chains, dtype=torch.long)
        self.sampling_steps = 0

    # ------------------------------------------------------------------------------------------
    # start

    def initial_state(self, z: Tensor) -> MALAState:
        """The state at latents ``z`` ``(num_chains, d)``, after the target's batch check."""
        return init_state(self.target, self.preconditioner, z)

    def start(
        self, state: MALAState | Tensor, *, step_size: float | None = None, search_from: float | None = None
    ) -> MALAState:
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
            found = find_reasonable_step_size(
                state, self.target, self.preconditioner, search_from, generator=self.generator
            )
            step = found.median().expand(self.num_chains) if self.adapt == "shared" else found
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

    def replace_target(self, target: LatentTarget, z: Tensor) -> None:
        """Goes on with another target (a refined flow, in warmup) from latents ``z`` of it; every chain
        must be finite there, else the driver keeps its target and state and raises ``ValueError``."""
        state = init_state(target, self.preconditioner, z)
        bad = ~finite_chains(state)
        if bad.any():
            raise ValueError(
                f"{int(bad.sum())} of {self.num_chains} chains have a non-finite state under the new target"
            )
        self.target, self.flow, self.state = target, target.flow, state

    # ------------------------------------------------------------------------------------------
    # warmup and steps

    @property
    def warming_up(self) -> bool:
        """Whether the coming step is a warmup step."""
        return self._warmup_left > 0

    def begin_warmup(self, num_steps: int, *, adapt_step_size: bool = True) -> None:
        """The next ``num_steps`` steps are warmup: they adapt the step size (if ``adapt_step_size``),
        which is fixed after the last of them."""
        if num_steps < 0:
            raise ValueError(f"the number of warmup steps must be >= 0, got {num_steps}")
        self._warmup_left = int(num_steps)
        self._warmup_step = 0
        self._adapter = None
        if num_steps and adapt_step_size:
            self._restart_step_size_adaptation()
        self._windows = adaptation_windows(num_steps) if self.mass_matrix is not None else []
        self._welford = BatchWelfordCovariance(diagonal=self.mass_matrix == "diagonal")

    def _restart_step_size_adaptation(self) -> None:
        initial = self.step_size if self.adapt == "per_chain" else self.step_size[0]
        self._adapter = StepSizeAdapter(initial.double().cpu(), self.target_accept_prob)

    def _adapt_mass_matrix(self) -> None:
        """Inside a slow window, feeds the chains' states to Welford; at its end, sets M^-1 to their
        covariance and restarts the step-size search and dual averaging from the new kernel."""
        t = self._warmup_step
        window = next(((first, last) for first, last in self._windows if first <= t <= last), None)
        if window is None:
            return
        points = self.state.x if _mass_space(self.preconditioner) == "data" else self.state.z
        self._welford.update_batch(points.detach().double().cpu())
        if t != window[1] or self._welford.n_samples < 2:
            return
        covariance = self._welford.get_covariance(regularize=True).to(self.flow.dtype).to(self.flow.device)
        self._welford.reset()
        self.preconditioner.set_inverse_mass(covariance)
        self.state = self.state._replace(cache=self.preconditioner.prepare(self.flow, self.state))
        found = find_reasonable_step_size(
            self.state,
            self.target,
            self.preconditioner,
            float(self.step_size.median()),
            generator=self.generator,
        )
        found = found.median().expand(self.num_chains) if self.adapt == "shared" else found
        self.step_size = found.to(self.step_size).clone()
        if self._adapter is not None:
            self._restart_step_size_adaptation()

    def end_warmup(self) -> None:
        """Ends warmup now (also when interrupted): the step size adapted so far is kept and fixed."""
        if self._adapter is not None:
            self.step_size = self._adapter.final().to(self.step_size).expand(self.num_chains).clone()
        self._adapter = None
        self._warmup_left = 0

    def step(self) -> StepInfo:
        """One MALA step of every chain (then, on schedule, an independence move); adapts and counts as
        the schedule says."""
        warmup = self.warming_up
        step_size = self.step_size
        self.state, info = mala_step(
            self.state, self.target, self.preconditioner, step_size, generator=self.generator
        )
        self.counts["steps"] += 1
        self._note_errors(info.errors)
        diverging = int(info.diverging.sum())
        if self.warming_up:
            self.counts["warmup_proposals"] += self.num_chains
            self.counts["warmup_divergent"] += diverging
            if self._adapter is not None:
                accept = info.accept_prob.double().cpu()
                new = self._adapter.update(accept if self.adapt == "per_chain" else accept.mean())
                self.step_size = new.to(self.step_size).expand(self.num_chains).clone()
            if self.mass_matrix is not None:
                self._adapt_mass_matrix()
            self._warmup_step += 1
            self._warmup_left -= 1
            if self._warmup_left == 0:
                self.end_warmup()
        else:
            self.counts["proposals"] += self.num_chains
            self.counts["divergent"] += diverging
            self.accepted += info.accepted.reshape(-1).long().cpu()
            self.sampling_steps += 1
        self._last_step_size = step_size
        self._last_global = None
        if self.independence_every is not None and self.counts["steps"] % self.independence_every == 0:
            self._global_move(warmup)
        return info

    def _global_move(self, warmup: bool) -> None:
        """One independence move of every chain (:mod:`pyro_nfmala.independence`)."""
        self.state, info = independence_step(
            self.state, self.target, self.preconditioner, self.independence_scale, generator=self.generator
        )
        self._note_errors(info.errors)
        self.counts["global_proposals"] += self.num_chains
        self.counts["global_accepted"] += int(info.accepted.sum())
        self.counts["global_nonfinite"] += int(info.diverging.sum())
        if not warmup:  # a chain that moves only by global moves is not stuck
            self.accepted += info.accepted.reshape(-1).long().cpu()
        self._last_global = info.accept_prob

    @property
    def stat_names(self) -> tuple[str, ...]:
        """The names of :meth:`stats`, in order."""
        extra = ("global_accept_prob",) if self.independence_every is not None else ()
        return SAMPLE_STATS + extra

    @property
    def global_acceptance_rate(self) -> float:
        """The share of independence proposals accepted so far (NaN before the first)."""
        proposals = self.counts["global_proposals"]
        return self.counts["global_accepted"] / proposals if proposals else float("nan")

    def stats(self, info: StepInfo) -> dict[str, Tensor]:
        """The per-draw statistics of the step that gave ``info``, one value per chain (``lp`` and, with
        independence moves, ``global_accept_prob`` of the state after the step's global move)."""
        stats = {
            "accept_prob": info.accept_prob,
            "step_size": self._last_step_size.expand(self.num_chains),
            "diverging": info.diverging,
            "lp": self.state.log_density - self.state.ladj,
        }
        if self.independence_every is not None:
            stats["global_accept_prob"] = (
                self._last_global
                if self._last_global is not None
                else torch.full_like(info.accept_prob, float("nan"))
            )
        return stats

    # ------------------------------------------------------------------------------------------
    # warnings

    def _note_errors(self, errors: tuple[BaseException, ...]) -> None:
        self.counts["errors"] += len(errors)
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
        """The counts so far, to report on what happens after this point (:meth:`warn_divergences`)."""
        return {**self.counts, "accepted": self.accepted.clone(), "sampling_steps": self.sampling_steps}

    def warn_divergences(self, since: dict | None = None, *, stacklevel: int = 3) -> None:
        """Warns about divergences in warmup and in sampling since the :meth:`checkpoint` ``since``
        (or the start), and about chains that accepted nothing after warmup."""
        since = since or {}
        counts = {name: value - since.get(name, 0) for name, value in self.counts.items()}
        parts = []
        for phase, proposals, divergent in (
            ("during warmup", counts["warmup_proposals"], counts["warmup_divergent"]),
            ("after warmup", counts["proposals"], counts["divergent"]),
        ):
            if proposals and divergent > DIVERGENCE_WARNING_RATE * proposals:
                parts.append(f"{divergent} of {proposals} proposals {phase}")
        global_nonfinite = counts["global_nonfinite"]
        if global_nonfinite > DIVERGENCE_WARNING_RATE * max(counts["global_proposals"], 1):
            parts.append(f"{global_nonfinite} of {counts['global_proposals']} independence proposals")
        if parts:
            cause = "a non-finite log density, gradient or acceptance ratio"
            if counts["errors"]:
                cause += f", or one of {counts['errors']} numerical errors raised by an evaluation"
            warnings.warn(
                f"{self.label}: {' and '.join(parts)} were divergent ({cause}) and were rejected. "
                "Rejections keep the target's law, but many of them slow the chains down: look at where "
                "the model or the flow fails (sample_stats.diverging marks the draws).",
                RuntimeWarning,
                stacklevel=stacklevel,
            )
        steps = self.sampling_steps - since.get("sampling_steps", 0)
        accepted = self.accepted - since.get("accepted", 0)
        stuck = int((accepted == 0).sum()) if steps >= STUCK_AFTER_STEPS else 0
        if stuck:
            warnings.warn(
                f"{self.label}: {stuck} of {self.num_chains} chain(s) accepted no proposal in {steps} steps "
                "after warmup: they stayed at one point, and their draws are not samples of the target. "
                "Check the model at the starting point, the step size, and the warnings above.",
                RuntimeWarning,
                stacklevel=stacklevel,
            )
