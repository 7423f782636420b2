r"""A Pyro model's log density summed over data shards: every process holds one shard and the same
chains (the density of a :class:`~pyro_nfmala.distributed.sharded.ShardedData` run).

With ranks :math:`r = 0, \dots, R-1`, each holding a shard :math:`y_r` of the data, the posterior on the
unconstrained parameters is

.. math:: \log \pi_X(x) = \log p(x) + \log |J(x)| + \sum_r \log p(y_r \mid x),

prior and constraint Jacobian counted once. Each rank runs the model on its own shard (a plate of the
shard's size: no subsampling scale) and evaluates :math:`\ell_r(x) = [r = 0](\log p(x) + \log|J(x)|) +
\log p(y_r \mid x)` for the chains' points (:func:`shard_term`): rank 0 with the whole model, the others
with the latent sites scaled by zero (:class:`without_prior`) and the Jacobian subtracted. Per
evaluation, one all-reduce of the ``(chains, 1 + d)`` buffer :math:`[\ell_r(x), \nabla_x \ell_r(x)]` gives
every rank the same :math:`\log \pi_X` and :math:`\nabla_x \log \pi_X` (:class:`ShardedLogDensity`), so
the flow's pass and its chain rule stay local, and accept/reject agree on every rank. Nothing else is
communicated. A rank whose evaluation raises sets the error flag of that all-reduce, and every rank
raises its error.

Example (one process: the shard is the whole data, every operation the identity):
    >>> def model(y):
    ...     loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    ...     with pyro.plate("data", len(y)):
    ...         pyro.sample("y", dist.Normal(loc, 1.0), obs=y)
    >>> from pyro_nfmala.distributed import ShardedData
    >>> kernel = NFMALA(model, distributed=ShardedData(), fit_options={"progress": False})
    >>> run = kernel.prepare(torch.ones(20))
    >>> run.sampled.summed is None, run.fit_result.stage  # one process: nothing to sum over
    (True, 'laplace')
"""

from __future__ import annotations

__all__ = ["ShardedLogDensity", "shard_term", "without_prior"]

import functools

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from ..engine.traced import ValueWithGradient, value_and_gradient

if TYPE_CHECKING:
    from ..distributed.sharded import ShardedData


class without_prior(Messenger):
    """A messenger that scales the model's latent sample sites by zero (their log densities count zero,
    their graph kept), keeping its observed ones: a rank's likelihood of its shard, the prior left to
    rank 0."""

    def _process_message(self, msg) -> None:
        if msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg):
            msg["scale"] = 0.0 * msg["scale"]


class ShardedLogDensity:
    r"""The log density summed over the ranks (see the module): ``log_prob(x)`` for points ``(..., d)``,
    differentiable in ``x`` (the gradient comes from the same all-reduce; a Hessian's rows, under
    ``create_graph``, from one all-reduce each).

    Arguments:
        local: This rank's term :math:`\ell_r(x)` of a batch of points.
        shards: The :class:`~pyro_nfmala.distributed.sharded.ShardedData` group.
    """

    def __init__(self, local: Callable[[Tensor], Tensor], shards: ShardedData) -> None:
        self.local, self.shards = local, shards

    def __call__(self, x: Tensor) -> Tensor:
        if not self.shards.active:
            return self.local(x)
        if x.dim() == 1:
            return self(x[None])[0]
        if torch.is_grad_enabled() and x.requires_grad:  # the gradient from the same all-reduce
            return ValueWithGradient.apply(x, self._summed_with_gradient, self._differentiable_gradient)
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
            value, grad, _ = value_and_gradient(self.local, points)
            return torch.cat([value.reshape(-1, 1), grad], -1)

        summed = self._all_reduced(local, points, 1 + dim if with_grad else 1)
        value = summed[:, 0].reshape(shape)
        return value, (summed[:, 1:].reshape(x.shape) if with_grad else None)

    def _summed_with_gradient(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._summed(x, with_grad=True)

    def _differentiable_gradient(self, x: Tensor, grad: Tensor) -> Tensor:
        """The summed gradient ``grad`` as a function of ``x``: its derivative by Hessian-vector products."""
        return _SummedGradient.apply(x, grad, self)

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


def shard_term(density, rank: int) -> Callable[[Tensor], Tensor]:
    r"""This rank's term :math:`\ell_r` from the density of the model run on its shard (with
    :func:`without_prior` on every rank but 0): the density itself on rank 0, less the Jacobian
    elsewhere."""
    if rank == 0 or density.initializer is None:  # a potential_fn's term is the user's own
        return density.local_log_prob
    return functools.partial(_likelihood_only, density)


def _likelihood_only(density, x: Tensor) -> Tensor:
    return density.local_log_prob(x) - density.jacobian_log_det(x)
