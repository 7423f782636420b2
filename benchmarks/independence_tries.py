"""Several independence moves per step (``independence_tries``) on the ten posteriordb posteriors, side
by side with one, in ESS per second with the fit counted.

    python benchmarks/independence_tries.py                        # tries 1, 4, 8; seeds 0 and 1
    python benchmarks/independence_tries.py --names mesquite --tries 1 2 auto --seeds 0 1 2

Each run is ``ChainSampler.from_model(model, num_chains=4, independence_tries=k).run(1000, 500)`` as in
``posteriordb_speed.py`` (float64, one thread, a fresh process per run, two at a time), scored the same
way against posteriordb's reference draws; ``auto`` is the default (one try in warmup, then 8 where warmup
accepted fewer than 85% of the proposals, else 1; the table says what it chose). The fit does not depend
on ``k``: the columns differ by the sampling phase alone. Min bulk ESS of a 4-chain run swings by 2-3x
between seeds where a chain now and then sticks in a tail the map underweights, so every setting runs
with several seeds and the table gives their mean. Writes benchmarks/results/independence_tries.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import sys
import time

from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from posteriordb import RESULTS
from posteriordb_speed import run_nfmala

from pyro_nfmala import __version__
from pyro_nfmala.examples.posteriordb import MODELS


def run(name: str, tries: int | str, seed: int, budget: dict) -> dict:
    result = run_nfmala(name, budget, seed, independence_tries=tries)
    keys = ("min_ess_bulk", "seconds", "fit_seconds", "ess_per_second", "right", "tries")
    return {key: result[key] for key in keys}


def markdown(rows: dict, tries: list[int], header: str) -> str:
    head = ["posterior", *(f"{k} tries: ESS, s, ESS/s" for k in tries), *(f"ESS/s x{k}" for k in tries[1:])]
    lines = [header, "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, by_tries in rows.items():
        means = {}
        cells = [name]
        for k in tries:
            runs = by_tries[str(k)]
            ess = np.mean([r["min_ess_bulk"] for r in runs])
            seconds = np.mean([r["seconds"] for r in runs])
            means[k] = np.mean([r["ess_per_second"] for r in runs])
            wrong = sum(not r["right"] for r in runs)
            chose = sorted({r["tries"] for r in runs}) if k == "auto" else []
            cells.append(
                f"{ess:.0f}, {seconds:.1f}, {means[k]:.0f}"
                + (f" ({wrong} wrong)" if wrong else "")
                + (f" [{'/'.join(map(str, chose))}]" if chose else "")
            )
        cells += [f"{means[k] / means[tries[0]]:.2f}" for k in tries[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--names", nargs="*", default=list(MODELS))
    parser.add_argument(
        "--tries", nargs="*", type=lambda value: value if value == "auto" else int(value), default=[1, 4, 8]
    )
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    budget = {"chains": 4, "warmup": 500, "samples": 1000}
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {
            (name, k, seed): pool.submit(run, name, k, seed, budget)
            for name in args.names
            for k in args.tries
            for seed in args.seeds
        }
        rows: dict = {}
        for (name, k, seed), future in futures.items():
            rows.setdefault(name, {}).setdefault(str(k), []).append(future.result())
        print(f"done in {time.perf_counter() - start:.0f} s", flush=True)
    header = (
        f"independence tries: 4 chains x (500 warmup + 1000 draws), seeds {args.seeds} (means), float64, one "
        f"thread per run, {platform.machine()}, torch {torch.__version__}, pyro_nfmala {__version__}; "
        f"{time.perf_counter() - start:.0f} s in all. Command: "
        f"python benchmarks/independence_tries.py {' '.join(sys.argv[1:])}".rstrip()
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "independence_tries.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    table = markdown(rows, args.tries, header)
    (RESULTS / "independence_tries.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
