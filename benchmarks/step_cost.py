"""Time per MALA step as a ratio to one flow forward+backward pass, side by side in one run.

For a 2-D coupling flow (zuko NSF with passes=2, as `default_flow(2)` builds) and a batch of
chains: the reference is one pass x, ladj = f(z) plus one backward pass of ladj.sum(); then one
full `mala_step` with each preconditioner (tempered target T2, beta = 1), and how the time per
step scales with the number of chains.

    python benchmarks/step_cost.py            # 256 ... 16384 chains
    python benchmarks/step_cost.py --quick    # fewer repeats, up to 4096 chains

Writes benchmarks/results/step_cost.json and .md (and a PNG of the scaling).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

from pathlib import Path

import torch

from pyro_nfmala import LatentFlow, TemperedFlow, default_flow
from pyro_nfmala.mala import init_state, mala_step
from pyro_nfmala.precond import get_preconditioner

RESULTS = Path(__file__).resolve().parent / "results"


def best_time(fn, repeats: int, min_seconds: float = float("inf")) -> float:
    """Median wall time of ``fn`` in seconds over ``repeats`` calls, after one warm-up call; with
    ``min_seconds``, stops early once that much time has been measured (at least one call)."""
    fn()
    times: list[float] = []
    while not times or (len(times) < repeats and sum(times) < min_seconds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def flow_pass(flow: LatentFlow, z: torch.Tensor) -> None:
    z = z.detach().requires_grad_(True)
    x, ladj = flow.to_data(z)
    torch.autograd.grad(ladj.sum() + x.sum(), z)


def measure(num_chains: int, repeats: int, flow: LatentFlow) -> dict:
    torch.manual_seed(0)
    target = TemperedFlow(flow, beta=1.0)
    z = torch.randn(num_chains, 2)
    row = {"num_chains": num_chains, "flow_pass_ms": 1000 * best_time(lambda: flow_pass(flow, z), repeats)}
    for name in ("identity", "jacobian"):
        precond = get_preconditioner(name)
        state = init_state(target, precond, z)
        row[f"{name}_ms"] = 1000 * best_time(lambda: mala_step(state, target, precond, 0.1), repeats)
        row[f"{name}_ratio"] = row[f"{name}_ms"] / row["flow_pass_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and batch sizes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    flow = LatentFlow(default_flow(2))
    sizes = [256, 1024, 4096] if args.quick else [256, 1024, 4096, 16384]
    repeats = 5 if args.quick else 15
    rows = [measure(n, repeats, flow) for n in sizes]

    RESULTS.mkdir(exist_ok=True)
    meta = {
        "machine": (
            f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
        ),
        "flow": "zuko NSF(2, transforms=3, hidden_features=(64, 64), passes=2) (default_flow(2))",
        "jvp_methods": flow.jvp_methods,
        "goal": "identity <= 3x, jacobian <= 8x one flow forward+backward pass, at 4096 chains",
    }
    (RESULTS / "step_cost.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"Machine: {meta['machine']}. Flow: {meta['flow']}. JVP methods: {meta['jvp_methods']}.",
        "",
        "| chains | flow fwd+bwd (ms) | identity step (ms) | ratio | jacobian step (ms) | ratio |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['num_chains']} | {r['flow_pass_ms']:.2f} "
            f"| {r['identity_ms']:.2f} | {r['identity_ratio']:.2f}x "
            f"| {r['jacobian_ms']:.2f} | {r['jacobian_ratio']:.2f}x |"
        )
    table = "\n".join(lines)
    (RESULTS / "step_cost.md").write_text(table + "\n")
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    chains = [r["num_chains"] for r in rows]
    for key, label in [
        ("flow_pass_ms", "flow forward+backward"),
        ("identity_ms", "identity step"),
        ("jacobian_ms", "jacobian step"),
    ]:
        ax.loglog(chains, [r[key] for r in rows], "o-", label=label)
    ax.set(xlabel="number of chains", ylabel="time (ms)", title="Time per step, 2-D coupling flow")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "step_cost.png", dpi=120)


if __name__ == "__main__":
    main()
