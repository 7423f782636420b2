"""Every method on every target, side by side in one run: NFMALA against naive flow sampling,
Pyro's NUTS, NeuTra-NUTS (NUTS on the same latent pull-back, same flow) and plain MALA.

    python benchmarks/compare.py --quick   # a few minutes on 2 cores
    python benchmarks/compare.py           # the full run, under 30 minutes on 2 cores
    python benchmarks/compare.py --targets funnel10 eight_schools   # a subset

Targets run two at a time, one per core, in separate processes (``--jobs``); every method on a
target runs in the same process, so their times compare like with like. Each target gets one
flow, trained once (its training time is reported separately) and shared by
every method that uses a flow. Every method runs the same number of chains, warmup steps and
draws, and starts from the same points (draws of the flow, mapped to data space; or, for the
"one mode" variants, exact draws from the first mode only). NFMALA and plain MALA run their
chains as one batch (ChainSampler); NUTS and NeuTra-NUTS run through Pyro's MCMC, one chain after
another (Pyro keeps one of the 2 cores free), NUTS with max_tree_depth 5 (at most 31 leapfrog
steps per draw; 4 in quick mode). NeuTra-NUTS has a smaller budget: each of its leapfrog steps
is a flow pass and its backward pass at batch size 1 (about 85% of the run's time when it had the
same budget), so in the full run it gets 100 warmup steps and 150 draws per chain with
max_tree_depth 4, and it does not run on the "one mode" variants (same flow, same target as
their parent target). A capped tree shows as low ESS per draw; ESS per second and per gradient
stay comparable across budgets, R-hat over fewer draws is less sensitive. Gradient evaluations are
counted: one per MALA step and chain, one per NUTS leapfrog step (calls of the potential).

Writes benchmarks/results/compare{_quick}.json and .md, and PNG figures beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
import warnings

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyro
import torch

from pyro.infer import MCMC, NUTS

from pyro_nfmala import (
    ChainSampler,
    LatentFlow,
    PosteriorPullback,
    TemperedFlow,
    default_flow,
    fit_flow_to_model,
    fit_flow_to_samples,
    identity_flow,
)
from pyro_nfmala.examples.metrics import energy_distance, gap_mass, gap_threshold, mode_weights
from pyro_nfmala.examples.posteriordb import (
    eight_schools_centered,
    load_data,
    load_reference,
    standardized_errors,
)
from pyro_nfmala.examples.toys import Banana, DoubleMoon, GaussianMixture, GaussianRing, NealFunnel
from pyro_nfmala.model.density import model_density

RESULTS = Path(__file__).resolve().parent / "results"
NUM_CHAINS = 4
LOCAL, GLOBAL = "NFMALA identity (T1)", "NFMALA identity + global (T1)"
RHAT_OK = 1.1
# target groups from the costliest (measured in the full run) to the cheapest
COST_ORDER = [
    "mixture16",
    "mixture8",
    "ring8",
    "double_moon",
    "eight_schools",
    "banana20",
    "funnel10",
    "banana2",
]


@dataclass
class Budget:
    warmup: int
    draws: int
    fit_steps: int
    tree_depth: int  # NUTS's max_tree_depth
    neutra_tree_depth: int  # NeuTra-NUTS's max_tree_depth
    neutra_warmup: int
    neutra_draws: int
    fit_samples: int = 20_000


QUICK = Budget(
    warmup=30, draws=60, fit_steps=200, tree_depth=4, neutra_tree_depth=4, neutra_warmup=30, neutra_draws=60
)
FULL = Budget(
    warmup=150,
    draws=300,
    fit_steps=2000,
    tree_depth=5,
    neutra_tree_depth=4,
    neutra_warmup=100,
    neutra_draws=150,
)


# ----------------------------------------------------------------------------------------------
# targets


@dataclass
class Target:
    """A benchmark target: a log density on flat x, and exact or reference draws to score against."""

    name: str
    dim: int
    log_prob: object  # (..., d) -> (...)
    reference: torch.Tensor  # exact draws (n, d) in the same space as x
    toy: object = None  # for mode weights and gap mass
    flow_kind: str = "spline"
    flow_from: str = "samples"  # or "model"
    tempered: bool = False  # also run T2 (the trained-flow use)
    one_mode: bool = False  # start every chain in the first mode
    shares_flow_with: str | None = None
    model: object = None
    extra: dict = field(default_factory=dict)


def toy_target(name, toy, **kwargs) -> Target:
    return Target(
        name,
        toy.dim,
        toy.log_prob,
        toy.sample(20_000, generator=torch.Generator().manual_seed(123)),
        toy=toy,
        **kwargs,
    )


def eight_schools_target() -> Target:
    data = load_data("eight_schools")
    density = model_density(eight_schools_centered, model_kwargs=data)
    reference = load_reference("eight_schools")
    # the reference in the flat unconstrained layout (mu, log tau, theta_1..8)
    flat = np.stack(
        [reference["mu"], np.log(reference["tau"])] + [reference[f"theta[{j}]"] for j in range(1, 9)], -1
    )
    return Target(
        "eight_schools",
        density.layout.dim,
        density.log_prob,
        torch.as_tensor(flat.reshape(-1, flat.shape[-1]), dtype=torch.float32),
        flow_kind="affine",
        flow_from="model",
        model=eight_schools_centered,
        extra={"density": density, "data": data, "posteriordb": reference},
    )


def all_targets() -> list[Target]:
    mix8, mix16 = GaussianMixture(8, (0.7, 0.3)), GaussianMixture(16, (0.7, 0.3))
    return [
        toy_target("double_moon", DoubleMoon(), tempered=True),
        toy_target("ring8", GaussianRing()),
        toy_target("mixture8", mix8),
        toy_target("mixture8_one_mode", mix8, one_mode=True, shares_flow_with="mixture8"),
        toy_target("mixture16", mix16),
        toy_target("mixture16_one_mode", mix16, one_mode=True, shares_flow_with="mixture16"),
        toy_target("funnel10", NealFunnel(10), flow_kind="affine"),
        toy_target("banana2", Banana(2), flow_kind="affine"),
        toy_target("banana20", Banana(20), flow_kind="affine"),
        eight_schools_target(),
    ]


# ----------------------------------------------------------------------------------------------
# flows


def train_flow(target: Target, budget: Budget):
    """One flow per target: maximum likelihood on exact draws, or reverse KL to the model."""
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    start = time.perf_counter()
    if target.flow_from == "model":
        fit = fit_flow_to_model(
            target.model, model_kwargs=target.extra["data"], num_steps=budget.fit_steps, progress=False
        )
    else:
        samples = target.toy.sample(budget.fit_samples, generator=torch.Generator().manual_seed(7))
        flow = default_flow(target.dim, kind=target.flow_kind)
        fit = fit_flow_to_samples(
            samples,
            flow,
            num_steps=budget.fit_steps,
            progress=False,
            generator=torch.Generator().manual_seed(8),
        )
    return fit.flow, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# methods: each returns draws x (chains, draws, d), seconds, gradient evaluations, stats


@dataclass
class Run:
    x: torch.Tensor
    seconds: float
    gradients: int  # target evaluations with their gradient
    accept: float
    divergences: int
    global_accept: float = float("nan")  # independence moves' acceptance rate


def run_chain_sampler(
    target_fn, flow, z0, budget: Budget, preconditioner: str, independence_every: int | None = None
) -> Run:
    """ChainSampler's chains as one batch; with ``independence_every``, global moves from the flow's base
    (each one more evaluation of the target, with its gradient, counted)."""
    sampler = ChainSampler(
        target_fn,
        NUM_CHAINS,
        preconditioner=preconditioner,
        initial_z=z0,
        independence_every=independence_every,
        seed=1,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # divergences are counted in the table
        idata = sampler.run(num_samples=budget.draws, warmup_steps=budget.warmup, progress=False)
    seconds = time.perf_counter() - start
    stats = idata.sample_stats
    steps = budget.warmup + budget.draws
    moves = steps // independence_every if independence_every else 0
    return Run(
        torch.as_tensor(np.asarray(idata.posterior["x"])),
        seconds,
        NUM_CHAINS * (steps + moves),
        float(stats["accept_prob"].mean()),
        int(stats["diverging"].sum()),
        sampler.independence_acceptance_rate if independence_every else float("nan"),
    )


def run_nuts(
    potential, init: torch.Tensor, warmup: int, draws: int, tree_depth: int
) -> tuple[torch.Tensor, float, int, float, int]:
    """Pyro NUTS on ``potential({"q": q})``; returns draws of q and the number of potential calls."""
    calls = [0]

    def counted(params):
        calls[0] += 1
        return potential(params)

    kernel = NUTS(potential_fn=counted, max_tree_depth=tree_depth)
    mcmc = MCMC(
        kernel,
        num_samples=draws,
        warmup_steps=warmup,
        num_chains=NUM_CHAINS,
        initial_params={"q": init},
        disable_progbar=True,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "chains will be drawn sequentially"
        mcmc.run()
    seconds = time.perf_counter() - start
    diagnostics = mcmc.diagnostics()
    accept = float(np.mean(list(diagnostics["acceptance rate"].values())))
    divergences = sum(len(v) for v in diagnostics["divergences"].values())
    return mcmc.get_samples(group_by_chain=True)["q"].detach(), seconds, calls[0], accept, divergences


def nuts_on_target(target: Target, x0: torch.Tensor, budget: Budget) -> Run:
    def potential(params):
        return -target.log_prob(params["q"])

    x, seconds, gradients, accept, divergences = run_nuts(
        potential, x0, budget.warmup, budget.draws, budget.tree_depth
    )
    return Run(x, seconds, gradients, accept, divergences)


def neutra_nuts_on_target(target: Target, flow: LatentFlow, z0: torch.Tensor, budget: Budget) -> Run:
    def potential(params):
        x, ladj = flow.to_data(params["q"])
        return -(target.log_prob(x) + ladj)

    z, seconds, gradients, accept, divergences = run_nuts(
        potential, z0, budget.neutra_warmup, budget.neutra_draws, budget.neutra_tree_depth
    )
    with torch.no_grad():
        x = flow.to_data(z)[0]
    return Run(x, seconds, gradients, accept, divergences)


def naive(flow: LatentFlow, budget: Budget) -> Run:
    start = time.perf_counter()
    with torch.no_grad():
        x = flow.to_data(
            flow.sample_base((NUM_CHAINS, budget.draws), generator=torch.Generator().manual_seed(2))
        )[0]
    return Run(x, time.perf_counter() - start, 0, float("nan"), 0)


# ----------------------------------------------------------------------------------------------
# metrics


def mode_weight_error_in_mcse(x: torch.Tensor, toy) -> float:
    """The worst mode's weight error in Monte Carlo standard errors, sqrt(w (1 - w) / ESS), with ESS
    the bulk ESS of the chains' mode indicator (ArviZ); ``x`` is (chains, draws, d)."""
    import arviz as az

    from pyro_nfmala import from_arrays

    modes = toy.assign_modes(x.reshape(-1, x.shape[-1]).float()).reshape(x.shape[:2]).numpy()
    worst = 0.0
    for k, weight in enumerate(toy.weights.double().tolist()):
        indicator = (modes == k).astype(np.float64)
        if indicator.std() == 0:  # a mode never (or always) visited: the error is the whole weight
            return float("inf") if abs(indicator.mean() - weight) > 0 else 0.0
        ess = float(az.ess(from_arrays({"i": indicator}), method="bulk")["i"])
        mcse = math.sqrt(weight * (1 - weight) / max(ess, 1.0))
        worst = max(worst, abs(indicator.mean() - weight) / mcse)
    return worst


