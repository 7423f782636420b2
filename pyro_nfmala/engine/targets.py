r"""Latent targets: log densities on the latent space of a flow. Pure tensor math, no Pyro.

T1, the posterior pull-back (exact): for an unnormalized log density :math:`\log \pi_X` on
data space,

.. math:: \log \pi(z) = \log \pi_X(f(z)) + \mathrm{ladj}(z) .

If :math:`z \sim \pi` then :math:`f(z) \sim \pi_X`, whatever the flow :math:`f`.

T2, the tempered flow measure (the generative sampling of Coeurdoux et al.):

.. math:: \log \pi_\beta(z) = \log q_Z(z) - \beta\, \mathrm{ladj}(z) .

Both return, for a batch of latents ``z`` of shape ``(..., d)``, the log density (shape
``(...)``), the data point :math:`x = f(z)` and :math:`\mathrm{ladj}(z)`, all differentiable
in ``z``. Both accept a zuko flow (frozen on the way in) or a :class:`~pyro_nfmala.LatentFlow`.
:meth:`LatentTarget.evaluate` gives what a chain needs, :math:`(\log \pi(z), x, \mathrm{ladj}(z),
\nabla_z \log \pi(z))`, detached: by autograd, or, for a :class:`PosteriorPullback` built with
``trace=True``, from one traced graph per batch shape (:mod:`pyro_nfmala.engine.traced`).

Example:
    >>> flow = zuko.flows.NSF(2, transforms=2)
    >>> posterior = PosteriorPullback(flow, lambda x: -0.5 * (x**2).sum(-1))
    >>> tempered = TemperedFlow(flow, beta=1.0)
    >>> [target.log_density(torch.zeros(4, 2))[0].shape for target in (posterior, tempered)]
    [torch.Size([4]), torch.Size([4])]
"""

from __future__ import annotations

__all__ = ["LatentTarget", "PosteriorPullback", "TemperedFlow", "check_beta"]

import math
import warnings

from collections.abc import Callable
from functools import partial

import torch

from torch import Tensor

from ..flows.latent import LatentFlow, as_latent_flow
from .traced import TracedFunction, value_and_gradient

#: Warned when a log density does not depend on ``z`` in autograd's graph.
NO_GRADIENT_WARNING = (
    "the log density has no gradient (it does not require grad): a potential_fn that returns a Python "
    "float or a detached tensor, or a posterior that does not depend on the parameters (a flat prior "
    "and no data). Its gradient is taken as zero, which keeps the chain exact but makes each step a "
    "random walk: return a tensor computed from the params with torch operations."
)


