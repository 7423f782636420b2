r"""Adaptation in warmup, as one object (:class:`WarmupAdaptation`: ``init / update / final``): a
reasonable first step size, dual averaging, a mass matrix on Stan's windows, and the flow.

Dual averaging (Hoffman & Gelman 2014, Pyro's :class:`pyro.ops.dual_averaging.DualAveraging`)
drives :math:`\log \epsilon` so that the mean acceptance probability reaches a target
(0.574 is optimal for MALA, Roberts & Rosenthal 1998):

.. math:: \bar g_t = \Big(1 - \frac{1}{t + t_0}\Big) \bar g_{t-1} + \frac{\delta - \alpha_t}{t + t_0},
          \quad \log \epsilon_t = \mu - \frac{\sqrt t}{\gamma} \bar g_t,

and the final step size is :math:`\exp` of the weighted average of the iterates. Everything
works elementwise, so a tensor of per-chain acceptance probabilities adapts one step size
per chain.

The mass matrix :math:`M` of :class:`~pyro_nfmala.engine.langevin.MassMatrixPreconditioner` is adapted as
Stan adapts it, given at least 150 warmup steps (:func:`adaptation_windows`): a fast initial
buffer (75 steps) adapts only the step size; then slow windows of 25, 50, 100, ... steps each
estimate the covariance of the chains' latent states (Welford's scheme,
:class:`BatchWelfordCovariance`, with Stan's regularization toward the identity), set
:math:`M^{-1}` to it at their end, and restart the step-size search and dual averaging; a final
fast buffer (50 steps) adapts the step size alone. A Hamiltonian move
(:class:`~pyro_nfmala.engine.hamiltonian.HamiltonianMove`) runs to each chain's U-turn in warmup, and the
times it took since the last change of the mass matrix become the lengths it draws from in sampling.
After warmup all are fixed: sampling is one fixed kernel.

:class:`WarmupAdaptation` runs that schedule: ``init`` starts it from the kernel's parameters
(:class:`KernelParameters`: the step size and the Langevin move with its mass matrix, and the
target), ``update`` takes one warmup step's state and returns the parameters for the next step,
``final`` returns the fixed ones. It returns new parameters and changes none in place: a new mass
matrix is a new move (:meth:`~pyro_nfmala.engine.langevin.Preconditioner.with_inverse_mass`), a
refined flow a new target (:class:`FlowRefinement`, the hook where the flow itself adapts).

Example:
    >>> adapter = StepSizeAdapter(0.1, target_accept_prob=0.574)
    >>> for _ in range(50):
    ...     step_size = adapter.update(torch.tensor(0.9))
    >>> bool(adapter.final() > 0.1)
    True
"""

from __future__ import annotations

__all__ = [
    "BatchWelfordCovariance",
    "FlowRefinement",
    "KernelParameters",
    "StepSizeAdapter",
    "WarmupAdaptation",
    "adaptation_windows",
    "find_reasonable_step_size",
]

import math

from collections.abc import Callable
from typing import NamedTuple

import torch

from pyro.ops.dual_averaging import DualAveraging
from pyro.ops.welford import WelfordCovariance
from torch import Tensor

from ..distributed.collectives import ONE_PROCESS, Collective
from ..flows.latent import LatentFlow
from .step import ChainState, Move, StepInfo, advance
from .targets import LatentTarget


