"""The two doors on one run: ``pyro_nfmala.MCMC(NFMALA(model), num_chains=4)`` against
``ChainSampler.from_model(model, num_chains=4)``, and Pyro's own ``MCMC`` (a chain at a time), side by side.

    python benchmarks/front_ends.py                 # both models, seeds 0 and 1 (about 6 minutes on 2 cores)
    python benchmarks/front_ends.py --seeds 0       # one seed
    python benchmarks/front_ends.py --replot        # table again from the saved JSON

Each run is one process of its own (spawned, one torch thread, float64), one after another with nothing
else running, from the same seed: the wall time counts everything from building the sampler to the
draws in hand (the density, the staged fit, warmup and sampling; not ArviZ's pointwise log-likelihood,
which neither door is asked for here). 4 chains x (500 warmup + 1000 draws), every option the default.

- **eight schools, centred** (``pyro.plate`` form, posteriordb's ``eight_schools_centered``), scored
  against posteriordb's reference draws (``$PYRO_NFMALA_POSTERIORDB``);
- **a conjugate regression**, 100 coefficients, 5,000 rows (``y = X beta + noise``, noise sd 1 known,
  ``beta ~ N(0, I)``), scored against its exact Gaussian posterior.

"Right" is ``posteriordb.py``'s: every mean within 0.1 reference sd and within 4 Monte Carlo standard
errors, every sd within 10%, R-hat at most 1.01 (ArviZ, rank-normalized); the regression's reference is
40,000 exact draws of its posterior. Goal (issue 33): ``pyro_nfmala.MCMC`` at most 1.2x the
wall time of ``ChainSampler.from_model`` on each model, right on both. Writes
benchmarks/results/front_ends.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import sys
import time
import warnings

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch

RESULTS = Path(__file__).resolve().parent / "results"
DOORS = ("pyro_nfmala.MCMC", "ChainSampler.from_model", "pyro.infer.MCMC")
MODELS = ("eight schools (centred)", "regression (d = 100, n = 5,000)")
GOAL_RATIO = 1.2
BUDGET = {"chains": 4, "warmup": 500, "samples": 1000}


def regression_data(d: int = 100, n: int = 5000, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    beta = torch.randn(d, generator=generator, dtype=torch.float64)
    return {"x": x, "y": x @ beta + torch.randn(n, generator=generator, dtype=torch.float64)}


def regression(x, y):
    """beta ~ N(0, I), y ~ N(x beta, 1), written as users write it (``x @ beta``: it runs vmapped over the
    chains; the broadcast spelling ``(x * beta.unsqueeze(-2)).sum(-1)`` forms an (n, d) product per chain,
    7.6 ms a value and gradient of 4 chains at d = 100, n = 5,000, against 0.64 ms)."""
    beta = pyro.sample("beta", dist.Normal(x.new_zeros(x.shape[-1]), 1.0).to_event(1))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(x @ beta, 1.0), obs=y)


def regression_reference(x, y, num_draws: int = 40_000, seed: int = 1) -> dict[str, np.ndarray]:
    """Exact draws of the posterior, beta | y ~ N(S x^T y, S), S = (I + x^T x)^-1, Stan-named
    (``beta[1]`` ...), as 10 chains: the reference ``posteriordb.score`` reads."""
    from pyro_nfmala.examples.posteriordb import reference_names

    covariance = torch.linalg.inv(torch.eye(x.shape[1], dtype=x.dtype) + x.T @ x)
    exact = torch.distributions.MultivariateNormal(covariance @ x.T @ y, covariance)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        draws = exact.sample((10, num_draws // 10))
    return reference_names({"beta": draws.numpy()})


def score(model_name: str, samples: dict, seconds: float, fit_seconds: float) -> dict:
    """``posteriordb.py``'s scores of the draws ``{site: (chains, draws, ...)}`` and its verdict."""
    from posteriordb import right, summarize
    from posteriordb import score as score_flat

    from pyro_nfmala.examples.posteriordb import reference_names

    if model_name.startswith("eight schools"):
        result = summarize(samples, "eight_schools", seconds, fit_seconds, BUDGET)
    else:
        reference = regression_reference(**regression_data())
        result = score_flat(reference_names(samples), reference, seconds, fit_seconds, BUDGET)
    return {**result, "right": right(result)}


def problem(name: str):
    """The model and its keyword arguments."""
    if name.startswith("eight schools"):
        from pyro_nfmala.examples.posteriordb import eight_schools_centered, eight_schools_data

        return eight_schools_centered, eight_schools_data(torch.float64)
    return regression, regression_data()


