r"""The Pyro-model adapter: a model's posterior as a log density on one flat vector.

A Pyro model's latent sites, in their unconstrained spaces, are packed into one vector

.. math:: x = (x_{s_1}, \dots, x_{s_k}) \in \mathbb{R}^d,

sites in the order the model runs them, each flattened in row-major order
(:class:`ParamLayout`). On that space the posterior is :math:`\log \pi_X(x) = -U(x)`, with
:math:`U` Pyro's potential energy (constraint Jacobians included): :class:`ModelDensity`. The
flow of a sampler lives on this space.

Example:
    >>> def model():
    ...     pyro.sample("scale", dist.HalfNormal(1.0))
    ...     pyro.sample("loc", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    >>> density = model_density(model)
    >>> density.layout
    ParamLayout(dim=3, {scale: (), loc: (2,)})
    >>> density.log_prob(torch.zeros(5, 3)).shape
    torch.Size([5])
"""

from __future__ import annotations

__all__ = [
    "ModelDensity",
    "ParamLayout",
    "check_flow_dim",
    "default_init",
    "discrete_latent_sites",
    "model_density",
]

import logging

from collections.abc import Callable, Mapping
from functools import partial

import numpy as np
import pyro
import torch

from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide.initialization import InitMessenger, init_to_sample, init_to_uniform
from pyro.infer.mcmc.util import _find_valid_initial_params, initialize_model
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from ..distributed.sharded import ShardedData
from ..engine.errors import is_out_of_memory
from ..engine.traced import TracedLogProb
from .sharded import ShardedLogDensity, shard_term, without_prior

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
        return cls({name: torch.as_tensor(value).shape for name, value in params.items()})

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
        if not pieces:
            return torch.zeros(0)
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

    def check_point(self, params: Mapping[str, Tensor], what: str = "initial_params") -> None:
        """Raises a ``ValueError`` unless ``params`` holds exactly one value of each site's shape."""
        missing, extra = set(self.shapes) - set(params), set(params) - set(self.shapes)
        if missing or extra:
            raise ValueError(
                f"{what} must have the sites {sorted(self.shapes)}; missing {sorted(missing)}, "
                f"unknown {sorted(extra)}"
            )
        for name, shape in self.shapes.items():
            got = tuple(torch.as_tensor(params[name]).shape)
            if got != tuple(shape):
                raise ValueError(
                    f"{what}[{name!r}] must have the site's unconstrained shape {tuple(shape)}, got {got} "
                    "(one value per chain: no batch dimension)"
                )

    def __repr__(self) -> str:
        sites = ", ".join(f"{name}: {tuple(shape)}" for name, shape in self.shapes.items())
        return f"ParamLayout(dim={self.dim}, {{{sites}}})"


def check_flow_dim(flow, layout: ParamLayout) -> None:
    """Raises a ``ValueError`` naming both dimensions when ``flow`` does not fit ``layout``, or both site
    lists when a guide's latent sites (``flow.sites``) are not the layout's, in its order."""
    if flow.dim != layout.dim:
        raise ValueError(
            f"the flow has dimension {flow.dim} but the model's unconstrained parameters "
            f"have dimension {layout.dim} ({layout}): fit the flow on this model's layout"
        )
    sites = getattr(flow, "sites", None)
    if sites is not None and list(sites.items()) != list(layout.sizes.items()):
        raise ValueError(
            f"the guide's latent sites {sites} (name: size, in its order) are not the model's "
            f"{dict(layout.sizes)}: pass a guide trained on this model, with the same arguments"
        )


