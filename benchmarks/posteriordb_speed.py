"""NFMALA's chains as one batch against NumPyro's NUTS on the ten posteriordb posteriors, in ESS per
second with the fit (ours) and the compilation (NumPyro's) counted.

    python benchmarks/posteriordb_speed.py                  # all ten, 4 chains x (500 warmup + 1000 draws)
    python benchmarks/posteriordb_speed.py --names arma earnings
    python benchmarks/posteriordb_speed.py --replot         # table and figure again from the saved JSON

NFMALA runs as ``ChainSampler.from_model(model, model_kwargs=data, num_chains=4).run(1000, 500)``:
the staged map fitted at setup, every chain advanced in one vectorized (and traced) run of the model
per move. NumPyro runs the same models transcribed (``numpyro_models.POSTERIORDB_MODELS``, checked by
``check_numpyro_models.py``) with its NUTS and default adaptation, the same chains, warmup and draws,
both ways it can run 4 chains on a CPU (``chain_method="sequential"``, one compiled chain after
another, and ``"vectorized"``); the ratios are against the faster of the two on each posterior, its
compilation included (a first run in a fresh process, as a user's). Everything in float64, one
thread each (``torch.set_num_threads(1)``; XLA's CPU thread pool off), each posterior in its own
process, two posteriors at a time (one per core).

Scored as ``posteriordb.py`` scores (against posteriordb's reference draws): worst error of a mean in
reference sds and in Monte Carlo standard errors, worst relative error of an sd, max R-hat, min bulk
ESS (ArviZ), "right" when all four meet the goals; and whether NFMALA warned. Goals (issue 25): ESS
bulk per second, fit included, at least 3x NumPyro's on the median posterior and at least 1x on every
one. Writes benchmarks/results/posteriordb_speed.{json,md,png}.
"""

from __future__ import annotations

import os

# one thread, as torch's below (set before jax is imported)
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

from concurrent.futures import ProcessPoolExecutor  # noqa: E402

import numpy as np  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402

from posteriordb import RESULTS, right, summarize  # noqa: E402

from pyro_nfmala import ChainSampler, __version__  # noqa: E402
from pyro_nfmala.examples.posteriordb import MODELS, load_data  # noqa: E402

NUMPYRO_METHODS = ("sequential", "vectorized")
GOAL_MEDIAN, GOAL_EVERY = 3.0, 1.0


def run_nfmala(name: str, budget: dict, seed: int, **sampler_options) -> dict:
    """``ChainSampler.from_model`` on one posterior, the fit counted; ``sampler_options`` are its options."""
    torch.set_num_threads(1)
    data = load_data(name, dtype=torch.float64)
    pyro.set_rng_seed(seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        sampler = ChainSampler.from_model(
            MODELS[name],
            model_kwargs=data,
            num_chains=budget["chains"],
            seed=seed,
            fit_options={"progress": False},
            **sampler_options,
        )
        setup = time.perf_counter() - start
        idata = sampler.run(budget["samples"], budget["warmup"], progress=False, log_likelihood=False)
        seconds = time.perf_counter() - start
    samples = {key: np.asarray(idata.posterior[key].values) for key in idata.posterior.data_vars}
    result = summarize(samples, name, seconds, setup, budget)
    result["warnings"] = sorted(
        {str(w.message)[:120] for w in caught if issubclass(w.category, RuntimeWarning)}
    )
    result["map"] = sampler.fit_result.stage
    result["khat"] = sampler.flow_check.khat
    result["non_centred"] = sampler.non_centring is not None
    result["traced"] = bool(sampler.density.traced and sampler.density.traced.traced_shapes)
    result["divergences"] = int(sampler.num_divergent)
    result["tries"] = sampler.independence_tries
    result["right"] = right(result)
    return result


def run_numpyro(name: str, budget: dict, seed: int, chain_method: str) -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)
    from numpyro.infer import MCMC, NUTS
    from numpyro_models import POSTERIORDB_MODELS

    model, data = POSTERIORDB_MODELS[name]()
    mcmc = MCMC(
        NUTS(model),
        num_warmup=budget["warmup"],
        num_samples=budget["samples"],
        num_chains=budget["chains"],
        chain_method=chain_method,
        progress_bar=False,
    )
    start = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(seed), **data)
    samples = {key: np.asarray(value) for key, value in mcmc.get_samples(group_by_chain=True).items()}
    seconds = time.perf_counter() - start
    result = summarize(samples, name, seconds, 0.0, budget)
    result["warnings"] = []
    result["divergences"] = int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum())
    result["right"] = right(result)
    return result


def run_posterior(name: str, budget: dict, seed: int, methods: list[str]) -> dict:
    """Every method on one posterior, one after the other in a fresh process (NumPyro compiles anew)."""
    results = {}
    for method in methods:
        if method == "NFMALA":
            results[method] = run_nfmala(name, budget, seed)
        else:
            results[method] = run_numpyro(name, budget, seed, method.split()[-1])
    return results


def best_numpyro(methods: dict) -> tuple[str, dict] | None:
    candidates = [(key, value) for key, value in methods.items() if key.startswith("NumPyro")]
    return max(candidates, key=lambda item: item[1]["ess_per_second"]) if candidates else None


def ratios(results: dict) -> dict[str, float]:
    """NFMALA's ESS/s over the faster NumPyro run's, per posterior."""
    out = {}
    for name, methods in results.items():
        anchor = best_numpyro(methods)
        if anchor is not None and "NFMALA" in methods:
            out[name] = methods["NFMALA"]["ess_per_second"] / anchor[1]["ess_per_second"]
    return out


