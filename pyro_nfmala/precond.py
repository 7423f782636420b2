r"""Preconditioners :math:`A(z)` for latent MALA.

A preconditioner proposes :math:`z' \sim q(\cdot \mid z) = \mathcal{N}(\mu(z), 2\epsilon A(z)^{-1})`
with :math:`\mu(z) = z + \epsilon A(z)^{-1} \nabla \log \pi(z)`, and evaluates the normalized
proposal log density

.. math:: \log q(z' \mid z) = -\frac{(z' - \mu)^T A (z' - \mu)}{4 \epsilon}
          + \frac{1}{2} \log \det A - \frac{d}{2} \log(4 \pi \epsilon) .

- ``"identity"``: :math:`A = I`, plain MALA on the latent target.
- ``"jacobian"``: :math:`A(z) = J_f(z)^T J_f(z)`, the metric that data space induces on
  latent space, matrix-free: :math:`A^{-1} g = J^{-1}(J^{-T} g)`, noise :math:`J^{-1}\xi`,
  quadratic form :math:`|J (z' - \mu)|^2` and :math:`\frac12 \log\det A = \mathrm{ladj}(z)`.
  One step is one Langevin step in data space, pulled back.
- ``"dense_jacobian"``: the same with explicit Jacobians and linear solves; the reference
  the tests compare against, for small ``d`` only.
- :class:`MassMatrixPreconditioner`: a constant :math:`A = M`, diagonal or dense, whose inverse
  :math:`M^{-1}` the samplers adapt in warmup to the covariance of the chains' latent states
  (:mod:`pyro_nfmala.adaptation`); with :math:`M = I` it is ``"identity"``.

Every preconditioner follows the :class:`Preconditioner` protocol: ``prepare(flow, state)``
returns what it wants to keep about a state (its cache, stored in ``state.cache``, opaque to
the step), ``propose(flow, state, step_size, noise)`` returns :math:`(z', \log q(z' \mid z))`,
and ``log_proposal_density(flow, z_to, state_from, step_size)`` returns
:math:`\log q(z_\mathrm{to} \mid z_\mathrm{from})`. The noise :math:`\xi` is drawn by the
step, so the proposal is a deterministic function of it.

Example:
    >>> precond = get_preconditioner("jacobian")
    >>> precond.name, isinstance(precond, Preconditioner)
    ('jacobian', True)
"""

from __future__ import annotations

__all__ = [
    "PRECONDITIONERS",
    "DenseJacobianPreconditioner",
    "IdentityPreconditioner",
    "JacobianPreconditioner",
    "MassMatrixPreconditioner",
    "Preconditioner",
    "get_preconditioner",
]

import math

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from torch import Tensor

from .flow import LatentFlow

if TYPE_CHECKING:
    from .mala import MALAState


@runtime_checkable
class Preconditioner(Protocol):
    r"""What the MALA step needs of a preconditioner :math:`A(z)`.

    ``step_size`` is a 0-d tensor or one per chain (shape ``(...)``); states are batched, ``(..., d)``.
    """

    name: str

    def prepare(self, flow: LatentFlow, state: MALAState) -> Any:
        """What to keep about ``state`` for later proposals from it (``None``, or tensors with the
        state's batch shape first): stored as ``state.cache``."""

    def propose(
        self, flow: LatentFlow, state: MALAState, step_size: Tensor, noise: Tensor
    ) -> tuple[Tensor, Tensor]:
        r"""Returns :math:`z' = \mu(z) + \sqrt{2\epsilon} A(z)^{-1/2} \xi` and :math:`\log q(z' \mid z)`."""

    def log_proposal_density(
        self, flow: LatentFlow, z_to: Tensor, state_from: MALAState, step_size: Tensor
    ) -> Tensor:
        r"""Returns :math:`\log q(z_\mathrm{to} \mid z_\mathrm{from})`."""


def _log_normalizer(dim: int, step_size: Tensor) -> Tensor:
    return -0.5 * dim * torch.log(4 * math.pi * step_size)


class IdentityPreconditioner:
    r""":math:`A = I`: :math:`z' = z + \epsilon g + \sqrt{2\epsilon}\,\xi`."""

    name = "identity"

    def prepare(self, flow: LatentFlow, state: MALAState) -> None:
        return None

    def propose(
        self, flow: LatentFlow, state: MALAState, step_size: Tensor, noise: Tensor
    ) -> tuple[Tensor, Tensor]:
        eps = step_size[..., None] if step_size.dim() else step_size
        z_new = state.z + eps * state.grad + torch.sqrt(2 * eps) * noise
        return z_new, -0.5 * noise.square().sum(-1) + _log_normalizer(state.z.shape[-1], step_size)

    def log_proposal_density(
        self, flow: LatentFlow, z_to: Tensor, state_from: MALAState, step_size: Tensor
    ) -> Tensor:
        eps = step_size[..., None] if step_size.dim() else step_size
        residual = z_to - state_from.z - eps * state_from.grad
        return -residual.square().sum(-1) / (4 * step_size) + _log_normalizer(z_to.shape[-1], step_size)


