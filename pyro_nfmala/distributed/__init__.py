r"""Beyond one process, on ``torch.distributed``: chains split over the ranks of a process group
(:class:`~pyro_nfmala.distributed.parallel.ChainParallel`, warmup pooled), or data split over them
(:class:`~pyro_nfmala.distributed.sharded.ShardedData`, a likelihood
summed by one all-reduce per evaluation). Launch with ``torchrun``, SLURM or Ray Train's
``TorchTrainer``; gloo on CPUs, NCCL on GPUs. The two combine, each on its own process group
(``distributed=(ChainParallel(column), ShardedData(row))``: chain groups x data shards).
The guide's page "Many processes" (``docs/guide/distributed.md``) shows how to launch, what is
communicated and when, and what it costs.
"""

from .collectives import Collective
from .parallel import ChainParallel
from .sharded import ShardedData

__all__ = ["ChainParallel", "Collective", "ShardedData"]
