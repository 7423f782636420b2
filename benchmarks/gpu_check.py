"""A short check that runs where a CUDA GPU is present (no CPU-only assumptions in the library).

    python benchmarks/gpu_check.py

On CUDA: the vectorized sampler (float32 and float64 flows, both preconditioners) and the Pyro
kernel (model data on the GPU) run with every tensor on the GPU and give finite draws near the
exact answer; a flow on the GPU with a model on the CPU raises a ValueError that names the
devices. Without CUDA it says so and exits 0. Exit status 1 on any failure.
"""

from __future__ import annotations

import sys
import time

import pyro
import pyro.distributions as dist
import torch
import zuko

from pyro.infer import MCMC

from pyro_nfmala import NFMALA, ChainSampler, PosteriorPullback


def model(data):
    loc = pyro.sample("loc", dist.Normal(torch.tensor(0.0, device=data.device), 10.0))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=data)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    device = torch.device("cuda")
    failures = []
    for dtype in (torch.float32, torch.float64):
        for preconditioner in ("identity", "jacobian"):
            flow = zuko.flows.NSF(4, transforms=2, passes=2).to(device=device, dtype=dtype)
            target = PosteriorPullback(flow, lambda x: -0.5 * x.square().sum(-1))
            start = time.perf_counter()
            idata = ChainSampler(target, 4096, preconditioner=preconditioner, seed=0).run(
                100, 100, progress=False
            )
            x = torch.as_tensor(idata.posterior["x"].values)
            ok = bool(torch.isfinite(x).all()) and abs(float(x.var()) - 1) < 0.1
            print(
                f"ChainSampler {dtype} {preconditioner}: var {float(x.var()):.3f} "
                f"in {time.perf_counter() - start:.1f} s {'ok' if ok else 'FAILED'}"
            )
            if not ok:
                failures.append(f"ChainSampler {dtype} {preconditioner}")
    data = torch.randn(50, device=device) + 3.0
    pyro.set_rng_seed(0)
    mcmc = MCMC(
        NFMALA(model, flow=zuko.flows.RealNVP(1).to(device)),
        num_samples=300,
        warmup_steps=200,
        disable_progbar=True,
    )
    mcmc.run(data)
    loc = mcmc.get_samples()["loc"]
    expected = float(data.sum() / (len(data) + 0.01))
    ok = loc.is_cuda and bool(torch.isfinite(loc).all()) and abs(float(loc.mean()) - expected) < 0.1
    print(
        f"NFMALA kernel on CUDA: mean {float(loc.mean()):.3f} (exact {expected:.3f}) "
        f"{'ok' if ok else 'FAILED'}"
    )
    if not ok:
        failures.append("kernel")
    try:
        MCMC(
            NFMALA(model, flow=zuko.flows.RealNVP(1).to(device)),
            num_samples=5,
            warmup_steps=5,
            disable_progbar=True,
        ).run(data.cpu())
        failures.append("device mismatch: no error")
    except ValueError as error:
        print(f"device mismatch: ValueError ok ({str(error)[:80]}...)")
    print("FAILED: " + ", ".join(failures) if failures else "all GPU checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
