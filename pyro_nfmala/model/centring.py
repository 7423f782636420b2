r"""Non-centring a Pyro model's hierarchical sites, where that brings its posterior near a Gaussian.

A latent site of a location-scale family whose location or scale depends on other latent sites,

.. math:: \theta_j \sim N(\mu, \tau), \qquad \text{sampled as} \qquad
          \tilde\theta_j \sim N(0, 1), \quad \theta_j = \mu + \tau\, \tilde\theta_j ,

is a funnel in the model's own (centred) coordinates when the data say little about each
:math:`\theta_j`: the scale of :math:`\theta` shrinks with :math:`\tau`, and neither a Gaussian nor
a chain that adapts one step size reaches the neck. In the non-centred coordinates
:math:`(\mu, \tau, \tilde\theta)` the same posterior is near a Gaussian. Pyro's
:class:`~pyro.infer.reparam.LocScaleReparam` (``centered=0``) rewrites the model so; the
bijection :math:`(\mu, \tau, \tilde\theta) \mapsto (\mu, \tau, \theta)` is exact, so chains that
sample the non-centred posterior, mapped back draw by draw, sample the model's own posterior
(:meth:`NonCentring.to_original`): the output has the model's sites, unchanged.

The same holds for a transformed law whose transforms depend on other latent sites
(:class:`~pyro.distributions.TransformedDistribution`, Pyro's :class:`~pyro.infer.reparam.TransformReparam`):
a Markov prior written as standard innovations pushed through its recursion (an AR(1) state,
:class:`~pyro_nfmala.examples.inference_gym.AR1`; a random walk) is sampled by its innovations, which a
state-space posterior with unknown scales leaves near independent; a log-normal's base ``Normal(mu, tau)``
is non-centred in turn.

Which coordinates suit a model depends on its data (with much data per group, the centred ones do). The
samplers fit the Gaussian stages of the staged map in both and sample in the one whose map passes the flow
check better (:func:`~pyro_nfmala.fit.staged.fit_in_better_coordinates`). The variationally inferred
parameterization (Gorinova, Moore & Hoffman, 2020), and nutpie's ``auto_reparam`` after it, learn a partial
centring per element instead; the choice here is all or nothing, over every hierarchical site at once.

Example:
    >>> def model(sigma, y):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    ...     tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    ...     with pyro.plate("schools", len(y)):
    ...         theta = pyro.sample("theta", dist.Normal(mu, tau))
    ...         pyro.sample("y", dist.Normal(theta, sigma), obs=y)
    >>> hierarchical_sites(model, (torch.ones(3), torch.zeros(3)), {})
    ['theta']
"""

from __future__ import annotations

__all__ = ["NonCentring", "hierarchical_sites", "non_centred"]

from collections.abc import Callable, Mapping

import torch

from pyro import poutine
from pyro.distributions import constraints
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.infer.inspect import get_dependencies
from pyro.infer.reparam import LocScaleReparam, TransformReparam
from pyro.infer.reparam.reparam import Reparam
from torch import Tensor

from .density import ModelDensity, ParamLayout, default_init, model_density


def _reparam_of(fn) -> Reparam | None:
    """The reparameterizer that samples a site of law ``fn`` in coordinates free of its parameters, or
    ``None``: Pyro's :class:`~pyro.infer.reparam.TransformReparam` for a transformed law (its base
    law's draw, pushed through the transforms), :class:`~pyro.infer.reparam.LocScaleReparam`
    (``centered=0``) for a location-scale family on the real line."""
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    if isinstance(fn, torch.distributions.TransformedDistribution):
        return TransformReparam()
    while isinstance(getattr(fn, "base_dist", None), torch.distributions.Distribution):
        fn = fn.base_dist  # masks and expansions
        if isinstance(fn, torch.distributions.TransformedDistribution):
            return None  # Pyro's TransformReparam unwraps Independent only
    if {"loc", "scale"} <= set(getattr(fn, "arg_constraints", {})) and fn.support is constraints.real:
        return LocScaleReparam(centered=0.0)
    return None


