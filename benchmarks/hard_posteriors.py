"""Right wherever NUTS is right, and as fast? Both doors of pyro_nfmala and NumPyro's NUTS on seventeen
posteriors (issue 34's) and five more (issue 35's), side by side in one run, fit and compile counted.

    python benchmarks/hard_posteriors.py                     # every row (about 2 hours on 2 cores)
    python benchmarks/hard_posteriors.py --rows eight_schools_vector approximate_gp
    python benchmarks/hard_posteriors.py --methods NumPyro   # one method (the JSON keeps the others)
    python benchmarks/hard_posteriors.py --replot            # table again from the saved JSON
    python benchmarks/hard_posteriors.py --make-references   # the generated references (NumPyro, long runs)

The rows: posteriordb's ten posteriors (``$PYRO_NFMALA_POSTERIORDB``), inference-gym's four
(``$PYRO_NFMALA_INFERENCE_GYM``: a sparse logistic regression with Gamma(1/2, 1/2) scales on German
credit, stochastic volatility on 100 and on all 2,516 S&P 500 returns, a 501-parameter item response
model), the centred eight schools written as one vector site (``.expand([J]).to_event(1)``, the plate
form being posteriordb's row), a 66-parameter basis-function GP and a 32-parameter Brownian motion with
unknown innovation and observation scales (``pyro_nfmala.examples.flow_cases.approximate_gp``,
``pyro_nfmala.examples.inference_gym.brownian_motion_unknown_scales``). Issue 35's further rows: a
GARCH(1, 1) over a 200-step recursion (``flow_cases.garch11``), the plain logistic regression on German
credit's 1,000 rows (``inference_gym.logistic_regression``, 25 weights) and conjugate regressions on 5,000
rows with 100, 500 and 1,000 coefficients (``front_ends.regression``, exact references). The generated
references are 4 x 10,000 NumPyro NUTS draws thinned to 4 x 1,000, in ``benchmarks/data``. The table ends
with issue 34's goals over its seventeen rows (right on every row; the median wall time at most
NumPyro's) and issue 35's over every row run (the median ratio of min bulk ESS per second at least 1; at
most 2x NumPyro's wall time on every row where both are right).

The methods, each 4 chains x (500 warmup + 1000 draws), float64, one torch thread (XLA's pool off), every
option the default, each run in a fresh process (``--jobs`` at a time, default 2: one per core):

- ``MCMC(NFMALA)``: ``pyro_nfmala.MCMC(NFMALA(model), num_chains=4)``, Pyro's one line with the
  chains as one batch;
- ``from_model``: ``ChainSampler.from_model(model, num_chains=4).run(1000, 500)``;
- ``NumPyro``: NumPyro's NUTS on the same model transcribed (``numpyro_models.py``, checked by
  ``check_numpyro_models.py``), chains one after another (its default on one device).

Wall time is from building the sampler to the draws in hand: the fit (ours) or the JIT compile
(NumPyro's) counted. **Right** is: every mean within 0.1 reference sd of the reference mean beyond
Monte Carlo noise (``|error| <= 0.1 sd + z MCSE``, the MCSE of ours and of the reference together),
every sd within 10% beyond its Monte Carlo noise likewise, and R-hat (ArviZ, rank-normalized) at most
1.01; ``z`` is the two-sided Bonferroni quantile for the row's number of entries at a 1% family-wise
rate (2.8 for one entry, 4.4 for 500, 4.7 for 2,519), so that a right sampler fails a row by chance one
time in a hundred. The inference-gym references give their means' Monte Carlo errors; their sds' are
taken as nil, and the stochastic volatility's ``mean_log_volatility`` sd is not scored (see
``pyro_nfmala.examples.inference_gym``). Writes ``benchmarks/results/hard_posteriors.{json,md}``.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402

from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCES = Path(__file__).resolve().parent / "data"
BUDGET = {"chains": 4, "warmup": 500, "samples": 1000}
METHODS = ("MCMC(NFMALA)", "from_model", "NumPyro")
POSTERIORDB_ROWS = (
    "eight_schools",
    "low_dim_gauss_mix",
    "kilpisjarvi_mod",
    "earnings",
    "kidiq_with_mom_work",
    "mesquite",
    "nes2000",
    "arma",
    "gp_pois_regr",
    "hmm_example",
)
INFERENCE_GYM_ROWS = (
    "german_credit_sparse_logistic",
    "stochastic_volatility_sp500_small",
    "stochastic_volatility_sp500",
    "item_response_theory",
)
OWN_ROWS = ("eight_schools_vector", "approximate_gp", "brownian_motion_unknown_scales")
#: issue 34's rows: its goals (right on every row, the median wall time) are over these
GOAL_ROWS = POSTERIORDB_ROWS + INFERENCE_GYM_ROWS + OWN_ROWS
#: issue 35's further rows (speed on the models users write): a recursion, a plain logistic regression on
#: German credit's 1,000 rows, and conjugate regressions (5,000 rows) with an exact reference
REGRESSION_ROWS = {"regression_d100": 100, "regression_d500": 500, "regression_d1000": 1000}
SPEED_ROWS = ("garch11", "german_credit_logistic", *REGRESSION_ROWS)
ROWS = GOAL_ROWS + SPEED_ROWS
#: the goals: a mean or sd off by more than this many reference sds (resp. this fraction) beyond noise
MEAN_TOLERANCE, SD_TOLERANCE, MAX_RHAT = 0.1, 0.1, 1.01
FAMILY_ERROR_RATE = 0.01
#: a run longer than this is stopped and counted as not right
TIMEOUT_SECONDS = 3600


# ----------------------------------------------------------------------------------------------
# rows: the Pyro model and data, the NumPyro twin, the reference moments


def pyro_problem(row: str, dtype=torch.float64):
    """The Pyro model of ``row`` and its data (keyword arguments)."""
    from pyro_nfmala.examples import flow_cases, inference_gym, posteriordb

    if row in POSTERIORDB_ROWS:
        return posteriordb.MODELS[row], posteriordb.load_data(row, dtype=dtype)
    if row == "eight_schools_vector":
        return posteriordb.eight_schools_centered_vector, posteriordb.load_data("eight_schools", dtype=dtype)
    if row in ("approximate_gp", "garch11"):
        model, make_data = flow_cases.CASES[row]
        return model, {key: _as(value, dtype) for key, value in make_data().items()}
    if row == "brownian_motion_unknown_scales":
        return inference_gym.brownian_motion_unknown_scales, inference_gym.brownian_motion_data(dtype=dtype)
    if row == "german_credit_logistic":
        return inference_gym.logistic_regression, inference_gym.load_data(
            "german_credit_sparse_logistic", dtype
        )
    if row in REGRESSION_ROWS:
        from front_ends import regression, regression_data

        return regression, regression_data(d=REGRESSION_ROWS[row])
    return inference_gym.MODELS[row], inference_gym.load_data(row, dtype=dtype)


def _as(value, dtype):
    """A data tensor in ``dtype`` (floating tensors only; counts and sizes as they are)."""
    return value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value


def numpyro_problem(row: str):
    """The NumPyro twin of ``row`` and its data (numpy keyword arguments)."""
    import numpyro_models

    if row in POSTERIORDB_ROWS:
        return numpyro_models.POSTERIORDB_MODELS[row]()
    if row == "eight_schools_vector":
        _, data = numpyro_models.POSTERIORDB_MODELS["eight_schools"]()
        return numpyro_models.eight_schools_centered_vector, data
    if row in ("approximate_gp", "garch11"):
        return numpyro_models.MODELS[row]()
    if row == "german_credit_logistic" or row in REGRESSION_ROWS:
        _, data = pyro_problem(row)
        twin = (
            numpyro_models.logistic_regression
            if row == "german_credit_logistic"
            else numpyro_models.regression
        )
        return twin, {key: value.numpy() for key, value in data.items()}
    return numpyro_models.INFERENCE_GYM_MODELS[row]()


def flat(row: str, samples: dict) -> dict[str, np.ndarray]:
    """Draws ``{site: (chains, draws, ...)}`` as Stan-named entries ``(chains, draws)`` (``theta[1]``),
    with posteriordb's transformed parameters where its reference holds them."""
    from pyro_nfmala.examples.posteriordb import derived, reference_names

    samples = {key: np.asarray(value, dtype=np.float64) for key, value in samples.items()}
    if row in POSTERIORDB_ROWS:
        samples = derived(row, samples)
    return reference_names(samples)


