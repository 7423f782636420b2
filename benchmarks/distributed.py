"""One process against two, on this machine, in one run (issue 37): chains split over processes, and a
likelihood over data shards.

    python benchmarks/distributed.py            # about 3 minutes on 2 cores
    python benchmarks/distributed.py --quick    # fewer draws and evaluations

Each case runs one process with 2 torch threads (all of this machine), one process with 1 thread (one
"device"), and two processes with 1 thread each (two "devices"): the last two compare what a rank on a
device of its own gains from a second one.

1. **Chain-parallel** (``NFMALA(model, distributed=ChainParallel())`` under ``pyro_nfmala.MCMC``):
   posteriordb's kidiq_with_mom_work regression (needs ``$PYRO_NFMALA_POSTERIORDB``), 8 chains x
   (500 warmup + 1,000 draws) in float64: one process with 2 torch threads against two processes
   (4 chains each) with one thread each. Wall time of the whole run (fit included) and of sampling per
   chain-draw, and the pooled draws' largest R-hat and largest mean error against the reference (in
   reference sds).
2. **Sharded likelihood** (``ShardedData``): a linear regression with 10^6 observations and 10
   coefficients, in float64: the log density and its gradient for 4 chains' points, one process holding
   all the data (2 threads) against two processes holding half each (1 thread each); and the all-reduce
   of the ``(chains, 1 + d)`` buffer alone (its share of an evaluation).

Writes ``results/distributed.{json,md}``. The 2-core machine is the ceiling here: two processes can at best
halve a time, and they share memory bandwidth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from pathlib import Path

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.distributed

from pyro_nfmala import MCMC, NFMALA, from_arrays
from pyro_nfmala.distributed import ChainParallel, Collective, ShardedData
from pyro_nfmala.distributed.launch import spawn
from pyro_nfmala.examples import posteriordb
from pyro_nfmala.model.density import model_density

RESULTS = Path(__file__).parent / "results"
POSTERIOR = "kidiq_with_mom_work"
#: Observations of the synthetic regression whose chains are split in the second chain-parallel row: each
#: step's model run costs milliseconds there, not the per-step overhead of a 5-parameter posterior.
HEAVY = 100_000


def chain_run(posterior: str, num_chains: int, num_samples: int, warmup: int, distributed: bool) -> dict:
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(0)
    if posterior == POSTERIOR:
        model, kwargs = posteriordb.MODELS[POSTERIOR], posteriordb.load_data(POSTERIOR, dtype=torch.float64)
    else:
        x, y = regression_shard(HEAVY, 10, 0, 1)
        model, kwargs = regression, {"x": x, "y": y}
    started = time.perf_counter()
    kernel = NFMALA(
        model,
        fit_options={"progress": False},
        max_plate_nesting=1,
        distributed=ChainParallel() if distributed else None,
    )
    mcmc = MCMC(
        kernel, num_samples=num_samples, warmup_steps=warmup, num_chains=num_chains, disable_progbar=True
    )
    mcmc.run(**kwargs)
    wall = time.perf_counter() - started
    per_draw = list(mcmc.diagnostics()["seconds per draw"].values())
    samples = {key: value.numpy() for key, value in mcmc.get_samples(group_by_chain=True).items()}
    return {"wall": wall, "fit": kernel.fit_result.seconds, "seconds per draw": per_draw, "samples": samples}


def regression(x, y):
    coef = pyro.sample("coef", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(x @ coef, sigma), obs=y)


def regression_shard(n: int, p: int, rank: int, size: int):
    """Rank ``rank``'s block of a fixed data set (the same data set whatever the number of ranks)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, p, generator=generator, dtype=torch.float64)
    y = x @ torch.linspace(-1, 1, p, dtype=torch.float64) + torch.randn(
        n, generator=generator, dtype=torch.float64
    )
    block = slice(rank * n // size, (rank + 1) * n // size)
    return x[block].contiguous(), y[block].contiguous()


def timed(fn, repeats: int) -> float:
    fn()  # warm (and traced)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def sharded_evaluation(n: int, p: int, chains: int, repeats: int) -> dict:
    torch.set_default_dtype(torch.float64)
    group = Collective()
    x, y = regression_shard(n, p, group.rank, group.size)
    density = model_density(regression, (x, y), shards=ShardedData())
    points = torch.randn(chains, p + 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.1

    def evaluate():
        at = points.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(density.log_prob(at).sum(), at)
        return grad

    seconds = timed(evaluate, repeats)
    buffer = torch.zeros(1 + chains * (p + 2), dtype=torch.float64)
    reduce_seconds = timed(lambda: torch.distributed.all_reduce(buffer), repeats) if group.active else 0.0
    value = evaluate()
    return {"seconds": seconds, "all-reduce seconds": reduce_seconds, "grad": value}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    samples, warmup, repeats, n = (300, 300, 10, 200_000) if args.quick else (1000, 500, 30, 1_000_000)
    rows: dict = {"machine": "2 CPU cores, gloo", "quick": args.quick}

    cases = [(POSTERIOR, 8)] if posteriordb.available() else []
    if not cases:
        rows["chain-parallel"] = (
            f"skipped posteriordb's row: set {posteriordb.ENV_VAR} (benchmarks/README.md)"
        )
    cases.append((f"regression, {HEAVY:,} observations", 8))
    for posterior, chains in cases:
        one = spawn(chain_run, 1, (posterior, chains, samples, warmup, False), timeout=1200, threads=2)[0]
        alone = spawn(chain_run, 1, (posterior, chains, samples, warmup, False), timeout=1200, threads=1)[0]
        two = spawn(chain_run, 2, (posterior, chains, samples, warmup, True), timeout=1200, threads=1)[0]
        runs = (
            (f"1 process (2 threads) x {chains} chains", one),
            (f"1 process (1 thread) x {chains} chains", alone),
            (f"2 processes (1 thread each) x {chains // 2} chains", two),
        )
        for label, result in runs:
            row = {
                "wall s": round(result["wall"], 2),
                "fit s": round(result["fit"], 2),
                # a rank's draw is one batch of its chains; the ranks draw at the same time
                "sampling ms per chain-draw": round(
                    1e3 * statistics.mean(result["seconds per draw"]) / chains, 4
                ),
                "wall ms per chain-draw": round(1e3 * result["wall"] / (chains * samples), 3),
            }
            data = from_arrays(result["samples"])
            row["max R-hat"] = round(max(float(value.max()) for value in az.rhat(data).data_vars.values()), 4)
            if posterior == POSTERIOR:
                reference = posteriordb.comparable_reference(POSTERIOR)
                flat = posteriordb.reference_names(posteriordb.derived(POSTERIOR, result["samples"]))
                errors = [abs(np.mean(flat[k]) - ref.mean()) / ref.std() for k, ref in reference.items()]
                row["max |mean error| / reference sd"] = round(max(errors), 3)
            else:
                errors = [
                    np.abs(result["samples"][k].mean((0, 1)) - one["samples"][k].mean((0, 1)))
                    / one["samples"][k].std((0, 1))
                    for k in one["samples"]
                ]
                row["max |mean difference| / sd, against 1 process"] = round(
                    float(max(e.max() for e in errors)), 3
                )
            rows[f"{posterior}: {label}"] = row

    one = spawn(sharded_evaluation, 1, (n, 10, 4, repeats), timeout=1200, threads=2)[0]
    alone = spawn(sharded_evaluation, 1, (n, 10, 4, repeats), timeout=1200, threads=1)[0]
    two = spawn(sharded_evaluation, 2, (n, 10, 4, repeats), timeout=1200, threads=1)
    same = max(float((part["grad"] - one["grad"]).abs().max()) for part in two)
    slowest = max(part["seconds"] for part in two)
    reduce = max(part["all-reduce seconds"] for part in two)
    rows["sharded"] = {
        "observations": n,
        "1 process (2 threads) ms per evaluation": round(1e3 * one["seconds"], 3),
        "1 process (1 thread) ms per evaluation": round(1e3 * alone["seconds"], 3),
        "2 processes (1 thread each) ms per evaluation": round(1e3 * slowest, 3),
        "speed-up over 1 process, 2 threads": round(one["seconds"] / slowest, 2),
        "speed-up over 1 process, 1 thread (one device each)": round(alone["seconds"] / slowest, 2),
        "all-reduce ms": round(1e3 * reduce, 4),
        "all-reduce share": round(reduce / slowest, 4),
        "max |gradient difference|": same,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "# One process against two (benchmarks/distributed.py)",
        "",
        f"```\n{json.dumps(rows, indent=2)}\n```",
    ]
    (RESULTS / "distributed.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
