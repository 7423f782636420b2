r"""The few collective operations a run needs, on a ``torch.distributed`` process group, with one rule
for errors: a rank that raises stops every rank with its error, never a hang.

:class:`Collective` wraps a process group (``None``: the default group that ``torchrun``, SLURM or Ray
Train's ``TorchTrainer`` set up with :func:`torch.distributed.init_process_group`). With no process group
initialized, or a group of one, every operation is the identity: the one-process run is unchanged and
pays nothing.

**Errors.** Every collective starts by settling: one all-reduce of a header whose first number is a flag,
zero on every rank that is well (a sum of a few numbers rides in the rest of it, so that it costs one
all-reduce in all). A rank whose code raised inside :meth:`Collective.together` joins the other ranks at
their next collective with its flag set instead; then every rank receives the error (pickled, with a
note naming the rank) and raises it, and the run stops on every rank with the same exception. A rank
killed outright (no Python left to send anything) makes the backend's own collective fail on the other
ranks (gloo and NCCL notice a closed connection), so the run still stops.

Example:
    >>> pool = Collective()  # no process group initialized here: one process, every operation the identity
    >>> pool.size, pool.rank
    (1, 0)
    >>> pool.gather_rows(torch.ones(3, 2)).shape
    torch.Size([3, 2])
"""

from __future__ import annotations

__all__ = ["ONE_PROCESS", "Collective", "OneProcess"]

import pickle

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from torch import Tensor

_SETTLED = "_pyro_nfmala_settled"  # set on an exception every rank has received
#: The numbers of the all-reduce that starts every collective: the error flag, and a sum of up to
#: ``HEADER - 1`` numbers carried with it (dual averaging's acceptance, a warmup step's only collective).
HEADER = 8