def _moments_of_draws(draws: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    import arviz as az

    from pyro_nfmala import from_arrays

    idata = from_arrays(draws)
    mcse_mean, mcse_sd = az.mcse(idata, method="mean"), az.mcse(idata, method="sd")
    return {
        key: {
            "mean": float(np.mean(value)),
            "sd": float(np.std(value)),
            "mean_se": float(mcse_mean[key]),
            "sd_se": float(mcse_sd[key]),
        }
        for key, value in draws.items()
    }


def reference_moments(row: str) -> dict[str, dict[str, float]]:
    """``{entry: {"mean", "sd", "mean_se", "sd_se"}}``: the reference and its Monte Carlo errors (an sd not
    scored has ``sd_se`` inf)."""
    from pyro_nfmala.examples import inference_gym, posteriordb

    if row in POSTERIORDB_ROWS or row == "eight_schools_vector":
        name = "eight_schools" if row == "eight_schools_vector" else row
        return _moments_of_draws(posteriordb.comparable_reference(name))
    if row in REGRESSION_ROWS:  # the exact posterior: beta | y ~ N(S x^T y, S), S = (I + x^T x)^-1
        _, data = pyro_problem(row)
        x, y = data["x"], data["y"]
        covariance = torch.linalg.inv(torch.eye(x.shape[1], dtype=x.dtype) + x.T @ x)
        mean, sd = covariance @ x.T @ y, torch.diagonal(covariance).sqrt()
        return {
            f"beta[{i + 1}]": {"mean": float(mean[i]), "sd": float(sd[i]), "mean_se": 0.0, "sd_se": 0.0}
            for i in range(len(mean))
        }
    if row in ("approximate_gp", "garch11", "brownian_motion_unknown_scales", "german_credit_logistic"):
        folder = "flow_cases" if row in ("approximate_gp", "garch11") else "hard_posteriors"
        path = REFERENCES / folder / f"{row}.npz"
        if not path.exists():
            raise FileNotFoundError(
                f"no reference for {row}: run benchmarks/hard_posteriors.py --make-references"
            )
        return _moments_of_draws({key: value.astype(np.float64) for key, value in np.load(path).items()})
    unscored = inference_gym.UNSCORED.get(row, ())
    moments = {}
    for site, stats in inference_gym.reference(row).items():
        for index in np.ndindex(*stats["mean"].shape):
            entry = f"{site}[{','.join(str(i + 1) for i in index)}]" if index else site
            moments[entry] = {
                "mean": float(stats["mean"][index]),
                "sd": float(stats["sd"][index]),
                "mean_se": float(stats["mean_se"][index]) if "mean_se" in stats else 0.0,
                "sd_se": math.inf if site in unscored else 0.0,
            }
    return moments


def score(row: str, samples: dict, seconds: float) -> dict:
    """The draws ``{site: (chains, draws, ...)}`` against the reference: worst errors, their excess over
    the tolerance and noise, R-hat, ESS, and the verdict."""
    import arviz as az

    from pyro_nfmala import from_arrays

    reference = reference_moments(row)
    draws = flat(row, samples)
    missing = sorted(set(reference) - set(draws))
    if missing:
        raise KeyError(f"the draws lack the reference entries {missing[:5]}")
    draws = {key: draws[key] for key in reference}
    ours = _moments_of_draws(draws)
    idata = from_arrays(draws)
    rhat, ess = az.rhat(idata), az.ess(idata, method="bulk")
    z = statistics.NormalDist().inv_cdf(1 - FAMILY_ERROR_RATE / (4 * len(reference)))  # means and sds
    worst = {"mean": (0.0, ""), "sd": (0.0, ""), "mean_excess": (-math.inf, ""), "sd_excess": (-math.inf, "")}
    for key, ref in reference.items():
        mean_error = (ours[key]["mean"] - ref["mean"]) / ref["sd"]
        mean_noise = z * math.hypot(ours[key]["mean_se"], ref["mean_se"]) / ref["sd"]
        sd_error = ours[key]["sd"] / ref["sd"] - 1
        sd_noise = z * math.hypot(ours[key]["sd_se"], ref["sd_se"]) / ref["sd"]
        for kind, error, excess in (
            ("mean", mean_error, abs(mean_error) - mean_noise - MEAN_TOLERANCE),
            ("sd", sd_error if math.isfinite(sd_noise) else 0.0, abs(sd_error) - sd_noise - SD_TOLERANCE),
        ):
            if abs(error) > abs(worst[kind][0]):
                worst[kind] = (error, key)
            if excess > worst[f"{kind}_excess"][0]:
                worst[f"{kind}_excess"] = (excess, key)
    max_rhat = float(max(float(rhat[key]) for key in reference))
    min_ess = float(min(float(ess[key]) for key in reference))
    result = {
        "seconds": seconds,
        "entries": len(reference),
        "z": z,
        "worst_mean_error_sd": worst["mean"][0],
        "worst_mean_entry": worst["mean"][1],
        "worst_sd_error": worst["sd"][0],
        "worst_sd_entry": worst["sd"][1],
        "mean_excess": worst["mean_excess"][0],
        "sd_excess": worst["sd_excess"][0],
        "max_rhat": max_rhat,
        "min_ess_bulk": min_ess,
        "ess_per_second": min_ess / seconds,
    }
    result["right"] = bool(result["mean_excess"] <= 0 and result["sd_excess"] <= 0 and max_rhat <= MAX_RHAT)
    return result


# ----------------------------------------------------------------------------------------------
# the methods, each in a fresh process


def run_ours(row: str, method: str, seed: int) -> dict:
    """``MCMC(NFMALA)`` or ``from_model`` on ``row``; what its map and moves were, and what it warned."""
    torch.set_num_threads(1)
    from front_ends import sample_by_door

    model, data = pyro_problem(row)
    door = {"from_model": "ChainSampler.from_model", "MCMC(NFMALA)": "pyro_nfmala.MCMC"}[method]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        draws, seconds, run, divergences = sample_by_door(model, data, door, seed, BUDGET)
    result = score(row, draws, seconds)
    fit = run.fit_result
    result.update(
        fit_seconds=float(fit.seconds) if fit is not None else 0.0,
        map=fit.stage if fit is not None else "given",
        khat=float(run.check.khat) if run.check is not None else math.nan,
        non_centred=list(run.non_centred_sites),
        move=run.options().local_move,
        divergences=divergences,
        warnings=sorted({str(w.message)[:160] for w in caught if issubclass(w.category, RuntimeWarning)}),
    )
    return result


def run_numpyro(row: str, seed: int, budget: dict = BUDGET, draws_only: bool = False):
    """NumPyro's NUTS on the twin of ``row``, its compile counted."""
    import jax

    jax.config.update("jax_enable_x64", True)
    from numpyro.infer import MCMC, NUTS

    model, data = numpyro_problem(row)
    start = time.perf_counter()
    mcmc = MCMC(
        NUTS(model),
        num_warmup=budget["warmup"],
        num_samples=budget["samples"],
        num_chains=budget["chains"],
        chain_method="sequential",
        progress_bar=False,
    )
    mcmc.run(jax.random.PRNGKey(seed), **data)
    samples = {key: np.asarray(value) for key, value in mcmc.get_samples(group_by_chain=True).items()}
    seconds = time.perf_counter() - start
    if draws_only:
        return samples
    samples.pop("beta1", None)
    result = score(row, samples, seconds)
    result.update(divergences=int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum()), warnings=[])
    return result


