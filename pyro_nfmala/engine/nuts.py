r"""The No-U-Turn move: NUTS in the latent space, every chain building its own trajectory, all chains in
one batch.

With a momentum :math:`p \sim \mathcal{N}(0, M)` (the constant mass matrix :math:`M`, :math:`C = M^{-1}`,
adapted in warmup as the other moves' is) and the energy :math:`H(z, p) = -\log \pi(z) + \frac12 p^T C p`,
each chain doubles a trajectory of leapfrog steps of size :math:`\epsilon` (see
:mod:`~pyro_nfmala.engine.hamiltonian`), forwards or backwards in time at random, until it makes a U-turn
(Hoffman & Gelman 2014; Stan's criterion on the sum of momenta :math:`\rho` over a (sub)trajectory: it
turns where :math:`v_-^T \rho \le 0` or :math:`v_+^T \rho \le 0`, :math:`v = C p` at its two ends), diverges
(the energy grows by more than ``MAX_ENERGY_ERROR``, or the target or its gradient is not finite), or
reaches ``max_tree_depth`` doublings. The draw is multinomial over the trajectory's states, with weights
:math:`e^{-H}` (Betancourt 2017): uniform progressive sampling inside each new subtree, biased progressive
sampling when it is joined to the trajectory. A subtree that turns inside (any of its balanced halves,
quarters, ...) or diverges is not joined and ends the trajectory. The move leaves :math:`\pi` invariant,
for any flow; where the map is mediocre, its trajectories follow the target's local scales, long where
the target is wide, short where it is narrow, as no fixed-length move can.

All chains advance in lockstep: a chain that has stopped waits (its leapfrog steps are not evaluated
anew), so a step costs the deepest chain's trajectory in batched evaluations. The acceptance statistic
that step-size adaptation aims at (0.8, Stan's) is the mean over the trajectory's new states of
:math:`\min(1, e^{H_0 - H})`.

Example:
    >>> from pyro_nfmala.engine.step import advance, init_state
    >>> target = PosteriorPullback(identity_flow(3), lambda x: -0.5 * (x**2).sum(-1))
    >>> move = NoUTurnMove()
    >>> state = init_state(target, move, torch.zeros(16, 3))
    >>> state, info = advance(state, target, move, 0.3)
    >>> info.accept_prob.shape, info.trajectory.num_steps >= 1
    (torch.Size([16]), True)
"""

from __future__ import annotations

__all__ = ["MAX_TREE_DEPTH", "NoUTurnMove"]

import torch

from torch import Tensor

from .hamiltonian import MAX_ENERGY_ERROR, HamiltonianMove, LatentMassMove, Trajectory
from .langevin import ConstantMetric
from .step import ChainState, StepInfo, _select, finite_chains
from .targets import LatentTarget
from .validation import check_count

#: The most doublings of a trajectory (at most :math:`2^{10} - 1` leapfrog steps, Stan's default).
MAX_TREE_DEPTH = 10


