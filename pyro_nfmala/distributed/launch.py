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

from .collectives import _SETTLED, _portable


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
            for process in context.processes:  # each writes its outcome before it leaves the group
                process.join(timeout=max(deadline - time.monotonic(), 0.0))
            if any(process.is_alive() for process in context.processes):
                raise TimeoutError(
                    f"the {nprocs} processes did not finish within {timeout:g} s: stopped (a rank "
                    "waiting on a collective that another never reached, or a longer run)"
                )
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        outcomes = []
        for rank, process in enumerate(context.processes):
            path = folder / f"rank{rank}.pt"
            if not path.exists():
                raise RuntimeError(
                    f"rank {rank} ended without a result (exit code {process.exitcode}: killed, or crashed)"
                )
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
    if backend == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    failed, value, settled = False, None, True
    try:
        dist.init_process_group(
            backend,
            init_method=f"file://{folder}/rendezvous",
            rank=rank,
            world_size=nprocs,
            timeout=datetime.timedelta(seconds=timeout),
        )
        value = fn(*args)
    except BaseException as error:  # noqa: BLE001 - handed to the parent
        failed, value = True, _portable(error, rank)
        settled = getattr(error, _SETTLED, False)  # every rank has it: every rank is here
    torch.save((failed, value), Path(folder) / f"rank{rank}.pt")
    if dist.is_initialized():
        try:
            if settled:  # leave together: a rank gone early breaks the others' last collective
                dist.barrier()
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - the outcome is written; leaving is best effort
            pass