def sample_by_door(model, data: dict, door: str, seed: int, budget: dict = BUDGET):
    """``budget``'s chains of ``model`` on ``data`` by one door (``DOORS``) in this process: the draws
    ``{site: (chains, draws, ...)}``, the wall time from building the sampler to draws in hand, the run
    (:class:`~pyro_nfmala.samplers.run.PosteriorRun`: its fit, flow check and options) and the number
    of divergent draws."""
    import pyro.infer

    from pyro_nfmala import MCMC, NFMALA, ChainSampler

    chains, warmup, samples = budget["chains"], budget["warmup"], budget["samples"]
    pyro.set_rng_seed(seed)
    start = time.perf_counter()
    if door == "ChainSampler.from_model":
        sampler = ChainSampler.from_model(
            model, model_kwargs=data, num_chains=chains, seed=seed, fit_options={"progress": False}
        )
        idata = sampler.run(samples, warmup, progress=False, log_likelihood=False)
        draws = {site: idata.posterior[site].values for site in idata.posterior.data_vars}
        return draws, time.perf_counter() - start, sampler.model_run, int(sampler.num_divergent)
    runner = MCMC if door == "pyro_nfmala.MCMC" else pyro.infer.MCMC
    kernel = NFMALA(model, fit_options={"progress": False})
    mcmc = runner(kernel, num_samples=samples, warmup_steps=warmup, num_chains=chains, disable_progbar=True)
    mcmc.run(**data)
    draws = {site: value.numpy() for site, value in mcmc.get_samples(group_by_chain=True).items()}
    seconds = time.perf_counter() - start
    divergences = int(sum(len(d) for d in mcmc.diagnostics()["divergences"].values()))
    return draws, seconds, kernel.prepare(**data), divergences


def run_door(model_name: str, door: str, seed: int) -> dict:
    """One door on one model in this (fresh) process; the wall time from building to draws in hand."""
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    model, data = problem(model_name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        draws, seconds, run, _ = sample_by_door(model, data, door, seed)
    fit = run.fit_result
    result = score(model_name, draws, seconds, fit.seconds)
    result["map"] = fit.stage
    result["warned"] = sorted(
        {str(w.message)[:100] for w in caught if issubclass(w.category, RuntimeWarning)}
    )
    return result


def markdown(results: dict, header: str) -> str:
    lines = [
        header,
        "",
        "| model | seed | door | wall s (fit s, map) | vs ChainSampler.from_model | worst mean error (sd) "
        "| (MCSE) | worst sd error | max R-hat | min ESS bulk | right |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    verdicts = []
    for model_name, seeds in results.items():
        ratios = []
        for seed, doors in seeds.items():
            anchor = doors["ChainSampler.from_model"]["seconds"]
            for door, r in doors.items():
                ratio = r["seconds"] / anchor
                if door == "pyro_nfmala.MCMC":
                    ratios.append(ratio)
                lines.append(
                    f"| {model_name} | {seed} | `{door}` | {r['seconds']:.1f} "
                    f"({r['fit_seconds']:.1f}, {r['map']}) "
                    f"| {ratio:.2f}x | {r['worst_mean_error_sd']:.3f} | {r['worst_mean_error_mcse']:.1f} "
                    f"| {r['worst_sd_error']:.1%} | {r['max_rhat']:.3f} | {r['min_ess_bulk']:.0f} "
                    f"| {'yes' if r['right'] else 'no'} |"
                )
        median = float(np.median(ratios))
        right = all(seeds[s]["pyro_nfmala.MCMC"]["right"] for s in seeds)
        verdicts.append(
            f"{model_name}: pyro_nfmala.MCMC / ChainSampler.from_model wall time, median over seeds "
            f"{median:.2f}x (goal <= {GOAL_RATIO}: {'met' if median <= GOAL_RATIO else 'not met'}); "
            f"right on {'every seed' if right else 'not every seed'}."
        )
    return "\n".join([*lines, "", *verdicts]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--doors", nargs="*", default=list(DOORS))
    parser.add_argument("--replot", action="store_true", help="the table from the saved JSON")
    args = parser.parse_args()
    path = RESULTS / "front_ends.json"
    if args.replot:
        saved = json.loads(path.read_text())
        (RESULTS / "front_ends.md").write_text(markdown(saved["results"], saved["header"]))
        return
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    results: dict = {}
    with ProcessPoolExecutor(1, mp_context=context, max_tasks_per_child=1) as pool:  # one run at a time
        for model_name in args.models:
            for seed in args.seeds:
                for door in args.doors:
                    result = pool.submit(run_door, model_name, door, seed).result()
                    results.setdefault(model_name, {}).setdefault(str(seed), {})[door] = result
                    print(f"{model_name}, seed {seed}, {door}: {result['seconds']:.1f} s", flush=True)
    header = (
        f"The two doors: {BUDGET['chains']} chains x ({BUDGET['warmup']} warmup + {BUDGET['samples']} "
        "draws), "
        f"float64, one torch thread, one run at a time in a fresh process; {platform.machine()}, torch "
        f"{torch.__version__}, pyro {pyro.__version__}; {time.perf_counter() - start:.0f} s in all. Command: "
        f"python benchmarks/front_ends.py {' '.join(sys.argv[1:])}".rstrip()
    )
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps({"header": header, "results": results}, indent=1))
    table = markdown(results, header)
    (RESULTS / "front_ends.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
