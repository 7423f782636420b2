r"""Preconditioners :math:`A(z)` for latent MALA.

A preconditioner proposes :math:`z' \sim q(\cdot \mid z) = \mathcal{N}(\mu(z), 2\epsilon A(z)^{-1})`
with :math:`\mu(z) = z + \epsilon A(z)^{-1} \nabla \log \pi(z)`, and evaluates the normalized
proposal log density

.. math:: \log q(z' \mid z) = -\frac{(z' - \mu)^T A (z' - \mu)}{4 \epsilon}
          + \frac{1}{2} \log \det A - \frac{d}{2} \log(4 \pi \epsilon) .

- ``"identity"``: :math:`A = I`, plain MALA on the latent target.
- ``"jacobian"``: :math:`A(z) = J_f(z)^T M J_f(z)`, the metric that data space (with a constant
  data-space mass matrix :math:`M`, the identity unless adapted) induces on latent space,
  matrix-free: :math:`A^{-1} g = J^{-1} M^{-1} (J^{-T} g)`, noise :math:`J^{-1} M^{-1/2} \xi`,
  quadratic form :math:`|M^{1/2} J (z' - \mu)|^2` and :math:`\frac12 \log\det A = \mathrm{ladj}(z)
  + \frac12 \log\det M`. One step is one Langevin step in data space, linearized through
  :math:`J_f(z)`.
- ``"dense_jacobian"``: the jacobian metric (with :math:`M = I`) with explicit Jacobians and
  linear solves; the reference the tests compare against, for small ``d`` only.
- ``"data_space"`` (:class:`DataSpacePreconditioner`): the same data-space Langevin step without
  the linearization: :math:`x' = x + \epsilon M^{-1} \nabla_x \log p_X(x) + \sqrt{2\epsilon}
  M^{-1/2}\xi` on the target's density in data space, mapped back exactly, :math:`z' = f^{-1}(x')`.
  Not a Gaussian proposal in :math:`z`: its ``log q`` is the data-space density plus
  :math:`\mathrm{ladj}(z')`.
- :class:`MassMatrixPreconditioner`: a constant :math:`A = M`, diagonal or dense, whose inverse
  :math:`M^{-1}` the samplers adapt in warmup to the covariance of the chains' latent states
  (:mod:`pyro_nfmala.adaptation`); with :math:`M = I` it is ``"identity"``.

Every preconditioner follows the :class:`Preconditioner` protocol: ``prepare(flow, state)``
returns what it wants to keep about a state (its cache, stored in ``state.cache``, opaque to
the step), ``propose(flow, state, step_size, noise)`` returns :math:`(z', \log q(z' \mid z))`,
and ``log_proposal_density(flow, state_to, state_from, step_size)`` returns
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
    "ConstantMetric",
    "DataSpaceMass",
    "DataSpacePreconditioner",
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
        self, flow: LatentFlow, state_to: MALAState, state_from: MALAState, step_size: Tensor
    ) -> Tensor:
        r"""Returns :math:`\log q(z_\mathrm{to} \mid z_\mathrm{from})` (the states carry :math:`x`,
        :math:`\mathrm{ladj}` and the gradient at both ends)."""


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
        self, flow: LatentFlow, state_to: MALAState, state_from: MALAState, step_size: Tensor
    ) -> Tensor:
        eps = step_size[..., None] if step_size.dim() else step_size
        residual = state_to.z - state_from.z - eps * state_from.grad
        return -residual.square().sum(-1) / (4 * step_size) + _log_normalizer(state_to.z.shape[-1], step_size)


class ConstantMetric:
    r"""A constant mass matrix :math:`M`, kept as :math:`C = M^{-1} = R R^T` (:math:`R` diagonal, or the
    Cholesky factor of a dense :math:`C`): the algebra the mass-matrix preconditioners share.

    Arguments:
        inverse_mass: :math:`C = M^{-1}`: a vector ``(d,)`` (diagonal) or a matrix ``(d, d)`` (dense).
    """

    def __init__(self, inverse_mass: Tensor) -> None:
        inverse_mass = torch.as_tensor(inverse_mass)
        self.dense = inverse_mass.dim() == 2
        self.inverse_mass = inverse_mass
        self.root = torch.linalg.cholesky(inverse_mass) if self.dense else inverse_mass.sqrt()
        #: :math:`\log|\det R| = -\frac12 \log\det M`
        self.log_det_root = (torch.diagonal(self.root) if self.dense else self.root).log().sum()

    def times_inverse_mass(self, v: Tensor) -> Tensor:
        """:math:`C v` for a batch of vectors ``(..., d)``."""
        return v @ self.inverse_mass if self.dense else v * self.inverse_mass

    def times_root(self, v: Tensor) -> Tensor:
        """:math:`R v`."""
        return v @ self.root.T if self.dense else v * self.root

    def whiten(self, v: Tensor) -> Tensor:
        """:math:`R^{-1} v`, so that :math:`|R^{-1} v|^2 = v^T M v`."""
        if not self.dense:
            return v / self.root
        return torch.linalg.solve_triangular(self.root, v.unsqueeze(-1), upper=False).squeeze(-1)


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
    space = "latent"  # the samplers adapt M^-1 to the covariance of the chains' latent states

    def __init__(self, inverse_mass: Tensor) -> None:
        self.set_inverse_mass(inverse_mass)

    def set_inverse_mass(self, inverse_mass: Tensor) -> None:
        """Sets :math:`C = M^{-1}` (a vector: diagonal; a matrix: dense)."""
        self.metric = ConstantMetric(inverse_mass)

    @property
    def inverse_mass(self) -> Tensor:
        return self.metric.inverse_mass

    def prepare(self, flow: LatentFlow, state: MALAState) -> None:
        return None

    def _mean(self, state: MALAState, eps: Tensor) -> Tensor:
        return state.z + eps * self.metric.times_inverse_mass(state.grad)

    def propose(
        self, flow: LatentFlow, state: MALAState, step_size: Tensor, noise: Tensor
    ) -> tuple[Tensor, Tensor]:
        eps = step_size[..., None] if step_size.dim() else step_size
        z_new = self._mean(state, eps) + torch.sqrt(2 * eps) * self.metric.times_root(noise)
        log_q = (
            -0.5 * noise.square().sum(-1)
            - self.metric.log_det_root
            + _log_normalizer(state.z.shape[-1], step_size)
        )
        return z_new, log_q

    def log_proposal_density(
        self, flow: LatentFlow, state_to: MALAState, state_from: MALAState, step_size: Tensor
    ) -> Tensor:
        eps = step_size[..., None] if step_size.dim() else step_size
        whitened = self.metric.whiten(state_to.z - self._mean(state_from, eps))
        return (
            -whitened.square().sum(-1) / (4 * step_size)
            - self.metric.log_det_root
            + _log_normalizer(state_to.z.shape[-1], step_size)
        )


class DataSpaceMass:
    """A constant data-space mass matrix for the data-space moves (:class:`JacobianPreconditioner`,
    :class:`DataSpacePreconditioner`): ``None`` (the identity) until set; the samplers adapt
    :math:`C = M^{-1}` to the covariance of the chains' data-space states."""

    space = "data"

    def __init__(self, inverse_mass: Tensor | None = None) -> None:
        self.metric = None if inverse_mass is None else ConstantMetric(inverse_mass)

    def set_inverse_mass(self, inverse_mass: Tensor) -> None:
        """Sets the data-space :math:`C = M^{-1}` (a vector: diagonal; a matrix: dense)."""
        self.metric = ConstantMetric(inverse_mass)

    def _times_inverse_mass(self, v: Tensor) -> Tensor:
        return v if self.metric is None else self.metric.times_inverse_mass(v)

    def _times_root(self, v: Tensor) -> Tensor:
        return v if self.metric is None else self.metric.times_root(v)

    def _whiten(self, v: Tensor) -> Tensor:
        return v if self.metric is None else self.metric.whiten(v)

    def _log_det_root(self) -> Tensor | float:
        return 0.0 if self.metric is None else self.metric.log_det_root


