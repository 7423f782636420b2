r"""Running a function on several local processes with a process group, bounded in time: how the tests,
the benchmarks and a user on one machine try a distributed run without ``torchrun``.

:func:`spawn` starts ``nprocs`` processes (``torch.multiprocessing``, spawned), initializes the process
group in each (``gloo`` by default; a file in a temporary folder as the rendezvous), calls ``fn(*args)``
on every rank, and returns the ranks' return values in rank order. A rank that raises makes
:func:`spawn` raise that error (the first rank's in rank order, with a note naming it); a run that
outlives ``timeout`` is stopped (every process killed) and is a ``TimeoutError``: never a hang.

Example:
    >>> spawn(torch.distributed.get_rank, nprocs=2)  # doctest: +SKIP
    [0, 1]
"""

from __future__ import annotations

__all__ = ["spawn"]

import datetime
import os
import tempfile
import time

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .collectives import _portable


def spawn(
    fn: Callable,
    nprocs: int = 2,
    args: tuple = (),
    *,
    backend: str = "gloo",
    timeout: float = 300.0,
    threads: int | None = 1,
) -> list:
    """``fn(*args)`` on ``nprocs`` new processes of one process group; their return values, rank order.

    Arguments:
        fn: A picklable function (defined at a module's top level).
        nprocs: How many processes (ranks).
        args: Its arguments (picklable).
        backend: The ``torch.distributed`` backend (``"gloo"`` on CPUs, ``"nccl"`` on GPUs: rank ``r`` then
            uses CUDA device ``r``).
        timeout: Seconds the whole run may take (processes started, group formed, ``fn`` run); also the
            process group's own timeout for one collective.
        threads: ``torch.set_num_threads`` in every process (``None``: torch's default).
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    with tempfile.TemporaryDirectory(prefix="pyro_nfmala_spawn_") as folder:
        folder = Path(folder)
        context = mp.start_processes(
            _rank_main,
            args=(fn, args, nprocs, backend, str(folder), timeout, threads),
            nprocs=nprocs,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"the {nprocs} processes did not finish within {timeout:g} s: stopped (a rank "
                        "waiting on a collective that another never reached, or a longer run)"
                    )
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        outcomes = []
        for rank in range(nprocs):
            path = folder / f"rank{rank}.pt"
            if not path.exists():
                raise RuntimeError(f"rank {rank} ended without a result (killed, or it crashed)")
            outcomes.append(torch.load(path, weights_only=False))
    errors = [value for failed, value in outcomes if failed]
    if errors:
        raise errors[0]
    return [value for _, value in outcomes]


def _rank_main(rank, fn, args, nprocs, backend, folder, timeout, threads) -> None:
    if threads is not None:
        torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo") if backend == "gloo" else None
    failed, value = False, None
    try:
        dist.init_process_group(
            backend,
            init_method=f"file://{folder}/rendezvous",
            rank=rank,
            world_size=nprocs,
            timeout=datetime.timedelta(seconds=timeout),
        )
        try:
            value = fn(*args)
        finally:
            dist.destroy_process_group()
    except BaseException as error:  # noqa: BLE001 - handed to the parent
        failed, value = True, _portable(error, rank)
    torch.save((failed, value), Path(folder) / f"rank{rank}.pt")
