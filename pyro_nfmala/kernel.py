r"""NFMALA: latent-space MALA under a zuko flow, as a Pyro MCMC kernel. Pyro glue only.

The kernel moves a latent state :math:`z` and hands Pyro the unconstrained parameters of
:math:`x = f(z)`; Pyro's :class:`~pyro.infer.mcmc.api.MCMC` maps them to the constrained
space with the kernel's ``transforms``. By default it samples the exact posterior pull-back
(T1, DESIGN.md section 3),

.. math:: \log \pi(z) = -U(f(z)) + \log|\det J_f(z)|,

where :math:`U` is Pyro's potential energy, so :math:`f(z)` follows the posterior exactly for
any flow: the flow's quality changes the mixing speed, never the answer.

Example:
    >>> def model(data):
    ...     loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    ...     pyro.sample("obs", dist.Normal(loc, 1.0), obs=data)
    >>> kernel = NFMALA(model, flow=zuko.flows.NSF(1, transforms=2))
    >>> mcmc = MCMC(kernel, num_samples=200, warmup_steps=200)
    >>> mcmc.run(torch.randn(20) + 3.0)
    >>> float(mcmc.get_samples()["loc"].mean())  # doctest: +SKIP
    3.0...
"""

from __future__ import annotations

__all__ = ["NFMALA"]

import logging
import math
import warnings

from collections.abc import Callable, Mapping

import torch

from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from torch import Tensor

from .adaptation import StepSizeAdapter, find_reasonable_step_size
from .flow import LatentFlow
from .mala import MALAState, init_state, mala_step
from .precond import get_preconditioner
from .target import LatentTarget, ParamLayout, PosteriorPullback, TemperedFlow, check_flow_dim, model_density

logger = logging.getLogger(__name__)

#: Above this share of divergent (non-finite or failed) proposals after warmup, a warning is raised.
DIVERGENCE_WARNING_RATE = 0.01


