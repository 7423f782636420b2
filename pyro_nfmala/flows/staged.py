r"""The staged map of a posterior: a Gaussian stage in front of an optional flow stage,
:math:`x = \mu + L\, g(z)`.

.. math:: \mathrm{ladj}(z) = \log|\det L| + \mathrm{ladj}_g(z) = \sum_i \log L_{ii} + \mathrm{ladj}_g(z).

The Gaussian stage (:class:`GaussianStage`: :math:`\mu` and the lower-triangular :math:`L`, fixed)
whitens the posterior, however far from the origin it sits and however its coordinates are scaled
and correlated; the flow stage :math:`g` (any zuko flow, ``None`` for the identity) only has to learn
what is left. :class:`StagedFlow` is one class for both: ``flow.gaussian`` and ``flow.flow_stage``
are its two parts.

The full-rank Gaussian variational approximation is a staged map too: its flow stage is a trainable
affine map :math:`g(z) = a + B z` (:func:`affine_flow`, :math:`B` lower triangular with a positive
diagonal), fitted by reverse KL and then folded into the Gaussian stage, :math:`\mu' = \mu + L a`,
:math:`L' = L B` (:meth:`StagedFlow.folded`).

Example:
    >>> flow = StagedFlow(torch.tensor([1000.0, 0.0]), torch.tensor([[0.5, 0.0], [0.3, 2.0]]))
    >>> x, ladj = flow().transform.inv.call_and_ladj(torch.zeros(2))
    >>> x, round(float(ladj), 4)  # log 0.5 + log 2
    (tensor([1000.,    0.]), 0.0)
    >>> flow.gaussian.loc, flow.flow_stage is None
    (tensor([1000.,    0.]), True)
"""

from __future__ import annotations

__all__ = ["AffineStage", "GaussianStage", "StagedFlow", "affine_flow", "standard_normal"]

import torch
import zuko

from pyro.distributions.transforms import LowerCholeskyAffine
from torch import Tensor

from .specs import flow_spec, read_zuko_spec, record_spec


def standard_normal(dim: int, dtype: torch.dtype | None = None) -> zuko.flows.UnconditionalDistribution:
    """The base law :math:`N(0, I_d)` of a zuko flow, as a module (buffers, no parameters)."""
    zeros = torch.zeros(dim, dtype=dtype)
    return zuko.flows.UnconditionalDistribution(
        zuko.distributions.DiagNormal, zeros, torch.ones_like(zeros), buffer=True
    )


class GaussianStage(zuko.flows.LazyTransform):
    r"""The Gaussian stage :math:`x = \mu + L u` as a zuko lazy transform (data to latent, as zuko's
    transforms go: :math:`u = L^{-1}(x - \mu)`, Pyro's ``LowerCholeskyAffine`` inverted), with its fixed
    ``loc`` :math:`\mu` ``(d,)`` and ``scale_tril`` :math:`L` ``(d, d)`` as buffers: fits leave it alone.
    """

    def __init__(self, loc: Tensor, scale_tril: Tensor) -> None:
        super().__init__()
        self.register_buffer("loc", loc)
        self.register_buffer("scale_tril", scale_tril)

    def forward(self, c: Tensor | None = None):
        return LowerCholeskyAffine(self.loc, self.scale_tril).inv


class AffineStage(zuko.flows.LazyTransform):
    r"""A trainable affine map :math:`y = a + B u` as a zuko lazy transform (data to latent, as zuko's go),
    :math:`B` lower triangular with a positive diagonal: the parameters ``shift`` :math:`a`, ``lower``
    (:math:`B`'s strict lower part) and ``log_diagonal``, started at ``shift`` and ``matrix`` (by default
    the identity map)."""

    def __init__(self, shift: Tensor, matrix: Tensor) -> None:
        super().__init__()
        self.shift = torch.nn.Parameter(shift.detach().clone())
        self.lower = torch.nn.Parameter(matrix.detach().tril(-1).clone())
        self.log_diagonal = torch.nn.Parameter(torch.diagonal(matrix).detach().log().clone())

    @property
    def matrix(self) -> Tensor:
        """:math:`B`."""
        return self.lower.tril(-1) + torch.diag_embed(self.log_diagonal.exp())

    def forward(self, c: Tensor | None = None):
        return LowerCholeskyAffine(self.shift, self.matrix).inv


def affine_flow(loc: Tensor, scale_tril: Tensor) -> zuko.flows.Flow:
    r"""A zuko flow made of one :class:`AffineStage` started at :math:`x = \mu + L z` (``loc``,
    ``scale_tril``): the flow stage of the Gaussian variational approximation, in front of an identity
    Gaussian stage (:meth:`StagedFlow.folded` folds it into the Gaussian stage once fitted).

    Example:
        >>> g = affine_flow(torch.ones(2), torch.eye(2))
        >>> g().transform.inv(torch.zeros(2))
        tensor([1., 1.], grad_fn=<AddBackward0>)
    """
    return zuko.flows.Flow([AffineStage(loc, scale_tril)], standard_normal(loc.shape[-1], loc.dtype))


