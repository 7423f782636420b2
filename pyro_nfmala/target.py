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

import math

from collections.abc import Callable, Mapping
from typing import NamedTuple

import pyro
import torch

from pyro.infer.mcmc.util import initialize_model

from torch import Tensor

from .flow import LatentFlow


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
        beta = float(beta)
        if not math.isfinite(beta) or beta < 0:
            raise ValueError(f"beta must be a finite number >= 0, got {beta}")
        self.flow = flow
        self.beta = beta

    def log_density(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, ladj = self.flow.to_data(z)
        return self.flow.base_log_prob(z) - self.beta * ladj, x, ladj


class ModelDensity(NamedTuple):
    """A Pyro model's posterior on the flat unconstrained space :math:`x`."""

    layout: ParamLayout
    potential_fn: Callable[[Mapping[str, Tensor]], Tensor]
    transforms: dict
    initial_params: dict[str, Tensor]

    def log_prob(self, x: Tensor) -> Tensor:
        r""":math:`\log \pi_X(x) = -U(\mathrm{unpack}(x))`; a batch ``(n, d)`` is evaluated row by row."""
        if x.dim() == 1:
            return -self.potential_fn(self.layout.unpack(x))
        return torch.stack([self.log_prob(row) for row in x.reshape(-1, x.shape[-1])]).reshape(x.shape[:-1])


def discrete_latent_sites(model: Callable, *args, **kwargs) -> list[str]:
    """Names of the latent (unobserved) sample sites of ``model`` with a discrete support."""
    trace = pyro.poutine.trace(model).get_trace(*args, **kwargs)
    return [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
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
    init_params, potential_fn, transforms, _ = initialize_model(
        model, model_args=model_args, model_kwargs=model_kwargs, **initialize_kwargs
    )
    return ModelDensity(ParamLayout.from_params(init_params), potential_fn, transforms, init_params)
