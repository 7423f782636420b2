r"""The Langevin moves: preconditioners :math:`A(z)` for latent MALA, each a
:class:`~pyro_nfmala.engine.step.Move`.

A preconditioner proposes :math:`z' \sim q(\cdot \mid z) = \mathcal{N}(\mu(z), 2\epsilon A(z)^{-1})`
with :math:`\mu(z) = z + \epsilon A(z)^{-1} \nabla \log \pi(z)`, and evaluates the normalized
proposal log density

.. math:: \log q(z' \mid z) = -\frac{(z' - \mu)^T A (z' - \mu)}{4 \epsilon}
          + \frac{1}{2} \log \det A - \frac{d}{2} \log(4 \pi \epsilon) .

Each holds a constant mass matrix :math:`M` (the identity unless given), kept as its inverse
:math:`C = M^{-1} = R R^T` (:class:`ConstantMetric`: one piece of algebra for all of them), and
says where it lives (``mass_space``):

- ``"identity"`` / :class:`MassMatrixPreconditioner`: :math:`A = M`, in latent space; with
  :math:`M = I` plain MALA on the latent target.
- ``"jacobian"``: :math:`A(z) = J_f(z)^T M J_f(z)`, the metric that data space (with the
  data-space mass matrix :math:`M`) induces on latent space, matrix-free:
  :math:`A^{-1} g = J^{-1} M^{-1} (J^{-T} g)`, noise :math:`J^{-1} M^{-1/2} \xi`,
  quadratic form :math:`|M^{1/2} J (z' - \mu)|^2` and :math:`\frac12 \log\det A = \mathrm{ladj}(z)
  + \frac12 \log\det M`. One step is one Langevin step in data space, linearized through
  :math:`J_f(z)`.
- ``"data_space"`` (:class:`DataSpacePreconditioner`): the same data-space Langevin step without
  the linearization: :math:`x' = x + \epsilon M^{-1} \nabla_x \log p_X(x) + \sqrt{2\epsilon}
  M^{-1/2}\xi` on the target's density in data space, mapped back exactly, :math:`z' = f^{-1}(x')`.
  Not a Gaussian proposal in :math:`z`: its ``log q`` is the data-space density plus
  :math:`\mathrm{ladj}(z')`.

Moves are values: adapting the mass matrix (:mod:`pyro_nfmala.engine.adaptation`) makes a new move,
:meth:`Preconditioner.with_inverse_mass`, and never changes one in
place. They follow the step's :class:`~pyro_nfmala.engine.step.Move` protocol (``prepare``, ``propose``,
``log_proposal_density``); :class:`Preconditioner` adds the mass matrix.

Example:
    >>> precond = get_preconditioner("jacobian")
    >>> precond.name, precond.mass_space, isinstance(precond, Preconditioner)
    ('jacobian', 'data', True)
    >>> precond.with_inverse_mass(torch.tensor([4.0, 0.25])).inverse_mass
    tensor([4.0000, 0.2500])
"""

from __future__ import annotations

__all__ = [
    "PRECONDITIONERS",
    "ConstantMetric",
    "DataSpacePreconditioner",
    "IdentityPreconditioner",
    "JacobianPreconditioner",
    "MassMatrixPreconditioner",
    "Preconditioner",
    "get_preconditioner",
]

import copy
import math

from typing import Protocol, runtime_checkable

import torch

from torch import Tensor

from ..flows.latent import LatentFlow
from .step import ChainState, Move


@runtime_checkable
class Preconditioner(Move, Protocol):
    r"""A Langevin move: a :class:`~pyro_nfmala.engine.step.Move` with a constant mass matrix :math:`M`.

    ``mass_space`` says where :math:`M` lives (``"latent"`` or ``"data"``): the samplers adapt
    :math:`M^{-1}` to the covariance of the chains' states there.
    """

    mass_space: str

    @property
    def inverse_mass(self) -> Tensor | None:
        """:math:`C = M^{-1}` (``None``: the identity)."""

    def with_inverse_mass(self, inverse_mass: Tensor) -> Preconditioner:
        """The same move with :math:`C = M^{-1}` (a vector: diagonal; a matrix: dense)."""


def _log_normalizer(dim: int, step_size: Tensor) -> Tensor:
    return -0.5 * dim * torch.log(4 * math.pi * step_size)