class JacobianPreconditioner(DataSpaceMass):
    r""":math:`A(z) = J_f(z)^T M J_f(z)`, matrix-free, with a constant data-space mass matrix :math:`M`
    (:math:`M = I` unless the samplers adapt it; :math:`C = M^{-1} = R R^T`).

    With :math:`g_x = J_f(z)^{-T} g` (the gradient of :math:`\log \pi(f^{-1}(x))` in data space, a
    vector-Jacobian product through :math:`f^{-1}`, kept as the state's cache):

    .. math::
        z' = z + J_f(z)^{-1} (\epsilon C g_x + \sqrt{2\epsilon}\, R \xi), \qquad
        \log q(z' \mid z) = -\tfrac12 |\xi|^2 + \mathrm{ladj}(z) - \log|\det R|
            - \tfrac{d}{2}\log(4\pi\epsilon),

        \log q(z \mid z') = -\frac{|R^{-1}(J_f(z')(z - z') - \epsilon C g_x')|^2}{4\epsilon}
            + \mathrm{ladj}(z') - \log|\det R| - \tfrac{d}{2}\log(4\pi\epsilon),

    using :math:`J_f(z') \mu(z') = J_f(z') z' + \epsilon C g_x'`. A step costs one
    Jacobian-vector product through :math:`f^{-1}`, one through :math:`f` and one
    vector-Jacobian product through :math:`f^{-1}`, besides the target's gradient.
    Exact up to the accuracy of the flow's inverse, :math:`J_{f^{-1}}(f(z)) = J_f(z)^{-1}`.
    This is the data-space Langevin step of :class:`DataSpacePreconditioner` linearized through
    :math:`J_f(z)`: it is accurate only while :math:`J_f` changes little over a step.

    Arguments:
        inverse_mass: :math:`C`, a vector ``(d,)`` or a matrix ``(d, d)``; ``None``: the identity.
    """

    name = "jacobian"

    def prepare(self, flow: LatentFlow, state: MALAState) -> Tensor:
        return flow.vjp_to_latent(state.x, state.grad)

    def propose(
        self, flow: LatentFlow, state: MALAState, step_size: Tensor, noise: Tensor
    ) -> tuple[Tensor, Tensor]:
        eps = step_size[..., None] if step_size.dim() else step_size
        drift, spread = self._times_inverse_mass(state.cache), self._times_root(noise)
        data_step = eps * drift + torch.sqrt(2 * eps) * spread
        z_new = state.z + flow.jvp_to_latent(state.x, data_step)
        log_q = -0.5 * noise.square().sum(-1) + state.ladj + _log_normalizer(state.z.shape[-1], step_size)
        return z_new, log_q - self._log_det_root()

    def log_proposal_density(
        self, flow: LatentFlow, state_to: MALAState, state_from: MALAState, step_size: Tensor
    ) -> Tensor:
        eps = step_size[..., None] if step_size.dim() else step_size
        residual = flow.jvp_to_data(state_from.z, state_to.z - state_from.z)
        residual = self._whiten(residual - eps * self._times_inverse_mass(state_from.cache))
        return (
            -residual.square().sum(-1) / (4 * step_size)
            + state_from.ladj
            - self._log_det_root()
            + _log_normalizer(state_to.z.shape[-1], step_size)
        )


