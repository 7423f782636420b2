r"""Recursions in a model, written as a few whole-tensor operations: a parallel scan.

A model whose quantities follow a recursion over time (a GARCH variance, an AR(1) path, a filter)
written as a Python loop runs one small tensor operation per time step; traced, its graph holds
thousands of them, and each evaluation pays for every one. A **first-order linear recursion**

.. math:: y_0 = b_0, \qquad y_t = a_t\, y_{t-1} + b_t \quad (t = 1, \dots, T - 1)

is a composition of affine maps :math:`y \mapsto a_t y + b_t`, an associative operation, so it takes
:math:`\lceil \log_2 T \rceil` vectorized steps instead (Hillis and Steele's scan; Blelloch 1990):
after the step of span :math:`s`, each entry holds the composition of the last :math:`2s` maps,

.. math:: (a, b)_t \leftarrow \bigl(a_t\, a_{t-s},\; a_t\, b_{t-s} + b_t\bigr) \quad (t \ge s).

It is exact (the same sums, in another order), stable for any :math:`a_t` (no division, no powers of
:math:`a` beyond the products the loop forms too), differentiable, and broadcasts over leading batch
dimensions (the chains).

The forward algorithm of a hidden Markov model is a recursion in the log semiring,
:math:`\gamma_t(k) = \log \sum_j e^{\gamma_{t-1}(j) + M_t(j, k)}`, so its total is a product of matrices
in that semiring, :math:`\gamma_0 \otimes M_1 \otimes \dots \otimes M_{T-1}`, whose factors associate
too: :func:`log_matrix_product` multiplies them pairwise, :math:`\lceil \log_2 T \rceil` rounds of
batched ``logsumexp`` (Pyro's :class:`~pyro.distributions.DiscreteHMM` does the same inside one
distribution).

Example:
    >>> factors, shocks = torch.full((5,), 0.5), torch.ones(5)
    >>> linear_recurrence(factors, shocks)
    tensor([1.0000, 1.5000, 1.7500, 1.8750, 1.9375])
"""

from __future__ import annotations

__all__ = ["linear_recurrence", "log_matrix_product"]

import torch

from torch import Tensor


def linear_recurrence(factors: Tensor, shocks: Tensor) -> Tensor:
    r""":math:`y` of :math:`y_0 = b_0`, :math:`y_t = a_t y_{t-1} + b_t`, along the last dimension (see the
    module): ``factors`` :math:`a` and ``shocks`` :math:`b` of shape ``(..., T)``, broadcast together
    (:math:`a_0` is not used).

    A GARCH(1, 1) variance :math:`\sigma_t^2 = \omega + \alpha r_{t-1}^2 + \beta \sigma_{t-1}^2` is
    ``linear_recurrence(beta, torch.cat([sigma0_sq, omega + alpha * r[..., :-1] ** 2], -1))``; an AR(1)
    path :math:`y_t = \phi y_{t-1} + \sigma \varepsilon_t` is ``linear_recurrence(phi, sigma * noise)``.

    Example:
        >>> beta = torch.tensor([[0.9], [0.5]])  # two chains
        >>> linear_recurrence(beta, torch.ones(2, 3))
        tensor([[1.0000, 1.9000, 2.7100],
                [1.0000, 1.5000, 1.7500]])
    """
    factors, shocks = torch.broadcast_tensors(torch.as_tensor(factors), torch.as_tensor(shocks))
    steps = shocks.shape[-1] if shocks.dim() else 0
    span = 1
    while span < steps:
        composed = factors[..., span:] * shocks[..., :-span] + shocks[..., span:]
        shocks = torch.cat([shocks[..., :span], composed], -1)
        factors = torch.cat([factors[..., :span], factors[..., span:] * factors[..., :-span]], -1)
        span *= 2
    return shocks


def log_matrix_product(log_matrices: Tensor) -> Tensor:
    r"""The product :math:`M_0 \otimes M_1 \otimes \dots \otimes M_{T-1}` of ``log_matrices``
    ``(..., T, K, K)`` in the log semiring, :math:`(A \otimes B)(i, k) = \log \sum_j e^{A(i, j) + B(j, k)}`,
    ``(..., K, K)``: pairwise, :math:`\lceil \log_2 T \rceil` rounds of batched ``logsumexp`` (see the
    module).

    The log likelihood of an HMM with transition log probabilities ``log_theta`` ``(K, K)`` (from row to
    column state) and emission log densities ``log_emission`` ``(T, K)``, the first state's weights
    uniform (``gamma_0 = log_emission[0]``), is ``(log_emission[0, :, None] + steps).logsumexp((-2, -1))``
    with ``steps = log_matrix_product(log_theta + log_emission[1:, None, :])``.

    Example:
        >>> log_half = torch.full((3, 2, 2), 0.5).log()  # three steps of a fair two-state chain
        >>> log_matrix_product(log_half).exp()
        tensor([[0.5000, 0.5000],
                [0.5000, 0.5000]])
    """
    log_matrices = torch.as_tensor(log_matrices)
    if log_matrices.dim() < 3 or log_matrices.shape[-3] == 0:
        raise ValueError(
            f"expected log matrices of shape (..., T, K, K) with T >= 1, got {tuple(log_matrices.shape)}"
        )
    while log_matrices.shape[-3] > 1:
        odd = log_matrices.shape[-3] % 2
        even = log_matrices[..., : log_matrices.shape[-3] - odd, :, :]
        pairs = torch.logsumexp(even[..., 0::2, :, :, None] + even[..., 1::2, None, :, :], -2)
        log_matrices = torch.cat([pairs, log_matrices[..., -1:, :, :]], -3) if odd else pairs
    return log_matrices[..., 0, :, :]
