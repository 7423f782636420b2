r"""Any trained flow, whatever library made it, as the samplers read it: a generator
:math:`x = f(z)` with :math:`\mathrm{ladj}(z) = \log|\det J_f(z)|` and a base law :math:`q_Z`.

The samplers need from a flow only the generator direction, batched and differentiable by plain autograd,
the base log density (for the tempered target) and, where it exists, :math:`z = f^{-1}(x)` (to start chains
at data-space points). Libraries disagree on direction: Pyro's transforms and guides, torch's
``TransformedDistribution``, normflows (``forward_and_log_det(z)``) and FrEIA (``inn(z, rev=True)``) treat
latent to data as forward; zuko (``flow().transform.inv``) and nflows (``flow._transform.inverse(z)``)
treat data to latent as forward. :func:`adapt_flow` recognizes what it is given and returns a zuko
:class:`~zuko.distributions.NormalizingFlow` (data to latent as its ``transform``, as zuko's go), which
:class:`~pyro_nfmala.flows.latent.LatentFlow` freezes and reads:

============================================  =====================================================
given                                         generator :math:`f`, base :math:`q_Z`
============================================  =====================================================
a zuko flow or ``NormalizingFlow``            as it is
a Pyro autoguide with ``get_transform``       ``guide.get_transform()``, ``guide.get_base_dist()``
(``AutoIAFNormal``, ``AutoNormalizingFlow``,  (its latent vector: the model's unconstrained sites in
``AutoMultivariateNormal``, Laplace)          the order they run, as ``NeuTraReparam`` reads it)
a ``TransformedDistribution``                 its transforms composed, its ``base_dist``
a torch or Pyro ``Transform``                 the transform; ``base``: a distribution, or ``d`` for
                                              :math:`N(0, I_d)`
normflows ``NormalizingFlow``                 ``forward_and_log_det``, ``q0``
nflows ``Flow``                               ``_transform.inverse``, ``_distribution``
FrEIA ``SequenceINN`` / ``GraphINN``          ``inn(z, rev=True)``, ``base``
a callable ``z -> (x, ladj)``                 the callable, ``base``; ``inverse`` optional
============================================  =====================================================

Elementwise transforms (event dimension 0) are read as one transform of the vector (their log-determinants
summed). :func:`check_flow_map` then checks, on a few points, what a sampler relies on (see
:data:`FLOW_MAP_CHECKS`), and refuses with a :class:`FlowMapError` naming the check, the reason and the
layers that explain it (:func:`unsafe_layers`); :func:`~pyro_nfmala.flows.latent.as_latent_flow` runs it on
every flow that is not zuko's.

Example:
    >>> import pyro.distributions.transforms as T
    >>> transform = T.AffineAutoregressive(pyro.nn.AutoRegressiveNN(3, [8]))
    >>> flow = adapt_flow(transform, base=3)  # N(0, I_3) base
    >>> x, ladj = flow.transform.inv.call_and_ladj(torch.randn(5, 3))
    >>> x.shape, ladj.shape
    (torch.Size([5, 3]), torch.Size([5]))
"""

from __future__ import annotations

__all__ = [
    "FLOW_MAP_CHECKS",
    "FlowMapError",
    "UNSAFE_LAYER_KINDS",
    "adapt_flow",
    "check_flow_map",
    "guide_sites",
    "sequential_layers",
    "unsafe_layers",
]

import copy
import types

from collections.abc import Callable

import pyro
import torch

from torch import Tensor
from torch.distributions import (
    ComposeTransform,
    Distribution,
    IndependentTransform,
    Transform,
    TransformedDistribution,
    constraints,
)
from torch.distributions.transforms import _InverseTransform
from zuko.distributions import NormalizingFlow
from zuko.lazy import LazyDistribution

#: What :func:`check_flow_map` checks, on a few latent points, and why a sampler needs it.
FLOW_MAP_CHECKS = {
    "square": "the map takes (n, d) to (n, d) with one log-determinant per point",
    "deterministic": "two calls on the same points agree exactly (no random log-determinant estimator, "
    "no dropout, no batch statistics in training mode)",
    "independent rows": "a point's image does not depend on the other points of the batch (no batch "
    "normalization with batch statistics): the chains must not be coupled",
    "exact log-determinant": "ladj equals log|det| of the Jacobian that autograd computes",
    "gradient": "the gradient of x and ladj with respect to z exists and is finite",
}