class ModelDensity:
    r"""A posterior on the flat unconstrained space: :math:`\log \pi_X(x) = -U(\mathrm{unpack}(x))`.

    Built by :func:`model_density` for a Pyro model, or by :meth:`from_potential` for a
    ``potential_fn``.

    Attributes:
        layout: The flat layout of the unconstrained sites.
        potential_fn: Pyro's potential energy of a ``params`` dict.
        transforms: Pyro's transforms from constrained to unconstrained space, by site.
        initial_params: One valid point (for a model: where Pyro's ``initialize_model`` found it).
        initializer: For a model, ``initializer(num_chains=n)`` gives ``n`` more valid points by its init
            strategy (:meth:`initial_points`); ``None`` for a ``potential_fn``.
        vectorized: Whether a batch of points is evaluated in one vectorized model run (an outer particle
            plate, or the model vmapped over the points) rather than point by point.
        traced: The batch evaluation traced per batch shape
            (:class:`~pyro_nfmala.engine.traced.TracedLogProb`, with Pyro's validation off, as Pyro's MCMC
            evaluates a potential), or ``None`` where ``trace_density=False``: every batch then runs the
            model eagerly.
    """

    def __init__(
        self,
        layout,
        potential_fn,
        transforms,
        initial_params,
        particles=None,
        trace_density=True,
        initializer=None,
    ) -> None:
        self.layout = layout
        self.potential_fn = potential_fn
        self.transforms = dict(transforms or {})
        self.initial_params = initial_params
        self.initializer = initializer
        #: The model run once for a batch of points (in a particle plate, or vmapped), ``None`` where it
        #: does not batch.
        self.particles: _ParticleModel | _VmappedModel | None = particles
        #: Why the model is evaluated point by point (each way of batching tried, with its error).
        self.unbatched_reasons: list[str] = []
        self.traced = TracedLogProb(self._unvalidated_log_prob) if trace_density else None
        #: With the data split over processes (:class:`~pyro_nfmala.distributed.sharded.ShardedData`), the log
        #: density summed over them (:class:`~pyro_nfmala.model.sharded.ShardedLogDensity`), which
        #: :meth:`log_prob` gives; ``None`` in one process.
        self.summed: ShardedLogDensity | None = None

    @classmethod
    def from_potential(
        cls,
        potential_fn: Callable,
        initial_params: Mapping[str, Tensor],
        transforms: Mapping | None = None,
        trace_density: bool = True,
    ) -> ModelDensity:
        """The density :math:`-U` of a Pyro-style ``potential_fn`` on the layout of ``initial_params``, with
        Pyro's ``transforms`` (constrained to unconstrained, by site) where the user gave them."""
        params = {name: torch.as_tensor(value) for name, value in initial_params.items()}
        return cls(
            ParamLayout.from_params(params), potential_fn, transforms, params, trace_density=trace_density
        )

    @property
    def vectorized(self) -> bool:
        return self.particles is not None

    def shard(self, shards: ShardedData | None) -> ModelDensity:
        """Sums :meth:`log_prob` over ``shards``' processes from here on (each rank's term
        :func:`~pyro_nfmala.model.sharded.shard_term`); returns this density. ``None`` or one
        process: unchanged."""
        if shards is not None and shards.active:
            self.summed = ShardedLogDensity(shard_term(self, shards.rank), shards)
        return self

    def initial_points(self, num: int) -> Tensor:
        """``num`` points ``(num, d)`` to start chains at: for a model, draws of its init strategy where the
        log density and its gradient are finite (Pyro's search for valid initial parameters, as for HMC:
        up to 100 tries a point), one each; for a ``potential_fn``, its initial parameters, repeated."""
        if self.initializer is None:
            return self.layout.pack(self.initial_params).detach().expand(num, self.layout.dim)
        params = self.initializer(num_chains=num)
        return self.layout.pack(params).detach().reshape(num, self.layout.dim)

    def log_prob(self, x: Tensor) -> Tensor:
        r""":math:`-U(\mathrm{unpack}(x))` for ``x`` of shape ``(d,)`` or ``(..., d)``: a batch in one
        vectorized run of the model where it allows it (``vectorized``), else point by point; a batch
        shape evaluated often runs traced (``traced``). With the data sharded, summed over the
        processes (``summed``)."""
        if self.summed is not None:
            return self.summed(x)
        return self.local_log_prob(x)

    def local_log_prob(self, x: Tensor) -> Tensor:
        """:meth:`log_prob` of this process's model and data alone."""
        if x.dim() == 1:
            return self._point_log_prob(x)
        if self.traced is not None:
            return self.traced(x)
        return self._eager_log_prob(x)

    def _unvalidated_log_prob(self, x: Tensor) -> Tensor:
        with pyro.validation_enabled(False):
            return self._eager_log_prob(x)

    def _eager_log_prob(self, x: Tensor) -> Tensor:
        if self.particles is None:
            return self.point_log_prob(x)
        return self.particles.log_prob(x.reshape(-1, x.shape[-1])).reshape(x.shape[:-1])

    def point_log_prob(self, x: Tensor) -> Tensor:
        r""":math:`-U(\mathrm{unpack}(x))` for ``x`` of shape ``(..., d)``, point by point through Pyro's
        potential (what a single chain evaluates: one model run per point, no particle plate)."""
        if x.dim() == 1:
            return self._point_log_prob(x)
        flat = x.reshape(-1, x.shape[-1])
        return torch.stack([self._point_log_prob(row) for row in flat]).reshape(x.shape[:-1])

    def _point_log_prob(self, x: Tensor) -> Tensor:
        energy = self.potential_fn(self.layout.unpack(x))
        if isinstance(energy, (int, float)):  # e.g. Pyro's potential of a model with no latent sites
            energy = torch.tensor(float(energy), dtype=x.dtype, device=x.device)
        if not isinstance(energy, Tensor) or energy.numel() != 1:
            shape = tuple(energy.shape) if isinstance(energy, Tensor) else type(energy).__name__
            raise ValueError(
                f"the potential energy must be a single number (a tensor of one element), got {shape}"
            )
        return -energy.reshape(())

    def jacobian_log_det(self, x: Tensor) -> Tensor:
        r""":math:`\log |J(x)|` of the map from unconstrained points ``x`` ``(..., d)`` to the sites, summed
        per point: the constraints' log-determinants that the density adds (``_to_sites``)."""
        total = x.new_zeros(x.shape[:-1])
        for log_det in _to_sites(self.transforms, self.layout.unpack(x))[1]:
            total = total + log_det.reshape(*x.shape[:-1], -1).sum(-1)
        return total

    def constrain(self, x: Tensor) -> dict[str, Tensor]:
        """Maps flat unconstrained points ``(..., d)`` to the model's constrained sites
        ``{site: (..., *shape)}``."""
        return {
            name: self.transforms[name].inv(value) if name in self.transforms else value
            for name, value in self.layout.unpack(x).items()
        }


