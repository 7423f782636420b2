r"""Vectorized many-chain driver: the kernel's step math on a ``(chains, d)`` batch.

Pyro's :class:`~pyro.infer.MCMC` runs one chain per process. Sampling a trained flow for
thousands of particles wants all chains as one batch, on the flow's device and dtype:
:class:`ChainSampler` does that for any latent target (T1 or T2) and either preconditioner,
with its own warmup, and returns ArviZ data with a real chain dimension.

Step-size adaptation is **shared** by default: dual averaging is fed the mean acceptance
probability over all chains, which is nearly noise-free with many chains, so it converges in
a few dozen steps and every chain runs the same kernel (chains stay exchangeable, and R-hat
compares like with like). ``adapt="per_chain"`` adapts one step size per chain instead, for
targets whose chains sit in regions of very different scales. Either way the step size is
fixed after warmup, so the sampling phase is an exact MCMC kernel for each chain.

Example:
    >>> flow = zuko.flows.RealNVP(2)
    >>> sampler = ChainSampler(tempered_target(flow, beta=1.0), num_chains=64, seed=0)
    >>> idata = sampler.run(num_samples=20, warmup_steps=20, progress=False)
    >>> idata.posterior["x"].shape
    (64, 20, 2)
"""

from __future__ import annotations

__all__ = ["ChainSampler", "final_states", "posterior_target", "sample_chains", "tempered_target"]

import logging
import warnings

from collections.abc import Callable

import numpy as np
import torch

from torch import Tensor
from tqdm.auto import tqdm

from .adaptation import StepSizeAdapter, find_reasonable_step_size
from .arviz import SAMPLE_STATS, from_arrays
from .flow import LatentFlow
from .kernel import DIVERGENCE_WARNING_RATE
from .mala import MALAState, init_state, mala_step
from .precond import get_preconditioner
from .target import LatentTarget, PosteriorPullback, TemperedFlow

logger = logging.getLogger(__name__)


def _latent_flow(flow) -> LatentFlow:
    return flow if isinstance(flow, LatentFlow) else LatentFlow(flow)


def tempered_target(flow, beta: float = 1.0) -> TemperedFlow:
    r"""T2 for a trained flow: :math:`\log q_Z(z) - \beta\, \mathrm{ladj}(z)`."""
    return TemperedFlow(_latent_flow(flow), beta)


def posterior_target(flow, log_prob: Callable[[Tensor], Tensor], dim: int | None = None) -> PosteriorPullback:
    r"""T1 for a batched log density on data space: :math:`\log \pi_X(f(z)) + \mathrm{ladj}(z)`.

    ``dim``, when given, is checked against the flow's dimension.
    """
    flow = _latent_flow(flow)
    if dim is not None and dim != flow.dim:
        raise ValueError(f"the flow has dimension {flow.dim} but the target has dimension {dim}")
    return PosteriorPullback(flow, log_prob)