#: Kinds of layer (a substring of the class name) that make a flow random or couple the rows of a batch,
#: and why: :func:`check_flow_map` names those it finds when the 'deterministic', 'independent rows' or
#: 'exact log-determinant' check fails.
UNSAFE_LAYER_KINDS = {
    "BatchNorm": "normalizes with the batch's statistics",
    "Dropout": "drops units at random",
    "IResNet": "estimates its log-determinant with random (Hutchinson) probes",
    "Residual": "estimates its log-determinant at random (a power series cut at a random length)",
}

#: Layers of those kinds that use neither batch statistics nor randomness in ``eval()`` mode (the frozen
#: copy's mode), and so are named only in training mode (a callable's modules are used as given).
_SAFE_IN_EVAL_MODE = (
    torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.modules.dropout._DropoutNd,
    pyro.distributions.transforms.BatchNorm,
)


class FlowMapError(ValueError):
    """A flow that a sampler cannot use exactly, with the check it failed, why, and the layers that explain
    it where :func:`unsafe_layers` finds them."""


def adapt_flow(
    flow: object,
    base: Distribution | int | None = None,
    *,
    inverse: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
) -> LazyDistribution | NormalizingFlow:
    r"""``flow`` as a zuko flow: itself if it is one, else a zuko
    :class:`~zuko.distributions.NormalizingFlow` whose ``transform`` is its data-to-latent map (see the
    module's table).

    Arguments:
        flow: A flow of any library in the module's table.
        base: The base law where ``flow`` has none of its own (a transform, FrEIA, a callable): a
            distribution with event shape ``(d,)``, or ``d`` for :math:`N(0, I_d)` (float64 where the flow's
            parameters are).
        inverse: For a callable generator, its inverse ``x -> (z, log|det J_{f^{-1}}(x)|)``, if any.

    Raises:
        TypeError: ``flow`` is none of these, naming what is accepted.
        ValueError: a base is needed and not given, or a guide has not been run yet.
    """
    if isinstance(flow, (LazyDistribution, NormalizingFlow)):
        return flow
    if hasattr(flow, "get_transform") and hasattr(flow, "get_base_dist"):
        return _from_guide(flow)
    if isinstance(flow, TransformedDistribution):
        return _flow(_composed(list(flow.transforms)), flow.base_dist)
    if isinstance(flow, Transform):
        return _flow(_vector(flow), _base(base, flow, "a transform"))
    if hasattr(flow, "forward_and_log_det") and hasattr(flow, "q0"):  # normflows
        generator = _Generator(flow.forward_and_log_det, getattr(flow, "inverse_and_log_det", None))
        return _flow(generator, _ModuleBase(flow.q0) if base is None else _base(base, flow, "normflows"))
    if hasattr(flow, "_transform") and hasattr(flow, "_distribution"):  # nflows
        transform = flow._transform
        return _flow(_Generator(transform.inverse, transform.forward), _ModuleBase(flow._distribution))
    if _is_freia(flow):
        # FrEIA's blocks hold lambdas over the block itself (a stateless softplus), which a copy of the whole
        # cannot redirect: the network is copied and frozen here, and its generator not walked again
        network = _FreiaNetwork(copy.deepcopy(flow).eval().requires_grad_(False))
        generator = _Generator(network.generate, network.invert, opaque=True)
        return _flow(generator, _base(base, flow, "a FrEIA network (it has no base law of its own)"))
    if callable(flow):
        what = f"a {type(flow).__name__}, read as a callable generator z -> (x, ladj) (no known flow kind),"
        return _flow(_Generator(flow, inverse), _base(base, flow, what))
    raise TypeError(
        f"cannot read a {type(flow).__name__} as a flow: give a zuko flow, a Pyro autoguide with "
        "get_transform (AutoIAFNormal, AutoNormalizingFlow, AutoMultivariateNormal), a "
        "TransformedDistribution, a torch or Pyro Transform (with base=), a normflows NormalizingFlow, an "
        "nflows Flow, a FrEIA SequenceINN or GraphINN (with base=), or a callable z -> (x, ladj) (with base=)"
    )


