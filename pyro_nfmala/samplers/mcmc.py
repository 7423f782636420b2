r"""Pyro's MCMC, with every chain of an NFMALA kernel as one batch.

Pyro's :class:`~pyro.infer.MCMC` runs a kernel's chains one per worker process, or, with more chains than
free cores (always, on a 2-core machine), one after another in this process: each chain then pays its own
per-step Python overhead, and its own model run per move. :class:`MCMC` is Pyro's ``MCMC`` (a subclass:
the same arguments, the same object, the same outputs) with one more way to run chains,
``chain_method="vectorized"`` (NumPyro's name for it), the default for an
:class:`~pyro_nfmala.NFMALA` kernel: all chains advance together as one batch of the kernel's run
(:class:`~pyro_nfmala.samplers.pyro_chains.RunChains`), one vectorized model run per move, and the map
is fitted once.

How it works: Pyro's ``MCMC.run`` consumes a sampler object whose ``run(*args, **kwargs)`` yields, per
chain, ``(structure, chain)``, then ``(draw, chain)`` for every draw, then ``(diagnostics, chain)``.
:class:`VectorizedChains` is such a sampler, so everything ``MCMC`` does after sampling (constraining
the draws with the kernel's ``transforms``, ``get_samples(group_by_chain=True)``, ``summary()``,
``diagnostics()``) is Pyro's own, and :func:`~pyro_nfmala.to_inference_data` reads the run as it reads
any other. ``hook_fn`` is called for every chain at every step, as Pyro calls it; ``initial_params``
holds one value per chain as in Pyro; one progress bar follows the batch. Why this mechanism: it
changes nothing of Pyro's object or outputs, needs no change in the kernel's protocol, and keeps
Pyro's other ways to run chains a keyword away.

It does not apply to worker processes (``chain_method="parallel"``: Pyro's, each process preparing its
own run and running one chain) or to ``"sequential"`` (Pyro's, one chain after another on one kernel),
nor to kernels other than NFMALA, which run as Pyro runs them (``chain_method`` is then Pyro's choice).

Example:
    >>> def model(y):
    ...     loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    ...     with pyro.plate("data", len(y)):
    ...         pyro.sample("y", dist.Normal(loc, 1.0), obs=y)
    >>> kernel = NFMALA(model, fit_options={"progress": False})
    >>> mcmc = MCMC(kernel, num_samples=100, warmup_steps=100, num_chains=4, disable_progbar=True)  # ours
    >>> mcmc.run(torch.ones(20))
    >>> mcmc.get_samples(group_by_chain=True)["loc"].shape, type(mcmc.sampler).__name__
    (torch.Size([4, 100]), 'VectorizedChains')
"""

from __future__ import annotations

__all__ = ["CHAIN_METHODS", "MCMC", "VectorizedChains"]

import warnings

from collections.abc import Callable

import pyro.infer
import torch

from pyro.infer.mcmc.api import _MultiSampler, _UnarySampler
from pyro.infer.mcmc.logger import ProgressBar

from .kernel import NFMALA

#: How :class:`MCMC` can run chains: ``"vectorized"`` (all as one batch), or Pyro's own ways.
CHAIN_METHODS = ("vectorized", "parallel", "sequential")


class MCMC(pyro.infer.MCMC):
    r"""Pyro's :class:`~pyro.infer.MCMC` with all chains of an NFMALA kernel as one batch (see the module).

    The arguments are those of Pyro's :class:`~pyro.infer.MCMC` (``kernel``, ``num_samples``,
    ``warmup_steps``, ``initial_params``, ``num_chains``, ``hook_fn``, ``mp_context``, ``disable_progbar``,
    ``disable_validation``, ``transforms``, ``save_params``), and one more:

    Arguments:
        chain_method: ``"vectorized"``: the chains of an :class:`~pyro_nfmala.NFMALA` kernel as one batch
            (the default for one); ``"parallel"``: one worker process per chain, Pyro's way where there are
            free cores (else one after another, as Pyro falls back); ``"sequential"``: one after another on
            one kernel, Pyro's way. ``None`` (the default): vectorized for an NFMALA kernel, Pyro's choice
            for other kernels.
    """

    def __init__(
        self,
        kernel,
        num_samples: int,
        warmup_steps: int | None = None,
        initial_params: dict | None = None,
        num_chains: int = 1,
        hook_fn: Callable | None = None,
        mp_context: str | None = None,
        disable_progbar: bool = False,
        disable_validation: bool | None = True,
        transforms: dict | None = None,
        save_params: list[str] | None = None,
        chain_method: str | None = None,
    ) -> None:
        if chain_method is not None and chain_method not in CHAIN_METHODS:
            raise ValueError(f"chain_method must be one of {CHAIN_METHODS} or None, got {chain_method!r}")
        vectorized = isinstance(kernel, NFMALA) and chain_method in (None, "vectorized")
        if chain_method == "vectorized" and not isinstance(kernel, NFMALA):
            raise ValueError(
                f"chain_method='vectorized' runs the chains of an NFMALA kernel as one batch; a "
                f"{type(kernel).__name__} kernel runs as Pyro runs it: pass chain_method=None"
            )
        with warnings.catch_warnings():
            if vectorized or chain_method == "sequential":  # Pyro's 'chains drawn sequentially' is not news
                warnings.filterwarnings("ignore", message="num_chains=.* is more than available_cpu")
            super().__init__(
                kernel,
                num_samples,
                warmup_steps=warmup_steps,
                initial_params=initial_params,
                num_chains=num_chains,
                hook_fn=hook_fn,
                mp_context=mp_context,
                disable_progbar=disable_progbar,
                disable_validation=disable_validation,
                transforms=transforms,
                save_params=save_params,
            )
        self.chain_method = "vectorized" if vectorized else chain_method
        if not vectorized and chain_method != "sequential":
            return
        given = self.sampler.initial_params  # checked by Pyro: (num_chains, ...) per site
        if isinstance(self.sampler, _MultiSampler):
            self.sampler.terminate()  # its logging thread, started for nothing
        chains = VectorizedChains if vectorized else _UnarySampler
        arguments = (kernel, num_samples, self.warmup_steps, num_chains, disable_progbar)
        self.sampler = chains(*arguments, initial_params=given, hook=hook_fn)


