r"""The flow stage of a staged map, adapted by chains: a batch of chains runs warmup in the map's latent
space while the flow stage is refitted, every few steps, to the points they visit and the gradients they
computed there (:class:`~pyro_nfmala.engine.refine.FlowRefiner`: score matching plus maximum
likelihood). No extra evaluation of the model trains the flow, and the chains reach the parts of the
posterior (a funnel's neck, a curved ridge) that reverse KL, mode-seeking, misses.
"""

from __future__ import annotations

__all__ = ["CHAIN_REFINE_OPTIONS", "ChainAdaptation", "adapt_flow_with_chains"]

import copy
import math
import time

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch

from torch import Tensor
from tqdm.auto import tqdm

from ..engine.driver import Driver
from ..engine.options import SamplerOptions
from ..engine.targets import PosteriorPullback
from ..flows.latent import LatentFlow

#: The refiner's options in :func:`adapt_flow_with_chains` unless given. Measured, one seed each: on a
#: banana, k-hat 0.49 with these, 0.59 with 10 steps on batches of 128 (and 20 s instead of 26 s); on the
#: non-centred eight schools, 0.55 with these and 0.12 with the lighter ones.
CHAIN_REFINE_OPTIONS = {"steps": 20, "batch_size": 256}


class ChainAdaptation(NamedTuple):
    """What :func:`adapt_flow_with_chains` returns."""

    flow: torch.nn.Module  #: the adapted flow (a zuko flow module, frozen)
    losses: list[float]  #: the refiner's loss at each Adam step
    steps: int  #: warmup steps the chains made
    evaluations: int  #: evaluations of the log density (one per chain per move)
    budget_spent: bool  #: whether the time budget stopped the chains early


def adapt_flow_with_chains(
    log_prob: Callable[[Tensor], Tensor],
    flow: torch.nn.Module,
    *,
    num_chains: int = 32,
    num_steps: int = 400,
    refine_every: int = 10,
    refine_options: Mapping | None = None,
    independence_tries: int = 1,
    max_seconds: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> ChainAdaptation:
    r"""Adapts ``flow`` to the unnormalized log density ``log_prob`` (of a batch ``(n, d)``) by running a
    batch of chains in its latent space and refining it on what they visit.

    ``num_chains`` chains start at draws of the flow and run ``num_steps`` warmup steps of
    :class:`~pyro_nfmala.ChainSampler`'s schedule: a Langevin move and an independence move per step, the step
    size adapted, and every ``refine_every`` steps (up to three quarters of the way) the flow refined
    (:class:`~pyro_nfmala.engine.refine.FlowRefiner`, ``refine_options``: by default score matching). The
    model is evaluated for all chains at once, twice per step; the gradients the chains compute are what the
    Fisher loss trains on. Stops early when ``max_seconds`` is spent. The flow given is not changed.

    Example:
        >>> flow = zuko.flows.RealNVP(2, transforms=2)
        >>> result = adapt_flow_with_chains(lambda x: -0.5 * ((x - 2.0) ** 2).sum(-1), flow, num_steps=40,
        ...                                 progress=False)
        >>> result.steps, len(result.losses)  # three refinements of 20 Adam steps, up to step 30
        (40, 60)
    """
    deadline = math.inf if max_seconds is None else time.perf_counter() + float(max_seconds)
    generator = torch.Generator().manual_seed(seed)
    options = SamplerOptions(
        mass_matrix=None,
        independence_every=1,
        independence_tries=independence_tries,
        refine_every=refine_every,
        refine_options={**CHAIN_REFINE_OPTIONS, **dict(refine_options or {})},
    )
    latent_flow = LatentFlow(flow)
    driver = Driver(PosteriorPullback(latent_flow, log_prob), num_chains, options, generator=generator,
                    label="the flow's adaptation")  # fmt: skip
    try:
        driver.start(driver.start_state(), search_from=1.0)
    except ValueError as error:  # draws of the flow where the density is not finite
        raise FloatingPointError(f"no finite start for the adaptation's chains: {error}") from error
    refiner = driver.refiner
    driver.begin_warmup(num_steps)
    spent = False
    steps = 0
    bar = tqdm(range(num_steps), desc="adapting the flow", disable=not progress)
    try:
        for _ in bar:
            driver.step()
            steps += 1
            if time.perf_counter() > deadline:
                spent = True
                break
    finally:
        bar.close()
        driver.end_warmup()
    adapted = copy.deepcopy(refiner.module).eval().requires_grad_(False)
    evaluations = sum(ledger.total("proposals") for ledger in driver.ledgers.values()) + num_chains
    return ChainAdaptation(adapted, list(refiner.losses), steps, evaluations, spent)