def sequential_layers(flow: object) -> list[str]:
    """The layers of ``flow`` whose generator direction (latent to data) is an autoregressive inverse, one
    network pass per coordinate: nflows' and normflows' autoregressive layers (their sampling direction),
    and Pyro's autoregressive transforms used inverted. Exact, but ``d`` times slower a step."""
    if isinstance(flow, TransformedDistribution):
        return [name for transform in flow.transforms for name in sequential_layers(transform)]
    if isinstance(flow, ComposeTransform):
        return [name for part in flow.parts for name in sequential_layers(part)]
    if isinstance(flow, Transform):
        inverted = flow._inv if isinstance(flow, _InverseTransform) else None
        return [type(inverted).__name__] if _autoregressive(inverted) else []
    library = type(flow).__module__.split(".")[0]
    if library in ("nflows", "normflows") and isinstance(flow, torch.nn.Module):
        return [type(module).__name__ for module in flow.modules() if _autoregressive(module)]
    return []


def _autoregressive(module: object) -> bool:
    name = type(module).__name__
    return module is not None and "Autoregressive" in name and "NN" not in name


def guide_sites(flow: object) -> dict[str, int] | None:
    """For a Pyro autoguide, its latent sites in the order of its latent vector, with their sizes; else
    ``None``."""
    shapes = getattr(flow, "_unconstrained_shapes", None)
    if not (hasattr(flow, "get_transform") and shapes):
        return None
    return {name: int(torch.Size(shape).numel()) for name, shape in shapes.items()}


def _from_guide(guide) -> NormalizingFlow:
    if not getattr(guide, "_unconstrained_shapes", None):
        raise ValueError(
            f"the {type(guide).__name__} guide has not been run yet: train it (SVI) or call it once with the "
            "model's arguments, so that it knows the model's latent sites, before passing it as a flow"
        )
    with torch.no_grad():
        transform, base = guide.get_transform(), guide.get_base_dist()
    return _flow(_vector(transform), base)


def _flow(generator: Transform, base: Distribution) -> NormalizingFlow:
    """The zuko flow of a generator (latent to data) and its base law."""
    return NormalizingFlow(generator.inv, base)


def _composed(transforms: list[Transform]) -> Transform:
    return _vector(transforms[0] if len(transforms) == 1 else ComposeTransform(transforms))


def _vector(transform: Transform) -> Transform:
    """``transform`` as a map of vectors: an elementwise one's log-determinants summed over the vector."""
    if transform.codomain.event_dim == 0:
        return IndependentTransform(transform, 1, cache_size=transform._cache_size)
    return transform


def _base(base: Distribution | int | None, flow: object, what: str) -> Distribution:
    if isinstance(base, Distribution):
        return base
    if base is None:
        raise ValueError(
            f"{what} needs its base law: read it with pyro_nfmala.as_latent_flow(flow, base=...) (base: a "
            "distribution with event shape (d,), or d for N(0, I_d)) and pass that as the flow"
        )
    zeros = torch.zeros(int(base), dtype=_dtype_of(flow))
    return pyro.distributions.Normal(zeros, torch.ones_like(zeros)).to_event(1)


def _dtype_of(flow: object) -> torch.dtype:
    """The dtype of a module's first floating-point parameter or buffer; the default dtype otherwise."""
    if isinstance(flow, torch.nn.Module):
        for tensor in (*flow.parameters(), *flow.buffers()):
            if tensor.is_floating_point():
                return tensor.dtype
    return torch.get_default_dtype()


class _ModuleBase(Distribution):
    """A base law given as a module with ``log_prob(z)`` and ``sample(n)`` (normflows', nflows'), as a
    torch distribution of event shape ``(d,)``."""

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = False

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        #: the module's dtype (its draws come in the default dtype in some libraries: they are cast)
        self.dtype = _dtype_of(module)
        with torch.no_grad():
            dim = self._draw(1).shape[-1]
        super().__init__(event_shape=torch.Size([dim]), validate_args=False)

    def _draw(self, n: int) -> Tensor:
        draws = self.module.sample(n)
        return (draws[0] if isinstance(draws, tuple) else draws).to(self.dtype)

    def log_prob(self, value: Tensor) -> Tensor:
        flat = value.reshape(-1, value.shape[-1])
        return self.module.log_prob(flat).reshape(value.shape[:-1])

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        shape = torch.Size(sample_shape)
        with torch.no_grad():
            return self._draw(max(shape.numel(), 1)).reshape(*shape, *self.event_shape)