class NoUTurnMove(LatentMassMove):
    r"""The No-U-Turn sampler in the latent space, with a constant mass matrix (see the module).

    Arguments:
        inverse_mass: :math:`C = M^{-1}`, a vector ``(d,)`` (diagonal) or a matrix ``(d, d)``; ``None``:
            the identity.
        max_tree_depth: The most doublings of a trajectory.
    """

    name = "nuts"
    #: The acceptance statistic step-size adaptation aims at for this move (Stan's for NUTS).
    target_accept_prob = 0.8

    def __init__(self, inverse_mass: Tensor | None = None, max_tree_depth: int = MAX_TREE_DEPTH) -> None:
        self.metric = ConstantMetric(inverse_mass)
        self.max_tree_depth = check_count("max_tree_depth", max_tree_depth)

    def one_step(self) -> HamiltonianMove:
        """One leapfrog step with this mass matrix, accepted by its Metropolis-Hastings ratio: what the
        step-size search tries."""
        return HamiltonianMove(self.inverse_mass)

    def step(
        self,
        state: ChainState,
        target: LatentTarget,
        step_size: float | Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[ChainState, StepInfo]:
        """One NUTS step of every chain of ``state`` ``(chains, d)``. Draws from ``generator``: the
        momenta's noise, then per doubling one direction per chain, one uniform per chain for each new
        state, and one per chain for joining the subtree."""
        unit = {"dtype": state.z.dtype, "device": state.z.device}
        step_size = torch.as_tensor(step_size, **unit)
        shape = state.log_density.shape
        eps = step_size[..., None] if step_size.dim() else step_size
        metric = self.metric
        p0 = metric.momentum(torch.randn(state.z.shape, generator=generator, **unit))
        energy0 = self.energy(state, p0)

        def uniform() -> Tensor:
            return torch.rand(shape, generator=generator, **unit)

        # the trajectory: its two ends (state, momentum, velocity), its sum of momenta, the log of its
        # total weight relative to the start's (the start's is e^0), and the draw so far
        left = right = state
        left_p = right_p = p0
        left_v = right_v = metric.times_inverse_mass(p0)
        rho = p0
        log_weight = torch.zeros(shape, **unit)
        sample = state
        active = torch.ones(shape, dtype=torch.bool, device=state.z.device)
        diverging = torch.zeros_like(active)
        accept_sum = torch.zeros(shape, **unit)
        new_states = torch.zeros(shape, **unit)
        errors: list[BaseException] = []
        taken = 0
        for depth in range(self.max_tree_depth):
            forward = uniform() < 0.5
            signed = torch.where(forward, 1.0, -1.0).to(step_size.dtype)[..., None] * eps
            current = _select(forward, right, left)
            p = torch.where(forward[..., None], right_p, left_p)
            valid = active.clone()  # the subtree so far neither diverged nor turned inside
            sub_log_weight = torch.full(shape, -float("inf"), **unit)
            sub_sample = current
            velocities, sums = [], [torch.zeros_like(p)]  # per new state: C p, and the running sum of p
            size = 2**depth
            for k in range(1, size + 1):
                new, new_p = self.leapfrog(target, current, p, signed, step_size, valid, errors)
                log_w = energy0 - self.energy(new, new_p)
                finite = finite_chains(new) & torch.isfinite(log_w)
                diverged = ~finite | (log_w < -MAX_ENERGY_ERROR)
                log_w = torch.where(finite, log_w, torch.full_like(log_w, -float("inf")))
                accept_sum = accept_sum + torch.where(valid, log_w.clamp(max=0.0).exp(), 0.0)
                new_states = new_states + valid.to(new_states.dtype)
                diverging = diverging | (valid & diverged)
                valid = valid & ~diverged
                current = _select(valid, new, current)
                p = torch.where(valid[..., None], new_p, p)
                # uniform progressive sampling inside the subtree
                joined = torch.logaddexp(sub_log_weight, log_w)
                take = valid & (torch.log(uniform()) < log_w - joined)
                sub_sample = _select(take, new, sub_sample)
                sub_log_weight = torch.where(valid, joined, sub_log_weight)
                velocities.append(metric.times_inverse_mass(p))
                sums.append(sums[-1] + torch.where(valid[..., None], p, 0.0))
                # the U-turn of every balanced part of the subtree that this state completes
                span = 2
                while span <= size and k % span == 0:
                    part_rho = sums[k] - sums[k - span]
                    valid = valid & ~_turned(part_rho, velocities[k - span], velocities[k - 1])
                    span *= 2
            taken += size
            join = active & valid
            take = join & (torch.log(uniform()) < sub_log_weight - log_weight)  # biased progressive sampling
            sample = _select(take, sub_sample, sample)
            log_weight = torch.where(join, torch.logaddexp(log_weight, sub_log_weight), log_weight)
            rho = rho + torch.where(join[..., None], sums[-1], 0.0)
            end_v = velocities[-1]
            to_right, to_left = join & forward, join & ~forward
            right = _select(to_right, current, right)
            right_p = torch.where(to_right[..., None], p, right_p)
            right_v = torch.where(to_right[..., None], end_v, right_v)
            left = _select(to_left, current, left)
            left_p = torch.where(to_left[..., None], p, left_p)
            left_v = torch.where(to_left[..., None], end_v, left_v)
            active = join & ~_turned(rho, left_v, right_v)
            if not bool(active.any()):
                break
        accept_prob = accept_sum / new_states.clamp(min=1.0)
        moved = (sample.z != state.z).any(-1)
        trajectory = Trajectory(state.z, sample.z, taken)
        info = StepInfo(
            accept_prob=accept_prob,
            accepted=moved,
            diverging=diverging,
            log_accept_ratio=torch.where(diverging, -float("inf"), accept_prob.log()),
            errors=tuple(errors),
            trajectory=trajectory,
        )
        return sample, info

    def __repr__(self) -> str:
        return f"NoUTurnMove(mass={self._mass_name()}, max_tree_depth={self.max_tree_depth})"


def _turned(rho: Tensor, velocity_start: Tensor, velocity_end: Tensor) -> Tensor:
    """Stan's U-turn criterion on a (sub)trajectory with momentum sum ``rho`` and end velocities
    :math:`C p`: the sum points against the velocity at either end."""
    return ((velocity_start * rho).sum(-1) <= 0) | ((velocity_end * rho).sum(-1) <= 0)
