r"""Latent targets: log densities on the flow's latent space (DESIGN.md section 3).

T1, the posterior pull-back (exact): for an unnormalized log density
:math:`\log \pi_X` on data space,

.. math:: \log \pi(z) = \log \pi_X(f(z)) + \mathrm{ladj}(z) .

If :math:`z \sim \pi` then :math:`f(z) \sim \pi_X`, whatever the flow :math:`f`.

T2, the tempered flow measure (the paper's generative sampling):

.. math:: \log \pi_\beta(z) = \log q_Z(z) - \beta\, \mathrm{ladj}(z) .

Both return, for a batch of latents ``z`` of shape ``(..., d)``, the log density (shape
``(...)``), the data point :math:`x = f(z)` and :math:`\mathrm{ladj}(z)`, all
differentiable in ``z``.

This module also packs Pyro's ``params`` dict (site name to unconstrained tensor) into the
flat vector :math:`x` the flow lives on, and back: :class:`ParamLayout`.
"""

from __future__ import annotations

__all__ = ["LatentTarget", "ModelDensity", "ParamLayout", "PosteriorPullback", "TemperedFlow", "model_density"]

import logging
import math

from collections.abc import Callable, Mapping

import pyro
import torch

from pyro.infer.autoguide.initialization import InitMessenger, init_to_sample, init_to_uniform
from pyro.infer.mcmc.util import initialize_model
from pyro.poutine.util import site_is_subsample

from torch import Tensor

from .flow import LatentFlow

logger = logging.getLogger(__name__)


class ParamLayout:
    r"""The flat layout of Pyro's unconstrained ``params``: :math:`x = (x_{s_1}, \dots, x_{s_k})`.

    Sites are laid out in the order of ``shapes`` (for a Pyro model: the order in which its
    latent sample sites run), each flattened in row-major order.

    Arguments:
        shapes: Mapping from site name to the shape of its unconstrained value.

    Example:
        >>> layout = ParamLayout({"loc": torch.Size([2]), "scale": torch.Size([])})
        >>> layout.dim
        3
        >>> params = layout.unpack(torch.arange(3.0))
        >>> params["loc"], params["scale"]
        (tensor([0., 1.]), tensor(2.))
        >>> layout.pack(params)
        tensor([0., 1., 2.])
    """

    def __init__(self, shapes: Mapping[str, torch.Size]) -> None:
        self.shapes = {name: torch.Size(shape) for name, shape in shapes.items()}
        self.sizes = {name: shape.numel() for name, shape in self.shapes.items()}
        self.dim = sum(self.sizes.values())

    @classmethod
    def from_params(cls, params: Mapping[str, Tensor]) -> ParamLayout:
        """The layout of a ``params`` dict of single (unbatched) values."""
        return cls({name: value.shape for name, value in params.items()})

    def pack(self, params: Mapping[str, Tensor]) -> Tensor:
        """Flattens ``{site: (..., *shape)}`` into ``(..., d)``."""
        missing = set(self.shapes) - set(params)
        if missing:
            raise KeyError(f"params lack the sites {sorted(missing)}")
        pieces = []
        for name, shape in self.shapes.items():
            value = params[name]
            batch = value.shape[: value.dim() - len(shape)]
            pieces.append(value.reshape(batch + (self.sizes[name],)))
        return torch.cat(pieces, dim=-1)

    def unpack(self, x: Tensor) -> dict[str, Tensor]:
        """Splits ``(..., d)`` into ``{site: (..., *shape)}``."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected a last dimension of {self.dim}, got shape {tuple(x.shape)}")
        pieces = torch.split(x, list(self.sizes.values()), dim=-1)
        return {
            name: piece.reshape(x.shape[:-1] + shape)
            for (name, shape), piece in zip(self.shapes.items(), pieces)
        }

    def __repr__(self) -> str:
        sites = ", ".join(f"{name}: {tuple(shape)}" for name, shape in self.shapes.items())
        return f"ParamLayout(dim={self.dim}, {{{sites}}})"


def check_flow_dim(flow: LatentFlow, layout: ParamLayout) -> None:
    """Raises a ``ValueError`` naming both dimensions when ``flow`` does not fit ``layout``."""
    if flow.dim != layout.dim:
        raise ValueError(
            f"the flow has dimension {flow.dim} but the model's unconstrained parameters "
            f"have dimension {layout.dim} ({layout}): fit the flow on this model's layout"
        )


class LatentTarget:
    r"""A log density :math:`\log \pi(z)` on the latent space of ``flow``."""

    flow: LatentFlow

    def log_density(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r"""Returns :math:`(\log \pi(z), x = f(z), \mathrm{ladj}(z))`, differentiable in ``z``."""
        raise NotImplementedError


class PosteriorPullback(LatentTarget):
    r"""T1: :math:`\log \pi(z) = \log \pi_X(f(z)) + \mathrm{ladj}(z)`, exact for any flow.

    Arguments:
        flow: The flow :math:`f`.
        log_prob: The unnormalized target log density :math:`\log \pi_X(x)` of a flat
            ``x`` of shape ``(..., d)``, returning shape ``(...)``. For a Pyro model, minus
            its potential energy: ``lambda x: -potential_fn(layout.unpack(x))``.

    Example:
        >>> flow = LatentFlow(zuko.flows.NSF(2, transforms=2))
        >>> target = PosteriorPullback(flow, lambda x: -0.5 * (x**2).sum(-1))
        >>> log_pi, x, ladj = target.log_density(torch.zeros(4, 2))
        >>> log_pi.shape
        torch.Size([4])
    """

    def __init__(self, flow: LatentFlow, log_prob: Callable[[Tensor], Tensor]) -> None:
        self.flow = flow
        self.log_prob = log_prob

    def log_density(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, ladj = self.flow.to_data(z)
        return self.log_prob(x) + ladj, x, ladj


def check_beta(beta: float) -> float:
    """T2's inverse temperature as a float, or a ``ValueError`` unless it is finite and >= 0."""
    beta = float(beta)
    if not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")
    return beta


