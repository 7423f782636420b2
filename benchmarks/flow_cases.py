"""Where a Gaussian map is not enough: NFMALA's one line against NumPyro's NUTS, fit and compile counted.

    python benchmarks/flow_cases.py                  # 4 chains x (500 warmup + 1000 draws)
    python benchmarks/flow_cases.py --quick          # 2 chains x (150 + 300)
    python benchmarks/flow_cases.py --names funnel100 garch11
    python benchmarks/flow_cases.py --make-references  # the generated references (NumPyro, long runs)

Four posteriors (``pyro_nfmala.examples.flow_cases``, and posteriordb's centred eight schools): Neal's
funnel in 100 dimensions written centred, the centred eight schools, a GARCH(1, 1) over a 200-step
recursion, and a 66-parameter Hilbert-space approximate GP. NFMALA is ``MCMC(NFMALA(model))``, its time
the fit at setup plus warmup and sampling; NumPyro's NUTS (an optional column: ``pip install numpyro``)
runs the same model written in NumPyro (``benchmarks/numpyro_models.py``), its time the whole
``mcmc.run`` with its JIT compile. Both: the same chains, warmup and draws, float64, chains one after
another, one thread.

References: the funnel's are exact (its prior); the eight schools' are posteriordb's; the GARCH and the
approximate GP have no closed form, so their references are 4 x 10,000 draws of NumPyro's NUTS after
2,000 warmup steps, thinned to 4 x 1,000 (``--make-references``, kept in ``benchmarks/data/flow_cases``).
The funnel is scored on ``log_sigma`` and ``x_i / sigma`` (exactly N(0, 1) given ``log_sigma``), where
the heavy tails of ``x`` itself make its sd meaningless to compare.

Writes benchmarks/results/flow_cases{_quick}.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

from pathlib import Path

import numpy as np

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import pyro  # noqa: E402
import torch  # noqa: E402

from pyro.infer import MCMC  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from posteriordb import RESULTS, right, score  # noqa: E402

from pyro_nfmala import NFMALA, to_inference_data  # noqa: E402
from pyro_nfmala.examples.flow_cases import CASES, funnel_reference  # noqa: E402
from pyro_nfmala.examples.posteriordb import (  # noqa: E402
    comparable_reference,
    eight_schools_centered,
    load_data,
    reference_names,
)

REFERENCES = Path(__file__).resolve().parent / "data" / "flow_cases"
NAMES = ["funnel100", "eight_schools_centered", "garch11", "approximate_gp"]


def case(name: str):
    """The Pyro model and its data (keyword arguments, float64)."""
    if name == "eight_schools_centered":
        return eight_schools_centered, load_data("eight_schools", dtype=torch.float64)
    model, data = CASES[name]
    return model, data()


def flat_draws(name: str, samples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Draws ``{site: (chains, draws, ...)}`` as flat names, with the funnel's ``x / sigma``."""
    samples = {key: np.asarray(value, dtype=np.float64) for key, value in samples.items()}
    if name == "funnel100":
        samples = {
            "log_sigma": samples["log_sigma"],
            "x_std": samples["x"][..., :10] / np.exp(samples["log_sigma"])[..., None],
        }
    samples.pop("beta1", None)  # a deterministic site in Pyro, kept by NumPyro
    return reference_names(samples)


def reference(name: str) -> dict[str, np.ndarray]:
    if name == "eight_schools_centered":
        return comparable_reference("eight_schools")
    if name == "funnel100":
        draws = funnel_reference()
        return flat_draws(name, {key: value[None] for key, value in draws.items()})
    path = REFERENCES / f"{name}.npz"
    if not path.exists():
        raise FileNotFoundError(f"no reference for {name}: run benchmarks/flow_cases.py --make-references")
    return dict(np.load(path))


def run_nfmala(name: str, budget: dict, seed: int) -> dict:
    model, data = case(name)
    pyro.set_rng_seed(seed)
    kernel = NFMALA(model, fit_options={"progress": False}, max_plate_nesting=1)
    mcmc = MCMC(
        kernel, budget["samples"], budget["warmup"], num_chains=budget["chains"], disable_progbar=True
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        mcmc.run(**data)
        seconds = time.perf_counter() - start
        to_inference_data(mcmc)
    samples = {key: value.numpy() for key, value in mcmc.get_samples(group_by_chain=True).items()}
    result = score(flat_draws(name, samples), reference(name), seconds, kernel.fit_result.seconds, budget)
    result["warnings"] = sorted(
        {str(w.message)[:120] for w in caught if issubclass(w.category, RuntimeWarning)}
    )
    result["map"] = kernel.fit_result.stage
    result["khat"] = kernel.flow_check.khat
    result["non_centred"] = list(kernel.non_centred_sites)
    result["right"] = right(result)
    return result


def run_numpyro(name: str, budget: dict, seed: int, *, reference_run: bool = False) -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)
    import numpyro_models

    from numpyro.infer import MCMC as NumPyroMCMC
    from numpyro.infer import NUTS as NumPyroNUTS

    model, data = numpyro_models.MODELS[name]()
    mcmc = NumPyroMCMC(
        NumPyroNUTS(model),
        num_warmup=budget["warmup"],
        num_samples=budget["samples"],
        num_chains=budget["chains"],
        chain_method="sequential",
        progress_bar=False,
    )
    start = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(seed), **data)
    samples = {key: np.asarray(value) for key, value in mcmc.get_samples(group_by_chain=True).items()}
    seconds = time.perf_counter() - start
    if reference_run:
        return samples
    result = score(flat_draws(name, samples), reference(name), seconds, 0.0, budget)
    result["warnings"] = []
    result["divergences"] = int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum())
    result["right"] = right(result)
    return result


