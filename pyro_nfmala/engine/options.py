r"""The sampler's options, validated once and documented once, for both samplers.

:class:`~pyro_nfmala.NFMALA` (one chain per Pyro kernel) and :class:`~pyro_nfmala.ChainSampler`
(a batch of chains) take the same options and hand them to :class:`SamplerOptions`, which checks
them (a clear ``ValueError`` or ``TypeError`` that names the argument) and resolves the ones that
depend on each other (``mass_matrix="auto"``); the driver (:mod:`pyro_nfmala.engine.driver`) reads them.

Example:
    >>> options = SamplerOptions(preconditioner="jacobian")
    >>> options.preconditioner.name, options.mass_matrix, options.preconditioner.mass_space
    ('jacobian', 'diagonal', 'data')
    >>> SamplerOptions(step_size=-1.0)
    Traceback (most recent call last):
    ...
    ValueError: step_size must be a finite number > 0 (or None), got -1.0
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_PRECONDITIONER",
    "LOCAL_MOVES",
    "MALA_ACCEPT_TARGET",
    "SamplerOptions",
    "check_independence",
    "check_tries",
]

from collections.abc import Mapping
from typing import Any

from .hamiltonian import HamiltonianMove
from .langevin import get_preconditioner
from .nuts import NoUTurnMove
from .step import Move
from .validation import check_count, check_positive, check_probability

#: The preconditioner of both samplers unless told otherwise (plain MALA on the latent target).
DEFAULT_PRECONDITIONER = "identity"
#: The local moves, MALA (one Langevin step, with the preconditioner), HMC (many leapfrog steps), NUTS
#: (trajectories until their U-turn), or ``"auto"``, resolved by a run from its map's flow check.
LOCAL_MOVES = ("mala", "hmc", "nuts", "auto")
#: The local moves that move with the latent mass matrix alone (no Langevin preconditioner).
TRAJECTORY_MOVES = {"hmc": HamiltonianMove, "nuts": NoUTurnMove}
#: The acceptance probability optimal for MALA (Roberts & Rosenthal, 1998), aimed at by default.
MALA_ACCEPT_TARGET = 0.574


def _check_mass_matrix(mass_matrix: object, move: Move) -> str | None:
    takes_mass = getattr(move, "mass_space", None) is not None
    if mass_matrix == "auto":
        return "diagonal" if takes_mass else None
    if mass_matrix not in (None, "diagonal", "dense"):
        raise ValueError(f"mass_matrix must be 'auto', 'diagonal', 'dense' or None, got {mass_matrix!r}")
    if mass_matrix is not None and not takes_mass:
        raise ValueError(
            f"mass_matrix={mass_matrix!r} goes with the identity, jacobian or data_space preconditioners; "
            f"the {getattr(move, 'name', move)!r} preconditioner takes none: use mass_matrix=None with it"
        )
    return mass_matrix


def check_tries(tries: object) -> int | str:
    """``independence_tries`` checked: an integer >= 1 (not a bool), or ``"auto"``."""
    if isinstance(tries, str) and tries == "auto":
        return "auto"
    try:
        return check_count("independence_tries", tries)
    except ValueError:
        raise ValueError(f"independence_tries must be 'auto' or an integer >= 1, got {tries!r}") from None


def check_independence(
    every: object, scale: object, *, allow_auto: bool = False
) -> tuple[int | str | None, float]:
    """``(every, scale)`` checked: ``every`` is ``None`` (no independence moves), an integer >= 1, or,
    with ``allow_auto``, ``"auto"``; ``scale`` a finite number > 0."""
    scale = check_positive("independence_scale", scale)
    if allow_auto and isinstance(every, str) and every == "auto":
        return "auto", scale
    try:
        return check_count("independence_every", every, allow_none=True), scale
    except ValueError:
        choices = "None, 'auto' or an integer >= 1" if allow_auto else "None or an integer >= 1"
        raise ValueError(f"independence_every must be {choices}, got {every!r}") from None


class SamplerOptions:
    r"""The options of both samplers, checked.

    Arguments:
        local_move: ``"mala"`` (default here): one Langevin step with the ``preconditioner`` per step, the
            cheapest, right where the map is good (the latent target near :math:`N(0, I)`). ``"hmc"``:
            jittered Hamiltonian Monte Carlo, many leapfrog steps with the latent mass matrix and a
            trajectory length adapted in warmup (:mod:`pyro_nfmala.engine.hamiltonian`): several
            evaluations a step, and the chains still mix where the map is only fair. ``"nuts"``: the
            No-U-Turn sampler in the latent space (:mod:`pyro_nfmala.engine.nuts`), each trajectory run
            until it turns back, so that its length follows the target's local scale. ``"auto"``
            (:class:`~pyro_nfmala.NFMALA`'s default): MALA where the map is serviceable by the flow check,
            HMC where it is not.
        preconditioner: The Langevin move (:mod:`pyro_nfmala.engine.langevin`). ``"identity"`` (default):
            plain MALA on the latent target, the cheapest, right when the map is fitted to the
            posterior so that :math:`\pi \approx N(0, I)`. ``"jacobian"``: :math:`A = J_f^T J_f`, a
            Langevin step in data space linearized through :math:`J_f` (the Jacobian-aware
            dynamics of Coeurdoux et al., for the tempered target; it undoes the map's whitening,
            so keep ``"identity"`` for posteriors). ``"data_space"``: the same data-space step
            without the linearization, mapped back exactly through :math:`f^{-1}`
            (:class:`~pyro_nfmala.engine.langevin.DataSpacePreconditioner`), for two more passes of
            :math:`f^{-1}`. Or any :class:`~pyro_nfmala.engine.step.Move`.
        mass_matrix: A constant mass matrix adapted in warmup on Stan's windows
            (:mod:`pyro_nfmala.engine.adaptation`): ``"diagonal"``, ``"dense"`` or ``None``; ``"auto"``
            (default): diagonal for a preconditioner that takes one. It lives in latent space
            with the identity, in data space with ``"jacobian"`` and ``"data_space"``.
        step_size: The initial step size :math:`\epsilon > 0`; ``None``: found by doubling or
            halving from 1 at the start (per chain, or their median when adaptation is shared).
        adapt_step_size: Adapt :math:`\epsilon` by dual averaging during warmup, then fix it.
        target_accept_prob: The acceptance probability adaptation aims at; ``None`` (default): the local
            move's own, 0.574 for MALA (optimal for it), 0.8 for HMC (Stan's).
        adapt: ``"shared"`` (one step size for all chains of a batch, fed their mean acceptance
            probability) or ``"per_chain"``.
        independence_every: ``None``: Langevin moves only. ``k``: every ``k``-th Langevin step is
            followed by a latent independence move :math:`z' \sim \mathcal{N}(0, s^2 I)`, accepted
            by the exact Metropolis-Hastings ratio (:mod:`pyro_nfmala.engine.independence`): where the
            map is close to the target, a nearly independent draw across the modes it covers.
            ``"auto"`` (:class:`~pyro_nfmala.NFMALA` only): after every step on a posterior whose
            map passes the flow check's reliability bar (Pareto k-hat <= 0.7), none otherwise.
        independence_scale: :math:`s > 0` (1: the map's base law; wider is safer for a map that
            is too narrow).
        independence_tries: How many independence moves each independence step makes in a row
            (default 1): their proposals are evaluated as one batch
            (:func:`~pyro_nfmala.engine.step.independence_steps`), so a chain that one proposal fails to move
            has more chances for the price of one larger evaluation. It pays where the map is fair but not
            good (independence acceptance rate about 0.5-0.8) and the model's density takes a batch in one
            run; where the draws are already nearly independent, or the density is evaluated point by point,
            it only costs time. ``"auto"`` (the default of :class:`~pyro_nfmala.NFMALA` and
            :meth:`ChainSampler.from_model <pyro_nfmala.samplers.chains.ChainSampler.from_model>` on a model
            that vectorizes): one try in warmup, then :func:`~pyro_nfmala.engine.independence.auto_tries` of
            warmup's acceptance rate (8 below 0.85, else 1), fixed for sampling.
        refine_every: ``None`` (default): the flow is fixed. ``n`` (:class:`~pyro_nfmala.ChainSampler`
            on a posterior pull-back): during warmup (not in its last quarter), every ``n`` steps
            the flow takes a few Adam steps on the states the chains visited and their gradients
            (score matching and maximum likelihood for a staged map, maximum likelihood for other
            flows), and the chains continue from the same data-space points
            (:mod:`pyro_nfmala.engine.refine`); the flow is fixed when warmup ends.
        refine_options: Keyword arguments of :class:`~pyro_nfmala.engine.refine.FlowRefiner` (``loss``,
            ``steps``, ``lr``, ``batch_size``, ``buffer_size``).
    """

    def __init__(
        self,
        *,
        local_move: str = "mala",
        preconditioner: str | Move = DEFAULT_PRECONDITIONER,
        mass_matrix: str | None = "auto",
        step_size: float | None = None,
        adapt_step_size: bool = True,
        target_accept_prob: float | None = None,
        adapt: str = "shared",
        independence_every: int | str | None = None,
        independence_scale: float = 1.0,
        independence_tries: int | str = 1,
        refine_every: int | None = None,
        refine_options: dict | None = None,
    ) -> None:
        if local_move not in LOCAL_MOVES:
            raise ValueError(f"local_move must be one of {LOCAL_MOVES}, got {local_move!r}")
        self.local_move = local_move
        self.preconditioner = get_preconditioner(preconditioner)
        if local_move in TRAJECTORY_MOVES and getattr(self.preconditioner, "name", None) != "identity":
            raise ValueError(
                f"local_move={local_move!r} moves with the latent mass matrix; the "
                f"{self.preconditioner.name!r} preconditioner is a Langevin move's: give local_move='mala' "
                "with it, or no preconditioner"
            )
        self.mass_matrix = _check_mass_matrix(mass_matrix, self.move)
        self.step_size = check_positive("step_size", step_size, allow_none=True)
        self.adapt_step_size = bool(adapt_step_size)
        self.target_accept_prob = (
            None
            if target_accept_prob is None
            else check_probability("target_accept_prob", target_accept_prob)
        )
        if adapt not in ("shared", "per_chain"):
            raise ValueError(f"adapt must be 'shared' or 'per_chain', got {adapt!r}")
        self.adapt = adapt
        self.independence_every, self.independence_scale = check_independence(
            independence_every, independence_scale, allow_auto=True
        )
        self.independence_tries = check_tries(independence_tries)
        self.refine_every = check_count("refine_every", refine_every, allow_none=True)
        self.refine_options = dict(refine_options or {})

    @property
    def move(self) -> Move:
        """The local move, a :class:`~pyro_nfmala.engine.hamiltonian.HamiltonianMove` for
        ``local_move="hmc"``, a :class:`~pyro_nfmala.engine.nuts.NoUTurnMove` for ``"nuts"``, else the
        preconditioner's Langevin move (also while ``"auto"`` is unresolved)."""
        trajectory_move = TRAJECTORY_MOVES.get(self.local_move)
        return self.preconditioner if trajectory_move is None else trajectory_move()

    @property
    def accept_target(self) -> float:
        """The acceptance probability step-size adaptation aims at, ``target_accept_prob`` if given, else
        the local move's own (0.574 for MALA, optimal for it; 0.8 for HMC, Stan's)."""
        if self.target_accept_prob is not None:
            return self.target_accept_prob
        return getattr(self.move, "target_accept_prob", MALA_ACCEPT_TARGET)

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any]) -> SamplerOptions:
        """The options among a sampler's arguments (its ``locals()``): the names of this class's
        arguments that ``arguments`` holds; the others keep their defaults."""
        return cls(**{name: arguments[name] for name in _OPTION_NAMES if name in arguments})

    def replace(self, **changes: Any) -> SamplerOptions:
        """A copy with some options changed (checked again)."""
        values = {name: getattr(self, name) for name in _OPTION_NAMES}
        values.update(changes)
        return SamplerOptions(**values)

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in _OPTION_NAMES)
        return f"SamplerOptions({shown})"


_OPTION_NAMES = (
    "local_move",
    "preconditioner",
    "mass_matrix",
    "step_size",
    "adapt_step_size",
    "target_accept_prob",
    "adapt",
    "independence_every",
    "independence_scale",
    "independence_tries",
    "refine_every",
    "refine_options",
)
