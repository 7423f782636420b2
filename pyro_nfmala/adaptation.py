r"""Adaptation in warmup: a reasonable first step size, dual averaging, and a latent mass matrix.

Dual averaging (Hoffman & Gelman 2014, Pyro's :class:`pyro.ops.dual_averaging.DualAveraging`)
drives :math:`\log \epsilon` so that the mean acceptance probability reaches a target
(0.574 is optimal for MALA, Roberts & Rosenthal 1998):

.. math:: \bar g_t = \Big(1 - \frac{1}{t + t_0}\Big) \bar g_{t-1} + \frac{\delta - \alpha_t}{t + t_0},
          \quad \log \epsilon_t = \mu - \frac{\sqrt t}{\gamma} \bar g_t,

and the final step size is :math:`\exp` of the weighted average of the iterates. Everything
works elementwise, so a tensor of per-chain acceptance probabilities adapts one step size
per chain.

The mass matrix :math:`M` of :class:`~pyro_nfmala.precond.MassMatrixPreconditioner` is adapted as
Stan adapts it, given at least 150 warmup steps (:func:`adaptation_windows`): a fast initial
buffer (75 steps) adapts only the step size; then slow windows of 25, 50, 100, ... steps each
estimate the covariance of the chains' latent states (Welford's scheme,
:class:`BatchWelfordCovariance`, with Stan's regularization toward the identity), set
:math:`M^{-1}` to it at their end, and restart the step-size search and dual averaging; a final
fast buffer (50 steps) adapts the step size alone.
After warmup both are fixed: sampling is one fixed kernel.

Example:
    >>> adapter = StepSizeAdapter(0.1, target_accept_prob=0.574)
    >>> for _ in range(50):
    ...     step_size = adapter.update(torch.tensor(0.9))
    >>> bool(adapter.final() > 0.1)
    True
"""

from __future__ import annotations

__all__ = ["BatchWelfordCovariance", "StepSizeAdapter", "adaptation_windows", "find_reasonable_step_size"]

import math

import torch

from pyro.ops.dual_averaging import DualAveraging
from pyro.ops.welford import WelfordCovariance
from torch import Tensor

from .mala import MALAState, mala_step


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
    state: MALAState,
    target,
    precond,
    step_size: float = 1.0,
    *,
    generator: torch.Generator | None = None,
    max_doublings: int = 40,
) -> Tensor:
    r"""Doubles or halves ``step_size`` until one proposal's acceptance probability crosses 0.5.

    The heuristic of Hoffman & Gelman (2014, Algorithm 4), per chain, with the same noise
    for every trial. Returns one step size per chain (shape ``state.log_density.shape``).
    """
    batch_shape = state.log_density.shape
    eps = torch.full(batch_shape, float(step_size), dtype=state.z.dtype, device=state.z.device)
    # One seed drawn from the caller's generator (or the global one): the same noise for every trial.
    device = generator.device if generator is not None else torch.device("cpu")
    seed = int(torch.randint(2**62, (), generator=generator, device=device))

    def accept_prob(eps: Tensor) -> Tensor:
        local = torch.Generator(device=state.z.device)
        local.manual_seed(seed)
        return mala_step(state, target, precond, eps, generator=local)[1].accept_prob

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
        count = len(samples)
        mean = samples.mean(0)
        centered = samples - mean
        m2 = centered.square().sum(0) if self.diagonal else centered.T @ centered
        total = self.n_samples + count
        delta = mean - self._mean
        weight = self.n_samples * count / total
        self._mean = self._mean + delta * (count / total)
        self._m2 = self._m2 + m2 + (delta.square() if self.diagonal else torch.outer(delta, delta)) * weight
        self.n_samples = total