class MassMatrixPreconditioner:
    r"""A constant :math:`A = M`: with :math:`C = M^{-1} = R R^T` (:math:`R` diagonal or the Cholesky factor),

    .. math::
        z' = z + \epsilon C g + \sqrt{2\epsilon}\, R \xi, \qquad
        \log q(z' \mid z) = -\frac{|R^{-1}(z' - z - \epsilon C g)|^2}{4\epsilon} - \log|\det R|
            - \tfrac{d}{2}\log(4\pi\epsilon),

    so that, forward, :math:`\log q(z' \mid z) = -\tfrac12|\xi|^2 - \log|\det R|
    - \tfrac{d}{2}\log(4\pi\epsilon)`.

    Arguments:
        inverse_mass: :math:`C = M^{-1}`: a vector ``(d,)`` (diagonal) or a matrix ``(d, d)`` (dense).

    Example:
        >>> precond = MassMatrixPreconditioner(torch.tensor([4.0, 0.25]))
        >>> precond.inverse_mass
        tensor([4.0000, 0.2500])
    """

    name = "mass"

    def __init__(self, inverse_mass: Tensor) -> None:
        self.set_inverse_mass(inverse_mass)

    def set_inverse_mass(self, inverse_mass: Tensor) -> None:
        """Sets :math:`C = M^{-1}` (a vector: diagonal; a matrix: dense)."""
        inverse_mass = torch.as_tensor(inverse_mass)
        self.dense = inverse_mass.dim() == 2
        self.inverse_mass = inverse_mass
        self._root = torch.linalg.cholesky(inverse_mass) if self.dense else inverse_mass.sqrt()
        self._log_det_root = (torch.diagonal(self._root) if self.dense else self._root).log().sum()

    def prepare(self, flow: LatentFlow, state: MALAState) -> None:
        return None

    def _mean(self, state: MALAState, eps: Tensor) -> Tensor:
        drift = state.grad @ self.inverse_mass if self.dense else state.grad * self.inverse_mass
        return state.z + eps * drift

    def propose(
        self, flow: LatentFlow, state: MALAState, step_size: Tensor, noise: Tensor
    ) -> tuple[Tensor, Tensor]:
        eps = step_size[..., None] if step_size.dim() else step_size
        scaled = noise @ self._root.T if self.dense else noise * self._root
        z_new = self._mean(state, eps) + torch.sqrt(2 * eps) * scaled
        log_q = (
            -0.5 * noise.square().sum(-1) - self._log_det_root + _log_normalizer(state.z.shape[-1], step_size)
        )
        return z_new, log_q

    def log_proposal_density(
        self, flow: LatentFlow, z_to: Tensor, state_from: MALAState, step_size: Tensor
    ) -> Tensor:
        eps = step_size[..., None] if step_size.dim() else step_size
        residual = z_to - self._mean(state_from, eps)
        if self.dense:
            whitened = torch.linalg.solve_triangular(self._root, residual.unsqueeze(-1), upper=False).squeeze(
                -1
            )
        else:
            whitened = residual / self._root
        return (
            -whitened.square().sum(-1) / (4 * step_size)
            - self._log_det_root
            + _log_normalizer(z_to.shape[-1], step_size)
        )