class ChainSampler:
    r"""Many MALA chains in the latent space of a flow, as one batch.

    Arguments:
        target: A latent target (:func:`tempered_target`, :func:`posterior_target`).
        num_chains: Number of chains, at least 1.
        preconditioner: ``"jacobian"`` (default, the paper's Jacobian-aware dynamics),
            ``"identity"``, ``"dense_jacobian"``, or a preconditioner object.
        step_size: Initial step size; ``None`` finds one per chain by doubling/halving.
        target_accept_prob: Acceptance probability adaptation aims at.
        adapt: ``"shared"`` (one step size for all chains) or ``"per_chain"``.
        initial_z: Initial latents ``(num_chains, d)``; by default :math:`z_0 \sim q_Z`.
        seed: Seed of the sampler's own random generator; the same seed gives the same chains
            (on the same machine and device).

    The current state (``state``) and step sizes (``step_size``) persist between calls, so
    :meth:`warmup` and :meth:`sample` can be called again to continue a run.
    """

    def __init__(
        self,
        target: LatentTarget,
        num_chains: int,
        *,
        preconditioner="jacobian",
        step_size: float | None = None,
        target_accept_prob: float = 0.574,
        adapt: str = "shared",
        initial_z: Tensor | None = None,
        seed: int | None = None,
    ) -> None:
        if not isinstance(target, LatentTarget):
            raise TypeError(f"target must be a LatentTarget (see tempered_target, posterior_target), got {type(target).__name__}")
        if not isinstance(num_chains, int) or num_chains < 1:
            raise ValueError(f"num_chains must be an integer >= 1, got {num_chains!r}")
        if step_size is not None and not (step_size > 0 and np.isfinite(step_size)):
            raise ValueError(f"step_size must be a finite number > 0 (or None), got {step_size!r}")
        if not 0 < target_accept_prob < 1:
            raise ValueError(f"target_accept_prob must lie in (0, 1), got {target_accept_prob!r}")
        if adapt not in ("shared", "per_chain"):
            raise ValueError(f"adapt must be 'shared' or 'per_chain', got {adapt!r}")
        self.target = target
        self.flow = target.flow
        self.num_chains = num_chains
        self.preconditioner = get_preconditioner(preconditioner) if isinstance(preconditioner, str) else preconditioner
        self.target_accept_prob = target_accept_prob
        self.adapt = adapt
        self.generator = torch.Generator(device=self.flow.device)
        if seed is None:
            seed = int(torch.randint(2**62, ()))
        self.generator.manual_seed(seed)

        z0 = self._check_initial_z(initial_z) if initial_z is not None else self.flow.sample_base((num_chains,), self.generator)
        self.state: MALAState = init_state(target, self.preconditioner, z0)
        bad = ~torch.isfinite(self.state.log_density)
        if bad.any():
            raise ValueError(
                f"{int(bad.sum())} of {num_chains} initial states have a non-finite log density: "
                "pass finite initial_z"
            )
        if step_size is None:
            step_size = find_reasonable_step_size(self.state, target, self.preconditioner, generator=self.generator)
            step_size = step_size.median().expand(num_chains) if adapt == "shared" else step_size
        self.step_size = torch.as_tensor(step_size, dtype=self.flow.dtype, device=self.flow.device).expand(num_chains).clone()
        self.num_divergent = 0
        self.num_steps = 0

    def _check_initial_z(self, z: Tensor) -> Tensor:
        if not isinstance(z, Tensor):
            raise TypeError(f"initial_z must be a tensor, got {type(z).__name__}")
        expected = (self.num_chains, self.flow.dim)
        if tuple(z.shape) != expected:
            raise ValueError(f"initial_z must have shape (num_chains, d) = {expected}, got {tuple(z.shape)}")
        if z.dtype != self.flow.dtype:
            raise TypeError(f"initial_z has dtype {z.dtype} but the flow has dtype {self.flow.dtype}")
        if z.device != self.flow.device:
            raise ValueError(f"initial_z is on {z.device} but the flow is on {self.flow.device}")
        return z

    def _step(self):
        self.state, info = mala_step(self.state, self.target, self.preconditioner, self.step_size, generator=self.generator)
        self.num_steps += 1
        self.num_divergent += int(info.diverging.sum())
        return info

    def warmup(self, num_steps: int, *, adapt_step_size: bool = True, progress: bool = True) -> Tensor:
        """Runs ``num_steps`` steps adapting the step size by dual averaging; returns the final step sizes."""
        if num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {num_steps}")
        if num_steps == 0:
            return self.step_size
        initial = self.step_size if self.adapt == "per_chain" else self.step_size[0]
        adapter = StepSizeAdapter(initial.double().cpu(), self.target_accept_prob)
        bar = tqdm(range(num_steps), desc="warmup", disable=not progress)
        try:
            for _ in bar:
                info = self._step()
                if adapt_step_size:
                    accept = info.accept_prob.double().cpu()
                    new = adapter.update(accept if self.adapt == "per_chain" else accept.mean())
                    self.step_size = new.to(self.step_size).expand(self.num_chains).clone()
                bar.set_postfix({"acc. prob": f"{float(info.accept_prob.mean()):.3f}", "step size": f"{float(self.step_size.median()):.2e}"}, refresh=False)
        finally:  # also on KeyboardInterrupt: keep the adapted step size so far, and the state
            bar.close()
            if adapt_step_size:
                self.step_size = adapter.final().to(self.step_size).expand(self.num_chains).clone()
        return self.step_size

    def sample(self, num_samples: int, *, thin: int = 1, keep_latent: bool = True, progress: bool = True):
        """Runs ``num_samples * thin`` steps at fixed step size; returns ArviZ data of every ``thin``-th state.

        Interrupted (``KeyboardInterrupt``, Ctrl-C) after at least one draw, it warns and
        returns the draws made so far; the sampler keeps its last state, so calling
        :meth:`sample` again continues the same chains.

        The posterior group holds ``x`` (data space, ``(chains, draws, d)``); the ``latent``
        group holds ``z``; ``sample_stats`` holds ``accept_prob``, ``step_size``,
        ``diverging`` and ``lp`` (the log density of ``x`` under the push-forward of the
        target, up to a constant). Stats are those of the step that produced each kept state.
        """
        if num_samples < 1 or thin < 1:
            raise ValueError(f"num_samples and thin must be >= 1, got {num_samples} and {thin}")
        draws_x, draws_z = [], []
        stats = {name: [] for name in SAMPLE_STATS}
        divergent_before, steps_before = self.num_divergent, self.num_steps
        bar = tqdm(range(num_samples * thin), desc="sampling", disable=not progress)
        try:
            for i in bar:
                info = self._step()
                if (i + 1) % thin:
                    continue
                draws_x.append(self.state.x.cpu())
                if keep_latent:
                    draws_z.append(self.state.z.cpu())
                stats["accept_prob"].append(info.accept_prob.cpu())
                stats["step_size"].append(self.step_size.cpu())
                stats["diverging"].append(info.diverging.cpu())
                stats["lp"].append((self.state.log_density - self.state.ladj).cpu())
                bar.set_postfix({"acc. prob": f"{float(info.accept_prob.mean()):.3f}"}, refresh=False)
        except KeyboardInterrupt:
            bar.close()
            kept = min(len(values) for values in [draws_x, *stats.values()] + ([draws_z] if keep_latent else []))
            if kept == 0:
                raise
            for values in [draws_x, draws_z, *stats.values()]:
                del values[kept:]  # a draw interrupted half-recorded is dropped
            warnings.warn(
                f"interrupted after {len(draws_x)} of {num_samples} draws: returning them; the sampler "
                "keeps its last state, so sample() again continues the chains",
                UserWarning,
                stacklevel=2,
            )
        self._warn_divergences(self.num_divergent - divergent_before, self.num_steps - steps_before)

        def stack(values):  # list of (chains, ...) -> (chains, draws, ...)
            return torch.stack(values, dim=1).numpy()

        groups = {"latent": {"z": stack(draws_z)}} if keep_latent else None
        return from_arrays(
            {"x": stack(draws_x)},
            {name: stack(values) for name, values in stats.items()},
            groups=groups,
            dims={"x": ["x_dim"], "z": ["z_dim"]},
        )

    def advance(self, num_steps: int, *, progress: bool = True) -> MALAState:
        """Runs ``num_steps`` steps at fixed step size without recording them; returns the state."""
        steps_before, divergent_before = self.num_steps, self.num_divergent
        for _ in tqdm(range(num_steps), desc="sampling", disable=not progress):
            self._step()
        self._warn_divergences(self.num_divergent - divergent_before, self.num_steps - steps_before)
        return self.state

    def run(self, num_samples: int, warmup_steps: int = 500, **kwargs):
        """:meth:`warmup` then :meth:`sample`; keyword arguments go to :meth:`sample` (and ``progress`` to both)."""
        self.warmup(warmup_steps, progress=kwargs.get("progress", True))
        return self.sample(num_samples, **kwargs)

    def _warn_divergences(self, divergent: int, steps: int) -> None:
        proposals = steps * self.num_chains
        if proposals and divergent > DIVERGENCE_WARNING_RATE * proposals:
            warnings.warn(
                f"{divergent} of {proposals} proposals were divergent (non-finite log density or "
                "gradient, or an error in the target or the flow) and were rejected",
                RuntimeWarning,
                stacklevel=3,
            )


