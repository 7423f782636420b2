r"""A zuko normalizing flow seen from its latent space.

The sampler moves a latent state :math:`z` and reads the flow in the latent-to-data
direction,

.. math:: x = f(z), \qquad \mathrm{ladj}(z) = \log \left| \det J_f(z) \right|,
          \qquad J_f(z) = \frac{\partial f}{\partial z}(z).

zuko's ``flow().transform`` maps data to latent, so :math:`f` is ``transform.inv``.
:class:`LatentFlow` wraps a trained zuko flow and gives :math:`f` with its ``ladj``,
:math:`f^{-1}`, and the Jacobian-vector and vector-Jacobian products that the
matrix-free Jacobian preconditioner needs:

.. math:: J_f(z)^{-1} v = J_{f^{-1}}(x)\, v, \qquad J_f(z)^{-T} v = J_{f^{-1}}(x)^T v .

Vector-Jacobian products are one backward pass. Jacobian-vector products use the
double-backward identity :math:`J v = \nabla_u (u^T J) v`, which needs only plain
:mod:`torch.autograd` (affine, spline and coupling flows: MAF, NSF, NCSF, RealNVP, NICE), else
:func:`torch.func.jvp`; each is checked once on the flow by a dot-product test. Flows built on
custom autograd functions (NAF, UNAF, BPF, SOSPF, GF, CNF) support neither in some direction,
and fall back to ``d`` vector-Jacobian products there (exact, ``d`` times the cost).

Freezing: :class:`LatentFlow` keeps a private deep copy of the user's flow (a zuko module or
the :class:`~zuko.distributions.NormalizingFlow` it builds), in ``eval()`` mode with every
parameter detached from autograd. The user's flow is never modified, and training it further
does not change a sampler already built on it. A flow with a non-finite parameter is refused.
"""

from __future__ import annotations

__all__ = ["LatentFlow", "as_latent_flow", "jvp", "latent_to_data", "vjp"]

import copy
import functools
import types
import warnings

from collections.abc import Callable, Iterator

import torch
import torch.nn as nn

from torch import Tensor
from torch.distributions import Distribution, Transform
from torch.distributions.utils import _sum_rightmost
from zuko.distributions import NormalizingFlow
from zuko.lazy import LazyDistribution
from zuko.transforms import ComposedTransform, CouplingTransform

from .adapters import _cell_is_set, adapt_flow, check_flow_map, guide_sites, sequential_layers