class StepSizeAdapter:
    """Dual averaging of the log step size towards ``target_accept_prob``.

    Arguments:
        step_size: The initial step size (a number, or a tensor with one per chain).
        target_accept_prob: The acceptance probability to aim at, in (0, 1).
    """

    def __init__(self, step_size: float | Tensor, target_accept_prob: float = 0.574) -> None:
        self.target_accept_prob = target_accept_prob
        log_step = torch.log(torch.as_tensor(step_size, dtype=torch.float64))
        # As in Pyro's HMC: pull the iterates towards 10x the initial step size.
        self._averaging = DualAveraging(prox_center=log_step + math.log(10.0))
        self._log_step = log_step

    def update(self, accept_prob: float | Tensor) -> Tensor:
        """Feeds one step's acceptance probability; returns the step size for the next step."""
        accept_prob = torch.as_tensor(accept_prob, dtype=torch.float64).nan_to_num(0.0)
        self._averaging.step(self.target_accept_prob - accept_prob)
        self._log_step, _ = self._averaging.get_state()
        return self._log_step.exp()

    def final(self) -> Tensor:
        """The adapted step size: exp of the averaged iterates (the last step size before any update)."""
        if self._averaging._t == 0:
            return self._log_step.exp()
        return self._averaging.get_state()[1].exp()


def find_reasonable_step_size(
    state: ChainState,
    target,
    precond,
    step_size: float = 1.0,
    *,
    generator: torch.Generator | None = None,
    max_doublings: int = 40,
) -> Tensor:
    r"""Doubles or halves ``step_size`` until one proposal's acceptance probability crosses 0.5.

    The heuristic of Hoffman & Gelman (2014, Algorithm 4), per chain, with the same noise
    for every trial (for a trajectory move, one leapfrog step). Returns one step size per chain (shape
    ``state.log_density.shape``).
    """
    batch_shape = state.log_density.shape
    eps = torch.full(batch_shape, float(step_size), dtype=state.z.dtype, device=state.z.device)
    # One seed drawn from the caller's generator (or the global one): the same noise for every trial.
    device = generator.device if generator is not None else torch.device("cpu")
    seed = int(torch.randint(2**62, (), generator=generator, device=device))

    if hasattr(precond, "one_step"):  # a trajectory move: one leapfrog step
        precond = precond.one_step()

    def accept_prob(eps: Tensor) -> Tensor:
        local = torch.Generator(device=state.z.device)
        local.manual_seed(seed)
        return advance(state, target, precond, eps, generator=local)[1].accept_prob

    direction = torch.where(accept_prob(eps) > 0.5, 2.0, 0.5).to(eps.dtype)
    active = torch.ones(batch_shape, dtype=torch.bool, device=eps.device)
    for _ in range(max_doublings):
        trial = torch.where(active, eps * direction, eps)
        prob = accept_prob(trial)
        crossed = torch.where(direction > 1, prob <= 0.5, prob > 0.5)
        # Moving up, stop before the crossing; moving down, stop at it.
        eps = torch.where(active & ~(crossed & (direction > 1)), trial, eps)
        active = active & ~crossed
        if not active.any():
            break
    return eps


#: With fewer U-turn times than this from warmup, a Hamiltonian move samples with a jittered length of this
#: many of its steps.
MIN_U_TURNS = 10

#: Stan's warmup buffers: the initial fast buffer, the first slow window, the final fast buffer.
INITIAL_BUFFER, FIRST_WINDOW, FINAL_BUFFER = 75, 25, 50


def adaptation_windows(num_steps: int) -> list[tuple[int, int]]:
    """The slow windows ``(first, last)`` (step indices, inclusive) of Stan's warmup schedule.

    With fewer than ``INITIAL_BUFFER + FIRST_WINDOW + FINAL_BUFFER`` = 150 warmup steps there is
    none: the step size alone is adapted. (Stan and Pyro shrink the buffers to 15% and 10% of a
    short warmup instead; then the step size found after the last window has only a handful of
    steps to settle, and short runs came out worse than with no mass matrix at all.) Each window
    doubles the one before; the last one stretches to the final buffer.

    Example:
        >>> adaptation_windows(500)
        [(75, 99), (100, 149), (150, 249), (250, 449)]
        >>> adaptation_windows(100)
        []
    """
    start, end, window = INITIAL_BUFFER, FINAL_BUFFER, FIRST_WINDOW
    if start + end + window > num_steps:
        return []
    last = num_steps - end
    windows = []
    while start < last:
        size = window if 3 * window <= last - start else last - start
        windows.append((start, start + size - 1))
        start, window = start + size, 2 * window
    return windows


