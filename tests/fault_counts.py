"""Counts of the faults survived, one run of each scenario of test_faults.py.

python tests/fault_counts.py
"""

if __name__ == "__main__":
    import sys
    import warnings

    from pathlib import Path

    import pyro
    import pyro.ops.integrator
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    from conftest import OutOfDomain
    from pyro.infer import MCMC
    from test_faults import NFMALA, SCALE, FaultyPotential, RaisesRightOf, arm_after_warmup, exponential_flow

    from pyro_nfmala import ChainSampler, LatentFlow, PosteriorPullback, identity_flow

    for value in [float("nan"), float("inf")]:
        for rate in [0.01, 0.2]:
            pyro.set_rng_seed(0)
            pot = FaultyPotential(rate, value)
            kernel = NFMALA(potential_fn=pot, flow=identity_flow(2), initial_params={"x": torch.zeros(2)})
            mcmc = MCMC(
                kernel,
                num_samples=500,
                warmup_steps=100,
                disable_progbar=True,
                hook_fn=arm_after_warmup(pot, 100),
            )
            mcmc.run()
            x = mcmc.get_samples()["x"]
            print(
                f"kernel, potential {value} on {rate:.0%} of calls: "
                f"{pot.faults} faults injected in 500 draws, "
                f"{len(mcmc.diagnostics()['divergences']['chain 0'])} divergences counted, "
                f"non-finite draws: {int((~torch.isfinite(x)).sum())}"
            )
    for rate in [0.01, 0.2]:
        faults, armed = [], []
        g = torch.Generator().manual_seed(1)

        def log_prob(x):
            faulty = (torch.rand(x.shape[:-1], generator=g) < rate) & bool(armed)
            faults.append(int(faulty.sum()))
            return torch.where(faulty, torch.full_like(x[..., 0], float("nan")), -0.5 * x.square().sum(-1))

        s = ChainSampler(
            PosteriorPullback(LatentFlow(identity_flow(2)), log_prob),
            64,
            preconditioner="identity",
            step_size=0.5,
            seed=0,
        )
        armed.append(1)
        idata = s.sample(200, progress=False)
        print(
            f"vectorized sampler, NaN for {rate:.0%} of chains per call: "
            f"{sum(faults)} faults in 64 x 200 proposals, "
            f"{int(idata.sample_stats['diverging'].sum())} counted, non-finite draws: "
            f"{int((~torch.isfinite(torch.as_tensor(idata.posterior['x'].values))).sum())}"
        )
    pyro.set_rng_seed(2)
    pyro.ops.integrator.register_exception_handler("out_of_domain", lambda e: isinstance(e, OutOfDomain))
    mcmc = MCMC(
        NFMALA(
            RaisesRightOf(2.0, OutOfDomain),
            flow=identity_flow(1),
            initial_params={"loc": torch.tensor(-0.5)},
            step_size=1.0,
            adapt_step_size=False,
        ),
        num_samples=300,
        warmup_steps=0,
        disable_progbar=True,
    )
    mcmc.run()
    loc = mcmc.get_samples()["loc"]
    print(
        "model raising a registered error for loc > 2: "
        f"{len(mcmc.diagnostics()['divergences']['chain 0'])} of 300 proposals rejected, "
        f"max draw {float(loc.max()):.2f}"
    )
    for pc in ["identity", "jacobian"]:

        def log_normal(x):
            y = x.log()
            return (-0.5 * (y / SCALE).square() - y).sum(-1)

        z0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)).clamp(-2.5, 2.5)
        s = ChainSampler(
            PosteriorPullback(LatentFlow(exponential_flow()), log_normal),
            64,
            preconditioner=pc,
            step_size=1.0,
            initial_z=z0,
            seed=0,
        )
        idata = s.sample(100, progress=False)
        print(
            f"overflowing flow x = exp(30 z), {pc}: "
            f"{int(idata.sample_stats['diverging'].sum())} of 6400 proposals rejected, non-finite draws: "
            f"{int((~torch.isfinite(torch.as_tensor(idata.posterior['x'].values))).sum())}"
        )