def hierarchical_sites(
    model: Callable,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    init_strategy: Callable | None = None,
) -> list[str]:
    """The latent sites of ``model`` that :func:`non_centred` rewrites, in the order the model runs: a
    location-scale family (``loc`` and ``scale`` among its parameters) on the real line, or a
    transformed law (:class:`~pyro.distributions.TransformedDistribution`: a Markov prior written as
    noise pushed through a recursion, a log-normal), whose parameters depend on another latent site
    (Pyro's :func:`~pyro.infer.inspect.get_dependencies`). A transformed site's base site
    (``{site}_base``) follows it where the base is itself a location-scale family whose parameters
    depend on the latent values (``LogNormal(mu, tau)``: its base is ``Normal(mu, tau)``).

    The model runs with its latent values drawn by ``init_strategy`` (by default
    :func:`~pyro_nfmala.model.density.default_init`, which also starts improper sites)."""
    model_kwargs = model_kwargs or {}
    initialized = InitMessenger(init_strategy or default_init)(model)
    with poutine.block():
        dependencies = get_dependencies(initialized, model_args, model_kwargs)["prior_dependencies"]
        trace = poutine.trace(initialized).get_trace(*model_args, **model_kwargs)
    latent = {
        name: node["value"].detach().requires_grad_(node["value"].is_floating_point())
        for name, node in trace.nodes.items()
        if node["type"] == "sample" and not node["is_observed"]
    }
    graded = None  # the model's laws at latent values that require a gradient, run for transformed sites only
    sites = []
    for name in trace.nodes:
        if name not in latent or not set(dependencies.get(name, {})) & (set(latent) - {name}):
            continue
        reparam = _reparam_of(trace.nodes[name]["fn"])
        if reparam is not None:
            sites.append(name)
        if isinstance(reparam, TransformReparam):
            if graded is None:
                with poutine.block():
                    conditioned = poutine.condition(model, data=latent)
                    graded = poutine.trace(conditioned).get_trace(*model_args, **model_kwargs)
            if _has_latent_loc_scale(graded.nodes[name]["fn"]):
                sites.append(f"{name}_base")
    return sites


def _has_latent_loc_scale(fn) -> bool:
    """Whether the base law of the transformed law ``fn`` is a location-scale family whose parameters
    are functions of the latent values (they require a gradient when the values do)."""
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    base = fn.base_dist
    while isinstance(base, torch.distributions.Independent):
        base = base.base_dist
    if not isinstance(_reparam_of(base), LocScaleReparam):
        return False
    return bool(base.loc.requires_grad or base.scale.requires_grad)


def non_centred(model: Callable, sites: list[str]) -> Callable:
    """``model`` with each of ``sites`` sampled in its parameter-free coordinates: a location-scale site
    by Pyro's ``LocScaleReparam(centered=0)`` (its latent site becomes ``{site}_decentered``), a
    transformed one by ``TransformReparam`` (``{site}_base``); ``site`` is then a deterministic function
    of it."""
    chosen = set(sites)

    def config(message) -> Reparam | None:
        return _reparam_of(message["fn"]) if message["name"] in chosen else None

    return poutine.reparam(model, config=config)


class NonCentring:
    """The non-centred model's density, and the map from its points back to the model's own.

    Arguments:
        model: The Pyro model.
        sites: Its hierarchical sites (:func:`hierarchical_sites`).
        model_args, model_kwargs: The model's arguments.
        original: The model's own density (its layout and transforms are those of the output).
        density_options: Keyword arguments of :func:`~pyro_nfmala.model.density.model_density` for the
            non-centred model (``max_plate_nesting``, ``init_strategy``, ...).
    """

    def __init__(
        self,
        model: Callable,
        sites: list[str],
        model_args: tuple,
        model_kwargs: dict | None,
        original: ModelDensity,
        **density_options,
    ) -> None:
        self.sites = list(sites)
        self.model = non_centred(model, self.sites)
        self.model_args, self.model_kwargs = tuple(model_args), dict(model_kwargs or {})
        self.density = model_density(self.model, self.model_args, self.model_kwargs, **density_options)
        self.original_layout: ParamLayout = original.layout
        self.original_transforms: Mapping = original.transforms
        if self.density.layout.dim != self.original_layout.dim:
            raise ValueError(
                f"the non-centred model has {self.density.layout.dim} unconstrained dimensions where the "
                f"model has {self.original_layout.dim}"
            )

    def to_original(self, x: Tensor) -> Tensor:
        """The model's own unconstrained points ``(..., d)`` of the non-centred points ``x`` ``(..., d)``:
        runs of the non-centred model at ``x``, reading the model's sites (exact, no approximation); one
        run for the whole batch where the model vectorizes, else one per point."""
        flat = x.detach().reshape(-1, x.shape[-1])
        if self.density.particles is not None and flat.shape[0] > 1:
            values = self.density.particles.site_values(flat, list(self.original_layout.shapes))
            if all(v.numel() == len(flat) * self.original_layout.sizes[name] for name, v in values.items()):
                return self._pack(values, (len(flat),)).reshape(x.shape)
        return torch.stack([self._point_to_original(point) for point in flat]).reshape(x.shape)

    def _point_to_original(self, x: Tensor) -> Tensor:
        values = self.density.constrain(x)
        with poutine.block(), torch.no_grad():
            trace = poutine.trace(poutine.condition(self.model, data=values)).get_trace(
                *self.model_args, **self.model_kwargs
            )
        return self._pack({name: trace.nodes[name]["value"] for name in self.original_layout.shapes}, ())

    def _pack(self, values: Mapping[str, Tensor], batch: tuple) -> Tensor:
        """The model's sites' values ``{site: batch + shape}`` (particles first) as unconstrained points."""
        params = {}
        for name, shape in self.original_layout.shapes.items():
            value = values[name].reshape(batch + tuple(shape))
            transform = self.original_transforms.get(name)
            params[name] = transform(value) if transform is not None else value
        return self.original_layout.pack(params)