def _is_freia(flow: object) -> bool:
    return type(flow).__module__.split(".")[0] == "FrEIA"


class _FreiaNetwork(torch.nn.Module):
    """A FrEIA network read in both directions: ``inn(z, rev=True)`` generates, ``inn(x)`` inverts, each
    returning ``(output, log_jac_det)``."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def generate(self, z: Tensor) -> tuple[Tensor, Tensor]:
        x, log_jac_det = self.network(z, rev=True)[:2]
        return x, log_jac_det

    def invert(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z, log_jac_det = self.network(x)[:2]
        return z, log_jac_det


class _Generator(Transform):
    r"""A generator given as ``z -> (x, ladj)`` (and optionally its inverse ``x -> (z, -ladj)``), as a
    torch transform from latent to data; its log-determinant comes with each call, not recomputed."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(
        self,
        forward: Callable[[Tensor], tuple[Tensor, Tensor]],
        inverse: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
        opaque: bool | None = None,
    ) -> None:
        super().__init__()
        self.forward_and_ladj, self.inverse_and_ladj = forward, inverse
        #: not walked by the flow's private copy: a plain function (not a module or a module's method) is
        #: used as given (what it closes over cannot be copied, and is neither copied nor frozen)
        plain = not isinstance(forward, (torch.nn.Module, types.MethodType))
        self._nfmala_opaque = plain if opaque is None else opaque

    def call_and_ladj(self, z: Tensor) -> tuple[Tensor, Tensor]:
        x, ladj = self.forward_and_ladj(z)
        return x, ladj.to(x.dtype)  # normflows sums its log-determinants in the default dtype

    def _call(self, z: Tensor) -> Tensor:
        return self.forward_and_ladj(z)[0]

    def _inverse(self, x: Tensor) -> Tensor:
        if self.inverse_and_ladj is None:
            raise NotImplementedError(
                "this flow has no inverse (data to latent): chains start at its base draws, and the "
                "'jacobian' and 'data_space' preconditioners and data-space starts need a flow that has one "
                "(give inverse= with a callable)"
            )
        return self.inverse_and_ladj(x)[0]

    def log_abs_det_jacobian(self, z: Tensor, x: Tensor) -> Tensor:
        return self.call_and_ladj(z)[1]


def check_flow_map(
    to_data: Callable[[Tensor], tuple[Tensor, Tensor]], dim: int, dtype: torch.dtype, name: str = "flow"
) -> None:
    """Checks, on a few latent points, each of :data:`FLOW_MAP_CHECKS` for the generator ``to_data``
    (``z -> (x, ladj)``, batched); raises :class:`FlowMapError` naming the flow (``name``), the check and
    the reason, and, where the 'deterministic', 'independent rows' or 'exact log-determinant' check fails,
    the layers of the flow that explain it (:func:`unsafe_layers`).

    The log-determinant is compared with autograd's Jacobian at two points where ``d <= 64``; beyond,
    along three random directions (the Jacobian's action, not its determinant, is then what is
    compared: a finite-difference-free check that the map is differentiable as it says)."""
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(4, dim, generator=generator, dtype=torch.float64).to(dtype)

    def evaluated(points: Tensor) -> tuple[Tensor, Tensor]:  # as the samplers evaluate: with a graph
        with torch.enable_grad():
            x, ladj = to_data(points.clone().requires_grad_(True))
        return x.detach(), ladj.detach()

    x, ladj = evaluated(z)
    again = evaluated(z)
    if tuple(x.shape) != (4, dim) or tuple(ladj.shape) != (4,):
        shapes = f"{tuple(x.shape)} with ladj {tuple(ladj.shape)}"
        _fail(name, "square", f"it maps latents of shape (4, {dim}) to {shapes}")
    if not (torch.equal(x, again[0]) and torch.equal(ladj, again[1])):
        _fail(name, "deterministic", "two calls on the same latents gave different values", to_data)
    alone = torch.cat([torch.cat([x_i, ladj_i[:, None]], -1) for x_i, ladj_i in map(evaluated, z[:, None])])
    together = torch.cat([x, ladj[:, None]], -1)
    tolerance = 1e-8 if dtype == torch.float64 else 1e-4
    if not torch.allclose(alone, together, rtol=tolerance, atol=tolerance):
        reason = "a point's image changed with the other points of the batch"
        _fail(name, "independent rows", reason, to_data)
    point = z[:2].clone().requires_grad_(True)
    with torch.enable_grad():
        x_point, ladj_point = to_data(point)
        total = x_point.sum() + ladj_point.sum()
        grad = torch.autograd.grad(total, point, allow_unused=True)[0] if total.requires_grad else None
    if grad is None or not bool(torch.isfinite(grad).all()):
        _fail(name, "gradient", "the gradient of x and ladj with respect to z is missing or not finite")
    if dim <= 64:
        for row, value in zip(z[:2], ladj[:2]):
            jacobian = torch.autograd.functional.jacobian(lambda u: to_data(u[None])[0][0], row)
            expected = torch.linalg.slogdet(jacobian).logabsdet
            if not torch.allclose(value, expected, rtol=10 * tolerance, atol=10 * tolerance):
                reason = f"ladj {float(value):.6g} where log|det J| is {float(expected):.6g}"
                _fail(name, "exact log-determinant", reason, to_data)


