r"""Chains over many processes: each rank runs a batch of chains on its own device, warmup pooled.

After warmup the map, the step size and the mass matrix are fixed, so the chains are independent: a run
split over the ranks of a ``torch.distributed`` group needs to communicate only

1. at setup: rank 0 fits the map, draws every chain's start and searches the starts for modes, and sends
   them to every rank (:class:`~pyro_nfmala.samplers.run.PosteriorRun`), so that every rank samples through
   the same map;
2. in warmup, the statistics every adaptation pools (:class:`~pyro_nfmala.engine.adaptation.WarmupAdaptation`
   with ``pool``): the mean acceptance probability that dual averaging feeds on (one all-reduce a step),
   the chains' states in each mass-matrix window (gathered), the trajectory lengths of a Hamiltonian move,
   the first step size's median, and, with ``refine_every``, the states and gradients the flow refits on
   (gathered; rank 0's refitted weights broadcast). Every rank then adapts the same kernel;
3. at the end, the draws (gathered: every rank holds every chain, in rank order).

Each rank draws with its own random stream (the run's seed and its rank), so no two ranks' chains
repeat each other; the chains' starting points are drawn for the whole run at once and split, as one
process would have drawn them.

Example (one process: one rank, every operation the identity):
    >>> group = ChainParallel()
    >>> group.split(8)  # (chains on this rank, index of its first)
    (8, 0)
"""

from __future__ import annotations

__all__ = ["ChainParallel"]

from .collectives import Collective


class ChainParallel(Collective):
    """A run whose chains are split over the processes of a ``torch.distributed`` group (see the module).

    Pass it as ``NFMALA(model, distributed=ChainParallel())`` and run ``pyro_nfmala.MCMC(kernel, ...,
    num_chains=n)`` on every rank: ``n`` chains in all, ``n / size`` on each rank.

    Arguments:
        group: The process group (``None``: the default one).
    """
