"""How the cost of one MALA step grows with the dimension d, as a ratio to one flow pass.

For d from 2 to 784 and flows of fixed depth and width (3 coupling transforms, hidden features
(64, 64): zuko's NSF with passes=2, spline couplings, and RealNVP, affine couplings), on 1 and
on 256 chains: the time of one flow
forward+backward pass (x, ladj = f(z), then a backward pass), and of one full `mala_step` on
the tempered target (T2, beta = 1) with each preconditioner:

- ``identity``: one flow pass and its backward pass;
- ``jacobian``: matrix-free, a few Jacobian-vector products, each about one flow pass;
- ``data_space``: the exact data-space move, the target's gradient plus one pass of f^-1 with
  its backward pass (the data-space gradient) and one without (mapping the proposal back);
- ``dense_jacobian``: the test reference, which builds J_f(z) with d backward passes and
  solves d x d systems: it grows like d flow passes plus d^3 algebra per chain. It is skipped
  where its predicted step time (the last one measured, times (d / d_last)^2) passes
  ``--dense-cap`` seconds.

Memory: the peak memory of one step (or pass) above what the process holds between steps. On
CPU, each time and each memory measurement runs in a forked process of its own; for memory,
glibc is told to return freed blocks of 64 KiB and more at once, and the peak resident set is
read from /proc/self/status. On CUDA, torch's peak allocated memory.

    python benchmarks/scaling.py            # d = 2 ... 784 (about 10 minutes on 2 cores)
    python benchmarks/scaling.py --quick    # d = 2 ... 256, small repeat counts (about 1 minute)

Writes benchmarks/results/scaling{_quick}.json and .md, and scaling{_quick}.png.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import platform
import sys
import time

from pathlib import Path

import torch
import zuko

from step_cost import best_time, flow_pass

from pyro_nfmala import LatentFlow, TemperedFlow
from pyro_nfmala.engine.langevin import get_preconditioner
from pyro_nfmala.engine.step import init_state, mala_step

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dense_reference import DenseJacobianPreconditioner  # noqa: E402 - the tests' dense reference

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("flow_pass", "identity", "jacobian", "data_space", "dense_jacobian")
GOALS = {"jacobian": 8.0, "data_space": 4.0}  # step time / flow pass, at every d
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
# The dense reference on many chains stops here: batched LU solves of 256 matrices of 256 x 256
# took minutes on 2 cores and raised oneMKL "SLASWP" parameter errors.
DENSE_MAX_DIM = {1: 784, 256: 128}


FLOWS = {  # name: (zuko class, options), the same at every d
    "NSF": (zuko.flows.NSF, dict(transforms=3, hidden_features=(64, 64), passes=2)),
    "RealNVP": (zuko.flows.RealNVP, dict(transforms=3, hidden_features=(64, 64))),
}


def describe_flow(kind: str) -> str:
    cls, options = FLOWS[kind]
    return f"zuko {cls.__name__}(d, " + ", ".join(f"{key}={value}" for key, value in options.items()) + ")"


def build_flow(kind: str, dim: int) -> LatentFlow:
    """The same architecture at every d: only the input and output layers grow."""
    torch.manual_seed(0)
    cls, options = FLOWS[kind]
    return LatentFlow(cls(dim, **options))


def _memory_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(
    kind: str,
    dim: int,
    num_chains: int,
    method: str,
    repeats: tuple[int, float],
    device: str,
    what: str = "time",
) -> float:
    """Time in ms (``what="time"``) or peak extra memory in MB (``what="memory"``) of one flow
    pass or one step of ``method``."""
    cpu_memory = what == "memory" and not device.startswith("cuda")
    if cpu_memory:
        # From the start, glibc serves blocks of 64 KiB and more by mmap, so that freed tensors
        # leave the resident set at once; slower, hence apart from the timing.
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    flow = build_flow(kind, dim).to(device)
    z = torch.randn(num_chains, dim, generator=torch.Generator().manual_seed(1)).to(device)
    if method == "flow_pass":

        def step():
            flow_pass(flow, z)

    else:
        target = TemperedFlow(flow, beta=1.0)
        precond = DenseJacobianPreconditioner() if method == "dense_jacobian" else get_preconditioner(method)
        state = init_state(target, precond, z)

        def step():
            mala_step(state, target, precond, 0.1)

    if device.startswith("cuda"):

        def run():
            step()
            torch.cuda.synchronize()

        if what == "time":
            return 1000 * best_time(run, *repeats)
        run()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        return max(torch.cuda.max_memory_allocated() - base, 0) / 2**20
    if what == "time":
        return 1000 * best_time(step, *repeats)
    step()  # first-call set-up (e.g. the choice of JVP method) is not part of a step
    with open("/proc/self/clear_refs", "w") as refs:  # resets the peak (VmHWM) to the current RSS
        refs.write("5")
    base = _memory_kb("VmRSS")
    step()
    return max(_memory_kb("VmHWM") - base, 0) / 1024


def _child(queue, threads: int, *args) -> None:
    torch.set_num_threads(threads)
    try:
        queue.put(measure(*args))
    except Exception as error:  # reported by the parent
        queue.put(f"{type(error).__name__}: {error}")


def measure_isolated(
    kind: str, dim: int, num_chains: int, method: str, repeats, device: str, threads: int
) -> dict:
    """:func:`measure` of time, then of memory, each in a fresh forked process on CPU."""
    if device.startswith("cuda"):
        return {
            what: measure(kind, dim, num_chains, method, repeats, device, what) for what in ("time", "memory")
        }
    context = multiprocessing.get_context("fork")
    result = {}
    for what in ("time", "memory"):
        queue = context.Queue()
        process = context.Process(
            target=_child, args=(queue, threads, kind, dim, num_chains, method, repeats, device, what)
        )
        process.start()
        value = queue.get()
        process.join()
        if isinstance(value, str):
            raise RuntimeError(f"{kind}, d={dim}, {num_chains} chains, {method}: {value}")
        result[what] = value
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d up to 256, fewer repeats")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--flows",
        nargs="*",
        default=list(FLOWS),
        choices=list(FLOWS),
        help="flow architectures (default: all)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dense-cap",
        type=float,
        default=None,
        help="skip the dense reference beyond this predicted step time (s)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dims = [2, 16, 64, 256] if args.quick else [2, 8, 32, 64, 128, 256, 512, 784]
    chain_counts = [1, 256]
    repeats = (10, 0.5) if args.quick else (30, 2.0)
    dense_cap = args.dense_cap if args.dense_cap is not None else (3.0 if args.quick else 20.0)
    suffix = "_quick" if args.quick else ""

    rows = []
    start = time.perf_counter()
    for kind, num_chains in [(kind, n) for kind in args.flows for n in chain_counts]:
        last_dense = None  # (d, seconds) of the last dense step measured
        for dim in dims:
            row = {"flow": kind, "dim": dim, "num_chains": num_chains}
            for method in METHODS:
                if method == "dense_jacobian" and dim > DENSE_MAX_DIM.get(num_chains, 784):
                    row["dense_jacobian_skipped_s"] = float("nan")
                    continue
                if method == "dense_jacobian" and last_dense is not None:
                    # d backward passes, each costlier as d grows: about d^2 (the d^3 algebra is small here)
                    predicted = last_dense[1] * (dim / last_dense[0]) ** 2
                    if predicted > dense_cap:
                        row["dense_jacobian_skipped_s"] = predicted
                        continue
                result = measure_isolated(kind, dim, num_chains, method, repeats, args.device, args.threads)
                row[f"{method}_ms"], row[f"{method}_mb"] = result["time"], result["memory"]
                if method == "dense_jacobian":
                    last_dense = (dim, result["time"] / 1000)
            for method in METHODS[1:]:
                if f"{method}_ms" in row:
                    row[f"{method}_ratio"] = row[f"{method}_ms"] / row["flow_pass_ms"]
            rows.append(row)
            print(format_row(row), flush=True)

    meta = {
        "command": "python benchmarks/scaling.py" + (" --quick" if args.quick else ""),
        "date": time.strftime("%Y-%m-%d"),
        "machine": (
            f"{platform.machine()}, {args.device}, {args.threads} torch threads, torch {torch.__version__}"
        ),
        "flows": {kind: describe_flow(kind) for kind in args.flows},
        "jvp_methods": {kind: build_flow(kind, 2).jvp_methods for kind in args.flows},
        "dense_cap_s": dense_cap,
        "total_s": time.perf_counter() - start,
        "goals": {
            method: f"{method} step <= {goal:g}x one flow forward+backward pass at every d"
            for method, goal in GOALS.items()
        },
    }
    for method, goal in GOALS.items():
        worst = max(r[f"{method}_ratio"] for r in rows)
        meta[f"worst_{method}_ratio"] = worst
        meta[f"{method}_goal_met"] = worst <= goal
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"scaling{suffix}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = markdown(meta, rows)
    (RESULTS / f"scaling{suffix}.md").write_text(table)
    figure(rows, RESULTS / f"scaling{suffix}.png", meta)
    print(table)


def format_row(r: dict) -> str:
    def cell(method):
        if f"{method}_ms" not in r:
            predicted = r["dense_jacobian_skipped_s"]
            return (
                "skipped (past DENSE_MAX_DIM)"
                if predicted != predicted
                else f"skipped (predicted {predicted:.0f} s)"
            ) + " | |"
        ratio = f"{r[f'{method}_ratio']:.2f}x" if method != "flow_pass" else ""
        return f"{r[f'{method}_ms']:.2f} ({ratio or 'ref'}) | {r[f'{method}_mb']:.1f} |"

    return f"| {r['flow']} | {r['num_chains']} | {r['dim']} | " + " ".join(cell(m) for m in METHODS)


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"Command: `{meta['command']}`; {meta['date']}; {meta['machine']}; flows "
        + "; ".join(meta["flows"].values())
        + f"; total {meta['total_s'] / 60:.1f} min.",
        "",
        "Time per step in ms (ratio to one flow forward+backward pass), and peak memory above the "
        "flow's in MB.",
        "",
        (
            "| flow | chains | d | flow pass ms | MB | identity ms | MB | jacobian ms | MB "
            "| data-space ms | MB | dense Jacobian ms | MB |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [format_row(r) for r in rows]
    lines.append("")
    for method, goal in meta["goals"].items():
        verdict = "met" if meta[f"{method}_goal_met"] else "not met"
        lines.append(f"Goal ({goal}): {verdict}; worst {method} ratio {meta[f'worst_{method}_ratio']:.2f}x.")
    lines.append("")
    return "\n".join(lines)


def figure(rows: list[dict], path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["flow"] for r in rows))
    chain_counts = sorted({r["num_chains"] for r in rows})
    ncols = len(chain_counts) + 1
    fig, axes = plt.subplots(len(kinds), ncols, figsize=(4.2 * ncols, 3.6 * len(kinds)), squeeze=False)
    styles = {"identity": "o-", "jacobian": "s-", "data_space": "D-", "dense_jacobian": "^--"}
    for kind, axrow in zip(kinds, axes):
        for ax, num_chains in zip(axrow, chain_counts):
            subset = [r for r in rows if r["num_chains"] == num_chains and r["flow"] == kind]
            for method, style in styles.items():
                points = [(r["dim"], r[f"{method}_ratio"]) for r in subset if f"{method}_ratio" in r]
                ax.loglog(*zip(*points), style, label=method.replace("_", " "))
            for (method, goal), color in zip(GOALS.items(), ("tab:orange", "tab:green")):
                ax.axhline(
                    goal, color=color, lw=0.8, ls=":", label=f"goal, {method.replace('_', ' ')}: {goal:g}x"
                )
            ax.set(
                xlabel="dimension d",
                ylabel="step time / flow pass",
                title=f"{kind}, {num_chains} chain{'s' if num_chains > 1 else ''}",
            )
            ax.legend(fontsize=8)
        ax = axrow[-1]
        subset = [r for r in rows if r["num_chains"] == chain_counts[-1] and r["flow"] == kind]
        for method, style in {"flow_pass": "k.-", **styles}.items():
            points = [(r["dim"], max(r[f"{method}_mb"], 0.1)) for r in subset if f"{method}_mb" in r]
            ax.loglog(*zip(*points), style, label=method.replace("_", " "))
        ax.set(
            xlabel="dimension d",
            ylabel="peak memory above the flow (MB)",
            title=f"{kind}, memory, {chain_counts[-1]} chains",
        )
        ax.legend(fontsize=8)
    fig.suptitle(f"Cost of one MALA step as d grows ({meta['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