def _to_sites(transforms: Mapping, values: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[Tensor]]:
    """The sites' values of unconstrained ``values`` ``{site: tensor}`` (Pyro's ``transforms`` inverted
    where a site has one), and the log-determinants of those maps, elementwise, one tensor per site mapped."""
    constrained, log_dets = {}, []
    for name, value in values.items():
        if name in transforms:
            inverse = transforms[name].inv
            constrained[name] = inverse(value)
            log_dets.append(inverse.log_abs_det_jacobian(value, constrained[name]))
        else:
            constrained[name] = value
    return constrained, log_dets


class _ParticleModel:
    """The model run once for ``n`` points inside an outer particle plate (particles first)."""

    def __init__(self, model, model_args, model_kwargs, layout, transforms, trace) -> None:
        self.model, self.model_args, self.model_kwargs = model, model_args, model_kwargs
        self.layout, self.transforms = layout, transforms
        self.nesting = _plate_nesting(trace)
        self.batch_dims = {name: len(trace.nodes[name]["fn"].batch_shape) for name in layout.shapes}

    def trace(self, x: Tensor):
        """The trace of one run at the points ``x`` ``(n, d)``, and the log-determinants ``(n,)`` of the
        maps from the unconstrained points to the sites' values."""
        n, nesting = x.shape[0], self.nesting
        values = {
            name: value.reshape((n,) + (1,) * (nesting - self.batch_dims[name]) + self.layout.shapes[name])
            for name, value in self.layout.unpack(x).items()
        }
        constrained, log_dets = _to_sites(self.transforms, values)
        log_det = sum((term.reshape(n, -1).sum(-1) for term in log_dets), x.new_zeros(n))
        with pyro.plate("_nfmala_particles", n, dim=-(nesting + 1)):
            conditioned = pyro.poutine.condition(self.model, constrained)
            particle_trace = pyro.poutine.trace(conditioned).get_trace(*self.model_args, **self.model_kwargs)
        return particle_trace, log_det

    def log_prob(self, x: Tensor) -> Tensor:
        """The log joint of the points ``x`` ``(n, d)`` in one run of the model."""
        particle_trace, total = self.trace(x)
        particle_trace.compute_log_prob()
        for site in particle_trace.nodes.values():
            if site["type"] == "sample" and not site_is_subsample(site):
                total = total + self.particles_first(site["log_prob"]).reshape(len(total), -1).sum(-1)
        return total

    def particles_first(self, log_prob: Tensor) -> Tensor:
        """A site's log density with the particle dimension first (of size 1 where all particles share it)."""
        log_prob = log_prob.reshape((1,) * (self.nesting + 1 - log_prob.dim()) + log_prob.shape)
        return log_prob.movedim(-(self.nesting + 1), 0)

    def site_values(self, x: Tensor, names: list[str]) -> dict[str, Tensor]:
        """The values of the sites ``names`` in one run at the points ``x`` ``(n, d)``, particles first (a
        site the particles share, drawn outside the particle plate, has no particle dimension)."""
        with pyro.poutine.block(), torch.no_grad():
            trace, _ = self.trace(x)
        return {name: trace.nodes[name]["value"] for name in names}