class DataSpacePreconditioner(DataSpaceMass):
    r"""The exact data-space move: a Langevin step in data space, mapped back through :math:`f^{-1}`.

    The latent target :math:`\pi` has, in data space, the density :math:`p_X(x) = \pi(z)\,
    |\det J_{f^{-1}}(x)|` at :math:`z = f^{-1}(x)`, so :math:`\log p_X(x) = \log \pi(z) - \mathrm{ladj}(z)`
    (for the posterior pull-back, :math:`p_X = \pi_X`; for the tempered flow measure,
    :math:`\log p_X(x) = \log q_Z(z) - (1 + \beta)\,\mathrm{ladj}(z)`). With a constant data-space
    mass matrix :math:`M` (:math:`C = M^{-1} = R R^T`, adapted in warmup by the samplers) and
    :math:`g_x = \nabla_x \log p_X(x)`:

    .. math::
        x' = x + \epsilon C g_x + \sqrt{2\epsilon}\, R \xi, \qquad z' = f^{-1}(x'),

        \log q(z' \mid z) = \log q_X(x' \mid x) + \mathrm{ladj}(z'), \qquad
        \log q_X(x' \mid x) = -\frac{|R^{-1}(x' - x - \epsilon C g_x)|^2}{4\epsilon} - \log|\det R|
            - \tfrac{d}{2}\log(4\pi\epsilon).

    The :math:`\mathrm{ladj}` terms of :math:`q` and of :math:`\pi` cancel in the acceptance ratio,
    which is exactly that of MALA on :math:`p_X` in data space: no linearization (compare
    :class:`JacobianPreconditioner`, which maps the same step back through :math:`J_f(z)^{-1}`).
    The gradient :math:`g_x = J_{f^{-1}}(x)^T \nabla_z \log \pi(z) + \nabla_x \log|\det J_{f^{-1}}(x)|`
    is one backward pass through :math:`f^{-1}` (the state's cache), and :math:`z' = f^{-1}(x')`
    one pass with its log-determinant: a step costs the target's gradient plus two passes of
    :math:`f^{-1}` (zuko's ``transform``, data to latent) and one backward. That direction is one
    pass for coupling flows (RealNVP, NICE, and MAF/NSF with ``passes=2``) and for
    autoregressive flows in zuko's native direction; for an autoregressive flow inverted so that
    :math:`f` is one pass, :math:`f^{-1}` takes ``d`` sequential passes.

    Arguments:
        inverse_mass: :math:`C`, a vector ``(d,)`` or a matrix ``(d, d)``; ``None``: the identity.

    Example:
        >>> from pyro_nfmala.mala import init_state, mala_step
        >>> from pyro_nfmala.target import TemperedFlow
        >>> target = TemperedFlow(zuko.flows.RealNVP(2, transforms=2), beta=1.0)
        >>> precond = DataSpacePreconditioner()
        >>> state = init_state(target, precond, torch.zeros(8, 2))
        >>> state, info = mala_step(state, target, precond, step_size=0.01)
        >>> info.accept_prob.shape
        torch.Size([8])
    """

    name = "data_space"

    def prepare(self, flow: LatentFlow, state: MALAState) -> Tensor:
        return flow.data_gradient(state.x, state.grad)

    def _mean(self, state: MALAState, eps: Tensor) -> Tensor:
        return state.x + eps * self._times_inverse_mass(state.cache)

    def _log_q_data(self, whitened: Tensor, step_size: Tensor) -> Tensor:
        return (
            -whitened.square().sum(-1) / (4 * step_size)
            - self._log_det_root()
            + _log_normalizer(whitened.shape[-1], step_size)
        )

    def propose(
        self, flow: LatentFlow, state: MALAState, step_size: Tensor, noise: Tensor
    ) -> tuple[Tensor, Tensor]:
        eps = step_size[..., None] if step_size.dim() else step_size
        x_new = self._mean(state, eps) + torch.sqrt(2 * eps) * self._times_root(noise)
        with torch.no_grad():
            z_new, ladj_to_latent = flow.to_latent_and_ladj(x_new)
        # whitened residual = sqrt(2 eps) xi, so the quadratic form is |xi|^2 / 2
        log_q = self._log_q_data(torch.sqrt(2 * eps) * noise, step_size) - ladj_to_latent
        return z_new, log_q

    def log_proposal_density(
        self, flow: LatentFlow, state_to: MALAState, state_from: MALAState, step_size: Tensor
    ) -> Tensor:
        eps = step_size[..., None] if step_size.dim() else step_size
        whitened = self._whiten(state_to.x - self._mean(state_from, eps))
        return self._log_q_data(whitened, step_size) + state_to.ladj


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
        self, flow: LatentFlow, state_to: MALAState, state_from: MALAState, step_size: Tensor
    ) -> Tensor:
        _, metric = self._metric(flow, state_from.z)
        return self._log_density(state_to.z, state_from, metric, step_size)

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
    "data_space": DataSpacePreconditioner,
}


def get_preconditioner(name: str | Preconditioner) -> Preconditioner:
    """The preconditioner called ``name`` (``"identity"``, ``"jacobian"``, ``"dense_jacobian"``),
    or ``name`` itself if it already is a :class:`Preconditioner`."""
    if isinstance(name, str) and name in PRECONDITIONERS:
        return PRECONDITIONERS[name]()
    if not isinstance(name, str) and isinstance(name, Preconditioner):
        return name
    raise ValueError(f"unknown preconditioner {name!r}: expected one of {sorted(PRECONDITIONERS)}")