class TemperedFlow(LatentTarget):
    r"""T2: :math:`\log \pi_\beta(z) = \log q_Z(z) - \beta\, \mathrm{ladj}(z)`.

    :math:`\beta = 0` is the flow's own latent law (naive sampling); :math:`\beta = 1` reads
    the flow's likelihood at :math:`f(z)`, which is small where the flow stretches space, so
    chains leave the bridges between modes. The push-forward through :math:`f` has density
    proportional to :math:`q_X(x)\, |\det J_f(f^{-1}(x))|^{-\beta}`: it is not :math:`q_X`.

    Example:
        >>> flow = LatentFlow(zuko.flows.NSF(2, transforms=2))
        >>> target = TemperedFlow(flow, beta=1.0)
        >>> target.log_density(torch.zeros(4, 2))[0].shape
        torch.Size([4])
    """

    def __init__(self, flow: LatentFlow, beta: float = 1.0) -> None:
        self.flow = flow
        self.beta = check_beta(beta)

    def log_density(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, ladj = self.flow.to_data(z)
        return self.flow.base_log_prob(z) - self.beta * ladj, x, ladj


class ModelDensity:
    r"""A Pyro model's posterior on the flat unconstrained space :math:`x`: :math:`\log \pi_X(x) = -U(x)`.

    Attributes:
        layout: The flat layout of the unconstrained sites.
        potential_fn: Pyro's potential energy of a ``params`` dict.
        transforms: Pyro's transforms from constrained to unconstrained space, by site.
        initial_params: One valid point, as Pyro's ``initialize_model`` found it.
        vectorized: Whether a batch of points is evaluated in one vectorized model run
            (an outer particle plate) rather than point by point.
    """

    def __init__(self, layout, potential_fn, transforms, initial_params, batched_log_prob=None) -> None:
        self.layout = layout
        self.potential_fn = potential_fn
        self.transforms = transforms
        self.initial_params = initial_params
        self._batched_log_prob = batched_log_prob

    @property
    def vectorized(self) -> bool:
        return self._batched_log_prob is not None

    def log_prob(self, x: Tensor) -> Tensor:
        r""":math:`-U(\mathrm{unpack}(x))` for ``x`` of shape ``(d,)`` or ``(..., d)``."""
        if x.dim() == 1:
            return -self.potential_fn(self.layout.unpack(x))
        flat = x.reshape(-1, x.shape[-1])
        if self._batched_log_prob is not None:
            values = self._batched_log_prob(flat)
        else:
            values = torch.stack([-self.potential_fn(self.layout.unpack(row)) for row in flat])
        return values.reshape(x.shape[:-1])


def _vectorized_log_prob(model, model_args, model_kwargs, layout, transforms, trace) -> Callable[[Tensor], Tensor]:
    """The log joint of ``n`` points in one run of the model inside an outer particle plate."""
    nesting = max([-frame.dim for site in trace.nodes.values() if site["type"] == "sample" for frame in site["cond_indep_stack"] if frame.vectorized] + [0])
    batch_dims = {name: len(trace.nodes[name]["fn"].batch_shape) for name in layout.shapes}

    def log_prob(x: Tensor) -> Tensor:
        n = x.shape[0]
        constrained, log_det = {}, torch.zeros(n, dtype=x.dtype, device=x.device)
        for name, value in layout.unpack(x).items():
            value = value.reshape((n,) + (1,) * (nesting - batch_dims[name]) + layout.shapes[name])
            if name in transforms:
                inverse = transforms[name].inv
                constrained[name] = inverse(value)
                log_det = log_det + inverse.log_abs_det_jacobian(value, constrained[name]).reshape(n, -1).sum(-1)
            else:
                constrained[name] = value
        with pyro.plate("_nfmala_particles", n, dim=-(nesting + 1)):
            particle_trace = pyro.poutine.trace(pyro.poutine.condition(model, constrained)).get_trace(*model_args, **model_kwargs)
        particle_trace.compute_log_prob()
        total = log_det
        for site in particle_trace.nodes.values():
            if site["type"] == "sample" and not site_is_subsample(site):
                site_log_prob = site["log_prob"]
                site_log_prob = site_log_prob.reshape((1,) * (nesting + 1 - site_log_prob.dim()) + site_log_prob.shape)
                site_log_prob = site_log_prob.movedim(-(nesting + 1), 0)  # particles first (or 1: shared by all)
                total = total + site_log_prob.reshape(site_log_prob.shape[0], -1).sum(-1)
        return total

    return log_prob


def _uniform_or_sample(site):
    try:
        return init_to_uniform(site)
    except NotImplementedError:  # discrete sites have no bijection to the reals
        return init_to_sample(site)


def _trace(model, model_args, model_kwargs):
    """One run of the model, with latent values drawn as Pyro's HMC does at initialization."""
    return pyro.poutine.trace(InitMessenger(_uniform_or_sample)(model)).get_trace(*model_args, **model_kwargs)


def _check_static_support(model, model_args, model_kwargs, shapes: Mapping[str, torch.Size], tries: int = 10) -> None:
    """Raises if the model's latent sites (their names or shapes) change between runs."""
    expected = {name: tuple(shape) for name, shape in shapes.items()}
    for _ in range(tries):
        trace = _trace(model, model_args, model_kwargs)
        latent = {
            name: tuple(site["value"].shape)
            for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
        }
        if latent != expected:
            raise ValueError(
                "the model's latent sites change between runs (dynamic support): "
                f"{expected} in one run, {latent} in another. NFMALA needs a fixed set of "
                "continuous latent sites of fixed shapes, hence a fixed unconstrained dimension."
            )


def discrete_latent_sites(model: Callable, *args, **kwargs) -> list[str]:
    """Names of the latent (unobserved) sample sites of ``model`` with a discrete support."""
    trace = _trace(model, args, kwargs)
    return [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site_is_subsample(site)
        and getattr(site["fn"], "support", None) is not None
        and site["fn"].support.is_discrete
    ]


def model_density(
    model: Callable,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    **initialize_kwargs,
) -> ModelDensity:
    """The posterior of a Pyro model on its flat unconstrained parameters.

    Runs :func:`pyro.infer.mcmc.util.initialize_model` (``initialize_kwargs`` are passed to it:
    ``transforms``, ``max_plate_nesting``, ``jit_compile``, ``init_strategy``, ...). Sites are
    laid out in the order the model's latent sites run. Raises ``ValueError`` for a model with
    discrete latent sites.

    Example:
        >>> def model():
        ...     pyro.sample("scale", dist.HalfNormal(1.0))
        ...     pyro.sample("loc", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        >>> density = model_density(model)
        >>> density.layout
        ParamLayout(dim=3, {scale: (), loc: (2,)})
    """
    model_kwargs = model_kwargs or {}
    discrete = discrete_latent_sites(model, *model_args, **model_kwargs)
    if discrete:
        raise ValueError(
            f"NFMALA samples continuous latent sites only; the model has discrete latent sites "
            f"{discrete}. Marginalize them out (e.g. with a mixture distribution) or observe them."
        )
    initialize_kwargs = {key: value for key, value in initialize_kwargs.items() if value is not None}
    init_params, potential_fn, transforms, trace = initialize_model(
        model, model_args=model_args, model_kwargs=model_kwargs, **initialize_kwargs
    )
    layout = ParamLayout.from_params(init_params)
    constrained_shapes = {name: trace.nodes[name]["value"].shape for name in layout.shapes}
    _check_static_support(model, model_args, model_kwargs, constrained_shapes)
    density = ModelDensity(layout, potential_fn, transforms, init_params)
    try:
        batched = _vectorized_log_prob(model, model_args, model_kwargs, layout, transforms, trace)
        x = layout.pack(init_params).detach()
        points = torch.stack([x, x + 0.1, x - 0.1])
        expected = density.log_prob(points)
        got = batched(points)
        if got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
            density._batched_log_prob = batched
        else:
            logger.info("vectorized model evaluation disagrees with Pyro's potential: evaluating point by point")
    except Exception as error:  # noqa: BLE001 - any model that does not vectorize
        logger.info("model does not vectorize over particles (%s): evaluating point by point", error)
    return density