class ConstantMetric:
    r"""A constant mass matrix :math:`M`, kept as :math:`C = M^{-1} = R R^T` (:math:`R` diagonal, or the
    Cholesky factor of a dense :math:`C`), or the identity: the algebra the Langevin moves share.

    Arguments:
        inverse_mass: :math:`C = M^{-1}`: a vector ``(d,)`` (diagonal), a matrix ``(d, d)`` (dense), or
            ``None`` (the identity: every product below returns its argument).
    """

    def __init__(self, inverse_mass: Tensor | None = None) -> None:
        self.inverse_mass = None if inverse_mass is None else torch.as_tensor(inverse_mass)
        self.dense = self.inverse_mass is not None and self.inverse_mass.dim() == 2
        if self.inverse_mass is None:
            self.root = None
            #: :math:`\log|\det R| = -\frac12 \log\det M`
            self.log_det_root = 0.0
            return
        self.root = torch.linalg.cholesky(self.inverse_mass) if self.dense else self.inverse_mass.sqrt()
        self.log_det_root = (torch.diagonal(self.root) if self.dense else self.root).log().sum()

    def times_inverse_mass(self, v: Tensor) -> Tensor:
        """:math:`C v` for a batch of vectors ``(..., d)``."""
        if self.inverse_mass is None:
            return v
        return v @ self.inverse_mass if self.dense else v * self.inverse_mass

    def times_root(self, v: Tensor) -> Tensor:
        """:math:`R v`."""
        if self.root is None:
            return v
        return v @ self.root.T if self.dense else v * self.root

    def whiten(self, v: Tensor) -> Tensor:
        """:math:`R^{-1} v`, so that :math:`|R^{-1} v|^2 = v^T M v`."""
        if self.root is None:
            return v
        if not self.dense:
            return v / self.root
        return torch.linalg.solve_triangular(self.root, v.unsqueeze(-1), upper=False).squeeze(-1)

    def momentum(self, noise: Tensor) -> Tensor:
        r""":math:`R^{-T} \xi`: a momentum :math:`p \sim N(0, M)` of standard normal noise :math:`\xi`."""
        if self.root is None:
            return noise
        if not self.dense:
            return noise / self.root
        return torch.linalg.solve_triangular(self.root.T, noise.unsqueeze(-1), upper=True).squeeze(-1)

    def kinetic_energy(self, p: Tensor) -> Tensor:
        r""":math:`\frac12 p^T C p = \frac12 |R^T p|^2`, shape ``p.shape[:-1]``."""
        if self.root is None:
            return 0.5 * p.square().sum(-1)
        return 0.5 * (p @ self.root if self.dense else p * self.root).square().sum(-1)


class _LangevinMove:
    """What the Langevin moves share: a constant mass matrix (:class:`ConstantMetric`), replaced only by
    :meth:`with_inverse_mass`, which returns a new move."""

    name = "langevin"
    mass_space = "latent"

    def __init__(self, inverse_mass: Tensor | None = None) -> None:
        self.metric = ConstantMetric(inverse_mass)

    @property
    def inverse_mass(self) -> Tensor | None:
        """:math:`C = M^{-1}` (``None``: the identity)."""
        return self.metric.inverse_mass

    def with_inverse_mass(self, inverse_mass: Tensor) -> _LangevinMove:
        """The same move with :math:`C = M^{-1}` (a vector: diagonal; a matrix: dense); this one is
        unchanged."""
        move = copy.copy(self)
        move.metric = ConstantMetric(inverse_mass)
        return move

    def __repr__(self) -> str:
        mass = "identity" if self.inverse_mass is None else ("dense" if self.metric.dense else "diagonal")
        return f"{type(self).__name__}(mass={mass}, mass_space={self.mass_space!r})"


class MassMatrixPreconditioner(_LangevinMove):
    r"""A constant :math:`A = M`: with :math:`C = M^{-1} = R R^T` (:math:`R` diagonal or the Cholesky factor),

    .. math::
        z' = z + \epsilon C g + \sqrt{2\epsilon}\, R \xi, \qquad
        \log q(z' \mid z) = -\frac{|R^{-1}(z' - z - \epsilon C g)|^2}{4\epsilon} - \log|\det R|
            - \tfrac{d}{2}\log(4\pi\epsilon),

    so that, forward, :math:`\log q(z' \mid z) = -\tfrac12|\xi|^2 - \log|\det R|
    - \tfrac{d}{2}\log(4\pi\epsilon)`. With :math:`M = I` this is plain MALA on the latent target
    (:class:`IdentityPreconditioner`).

    Arguments:
        inverse_mass: :math:`C = M^{-1}`: a vector ``(d,)`` (diagonal), a matrix ``(d, d)`` (dense),
            ``None``: the identity.

    Example:
        >>> precond = MassMatrixPreconditioner(torch.tensor([4.0, 0.25]))
        >>> precond.inverse_mass
        tensor([4.0000, 0.2500])
    """

    name = "mass"
    mass_space = "latent"

    def prepare(self, flow: LatentFlow, state: ChainState) -> None:
        return None

    def _mean(self, state: ChainState, eps: Tensor) -> Tensor:
        return state.z + eps * self.metric.times_inverse_mass(state.grad)

    def propose(
        self, flow: LatentFlow, state: ChainState, step_size: Tensor, noise: Tensor
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
        self, flow: LatentFlow, state_to: ChainState, state_from: ChainState, step_size: Tensor
    ) -> Tensor:
        eps = step_size[..., None] if step_size.dim() else step_size
        whitened = self.metric.whiten(state_to.z - self._mean(state_from, eps))
        return (
            -whitened.square().sum(-1) / (4 * step_size)
            - self.metric.log_det_root
            + _log_normalizer(state_to.z.shape[-1], step_size)
        )