def _fail(name: str, check: str, reason: str, to_data: object = None) -> None:
    layers = unsafe_layers(to_data) if to_data is not None else []
    cause = f"; caused by {' and '.join(layers)}" if layers else ""
    raise FlowMapError(f"the {name} fails the {check!r} check ({FLOW_MAP_CHECKS[check]}): {reason}{cause}")


def unsafe_layers(flow: object) -> list[str]:
    """The layers of a flow that can make it random or couple a batch's rows, each as
    ``"layer 'flows.2' (normflows.flows.residual.Residual, which ...)"``: its name in its flow's
    ``named_modules()``, its class and the reason (:data:`UNSAFE_LAYER_KINDS`).

    A layer is named when its class name holds one of :data:`UNSAFE_LAYER_KINDS` and it is in training
    mode, or of a kind that stays random or batch-dependent in ``eval()`` mode (normflows' ``Residual`` and
    ``BatchNorm``, FrEIA's ``IResNetLayer``; not torch's batch normalization and dropout, nor Pyro's
    ``BatchNorm``). ``flow`` is anything that holds the flow's modules (a module, a flow, a
    :class:`~pyro_nfmala.flows.latent.LatentFlow`'s bound ``to_data``, a callable's closure): they are
    found through attributes, containers, bound methods and closures; each is named from the largest
    module that holds it."""
    roots, seen, stack = [], set(), [flow]
    while stack:  # the outermost modules reachable from flow
        item = stack.pop()
        if id(item) in seen or item is None or isinstance(item, (str, bytes, int, float, bool, type, Tensor)):
            continue
        seen.add(id(item))
        if isinstance(item, _FreiaNetwork):
            stack.append(item.network)
        elif isinstance(item, torch.nn.Module):
            roots.append(item)
        elif isinstance(item, (list, tuple, set, frozenset, dict)):
            stack.extend(item.values() if isinstance(item, dict) else item)
        elif isinstance(item, types.MethodType):
            stack.append(item.__self__)
        elif isinstance(item, types.FunctionType):
            stack.extend(cell.cell_contents for cell in item.__closure__ or () if _cell_is_set(cell))
        elif hasattr(item, "__dict__") and not isinstance(item, types.ModuleType):
            stack.extend(vars(item).values())
    named: dict[int, tuple[str, torch.nn.Module]] = {}
    for root in sorted(roots, key=lambda module: -sum(1 for _ in module.modules())):
        for path, module in root.named_modules():
            named.setdefault(id(module), (path or type(module).__name__, module))
    found = []
    for path, module in named.values():
        kind = next((kind for kind in UNSAFE_LAYER_KINDS if kind in type(module).__name__), None)
        if kind is not None and (module.training or not isinstance(module, _SAFE_IN_EVAL_MODE)):
            where = f"{type(module).__module__}.{type(module).__qualname__}"
            found.append(f"layer {path!r} ({where}, which {UNSAFE_LAYER_KINDS[kind]})")
    return found


def _cell_is_set(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty closure cell
        return False
    return True