class _VmappedModel:
    r"""The model run for one point, :math:`\log \pi_X(x)` (the log joint at the constrained values plus
    the log-determinants of the maps from unconstrained space), batched over points by
    :func:`torch.func.vmap`: for a model that does not broadcast over an outer plate (scalar
    hyperparameters fed to ``.expand([J]).to_event(1)``, ``x @ beta``, indexing with a site's value), it
    still runs once per batch, as one vectorized program, instead of once per point.

    Pyro's own potential cannot be vmapped (its enumeration messenger reads ``.data``); this one runs the
    model under ``trace`` and ``condition`` only, with Pyro's validation off (a check of a value's support is
    a branch on data, which vmap refuses).
    """

    def __init__(self, model, model_args, model_kwargs, layout, transforms) -> None:
        self.model, self.model_args, self.model_kwargs = model, model_args, model_kwargs
        self.layout, self.transforms = layout, transforms

    def _point_trace(self, x: Tensor):
        """The trace of one run at the point ``x`` ``(d,)``, and the log-determinant of the map from the
        unconstrained point to the sites' values."""
        constrained, log_dets = _to_sites(self.transforms, self.layout.unpack(x))
        log_det = sum((term.sum() for term in log_dets), x.new_zeros(()))
        conditioned = pyro.poutine.condition(self.model, constrained)
        with pyro.validation_enabled(False):
            trace = pyro.poutine.trace(conditioned).get_trace(*self.model_args, **self.model_kwargs)
        return trace, log_det

    def _point_log_prob(self, x: Tensor) -> Tensor:
        trace, total = self._point_trace(x)
        with pyro.validation_enabled(False):
            return total + trace.log_prob_sum()

    def log_prob(self, x: Tensor) -> Tensor:
        """The log joint of the points ``x`` ``(n, d)``, one vmapped run."""
        return torch.func.vmap(self._point_log_prob)(x)  # made here: a vmapped function does not pickle

    def site_values(self, x: Tensor, names: list[str]) -> dict[str, Tensor]:
        """The values ``{site: (n, *shape)}`` of the sites ``names`` at the points ``x`` ``(n, d)``."""

        def values(point: Tensor) -> dict[str, Tensor]:
            trace, _ = self._point_trace(point)
            return {name: trace.nodes[name]["value"] for name in names}

        with pyro.poutine.block(), torch.no_grad():
            return torch.func.vmap(values)(x)


def default_init(site: dict, radius: float = 2.0) -> Tensor:
    """Pyro's ``init_to_uniform`` where it applies; a discrete site's draw; for a site that cannot be
    sampled (``ImproperUniform``), a uniform draw in ``(-radius, radius)`` of its unconstrained space."""
    try:
        return init_to_uniform(site, radius=radius)
    except NotImplementedError:
        pass
    fn = site["fn"]
    if fn.support.is_discrete:
        return init_to_sample(site)
    transform = biject_to(fn.support)
    shape = transform.inv.forward_shape(fn.shape())
    return transform(torch.rand(shape) * (2 * radius) - radius).detach()


def _trace(model, model_args, model_kwargs, init_strategy: Callable = default_init):
    """One run of the model, with latent values drawn by ``init_strategy``."""
    return pyro.poutine.trace(InitMessenger(init_strategy)(model)).get_trace(*model_args, **model_kwargs)


def _latent_sites(trace) -> dict[str, dict]:
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    }


def _latent_shapes(trace) -> dict[str, tuple]:
    return {name: tuple(site["value"].shape) for name, site in _latent_sites(trace).items()}


