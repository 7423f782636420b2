r"""A run whose data are split over processes: :class:`ShardedData`, the process group of a likelihood
summed over data shards, every process holding one shard and the same chains. The density it sums is
:mod:`pyro_nfmala.model.sharded`'s.

Every rank must run the same code on the same numbers: the same seed, and a fit without a time budget
(a deadline would stop the ranks at different steps). ``check_every`` compares the chains' states across
ranks every so many steps and stops the run where they differ.

Example (one process: every operation the identity):
    >>> shards = ShardedData(check_every=50)
    >>> shards.active, shards.check_every
    (False, 50)
"""

from __future__ import annotations

__all__ = ["ShardedData"]

from torch import Tensor

from .collectives import Collective


class ShardedData(Collective):
    r"""A run whose data are split over the processes of a ``torch.distributed`` group: each rank calls the
    run with its own shard as the model's arguments, and every rank holds the same chains (see the module).

    Pass it as ``NFMALA(model, distributed=ShardedData())``; every rank seeds alike
    (``pyro.set_rng_seed(s)``) and calls ``MCMC(...).run(shard)``.

    Arguments:
        group: The process group (``None``: the default one).
        check_every: Every so many steps, check that the chains are the same on every rank (one all-reduce
            of a checksum); ``None`` never.
    """

    def __init__(self, group=None, *, check_every: int | None = 100) -> None:
        super().__init__(group)
        if check_every is not None and int(check_every) < 1:
            raise ValueError(f"check_every must be a positive number of steps or None, got {check_every}")
        self.check_every = None if check_every is None else int(check_every)

    def check_same_chains(self, step: int, z: Tensor) -> None:
        """On schedule (every ``check_every`` steps), raises ``RuntimeError`` on every rank where the chains'
        latent states ``z`` differ between ranks."""
        if not self.active or self.check_every is None or step % self.check_every:
            return
        values = self.gather_rows(z.detach().double().sum().reshape(1))
        if not bool((values == values[0]).all()):
            raise RuntimeError(
                f"the chains differ between ranks after step {step} (checksums {values.tolist()}): "
                "every rank of a ShardedData run must run the same code on the same numbers. Seed every "
                "rank alike (pyro.set_rng_seed), give the fit no time budget, and make the model's prior "
                "the same on every rank (only the observed data may differ)."
            )
