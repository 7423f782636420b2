"""Pyro's MCMC kernel contract, kept by NFMALA: the scenarios of Pyro's own MCMC API tests
(``tests/infer/mcmc/test_mcmc_api.py`` of pyro-ppl) with NFMALA in place of HMC/NUTS, and the
regressions Pyro guards for its own kernels (a potential of shape (1,), issue 2627).

Models live at module level so that worker processes (fork and spawn) can find them.
"""

import contextlib
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import zuko

from pyro.infer import MCMC
from pyro.infer.mcmc.api import _MultiSampler, _UnarySampler
from pyro.infer.mcmc.util import initialize_model
from pyro.ops.stats import effective_sample_size

from pyro_nfmala import NFMALA, identity_flow

DATA = torch.tensor([1.0])


def normal_normal_model(data):
    """y ~ N(0, I), data ~ N(y, I): the posterior of y is N(data / 2, I / 2)."""
    y = pyro.sample("y", dist.Normal(torch.zeros(data.shape), 1.0).to_event(1))
    pyro.sample("obs", dist.Normal(y, 1.0).to_event(1), obs=data)
    return y


def kernel(**kwargs):
    return NFMALA(normal_normal_model, flow=identity_flow(1), **kwargs)


def assert_posterior_of_y(y):
    """Mean and sd of y ``(chains, draws, 1)`` within 4.5 standard errors of N(0.5, 0.5), from the ESS."""
    ess = float(effective_sample_size(y.double()))
    mean, sd = 0.5, math.sqrt(0.5)
    assert abs(float(y.mean()) - mean) < 4.5 * sd / math.sqrt(ess)
    assert abs(float(y.std()) / sd - 1) < 4.5 * math.sqrt(0.5 / ess) + 0.02


@pytest.mark.parametrize("num_draws", [None, 150, 250])
@pytest.mark.parametrize("group_by_chain", [False, True])
@pytest.mark.parametrize("num_chains", [1, 2])
@pytest.mark.filterwarnings("ignore:num_chains")
def test_mcmc_interface(num_draws, group_by_chain, num_chains):
    pyro.set_rng_seed(0)
    num_samples = 400
    initial_params, _, transforms, _ = initialize_model(
        normal_normal_model, model_args=(DATA,), num_chains=num_chains
    )
    mcmc = MCMC(
        kernel(),
        num_samples=num_samples,
        warmup_steps=200,
        num_chains=num_chains,
        initial_params=initial_params,
        transforms=transforms,
        disable_progbar=True,
    )
    mcmc.run(DATA)
    samples = mcmc.get_samples(num_draws, group_by_chain=group_by_chain)["y"]
    expected = num_draws if num_draws is not None else num_samples
    if group_by_chain:
        assert samples.shape == (num_chains, expected, 1)
    elif num_draws is not None:
        assert samples.shape == (expected, 1)
    else:
        assert samples.shape == (num_chains * expected, 1)
    assert_posterior_of_y(mcmc.get_samples(group_by_chain=True)["y"])


@pytest.mark.parametrize("num_chains, cpu_count", [(1, 2), (2, 1), (2, 2), (2, 3)])
@pytest.mark.parametrize("default_init_params", [True, False])
def test_num_chains(num_chains, cpu_count, default_init_params, monkeypatch):
    import pyro.infer.mcmc.api as api

    monkeypatch.setattr(api.mp, "cpu_count", lambda: cpu_count)
    initial_params, _, transforms, _ = initialize_model(
        normal_normal_model, model_args=(DATA,), num_chains=num_chains
    )
    available_cpu = max(1, cpu_count - 1)
    with pytest.warns(UserWarning) if available_cpu < num_chains else contextlib.nullcontext():
        mcmc = MCMC(
            kernel(),
            num_samples=10,
            warmup_steps=10,
            num_chains=num_chains,
            mp_context="fork",
            initial_params=None if default_init_params else initial_params,
            transforms=transforms,
            disable_progbar=True,
        )
    mcmc.run(DATA)
    assert mcmc.num_chains == num_chains
    expected = _UnarySampler if num_chains == 1 or available_cpu < num_chains else _MultiSampler
    assert isinstance(mcmc.sampler, expected)
    assert mcmc.get_samples(group_by_chain=True)["y"].shape == (num_chains, 10, 1)


