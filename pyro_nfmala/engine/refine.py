r"""Flow adaptation in warmup: the flow refitted to what the chains visited, by score matching or
maximum likelihood.

During warmup, every few steps the flow takes a few Adam steps on the data-space states
:math:`x_1, \dots, x_n` that the chains visited (the most recent ``buffer_size`` of them), and the
chains go on from the same data-space points, now at :math:`z_i = f_\theta^{-1}(x_i)` in the new
flow's latent space. Two losses, and their sum (``loss="fisher+likelihood"``, the default for the
library's own staged maps; maximum likelihood is the default for other flows):

- ``loss="fisher"`` (nutpie's flow adaptation, Seyboldt, Carlson & Carpenter): the
  Fisher divergence between the flow's law :math:`q_\theta` and the posterior, read at the visited
  points, with the posterior's scores :math:`s_i = \nabla_x \log \pi_X(x_i)` that the chains
  already computed (the data-space score is recovered from the latent gradient of the state,
  :math:`s = J_{f^{-1}}(x)^T \nabla_z \log \pi(z) + \nabla_x \log|\det J_{f^{-1}}(x)|`: one flow
  pass, no model evaluation),

  .. math:: \min_\theta \; \frac{1}{n} \sum_{i=1}^n \big\| W^T \big(\nabla_x \log q_\theta(x_i)
            - s_i\big) \big\|^2 ,

  in whitened coordinates (:math:`W = L` the Gaussian stage's factor for a
  :class:`~pyro_nfmala.flows.staged.StagedFlow`, else the visited points' standard deviations), so the loss
  does not depend on the parameters' scales. Every visited point counts, whether or not it is
  distributed as the posterior yet: the score says where the mass is, not only the draws;
- ``loss="likelihood"`` (as flowMC does): maximum likelihood on the visited points,
  :math:`\min_\theta -\frac{1}{n} \sum_i \log q_\theta(x_i)`.

Score matching alone is blind to where the flow puts mass away from the visited points (the scores
are local: a flow can match them there and put most of its mass elsewhere, and bounded splines do),
and to how mass splits between modes that no chain links; maximum likelihood anchors the mass on
the visited points, in the proportions the chains visit them, and the scores shape it where few
draws are (a funnel's neck). Measured on the centred eight schools (32 chains, 400 warmup steps):
Pareto k-hat of the adapted flow 0.28 with the Fisher loss alone (but 28% of its draws outside the
support), 1.02 with maximum likelihood alone, 0.31 with the sum (importance ESS 60% of its draws).
Score matching needs a flow whose transforms reach the points: on a spline flow bounded to
:math:`[-5, 5]` (zuko's ``NSF``) with points beyond the bound it fitted a flow far from the target,
hence maximum likelihood by default for flows that are not the library's own.

**Refinement stops before sampling.** A kernel whose flow is refitted to the chain's own history is
adaptive MCMC: the flow becomes a function of past states, the draws are no longer a Markov chain
with the posterior as its invariant law, and nothing bounds the error that this adds (Roberts &
Rosenthal, 2007, give the conditions under which adaptation is still valid; refitting a flow on
recent states meets none of them in general). Both samplers refine only in warmup, and not in the
last quarter of it (the step size and mass matrix adapt to the final flow there), so that sampling is
one fixed, exact kernel.

**A flow cannot learn a mode that no chain visits.** Refinement trains on where the chains are,
and latent moves, local or global, go where the flow puts mass. A mode far from everything the
flow covers stays missing, and nothing in the chains shows it (every chain agrees); Grenioux,
Durmus, Moulines & Gabrié (ICML 2023) discuss this limit of flow-based samplers. Many chains
started apart make it likelier that some reach each mode.

Example:
    >>> flow = LatentFlow(zuko.flows.NSF(2, transforms=2))
    >>> refiner = FlowRefiner(flow, steps=5)  # maximum likelihood: not a staged map
    >>> refiner.add(torch.randn(256, 2) + 3.0)
    >>> refined = refiner.refine()  # a new frozen LatentFlow; `flow` is unchanged
    >>> bool(refined.to_data(torch.zeros(1, 2))[0].mean() > flow.to_data(torch.zeros(1, 2))[0].mean())
    True
"""

from __future__ import annotations

__all__ = ["LOSSES", "FlowRefiner", "fisher_divergence"]

import copy

import torch
import zuko

from torch import Tensor