def make_references(names: list[str]) -> None:
    REFERENCES.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name in ("funnel100", "eight_schools_centered"):
            continue
        samples = run_numpyro(
            name, {"chains": 4, "warmup": 2000, "samples": 10000}, 12345, reference_run=True
        )
        flat = flat_draws(name, samples)
        np.savez_compressed(
            REFERENCES / f"{name}.npz",
            **{key: value[:, ::10].astype(np.float32) for key, value in flat.items()},
        )
        print(f"{name}: reference written", flush=True)


def markdown(results: dict, header: str) -> str:
    lines = [
        header,
        "",
        "| posterior | method | worst mean error (sd) | (MCSE) | worst sd error | max R-hat | min ESS bulk "
        "| ESS/s | fit s | total s | right | warned |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, methods in results.items():
        for method, r in methods.items():
            if "error" in r:
                lines.append(f"| {name} | {method} | failed: {r['error'][:80]} | | | | | | | | no | |")
                continue
            label = method
            if method == "NFMALA":
                centring = f", non-centred {', '.join(r['non_centred'])}" if r["non_centred"] else ""
                label = f"NFMALA ({r['map']}, k-hat {r['khat']:.2f}{centring})"
            lines.append(
                f"| {name} | {label} | {r['worst_mean_error_sd']:.3f} | {r['worst_mean_error_mcse']:.1f} "
                f"| {r['worst_sd_error']:.1%} | {r['max_rhat']:.3f} | {r['min_ess_bulk']:.0f} "
                f"| {r['ess_per_second']:.1f} | {r['fit_seconds']:.1f} | {r['seconds']:.0f} "
                f"| {'yes' if r['right'] else 'no'} | {'yes' if r['warnings'] else '-'} |"
            )
    ratios = {
        name: m["NFMALA"]["ess_per_second"] / m["NumPyro NUTS"]["ess_per_second"]
        for name, m in results.items()
        if "ess_per_second" in m.get("NFMALA", {}) and "ess_per_second" in m.get("NumPyro NUTS", {})
    }
    times = {
        name: m["NFMALA"]["seconds"] / m["NumPyro NUTS"]["seconds"]
        for name, m in results.items()
        if "seconds" in m.get("NFMALA", {}) and "seconds" in m.get("NumPyro NUTS", {})
    }
    if ratios:
        lines += [
            "",
            "NFMALA / NumPyro NUTS: ESS/s ratio (fit and compile included) "
            + ", ".join(f"{name} {ratio:.2f}" for name, ratio in ratios.items())
            + "; wall-time ratio "
            + ", ".join(f"{name} {ratio:.2f}" for name, ratio in times.items())
            + ".",
        ]
    silent = [
        n
        for n, m in results.items()
        if "right" in m["NFMALA"] and not m["NFMALA"]["right"] and not m["NFMALA"]["warnings"]
    ]
    lines.append(f"Silently wrong (NFMALA off and no warning): {', '.join(silent) or 'none'}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--names", nargs="*", default=NAMES)
    parser.add_argument("--quick", action="store_true", help="2 chains x (150 warmup + 300 draws)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--make-references", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.make_references:
        make_references(args.names)
        return
    try:
        import numpyro  # noqa: F401

        methods = ["NFMALA", "NumPyro NUTS"]
    except ImportError:
        print("numpyro is not installed (pip install numpyro): NFMALA only", flush=True)
        methods = ["NFMALA"]
    budget = (
        {"chains": 2, "warmup": 150, "samples": 300}
        if args.quick
        else {"chains": 4, "warmup": 500, "samples": 1000}
    )
    start = time.perf_counter()
    results = {}
    for name in args.names:
        results[name] = {}
        for method in methods:
            run = run_nfmala if method == "NFMALA" else run_numpyro
            try:
                results[name][method] = run(name, budget, args.seed)
            except Exception as error:  # noqa: BLE001 - a crash is a result of the benchmark
                results[name][method] = {"error": f"{type(error).__name__}: {error}"}
            shown = {key: value for key, value in results[name][method].items() if key != "parameters"}
            print(f"{name} {method}: {json.dumps(shown)[:400]}", flush=True)
    header = (
        f"Flow cases ({'quick' if args.quick else 'full'}): {budget['chains']} chains x ({budget['warmup']} "
        f"warmup + {budget['samples']} draws), float64, one thread, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, pyro {pyro.__version__}; "
        f"{time.perf_counter() - start:.0f} s in all."
    )
    suffix = "_quick" if args.quick else ""
    RESULTS.mkdir(exist_ok=True)
    saved = RESULTS / f"flow_cases{suffix}.json"
    if set(args.names) != set(NAMES) and saved.exists():  # a rerun of some cases: keep the others' rows
        earlier = json.loads(saved.read_text())
        results = {**earlier["results"], **results}
        results = {name: results[name] for name in NAMES if name in results}
        header += f" Rerun of {', '.join(args.names)}; the other rows: {earlier['header']}"
    (RESULTS / f"flow_cases{suffix}.json").write_text(
        json.dumps({"header": header, "results": results}, indent=1)
    )
    table = markdown(results, header)
    (RESULTS / f"flow_cases{suffix}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