def markdown(results: dict, header: str) -> str:
    lines = [
        header,
        "",
        "| posterior | method | worst mean error (sd) | (MCSE) | worst sd error | max R-hat | min ESS bulk "
        "| fit / compile s | total s | ESS/s | right | warned |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, methods in results.items():
        for method, r in methods.items():
            if method == "NFMALA":
                coordinates = ", non-centred" if r["non_centred"] else ""
                label = f"NFMALA batched ({r['map']}{coordinates}, k-hat {r['khat']:.2f})"
                setup = f"{r['fit_seconds']:.1f}"
            else:
                label, setup = method, "incl."
            lines.append(
                f"| {name} | {label} | {r['worst_mean_error_sd']:.3f} | {r['worst_mean_error_mcse']:.1f} "
                f"| {r['worst_sd_error']:.1%} | {r['max_rhat']:.3f} | {r['min_ess_bulk']:.0f} | {setup} "
                f"| {r['seconds']:.1f} | {r['ess_per_second']:.1f} | {'yes' if r['right'] else 'no'} "
                f"| {'yes' if r['warnings'] else '-'} |"
            )
    found = ratios(results)
    if found:
        values = list(found.values())
        median, least = float(np.median(values)), min(values)
        lines += [
            "",
            "ESS/s ratio NFMALA / the faster NumPyro run, fit and compilation included: "
            + ", ".join(f"{name} {ratio:.2f}" for name, ratio in found.items())
            + f"; median {median:.2f} (goal >= {GOAL_MEDIAN:g}: "
            f"{'met' if median >= GOAL_MEDIAN else 'not met'}),"
            f" min {least:.2f} (goal >= {GOAL_EVERY:g} on every one: "
            f"{'met' if least >= GOAL_EVERY else 'not met'}).",
        ]
        wrong_anchor = [name for name, methods in results.items() if not best_numpyro(methods)[1]["right"]]
        if wrong_anchor:
            lines.append(
                "The faster NumPyro run was not right (mean, sd or R-hat off the reference) on: "
                + ", ".join(wrong_anchor)
                + "; its ESS/s counts draws of a wrong answer."
            )
    if any("NFMALA" in m for m in results.values()):
        nfmala = {name: m["NFMALA"] for name, m in results.items() if "NFMALA" in m}
        silent = [name for name, r in nfmala.items() if not r["right"] and not r["warnings"]]
        lines.append(
            f"NFMALA right on {sum(r['right'] for r in nfmala.values())} of {len(nfmala)}; silently wrong "
            f"(off and no warning): {', '.join(silent) or 'none'}."
        )
    return "\n".join(lines) + "\n"


def figure(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    methods = ["NFMALA", *(f"NumPyro {m}" for m in NUMPYRO_METHODS)]
    fig, ax = plt.subplots(figsize=(11.5, 4.2))
    positions = np.arange(len(names))
    width = 0.8 / len(methods)
    for k, method in enumerate(methods):
        values = [results[n].get(method, {}).get("ess_per_second", np.nan) for n in names]
        bars = ax.bar(positions + (k - 1) * width, values, width, label=method, color=f"C{k}")
        for bar, name in zip(bars, names):
            if method in results[name] and not results[name][method]["right"]:
                ax.annotate(
                    "x", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom"
                )
    ax.set(yscale="log", ylabel="min bulk ESS per second\n(fit / compilation included)")
    ax.set_title(
        "posteriordb: NFMALA's batched chains vs NumPyro's NUTS (x: not right against the reference)"
    )
    ax.set_xticks(positions, names, rotation=30, ha="right")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "posteriordb_speed.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--names", nargs="*", default=list(MODELS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument(
        "--methods", nargs="*", default=["NFMALA", *(f"NumPyro {m}" for m in NUMPYRO_METHODS)]
    )
    parser.add_argument("--replot", action="store_true", help="table and figure from the saved JSON")
    args = parser.parse_args()
    path = RESULTS / "posteriordb_speed.json"
    if args.replot:
        saved = json.loads(path.read_text())
        (RESULTS / "posteriordb_speed.md").write_text(markdown(saved["results"], saved["header"]))
        figure(saved["results"])
        return
    budget = {"chains": args.chains, "warmup": args.warmup, "samples": args.samples}
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")  # a fresh process per posterior: JAX compiles anew
    with ProcessPoolExecutor(args.jobs, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {
            name: pool.submit(run_posterior, name, budget, args.seed, args.methods) for name in args.names
        }
        results = {}
        for name, future in futures.items():
            results[name] = future.result()
            print(f"{name}: done ({time.perf_counter() - start:.0f} s)", flush=True)
    import jax
    import numpyro

    header = (
        f"posteriordb speed: {budget['chains']} chains x ({budget['warmup']} warmup + {budget['samples']} "
        f"draws), float64, one thread per method, {platform.machine()}, torch {torch.__version__}, pyro "
        f"{pyro.__version__}, pyro_nfmala {__version__}, jax {jax.__version__}, "
        f"numpyro {numpyro.__version__}; "
        f"{time.perf_counter() - start:.0f} s in all ({args.jobs} posteriors at a time). Command: "
        f"python benchmarks/posteriordb_speed.py {' '.join(sys.argv[1:])}".rstrip()
    )
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps({"header": header, "results": results}, indent=1))
    table = markdown(results, header)
    (RESULTS / "posteriordb_speed.md").write_text(table)
    if "NFMALA" in args.methods:
        figure(results)
    print(table)


if __name__ == "__main__":
    main()
