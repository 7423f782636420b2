"""Can flow refinement in warmup find a mode its flow missed? A ring of 8 modes, a flow fitted to 7.

    python benchmarks/refinement.py           # 512 chains x (400 warmup + 200 draws), 2,000-step fit
    python benchmarks/refinement.py --quick   # 128 chains x (100 + 50), 300-step fit
    python benchmarks/refinement.py --replot  # the figure again from the saved JSON

The flow is fitted by maximum likelihood to exact draws of seven of the eight modes of `ring8`
(eight equal-weight Gaussians on a circle of radius 4, scale 0.3); the eighth mode is missing.
Then ChainSampler samples the whole ring (T1, exact for any flow) four ways, all chains started at
draws of the flow unless said otherwise:

- local: MALA steps only;
- local + global: an independence move from the flow's base after every step;
- local + global + refinement: the same, the flow refined in warmup every 20 steps;
- the same, chains started at exact draws of all eight modes (one in eight in the missing one).

Reported: the weight of the missing mode (exact 0.125), the worst mode-weight error, how many
chains ever visit the missing mode, the independence moves' acceptance rate, R-hat over the
chains, and the flow check of the flow against the ring (what a user would see before sampling).
Writes benchmarks/results/refinement{_quick}.json and .md, and a figure beside them.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

from pathlib import Path

import numpy as np
import torch

from pyro_nfmala import ChainSampler, LatentFlow, PosteriorPullback, default_flow, fit_flow_to_samples
from pyro_nfmala.examples.toys import GaussianRing
from pyro_nfmala.fit.check import check_flow

RESULTS = Path(__file__).resolve().parent / "results"
MISSING = 7  # the mode the flow is not fitted to


def fit_on_seven_modes(ring: GaussianRing, steps: int) -> LatentFlow:
    draws = ring.sample(40_000, generator=torch.Generator().manual_seed(1))
    seven = draws[ring.assign_modes(draws) != MISSING][:20_000]
    fit = fit_flow_to_samples(
        seven, default_flow(2), num_steps=steps, progress=False, generator=torch.Generator().manual_seed(2)
    )
    return LatentFlow(fit.flow)


def run(ring, flow, chains, warmup, draws, *, global_moves, refine, start_everywhere) -> dict:
    target = PosteriorPullback(flow, ring.log_prob)
    initial_z = None
    if start_everywhere:
        x0 = ring.sample(chains, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            initial_z = flow.to_latent(x0)
    sampler = ChainSampler(
        target,
        chains,
        independence_every=1 if global_moves else None,
        refine_every=20 if refine else None,
        refine_options={"steps": 20, "lr": 1e-3},
        initial_z=initial_z,
        seed=4,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sampler.warmup(warmup, progress=False)
        idata = sampler.sample(draws, progress=False)
    seconds = time.perf_counter() - start
    x = torch.as_tensor(np.asarray(idata.posterior["x"]), dtype=torch.float32)
    modes = ring.assign_modes(x.reshape(-1, 2)).reshape(x.shape[:2])
    weights = torch.stack([(modes == k).double().mean() for k in range(8)])
    import arviz as az

    rhat = float(az.rhat(idata)["x"].max())
    after = check_flow(sampler.flow, ring.log_prob)
    return {
        "missing_mode_weight": float(weights[MISSING]),
        "worst_mode_weight_error": float((weights - 0.125).abs().max()),
        "chains_visiting_missing_mode": int((modes == MISSING).any(1).sum()),
        "global_accept": sampler.independence_acceptance_rate if global_moves else float("nan"),
        "rhat": rhat,
        "refinements": sampler.refinements,
        "khat_after": after.khat,
        "seconds": seconds,
        "draws": x[:, -1].numpy().tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--replot", action="store_true", help="the table's figure again from the saved JSON")
    args = parser.parse_args()
    if args.replot:
        suffix = "_quick" if args.quick else ""
        figure(GaussianRing(), json.loads((RESULTS / f"refinement{suffix}.json").read_text()), suffix)
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    chains, warmup, draws, steps = (128, 100, 50, 300) if args.quick else (512, 400, 200, 2000)
    ring = GaussianRing()
    start = time.perf_counter()
    flow = fit_on_seven_modes(ring, steps)
    fit_seconds = time.perf_counter() - start
    check = check_flow(flow, ring.log_prob)
    with torch.no_grad():
        own = flow.to_data(flow.sample_base((2000,), generator=torch.Generator().manual_seed(5)))[0]
    variants = {
        "local": dict(global_moves=False, refine=False, start_everywhere=False),
        "local + global": dict(global_moves=True, refine=False, start_everywhere=False),
        "local + global + refinement": dict(global_moves=True, refine=True, start_everywhere=False),
        "local + global + refinement, chains started in all 8 modes": dict(
            global_moves=True, refine=True, start_everywhere=True
        ),
    }
    results = {
        "command": "python benchmarks/refinement.py" + (" --quick" if args.quick else ""),
        "date": time.strftime("%Y-%m-%d"),
        "budget": {"chains": chains, "warmup": warmup, "draws": draws, "fit_steps": steps},
        "fit_seconds": fit_seconds,
        "flow_check": {"khat": check.khat, "ess_fraction": check.ess_fraction},
        "flow_draws": own.tolist(),
        "runs": {},
    }
    for label, options in variants.items():
        results["runs"][label] = run(ring, flow, chains, warmup, draws, **options)
        print(f"{label}: done", flush=True)
    suffix = "_quick" if args.quick else ""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"refinement{suffix}.json").write_text(json.dumps(results, indent=1))
    lines = [
        f"Command: `{results['command']}`; {results['date']}; {chains} chains x ({warmup} warmup + {draws} "
        f"draws); flow fitted to 7 of 8 modes in {fit_seconds:.0f} s; its flow check against the whole ring: "
        f"k-hat {check.khat:.2f}, importance ESS {check.ess_fraction:.0%} of its draws.",
        "",
        "| run | missing mode's weight (exact 0.125) | worst mode-weight error | chains that visit it "
        "| global accept | max R-hat | refinements | k-hat of the final flow | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, r in results["runs"].items():
        lines.append(
            f"| {label} | {r['missing_mode_weight']:.3f} | {r['worst_mode_weight_error']:.3f} "
            f"| {r['chains_visiting_missing_mode']} of {chains} | {r['global_accept']:.2f} | {r['rhat']:.3f} "
            f"| {r['refinements']} | {r['khat_after']:.2f} | {r['seconds']:.0f} |"
        )
    table = "\n".join(lines) + "\n"
    (RESULTS / f"refinement{suffix}.md").write_text(table)
    figure(ring, results, suffix)
    print(table)


def figure(ring, results, suffix) -> None:
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results["runs"])
    fig, axes = plt.subplots(
        1, len(labels) + 1, figsize=(3.1 * (len(labels) + 1), 3.9), sharex=True, sharey=True
    )
    own = np.asarray(results["flow_draws"])
    axes[0].scatter(own[:, 0], own[:, 1], s=1, alpha=0.3, c="C7")
    axes[0].set_title("the flow's own draws\n(fitted to 7 modes)", fontsize=8)
    for ax, label in zip(axes[1:], labels):
        x = np.asarray(results["runs"][label]["draws"])
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.4)
        r = results["runs"][label]
        title = textwrap.fill(label, 30)
        ax.set_title(f"{title}\nmissing mode: {r['missing_mode_weight']:.3f} (exact 0.125)", fontsize=8)
    for ax in axes:
        ax.scatter(ring.locs[MISSING, 0], ring.locs[MISSING, 1], marker="x", c="red", s=40)
        ax.set(xlim=(-5.5, 5.5), ylim=(-5.5, 5.5), xticks=[], yticks=[], aspect="equal")
    fig.suptitle("The last draw of each chain; x marks the mode the flow was not fitted to", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / f"refinement{suffix}.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