class BatchWelfordCovariance(WelfordCovariance):
    """Pyro's :class:`~pyro.ops.welford.WelfordCovariance`, fed a batch of draws at a time.

    A batch ``(n, d)`` is merged into the running estimate with Chan et al.'s pairwise update, so
    that feeding ``n`` draws at once equals feeding them one by one;
    :meth:`~pyro.ops.welford.WelfordCovariance.get_covariance` (with Stan's regularization) is Pyro's.

    Example:
        >>> welford = BatchWelfordCovariance(diagonal=True)
        >>> welford.update_batch(torch.tensor([[1.0, 10.0], [3.0, 30.0]], dtype=torch.float64))
        >>> welford.get_covariance(regularize=False)
        tensor([  2., 200.], dtype=torch.float64)
    """

    def update_batch(self, samples: Tensor) -> None:
        """Adds the draws ``samples`` ``(n, d)``."""
        samples = samples.reshape(-1, samples.shape[-1])
        mean = samples.mean(0)
        centered = samples - mean
        m2 = centered.square().sum(0) if self.diagonal else centered.T @ centered
        self.merge(len(samples), mean, m2)

    def merge(self, count: int, mean: Tensor, m2: Tensor) -> None:
        """Adds the estimate of ``count`` other draws, their ``mean`` and sum of squared deviations ``m2``
        (a diagonal or a matrix, as this one's): the estimate of all the draws together."""
        if count == 0:
            return
        total = self.n_samples + count
        delta = mean - self._mean
        weight = self.n_samples * count / total
        self._mean = self._mean + delta * (count / total)
        self._m2 = self._m2 + m2 + (delta.square() if self.diagonal else torch.outer(delta, delta)) * weight
        self.n_samples = total


class KernelParameters(NamedTuple):
    """What the step receives from adaptation: the same in every warmup step until changed, then fixed."""

    target: LatentTarget  #: the latent target (a refined flow makes a new one)
    move: Move  #: the Langevin move, with the mass matrix adapted so far
    step_size: Tensor  #: one step size per chain, ``(chains,)``


class FlowRefinement:
    """The flow's part of warmup: every ``every`` steps, up to step ``last``, the flow is refined on the
    states the chains visited (:class:`~pyro_nfmala.engine.refine.FlowRefiner`), and a new
    target is made from it by ``make_target``. Fixed after warmup, as everything adapted is. With chains
    over several processes (``pool``), the refit sees every process's chains, and rank 0's refitted
    weights are every rank's."""

    def __init__(self, refiner, every: int, make_target: Callable, pool: Collective = ONE_PROCESS) -> None:
        self.refiner, self.every, self.make_target, self.pool = refiner, every, make_target, pool
        self.last = 0

    def init(self, num_steps: int) -> None:
        self.last = (3 * num_steps) // 4  # the last quarter adapts the step size and mass to the final flow

    def update(self, step: int, state: ChainState, flow) -> LatentTarget | None:
        """Collects the chains' states (and gradients, under their ``flow``) after warmup step ``step``
        (0-based); on schedule, a new target."""
        self.refiner.add(self.pool.gather_rows(state.x), self.pool.gather_rows(state.grad), flow)
        if (step + 1) % self.every or step + 1 > self.last:
            return None
        refined = self.refiner.refine()
        if self.pool.active:
            refined = LatentFlow(self.pool.broadcast_module_(self.refiner.module))
        return self.make_target(refined)