def vjp(fn: Callable[[Tensor], Tensor], primal: Tensor, cotangent: Tensor) -> tuple[Tensor, Tensor]:
    r"""Returns :math:`y = \mathrm{fn}(p)` and the vector-Jacobian product :math:`J^T u`.

    ``fn`` must act independently on the rows of a batch, so that one backward pass of
    :math:`\sum_i u_i^T y_i` gives every row's product at once.

    Example:
        >>> A = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
        >>> y, v = vjp(lambda p: p @ A.T, torch.zeros(2), torch.tensor([1.0, 1.0]))
        >>> v
        tensor([1., 5.])
    """
    with torch.enable_grad():
        primal = primal.detach().requires_grad_(True)
        out = fn(primal)
        (grad,) = torch.autograd.grad(out, primal, cotangent, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(primal)
    return out.detach(), grad


def jvp(fn: Callable[[Tensor], Tensor], primal: Tensor, tangent: Tensor) -> tuple[Tensor, Tensor]:
    r"""Returns :math:`y = \mathrm{fn}(p)` and the Jacobian-vector product :math:`J v`.

    Uses the double-backward trick: :math:`u \mapsto J^T u` is linear in :math:`u`, so
    the gradient of :math:`v^T (J^T u)` with respect to :math:`u` is :math:`J v`. This needs
    only reverse-mode autograd, so it works through custom autograd functions.

    Example:
        >>> A = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
        >>> y, v = jvp(lambda p: p @ A.T, torch.zeros(2), torch.tensor([1.0, 1.0]))
        >>> v
        tensor([3., 3.])
    """
    with torch.enable_grad():
        primal = primal.detach().requires_grad_(True)
        out = fn(primal)
        dummy = torch.zeros_like(out, requires_grad=True)
        (grad,) = torch.autograd.grad(out, primal, dummy, create_graph=True, allow_unused=True)
        if grad is None:  # fn does not depend on its input
            return out.detach(), torch.zeros_like(out)
        if not grad.requires_grad:
            raise RuntimeError(
                "cannot differentiate through the backward pass of this function: its "
                "vector-Jacobian product does not depend on the cotangent (a custom autograd "
                "function with a once-differentiable backward?)"
            )
        (product,) = torch.autograd.grad(grad, dummy, tangent, allow_unused=True)
    if product is None:
        product = torch.zeros_like(out)
    return out.detach(), product


def _forward_jvp(fn: Callable[[Tensor], Tensor], primal: Tensor, tangent: Tensor) -> Tensor:
    return torch.func.jvp(fn, (primal.detach(),), (tangent,))[1]


def _dense_jvp(fn: Callable[[Tensor], Tensor], primal: Tensor, tangent: Tensor) -> Tensor:
    """J v from the rows of J, one vector-Jacobian product each (exact, ``d`` backward passes)."""
    with torch.enable_grad():
        primal = primal.detach().requires_grad_(True)
        out = fn(primal)
        product = torch.zeros_like(out)
        for k in range(out.shape[-1]):
            basis = torch.zeros_like(out)
            basis[..., k] = 1.0
            (row,) = torch.autograd.grad(out, primal, basis, retain_graph=True, allow_unused=True)
            if row is not None:
                product[..., k] = (row * tangent).sum(-1)
    return product


_JVP_METHODS = {
    "forward": _forward_jvp,
    "double_backward": lambda fn, primal, tangent: jvp(fn, primal, tangent)[1],
    "dense": _dense_jvp,
}


def _reachable(root: object) -> Iterator[object]:
    """Every tensor and module reachable from ``root`` through attributes, containers, partials,
    bound methods and closures (each once)."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, complex, bool, type)):
            continue
        seen.add(id(obj))
        if getattr(obj, "_nfmala_opaque", False):  # a user's plain function, used as given
            continue
        if isinstance(obj, Tensor):
            yield obj
            continue
        if isinstance(obj, nn.Module):
            yield obj
        if isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, functools.partial):
            stack.extend([obj.func, *obj.args, *obj.keywords.values()])
        elif isinstance(obj, types.MethodType):
            stack.extend([obj.__self__, obj.__func__])
        elif isinstance(obj, types.FunctionType):
            stack.extend(cell.cell_contents for cell in obj.__closure__ or () if _cell_is_set(cell))
        elif hasattr(obj, "__dict__") and not isinstance(obj, types.ModuleType):
            stack.extend(vars(obj).values())


def _freeze(obj: object) -> None:
    """Puts every module reachable from ``obj`` in ``eval()`` mode and detaches its parameters."""
    for item in _reachable(obj):
        if isinstance(item, nn.Module):
            item.eval().requires_grad_(False)
        elif item.is_leaf and item.requires_grad:
            item.requires_grad_(False)


def _frozen_copy(flow: nn.Module | NormalizingFlow) -> nn.Module | NormalizingFlow:
    """A deep copy of ``flow`` that shares no tensor with it, frozen (see :func:`_freeze`).

    A :class:`~zuko.distributions.NormalizingFlow` built by a module holds tensors computed from
    the module's parameters (graph non-leaves, which :func:`copy.deepcopy` refuses): they are
    copied detached.
    """
    originals = [item for item in _reachable(flow) if isinstance(item, Tensor)]
    memo = {id(t): t.detach().clone() for t in originals if not t.is_leaf}
    memo[id(memo)] = originals  # deepcopy's keep-alive list: the ids above stay valid
    try:
        frozen = copy.deepcopy(flow, memo)
    except Exception as error:  # noqa: BLE001 - whatever the flow holds that cannot be copied
        raise TypeError(
            f"could not make a private copy of the flow ({type(error).__name__}: {error}); pass the "
            "zuko.flows.Flow module itself"
        ) from error
    shared = {id(t) for t in originals} & {
        id(item) for item in _reachable(frozen) if isinstance(item, Tensor)
    }
    if shared:
        raise TypeError(
            "the flow's copy still shares tensors with the flow (they are held where a copy cannot "
            "reach, e.g. in a lambda's closure): pass the zuko.flows.Flow module itself"
        )
    _freeze(frozen)
    return frozen


def _check_finite_parameters(flow: nn.Module | NormalizingFlow) -> None:
    bad = sum(
        int(not torch.isfinite(item).all())
        for item in _reachable(flow)
        if isinstance(item, Tensor) and item.is_floating_point()
    )
    if bad:
        raise ValueError(
            f"the flow has {bad} parameter tensor(s) with NaN or infinite values: it cannot be "
            "sampled (was its fit diverging?)"
        )


def as_latent_flow(
    flow: object, base: Distribution | int | None = None, *, inverse: Callable | None = None
) -> LatentFlow:
    """``flow`` itself if it is a :class:`LatentFlow`, else a frozen :class:`LatentFlow` of it: a zuko flow
    as it is, any other (a Pyro guide or transform, a ``TransformedDistribution``, normflows, nflows,
    FrEIA, a callable; ``base`` where it has no base law of its own, ``inverse`` a callable's inverse) read by
    :func:`~pyro_nfmala.flows.adapters.adapt_flow` and checked by
    :func:`~pyro_nfmala.flows.adapters.check_flow_map`, which refuses what a sampler cannot use exactly.
    A Pyro guide's latent sites are kept as ``sites`` (their sizes, in its latent vector's order)."""
    if isinstance(flow, LatentFlow):
        return flow
    if isinstance(flow, (LazyDistribution, NormalizingFlow)):
        return LatentFlow(flow)
    latent = LatentFlow(adapt_flow(flow, base, inverse=inverse))
    if isinstance(flow, types.FunctionType):
        name = f"generator {flow.__qualname__}"
    else:
        name = f"flow ({type(flow).__name__} from {type(flow).__module__.split('.')[0]})"
    check_flow_map(latent.to_data, latent.dim, latent.dtype, name)
    slow = sequential_layers(flow)
    if slow and latent.dim > 1:
        warnings.warn(
            f"the {name} generates (latent to data) through autoregressive layers run backwards "
            f"({', '.join(sorted(set(slow)))}): exact, but each evaluation costs {latent.dim} network "
            "passes. A flow trained in the other direction (inverse autoregressive, or coupling layers) "
            "steps faster",
            UserWarning,
            stacklevel=2,
        )
    latent.sites = guide_sites(flow)
    return latent


def latent_to_data(transform: Transform, z: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`x = T^{-1}(z)` and :math:`\log|\det J_{T^{-1}}(z)|` for zuko's data-to-latent ``transform``
    :math:`T`, the same numbers as ``transform.inv.call_and_ladj(z)``, with each coupling layer's
    network evaluated once.

    zuko inverts a coupling layer :math:`y_a = x_a,\ y_b = g(x_b \mid x_a)` by evaluating the network
    that gives :math:`g` once for :math:`x_b = g^{-1}(y_b)` and once more for the log-determinant; both
    need only :math:`g` at :math:`x_a = y_a`, so it is built once here. That is half the network passes
    of every latent-to-data map through a coupling flow (RealNVP, NICE, the staged maps' flow stage),
    forward and backward. Other transforms use their own inverse. (Not yet what
    :meth:`LatentFlow.to_data` uses: see ``benchmarks/README.md``.)

    Example:
        >>> transform = zuko.flows.RealNVP(3, transforms=2)().transform
        >>> z = torch.randn(4, 3)
        >>> x, ladj = latent_to_data(transform, z)
        >>> x_zuko, ladj_zuko = transform.inv.call_and_ladj(z)
        >>> torch.allclose(x, x_zuko) and torch.allclose(ladj, ladj_zuko)
        True
    """
    if isinstance(transform, ComposedTransform):
        event_dim, total = transform.codomain.event_dim, 0
        for part in reversed(transform.transforms):
            z, ladj = latent_to_data(part, z)
            total = total + _sum_rightmost(ladj, event_dim - part.codomain.event_dim)
            event_dim += part.domain.event_dim - part.codomain.event_dim
        return z, total
    if isinstance(transform, CouplingTransform):
        y_a, y_b = transform.split(z)
        coupling = transform.meta(y_a)
        x_b = coupling.inv(y_b)
        return transform.merge(y_a, x_b, z.shape), -coupling.log_abs_det_jacobian(x_b, y_b)
    return transform.inv.call_and_ladj(z)


class LatentFlow:
    r"""A frozen, unconditional zuko flow read in the latent-to-data direction.

    Arguments:
        flow: An unconditional zuko flow: a :class:`zuko.flows.Flow` (any lazy distribution
            of zuko whose forward pass returns a :class:`zuko.distributions.NormalizingFlow`),
            or a :class:`zuko.distributions.NormalizingFlow` itself. The flow's event shape
            must be one-dimensional, ``(d,)``.

    Example:
        >>> flow = LatentFlow(zuko.flows.NSF(2, transforms=2))
        >>> z = torch.randn(5, 2)
        >>> x, ladj = flow.to_data(z)
        >>> torch.allclose(flow.to_latent(x), z, atol=1e-4)
        True
    """

    def __init__(self, flow: LazyDistribution | NormalizingFlow) -> None:
        if isinstance(flow, LazyDistribution):
            _check_finite_parameters(flow)
            self._module: nn.Module | None = _frozen_copy(flow)
            self._distribution: NormalizingFlow | None = None
        elif isinstance(flow, NormalizingFlow):
            _check_finite_parameters(flow)
            self._module = None
            self._distribution = _frozen_copy(flow)
        else:
            raise TypeError(
                "flow must be an unconditional zuko flow (a zuko.flows.Flow such as "
                "zuko.flows.NSF(features) or the zuko.distributions.NormalizingFlow it builds), "
                f"got {type(flow).__name__}"
            )

        try:
            distribution = self._build(check=True)
            shape = tuple(distribution.event_shape)
            probe = distribution.base.sample()
            x, ladj = distribution.transform.inv.call_and_ladj(probe.unsqueeze(0))
        except TypeError:
            raise
        except Exception as error:  # noqa: BLE001 - the user's flow, any failure
            raise ValueError(
                "could not build and evaluate the flow without a context: pass an unconditional "
                "flow (zuko flows built with context=0). The flow raised "
                f"{type(error).__name__}: {error}"
            ) from error
        if len(shape) != 1:
            raise ValueError(f"flow must have a one-dimensional event shape (d,), got {shape}")
        self.dim = shape[0]
        #: for a Pyro guide, its latent sites and their sizes in its latent vector's order; else ``None``
        self.sites: dict[str, int] | None = None
        self.dtype = probe.dtype
        self.device = probe.device
        if x.shape != (1, self.dim) or ladj.shape != (1,):
            raise ValueError(
                f"flow maps a latent of shape {(1, self.dim)} to data of shape {tuple(x.shape)} "
                f"with log-determinant of shape {tuple(ladj.shape)}; expected {(1, self.dim)} and (1,)"
            )

    def _build(self, check: bool = False) -> NormalizingFlow:
        if self._distribution is None:
            distribution = self._module()
            if check and not isinstance(distribution, NormalizingFlow):
                raise TypeError(
                    "flow() must return a zuko.distributions.NormalizingFlow, got "
                    f"{type(distribution).__name__}"
                )
            self._distribution = distribution
        return self._distribution

    @property
    def distribution(self) -> NormalizingFlow:
        """The frozen :class:`zuko.distributions.NormalizingFlow` (data to latent as ``transform``)."""
        return self._build()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_jvp_methods", None)
        if state["_module"] is not None:
            state["_distribution"] = None  # rebuilt from the module after unpickling
        return state

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LatentFlow:
        """Moves the frozen copy to a device and/or dtype (only for a flow given as a module)."""
        if self._module is None:
            raise TypeError("only a flow given as a zuko.flows.Flow module can be moved")
        self._module.to(device=device, dtype=dtype)
        self._distribution = None
        self.__dict__.pop("_jvp_methods", None)
        probe = self.distribution.base.sample()
        self.dtype, self.device = probe.dtype, probe.device
        return self

    def trainable_copy(self) -> nn.Module:
        """A deep copy of the flow module in ``train()`` mode with every parameter requiring grad, to fit
        further (the frozen copy is not touched); for flows given as a :class:`zuko.flows.Flow` module."""
        if self._module is None:
            raise TypeError(
                "only a flow given as a zuko.flows.Flow module can be trained further, not a "
                "NormalizingFlow instance"
            )
        module = copy.deepcopy(self._module)
        return module.train().requires_grad_(True)

    def base_log_prob(self, z: Tensor) -> Tensor:
        r"""The latent law's log density :math:`\log q_Z(z)`, shape ``z.shape[:-1]``."""
        return self.distribution.base.log_prob(z)

    def sample_base(self, shape: tuple[int, ...] = (), generator: torch.Generator | None = None) -> Tensor:
        r"""Draws :math:`z \sim q_Z` of shape ``shape + (d,)``, from ``generator`` or the global RNG."""
        base = self.distribution.base
        if generator is None:
            return base.sample(torch.Size(shape))
        normal = getattr(base, "base_dist", base)
        if isinstance(normal, torch.distributions.Normal):  # zuko's DiagNormal: loc + scale * noise
            noise = torch.randn(*shape, self.dim, generator=generator, dtype=self.dtype, device=self.device)
            return normal.loc + normal.scale * noise
        with torch.random.fork_rng(devices=[] if self.device.type == "cpu" else [self.device]):
            torch.manual_seed(int(torch.randint(2**62, (), generator=generator, device=generator.device)))
            return base.sample(torch.Size(shape))

    def to_data(self, z: Tensor) -> tuple[Tensor, Tensor]:
        r"""Returns :math:`x = f(z)` and :math:`\mathrm{ladj}(z) = \log|\det J_f(z)|`, differentiably."""
        return self.distribution.transform.inv.call_and_ladj(z)

    def to_latent(self, x: Tensor) -> Tensor:
        r"""Returns :math:`z = f^{-1}(x)`."""
        return self.distribution.transform(x)

    def to_latent_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r"""Returns :math:`z = f^{-1}(x)` and :math:`\log|\det J_{f^{-1}}(x)| = -\mathrm{ladj}(z)`."""
        return self.distribution.transform.call_and_ladj(x)

    def data_gradient(self, x: Tensor, latent_grad: Tensor) -> Tensor:
        r"""The gradient in data space of a latent log density read in data space.

        For a latent log density :math:`\log \pi` with gradient ``latent_grad`` :math:`= \nabla_z
        \log \pi(z)` at :math:`z = f^{-1}(x)`, returns :math:`\nabla_x \log p_X(x)` for
        :math:`\log p_X(x) = \log \pi(f^{-1}(x)) + \log|\det J_{f^{-1}}(x)|`, the density of
        :math:`f(z)` when :math:`z \sim \pi`:

        .. math:: J_{f^{-1}}(x)^T \nabla_z \log \pi(z) + \nabla_x \log|\det J_{f^{-1}}(x)|,

        one pass of :math:`f^{-1}` and one backward.
        """

        def latent_and_ladj(u: Tensor) -> Tensor:
            z, ladj = self.to_latent_and_ladj(u)
            return torch.cat([z, ladj.unsqueeze(-1)], -1)

        cotangent = torch.cat([latent_grad, torch.ones_like(latent_grad[..., :1])], -1)
        return vjp(latent_and_ladj, x, cotangent)[1]

    def jvp_to_data(self, z: Tensor, tangent: Tensor) -> Tensor:
        r"""Returns :math:`J_f(z)\, v`."""
        return self._jvp("to_data", z, tangent)

    def jvp_to_latent(self, x: Tensor, tangent: Tensor) -> Tensor:
        r"""Returns :math:`J_{f^{-1}}(x)\, v = J_f(z)^{-1} v` at :math:`z = f^{-1}(x)`."""
        return self._jvp("to_latent", x, tangent)

    def vjp_to_latent(self, x: Tensor, cotangent: Tensor) -> Tensor:
        r"""Returns :math:`J_{f^{-1}}(x)^T u = J_f(z)^{-T} u` at :math:`z = f^{-1}(x)`."""
        return vjp(self.to_latent, x, cotangent)[1]

    @property
    def jvp_methods(self) -> dict[str, str]:
        """How Jacobian-vector products are computed in each direction (chosen on first use).

        ``"double_backward"`` (plain autograd; measured faster than forward mode on zuko
        flows), ``"forward"`` (:func:`torch.func.jvp`), or ``"dense"`` (``d`` vector-Jacobian
        products, for flows whose custom autograd functions support neither, e.g. NAF, UNAF, BPF,
        SOSPF, GF, CNF).
        """
        return {name: self._jvp_method(name) for name in ("to_data", "to_latent")}

    def _map(self, direction: str) -> Callable[[Tensor], Tensor]:
        if direction == "to_data":
            return lambda z: self.to_data(z)[0]
        return self.to_latent

    def _jvp(self, direction: str, primal: Tensor, tangent: Tensor) -> Tensor:
        method = self._jvp_method(direction)
        return _JVP_METHODS[method](self._map(direction), primal, tangent)

    def _jvp_method(self, direction: str) -> str:
        """Picks the first JVP method that passes a dot-product test on this flow.

        Custom autograd functions can make double-backward silently wrong, so each method is
        checked against one-pass vector-Jacobian products: :math:`u^T (J v) = (J^T u)^T v`.
        """
        methods = self.__dict__.setdefault("_jvp_methods", {})
        if direction in methods:
            return methods[direction]
        fn = self._map(direction)
        generator = torch.Generator(device="cpu").manual_seed(0)

        def randn(n: int) -> Tensor:
            return torch.randn(n, self.dim, generator=generator, dtype=self.dtype).to(self.device)

        with torch.no_grad():
            primal = randn(2)
            if direction == "to_latent":
                primal = self.to_data(primal)[0]
        u, v = randn(2), randn(2)
        _, jtu = vjp(fn, primal, u)
        expected = (jtu * v).sum(-1)
        scale = jtu.norm(dim=-1) * v.norm(dim=-1)
        tolerance = 1e-3 if self.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-6
        for method in ("double_backward", "forward"):
            try:
                jv = _JVP_METHODS[method](fn, primal, v)
            except Exception:  # noqa: BLE001 - unsupported by this flow, try the next method
                continue
            if torch.all((u * jv).sum(-1).sub(expected).abs() <= tolerance * scale + 1e-12):
                methods[direction] = method
                break
        else:
            methods[direction] = "dense"
            if self.dim > 16:
                warnings.warn(
                    f"this flow supports neither forward-mode nor double-backward Jacobian-vector "
                    f"products in the {direction} direction (custom autograd functions): the "
                    f"jacobian preconditioner falls back to d = {self.dim} backward passes per "
                    "product. Prefer an affine, spline or coupling flow (MAF, NSF, RealNVP).",
                    stacklevel=3,
                )
        return methods[direction]

    def jacobian_to_data(self, z: Tensor) -> Tensor:
        r"""Dense :math:`J_f(z)`, shape ``z.shape + (d,)``: the reference for tests and benchmarks.

        One forward pass on the batch, then ``d`` backward passes, one per output coordinate
        :math:`i`: the gradient of :math:`\sum_n x_{n,i}` gives row :math:`i` of every chain's
        Jacobian at once, because the flow acts on each row of the batch independently.
        Costs :math:`O(d)` flow passes and :math:`O(n d^2)` memory.
        """
        rows = z.detach().reshape(-1, self.dim).requires_grad_(True)
        with torch.enable_grad():
            x = self.to_data(rows)[0]
            jac = torch.stack(
                [
                    torch.autograd.grad(x[:, i].sum(), rows, retain_graph=i + 1 < self.dim)[0]
                    for i in range(self.dim)
                ],
                dim=-2,
            )
        return jac.reshape(*z.shape, self.dim)

    def __repr__(self) -> str:
        return f"LatentFlow(dim={self.dim}, dtype={self.dtype}, device={self.device})"