def score(target: Target, run: Run, threshold: float | None) -> dict:
    import arviz as az

    from pyro_nfmala import from_arrays

    x = run.x.double()
    finite = bool(torch.isfinite(x).all())
    summary = az.summary(from_arrays({"x": x.numpy()}), kind="diagnostics") if finite else None
    row = {
        "sampling_s": run.seconds,
        "gradients": run.gradients,
        "accept": run.accept,
        "global_accept": run.global_accept,
        "divergences": run.divergences,
        "ess_bulk_min": float(summary["ess_bulk"].min()) if finite else float("nan"),
        "ess_tail_min": float(summary["ess_tail"].min()) if finite else float("nan"),
        "rhat_max": float(summary["r_hat"].max()) if finite else float("nan"),
    }
    row["ess_bulk_per_s"] = row["ess_bulk_min"] / run.seconds
    row["ess_tail_per_s"] = row["ess_tail_min"] / run.seconds
    row["ess_bulk_per_1k_grad"] = (
        1000 * row["ess_bulk_min"] / run.gradients if run.gradients else float("nan")
    )
    flat = x.reshape(-1, target.dim).float()
    row["energy_distance"] = energy_distance(
        flat, target.reference, generator=torch.Generator().manual_seed(3)
    )
    if target.toy is not None and len(target.toy.weights) > 1:
        row["mode_weight_error"] = float(
            (mode_weights(flat, target.toy) - target.toy.weights.double()).abs().max()
        )
        row["mode_weight_error_mcse"] = mode_weight_error_in_mcse(x, target.toy)
        modes = target.toy.assign_modes(x.reshape(-1, target.dim).float()).reshape(x.shape[:2])
        row["chains_in_every_mode"] = int(
            sum(len(set(chain.tolist())) == len(target.toy.weights) for chain in modes)
        )
        row["gap_mass"] = gap_mass(flat, target.toy, threshold)
    if target.name == "eight_schools":
        density = target.extra["density"]
        samples = {name: value.numpy() for name, value in density.constrain(x.float()).items()}
        errors = standardized_errors(samples, target.extra["posteriordb"])
        row["worst_mean_error"] = max(abs(e["mean_error"]) for e in errors.values())
        row["worst_sd_error"] = max(abs(e["sd_error"]) for e in errors.values())
        row["log_tau_q01"] = float(np.quantile(np.log(samples["tau"]), 0.01))
    return row


