r"""How a flow is built: the constructor spec recorded on the flows the library builds, or read off
zuko's own, which :func:`~pyro_nfmala.flows.files.save_flow` writes and
:func:`~pyro_nfmala.flows.files.load_flow` rebuilds from.

A spec is ``{"name": builder, "args": [...], "kwargs": {...}}``: ``name`` is one of the library's
builders (``"default_flow"``, ``"identity_flow"``, ``"staged_flow"``) or a zuko flow class.

Example:
    >>> spec = read_zuko_spec(zuko.flows.RealNVP(3, transforms=2))
    >>> spec["name"], spec["args"], spec["kwargs"]["transforms"]
    ('RealNVP', [3], 2)
"""

from __future__ import annotations

__all__ = ["flow_spec", "read_zuko_spec", "record_spec"]

from collections.abc import Mapping

import torch
import zuko

_SPEC_ATTRIBUTE = "_pyro_nfmala_spec"


def record_spec(flow: zuko.flows.Flow, name: str, args: tuple, kwargs: dict) -> zuko.flows.Flow:
    """Records on ``flow`` how to build it again (``name``, a builder
    :func:`~pyro_nfmala.flows.files.load_flow`
    knows, with ``args`` and ``kwargs``); returns ``flow``."""
    setattr(flow, _SPEC_ATTRIBUTE, {"name": name, "args": list(args), "kwargs": dict(kwargs)})
    return flow


def flow_spec(flow: zuko.flows.Flow) -> dict | None:
    """The constructor spec recorded on ``flow`` by :func:`default_flow` / :func:`identity_flow`,
    or ``None``."""
    spec = getattr(flow, _SPEC_ATTRIBUTE, None)
    return (
        None
        if spec is None
        else {"name": spec["name"], "args": list(spec["args"]), "kwargs": dict(spec["kwargs"])}
    )


#: zuko's flow classes whose constructor arguments :func:`save_flow` reads off a built flow.
_READABLE = {"MAF": "autoregressive", "NSF": "autoregressive", "NICE": "coupling", "RealNVP": "coupling"}


def read_zuko_spec(flow: zuko.flows.Flow) -> dict | None:
    """The constructor spec of a flow built by one of zuko's ``MAF``, ``NSF``, ``NICE`` or
    ``RealNVP`` with its default activation, read off the flow's layers (features, context,
    transforms, hidden features, passes, bins); ``None`` where it cannot be read.

    The spec is proved before it is returned: the flow it builds, given ``flow``'s weights, must
    compute the same map as ``flow`` on random points. So what :func:`save_flow` writes with it
    loads back as the same flow, or it is not used.

    Example:
        >>> spec = read_zuko_spec(zuko.flows.NSF(3, transforms=2, hidden_features=(32, 32)))
        >>> spec["name"], spec["args"], spec["kwargs"]["hidden_features"], spec["kwargs"]["bins"]
        ('NSF', [3], [32, 32], 8)
    """
    name = type(flow).__name__
    if getattr(zuko.flows, name, None) is not type(flow) or name not in _READABLE:
        return None
    try:
        spec = _read_layers(flow, name)
    except (AttributeError, IndexError, TypeError):
        return None
    return spec if spec is not None and _builds_the_same_map(spec, flow) else None


def _read_layers(flow: zuko.flows.Flow, name: str) -> dict | None:
    layers = list(flow.transform.transforms)
    first = layers[0]
    linear_types = (torch.nn.Linear, zuko.nn.Linear)
    linear = [module for module in first.hyper if isinstance(module, linear_types)]
    if any(not isinstance(m, (*linear_types, torch.nn.ReLU)) for m in first.hyper):
        return None  # another activation: a callable, which a flow file does not hold
    if _READABLE[name] == "autoregressive":
        features = first.order.numel()
        inputs = features
    else:
        features = first.mask.numel()
        inputs = int(first.mask.sum())
    kwargs = {"transforms": len(layers), "hidden_features": [layer.out_features for layer in linear[:-1]]}
    context = linear[0].in_features - inputs
    if context:
        kwargs["context"] = context
    if _READABLE[name] == "autoregressive":
        kwargs["passes"] = first.passes
        if name == "NSF":
            kwargs["bins"] = first.shapes[0][0]
    return {"name": name, "args": [features], "kwargs": kwargs}


def _builds_the_same_map(spec: Mapping, flow: zuko.flows.Flow) -> bool:
    """Whether the flow ``spec`` builds, with ``flow``'s weights, maps random points as ``flow`` does."""
    state = flow.state_dict()
    like = next((t for t in state.values() if t.is_floating_point()), torch.zeros(()))
    points = torch.Generator().manual_seed(0)
    try:
        with torch.random.fork_rng(devices=[]):
            rebuilt = getattr(zuko.flows, spec["name"])(*spec["args"], **spec["kwargs"]).to(like)
        rebuilt.load_state_dict(state)
        context = spec["kwargs"].get("context", 0)
        probe = torch.randn(8, spec["args"][0], generator=points).to(like)
        c = torch.randn(8, context, generator=points).to(like) if context else None
        with torch.no_grad():
            return torch.equal(rebuilt(c).transform.inv(probe), flow(c).transform.inv(probe))
    except Exception:  # noqa: BLE001 - a spec that does not rebuild this flow
        return False