from ..flows.latent import LatentFlow
from ..flows.staged import StagedFlow
from .validation import check_count, check_positive

#: The losses a refiner can minimize.
LOSSES = ("fisher", "likelihood", "fisher+likelihood")


def fisher_divergence(
    module: torch.nn.Module, x: Tensor, score: Tensor, whitening: Tensor, *, with_log_prob: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    r"""The whitened Fisher divergence :math:`\frac{1}{n}\sum_i \|W^T(\nabla_x \log q(x_i) - s_i)\|^2`
    of the zuko flow ``module`` at points ``x`` ``(n, d)`` with target scores ``score`` ``(n, d)``;
    ``whitening`` is :math:`W`, a ``(d, d)`` matrix or a ``(d,)`` diagonal. Differentiable in the
    flow's parameters (a double backward). With ``with_log_prob``, also returns :math:`\log q(x_i)`,
    which it computes on the way.

    Example:
        >>> flow = zuko.flows.MAF(2, transforms=1)
        >>> x = torch.randn(64, 2)
        >>> loss = fisher_divergence(flow, x, -x, torch.ones(2))  # the scores of N(0, I)
        >>> loss.shape, bool(loss >= 0)
        (torch.Size([]), True)
    """
    x = x.detach().requires_grad_(True)
    log_q = module().log_prob(x)
    (grad,) = torch.autograd.grad(log_q.sum(), x, create_graph=True)
    difference = grad - score
    whitened = difference @ whitening if whitening.dim() == 2 else difference * whitening
    divergence = whitened.square().sum(-1).mean()
    return (divergence, log_q) if with_log_prob else divergence


class FlowRefiner:
    r"""Refits a flow on points (and their scores) collected from the chains.

    Arguments:
        flow: The flow to refine (given as a :class:`zuko.flows.Flow` module): a trainable copy is
            made, the flow itself is not changed.
        loss: ``"fisher+likelihood"`` (their sum), ``"fisher"`` (score matching) or ``"likelihood"``
            (see the module); ``"auto"`` (the default): the sum for the library's own staged maps
            (:class:`~pyro_nfmala.flows.staged.StagedFlow`), maximum likelihood for other flows.
        steps: Adam steps per :meth:`refine`.
        lr: Adam's learning rate (its state persists from one refinement to the next).
        batch_size: Points per Adam step, drawn from those kept (all of them if fewer).
        buffer_size: The most recent points kept for training (older ones are forgotten: early
            warmup states have not reached the posterior yet).
        generator: Random generator of the minibatches.
        single_precision: Train a float64 staged map's flow stage in float32 (the default), on
            the points whitened by its Gaussian stage in float64, :math:`u = L^{-1}(x - \mu)`, with the
            scores :math:`L^T s`: the same losses up to a constant, 1.5x faster Adam steps; the refined
            flow is float64 again. Other flows train in their own dtype.
    """

    def __init__(
        self,
        flow: LatentFlow,
        *,
        loss: str = "auto",
        steps: int = 20,
        lr: float = 1e-3,
        batch_size: int = 256,
        buffer_size: int = 4096,
        generator: torch.Generator | None = None,
        single_precision: bool = True,
    ) -> None:
        steps, batch_size, buffer_size = (
            check_count(f"refinement {name}", value)
            for name, value in (("steps", steps), ("batch_size", batch_size), ("buffer_size", buffer_size))
        )
        lr = check_positive("refinement lr", lr)
        if loss not in (*LOSSES, "auto"):
            raise ValueError(f"refinement loss must be 'auto' or one of {LOSSES}, got {loss!r}")
        self.module = flow.trainable_copy()
        if loss == "auto":
            loss = "fisher+likelihood" if isinstance(self.module, StagedFlow) else "likelihood"
        #: the flow stage trained in float32 on whitened points (``single_precision``), else ``None``
        self._stage32: zuko.flows.Flow | None = None
        module = self.module
        if (
            single_precision
            and isinstance(module, StagedFlow)
            and module.has_flow
            and module.loc.dtype == torch.float64
        ):
            self._stage32 = zuko.flows.Flow(
                copy.deepcopy(module.flow_stage).float(), copy.deepcopy(module.base).float()
            )
        self._trained = self.module if self._stage32 is None else self._stage32
        self.optimizer = torch.optim.Adam(self._trained.parameters(), lr=lr)
        self.loss, self.steps, self.batch_size, self.buffer_size = loss, steps, batch_size, buffer_size
        self.generator = generator
        self._points: Tensor | None = None
        self._scores: Tensor | None = None
        self.losses: list[float] = []

    @property
    def num_points(self) -> int:
        """How many points are kept for the next refinement."""
        return 0 if self._points is None else len(self._points)

    def add(self, x: Tensor, latent_grad: Tensor | None = None, flow: LatentFlow | None = None) -> None:
        r"""Collects the chains' data-space states ``x`` ``(chains, d)``; for the Fisher loss also their
        latent gradients :math:`\nabla_z \log \pi(z)` under ``flow`` (the flow they were computed with),
        from which the data-space scores are recovered. Non-finite points are left out."""
        x = x.detach().reshape(-1, x.shape[-1])
        score = None
        if self.loss != "likelihood":
            if latent_grad is None or flow is None:
                raise ValueError("the Fisher loss needs the states' latent gradients and their flow")
            with torch.enable_grad():
                score = flow.data_gradient(x, latent_grad.detach().reshape(x.shape)).detach()
            finite = torch.isfinite(x).all(-1) & torch.isfinite(score).all(-1)
            score = score[finite]
        else:
            finite = torch.isfinite(x).all(-1)
        self._points = self._keep(self._points, x[finite])
        if score is not None:
            self._scores = self._keep(self._scores, score)

    def _keep(self, kept: Tensor | None, new: Tensor) -> Tensor:
        both = new if kept is None else torch.cat([kept, new])
        return both[-self.buffer_size :]

    def _whitening(self, points: Tensor) -> Tensor:
        if isinstance(self.module, StagedFlow):
            return self.module.scale_tril
        return points.std(0).clamp(min=1e-8) if len(points) > 1 else torch.ones_like(points[0])

    def _training_data(self) -> tuple[Tensor, Tensor | None, Tensor, float]:
        r"""The points and scores to train on, the whitening of the Fisher loss, and the constant that
        the losses differ by: in the float32 path the whitened points :math:`u = L^{-1}(x - \mu)` and
        scores :math:`L^T s` (so the whitening is the identity), and
        :math:`\log q(x) = \log q_g(u) - \log|\det L|`."""
        if self._stage32 is None:
            return self._points, self._scores, self._whitening(self._points), 0.0
        scale_tril = self.module.scale_tril
        with torch.no_grad():
            points = self.module.gaussian()(self._points)  # the Gaussian stage: x to u
        scores = None if self._scores is None else self._scores @ scale_tril
        log_det = float(torch.diagonal(scale_tril).log().sum())
        whitening = torch.ones(points.shape[-1], dtype=torch.float32, device=points.device)
        return points.float(), None if scores is None else scores.float(), whitening, log_det

    def _batch_loss(self, points: Tensor, scores: Tensor | None, whitening: Tensor) -> Tensor:
        if self.loss == "likelihood":
            return -self._trained().log_prob(points).mean()
        divergence, log_q = fisher_divergence(self._trained, points, scores, whitening, with_log_prob=True)
        return divergence - log_q.mean() if self.loss == "fisher+likelihood" else divergence

    def refine(self) -> LatentFlow:
        """Takes ``steps`` Adam steps on the points kept; returns the refined flow, frozen. A step whose
        loss or gradient is not finite is skipped."""
        if self.num_points == 0:
            return LatentFlow(self.module)
        points, scores, whitening, log_det = self._training_data()
        for _ in range(self.steps):
            index = slice(None)
            if self.num_points > self.batch_size:
                index = torch.randperm(self.num_points, generator=self.generator, device=points.device)
                index = index[: self.batch_size]
            loss = self._batch_loss(points[index], None if scores is None else scores[index], whitening)
            if not torch.isfinite(loss):
                continue  # a point the flow cannot reach: skip this step rather than corrupt the flow
            self.optimizer.zero_grad()
            loss.backward()
            gradients = [p.grad for p in self._trained.parameters() if p.grad is not None]
            if not all(bool(torch.isfinite(grad).all()) for grad in gradients):
                continue
            self.optimizer.step()
            # the likelihood part of the loss in the map's own terms: log q(x) = log q_g(u) - log|det L|
            self.losses.append(loss.item() + (log_det if self.loss != "fisher" else 0.0))
        if self._stage32 is not None:
            with torch.no_grad():
                for kept, trained in zip(
                    self.module.flow_stage.parameters(), self._stage32.transform.parameters()
                ):
                    kept.copy_(trained)
        return LatentFlow(self.module)
