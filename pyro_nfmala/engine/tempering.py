r"""Preview the tempered target T2 before running chains: importance weights on naive draws.

T2 is the latent law :math:`\pi_\beta(z) \propto q_Z(z)\, |\det J_f(z)|^{-\beta}`, so draws
:math:`z_i \sim q_Z` (naive sampling) weighted by

.. math:: w_i \propto \exp(-\beta\, \mathrm{ladj}(z_i)), \qquad \sum_i w_i = 1,

estimate any expectation under T2: :math:`E_{\pi_\beta}[h(f(z))] \approx \sum_i w_i\, h(x_i)`
(self-normalized importance sampling). One batch of flow passes gives the whole curve over
:math:`\beta`: what tempering removes (samples between modes) and what it distorts (mode
weights, class balance), to choose :math:`\beta` before any MCMC. The Kish effective sample size
:math:`1 / \sum_i w_i^2` says when the estimate can be trusted: when it collapses to a handful
of draws, T2 at that :math:`\beta` is dominated by regions that naive sampling almost never
visits (often where the flow contracts space far more than anywhere the data went), and the
chains will go there too.

The latent chains sample T2 itself, with no importance weights; in high dimension, where the
weights degenerate at small :math:`\beta`, they are the only way to sample it. Where the preview
is reliable, it is also a check on the chains: both estimate the same numbers.

Example:
    >>> import zuko
    >>> flow = zuko.flows.NSF(2, transforms=2)
    >>> preview = preview_tempering(flow, betas=[0.0, 1.0], num_samples=1000)
    >>> preview.x.shape, preview.weights.shape
    (torch.Size([1000, 2]), torch.Size([2, 1000]))
    >>> round(float(preview.ess[0]))  # beta = 0 is naive sampling: every draw counts
    1000
"""

from __future__ import annotations

__all__ = ["TemperingPreview", "preview_tempering", "tempered_weights"]

import math

from typing import NamedTuple, Sequence

import torch

from torch import Tensor

from ..flows.latent import as_latent_flow
from .targets import check_beta


class TemperingPreview(NamedTuple):
    """Naive draws and their T2 importance weights, one row of weights per beta."""

    betas: Tensor  #: the values of beta, ``(B,)``
    z: Tensor  #: latent draws :math:`z \sim q_Z`, ``(n, d)``
    x: Tensor  #: their images :math:`f(z)`, ``(n, d)``
    ladj: Tensor  #: :math:`\log|\det J_f(z)|`, ``(n,)``
    weights: Tensor  #: self-normalized importance weights of T2 at each beta, ``(B, n)``
    ess: Tensor  #: Kish effective sample size of each row of weights, ``(B,)``

    def expect(self, values: Tensor) -> Tensor:
        """T2 expectations, one per beta, of per-draw ``values`` of shape ``(n,)`` or ``(n, k)``."""
        return self.weights @ values.to(self.weights.dtype)


def tempered_weights(ladj: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    r"""Self-normalized weights :math:`w_i \propto e^{-\beta\, \mathrm{ladj}_i}` and their ESS.

    ``ladj`` holds :math:`\log |\det J_f(z_i)|` of draws :math:`z_i \sim q_Z`; draws with a
    non-finite ``ladj`` get weight 0 (they are rejected proposals for the chains too).

    Example:
        >>> weights, ess = tempered_weights(
        ...     torch.tensor([0.0, 0.0, math.log(2.0)], dtype=torch.float64), beta=1.0
        ... )
        >>> [round(w, 6) for w in weights.tolist()], round(float(ess), 3)
        ([0.4, 0.4, 0.2], 2.778)
    """
    beta = check_beta(beta)
    ladj = ladj.double()
    finite = torch.isfinite(ladj)
    if not finite.any():
        raise ValueError("no draw has a finite log-determinant: the flow fails on its own latent draws")
    log_weights = torch.where(finite, -beta * ladj, -math.inf)
    weights = torch.softmax(log_weights, dim=-1)
    return weights, 1 / weights.square().sum()


def preview_tempering(
    flow,
    betas: Sequence[float],
    num_samples: int = 10_000,
    *,
    batch_size: int = 2048,
    generator: torch.Generator | None = None,
) -> TemperingPreview:
    r"""Draws ``num_samples`` naive samples of ``flow`` and weighs them for T2 at each of ``betas``.

    ``flow`` is a zuko flow (or a :class:`~pyro_nfmala.LatentFlow`). Flow passes run without
    gradients, ``batch_size`` draws at a time; the result stays on the flow's device.
    """
    flow = as_latent_flow(flow)
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
    z = flow.sample_base((int(num_samples),), generator=generator)
    xs, ladjs = [], []
    with torch.no_grad():
        for chunk in z.split(batch_size):
            x, ladj = flow.to_data(chunk)
            xs.append(x)
            ladjs.append(ladj)
    ladj = torch.cat(ladjs)
    rows = [tempered_weights(ladj, beta) for beta in betas]
    weights = torch.stack([row[0] for row in rows])
    ess = torch.stack([row[1] for row in rows])
    return TemperingPreview(
        torch.as_tensor([float(b) for b in betas], dtype=torch.float64), z, torch.cat(xs), ladj, weights, ess
    )
