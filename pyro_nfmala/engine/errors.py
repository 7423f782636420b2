"""Which errors raised at a proposal are numerical failures (a rejected proposal, a divergence), and
which must stop the run.

As in Pyro's HMC, an error that a handler registered with
:func:`pyro.ops.integrator.register_exception_handler` accepts is a numerical failure, and so is a
distribution's argument check that fails at a proposal (a scale that underflowed to 0 deep in a
funnel). Out of memory never is, whatever a handler says: rejecting it would hide a machine out of
memory.

Example:
    >>> is_numerical_error(ValueError("Expected parameter scale (Tensor of shape ()) ... to satisfy the "
    ...                               "constraint GreaterThan(lower_bound=0.0), but found invalid values"))
    True
    >>> is_numerical_error(MemoryError()), is_out_of_memory(MemoryError())
    (False, True)
"""

from __future__ import annotations

__all__ = ["is_numerical_error", "is_out_of_memory"]

import pyro.ops.integrator
import torch


def is_numerical_error(error: BaseException) -> bool:
    """Whether an error raised at a proposal is a numerical failure (a divergence), as in Pyro's HMC.

    True when a handler registered with :func:`pyro.ops.integrator.register_exception_handler`
    accepts it, or when a distribution's argument check failed (a parameter out of its support);
    out-of-memory errors never are.
    """
    if is_out_of_memory(error) or not isinstance(error, Exception):
        return False
    if _is_out_of_support(error):
        return True
    handlers = getattr(pyro.ops.integrator, "_EXCEPTION_HANDLERS", {})
    return any(handler(error) for handler in list(handlers.values()))


#: How torch's allocators word an allocation failure that is not a ``torch.OutOfMemoryError``
#: (the CPU allocator raises a plain ``RuntimeError``).
_OUT_OF_MEMORY_MESSAGES = ("can't allocate memory", "out of memory", "failed to allocate")


def is_out_of_memory(error: BaseException) -> bool:
    """Python's ``MemoryError``, torch's ``OutOfMemoryError`` (CUDA) and its CPU allocator's
    ``RuntimeError: DefaultCPUAllocator: can't allocate memory``: never a numerical failure, whatever
    a handler registered with Pyro says, since rejecting them would hide a machine out of memory."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and any(text in message for text in _OUT_OF_MEMORY_MESSAGES)


def _is_out_of_support(error: BaseException) -> bool:
    """A distribution's argument check failing at a proposal ("Expected parameter scale ... to satisfy
    the constraint GreaterThan(...)"): a parameter that under- or overflowed out of its support (a scale
    exp(u) that reached 0 deep in a funnel), which is a numerical failure, not a programming error."""
    message = str(error)
    return (
        isinstance(error, ValueError) and message.startswith("Expected parameter") and "constraint" in message
    )