class LatentTarget:
    r"""A log density :math:`\log \pi(z)` on the latent space of ``flow``."""

    flow: LatentFlow

    def log_density(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r"""Returns :math:`(\log \pi(z), x = f(z), \mathrm{ladj}(z))`, differentiable in ``z``."""
        raise NotImplementedError

    def evaluate(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        r""":math:`(\log \pi(z), x, \mathrm{ladj}(z), \nabla_z \log \pi(z))` at ``z``, detached (by
        autograd; a log density that does not depend on ``z`` warns and has a zero gradient)."""
        return _evaluate_by_autograd(self, z)

    def check(self, z: Tensor) -> None:
        """Checks, once before sampling, that the target evaluates a batch ``z`` ``(n, d)`` as it should."""


class PosteriorPullback(LatentTarget):
    r"""T1: :math:`\log \pi(z) = \log \pi_X(f(z)) + \mathrm{ladj}(z)`, exact for any flow.

    Arguments:
        flow: The flow :math:`f`: a zuko flow, a :class:`~pyro_nfmala.LatentFlow`, or any flow that
            :func:`~pyro_nfmala.as_latent_flow` reads with no further argument (a transform or a callable:
            read it there, with its base).
        log_prob: The unnormalized target log density :math:`\log \pi_X(x)` of a batch ``x`` of
            shape ``(..., d)``, returning shape ``(...)``: one value per point, e.g.
            ``lambda x: -0.5 * (x**2).sum(-1)``.
        dim: The target's dimension, if known: checked against the flow's.
        trace: Evaluate for the chains from one traced graph per batch shape
            (:class:`~pyro_nfmala.engine.traced.TracedFunction`: checked against autograd at the point traced
            and every 500th evaluation after); for a flow and a ``log_prob`` that do not change.

    :meth:`check` (run by the samplers on their initial states) refuses a ``log_prob`` that
    returns another shape, or that mixes the points of a batch (indexing ``x[0]`` instead of
    ``x[..., 0]``): either would sample silently wrong.
    """

    def __init__(
        self, flow, log_prob: Callable[[Tensor], Tensor], dim: int | None = None, *, trace: bool = False
    ) -> None:
        self.flow = as_latent_flow(flow)
        if dim is not None and dim != self.flow.dim:
            raise ValueError(f"the flow has dimension {self.flow.dim} but the target has dimension {dim}")
        self.log_prob = log_prob
        self._traced = None
        if trace:
            self._traced = TracedFunction(partial(_evaluate_by_autograd, self), what="the latent target")

    def evaluate(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        r""":meth:`LatentTarget.evaluate`; with ``trace=True``, from a traced graph of the flow's pass, the
        density and both gradients, per batch shape (the flow and ``log_prob`` must not change)."""
        return _evaluate_by_autograd(self, z) if self._traced is None else self._traced(z)

    def log_density(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, ladj = self.flow.to_data(z)
        return self.log_prob(x) + ladj, x, ladj

    def check(self, z: Tensor) -> None:
        with torch.no_grad():
            x = self.flow.to_data(z.reshape(-1, self.flow.dim))[0]
            values = self.log_prob(x)
            expected = tuple(x.shape[:-1])
            if not isinstance(values, Tensor) or tuple(values.shape) != expected:
                got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
                raise ValueError(
                    f"log_prob must return one value per point: for x of shape {tuple(x.shape)} it must "
                    f"return shape {expected}, got {got}. Reduce over the last dimension only "
                    "(e.g. .sum(-1)) and index coordinates as x[..., i]."
                )
            if len(x) < 2:
                return
            try:
                alone = torch.cat([self.log_prob(x[i : i + 1]).reshape(1) for i in range(2)])
            except Exception as error:  # noqa: BLE001 - the user's function, any failure
                raise ValueError(
                    f"log_prob fails on a batch of one point, x of shape (1, {x.shape[-1]}) "
                    f"({type(error).__name__}: {error}): it must treat each row of x (..., d) on its own; "
                    "index coordinates as x[..., i]."
                ) from error
        batch = values[:2]
        scale = 1e-4 if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-8
        if not torch.allclose(batch, alone, rtol=scale, atol=scale, equal_nan=True):
            raise ValueError(
                "log_prob gives the points of a batch other values than the same points one at a time "
                f"({batch.tolist()} in a batch, {alone.tolist()} alone): it must treat each row of x "
                "(..., d) on its own; index coordinates as x[..., i], not x[i]."
            )


def check_beta(beta: float) -> float:
    """T2's inverse temperature as a float, or a ``ValueError`` unless it is finite and >= 0."""
    try:
        beta = float(beta)
    except (TypeError, ValueError):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}") from None
    if not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")
    return beta


class TemperedFlow(LatentTarget):
    r"""T2: :math:`\log \pi_\beta(z) = \log q_Z(z) - \beta\, \mathrm{ladj}(z)`.

    :math:`\beta = 0` is the flow's own latent law (naive sampling); :math:`\beta = 1` reads
    the flow's likelihood at :math:`f(z)`, which is small where the flow stretches space, so
    chains leave the bridges between modes. The push-forward through :math:`f` has density
    proportional to :math:`q_X(x)\, |\det J_f(f^{-1}(x))|^{-\beta}`: it is not :math:`q_X`.

    Arguments:
        flow: The trained flow: a zuko flow, a :class:`~pyro_nfmala.LatentFlow` (e.g. from
            :func:`~pyro_nfmala.as_latent_flow`, for a flow of another library), or one it reads as it is.
        beta: The inverse temperature :math:`\beta \ge 0`.
    """

    def __init__(self, flow, beta: float = 1.0) -> None:
        self.flow = as_latent_flow(flow)
        self.beta = check_beta(beta)

    def log_density(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, ladj = self.flow.to_data(z)
        return self.flow.base_log_prob(z) - self.beta * ladj, x, ladj


def _evaluate_by_autograd(target: LatentTarget, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    (log_density, x, ladj), grad, connected = value_and_gradient(target.log_density, z)
    if not connected:  # a constant in z (or a potential that lost its graph): a zero gradient, still exact
        warnings.warn(NO_GRADIENT_WARNING, RuntimeWarning, stacklevel=4)
    return log_density, x, ladj, grad
