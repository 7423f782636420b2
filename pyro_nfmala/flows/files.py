r"""Saving and loading flows safely: a flow file holds the flow's *constructor spec* (which builder, with
which arguments: :mod:`~pyro_nfmala.flows.specs`) and its ``state_dict``, never pickled code. Loading
uses ``torch.load(..., weights_only=True)`` and rebuilds the flow from an allowlist of builders (zuko's
flow classes, :func:`~pyro_nfmala.default_flow`, :func:`~pyro_nfmala.identity_flow` and the staged
maps), so a file cannot run code, and it refuses a spec that would build a flow far larger than the
weights the file holds. Writing is atomic (a temporary file, then a rename): a failed save leaves an
existing file intact.

Flows built by :func:`~pyro_nfmala.default_flow` and :func:`~pyro_nfmala.identity_flow` record their
spec, and so do the fits that build them; for zuko's ``MAF``, ``NSF``, ``NICE`` and ``RealNVP`` the spec
is read off the flow (:func:`~pyro_nfmala.flows.specs.read_zuko_spec`), so
``save_flow(zuko.flows.NSF(2), path)`` is one line. For other flows, give the spec to :func:`save_flow`:
``spec={"name": "NSF", "args": [3], "kwargs": {"transforms": 2}}``.

Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "flow.pt")
    >>> flow = default_flow(3, kind="affine")
    >>> save_flow(flow, path, note="demo")
    >>> loaded, metadata = load_flow(path, with_metadata=True)
    >>> metadata, torch.equal(loaded().transform.inv(torch.ones(3)), flow().transform.inv(torch.ones(3)))
    ({'note': 'demo'}, True)
"""

from __future__ import annotations

__all__ = ["FORMAT", "load_flow", "save_flow"]

import os
import tempfile

from collections.abc import Mapping
from pathlib import Path

import torch
import zuko

from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors
from zuko.lazy import LazyDistribution

from .builders import default_flow, identity_flow
from .specs import flow_spec, read_zuko_spec, record_spec
from .staged import StagedFlow

#: The format tag of flow files written by :func:`save_flow`.
FORMAT = "pyro_nfmala.flow/3"


def staged_flow(dim: int, flow: Mapping | None = None) -> StagedFlow:
    r"""A :class:`~pyro_nfmala.flows.staged.StagedFlow` of dimension ``dim`` with :math:`\mu = 0`,
    :math:`L = I`, and a flow stage built from the spec ``flow`` (or none): the builder :func:`load_flow`
    uses before loading weights."""
    inner = _build(flow) if flow is not None else None
    return StagedFlow(torch.zeros(dim), torch.eye(dim), inner)


_BUILDERS = {"default_flow": default_flow, "identity_flow": identity_flow, "staged_flow": staged_flow}


def _builder(name: object):
    """The builder called ``name``: one of ours, or a zuko flow class (``"NSF"``, ``"zuko.flows.MAF"``)."""
    if isinstance(name, str):
        if name in _BUILDERS:
            return _BUILDERS[name]
        short = name.removeprefix("zuko.flows.")
        builder = getattr(zuko.flows, short, None)
        if isinstance(builder, type) and issubclass(builder, LazyDistribution):
            return builder
    raise ValueError(
        f"unknown flow builder {name!r}: expected 'default_flow', 'identity_flow' or the name of a "
        "zuko flow class (e.g. 'NSF', 'MAF', 'RealNVP')"
    )


def _check_plain(value: object, where: str) -> None:
    """Raises unless ``value`` is made of what ``torch.load(weights_only=True)`` reads back."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.dtype)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has a non-string key {key!r}")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__name__}: a flow file holds only numbers, strings, tensors, lists "
        "and dicts (no objects or functions)"
    )


#: What building a file's flow may allocate through torch's tensor constructors, beyond the weights
#: the file holds: building a flow allocates at most its weights (masks come from other operations).
_BUILD_SLACK = 2, 1 << 16


class _AllocationBudget(TorchFunctionMode):
    """Counts the elements that torch's tensor constructors allocate while a flow is built, and stops
    the build (``MemoryError``) past ``limit``: a crafted spec cannot make :func:`load_flow` build a
    flow far larger than the weights in its file."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.allocated = limit, 0
        self.constructors = _device_constructors()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func in self.constructors and isinstance(result, Tensor):
            self.allocated += result.numel()
            if self.allocated > self.limit:
                raise _SpecTooLarge(self.limit)
        return result


def _stored_values(state: object) -> int:
    """The values a loaded ``state_dict`` really stores (its tensors' distinct storages: a broadcast
    view claims many elements over one)."""
    if not isinstance(state, dict):
        return 0
    storages = {}
    for tensor in state.values():
        if isinstance(tensor, Tensor):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes() // max(tensor.element_size(), 1)
    return sum(storages.values())


