r"""Fitting a zuko flow: to an unnormalized density by variational inference (reverse KL), or
to samples by maximum likelihood; saving and loading a fitted flow.

With :math:`z \sim q_Z` and the latent pull-back :math:`\log \pi(z) = \log \pi_X(f(z)) +
\mathrm{ladj}(z)`, the flow :math:`f` is fitted by stochastic gradient descent on

.. math:: \mathcal{L}(f) = \mathbb{E}_{z \sim q_Z}\left[\log q_Z(z) - \log \pi_X(f(z))
          - \mathrm{ladj}(z)\right] = \mathrm{KL}(f_\# q_Z \,\|\, \pi_X) - \log Z ,

minus the ELBO. A poorly fitted flow never makes NFMALA wrong (the T1 target is exact for any
flow); it makes the latent target far from :math:`N(0, I)`, so chains mix slower: small
adapted step sizes and low ESS per draw are the signs to look for.

The flow's latent-to-data direction is used for training and sampling alike: prefer coupling
flows (``RealNVP``, ``NSF(..., passes=2)``), which are one pass in both directions.
"""

from __future__ import annotations

__all__ = ["FitResult", "default_flow", "identity_flow", "fit_flow", "fit_flow_to_model", "fit_flow_to_samples", "load_flow", "save_flow"]

import logging

from collections.abc import Callable
from typing import NamedTuple

import torch
import zuko

from torch import Tensor
from tqdm.auto import tqdm

from .target import model_density

logger = logging.getLogger(__name__)


class FitResult(NamedTuple):
    """A fitted flow and its loss history (minus the ELBO, one value per step)."""

    flow: zuko.flows.Flow
    losses: list[float]


def default_flow(dim: int, kind: str = "spline", **kwargs) -> zuko.flows.Flow:
    r"""A coupling flow sized by dimension: one pass in both directions.

    - ``kind="spline"``: ``NSF(dim, passes=2)``, monotonic rational-quadratic splines on
      :math:`[-5, 5]` (identity outside). Flexible shapes (several modes, curved ridges) for
      standardized data: the default for :func:`fit_flow_to_samples`.
    - ``kind="affine"``: ``RealNVP(dim)``, affine coupling with unbounded shifts and scales. It
      rescales whole coordinates as functions of the others (a funnel's :math:`\theta \mid \tau`)
      and reaches parameters far from the origin: the default for :func:`fit_flow_to_model`.

    ``hidden_features`` and ``transforms`` grow mildly with ``dim``; keyword arguments
    override the defaults.

    Example:
        >>> default_flow(3)().sample().shape
        torch.Size([3])
        >>> default_flow(3, kind="affine")().sample().shape
        torch.Size([3])
    """
    width = 64 if dim <= 8 else 128 if dim <= 64 else 256
    if kind == "spline":
        options = dict(transforms=3 if dim <= 2 else 4, hidden_features=(width, width))
        if dim > 1:
            options["passes"] = 2
        options.update(kwargs)
        return zuko.flows.NSF(dim, **options)
    if kind == "affine":
        options = dict(transforms=6, hidden_features=(width, width))
        options.update(kwargs)
        return zuko.flows.RealNVP(dim, **options)
    raise ValueError(f"unknown flow kind {kind!r}: expected 'spline' or 'affine'")


def identity_flow(dim: int) -> zuko.flows.Flow:
    """The identity map as a zuko flow (an element-wise affine map with zero shift and log-scale).

    NFMALA with this flow is plain MALA on the target itself: the baseline that shows what a
    fitted flow buys.

    Example:
        >>> flow = identity_flow(3)
        >>> z = torch.randn(5, 3)
        >>> torch.equal(flow().transform.inv(z), z)
        True
    """
    transform = zuko.flows.ElementWiseTransform(dim)
    for parameter in transform.phi:
        torch.nn.init.zeros_(parameter)
    base = zuko.flows.UnconditionalDistribution(zuko.distributions.DiagNormal, torch.zeros(dim), torch.ones(dim), buffer=True)
    return zuko.flows.Flow([transform], base)


def fit_flow(
    log_prob: Callable[[Tensor], Tensor],
    flow: zuko.flows.Flow,
    *,
    num_steps: int = 1000,
    num_particles: int = 32,
    lr: float = 5e-3,
    progress: bool = True,
) -> FitResult:
    r"""Fits ``flow`` (in place) to the unnormalized log density ``log_prob`` by reverse KL.

    Arguments:
        log_prob: :math:`\log \pi_X(x)` for ``x`` of shape ``(num_particles, d)``.
        flow: A zuko flow on :math:`\mathbb{R}^d`, trained in place.
        num_steps: Adam steps.
        num_particles: Latent draws per step for the Monte Carlo estimate of the loss.
        lr: Adam's learning rate (decayed by cosine annealing to 1% of it).
        progress: Show a progress bar with the running loss.

    Example:
        >>> flow = zuko.flows.RealNVP(2)
        >>> log_prob = lambda x: -0.5 * ((x - 3.0) ** 2).sum(-1)
        >>> result = fit_flow(log_prob, flow, num_steps=200, progress=False)
        >>> bool(abs(flow().sample((500,)).mean() - 3.0) < 0.3)
        True
    """
    if num_steps < 1 or num_particles < 1:
        raise ValueError(f"num_steps and num_particles must be >= 1, got {num_steps} and {num_particles}")
    optimizer = torch.optim.Adam(flow.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, num_steps, eta_min=lr / 100)
    losses: list[float] = []
    flow.train()
    bar = tqdm(range(num_steps), desc="fitting flow", disable=not progress)
    for _ in bar:
        distribution = flow()
        z = distribution.base.rsample((num_particles,))
        x, ladj = distribution.transform.inv.call_and_ladj(z)
        loss = (distribution.base.log_prob(z) - log_prob(x) - ladj).mean()
        if not torch.isfinite(loss):
            logger.debug("skipping a step with a non-finite loss")
            losses.append(float("nan"))
            continue
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if len(losses) % 25 == 0:
            bar.set_postfix(loss=f"{sum(losses[-25:]) / 25:.3f}")
    flow.eval()
    return FitResult(flow, losses)