class NFMALA(MCMCKernel):
    r"""Metropolis-adjusted Langevin in the latent space of a normalizing flow.

    Give either a Pyro ``model`` or a ``potential_fn`` (with ``initial_params``), as for Pyro's
    :class:`~pyro.infer.mcmc.HMC`. The flow lives on the model's unconstrained parameters,
    flattened into one vector :math:`x` in the order the model's latent sites run (for a
    ``potential_fn``: the order of ``initial_params``), each site in row-major order.

    Arguments:
        model: A Pyro model with continuous latent sites.
        potential_fn: Alternatively, Pyro's potential energy :math:`U(\mathrm{params})`, minus
            the log density of a dict of unconstrained parameters.
        flow: An unconditional zuko flow on :math:`\mathbb{R}^d`, :math:`d` the total
            unconstrained dimension. The kernel samples with a frozen deep copy of it
            (``eval()``, no parameter gradients): the user's module is never changed.
        step_size: MALA step :math:`\epsilon > 0`; if ``None``, found by doubling/halving
            from 1 at setup.
        adapt_step_size: Adapt :math:`\epsilon` by dual averaging during warmup, then fix it.
        target_accept_prob: Acceptance probability that adaptation aims at (0.574 is optimal
            for MALA).
        preconditioner: ``"identity"`` (plain MALA on the latent target, the cheapest, right
            when the flow is fitted to the posterior so that :math:`\pi \approx N(0, I)`) or
            ``"jacobian"`` (:math:`A = J_f^T J_f`, a Langevin step in data space pulled back;
            small latent steps where the flow stretches). The jacobian step undoes the flow's
            whitening: on a posterior whose data space is badly scaled (a funnel), it mixes as
            poorly as MALA in data space (measured on eight schools: step size 0.001, R-hat 4).
            Use it for the tempered target (``beta``), keep ``"identity"`` for posteriors.
        beta: ``None`` (default) samples the exact posterior (T1). A number
            :math:`\beta \ge 0` samples instead the flow's tempered measure (T2),
            :math:`\log q_Z(z) - \beta\, \mathrm{ladj}(z)`, ignoring the model's density:
            this is not the posterior.
        transforms, max_plate_nesting, jit_compile, jit_options, ignore_jit_warnings: As in
            Pyro's :class:`~pyro.infer.mcmc.HMC`.
        init_strategy: ``None`` starts each chain at a draw of the flow,
            :math:`z_0 \sim q_Z`. A Pyro init strategy (e.g.
            :func:`~pyro.infer.autoguide.initialization.init_to_median`) starts at
            :math:`f^{-1}(x_0)` instead.
        initial_params: Unconstrained initial parameters (required with ``potential_fn``).
    """

    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable[[Mapping[str, Tensor]], Tensor] | None = None,
        *,
        flow,
        step_size: float | None = None,
        adapt_step_size: bool = True,
        target_accept_prob: float = 0.574,
        preconditioner: str = "identity",
        beta: float | None = None,
        transforms: Mapping | None = None,
        max_plate_nesting: int | None = None,
        jit_compile: bool = False,
        jit_options: dict | None = None,
        ignore_jit_warnings: bool = False,
        init_strategy: Callable | None = None,
        initial_params: Mapping[str, Tensor] | None = None,
    ) -> None:
        if (model is None) == (potential_fn is None):
            raise ValueError("give exactly one of model or potential_fn")
        if potential_fn is not None and initial_params is None:
            raise ValueError("potential_fn needs initial_params: a dict of unconstrained initial values")
        if step_size is not None and not (isinstance(step_size, (int, float)) and math.isfinite(step_size) and step_size > 0):
            raise ValueError(f"step_size must be a finite number > 0 (or None), got {step_size!r}")
        if not (isinstance(target_accept_prob, (int, float)) and 0 < target_accept_prob < 1):
            raise ValueError(f"target_accept_prob must lie in (0, 1), got {target_accept_prob!r}")
        if beta is not None and not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
            raise ValueError(f"beta must be None (exact posterior) or a finite number >= 0, got {beta!r}")

        self.model = model
        self.potential_fn = potential_fn
        self.flow = LatentFlow(flow)
        self.preconditioner = get_preconditioner(preconditioner)
        self.step_size = step_size
        self.adapt_step_size = adapt_step_size
        self.target_accept_prob = float(target_accept_prob)
        self.beta = beta
        self.transforms = transforms
        self.max_plate_nesting = max_plate_nesting
        self.jit_compile = jit_compile
        self.jit_options = jit_options
        self.ignore_jit_warnings = ignore_jit_warnings
        self.init_strategy = init_strategy
        self._user_initial_params = dict(initial_params) if initial_params is not None else None

        self.layout: ParamLayout | None = None
        if potential_fn is not None:
            self.layout = ParamLayout.from_params(initial_params)
            check_flow_dim(self.flow, self.layout)
        self._reset()

    # ----------------------------------------------------------------------------------------
    # Pyro's MCMCKernel interface

    @property
    def initial_params(self) -> dict[str, Tensor] | None:
        if self._state is not None:
            return self._params
        return self._user_initial_params

    @initial_params.setter
    def initial_params(self, params: Mapping[str, Tensor] | None) -> None:
        self._user_initial_params = dict(params) if params is not None else None

    def setup(self, warmup_steps: int, *args, **kwargs) -> None:
        self._reset()
        self._warmup_steps = int(warmup_steps)
        init_x = None
        if self.model is not None:
            init_x = self._setup_model(args, kwargs)
        self._target = self._build_target()

        if self._user_initial_params is not None:
            init_x = self.layout.pack(self._user_initial_params)
        self._state = self._initial_state(init_x)

        step_size = self.step_size
        if step_size is None or (self.adapt_step_size and self._warmup_steps > 0):
            step_size = float(
                find_reasonable_step_size(self._state, self._target, self.preconditioner, step_size or 1.0)
            )
        self._step_size = step_size
        self._adapter = StepSizeAdapter(step_size, self.target_accept_prob)
        self._params = self._to_params(self._state)
        logger.debug("setup: d=%d, initial step size %.3g", self.layout.dim, step_size)

    def sample(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if params is not self._params:  # the caller changed the state: start again from params
            self._state = self._initial_state(self.layout.pack(params))
        step_size = self._step_size
        self._state, info = mala_step(self._state, self._target, self.preconditioner, step_size)
        self._t += 1

        accept_prob = float(info.accept_prob)
        diverging = bool(info.diverging)
        self._accept_sum += accept_prob
        if self._t <= self._warmup_steps:
            self._warmup_divergences += diverging
            if self.adapt_step_size:
                self._step_size = float(self._adapter.update(accept_prob))
                if self._t == self._warmup_steps:
                    self._step_size = float(self._adapter.final())
        else:
            if diverging:
                self._divergences.append(self._t - self._warmup_steps - 1)
            stats = self._stats
            stats["accept_prob"].append(accept_prob)
            stats["step_size"].append(float(step_size))
            stats["diverging"].append(diverging)
            stats["lp"].append(float(self._state.log_density - self._state.ladj))

        self._params = self._to_params(self._state)
        return self._params

    def logging(self) -> dict[str, str]:
        return {
            "step size": f"{self._step_size:.2e}",
            "acc. prob": f"{self._accept_sum / max(self._t, 1):.3f}",
        }

    def diagnostics(self) -> dict:
        draws = len(self._stats["accept_prob"])
        accept_rate = sum(self._stats["accept_prob"]) / draws if draws else float("nan")
        if draws and len(self._divergences) > DIVERGENCE_WARNING_RATE * draws:
            warnings.warn(
                f"NFMALA: {len(self._divergences)} of {draws} proposals after warmup were divergent "
                "(non-finite log density or gradient, or an error in the model or the flow) and "
                "were rejected. The chain is still valid; check the model's support and the flow.",
                RuntimeWarning,
                stacklevel=2,
            )
        return {
            "divergences": list(self._divergences),
            "acceptance rate": accept_rate,
            "warmup divergences": self._warmup_divergences,
            "step size": self._step_size,
            "sample_stats": {name: list(values) for name, values in self._stats.items()},
        }

    def cleanup(self) -> None:
        self._reset()

    # ----------------------------------------------------------------------------------------
    # internals

    def _reset(self) -> None:
        """Forgets all per-chain state (but not what the user gave)."""
        self._state: MALAState | None = None
        self._params: dict[str, Tensor] | None = None
        self._target: LatentTarget | None = None
        self._potential: Callable | None = None
        self._t = 0
        self._warmup_steps = 0
        self._step_size = self.step_size if self.step_size is not None else float("nan")
        self._adapter = None
        self._accept_sum = 0.0
        self._warmup_divergences = 0
        self._divergences: list[int] = []
        self._stats = {"accept_prob": [], "step_size": [], "diverging": [], "lp": []}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_state=None, _params=None, _target=None, _potential=None)
        return state


    def _setup_model(self, args: tuple, kwargs: dict) -> Tensor | None:
        density = model_density(
            self.model,
            args,
            kwargs,
            transforms=self.transforms,
            max_plate_nesting=self.max_plate_nesting,
            jit_compile=self.jit_compile,
            jit_options=self.jit_options,
            skip_jit_warnings=self.ignore_jit_warnings,
            init_strategy=self.init_strategy,
        )
        self._potential = density.potential_fn
        self.transforms = density.transforms
        self.layout = density.layout
        check_flow_dim(self.flow, self.layout)
        return self.layout.pack(density.initial_params) if self.init_strategy is not None else None

    def _build_target(self) -> LatentTarget:
        if self.beta is not None:
            return TemperedFlow(self.flow, self.beta)
        potential = self._potential if self.model is not None else self.potential_fn
        layout, dtype = self.layout, self.flow.dtype

        def log_prob(x: Tensor) -> Tensor:
            return -potential(layout.unpack(x)).to(dtype)

        return PosteriorPullback(self.flow, log_prob)

    def _initial_state(self, init_x: Tensor | None) -> MALAState:
        if init_x is not None:
            z = self.flow.to_latent(init_x.detach().to(dtype=self.flow.dtype, device=self.flow.device))
            state = init_state(self._target, self.preconditioner, z.detach())
            if not _is_finite(state):
                raise ValueError(
                    "the initial parameters give a non-finite log density or gradient "
                    f"(log density {float(state.log_density):.4g}): start elsewhere"
                )
            return state
        for _ in range(100):
            state = init_state(self._target, self.preconditioner, self.flow.sample_base())
            if _is_finite(state):
                return state
        raise ValueError(
            "100 draws of the flow all gave a non-finite log density or gradient: the flow does "
            "not cover the posterior's support; pass initial_params or an init_strategy"
        )

    def _to_params(self, state: MALAState) -> dict[str, Tensor]:
        # Detached clones: MCMC pickles them in worker queues and stores them.
        return {name: value.detach().clone() for name, value in self.layout.unpack(state.x).items()}


def _is_finite(state: MALAState) -> bool:
    return all(
        bool(torch.isfinite(t).all())
        for t in (state.z, state.x, state.ladj, state.log_density, state.grad, state.grad_x)
        if t is not None
    )