class _SpecTooLarge(Exception):
    """A file's spec builds a flow larger than the weights it holds."""


def _build(spec: Mapping) -> zuko.flows.Flow:
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(f"a flow spec is a dict with 'name', 'args' and 'kwargs', got {spec!r}")
    builder = _builder(spec["name"])
    return builder(*spec.get("args", ()), **spec.get("kwargs", {}))


def save_flow(flow: zuko.flows.Flow, path, *, spec: Mapping | None = None, **metadata) -> None:
    """Saves a zuko flow's constructor spec and weights, with optional ``metadata`` (e.g. its loss history).

    Arguments:
        flow: A zuko flow module (:class:`zuko.flows.Flow` or another lazy distribution of zuko).
        path: The file to write; replaced atomically.
        spec: How to rebuild the flow, ``{"name": ..., "args": [...], "kwargs": {...}}`` with
            ``name`` a zuko flow class (``"NSF"``) or ``"default_flow"`` / ``"identity_flow"``.
            Not needed for flows those two built (they record it).
        metadata: Numbers, strings, tensors, lists and dicts only.
    """
    if not isinstance(flow, LazyDistribution):
        raise TypeError(
            f"save_flow saves a zuko flow module (e.g. zuko.flows.NSF), got {type(flow).__name__}"
        )
    spec = dict(spec) if spec is not None else flow_spec(flow) or read_zuko_spec(flow)
    if spec is None:
        raise ValueError(
            f"save_flow could not read how to rebuild this {type(flow).__name__} at load time: pass "
            "spec={'name': 'NSF', 'args': [features], 'kwargs': {...}} with the arguments the flow was "
            "built with (flows from default_flow and identity_flow record theirs, and those of zuko's "
            "MAF, NSF, NICE and RealNVP with their default activation are read off the flow)"
        )
    spec.setdefault("args", [])
    spec.setdefault("kwargs", {})
    _builder(spec["name"])
    _check_plain(spec, "spec")
    _check_plain(metadata, "metadata")
    state = {name: tensor.detach().cpu() for name, tensor in flow.state_dict().items()}
    floating = [tensor.dtype for tensor in state.values() if tensor.is_floating_point()]
    payload = {
        "format": FORMAT,
        "spec": spec,
        "dtype": str(floating[0]).removeprefix("torch.") if floating else "float32",
        "state_dict": state,
        "metadata": metadata,
    }
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_flow(path, map_location=None, *, with_metadata: bool = False):
    """Loads a flow written by :func:`save_flow` (in ``eval()`` mode); optionally with its metadata.

    The file is read with ``torch.load(weights_only=True)`` and the flow rebuilt from its spec:
    nothing in the file is run. A file that is not such a flow file, or is damaged, gives a
    ``ValueError`` naming it; a missing or unreadable file, the operating system's own error.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):  # the file system's own words
        raise
    except Exception as error:  # noqa: BLE001 - whatever torch.load makes of a damaged or foreign file
        raise ValueError(
            f"{path} is not a flow file of pyro_nfmala.save_flow, or it is damaged (files written by "
            f"pyro_nfmala 0.1 held pickled code and are not read): {type(error).__name__}: {error}"
        ) from error
    if not isinstance(payload, dict) or not str(payload.get("format", "")).startswith("pyro_nfmala.flow/"):
        raise ValueError(f"{path} was not written by pyro_nfmala.save_flow (format {FORMAT})")
    if payload["format"] != FORMAT:
        raise ValueError(
            f"{path} was written by another version of pyro_nfmala (format {payload['format']}; this version "
            f"reads {FORMAT}): save the flow again with this version"
        )
    held = _stored_values(payload.get("state_dict"))
    factor, slack = _BUILD_SLACK
    try:
        with torch.random.fork_rng(devices=[]), _AllocationBudget(factor * held + slack):
            flow = _build(payload["spec"])  # building initializes weights: the caller's RNG is left alone
        flow.to(getattr(torch, payload["dtype"]))
        flow.load_state_dict(payload["state_dict"])
    except _SpecTooLarge as error:
        raise ValueError(
            f"{path}: its spec {payload['spec']!r} builds a flow of more than {error.args[0]:,} values, "
            f"far more than the {held:,} weights the file holds: refused before building it (a damaged "
            "or crafted file)"
        ) from None
    except Exception as error:  # noqa: BLE001 - a spec or weights that do not fit each other
        raise ValueError(
            f"{path}: the flow could not be rebuilt from its spec and weights: {error}"
        ) from error
    if map_location is not None:
        flow.to(map_location)
    record_spec(flow, payload["spec"]["name"], tuple(payload["spec"]["args"]), payload["spec"]["kwargs"])
    flow.eval()
    return (flow, payload["metadata"]) if with_metadata else flow