# ----------------------------------------------------------------------------------------------
# the run


def starting_points(target: Target, flow: LatentFlow) -> tuple[torch.Tensor, torch.Tensor]:
    """(z0, x0), one per chain: flow draws, or exact draws from the first mode only."""
    if target.one_mode:
        draws = target.toy.sample(2000, generator=torch.Generator().manual_seed(4))
        x0 = draws[target.toy.assign_modes(draws) == 0][:NUM_CHAINS]
        with torch.no_grad():
            z0 = flow.to_latent(x0)
        return z0, x0
    z0 = flow.sample_base((NUM_CHAINS,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        x0 = flow.to_data(z0)[0]
    return z0, x0


def run_target(target: Target, flow, budget: Budget) -> dict[str, dict]:
    latent_flow = LatentFlow(flow)
    z0, x0 = starting_points(target, latent_flow)
    threshold = (
        gap_threshold(target.toy, level=0.001)
        if target.toy is not None and len(target.toy.weights) > 1
        else None
    )
    runs: dict[str, Run] = {}
    if not target.one_mode:
        runs["naive flow"] = naive(latent_flow, budget)
    exact = PosteriorPullback(latent_flow, target.log_prob, target.dim)
    for preconditioner in ["identity", "jacobian"]:
        runs[f"NFMALA {preconditioner} (T1)"] = run_chain_sampler(
            exact, latent_flow, z0, budget, preconditioner
        )
    runs[GLOBAL] = run_chain_sampler(exact, latent_flow, z0, budget, "identity", independence_every=1)
    if target.tempered:
        runs["NFMALA jacobian (T2, beta=1)"] = run_chain_sampler(
            TemperedFlow(latent_flow, 1.0), latent_flow, z0, budget, "jacobian"
        )
    plain = LatentFlow(identity_flow(target.dim))
    runs["plain MALA"] = run_chain_sampler(
        PosteriorPullback(plain, target.log_prob, target.dim), plain, x0, budget, "identity"
    )
    pyro.set_rng_seed(6)
    runs["NUTS"] = nuts_on_target(target, x0, budget)
    if not target.one_mode:
        pyro.set_rng_seed(6)
        runs["NeuTra-NUTS"] = neutra_nuts_on_target(target, latent_flow, z0, budget)
    return {label: score(target, run, threshold) for label, run in runs.items()}, runs


COLUMNS = [
    ("ess_bulk_per_s", "ESS bulk/s", "{:.1f}"),
    ("ess_tail_per_s", "ESS tail/s", "{:.1f}"),
    ("ess_bulk_per_1k_grad", "ESS/1k grad", "{:.1f}"),
    ("rhat_max", "R-hat", "{:.3f}"),
    ("accept", "accept", "{:.2f}"),
    ("global_accept", "global accept", "{:.2f}"),
    ("energy_distance", "energy dist.", "{:.4f}"),
    ("mode_weight_error", "mode-weight err.", "{:.3f}"),
    ("mode_weight_error_mcse", "(MCSE)", "{:.1f}"),
    ("chains_in_every_mode", "chains in all modes", "{:d}"),
    ("gap_mass", "gap mass", "{:.4f}"),
    ("worst_mean_error", "worst mean err. (sd)", "{:.3f}"),
    ("divergences", "divergent", "{:d}"),
    ("sampling_s", "sampling (s)", "{:.1f}"),
]


def markdown(results: dict, header: str) -> str:
    lines = [header, ""]
    for name, entry in results["targets"].items():
        used = [c for c in COLUMNS if any(c[0] in row for row in entry["methods"].values())]
        lines += [f"### {name} (flow training {entry['flow_training_s']:.1f} s)", ""]
        lines.append("| method | " + " | ".join(c[1] for c in used) + " |")
        lines.append("| --- |" + " --- |" * len(used))
        for label, row in entry["methods"].items():
            cells = []
            for key, _, fmt in used:
                value = row.get(key)
                cell = (
                    ""
                    if value is None or (isinstance(value, float) and np.isnan(value))
                    else fmt.format(value)
                )
                if cell and key.startswith("ess") and row.get("rhat_max", 1.0) > RHAT_OK:
                    cell += "*"
                cells.append(cell)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += (
        [
            (
                f"\\* R-hat above {RHAT_OK}: the chains disagree, so this ESS describes no converged run "
                "(a stuck"
            ),
            "sampler can show a high ESS within the region it is stuck in). Read ESS only where R-hat is",
            "close to 1, and the energy distance and mode weights everywhere.",
            "",
            "## Goals",
            "",
        ]
        + [f"- {line}" for line in results["goals"]]
        + [""]
    )
    return "\n".join(lines)


def goals(results: dict) -> list[str]:
    """The performance goals of the benchmark issue, checked on this run's numbers."""
    lines = []
    targets = results["targets"]
    for name in ["funnel10", "eight_schools"]:
        if name not in targets:
            continue
        methods = targets[name]["methods"]
        best = max(  # the faster of the converged, if any
            [LOCAL, GLOBAL, "NFMALA jacobian (T1)"],
            key=lambda m: (methods[m]["rhat_max"] <= RHAT_OK, methods[m]["ess_bulk_per_s"]),
        )
        ratio = methods[best]["ess_bulk_per_s"] / methods["NUTS"]["ess_bulk_per_s"]
        ours_ok, nuts_ok = methods[best]["rhat_max"] <= RHAT_OK, methods["NUTS"]["rhat_max"] <= RHAT_OK
        if ours_ok and nuts_ok:
            verdict = "met" if ratio >= 2 else "NOT met"
        elif ours_ok:
            verdict = (
                f"met: NFMALA converged and NUTS did not (R-hat above {RHAT_OK}), "
                "so NUTS's ESS counts no usable draws"
            )
        elif nuts_ok:
            verdict = f"NOT met: NFMALA did not converge (R-hat above {RHAT_OK}) and NUTS did"
        else:
            verdict = f"not measurable: neither converged (R-hat above {RHAT_OK})"
        lines.append(
            f"{name}: {best} ESS bulk/s {methods[best]['ess_bulk_per_s']:.1f} "
            f"(R-hat {methods[best]['rhat_max']:.2f}) vs NUTS "
            f"{methods['NUTS']['ess_bulk_per_s']:.1f} (R-hat {methods['NUTS']['rhat_max']:.2f}): "
            f"{ratio:.1f}x (goal >= 2x: {verdict})"
        )
    if "double_moon" in targets:
        methods = targets["double_moon"]["methods"]
        naive_gap, t2_gap = (
            methods["naive flow"]["gap_mass"],
            methods["NFMALA jacobian (T2, beta=1)"]["gap_mass"],
        )
        draws = NUM_CHAINS * results["budget"]["draws"]
        ratio = naive_gap / max(t2_gap, 1 / draws)
        lines.append(
            f"double_moon: gap mass naive {naive_gap:.4f} vs T2 (beta=1, jacobian) {t2_gap:.4f}: "
            f"{ratio:.1f}x lower "
            f"(goal >= 5x: {'met' if ratio >= 5 else 'NOT met'})"
        )
    lines += global_move_goals(results)
    return lines


def global_move_goals(results: dict) -> list[str]:
    """Issue 14's goals for the global moves, on this run's numbers."""
    lines, targets = [], results["targets"]
    for name in ["mixture16", "ring8", "mixture8"]:
        if name in targets and GLOBAL in targets[name]["methods"]:
            row = targets[name]["methods"][GLOBAL]
            met = row["rhat_max"] <= 1.01 and row["mode_weight_error_mcse"] <= 2
            lines.append(
                f"{name}: {GLOBAL} R-hat {row['rhat_max']:.3f}, mode-weight error "
                f"{row['mode_weight_error']:.3f} = {row['mode_weight_error_mcse']:.1f} MCSE "
                f"(goal R-hat <= 1.01 and <= 2 MCSE: {'met' if met else 'NOT met'})"
            )
    if "double_moon" in targets and GLOBAL in targets["double_moon"]["methods"]:
        row = targets["double_moon"]["methods"][GLOBAL]
        met = row["chains_in_every_mode"] == NUM_CHAINS and row["rhat_max"] <= 1.01
        lines.append(
            f"double_moon: {GLOBAL}: {row['chains_in_every_mode']} of {NUM_CHAINS} chains visit both moons, "
            f"R-hat {row['rhat_max']:.3f} (goal: every chain, R-hat <= 1.01: {'met' if met else 'NOT met'})"
        )
    if "eight_schools" in targets and GLOBAL in targets["eight_schools"]["methods"]:
        methods = targets["eight_schools"]["methods"]
        row, local, nuts = methods[GLOBAL], methods[LOCAL], methods["NUTS"]
        vs_local = row["ess_bulk_per_s"] / local["ess_bulk_per_s"]
        vs_nuts = row["ess_bulk_per_s"] / nuts["ess_bulk_per_s"]
        met = vs_local >= 5 and vs_nuts >= 20 and row["ess_bulk_per_1k_grad"] >= 300
        lines.append(
            f"eight_schools: {GLOBAL} {row['ess_bulk_per_s']:.1f} ESS bulk/s (R-hat {row['rhat_max']:.3f}): "
            f"{vs_local:.1f}x local-only, {vs_nuts:.1f}x NUTS (NUTS R-hat {nuts['rhat_max']:.2f}, "
            f"{'converged' if nuts['rhat_max'] <= 1.01 else 'not converged by R-hat <= 1.01'}); "
            f"{row['ess_bulk_per_1k_grad']:.0f} ESS per 1k evaluations (goal >= 5x, >= 20x, >= 300: "
            f"{'met' if met else 'NOT met'})"
        )
    return lines


def mode_weight_figure(all_runs: dict, suffix: str) -> None:
    """The running weight of the first mode (all chains' draws up to each draw) against the draw, for
    local moves only, local + global moves, and NUTS, on every target with several modes."""
    import matplotlib.pyplot as plt

    shown = [
        name
        for name, (target, _) in all_runs.items()
        if target.toy is not None and len(target.toy.weights) > 1
    ]
    if not shown:
        return
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.2), squeeze=False)
    for ax, name in zip(axes[0], shown):
        target, runs = all_runs[name]
        for label, color in [(LOCAL, "C0"), (GLOBAL, "C3"), ("NUTS", "C1")]:
            if label not in runs:
                continue
            x = runs[label].x
            first = target.toy.assign_modes(x.reshape(-1, target.dim).float()).reshape(x.shape[:2]) == 0
            running = first.double().sum(0).cumsum(0) / (NUM_CHAINS * torch.arange(1, x.shape[1] + 1))
            ax.plot(running.numpy(), color=color, label=label.replace(" (T1)", ""))
        ax.axhline(float(target.toy.weights[0]), color="k", ls="--", lw=1, label="exact")
        ax.set(title=name, xlabel="draw", ylim=(-0.02, 1.02))
    axes[0, 0].set_ylabel("weight of the first mode\n(running, all chains)")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"compare_mode_weights{suffix}.png", dpi=100)
    plt.close(fig)


