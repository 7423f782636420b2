r"""Flow refinement in warmup: maximum likelihood on the chains' own states, as flowMC does.

During warmup, every few steps the flow takes a few Adam steps of maximum likelihood on the
data-space states :math:`x_1, \dots, x_n` that the chains visited since the last refinement,

.. math:: \min_\theta \; -\frac{1}{n} \sum_{i=1}^n \log q_\theta(x_i),

and the chains go on from the same data-space points, now at :math:`z_i = f_\theta^{-1}(x_i)` in
the new flow's latent space. Where local moves carry chains into parts of the posterior that the
flow covers poorly, the flow learns them, and the independence moves
(:mod:`pyro_nfmala.independence`) then propose there.

**Refinement stops before sampling.** A kernel whose flow is refitted to the chain's own history is
adaptive MCMC: the flow becomes a function of past states, the draws are no longer a Markov chain
with the posterior as its invariant law, and nothing bounds the error that this adds (Roberts &
Rosenthal, 2007, give the conditions under which adaptation is still valid; refitting a flow on
recent states meets none of them in general). :class:`~pyro_nfmala.ChainSampler` refines only in
its warmup, and not in the last quarter of it (the step size and mass matrix adapt to the final
flow there), so that sampling is one fixed, exact kernel.

**A flow cannot learn a mode that no chain visits.** Refinement trains on where the chains are,
and latent moves, local or global, go where the flow puts mass. A mode far from everything the
flow covers stays missing, and nothing in the chains shows it (every chain agrees); Grenioux,
Durmus, Moulines & Gabrié (ICML 2023) discuss this limit of flow-based samplers. What it can do
is amplify a thin tail: where a few chains reach a mode through the flow's tails (independence
moves help), refinement learns it, and more chains follow. Many chains make that likelier; start
chains in every region you know of (``initial_z``), or fit the flow on draws that cover them.

Example:
    >>> flow = LatentFlow(zuko.flows.NSF(2, transforms=2))
    >>> refiner = FlowRefiner(flow, steps=5)
    >>> refiner.add(torch.randn(256, 2) + 3.0)
    >>> refined = refiner.refine()  # a new frozen LatentFlow; `flow` is unchanged
    >>> bool(refined.to_data(torch.zeros(1, 2))[0].mean() > flow.to_data(torch.zeros(1, 2))[0].mean())
    True
"""

from __future__ import annotations

__all__ = ["FlowRefiner"]

import torch

from torch import Tensor

from .flow import LatentFlow


class FlowRefiner:
    r"""Refits a flow by maximum likelihood on points collected from the chains.

    Arguments:
        flow: The flow to refine (given as a :class:`zuko.flows.Flow` module): a trainable copy is
            made, the flow itself is not changed.
        steps: Adam steps per :meth:`refine`.
        lr: Adam's learning rate (its state persists from one refinement to the next).
        batch_size: Points per Adam step, drawn from those collected (all of them if fewer).
        generator: Random generator of the minibatches.
    """

    def __init__(
        self,
        flow: LatentFlow,
        *,
        steps: int = 20,
        lr: float = 1e-3,
        batch_size: int = 1024,
        generator: torch.Generator | None = None,
    ) -> None:
        for name, value in (("steps", steps), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"refinement {name} must be an integer >= 1, got {value!r}")
        if not lr > 0:
            raise ValueError(f"refinement lr must be > 0, got {lr!r}")
        self.module = flow.trainable_copy()
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=lr)
        self.steps, self.batch_size, self.generator = steps, batch_size, generator
        self._points: list[Tensor] = []
        self.losses: list[float] = []

    def add(self, x: Tensor) -> None:
        """Collects the chains' data-space states ``x`` ``(chains, d)`` for the next refinement."""
        self._points.append(x.detach().reshape(-1, x.shape[-1]))

    def refine(self) -> LatentFlow:
        """Takes ``steps`` Adam steps on the points collected since the last call (then forgets them);
        returns the refined flow, frozen. Non-finite points are left out."""
        points = torch.cat(self._points) if self._points else None
        self._points = []
        if points is not None:
            points = points[torch.isfinite(points).all(-1)]
        if points is None or len(points) == 0:
            return LatentFlow(self.module)
        for _ in range(self.steps):
            if len(points) > self.batch_size:
                index = torch.randperm(len(points), generator=self.generator, device=points.device)
                batch = points[index[: self.batch_size]]
            else:
                batch = points
            loss = -self.module().log_prob(batch).mean()
            if not torch.isfinite(loss):
                continue  # a point the flow cannot reach: skip this step rather than corrupt the flow
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.losses.append(loss.item())
        return LatentFlow(self.module)
