r"""A likelihood over data shards: every process holds one shard and the same chains.

With ranks :math:`r = 0, \dots, R-1`, each holding a shard :math:`y_r` of the data, the posterior on the
unconstrained parameters is

.. math:: \log \pi_X(x) = \log p(x) + \log |J(x)| + \sum_r \log p(y_r \mid x),

prior and constraint Jacobian counted once. Each rank runs the model on its own shard (a plate of the
shard's size: no subsampling scale) and evaluates :math:`\ell_r(x) = [r = 0](\log p(x) + \log|J(x)|) +
\log p(y_r \mid x)` for the chains' points: rank 0 with the whole model, the others with the latent sites
masked (:func:`without_prior`) and the Jacobian subtracted. Per evaluation, one all-reduce of the
``(chains, 1 + d)`` buffer :math:`[\ell_r(x), \nabla_x \ell_r(x)]` gives every rank the same
:math:`\log \pi_X` and :math:`\nabla_x \log \pi_X` (:class:`ShardedLogDensity`), so the flow's pass and
its chain rule stay local, and accept/reject agree on every rank. Nothing else is communicated.

Every rank must then run the same code on the same numbers: the same seed, and a fit without a time
budget (a deadline would stop the ranks at different steps). A rank whose evaluation raises sets a flag
in the same all-reduce, and every rank raises its error; ``check_every`` compares the chains' states
across ranks every so many steps and stops the run where they differ.

Example (one process: the shard is the whole data, every operation the identity):
    >>> def model(y):
    ...     loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    ...     with pyro.plate("data", len(y)):
    ...         pyro.sample("y", dist.Normal(loc, 1.0), obs=y)
    >>> kernel = NFMALA(model, distributed=ShardedData(), fit_options={"progress": False})
    >>> run = kernel.prepare(torch.ones(20))
    >>> run.sampled.summed is None, run.fit_result.stage  # one process: nothing to sum over
    (True, 'laplace')
"""

from __future__ import annotations

__all__ = ["ShardedData", "ShardedLogDensity", "jacobian_log_det", "shard_term", "without_prior"]

import functools

from collections.abc import Callable

import torch

from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from .collectives import Collective


class ShardedData(Collective):
    r"""A run whose data are split over the processes of a ``torch.distributed`` group: each rank calls the
    run with its own shard as the model's arguments, and every rank holds the same chains (see the module).

    Pass it as ``NFMALA(model, distributed=ShardedData())``; every rank seeds alike
    (``pyro.set_rng_seed(s)``) and calls ``MCMC(...).run(shard)``.

    Arguments:
        group: The process group (``None``: the default one).
        check_every: Every so many steps, check that the chains are the same on every rank (one all-reduce
            of a checksum); ``None`` never.
    """

    def __init__(self, group=None, *, check_every: int | None = 100) -> None:
        super().__init__(group)
        if check_every is not None and int(check_every) < 1:
            raise ValueError(f"check_every must be a positive number of steps or None, got {check_every}")
        self.check_every = None if check_every is None else int(check_every)

    def check_same_chains(self, step: int, z: Tensor) -> None:
        """On schedule (every ``check_every`` steps), raises ``RuntimeError`` on every rank where the chains'
        latent states ``z`` differ between ranks."""
        if not self.active or self.check_every is None or step % self.check_every:
            return
        values = self.gather_rows(z.detach().double().sum().reshape(1))
        if not bool((values == values[0]).all()):
            raise RuntimeError(
                f"the chains differ between ranks after step {step} (checksums {values.tolist()}): "
                "every rank of a ShardedData run must run the same code on the same numbers. Seed every "
                "rank alike (pyro.set_rng_seed), give the fit no time budget, and make the model's prior "
                "the same on every rank (only the observed data may differ)."
            )


class without_prior(Messenger):
    """A messenger that scales the model's latent sample sites by zero (their log densities count zero,
    their graph kept), keeping its observed ones: a rank's likelihood of its shard, the prior left to
    rank 0."""

    def _process_message(self, msg) -> None:
        if msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg):
            msg["scale"] = 0.0 * msg["scale"]