def ess_figure(results: dict, suffix: str) -> None:
    """Min ESS bulk per second per target and method; faded, hatched bars: R-hat above RHAT_OK."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["targets"])
    methods = [LOCAL, GLOBAL, "NFMALA jacobian (T1)", "plain MALA", "NUTS", "NeuTra-NUTS"]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(methods)
    for k, method in enumerate(methods):
        present = [i for i, n in enumerate(names) if method in results["targets"][n]["methods"]]
        rows = [results["targets"][names[i]]["methods"][method] for i in present]
        values = [max(row["ess_bulk_per_s"], 1e-2) for row in rows]
        bars = ax.bar(
            np.array(present) + (k - len(methods) / 2 + 0.5) * width,
            values,
            width,
            label=method,
            color=f"C{k}",
        )
        for bar, row in zip(bars, rows):
            if row["rhat_max"] > RHAT_OK:
                bar.set_alpha(0.3)
                bar.set_hatch("///")
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(names)), names, rotation=20)
    ax.set_ylabel("min ESS bulk per second (log scale)")
    ax.set_title(
        f"Sampling efficiency, {NUM_CHAINS} chains x {results['budget']['draws']} draws (NeuTra-NUTS "
        f"{results['budget'].get('neutra_draws', results['budget']['draws'])}; flow training excluded);\n"
        f"faded, hatched: R-hat > {RHAT_OK}, not converged (the ESS means nothing there)"
    )
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(RESULTS / f"compare_ess{suffix}.png", dpi=110)
    plt.close(fig)


def figures(results: dict, all_runs: dict, suffix: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ess_figure(results, suffix)
    mode_weight_figure(all_runs, suffix)

    shown = [n for n in ["double_moon", "ring8", "banana2", "funnel10"] if n in all_runs]
    if not shown:
        return
    labels = [
        "exact",
        "naive flow",
        LOCAL,
        GLOBAL,
        "NFMALA jacobian (T1)",
        "NFMALA jacobian (T2, beta=1)",
        "plain MALA",
        "NUTS",
        "NeuTra-NUTS",
    ]
    fig, axes = plt.subplots(
        len(shown), len(labels), figsize=(2.2 * len(labels), 2.2 * len(shown)), squeeze=False
    )
    for row, name in enumerate(shown):
        target, runs = all_runs[name]
        limits = [np.quantile(target.reference[:, k].numpy(), [0.001, 0.999]) for k in (0, 1)]
        for col, label in enumerate(labels):
            ax = axes[row, col]
            if label == "exact":
                points = target.reference[:4000]
            elif label in runs:
                points = runs[label].x.reshape(-1, target.dim)[:4000]
            else:
                ax.axis("off")
                continue
            ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.3)
            ax.set(xlim=limits[0], ylim=limits[1], xticks=[], yticks=[])
            if row == 0:
                ax.set_title(label, fontsize=8)
            if col == 0:
                ax.set_ylabel(name)
    fig.tight_layout()
    fig.savefig(RESULTS / f"compare_samples{suffix}.png", dpi=100)
    plt.close(fig)


def run_group(names: list[str], quick: bool, threads: int) -> dict:
    """Runs targets that share one flow (trained once), in a worker process of its own."""
    torch.set_num_threads(threads)
    budget = QUICK if quick else FULL
    out, flow, training = {}, None, 0.0
    for target in [t for t in all_targets() if t.name in names]:
        t0 = time.perf_counter()
        if flow is None or target.shares_flow_with is None:
            flow, training = train_flow(target, budget)
        rows, runs = run_target(target, flow, budget)
        out[target.name] = {
            "flow_training_s": training,
            "methods": rows,
            "draws": {label: run.x for label, run in runs.items()},
        }
        print(f"{target.name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def main() -> None:
    import multiprocessing

    from concurrent.futures import ProcessPoolExecutor

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="short chains and flow fits: a few minutes on 2 cores"
    )
    parser.add_argument("--targets", nargs="*", help="run only these targets")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job (default 1)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="targets run in this many processes at once (default 2: one per core)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the markdown table from the saved JSON, without sampling",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budget = QUICK if args.quick else FULL
    suffix = "_quick" if args.quick else ""
    RESULTS.mkdir(exist_ok=True)
    if args.report_only:
        results = json.loads((RESULTS / f"compare{suffix}.json").read_text())
        results["goals"] = goals(results)
        (RESULTS / f"compare{suffix}.json").write_text(json.dumps(results, indent=1))
        (RESULTS / f"compare{suffix}.md").write_text(markdown(results, results["header"]))
        ess_figure(results, suffix)
        print(markdown(results, results["header"]))
        return
    targets = [t for t in all_targets() if not args.targets or t.name in args.targets]
    groups: dict[str, list[str]] = {}
    for target in targets:  # targets that share a flow run in the same job
        groups.setdefault(target.shares_flow_with or target.name, []).append(target.name)
    results = {
        "command": "python benchmarks/compare.py" + (" --quick" if args.quick else ""),
        "machine": (
            f"{platform.machine()}, {args.jobs} jobs x {args.threads} torch thread(s), "
            f"torch {torch.__version__}, pyro {pyro.__version__}"
        ),
        "date": time.strftime("%Y-%m-%d"),
        "budget": {
            "chains": NUM_CHAINS,
            "warmup": budget.warmup,
            "draws": budget.draws,
            "flow_fit_steps": budget.fit_steps,
            "nuts_max_tree_depth": budget.tree_depth,
            "neutra_max_tree_depth": budget.neutra_tree_depth,
            "neutra_warmup": budget.neutra_warmup,
            "neutra_draws": budget.neutra_draws,
        },
        "targets": {},
    }
    start = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        # the costliest groups first, so that the two jobs finish at about the same time
        order = sorted(
            groups, key=lambda name: COST_ORDER.index(name) if name in COST_ORDER else len(COST_ORDER)
        )
        futures = [pool.submit(run_group, groups[name], args.quick, args.threads) for name in order]
        done = {}
        for future in futures:
            done.update(future.result())
    all_runs = {}
    for target in targets:  # the targets' order, whatever order the jobs finished in
        entry = done[target.name]
        draws = entry.pop("draws")
        results["targets"][target.name] = entry
        all_runs[target.name] = (target, {label: Run(x, 0.0, 0, 0.0, 0) for label, x in draws.items()})
    results["total_s"] = time.perf_counter() - start
    results["goals"] = goals(results)
    (RESULTS / f"compare{suffix}.json").write_text(json.dumps(results, indent=1))
    header = (
        f"Command: `{results['command']}`; {results['date']}; {results['machine']}; "
        f"{NUM_CHAINS} chains x ({budget.warmup} warmup + {budget.draws} draws) per method, "
        f"NUTS max_tree_depth {budget.tree_depth}; "
        f"NeuTra-NUTS {budget.neutra_warmup} warmup + {budget.neutra_draws} draws, max_tree_depth "
        f"{budget.neutra_tree_depth}, not on the one-mode variants; total {results['total_s'] / 60:.1f} min."
    )
    results["header"] = header
    (RESULTS / f"compare{suffix}.json").write_text(json.dumps(results, indent=1))
    table = markdown(results, header)
    (RESULTS / f"compare{suffix}.md").write_text(table)
    figures(results, all_runs, suffix)
    print(table)


if __name__ == "__main__":
    main()
