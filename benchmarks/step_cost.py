"""Time per MALA step as a ratio to one flow forward+backward pass, side by side in one run; and
where the time of one NFMALA draw of a Pyro model goes.

For a 2-D coupling flow (zuko NSF with passes=2, as `default_flow(2)` builds) and a batch of
chains: the reference is one pass x, ladj = f(z) plus one backward pass of ladj.sum(); then one
full `mala_step` with each preconditioner (tempered target T2, beta = 1), and how the time per
step scales with the number of chains.

The Pyro-model row: a 5-parameter regression with 100 observations (4 coefficients and a noise
scale), `MCMC(NFMALA(model))` with its fitted map. The reference is one evaluation of Pyro's
potential and its gradient at one point (what a chain evaluates, in the same process); the draw's
time in the sampling phase is split by cProfile into the model's potential (forward), the
gradients (autograd's backward through flow and model), the flow's forward pass, the rest of the
step (proposal, accept, statistics), NFMALA's driver, and Pyro's MCMC driver around it.

    python benchmarks/step_cost.py            # 256 ... 16384 chains, and the Pyro-model row
    python benchmarks/step_cost.py --quick    # fewer repeats, up to 4096 chains, shorter runs

Writes benchmarks/results/step_cost.json and .md (and a PNG of the scaling).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import time
import warnings

from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

from pyro.infer import MCMC

from pyro_nfmala import NFMALA, ChainSampler, LatentFlow, TemperedFlow, default_flow
from pyro_nfmala.engine.langevin import get_preconditioner
from pyro_nfmala.engine.step import init_state, mala_step
from pyro_nfmala.engine.traced import TracedFunction
from pyro_nfmala.flows.latent import latent_to_data
from pyro_nfmala.flows.staged import StagedFlow
from pyro_nfmala.model.density import model_density

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


def regression(x, y):
    """4 coefficients and a noise scale: 5 unconstrained parameters."""
    beta = pyro.sample("beta", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    mean = (x * beta.unsqueeze(-2)).sum(-1)  # batch-safe: a batch of betas (..., 4) gives (..., 100)
    pyro.sample("y", dist.Normal(mean, sigma.unsqueeze(-1)).to_event(1), obs=y)


def regression_data(n: int = 100):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=generator)
    return x, x @ torch.tensor([1.0, -0.5, 0.25, 2.0]) + 0.7 * torch.randn(n, generator=generator)


#: cProfile's names of the parts of a draw: part -> (file ending, function name).
PARTS = {
    "model potential": ("pyro_nfmala/engine/traced.py", "__call__"),  # the density, traced, with its gradient
    "gradients (backward)": ("torch/autograd/__init__.py", "grad"),
    "flow forward": ("pyro_nfmala/flows/latent.py", "to_data"),
    "step": ("pyro_nfmala/engine/step.py", "metropolis_hastings_step"),
    "NFMALA driver": ("pyro_nfmala/engine/driver.py", "step"),
    "kernel": ("pyro_nfmala/samplers/kernel.py", "sample"),
    "setup": ("pyro_nfmala/samplers/kernel.py", "setup"),
    "Pyro's MCMC": ("pyro/infer/mcmc/api.py", "_gen_samples"),
}


def cumulative_seconds(profile: cProfile.Profile) -> dict[str, float]:
    """The cumulative time of each of ``PARTS`` in the profile, the whole run's (``per_draw_parts``
    takes the setup out of Pyro's loop; the setup's own few evaluations, such as the flow check's one
    batch, stay in the parts: a small share of a run of hundreds of draws)."""
    stats = pstats.Stats(profile).stats
    found = dict.fromkeys(PARTS, 0.0)
    for (filename, _, function), (_, _, _, cumulative, _) in stats.items():
        for part, (ending, name) in PARTS.items():
            if function == name and filename.replace("\\", "/").endswith(ending):
                found[part] = max(found[part], cumulative)
    return found


def per_draw_parts(profile: cProfile.Profile, draws: int) -> dict[str, float]:
    """Seconds per draw of the parts of a draw, each without the parts nested in it."""
    parts = cumulative_seconds(profile)
    step_parts = parts["model potential"] + parts["gradients (backward)"] + parts["flow forward"]
    own = {
        "model potential": parts["model potential"],
        "gradients (backward)": parts["gradients (backward)"],
        "flow forward": parts["flow forward"],
        "rest of the step": parts["step"] - step_parts,
        "NFMALA driver": parts["NFMALA driver"] - parts["step"],
        "kernel": parts["kernel"] - parts["NFMALA driver"],
        "Pyro's MCMC": parts["Pyro's MCMC"] - parts["setup"] - parts["kernel"],
    }
    return {part: seconds / draws for part, seconds in own.items()}


def pyro_model_row(num_samples: int, repeats: int) -> dict:
    """Where one NFMALA draw of the regression goes, against one potential-and-gradient evaluation."""
    data = regression_data()
    pyro.set_rng_seed(0)
    density = model_density(regression, data)
    point = density.layout.pack(density.initial_params).detach()

    def potential_and_gradient():
        x = point.clone().requires_grad_(True)
        torch.autograd.grad(density.point_log_prob(x), x)

    with pyro.validation_enabled(False):  # as Pyro's MCMC evaluates its potential (disable_validation=True)
        potential_ms = 1000 * best_time(potential_and_gradient, repeats * 20)
    kernel = NFMALA(regression, fit_options={"progress": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        MCMC(kernel, num_samples=200, warmup_steps=200, disable_progbar=True).run(*data)

    def fixed(trace_density: bool = True) -> NFMALA:  # the fitted map and adapted step, nothing adapted
        return NFMALA(
            regression,
            flow=kernel.fit_result.flow,
            step_size=kernel.step_size,
            adapt_step_size=False,
            mass_matrix=None,
            trace_density=trace_density,
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mcmc = MCMC(fixed(), num_samples=num_samples, warmup_steps=0, disable_progbar=True)
        profile = cProfile.Profile()
        profile.enable()
        mcmc.run(*data)
        profile.disable()
    parts = per_draw_parts(profile, num_samples)
    profiled = sum(parts.values())
    draw_ms, batched = {}, {}
    for trace_density in (True, False):  # the traced density (the default) and the model run eagerly
        stamps = []  # the wall time at each draw, Pyro's loop included (its hook runs after each)
        timed = MCMC(
            fixed(trace_density),
            num_samples=num_samples,
            warmup_steps=0,
            disable_progbar=True,
            hook_fn=lambda *args: stamps.append(time.perf_counter()),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            timed.run(*data)
        first = min(len(stamps) - 2, 100)  # after the density is traced (its 100th evaluation)
        draw_ms[trace_density] = 1000 * (stamps[-1] - stamps[first]) / (len(stamps) - 1 - first)
        for chains in (4, 1024):  # all chains as one batch: one vectorized model run per move
            sampler = ChainSampler.from_model(
                regression,
                *data,
                num_chains=chains,
                flow=kernel.fit_result.flow,
                mass_matrix=None,
                seed=0,
                trace_density=trace_density,
            )
            sampler.warmup(100, progress=False)
            steps = max(num_samples // (4 if chains > 4 else 1), 50)
            start = time.perf_counter()
            sampler.advance(steps, progress=False)
            batched[trace_density, chains] = 1000 * (time.perf_counter() - start) / (steps * chains)
    return {
        "model": "regression: 4 coefficients + noise scale, 100 observations",
        "evaluations_per_draw": 2 if mcmc.kernel._independence_schedule() == 1 else 1,
        "potential_and_gradient_ms": potential_ms,
        "draw_ms": draw_ms[True],
        "draw_ms_eager": draw_ms[False],
        "ratio": draw_ms[True] / potential_ms,
        "shares": {part: seconds / profiled for part, seconds in parts.items()},
        "batched_chain_draw_ms": {str(chains): batched[True, chains] for chains in (4, 1024)},
        "batched_chain_draw_ms_eager": {str(chains): batched[False, chains] for chains in (4, 1024)},
        "batched_4_ratio": batched[True, 4] / potential_ms,
        "batched_1024_speedup": draw_ms[True] / batched[True, 1024],
    }


def flow_stage_row(repeats: int, dim: int = 10) -> dict:
    """The latent-to-data pass (and its backward) of a staged map with an affine-coupling flow stage, as
    ``NFMALA``'s flow stage builds it: zuko's inverse (each coupling network evaluated twice; the
    library's default), the one-pass inverse (``flow.latent_to_data``), that under ``torch.compile``, and
    zuko's inverse with its backward recorded as one graph (``traced.TracedFunction``, as the samplers
    trace a whole target evaluation), with the compile and record times, for one chain and for 4."""
    torch.manual_seed(0)
    staged = StagedFlow(torch.zeros(dim), torch.eye(dim), default_flow(dim, kind="affine")).requires_grad_(
        False
    )
    transform = LatentFlow(staged).distribution.transform
    compiled = torch.compile(lambda z: latent_to_data(transform, z), dynamic=False)
    ways = {
        "zuko inverse": lambda z: transform.inv.call_and_ladj(z),
        "one-pass inverse": lambda z: latent_to_data(transform, z),
        "one-pass, compiled": compiled,
    }
    row = {"flow": f"StagedFlow({dim}) with default_flow({dim}, kind='affine') (RealNVP, 6 transforms)"}

    def pass_and_backward(way, z):
        with torch.enable_grad():
            primal = z.detach().requires_grad_(True)
            x, ladj = way(primal)
            (grad,) = torch.autograd.grad(ladj.sum() + x.sum(), primal)
        return x.detach(), ladj.detach(), grad

    for chains in (1, 4):
        z = torch.randn(chains, dim)
        start = time.perf_counter()
        pass_and_backward(compiled, z)
        row[f"compile_seconds_{chains}"] = time.perf_counter() - start
        traced = TracedFunction(lambda point: pass_and_backward(ways["zuko inverse"], point), trace_after=1)
        start = time.perf_counter()
        traced(z)
        row[f"record_seconds_{chains}"] = time.perf_counter() - start
        assert traced.traced_shapes == [(chains, dim)]
        for name, way in ways.items():
            row[f"{name} ms, {chains} chains"] = 1000 * best_time(
                lambda: pass_and_backward(way, z), repeats * 20
            )
        row[f"zuko inverse, traced ms, {chains} chains"] = 1000 * best_time(lambda: traced(z), repeats * 20)
    saved = row["one-pass inverse ms, 1 chains"] - row["one-pass, compiled ms, 1 chains"]
    row["compile_break_even_passes"] = 1000 * row["compile_seconds_1"] / saved if saved > 0 else float("inf")
    saved = row["zuko inverse ms, 1 chains"] - row["zuko inverse, traced ms, 1 chains"]
    row["record_break_even_passes"] = 1000 * row["record_seconds_1"] / saved if saved > 0 else float("inf")
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
    pyro_row = pyro_model_row(500 if args.quick else 2000, repeats)
    stage_row = flow_stage_row(repeats)

    RESULTS.mkdir(exist_ok=True)
    meta = {
        "machine": (
            f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
        ),
        "flow": "zuko NSF(2, transforms=3, hidden_features=(64, 64), passes=2) (default_flow(2))",
        "jvp_methods": flow.jvp_methods,
        "goal": "identity <= 3x, jacobian <= 8x one flow forward+backward pass, at 4096 chains",
    }
    (RESULTS / "step_cost.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "pyro": pyro_row, "flow_stage": stage_row}, indent=2)
    )
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
    potential = pyro_row["potential_and_gradient_ms"]
    lines += [
        "",
        f"Pyro model ({pyro_row['model']}), one chain, sampling phase, "
        f"{pyro_row['evaluations_per_draw']} potential evaluations per draw (MALA and independence move):",
        "",
        "| potential + gradient (ms) | NFMALA draw (ms) | ratio | "
        + " | ".join(f"{part} share" for part in pyro_row["shares"])
        + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in pyro_row["shares"]) + " |",
        f"| {pyro_row['potential_and_gradient_ms']:.2f} | {pyro_row['draw_ms']:.2f} "
        f"| {pyro_row['ratio']:.2f}x | "
        + " | ".join(f"{100 * share:.0f}%" for share in pyro_row["shares"].values())
        + " |",
    ]
    lines += [
        "",
        "The traced density (the default) against the model run eagerly (`trace_density=False`), per "
        "chain-draw; all chains as one batch with `ChainSampler.from_model` (the same map):",
        "",
        "| chains | traced (ms) | vs one potential + gradient | eager (ms) | vs one potential + gradient "
        "| traced vs one NFMALA chain's draw |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| 1 (`MCMC(NFMALA(model))`) | {pyro_row['draw_ms']:.3f} | {pyro_row['ratio']:.2f}x "
        f"| {pyro_row['draw_ms_eager']:.3f} | {pyro_row['draw_ms_eager'] / potential:.2f}x | 1x |",
    ]
    for chains, ms in pyro_row["batched_chain_draw_ms"].items():
        eager = pyro_row["batched_chain_draw_ms_eager"][chains]
        lines.append(
            f"| {chains} | {ms:.3f} | {ms / potential:.2f}x | {eager:.3f} | {eager / potential:.2f}x "
            f"| {pyro_row['draw_ms'] / ms:.0f}x faster |"
        )
    lines += [
        "",
        f"Latent-to-data pass and backward of a staged map's flow stage ({stage_row['flow']}):",
        "",
        "| chains | zuko inverse (ms) | one-pass inverse (ms) | one-pass, compiled (ms) | compile (s) "
        "| zuko inverse, traced (ms) | record (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for chains in (1, 4):
        lines.append(
            f"| {chains} | {stage_row[f'zuko inverse ms, {chains} chains']:.2f} "
            f"| {stage_row[f'one-pass inverse ms, {chains} chains']:.2f} "
            f"| {stage_row[f'one-pass, compiled ms, {chains} chains']:.2f} "
            f"| {stage_row[f'compile_seconds_{chains}']:.1f} "
            f"| {stage_row[f'zuko inverse, traced ms, {chains} chains']:.2f} "
            f"| {stage_row[f'record_seconds_{chains}']:.2f} |"
        )
    lines.append(
        f"\ntorch.compile pays after {stage_row['compile_break_even_passes']:,.0f} passes per process "
        "and shape (compile time counted); the traced graph after "
        f"{stage_row['record_break_even_passes']:,.0f}."
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