class IdentityPreconditioner(MassMatrixPreconditioner):
    r""":math:`A = I`: :math:`z' = z + \epsilon g + \sqrt{2\epsilon}\,\xi` (a
    :class:`MassMatrixPreconditioner` with :math:`M = I`, until a mass matrix is adapted)."""

    name = "identity"

    def __init__(self) -> None:
        super().__init__(None)

    def with_inverse_mass(self, inverse_mass: Tensor) -> MassMatrixPreconditioner:
        return MassMatrixPreconditioner(inverse_mass)


class JacobianPreconditioner(_LangevinMove):
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
    mass_space = "data"

    def prepare(self, flow: LatentFlow, state: ChainState) -> Tensor:
        return flow.vjp_to_latent(state.x, state.grad)

    def propose(
        self, flow: LatentFlow, state: ChainState, step_size: Tensor, noise: Tensor
    ) -> tuple[Tensor, Tensor]:
        eps = step_size[..., None] if step_size.dim() else step_size
        drift, spread = self.metric.times_inverse_mass(state.cache), self.metric.times_root(noise)
        data_step = eps * drift + torch.sqrt(2 * eps) * spread
        z_new = state.z + flow.jvp_to_latent(state.x, data_step)
        log_q = -0.5 * noise.square().sum(-1) + state.ladj + _log_normalizer(state.z.shape[-1], step_size)
        return z_new, log_q - self.metric.log_det_root

    def log_proposal_density(
        self, flow: LatentFlow, state_to: ChainState, state_from: ChainState, step_size: Tensor
    ) -> Tensor:
        eps = step_size[..., None] if step_size.dim() else step_size
        residual = flow.jvp_to_data(state_from.z, state_to.z - state_from.z)
        residual = self.metric.whiten(residual - eps * self.metric.times_inverse_mass(state_from.cache))
        return (
            -residual.square().sum(-1) / (4 * step_size)
            + state_from.ladj
            - self.metric.log_det_root
            + _log_normalizer(state_to.z.shape[-1], step_size)
        )


class DataSpacePreconditioner(_LangevinMove):
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
        >>> from pyro_nfmala.engine.step import init_state, mala_step
        >>> from pyro_nfmala.engine.targets import TemperedFlow
        >>> target = TemperedFlow(zuko.flows.RealNVP(2, transforms=2), beta=1.0)
        >>> precond = DataSpacePreconditioner()
        >>> state = init_state(target, precond, torch.zeros(8, 2))
        >>> state, info = mala_step(state, target, precond, step_size=0.01)
        >>> info.accept_prob.shape
        torch.Size([8])
    """

    name = "data_space"
    mass_space = "data"

    def prepare(self, flow: LatentFlow, state: ChainState) -> Tensor:
        return flow.data_gradient(state.x, state.grad)

    def _mean(self, state: ChainState, eps: Tensor) -> Tensor:
        return state.x + eps * self.metric.times_inverse_mass(state.cache)

    def _log_q_data(self, whitened: Tensor, step_size: Tensor) -> Tensor:
        return (
            -whitened.square().sum(-1) / (4 * step_size)
            - self.metric.log_det_root
            + _log_normalizer(whitened.shape[-1], step_size)
        )

    def propose(
        self, flow: LatentFlow, state: ChainState, step_size: Tensor, noise: Tensor
    ) -> tuple[Tensor, Tensor]:
        eps = step_size[..., None] if step_size.dim() else step_size
        x_new = self._mean(state, eps) + torch.sqrt(2 * eps) * self.metric.times_root(noise)
        with torch.no_grad():
            z_new, ladj_to_latent = flow.to_latent_and_ladj(x_new)
        # whitened residual = sqrt(2 eps) xi, so the quadratic form is |xi|^2 / 2
        log_q = self._log_q_data(torch.sqrt(2 * eps) * noise, step_size) - ladj_to_latent
        return z_new, log_q

    def log_proposal_density(
        self, flow: LatentFlow, state_to: ChainState, state_from: ChainState, step_size: Tensor
    ) -> Tensor:
        eps = step_size[..., None] if step_size.dim() else step_size
        whitened = self.metric.whiten(state_to.x - self._mean(state_from, eps))
        return self._log_q_data(whitened, step_size) + state_to.ladj


PRECONDITIONERS = {
    "identity": IdentityPreconditioner,
    "jacobian": JacobianPreconditioner,
    "data_space": DataSpacePreconditioner,
}


def get_preconditioner(name: str | Preconditioner) -> Preconditioner:
    """A new preconditioner called ``name`` (``"identity"``, ``"jacobian"``, ``"data_space"``), or
    ``name`` itself if it already is a :class:`~pyro_nfmala.engine.step.Move`."""
    if isinstance(name, str) and name in PRECONDITIONERS:
        return PRECONDITIONERS[name]()
    if not isinstance(name, str) and isinstance(name, Move):
        return name
    raise ValueError(f"unknown preconditioner {name!r}: expected one of {sorted(PRECONDITIONERS)}")