class Collective:
    """A ``torch.distributed`` process group, as the run uses it (see the module).

    Arguments:
        group: The process group; ``None`` for the default one (or one process, where none is initialized).
    """

    def __init__(self, group=None) -> None:
        self.group = group

    # ------------------------------------------------------------------------------------------
    # who

    @property
    def active(self) -> bool:
        """Whether more than one process takes part."""
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1

    def split(self, num_chains: int) -> tuple[int, int]:
        """This rank's share of ``num_chains`` chains: ``(count, index of its first chain)``; the ranks
        take consecutive blocks, the first ``num_chains % size`` one chain more."""
        size, rank = self.size, self.rank
        count = num_chains // size + (rank < num_chains % size)
        first = rank * (num_chains // size) + min(rank, num_chains % size)
        return count, first

    def generator(self, device: torch.device, base: torch.Generator | None = None) -> torch.Generator | None:
        """This rank's random stream: seeded from one draw of ``base`` (or the global generator) and the
        rank; ``base`` itself in one process."""
        if not self.active:
            return base
        source = base.device if base is not None else torch.device("cpu")
        seed = int(torch.randint(2**62, (), generator=base, device=source))
        stream = torch.Generator(device=device)
        stream.manual_seed(seed + 7919 * self.rank)
        return stream

    @property
    def size(self) -> int:
        """The number of processes (ranks) in the group."""
        return dist.get_world_size(self.group) if self.active else 1

    @property
    def rank(self) -> int:
        """This process's rank in the group (0 to ``size - 1``)."""
        return dist.get_rank(self.group) if self.active else 0

    @property
    def device(self) -> torch.device:
        """The device the backend takes tensors on (the current CUDA device for NCCL, else the CPU)."""
        if self.active and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank {self.rank} of {self.size})"

    # ------------------------------------------------------------------------------------------
    # errors

    @contextmanager
    def together(self) -> Iterator[None]:
        """Runs a block in which an exception on this rank is handed to every rank at its next collective
        (see the module), and raised here."""
        try:
            yield
        except BaseException as error:
            if self.active and not getattr(error, _SETTLED, False):
                self._settle(error)
            raise

    def _settle(self, error: BaseException | None = None, payload: Tensor | None = None) -> Tensor | None:
        """The start of every collective: :meth:`sum_flagged` of a header of ``HEADER - 1`` numbers, up to
        all of them ``payload`` (returned summed)."""
        header = torch.zeros(HEADER - 1, dtype=torch.float64)
        if payload is not None:
            header[: payload.numel()] = payload.detach().reshape(-1).to(header)
        summed = self.sum_flagged(header, error)
        return None if payload is None else summed[: payload.numel()]

    def sum_flagged(self, values: Tensor, error: BaseException | None = None) -> Tensor:
        """``values`` summed over the ranks by one all-reduce of ``[flag, values]`` (every rank the same
        shape), the flag set by a rank that passes its ``error``; where any rank set it, every rank raises
        the first rank's error instead (one more collective: the errors gathered)."""
        if not self.active:
            if error is not None:
                raise error
            return values
        flag = values.new_full((1,), 0.0 if error is None else 1.0)
        buffer = torch.cat([flag, values.detach().reshape(-1)]).to(self.device)
        dist.all_reduce(buffer, group=self.group)
        if float(buffer[0]) == 0.0:
            return buffer[1:].to(values.device).reshape(values.shape)
        errors: list = [None] * self.size
        dist.all_gather_object(
            errors, None if error is None else _portable(error, self.rank), group=self.group
        )
        raised = next(item for item in errors if item is not None)
        setattr(raised, _SETTLED, True)
        if error is not None:
            setattr(error, _SETTLED, True)
        raise raised

    # ------------------------------------------------------------------------------------------
    # operations (each the identity in one process)

    def sum(self, tensor: Tensor) -> Tensor:
        """The elementwise sum of ``tensor`` over the ranks (same shape on every rank)."""
        if not self.active:
            return tensor
        if tensor.numel() < HEADER:  # a few numbers: in the header itself, one all-reduce in all
            summed = self._settle(payload=tensor)
            return summed.to(dtype=tensor.dtype, device=tensor.device).reshape(tensor.shape)
        self._settle()
        summed = tensor.detach().to(self.device, copy=True)
        dist.all_reduce(summed, group=self.group)
        return summed.to(tensor.device)

    def gather_rows(self, rows: Tensor) -> Tensor:
        """Every rank's ``rows`` ``(n_rank, ...)``, concatenated in rank order (``n_rank`` may differ)."""
        if not self.active:
            return rows
        self._settle()
        source = rows.detach().to(self.device)
        count = torch.tensor([len(source)], dtype=torch.int64, device=self.device)
        counts = [torch.zeros_like(count) for _ in range(self.size)]
        dist.all_gather(counts, count, group=self.group)
        counts = [int(c) for c in counts]
        padded = source.new_zeros((max(counts), *source.shape[1:]))
        padded[: len(source)] = source
        gathered = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(gathered, padded, group=self.group)
        return torch.cat([part[:c] for part, c in zip(gathered, counts)]).to(rows.device)

    def gather_objects(self, value) -> list:
        """Every rank's picklable ``value``, in rank order."""
        if not self.active:
            return [value]
        self._settle()
        values: list = [None] * self.size
        dist.all_gather_object(values, value, group=self.group)
        return values

    def broadcast_object(self, value, source: int = 0):
        """Rank ``source``'s picklable ``value``, on every rank (``source``: a rank in this group)."""
        if not self.active:
            return value
        self._settle()
        box = [value if self.rank == source else None]
        dist.broadcast_object_list(box, group=self.group, group_src=source)
        return box[0]

    def broadcast_module_(self, module: torch.nn.Module, source: int = 0) -> torch.nn.Module:
        """Copies rank ``source``'s parameters and floating buffers of ``module`` into every rank's (the
        same architecture everywhere), in place; returns it."""
        if not self.active:
            return module
        self._settle()
        tensors = [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]
        with torch.no_grad():
            for tensor in tensors:
                moved = tensor.detach().to(self.device, copy=True)
                dist.broadcast(moved, group=self.group, group_src=source)
                tensor.copy_(moved.to(tensor.device))
        return module


class OneProcess(Collective):
    """This process alone, whatever process groups exist: every operation the identity."""

    @property
    def active(self) -> bool:
        return False


#: The run's group where it is not distributed.
ONE_PROCESS = OneProcess()


def _portable(error: BaseException, rank: int) -> BaseException:
    """``error`` with a note naming ``rank``, as it can cross to another process (its type and message
    where the exception itself does not pickle)."""
    note = f"raised on rank {rank}"
    try:
        copy = pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 - any exception that does not round-trip
        copy = RuntimeError(f"{type(error).__name__}: {error}")
    if hasattr(copy, "add_note") and note not in getattr(copy, "__notes__", []):
        copy.add_note(note)
    return copy