class ShardedLogDensity:
    r"""The log density summed over the ranks (see the module): ``log_prob(x)`` for points ``(..., d)``,
    differentiable once in ``x`` (the gradient comes from the same all-reduce).

    Arguments:
        local: This rank's term :math:`\ell_r(x)` of a batch of points.
        shards: The :class:`ShardedData` group.
    """

    def __init__(self, local: Callable[[Tensor], Tensor], shards: ShardedData) -> None:
        self.local, self.shards = local, shards

    def __call__(self, x: Tensor) -> Tensor:
        if not self.shards.active:
            return self.local(x)
        if x.dim() == 1:
            return self(x[None])[0]
        if torch.is_grad_enabled() and x.requires_grad:
            return _AllReduced.apply(x, self)
        value, _ = self._summed(x, with_grad=False)
        return value

    def _summed(self, x: Tensor, with_grad: bool) -> tuple[Tensor, Tensor | None]:
        r""":math:`(\sum_r \ell_r(x), \sum_r \nabla \ell_r(x))` by one all-reduce."""
        shape, dim = x.shape[:-1], x.shape[-1]
        points = x.detach().reshape(-1, dim)

        def local() -> Tensor:
            if not with_grad:
                with torch.no_grad():
                    return self.local(points).reshape(-1, 1)
            with torch.enable_grad():
                leaf = points.clone().requires_grad_(True)
                value = self.local(leaf)
                (grad,) = torch.autograd.grad(value.sum(), leaf, allow_unused=True)
            grad = torch.zeros_like(points) if grad is None else grad
            return torch.cat([value.detach().reshape(-1, 1), grad.detach()], -1)

        summed = self._all_reduced(local, points, 1 + dim if with_grad else 1)
        value = summed[:, 0].reshape(shape)
        return value, (summed[:, 1:].reshape(x.shape) if with_grad else None)

    def _summed_hessian_product(self, x: Tensor, vector: Tensor) -> Tensor:
        r""":math:`\sum_r \nabla^2 \ell_r(x)\, v` per point, by one all-reduce (a Hessian's rows, one per
        call: what :func:`torch.autograd.functional.hessian` asks of the gradient)."""
        dim = x.shape[-1]
        points, vector = x.detach().reshape(-1, dim), vector.detach().reshape(-1, dim)

        def local() -> Tensor:
            with torch.enable_grad():
                leaf = points.clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(self.local(leaf).sum(), leaf, create_graph=True)
                (product,) = torch.autograd.grad((grad * vector).sum(), leaf, allow_unused=True)
            return torch.zeros_like(points) if product is None else product.detach()

        return self._all_reduced(local, points, dim).reshape(x.shape)

    def _all_reduced(self, local: Callable[[], Tensor], points: Tensor, width: int) -> Tensor:
        """``local()`` ``(n, width)`` summed over the ranks by one all-reduce with the error flag
        (:meth:`~pyro_nfmala.distributed.collectives.Collective.sum_flagged`): an error in ``local`` on any
        rank is raised on every rank."""
        error = None
        try:
            columns = local()
        except Exception as raised:  # noqa: BLE001 - handed to every rank by sum_flagged
            error = raised
            columns = points.new_zeros((len(points), width))
        return self.shards.sum_flagged(columns, error)


class _AllReduced(torch.autograd.Function):
    """The summed log density, its gradient from the forward pass's all-reduce; differentiable twice
    (:class:`_SummedGradient`)."""

    @staticmethod
    def forward(ctx, x: Tensor, density: ShardedLogDensity) -> Tensor:
        value, grad = density._summed(x, with_grad=True)
        ctx.save_for_backward(x, grad)
        ctx.density = density
        return value

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        x, grad = ctx.saved_tensors
        return grad_output.unsqueeze(-1) * _SummedGradient.apply(x, grad, ctx.density), None


class _SummedGradient(torch.autograd.Function):
    """The summed gradient, as a function of ``x``: its backward is the summed Hessian-vector product."""

    @staticmethod
    def forward(ctx, x: Tensor, grad: Tensor, density: ShardedLogDensity) -> Tensor:
        ctx.save_for_backward(x)
        ctx.density = density
        return grad.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, vector: Tensor):
        (x,) = ctx.saved_tensors
        return ctx.density._summed_hessian_product(x, vector), None, None


def jacobian_log_det(transforms, layout, x: Tensor) -> Tensor:
    r""":math:`\log |J(x)|` of the map from unconstrained points ``x`` ``(..., d)`` to the model's sites,
    summed per point (the term every rank but 0 subtracts)."""
    total = x.new_zeros(x.shape[:-1])
    for name, value in layout.unpack(x).items():
        if name not in transforms:
            continue
        inverse = transforms[name].inv
        log_det = inverse.log_abs_det_jacobian(value, inverse(value))
        total = total + log_det.reshape(*x.shape[:-1], -1).sum(-1)
    return total


def shard_term(density, rank: int) -> Callable[[Tensor], Tensor]:
    r"""This rank's term :math:`\ell_r` from the density of the model run on its shard (with
    :func:`without_prior` on every rank but 0): the density itself on rank 0, less the Jacobian
    elsewhere."""
    if rank == 0 or density.initializer is None:  # a potential_fn's term is the user's own
        return density.local_log_prob
    return functools.partial(_likelihood_only, density)


def _likelihood_only(density, x: Tensor) -> Tensor:
    return density.local_log_prob(x) - jacobian_log_det(density.transforms, density.layout, x)