@pytest.mark.statistical
def test_parallel_chains_with_spawn(monkeypatch):
    """spawn pickles the kernel (model, flow, options) into fresh processes: it must survive that."""
    import pyro.infer.mcmc.api as api

    monkeypatch.setattr(api.mp, "cpu_count", lambda: 3)
    pyro.set_rng_seed(1)
    mcmc = MCMC(
        kernel(), num_samples=100, warmup_steps=100, num_chains=2, mp_context="spawn", disable_progbar=True
    )
    mcmc.run(DATA)
    assert isinstance(mcmc.sampler, _MultiSampler)
    y = mcmc.get_samples(group_by_chain=True)["y"]
    assert y.shape == (2, 100, 1) and not torch.equal(y[0], y[1])
    assert set(mcmc.diagnostics()["acceptance rate"]) == {"chain 0", "chain 1"}


def _empty_model():
    return torch.tensor(1)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("num_chains", [1, 2])
@pytest.mark.parametrize("given_as", ["potential_fn", "model"])
@pytest.mark.filterwarnings("ignore:num_chains")
def test_null_model_with_hook(jit, num_chains, given_as):
    """A model with no latent sites: every draw is an empty dict, and the hook sees every iteration."""
    num_warmup, num_samples = 10, 10
    initial_params, potential_fn, transforms, _ = initialize_model(_empty_model, num_chains=num_chains)
    iters = []

    def hook(kernel, samples, stage, i):
        assert samples == {}
        iters.append((stage, i))

    if given_as == "potential_fn":
        nfmala = NFMALA(
            potential_fn=potential_fn, transforms=transforms, jit_compile=jit, flow=zuko.flows.RealNVP(1)
        )
    else:
        nfmala = NFMALA(_empty_model, jit_compile=jit, flow=zuko.flows.RealNVP(1))
        initial_params = None
    mcmc = MCMC(
        nfmala,
        num_samples=num_samples,
        warmup_steps=num_warmup,
        num_chains=num_chains,
        initial_params=initial_params,
        hook_fn=hook,
        disable_progbar=True,
    )
    mcmc.run()
    assert mcmc.get_samples() == {}
    if num_chains == 1:
        assert iters == [("Warmup", i) for i in range(num_warmup)] + [
            ("Sample", i) for i in range(num_samples)
        ]


@pytest.mark.parametrize("num_chains", [1, 2])
@pytest.mark.filterwarnings("ignore:num_chains")
def test_mcmc_diagnostics(num_chains):
    data = torch.tensor([2.0]).repeat(3)
    mcmc = MCMC(
        NFMALA(normal_normal_model, flow=identity_flow(3)),
        num_samples=10,
        warmup_steps=10,
        num_chains=num_chains,
        disable_progbar=True,
    )
    mcmc.run(data)
    diagnostics = mcmc.diagnostics()
    assert diagnostics["y"]["n_eff"].shape == data.shape
    assert diagnostics["y"]["r_hat"].shape == data.shape
    chains = {f"chain {i}" for i in range(num_chains)}
    for key in ("divergences", "acceptance rate", "step size", "numerical errors", "sample_stats"):
        assert set(diagnostics[key]) == chains