class VectorizedChains:
    """The sampler object of :class:`MCMC` for ``chain_method="vectorized"``: what Pyro's ``MCMC.run``
    consumes, with every chain of the kernel's run advancing as one batch (see the module)."""

    def __init__(
        self,
        kernel: NFMALA,
        num_samples: int,
        warmup_steps: int,
        num_chains: int,
        disable_progbar: bool,
        initial_params: dict | None = None,
        hook: Callable | None = None,
    ) -> None:
        self.kernel, self.num_samples, self.warmup_steps = kernel, num_samples, warmup_steps
        self.num_chains, self.disable_progbar = num_chains, disable_progbar
        self.initial_params, self.hook = initial_params, hook

    def terminate(self, *args, **kwargs) -> None:
        pass

    def run(self, *args, **kwargs):
        """Yields what Pyro's ``MCMC.run`` reads, ``(value, chain)``: each chain's structure, its draws
        (flat, unconstrained), then its diagnostics. With the chains split over processes
        (:class:`~pyro_nfmala.distributed.parallel.ChainParallel`), this rank runs its share of them and
        yields every rank's, gathered at the end."""
        kernel = self.kernel
        group = kernel.spec.chain_group
        with group.together():
            yield from self._run(group, args, kwargs)

    def _run(self, group, args, kwargs):
        kernel, chains = self.kernel, list(range(self.num_chains))
        count, first = group.split(self.num_chains)
        if group.active and count == 0:
            raise ValueError(
                f"{self.num_chains} chain(s) over {group.size} processes leave rank {group.rank} none: run "
                "at least one chain per process"
            )
        batch = kernel.setup_chains(count, self.warmup_steps, args, kwargs, self.initial_params)
        if batch is None:  # nothing to sample: no batch to make, Pyro's own loop
            unary = _UnarySampler(
                kernel, self.num_samples, self.warmup_steps, self.num_chains, self.disable_progbar,
                initial_params=self.initial_params, hook=self.hook,
            )  # fmt: skip
            yield from unary.run(*args, **kwargs)
            return
        layout = batch.run.layout
        names = getattr(kernel, "save_params", None) or sorted(layout.shapes)
        for chain in chains:
            yield {name: layout.shapes[name] for name in names}, chain
        where = f" on {group.size} processes" if group.active else ""
        bar = ProgressBar(self.warmup_steps, self.num_samples, disable=self.disable_progbar or group.rank > 0)
        try:
            for phase, steps in (("Warmup", self.warmup_steps), ("Sample", self.num_samples)):
                bar.set_description(f"{phase} [{self.num_chains} chains{where}]", refresh=False)
                for i in range(steps):
                    batch.step()
                    if self.hook is not None:
                        for chain in range(count):
                            stage = f"{phase} [{first + chain}]" if self.num_chains > 1 else phase
                            self.hook(kernel, batch.params(chain), stage, i)
                    bar.set_postfix(batch.logging(), refresh=False)
                    bar.update()
        finally:
            bar.close()
        if self.num_samples:  # the draws, every process's, mapped to the model's coordinates in one batch
            drawn = batch.drawn_params()
            flat = torch.cat(
                [drawn[name].reshape(self.num_chains, self.num_samples, -1) for name in names], -1
            )
            for chain, draws in enumerate(flat):
                for draw in draws:
                    yield draw, chain
        diagnostics = [batch.diagnostics(chain) for chain in range(count)]
        gathered = [item for part in group.gather_objects(diagnostics) for item in part]
        for chain in chains:
            yield gathered[chain], chain
        kernel.cleanup()
