"""pyro_nfmala.MCMC: Pyro's MCMC with every chain of an NFMALA kernel as one batch. The same object and
outputs as Pyro's (samples grouped by chain, summary, diagnostics, ArviZ), hooks and progress as Pyro
gives them, initial parameters per chain, the right posterior, and Pyro's own ways a keyword away."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pyro.infer
import pytest
import torch

from pyro.infer.mcmc.api import _MultiSampler, _UnarySampler
from pyro.ops.stats import effective_sample_size

from pyro_nfmala import MCMC, NFMALA, identity_flow, to_inference_data
from pyro_nfmala.samplers.mcmc import VectorizedChains

DATA = torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0, 2.5, 0.0, 1.2])


def normal_normal(data):
    """loc ~ N(0, 10), data ~ N(loc, 1): the posterior of loc is N(sum / (n + 0.01), 1 / (n + 0.01))."""
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=data)


def posterior_of_loc(data):
    precision = len(data) + 0.01
    return float(data.sum() / precision), 1 / math.sqrt(precision)


def run(num_chains=4, num_samples=300, warmup_steps=200, **kwargs):
    kernel_options = kwargs.pop("kernel", {})
    kernel = NFMALA(normal_normal, fit_options={"progress": False}, **kernel_options)
    mcmc = MCMC(
        kernel,
        num_samples=num_samples,
        warmup_steps=warmup_steps,
        num_chains=num_chains,
        disable_progbar=kwargs.pop("disable_progbar", True),
        **kwargs,
    )
    mcmc.run(DATA)
    return mcmc


@pytest.mark.statistical
@pytest.mark.parametrize("num_chains", [1, 4])
def test_the_chains_sample_the_posterior_as_one_batch_behind_pyros_interface(num_chains):
    pyro.set_rng_seed(0)
    mcmc = run(num_chains)
    assert isinstance(mcmc, pyro.infer.MCMC) and isinstance(mcmc.sampler, VectorizedChains)
    loc = mcmc.get_samples(group_by_chain=True)["loc"]
    assert loc.shape == (num_chains, 300)
    assert mcmc.get_samples()["loc"].shape == (num_chains * 300,)
    assert mcmc.get_samples(100)["loc"].shape == (100,)
    mean, sd = posterior_of_loc(DATA)
    ess = float(effective_sample_size(loc.unsqueeze(-1).double()))
    assert ess > 0.5 * loc.numel()  # a map as good as this one: nearly independent draws
    assert abs(float(loc.mean()) - mean) < 4.5 * sd / math.sqrt(ess)
    assert abs(float(loc.std()) / sd - 1) < 4.5 * math.sqrt(0.5 / ess) + 0.02
    if num_chains > 1:
        assert not torch.equal(loc[0], loc[1])


def test_diagnostics_summary_and_arviz_are_pyros_per_chain(capsys):
    pyro.set_rng_seed(1)
    mcmc = run(3, num_samples=50, warmup_steps=50)
    diagnostics = mcmc.diagnostics()
    chains = {f"chain {i}" for i in range(3)}
    for key in (
        "divergences",
        "acceptance rate",
        "step size",
        "numerical errors",
        "sample_stats",
        "flow check",
    ):
        assert set(diagnostics[key]) == chains, key
    assert diagnostics["loc"]["r_hat"].shape == ()
    for chain in chains:
        assert len(diagnostics["sample_stats"][chain]["accept_prob"]) == 50
    mcmc.summary()
    assert "n_eff" in capsys.readouterr().out
    idata = to_inference_data(mcmc)
    assert idata.posterior["loc"].shape == (3, 50)
    for name in ("accept_prob", "step_size", "diverging", "lp"):
        assert idata.sample_stats[name].shape == (3, 50)
    assert "log_likelihood" in idata.groups()
    # lp is minus Pyro's potential energy of each draw, the draws those of the chains
    potential = pyro.infer.mcmc.util.initialize_model(normal_normal, (DATA,))[1]
    draws = idata.posterior["loc"].values
    for chain, draw in ((0, 0), (2, 49)):
        expected = -float(potential({"loc": torch.tensor(draws[chain, draw])}))
        assert abs(float(idata.sample_stats["lp"].values[chain, draw]) - expected) < 1e-4


def test_the_hook_sees_every_chain_at_every_step_with_pyros_stage_names():
    seen = []

    def hook(kernel, params, stage, i):
        assert set(params) == {"loc"} and params["loc"].shape == ()
        seen.append((stage, i))

    run(2, num_samples=5, warmup_steps=4, hook_fn=hook)
    expected = [(f"Warmup [{c}]", i) for i in range(4) for c in range(2)]
    expected += [(f"Sample [{c}]", i) for i in range(5) for c in range(2)]
    assert seen == expected


def test_each_chain_starts_at_its_initial_params():
    starts = {"loc": torch.tensor([-5.0, 0.0, 5.0])}
    mcmc = run(
        3,
        num_samples=3,
        warmup_steps=0,
        initial_params=starts,
        kernel={"step_size": 1e-8, "adapt_step_size": False, "independence_every": None},
    )
    first = mcmc.get_samples(group_by_chain=True)["loc"][:, 0]
    torch.testing.assert_close(first, starts["loc"], atol=1e-3, rtol=0)


def test_the_same_seed_gives_the_same_chains():
    draws = []
    for seed in (4, 4, 5):
        pyro.set_rng_seed(seed)
        draws.append(run(2, num_samples=20, warmup_steps=20).get_samples(group_by_chain=True)["loc"])
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_one_progress_bar_follows_the_batch(capsys, monkeypatch):
    monkeypatch.delenv("CI", raising=False)  # Pyro's ProgressBar hides itself where CI is set
    run(2, num_samples=10, warmup_steps=10, disable_progbar=False)
    shown = capsys.readouterr().err
    assert "Sample [2 chains]" in shown and "acc. prob" in shown


def test_a_run_too_short_to_trust_warns_once_for_all_chains():
    pyro.set_rng_seed(6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(4, num_samples=8, warmup_steps=5)
    unconverged = [w for w in caught if "may not have converged" in str(w.message)]
    assert len(unconverged) == 1 and "(4 in this process so far)" in str(unconverged[0].message)


@pytest.mark.parametrize("num_chains", [1, 2])
def test_a_potential_fn_with_initial_params_per_chain(num_chains):
    pyro.set_rng_seed(7)

    def potential(params):
        return 0.5 * params["x"].square().sum()

    initial = {"x": torch.zeros(num_chains, 2)} if num_chains > 1 else {"x": torch.zeros(2)}
    mcmc = MCMC(
        NFMALA(potential_fn=potential, flow=identity_flow(2)),
        num_samples=200,
        warmup_steps=100,
        num_chains=num_chains,
        initial_params=initial,
        disable_progbar=True,
    )
    mcmc.run()
    x = mcmc.get_samples(group_by_chain=True)["x"]
    assert x.shape == (num_chains, 200, 2) and isinstance(mcmc.sampler, VectorizedChains)
    ess = float(effective_sample_size(x[..., :1].double()))
    assert abs(float(x[..., 0].mean())) < 4.5 / math.sqrt(ess)


def nothing():
    return torch.tensor(1.0)


def test_a_model_with_nothing_to_sample_runs_as_pyro_runs_it():
    iters = []
    mcmc = MCMC(
        NFMALA(nothing, flow=identity_flow(1)),
        num_samples=3,
        warmup_steps=2,
        num_chains=2,
        hook_fn=lambda kernel, params, stage, i: iters.append(stage),
        disable_progbar=True,
    )
    mcmc.run()
    assert mcmc.get_samples() == {} and len(iters) == 2 * (2 + 3)


def test_pyros_ways_are_a_keyword_away_and_bad_choices_are_clear_errors(monkeypatch):
    import pyro.infer.mcmc.api as api

    monkeypatch.setattr(api.mp, "cpu_count", lambda: 4)
    kernel = NFMALA(normal_normal, fit_options={"progress": False})
    parallel = MCMC(kernel, num_samples=2, warmup_steps=2, num_chains=2, chain_method="parallel")
    assert isinstance(parallel.sampler, _MultiSampler)
    parallel.sampler.terminate()
    sequential = MCMC(kernel, num_samples=2, warmup_steps=2, num_chains=2, chain_method="sequential")
    assert isinstance(sequential.sampler, _UnarySampler) and sequential.chain_method == "sequential"
    assert isinstance(MCMC(kernel, num_samples=2, num_chains=2).sampler, VectorizedChains)
    nuts = pyro.infer.NUTS(normal_normal)
    assert not isinstance(MCMC(nuts, num_samples=2).sampler, VectorizedChains)
    with pytest.raises(ValueError, match="chain_method"):
        MCMC(kernel, num_samples=2, chain_method="threads")
    with pytest.raises(ValueError, match="NUTS kernel runs as Pyro runs it"):
        MCMC(nuts, num_samples=2, chain_method="vectorized")