@pytest.mark.filterwarnings("ignore:num_chains")
def test_sequential_chains_are_consistent(monkeypatch):
    """Nothing is left from the previous chain: seeding each chain alike gives the same chains, in
    any order."""
    import pyro.infer.mcmc.api as api

    monkeypatch.setattr(api.mp, "cpu_count", lambda: 1)

    class Seeded(NFMALA):
        def __init__(self, seeds, **kwargs):
            super().__init__(normal_normal_model, flow=identity_flow(1), **kwargs)
            self.seeds = list(seeds)

        def setup(self, warmup_steps, *args, **kwargs):
            pyro.set_rng_seed(self.seeds.pop(0))
            super().setup(warmup_steps, *args, **kwargs)

    runs = []
    for seeds in ([0, 1], [1, 0]):
        mcmc = MCMC(Seeded(seeds), num_samples=100, warmup_steps=100, num_chains=2, disable_progbar=True)
        mcmc.run(DATA)
        runs.append(mcmc.get_samples(group_by_chain=True)["y"])
    assert torch.equal(runs[0][0], runs[1][1]) and torch.equal(runs[0][1], runs[1][0])


def gaussian_potential(params):
    return 0.5 * params["x"].square().sum()


def gaussian_potential_of_shape_one(params):
    """Pyro issue 2627: a potential that returns shape (1,) instead of a scalar."""
    return 0.5 * params["x"].square().sum().reshape(1)


@pytest.mark.parametrize("potential", [gaussian_potential, gaussian_potential_of_shape_one])
@pytest.mark.parametrize("num_chains", [1, 2])
@pytest.mark.filterwarnings("ignore:num_chains")
def test_potential_fn_with_initial_params_given_to_mcmc(potential, num_chains):
    """Pyro's pattern: ``HMC(potential_fn=U)`` and ``MCMC(..., initial_params=...)``."""
    pyro.set_rng_seed(2)
    initial = {"x": torch.zeros(num_chains, 2)} if num_chains > 1 else {"x": torch.zeros(2)}
    mcmc = MCMC(
        NFMALA(potential_fn=potential, flow=identity_flow(2)),
        num_samples=300,
        warmup_steps=150,
        num_chains=num_chains,
        initial_params=initial,
        disable_progbar=True,
    )
    mcmc.run()
    x = mcmc.get_samples(group_by_chain=True)["x"]
    assert x.shape == (num_chains, 300, 2)
    ess = float(effective_sample_size(x[..., :1].double()))
    assert abs(float(x[..., 0].mean())) < 4.5 / math.sqrt(ess)


def test_potential_fn_with_transforms_returns_constrained_draws():
    """As for HMC: ``transforms`` map constrained to unconstrained; MCMC constrains the draws with them."""
    pyro.set_rng_seed(3)

    def log_normal_potential(params):  # s = exp(u), u ~ N(0, 1)
        return 0.5 * params["s"].square().sum()

    transforms = {"s": dist.transforms.biject_to(dist.constraints.positive).inv}
    mcmc = MCMC(
        NFMALA(potential_fn=log_normal_potential, transforms=transforms, flow=identity_flow(1)),
        num_samples=100,
        warmup_steps=50,
        initial_params={"s": torch.zeros(1)},
        disable_progbar=True,
    )
    mcmc.run()
    assert bool((mcmc.get_samples()["s"] > 0).all())


def test_adapted_step_size_is_exposed_like_hmcs():
    pyro.set_rng_seed(4)
    nfmala = kernel(step_size=1e-3)
    assert nfmala.step_size == 1e-3
    mcmc = MCMC(nfmala, num_samples=50, warmup_steps=100, disable_progbar=True)
    mcmc.run(DATA)
    used = mcmc.diagnostics()["sample_stats"]["chain 0"]["step_size"]
    assert nfmala.step_size == used[-1] != 1e-3  # adapted, and the value every draw used
    assert mcmc.diagnostics()["step size"]["chain 0"] == used[-1]


def test_summary_prints(capsys):
    mcmc = MCMC(kernel(), num_samples=20, warmup_steps=20, disable_progbar=True)
    mcmc.run(DATA)
    mcmc.summary()
    assert "n_eff" in capsys.readouterr().out