def sample_chains(target: LatentTarget, num_chains: int, num_samples: int, warmup_steps: int = 500, **kwargs):
    """Builds a :class:`ChainSampler` and runs it; returns ArviZ data with a chain dimension.

    Keyword arguments go to :class:`ChainSampler` (``preconditioner``, ``seed``, ...) or to
    :meth:`ChainSampler.sample` (``thin``, ``keep_latent``, ``progress``).
    """
    run_options = {key: kwargs.pop(key) for key in ("thin", "keep_latent", "progress") if key in kwargs}
    return ChainSampler(target, num_chains, **kwargs).run(num_samples, warmup_steps, **run_options)


def final_states(
    target: LatentTarget,
    num_chains: int,
    num_steps: int,
    warmup_steps: int = 100,
    *,
    progress: bool = True,
    **kwargs,
) -> Tensor:
    r"""The paper's way: ``num_chains`` chains from :math:`z_0 \sim q_Z`, ``num_steps`` steps,
    then the final states mapped back, :math:`x = f(z_K)`: a ``(num_chains, d)`` tensor.

    The first ``warmup_steps`` of the run adapt the step size; the last ``num_steps`` use it
    fixed. Keyword arguments go to :class:`ChainSampler`.
    """
    sampler = ChainSampler(target, num_chains, **kwargs)
    sampler.warmup(warmup_steps, progress=progress)
    return sampler.advance(num_steps, progress=progress).x