def run_method(row: str, method: str, seed: int) -> dict:
    """One method on one row in this (fresh) process; a failure is a result that says what failed."""
    try:
        if method == "NumPyro":
            return run_numpyro(row, seed)
        return run_ours(row, method, seed)
    except Exception as error:  # noqa: BLE001 - a failed run is a row of the table
        return {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-2000:]}


def make_references(rows: list[str]) -> None:
    """The references of the Brownian motion and German credit's logistic regression (those of ``rows``):
    NumPyro's NUTS, 4 x (2,000 + 10,000), thinned to 4 x 1,000."""
    folder = REFERENCES / "hard_posteriors"
    folder.mkdir(parents=True, exist_ok=True)
    for row in ("brownian_motion_unknown_scales", "german_credit_logistic"):
        if row not in rows:
            continue
        samples = run_numpyro(row, 12345, {"chains": 4, "warmup": 2000, "samples": 10000}, draws_only=True)
        entries = flat(row, samples)
        np.savez_compressed(folder / f"{row}.npz", **{key: value[:, ::10] for key, value in entries.items()})
        print(f"{row}: reference written to {folder}", flush=True)


# ----------------------------------------------------------------------------------------------
# the table


def markdown(results: dict, header: str) -> str:
    lines = [
        header,
        "",
        "| posterior | method | wall s (fit s) | vs NumPyro | map, k-hat, move | worst mean error (sd) "
        "| worst sd error | max R-hat | min ESS bulk | right | warned |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    ratios: dict[str, list[float]] = {method: [] for method in METHODS if method != "NumPyro"}
    right_rows = {method: [] for method in METHODS}
    speed = {method: {"ess": [], "wall_both_right": []} for method in ratios}  # issue 35's, every row
    for row, methods in results.items():
        anchor = methods.get("NumPyro", {}).get("seconds")
        goal = row in GOAL_ROWS
        for method in speed:
            ours, theirs = methods.get(method), methods.get("NumPyro")
            if ours is None or theirs is None or "error" in theirs:
                continue
            if "error" in ours:
                speed[method]["ess"].append(0.0)
                continue
            speed[method]["ess"].append(ours["ess_per_second"] / theirs["ess_per_second"])
            if ours["right"] and theirs["right"]:
                speed[method]["wall_both_right"].append((ours["seconds"] / theirs["seconds"], row))
        for method in METHODS:
            r = methods.get(method)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {row} | {method} | failed: {r['error'][:90]} | | | | | | | no | |")
                if goal:
                    right_rows[method].append(False)
                    if method != "NumPyro" and anchor:  # a run that did not finish is slower than any
                        ratios[method].append(math.inf)
                continue
            ratio = r["seconds"] / anchor if anchor else math.nan
            if goal:
                right_rows[method].append(r["right"])
                if method != "NumPyro":
                    ratios[method].append(ratio)
            if method != "NumPyro":
                centring = ", non-centred" if r["non_centred"] else ""
                how = f"{r['map']}{centring}, {r['khat']:.2f}, {r['move']}"
                wall = f"{r['seconds']:.0f} ({r['fit_seconds']:.0f})"
            else:
                how, wall = "NUTS", f"{r['seconds']:.0f}"
            lines.append(
                f"| {row} | {method} | {wall} | {ratio:.2f}x | {how} | {r['worst_mean_error_sd']:+.3f} "
                f"| {r['worst_sd_error']:+.1%} | {r['max_rhat']:.3f} | {r['min_ess_bulk']:.0f} "
                f"| {'yes' if r['right'] else 'no'} | {'yes' if r['warnings'] else '-'} |"
            )
    lines.append("")
    lines.append(
        f"Issue 34's goals, over its {len(GOAL_ROWS)} rows (not the further rows {', '.join(SPEED_ROWS)}):"
    )
    lines.append("")
    for method, verdicts in right_rows.items():
        if verdicts:
            lines.append(f"{method}: right on {sum(verdicts)} of {len(verdicts)} rows.")
    for method, values in ratios.items():
        counted = sorted(value for value in values if not math.isnan(value))  # a failed run counts as inf
        if counted:
            middle = len(counted) // 2
            median = counted[middle] if len(counted) % 2 else (counted[middle - 1] + counted[middle]) / 2
            failed = sum(math.isinf(value) for value in counted)
            lines.append(
                f"{method}: wall time / NumPyro's, median over {len(counted)} rows {median:.2f}x "
                f"({failed} not finished, counted as slower than any) (goal <= 1: "
                f"{'met' if median <= 1 else 'not met'})."
            )
    lines += ["", "Issue 35's goals, over every row run:", ""]
    for method, found in speed.items():
        if found["ess"]:
            worst = max(found["wall_both_right"], default=(math.nan, "-"))
            median = float(np.median(found["ess"]))
            lines.append(
                f"{method}: min bulk ESS per second / NumPyro's, median over {len(found['ess'])} rows "
                f"{median:.2f}x (goal >= 1: {'met' if median >= 1 else 'not met'}); "
                f"wall time / NumPyro's where both are right, worst {worst[0]:.2f}x ({worst[1]}; goal <= 2: "
                f"{'met' if worst[0] <= 2 else 'not met'})."
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=ROWS, metavar="ROW")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--replot", action="store_true", help="the table again from the saved JSON")
    parser.add_argument("--make-references", action="store_true")
    args = parser.parse_args()
    path = RESULTS / "hard_posteriors.json"
    saved = json.loads(path.read_text()) if path.exists() else {"header": "", "results": {}}
    if args.make_references:
        make_references(args.rows)
        return
    if not args.replot:
        start = time.perf_counter()
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=context, max_tasks_per_child=1) as pool:
            futures = {
                (row, method): pool.submit(run_method, row, method, args.seed)
                for row in args.rows
                for method in args.methods
            }
            for (row, method), future in futures.items():
                try:
                    result = future.result(timeout=TIMEOUT_SECONDS)
                except Exception as error:  # noqa: BLE001 - a timed-out or crashed worker
                    result = {"error": f"{type(error).__name__}: {error}"}
                saved["results"].setdefault(row, {})[method] = result
                brief = result.get("error") or f"{result['seconds']:.0f} s, right: {result['right']}"
                print(f"{row}, {method}: {brief}", flush=True)
                RESULTS.mkdir(exist_ok=True)
                path.write_text(json.dumps(saved, indent=1))
        saved["header"] = (
            f"{BUDGET['chains']} chains x ({BUDGET['warmup']} warmup + {BUDGET['samples']} draws), float64, "
            f"one thread, {args.jobs} runs at a time, each in a fresh process; {platform.machine()}, torch "
            f"{torch.__version__}, pyro {pyro.__version__}; last run {time.perf_counter() - start:.0f} s. "
            f"Command: python benchmarks/hard_posteriors.py {' '.join(sys.argv[1:])}".rstrip()
        )
        path.write_text(json.dumps(saved, indent=1))
    ordered = {row: saved["results"][row] for row in ROWS if row in saved["results"]}
    table = markdown(ordered, saved["header"])
    (RESULTS / "hard_posteriors.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