class StagedFlow(zuko.flows.Flow):
    r"""A Gaussian stage in front of a flow stage: :math:`x = \mu + L\, g(z)` (see the module).

    Arguments:
        loc: :math:`\mu`, shape ``(d,)``.
        scale_tril: :math:`L`, ``(d, d)``, lower triangular with a positive diagonal.
        flow: :math:`g`, a zuko flow on :math:`\mathbb{R}^d` (its base becomes the staged flow's base),
            or ``None``: the map is then the Gaussian :math:`N(\mu, L L^T)` itself.

    Attributes:
        gaussian: The Gaussian stage (:class:`~pyro_nfmala.flows.staged.GaussianStage`).
        flow_stage: The flow stage's transform (data to latent, as zuko's), ``None`` without one.
    """

    def __init__(self, loc: Tensor, scale_tril: Tensor, flow: zuko.flows.Flow | None = None) -> None:
        loc, scale_tril = torch.as_tensor(loc), torch.as_tensor(scale_tril)
        dim = loc.shape[-1]
        if loc.shape != (dim,) or scale_tril.shape != (dim, dim):
            raise ValueError(
                "loc must have shape (d,) and scale_tril (d, d), got "
                f"{tuple(loc.shape)} and {tuple(scale_tril.shape)}"
            )
        if not bool((torch.diagonal(scale_tril) > 0).all()) or not torch.equal(scale_tril, scale_tril.tril()):
            raise ValueError("scale_tril must be lower triangular with a positive diagonal")
        stage = GaussianStage(loc, scale_tril)
        if flow is None:
            super().__init__([stage], standard_normal(dim, loc.dtype))
        else:
            super().__init__([stage, flow.transform], flow.base)
        self.dim = dim
        inner_spec = None if flow is None else flow_spec(flow) or read_zuko_spec(flow)
        if flow is None or inner_spec is not None:  # else save_flow will ask for a spec
            record_spec(self, "staged_flow", (dim,), {"flow": inner_spec})

    @classmethod
    def from_covariance(
        cls, loc: Tensor, covariance: Tensor, flow: zuko.flows.Flow | None = None
    ) -> StagedFlow:
        r"""The Gaussian map :math:`N(\mu, \Sigma)` of a covariance you have: ``covariance`` is
        :math:`\Sigma` ``(d, d)``, or its diagonal ``(d,)`` (variances); :math:`L` is its Cholesky factor.

        This is a mass matrix, in the sense Pyro's NUTS takes one (an estimate of the posterior's
        covariance on the unconstrained parameters, from an earlier run or a colleague's fit), given to
        NFMALA as its map: ``NFMALA(model, flow=StagedFlow.from_covariance(mean, cov))`` fits nothing
        at setup and runs the flow check on it.

        Example:
            >>> flow = StagedFlow.from_covariance(torch.tensor([1.0, 2.0]), torch.tensor([4.0, 0.25]))
            >>> flow.scale_tril
            tensor([[2.0000, 0.0000],
                    [0.0000, 0.5000]])
        """
        loc, covariance = torch.as_tensor(loc), torch.as_tensor(covariance).to(torch.as_tensor(loc).dtype)
        if covariance.dim() == 1:
            if not bool((covariance > 0).all()) or not bool(torch.isfinite(covariance).all()):
                raise ValueError("the variances must be finite and > 0")
            return cls(loc, torch.diag(covariance.sqrt()), flow)
        try:
            scale_tril = torch.linalg.cholesky(0.5 * (covariance + covariance.mT))
        except RuntimeError as error:  # torch.linalg.LinAlgError
            raise ValueError(f"the covariance must be symmetric positive definite: {error}") from None
        return cls(loc, scale_tril, flow)

    @property
    def gaussian(self) -> GaussianStage:
        return self.transform.transforms[0]

    @property
    def flow_stage(self) -> zuko.flows.LazyTransform | None:
        return self.transform.transforms[1] if len(self.transform.transforms) > 1 else None

    @property
    def has_flow(self) -> bool:
        """Whether the map has a flow stage."""
        return self.flow_stage is not None

    @property
    def loc(self) -> Tensor:
        """:math:`\\mu`."""
        return self.gaussian.loc

    @property
    def scale_tril(self) -> Tensor:
        """:math:`L`."""
        return self.gaussian.scale_tril

    def folded(self) -> StagedFlow:
        r"""The Gaussian map of a staged map whose flow stage is affine
        (:func:`~pyro_nfmala.flows.staged.affine_flow`), the flow stage folded into the Gaussian stage:
        :math:`\mu + L(a + B z) = (\mu + L a) + (L B) z`.

        Example:
            >>> staged = StagedFlow(torch.ones(2), 2 * torch.eye(2), affine_flow(torch.ones(2), torch.eye(2)))
            >>> staged.folded().loc, staged.folded().has_flow
            (tensor([3., 3.]), False)
        """
        stage = self.flow_stage
        layers = getattr(stage, "transforms", [stage])
        if len(layers) != 1 or not isinstance(layers[0], AffineStage):
            raise ValueError(
                "only a staged map whose flow stage is one AffineStage (affine_flow) can be folded"
            )
        with torch.no_grad():
            loc = self.loc + self.scale_tril @ layers[0].shift
            scale_tril = self.scale_tril @ layers[0].matrix
        return StagedFlow(loc.detach().clone(), scale_tril.detach().clone())