class WarmupAdaptation:
    r"""Warmup as one object: the step size by dual averaging, a mass matrix on Stan's windows, and
    (with ``flow``) the flow, each started by :meth:`init`, fed by :meth:`update` and fixed by
    :meth:`final`.

    Arguments:
        num_steps: Warmup steps.
        adapt_step_size: Adapt the step size (dual averaging, restarted after each mass window).
        mass_matrix: ``None``, ``"diagonal"`` or ``"dense"``: the mass matrix of the move, estimated in
            its ``mass_space`` (``"latent"``: the chains' ``z``; ``"data"``: their ``x``).
        target_accept_prob: The acceptance probability dual averaging aims at.
        per_chain: One step size per chain (else one shared, fed the chains' mean acceptance).
        find_step_size: ``find_step_size(parameters, start)`` gives the step sizes to go on with for new
            parameters, from the chains' current state (after a mass window), starting the search at
            ``start``: one per chain, the same for all where adaptation is shared (the driver's: the
            median over every process's chains).
        flow: A :class:`FlowRefinement`, or ``None``.
        pool: The processes whose chains adapt together
            (:class:`~pyro_nfmala.distributed.collectives.Collective`): the shared step size is fed their
            chains' mean acceptance, the mass matrix their states, a Hamiltonian move's lengths their
            U-turns, so every process adapts the same kernel. One process by default.
    """

    def __init__(
        self,
        num_steps: int,
        *,
        adapt_step_size: bool = True,
        mass_matrix: str | None = None,
        target_accept_prob: float = 0.574,
        per_chain: bool = False,
        find_step_size: Callable[[KernelParameters, float], Tensor] | None = None,
        flow: FlowRefinement | None = None,
        pool: Collective = ONE_PROCESS,
    ) -> None:
        if num_steps < 0:
            raise ValueError(f"the number of warmup steps must be >= 0, got {num_steps}")
        self.num_steps = int(num_steps)
        self.adapt_step_size = adapt_step_size
        self.mass_matrix = mass_matrix
        self.target_accept_prob = target_accept_prob
        self.per_chain = per_chain
        self.find_step_size = find_step_size
        self.flow = flow
        self.pool = pool
        self.windows = adaptation_windows(self.num_steps) if mass_matrix is not None else []
        self.step = 0
        self._dual_averaging: StepSizeAdapter | None = None
        self._u_turns: list[Tensor] | None = None  # a Hamiltonian move's U-turn times since the last mass
        self._welford = BatchWelfordCovariance(diagonal=mass_matrix == "diagonal")

    @property
    def done(self) -> bool:
        """Whether every warmup step has been seen (or :meth:`final` was called)."""
        return self.step >= self.num_steps

    def _restart_dual_averaging(self, step_size: Tensor) -> None:
        initial = step_size if self.per_chain else step_size[0]
        self._dual_averaging = StepSizeAdapter(initial.double().cpu(), self.target_accept_prob)

    def _expand(self, step_size: Tensor, like: Tensor) -> Tensor:
        return step_size.to(like).expand(like.shape).clone()

    def init(self, parameters: KernelParameters) -> KernelParameters:
        """Starts the schedule from the kernel's initial parameters; returns them."""
        if self.num_steps and self.adapt_step_size:
            self._restart_dual_averaging(parameters.step_size)
        if self.flow is not None:
            self.flow.init(self.num_steps)
        move = parameters.move
        if self.num_steps and hasattr(move, "with_u_turns"):  # a Hamiltonian move: its lengths adapt too
            self._u_turns = []
            parameters = parameters._replace(move=move.with_u_turns())
        return parameters

    def update(self, parameters: KernelParameters, state: ChainState, info: StepInfo) -> KernelParameters:
        """Takes one warmup step (its state, after the local move, and its
        :class:`~pyro_nfmala.engine.step.StepInfo`: the acceptance probabilities and, for a Hamiltonian
        move, the trajectory); returns the parameters of the next step (the fixed ones after the last
        warmup step)."""
        if self.done:
            return parameters
        step_size = parameters.step_size
        if self._dual_averaging is not None:
            accept = info.accept_prob.double().cpu()
            new = self._dual_averaging.update(accept if self.per_chain else self._pooled_mean(accept))
            step_size = self._expand(new, step_size)
        parameters = parameters._replace(step_size=step_size)
        u_turns = None if info.trajectory is None else info.trajectory.u_turn_lengths
        if self._u_turns is not None and u_turns is not None:
            self._u_turns.append(u_turns.detach().reshape(-1).double().cpu())
        if self.mass_matrix is not None:
            parameters = self._adapt_mass_matrix(parameters, state)
        self.step += 1
        if self.done:
            return self.final(parameters)
        return parameters

    def update_flow(self, parameters: KernelParameters, state: ChainState) -> KernelParameters:
        """The flow's part of a warmup step, after all its moves: a new target on schedule."""
        if self.flow is None or self.step > self.num_steps or self.step == 0:
            return parameters
        target = self.flow.update(self.step - 1, state, parameters.target.flow)
        return parameters if target is None else parameters._replace(target=target)

    def _adapt_mass_matrix(self, parameters: KernelParameters, state: ChainState) -> KernelParameters:
        """Inside a slow window, feeds the chains' states to Welford; at its end, a new move with
        :math:`M^{-1}` their covariance, a step size found for it, and dual averaging restarted."""
        t = self.step
        window = next(((first, last) for first, last in self.windows if first <= t <= last), None)
        if window is None:
            return parameters
        move = parameters.move
        points = state.x if move.mass_space == "data" else state.z
        self._welford.update_batch(points.detach().double().cpu())
        if t != window[1]:
            return parameters
        self._pool_welford()
        if self._welford.n_samples < 2:
            return parameters
        covariance = self._welford.get_covariance(regularize=True).to(points.dtype).to(points.device)
        self._welford.reset()
        if self._u_turns is not None:  # lengths measured under the old mass matrix no longer hold
            self._u_turns = []
        parameters = parameters._replace(move=move.with_inverse_mass(covariance))
        found = self.find_step_size(parameters, float(parameters.step_size.median()))
        parameters = parameters._replace(step_size=self._expand(found, parameters.step_size))
        if self._dual_averaging is not None:
            self._restart_dual_averaging(parameters.step_size)
        return parameters

    def _pool_welford(self) -> None:
        """At a window's end, with chains on several processes: every process's Welford estimate merged in
        rank order (Chan's update), the same on every process."""
        if not self.pool.active:
            return
        welford = self._welford
        local = (welford.n_samples, welford._mean, welford._m2)
        pooled = BatchWelfordCovariance(diagonal=welford.diagonal)
        for count, mean, m2 in self.pool.gather_objects(local):
            pooled.merge(count, mean, m2)
        self._welford = pooled

    def _pooled_mean(self, values: Tensor) -> Tensor:
        """The mean of every process's chains' ``values``."""
        if not self.pool.active:
            return values.mean()
        total, count = self.pool.sum(torch.stack([values.sum(), values.new_tensor(float(len(values)))]))
        return total / count

    def _fixed_lengths(self, parameters: KernelParameters):
        """The Hamiltonian move of sampling: its lengths drawn from warmup's U-turn times since the last
        mass matrix (a fixed kernel); with none measured, ``MIN_U_TURNS`` steps of the final step size."""
        move = parameters.move
        measured = torch.cat(self._u_turns) if self._u_turns else torch.zeros(0, dtype=torch.float64)
        measured = self.pool.gather_rows(measured)  # every process's, the same lengths everywhere
        measured = measured[torch.isfinite(measured) & (measured > 0)]
        if len(measured) < MIN_U_TURNS:
            return move.with_trajectory_length(MIN_U_TURNS * float(parameters.step_size.median()))
        return move.with_trajectory_lengths(measured)

    def final(self, parameters: KernelParameters) -> KernelParameters:
        """Ends warmup now (also when interrupted): the step size is dual averaging's final value, and
        everything is fixed from here on."""
        if self._dual_averaging is not None:
            final = self._dual_averaging.final()
            parameters = parameters._replace(step_size=self._expand(final, parameters.step_size))
        self._dual_averaging = None
        if self._u_turns is not None:
            parameters = parameters._replace(move=self._fixed_lengths(parameters))
            self._u_turns = None
        self.step = max(self.step, self.num_steps)
        return parameters