def fit_flow_to_model(
    model: Callable,
    *model_args,
    flow: zuko.flows.Flow | None = None,
    model_kwargs: dict | None = None,
    num_steps: int = 3000,
    num_particles: int = 64,
    lr: float = 5e-3,
    progress: bool = True,
) -> FitResult:
    """Fits a flow to a Pyro model's posterior on its flat unconstrained parameters (reverse KL).

    The layout is the one :class:`~pyro_nfmala.NFMALA` uses, so the fitted flow plugs
    straight into ``NFMALA(model, flow=result.flow)``. With ``flow=None``, an affine coupling
    flow of the model's dimension is built (:func:`default_flow` with ``kind="affine"``).
    The defaults (3,000 steps of 64 particles) take about 25 s on 2 CPU cores for the
    10-dimensional eight-schools model; the model is evaluated for all particles in one
    vectorized run when it allows it.

    Reverse KL is mode-seeking: a fitted flow tends to be too narrow (in a funnel, it misses
    the neck). NFMALA stays exact (T1), but the chains mix slower where the flow is poor: look
    for a small adapted step size, low ESS per draw, R-hat above 1.01 across chains, and an
    importance-sampling ESS of the flow's draws far below their number.
    """
    density = model_density(model, model_args, model_kwargs)
    if flow is None:
        flow = default_flow(density.layout.dim, kind="affine")
    return fit_flow(density.log_prob, flow, num_steps=num_steps, num_particles=num_particles, lr=lr, progress=progress)


def fit_flow_to_samples(
    samples: Tensor,
    flow: zuko.flows.Flow | None = None,
    *,
    num_steps: int = 2000,
    batch_size: int = 512,
    lr: float = 1e-3,
    progress: bool = True,
    generator: torch.Generator | None = None,
) -> FitResult:
    r"""Fits ``flow`` (in place) to ``samples`` ``(n, d)`` by maximum likelihood, :math:`\max \sum \log q_X(x_i)`.

    With ``flow=None``, a :func:`default_flow` of the samples' dimension is built. Minibatches
    are drawn from ``samples`` with ``generator``; the loss history is the minibatch negative
    log-likelihood. Adam with cosine annealing of ``lr``.

    Example:
        >>> x = torch.randn(1000, 2) * torch.tensor([1.0, 0.1])
        >>> result = fit_flow_to_samples(x, zuko.flows.RealNVP(2), num_steps=300, progress=False)
        >>> result.losses[-1] < result.losses[0]
        True
    """
    if samples.dim() != 2:
        raise ValueError(f"samples must have shape (n, d), got {tuple(samples.shape)}")
    if flow is None:
        flow = default_flow(samples.shape[-1])
    optimizer = torch.optim.Adam(flow.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, num_steps, eta_min=lr / 100)
    losses: list[float] = []
    flow.train()
    bar = tqdm(range(num_steps), desc="fitting flow", disable=not progress)
    for _ in bar:
        index = torch.randint(len(samples), (min(batch_size, len(samples)),), generator=generator)
        loss = -flow().log_prob(samples[index]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if len(losses) % 25 == 0:
            bar.set_postfix(nll=f"{sum(losses[-25:]) / 25:.3f}")
    flow.eval()
    return FitResult(flow, losses)


def save_flow(flow: zuko.flows.Flow, path, **metadata) -> None:
    """Saves a zuko flow module, architecture and weights, with optional ``metadata`` (e.g. its loss history).

    The file is a :func:`torch.save` pickle: load only files you trust.
    """
    torch.save({"flow": flow, "metadata": metadata, "format": "pyro_nfmala.flow/1"}, path)


def load_flow(path, map_location=None, *, with_metadata: bool = False):
    """Loads a flow written by :func:`save_flow` (in ``eval()`` mode); optionally with its metadata.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "flow.pt")
        >>> save_flow(zuko.flows.RealNVP(2), path, note="demo")
        >>> flow, metadata = load_flow(path, with_metadata=True)
        >>> metadata
        {'note': 'demo'}
    """
    # weights_only=False: the file holds the module itself (trusted files only, see save_flow).
    payload = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != "pyro_nfmala.flow/1":
        raise ValueError(f"{path} was not written by pyro_nfmala.save_flow")
    flow = payload["flow"].eval()
    return (flow, payload["metadata"]) if with_metadata else flow
