"""NFMALA's one line against Pyro's NUTS on ten posteriordb posteriors, side by side, fit time counted.

    python benchmarks/posteriordb.py                 # all ten, 4 chains x (500 warmup + 1000 draws)
    python benchmarks/posteriordb.py --quick         # 2 chains x (150 + 300): minutes, for a look
    python benchmarks/posteriordb.py --names arma earnings
    python benchmarks/posteriordb.py --replot        # table and figure again from the saved JSON

Each posterior runs in its own process (two at a time, ``--jobs``), both methods one after the other
in that process so that their times compare like with like. Both run through Pyro's ``MCMC`` with
the same chains, warmup and draws, in float64, chains one after another (Pyro keeps one of the 2
cores free). NFMALA is the one line ``MCMC(NFMALA(model))``: its time includes fitting the staged
map at setup (reported apart too). NUTS is Pyro's, with the same init strategy (uniform in (-2, 2)
of the unconstrained space, which also starts improper flat priors) and its default adaptation.

Scored against posteriordb's reference draws (10 x 1,000 long Stan runs): per parameter, the error
of the mean in reference sd and in Monte Carlo standard errors (ours from our ESS, the reference's
from its), the relative error of the sd; the max rank-normalized R-hat and the min bulk ESS
(ArviZ); ESS per second with and without the fit; time to a result (fit + warmup + the draws that
give every parameter a bulk ESS of 400, extrapolated linearly from this run); and whether the
library warned (any RuntimeWarning of pyro_nfmala: flow check, divergences, convergence).

Writes benchmarks/results/posteriordb{_quick}.json and .md, and a figure beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import platform
import time
import warnings

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import arviz as az
import numpy as np
import pyro
import torch

from pyro.infer import MCMC, NUTS

from pyro_nfmala import NFMALA, from_arrays
from pyro_nfmala.examples.posteriordb import (
    MODELS,
    comparable_reference,
    derived,
    load_data,
    reference_names,
)
from pyro_nfmala.model.density import default_init

RESULTS = Path(__file__).resolve().parent / "results"
ESS_TARGET = 400  # bulk ESS per parameter that makes "a result"
GOAL_MEAN_ERROR, GOAL_SD_ERROR, GOAL_RHAT = 0.1, 0.1, 1.01
MAX_PLATE_NESTING = 1  # every model here has at most one plate


def summarize(samples: dict[str, np.ndarray], name: str, seconds: float, fit_seconds: float, budget) -> dict:
    """Errors against the reference, R-hat, ESS, speed; ``samples`` are ``{site: (chains, draws, ...)}``."""
    reference = comparable_reference(name)
    flat = reference_names(derived(name, samples))
    return score(flat, reference, seconds, fit_seconds, budget)


def score(flat: dict, reference: dict, seconds: float, fit_seconds: float, budget) -> dict:
    """:func:`summarize` on draws and reference draws that share flat names (``"theta[1]"``)."""
    idata = from_arrays({key: flat[key] for key in reference})
    rhat = az.rhat(idata)
    ess = az.ess(idata, method="bulk")
    reference_ess = az.ess(from_arrays(reference), method="bulk")
    rows = {}
    for key, ref in reference.items():
        draws = np.asarray(flat[key], dtype=np.float64)
        ref_sd = float(ref.std())
        ours_ess, ref_ess = float(ess[key]), float(reference_ess[key])
        mcse = math.sqrt(float(draws.std()) ** 2 / max(ours_ess, 1.0) + ref_sd**2 / ref_ess)
        error = float(draws.mean() - ref.mean())
        rows[key] = {
            "mean_error_sd": error / ref_sd,
            "mean_error_mcse": error / mcse,
            "sd_error": float(draws.std()) / ref_sd - 1,
            "rhat": float(rhat[key]),
            "ess_bulk": ours_ess,
        }
    min_ess = min(row["ess_bulk"] for row in rows.values())
    sampling = seconds - fit_seconds
    warm = budget["warmup"] / (budget["warmup"] + budget["samples"])
    return {
        "seconds": seconds,
        "fit_seconds": fit_seconds,
        "worst_mean_error_sd": max(abs(row["mean_error_sd"]) for row in rows.values()),
        "worst_mean_error_mcse": max(abs(row["mean_error_mcse"]) for row in rows.values()),
        "worst_sd_error": max(abs(row["sd_error"]) for row in rows.values()),
        "max_rhat": max(row["rhat"] for row in rows.values()),
        "min_ess_bulk": min_ess,
        "ess_per_second": min_ess / seconds,
        "ess_per_second_without_fit": min_ess / max(sampling, 1e-9),
        "time_to_result": fit_seconds + sampling * (warm + (1 - warm) * ESS_TARGET / max(min_ess, 1.0)),
        "parameters": rows,
    }


def right(result: dict) -> bool:
    """Every goal met: mean within 0.1 sd and 4 MCSE, sd within 10%, R-hat at most 1.01."""
    return (
        result["worst_mean_error_sd"] <= GOAL_MEAN_ERROR
        and result["worst_mean_error_mcse"] <= 4
        and result["worst_sd_error"] <= GOAL_SD_ERROR
        and result["max_rhat"] <= GOAL_RHAT
    )


def run_method(method: str, name: str, budget: dict, seed: int) -> dict:
    torch.set_num_threads(1)
    data = load_data(name, dtype=torch.float64)
    model = MODELS[name]
    pyro.set_rng_seed(seed)
    if method == "NFMALA":
        kernel = NFMALA(model, fit_options={"progress": False}, max_plate_nesting=MAX_PLATE_NESTING)
    else:
        kernel = NUTS(model, init_strategy=default_init, max_plate_nesting=MAX_PLATE_NESTING)
    mcmc = MCMC(
        kernel,
        num_samples=budget["samples"],
        warmup_steps=budget["warmup"],
        num_chains=budget["chains"],
        disable_progbar=True,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        mcmc.run(**data)
        seconds = time.perf_counter() - start
        if method == "NFMALA":
            from pyro_nfmala import to_inference_data

            to_inference_data(mcmc)  # its convergence warnings count as the library's
    library_warnings = sorted(
        {str(w.message)[:100] for w in caught if issubclass(w.category, RuntimeWarning)}
        if method == "NFMALA"
        else set()
    )
    samples = {
        key: value.detach().double().numpy() for key, value in mcmc.get_samples(group_by_chain=True).items()
    }
    fit_seconds = kernel.fit_result.seconds if method == "NFMALA" else 0.0
    result = summarize(samples, name, seconds, fit_seconds, budget)
    result["warnings"] = library_warnings
    if method == "NFMALA":
        result["map"] = kernel.fit_result.stage
        result["khat"] = kernel.flow_check.khat
        result["divergences"] = sum(len(v) for v in mcmc.diagnostics()["divergences"].values())
    else:
        result["divergences"] = sum(len(v) for v in mcmc.diagnostics()["divergences"].values())
    result["right"] = right(result)
    return result


class OutOfTime(Exception):
    pass


def _out_of_time(signum, frame):
    raise OutOfTime


def run_posterior(name: str, budget: dict, seed: int, timeout: int, methods=("NFMALA", "NUTS")) -> dict:
    """Both methods on one posterior; a method still running after ``timeout`` seconds is stopped
    and scored as not right, with no ESS (Pyro's MCMC keeps its draws only at the end)."""
    import signal

    signal.signal(signal.SIGALRM, _out_of_time)
    results = {}
    for method in methods:
        signal.alarm(timeout)
        try:
            results[method] = run_method(method, name, budget, seed)
        except OutOfTime:
            results[method] = {"timed_out": True, "seconds": float(timeout), "right": False, "warnings": []}
        finally:
            signal.alarm(0)
    return results


def markdown(results: dict, header: str) -> str:
    lines = [
        header,
        "",
        "| posterior | method | worst mean error (sd) | (MCSE) | worst sd error | max R-hat | min ESS bulk "
        "| ESS/s | ESS/s w/o fit | fit s | total s | time to ESS 400 | right | warned |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, methods in results.items():
        for method, r in methods.items():
            if r.get("timed_out"):
                lines.append(
                    f"| {name} | {method} | did not finish in {r['seconds']:.0f} s | | | | | | | | | | no | |"
                )
                continue
            label = method if method == "NUTS" else f"NFMALA ({r['map']}, k-hat {r['khat']:.2f})"
            lines.append(
                f"| {name} | {label} | {r['worst_mean_error_sd']:.3f} | {r['worst_mean_error_mcse']:.1f} "
                f"| {r['worst_sd_error']:.1%} | {r['max_rhat']:.3f} | {r['min_ess_bulk']:.0f} "
                f"| {r['ess_per_second']:.1f} | {r['ess_per_second_without_fit']:.1f} "
                f"| {r['fit_seconds']:.1f} "
                f"| {r['seconds']:.0f} | {r['time_to_result']:.0f} | {'yes' if r['right'] else 'no'} "
                f"| {'yes' if r['warnings'] else '-'} |"
            )
    silent = [name for name, m in results.items() if not m["NFMALA"]["right"] and not m["NFMALA"]["warnings"]]
    if not all("NUTS" in m for m in results.values()):
        lines += [
            "",
            f"NFMALA right on {sum(m['NFMALA']['right'] for m in results.values())} of {len(results)}; "
            f"silently wrong (NFMALA off and no warning): {', '.join(silent) or 'none'}.",
        ]
        return "\n".join(lines) + "\n"
    ratios = [
        m["NFMALA"].get("ess_per_second", 0.0) / m["NUTS"]["ess_per_second"]
        if not m["NUTS"].get("timed_out")
        else math.inf
        for m in results.values()
    ]
    lines += [
        "",
        "ESS/s ratio NFMALA / NUTS, fit included (a NUTS run that did not finish counts as a ratio "
        "above every finite one): "
        + ", ".join(
            f"{name} {ratio:.2f}" if math.isfinite(ratio) else f"{name} (NUTS did not finish)"
            for name, ratio in zip(results, ratios)
        )
        + f"; median {float(np.median(ratios)):.2f}, min {min(ratios):.2f}.",
        f"NFMALA right on {sum(m['NFMALA']['right'] for m in results.values())} of {len(results)}, "
        f"NUTS on {sum(m['NUTS']['right'] for m in results.values())}; "
        f"silently wrong (NFMALA off and no warning): {', '.join(silent) or 'none'}.",
    ]
    return "\n".join(lines) + "\n"


def figure(results: dict, suffix: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    positions = np.arange(len(names))
    for offset, method, color in [(-0.2, "NFMALA", "C0"), (0.2, "NUTS", "C1")]:
        axes[0].bar(
            positions + offset,
            [results[n][method].get("ess_per_second", 0.0) for n in names],
            0.4,
            label=method,
            color=color,
        )
        axes[1].bar(
            positions + offset,
            [results[n][method].get("worst_mean_error_sd", math.nan) for n in names],
            0.4,
            label=method,
            color=color,
        )
    for position, name in zip(positions, names):
        if results[name]["NUTS"].get("timed_out"):
            for ax in axes:
                ax.annotate(
                    f"NUTS: no result\nin {results[name]['NUTS']['seconds']:.0f} s",
                    (position + 0.2, 0.02),
                    xycoords=("data", "axes fraction"),
                    rotation=90,
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    color="C1",
                )
    axes[0].set(yscale="log", ylabel="min bulk ESS per second (fit included)", title="Speed")
    axes[1].axhline(GOAL_MEAN_ERROR, color="k", ls="--", lw=1, label="goal 0.1 sd")
    axes[1].set(yscale="log", ylabel="worst |mean error| (reference sd)", title="Accuracy")
    for ax in axes:
        ax.set_xticks(positions, names, rotation=45, ha="right")
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"posteriordb{suffix}.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--names", nargs="*", default=list(MODELS))
    parser.add_argument("--quick", action="store_true", help="2 chains x (150 warmup + 300 draws)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per method and posterior")
    parser.add_argument(
        "--methods", nargs="*", default=["NFMALA", "NUTS"], help="NFMALA alone: a check, not a comparison"
    )
    parser.add_argument(
        "--replot", action="store_true", help="rewrite the table and figure from the saved JSON, run nothing"
    )
    args = parser.parse_args()
    budget = (
        {"chains": 2, "warmup": 150, "samples": 300}
        if args.quick
        else {"chains": 4, "warmup": 500, "samples": 1000}
    )
    suffix = ("_quick" if args.quick else "") + ("" if "NUTS" in args.methods else "_nfmala")
    if args.replot:
        saved = json.loads((RESULTS / f"posteriordb{suffix}.json").read_text())
        (RESULTS / f"posteriordb{suffix}.md").write_text(markdown(saved["results"], saved["header"]))
        figure(saved["results"], suffix)
        return
    start = time.perf_counter()
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        futures = {
            name: pool.submit(run_posterior, name, budget, args.seed, args.timeout, args.methods)
            for name in args.names
        }
        results = {}
        for name, future in futures.items():
            results[name] = future.result()
            print(f"{name}: done ({time.perf_counter() - start:.0f} s)", flush=True)
    header = (
        f"posteriordb benchmark ({'quick' if args.quick else 'full'}): {budget['chains']} chains x "
        f"({budget['warmup']} warmup + {budget['samples']} draws), float64, "
        f"{platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, pyro {pyro.__version__}; {time.perf_counter() - start:.0f} s in all "
        f"({args.jobs} posteriors at a time, one per core)."
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"posteriordb{suffix}.json").write_text(
        json.dumps({"header": header, "results": results}, indent=1)
    )
    table = markdown(results, header)
    (RESULTS / f"posteriordb{suffix}.md").write_text(table)
    if "NUTS" in args.methods:
        figure(results, suffix)
    print(table)


if __name__ == "__main__":
    main()