def _plate_nesting(trace) -> int:
    """How many vectorized plates the deepest site of ``trace`` sits in."""
    dims = [
        -frame.dim
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(dims + [0])


def _check_static_support(model, model_args, model_kwargs, first, init_strategy, tries: int = 10) -> None:
    """Raises if the model's latent sites (their names or shapes) differ from those of the run ``first``."""
    expected = _latent_shapes(first)
    for _ in range(tries):
        latent = _latent_shapes(_trace(model, model_args, model_kwargs, init_strategy))
        if latent != expected:
            raise ValueError(
                "the model's latent sites change between runs (dynamic support): "
                f"{expected} in one run, {latent} in another. NFMALA needs a fixed set of "
                "continuous latent sites of fixed shapes, hence a fixed unconstrained dimension."
            )


def _check_continuous_sites_before_enumerated(layout: ParamLayout, first, discrete: list[str]) -> None:
    """Raises if a continuous latent site depends on an enumerated discrete one.

    Under Pyro's parallel enumeration such a site is drawn with the enumeration dimension in its
    shape (``x ~ Normal(3 z, 1)`` becomes two values of ``x``, one per value of ``z``), so the
    posterior sampled would be another model's, as with Pyro's HMC and NUTS: a fit of it ran for
    462 s and ended far off. The shapes with and without enumeration are compared.
    """
    grown = []
    for name, site in _latent_sites(first).items():
        if name not in layout.shapes:
            continue
        plain = biject_to(site["fn"].support).inv.forward_shape(site["value"].shape)
        if tuple(layout.shapes[name]) != tuple(plain):
            grown.append(f"{name!r} (shape {tuple(plain)}, {tuple(layout.shapes[name])} under enumeration)")
    if grown:
        raise ValueError(
            f"the continuous latent site(s) {', '.join(grown)} depend on the enumerated discrete site(s) "
            f"{discrete}: Pyro's enumeration sums a discrete site out only where no continuous latent "
            "site depends on it (the same holds for HMC and NUTS). Sum it out of that site's prior by "
            "hand, e.g. x ~ MixtureSameFamily(Categorical(probs), Normal(locs, scales)) for a "
            "component z, or observe the discrete site."
        )


def _constraint_tensors(constraint) -> list[Tensor]:
    """The tensors a support is made of (an interval's bounds), nested constraints' included."""
    found = []
    for value in vars(constraint).values():
        if isinstance(value, Tensor):
            found.append(value)
        elif isinstance(value, constraints.Constraint):
            found += _constraint_tensors(value)
    return found


def _same_tensors(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def _check_fixed_supports(model, model_args, model_kwargs, first, tries: int = 3) -> None:
    """Raises if a latent site's support moves with the other latent sites (``Uniform(0, theta)``).

    Pyro maps each latent site to unconstrained space with ``biject_to(support)`` fixed at setup, as
    for HMC and NUTS, so such a site would be sampled under the wrong law (the hostile pass: theta's
    sd 0.46 for 0.60). The supports are compared across runs of the model at random points.
    """
    expected = {name: _constraint_tensors(site["fn"].support) for name, site in _latent_sites(first).items()}
    moving = set()
    for _ in range(tries):
        trace = _trace(model, model_args, model_kwargs, default_init)
        for name, site in _latent_sites(trace).items():
            if name in expected and not _same_tensors(
                expected[name], _constraint_tensors(site["fn"].support)
            ):
                moving.add(name)
    if moving:
        described = ", ".join(
            f"{name!r} ({_latent_sites(first)[name]['fn'].support})" for name in sorted(moving)
        )
        raise ValueError(
            f"the support of latent site(s) {described} depends on other latent sites. NFMALA, like "
            "Pyro's HMC and NUTS, maps each site to unconstrained space by a transform fixed at setup, "
            "so such a site would be sampled under the wrong law. Sample it on a fixed support and "
            "map it: for y ~ Uniform(0, theta), u = pyro.sample('u', dist.Uniform(0, 1)) and "
            "y = pyro.deterministic('y', theta * u), the same joint law (y given theta is Uniform(0, "
            "theta) either way)."
        )


def discrete_latent_sites(
    model: Callable, *args, init_strategy: Callable = default_init, **kwargs
) -> dict[str, bool]:
    """The latent (unobserved) sample sites of ``model`` with a discrete support, each with whether
    Pyro can enumerate it (sum it out of the potential)."""
    return _discrete_sites(_trace(model, args, kwargs, init_strategy))


def _discrete_sites(trace) -> dict[str, bool]:
    return {
        name: bool(site["fn"].has_enumerate_support)
        for name, site in _latent_sites(trace).items()
        if getattr(site["fn"], "support", None) is not None and site["fn"].support.is_discrete
    }


def model_density(
    model: Callable,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    *,
    vectorize: bool = True,
    trace_density: bool = True,
    init_strategy: Callable | None = None,
    max_plate_nesting: int | None = None,
    shards: ShardedData | None = None,
    **initialize_kwargs,
) -> ModelDensity:
    """The posterior of a Pyro model on its flat unconstrained parameters.

    Runs :func:`pyro.infer.mcmc.util.initialize_model` (``initialize_kwargs`` are passed to it:
    ``transforms``, ``jit_compile``, ...). Sites are laid out in the order the model's continuous
    latent sites run. Discrete latent sites that Pyro can enumerate (finite support) are summed
    out of the potential, as for Pyro's HMC and NUTS; the density lives on the continuous sites.

    ``init_strategy`` (a Pyro init strategy; by default :func:`default_init`, which also starts
    improper ``ImproperUniform`` sites) is used for every run of the model here.
    ``max_plate_nesting`` is found from one run of the model when not given.

    Raises ``ValueError`` for a model with discrete latent sites that cannot be enumerated, or with
    latent sites that change between runs.

    With ``vectorize=True``, a batch of points is evaluated in one run of the model inside an
    outer particle plate, when that agrees with Pyro's potential on three test points; else, for a model
    whose sites do not broadcast over such a plate (``x @ beta``, ``.expand([J]).to_event(1)`` of scalar
    hyperparameters), as the one-point model vmapped over the points (:func:`torch.func.vmap`), checked
    the same way; otherwise (a model that branches on a parameter's value, draws random numbers, and with
    ``vectorize=False`` or enumerated sites) point by point, with the reasons in ``unbatched_reasons``.

    With ``trace_density=True``, a batch shape evaluated often runs as one traced graph of the log
    density and its gradient (:mod:`pyro_nfmala.engine.traced`: the same arithmetic, checked, 2-6x faster
    on small models); ``False`` runs the model eagerly every time.

    With ``shards`` (:class:`~pyro_nfmala.distributed.sharded.ShardedData`), ``model_args`` and
    ``model_kwargs`` are this process's shard of the data, and the log density is summed over the
    processes, the prior and the constraints' Jacobian counted once (:mod:`pyro_nfmala.model.sharded`).
    """
    model_kwargs = model_kwargs or {}
    if shards is not None and shards.active and shards.rank != 0:
        model = without_prior()(model)
    init_strategy = init_strategy or default_init
    first = _trace(model, model_args, model_kwargs, init_strategy)
    discrete = _discrete_sites(first)
    not_enumerable = sorted(name for name, enumerable in discrete.items() if not enumerable)
    if not_enumerable:
        raise ValueError(
            "NFMALA samples continuous latent sites; the model has discrete latent sites "
            f"{not_enumerable} with an infinite support, which cannot be summed out. Marginalize them "
            "out by hand or observe them."
        )
    if max_plate_nesting is None:
        max_plate_nesting = _plate_nesting(first)
    initialize_kwargs = {key: value for key, value in initialize_kwargs.items() if value is not None}
    try:
        init_params, potential_fn, transforms, trace = initialize_model(
            model,
            model_args=model_args,
            model_kwargs=model_kwargs,
            init_strategy=init_strategy,
            max_plate_nesting=max_plate_nesting,
            **initialize_kwargs,
        )
    except (RuntimeError, ValueError) as error:  # Pyro's "cannot find valid initial params", or autograd's
        flat = _sites_the_density_ignores(model, model_args, model_kwargs, first)
        if flat:  # autograd: "element 0 of tensors does not require grad", "... not used in the graph"
            raise ValueError(
                f"the model's log density does not depend on the latent site(s) {flat} (a flat prior, "
                "such as ImproperUniform, that no data and no other site involve): the posterior is "
                "improper in them and cannot be sampled. Give them a proper prior, or data that "
                "constrain them."
            ) from error
        nonfinite = _nonfinite_arguments(model_args, model_kwargs)
        if not nonfinite or "valid initial params" not in str(error):
            raise
        raise ValueError(
            f"the model's data hold NaN or infinite values ({', '.join(nonfinite)}), so its log density is "
            "not finite anywhere: drop or impute them (or mask them with poutine.mask / obs_mask)"
        ) from error
    layout = ParamLayout.from_params(init_params)
    if discrete:
        _check_continuous_sites_before_enumerated(layout, first, sorted(discrete))
    _check_static_support(model, model_args, model_kwargs, first, init_strategy)
    _check_fixed_supports(model, model_args, model_kwargs, first)
    initializer = partial(
        _find_valid_initial_params, model, model_args, model_kwargs, transforms, potential_fn, init_params,
        init_strategy=init_strategy,
    )  # fmt: skip
    density = ModelDensity(
        layout, potential_fn, transforms, init_params, trace_density=trace_density, initializer=initializer
    )
    if vectorize and layout.dim > 0 and not discrete:
        density.particles = _checked_particle_model(density, model, model_args, model_kwargs, trace)
    elif not vectorize:
        density.unbatched_reasons = ["vectorize=False"]
    elif discrete:
        density.unbatched_reasons = [f"the discrete sites {sorted(discrete)} are summed out by enumeration"]
    return density.shard(shards)


def _sites_the_density_ignores(model, model_args: tuple, model_kwargs: dict, trace) -> list[str]:
    """The continuous latent sites of the run ``trace`` that the log joint does not depend on at all (no path
    in autograd's graph from the site's value to any log density), found by running the model again with
    those values requiring gradients."""
    values = {
        name: site["value"].detach().clone().requires_grad_(True)
        for name, site in _latent_sites(trace).items()
        if not site["fn"].support.is_discrete
    }
    if not values:
        return []
    with torch.enable_grad():
        run = pyro.poutine.trace(pyro.poutine.condition(model, data=values)).get_trace(
            *model_args, **model_kwargs
        )
        total = run.log_prob_sum()
        if not total.requires_grad:
            return sorted(values)
        grads = torch.autograd.grad(total, list(values.values()), allow_unused=True)
    return [name for name, grad in zip(values, grads) if grad is None]


def _nonfinite_arguments(model_args: tuple, model_kwargs: dict) -> list[str]:
    """The model's floating-point tensor and array arguments that hold NaN or infinite values, named by
    position or keyword, with how many."""
    named = [(f"argument {i}", value) for i, value in enumerate(model_args)]
    named += [(repr(key), value) for key, value in model_kwargs.items()]
    found = []
    for name, value in named:
        floating = (isinstance(value, Tensor) and value.is_floating_point()) or (
            isinstance(value, np.ndarray) and value.dtype.kind == "f"
        )
        if floating:
            values = torch.as_tensor(value)
            count = int((~torch.isfinite(values)).sum())
            if count:
                found.append(f"{name}: {count} of {values.numel()} values")
    return found


def _checked_particle_model(density: ModelDensity, model, model_args, model_kwargs, trace):
    """The model run for a batch of points, checked against Pyro's potential on three points: inside an
    outer particle plate where the model broadcasts over it, else vmapped over the points
    (:class:`_VmappedModel`); ``None`` where neither agrees (evaluated point by point, logged)."""
    x = density.layout.pack(density.initial_params).detach()
    points = torch.stack([x, x + 0.1, x - 0.1])
    expected = density.point_log_prob(points)
    reasons = []
    for kind, build in [
        ("particle plate", lambda: _ParticleModel(model, model_args, model_kwargs, density.layout,
                                                  density.transforms, trace)),
        ("vmap", lambda: _VmappedModel(model, model_args, model_kwargs, density.layout, density.transforms)),
    ]:  # fmt: skip
        try:
            batched = build()
            got = batched.log_prob(points)
        except Exception as error:  # noqa: BLE001 - any model that does not batch this way
            if is_out_of_memory(error):
                raise
            first_line = str(error).splitlines()[0] if str(error) else ""
            reasons.append(f"{kind}: {type(error).__name__}: {first_line}")
            continue
        if got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
            if reasons:
                logger.info("model does not broadcast over a particle plate (%s): vmapped", reasons[0])
            return batched
        reasons.append(f"{kind}: disagrees with Pyro's potential")
    density.unbatched_reasons = reasons
    logger.info("model evaluated point by point (%s)", "; ".join(reasons))
    return None