class JacobianPreconditioner:
    r""":math:`A(z) = J_f(z)^T J_f(z)`, matrix-free.

    With :math:`g_x = J_f(z)^{-T} g` (the gradient in data space, a vector-Jacobian product
    through :math:`f^{-1}`, kept as the state's cache):

    .. math::
        z' = z + J_f(z)^{-1} (\epsilon g_x + \sqrt{2\epsilon}\, \xi), \qquad
        \log q(z' \mid z) = -\tfrac12 |\xi|^2 + \mathrm{ladj}(z) - \tfrac{d}{2}\log(4\pi\epsilon),

        \log q(z \mid z') = -\frac{|J_f(z')(z - z') - \epsilon g_x'|^2}{4\epsilon}
            + \mathrm{ladj}(z') - \tfrac{d}{2}\log(4\pi\epsilon),

    using :math:`J_f(z') \mu(z') = J_f(z') z' + \epsilon g_x'`. A step costs one
    Jacobian-vector product through :math:`f^{-1}`, one through :math:`f` and one
    vector-Jacobian product through :math:`f^{-1}`, besides the target's gradient.
    Exact up to the accuracy of the flow's inverse, :math:`J_{f^{-1}}(f(z)) = J_f(z)^{-1}`.
    """

    name = "jacobian"

    def prepare(self, flow: LatentFlow, state: MALAState) -> Tensor:
        return flow.vjp_to_latent(state.x, state.grad)

    def propose(
        self, flow: LatentFlow, state: MALAState, step_size: Tensor, noise: Tensor
    ) -> tuple[Tensor, Tensor]:
        eps = step_size[..., None] if step_size.dim() else step_size
        data_step = eps * state.cache + torch.sqrt(2 * eps) * noise
        z_new = state.z + flow.jvp_to_latent(state.x, data_step)
        log_q = -0.5 * noise.square().sum(-1) + state.ladj + _log_normalizer(state.z.shape[-1], step_size)
        return z_new, log_q

    def log_proposal_density(
        self, flow: LatentFlow, z_to: Tensor, state_from: MALAState, step_size: Tensor
    ) -> Tensor:
        eps = step_size[..., None] if step_size.dim() else step_size
        residual = flow.jvp_to_data(state_from.z, z_to - state_from.z) - eps * state_from.cache
        return (
            -residual.square().sum(-1) / (4 * step_size)
            + state_from.ladj
            + _log_normalizer(z_to.shape[-1], step_size)
        )


class DenseJacobianPreconditioner:
    r"""The ``"jacobian"`` preconditioner with explicit :math:`d \times d` matrices.

    :math:`\mu = z + \epsilon (J^T J)^{-1} g`, :math:`z' = \mu + \sqrt{2\epsilon}\, J^{-1}\xi`,
    and :math:`\log q` by the formula at the top of this module with ``slogdet``. The
    reference for tests; costs :math:`O(d)` backward passes and :math:`O(d^3)` algebra.
    """

    name = "dense_jacobian"

    def prepare(self, flow: LatentFlow, state: MALAState) -> None:
        return None

    def _metric(self, flow: LatentFlow, z: Tensor) -> tuple[Tensor, Tensor]:
        jac = flow.jacobian_to_data(z)
        return jac, jac.transpose(-1, -2) @ jac

    def _mean(self, state: MALAState, metric: Tensor, step_size: Tensor) -> Tensor:
        eps = step_size[..., None] if step_size.dim() else step_size
        return state.z + eps * torch.linalg.solve(metric, state.grad)

    def propose(
        self, flow: LatentFlow, state: MALAState, step_size: Tensor, noise: Tensor
    ) -> tuple[Tensor, Tensor]:
        jac, metric = self._metric(flow, state.z)
        eps = step_size[..., None] if step_size.dim() else step_size
        z_new = self._mean(state, metric, step_size) + torch.sqrt(2 * eps) * torch.linalg.solve(jac, noise)
        return z_new, self._log_density(z_new, state, metric, step_size)

    def log_proposal_density(
        self, flow: LatentFlow, z_to: Tensor, state_from: MALAState, step_size: Tensor
    ) -> Tensor:
        _, metric = self._metric(flow, state_from.z)
        return self._log_density(z_to, state_from, metric, step_size)

    def _log_density(self, z_to: Tensor, state_from: MALAState, metric: Tensor, step_size: Tensor) -> Tensor:
        residual = z_to - self._mean(state_from, metric, step_size)
        quadratic = (residual * (metric @ residual[..., None])[..., 0]).sum(-1)
        return (
            -quadratic / (4 * step_size)
            + 0.5 * torch.linalg.slogdet(metric)[1]
            + _log_normalizer(z_to.shape[-1], step_size)
        )


PRECONDITIONERS = {
    "identity": IdentityPreconditioner,
    "jacobian": JacobianPreconditioner,
    "dense_jacobian": DenseJacobianPreconditioner,
}


def get_preconditioner(name: str | Preconditioner) -> Preconditioner:
    """The preconditioner called ``name`` (``"identity"``, ``"jacobian"``, ``"dense_jacobian"``),
    or ``name`` itself if it already is a :class:`Preconditioner`."""
    if isinstance(name, str) and name in PRECONDITIONERS:
        return PRECONDITIONERS[name]()
    if not isinstance(name, str) and isinstance(name, Preconditioner):
        return name
    raise ValueError(f"unknown preconditioner {name!r}: expected one of {sorted(PRECONDITIONERS)}")
