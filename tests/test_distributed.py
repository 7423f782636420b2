"""Beyond one process: two processes on this CPU with gloo (spawned, bounded in time; never a hang).

- a likelihood over two data shards, its value, gradient and Hessian, equal the one-process values
  (1e-10, float64),
  while the same sum with the prior counted on both ranks is caught;
- chains split over two processes adapt one kernel (the same step size and mass matrix on both ranks),
  and their pooled draws are right on a posteriordb posterior (means within 0.1 sd, R-hat <= 1.01);
- flow refits in warmup leave one map on both ranks (without pooling, the maps differ: checked by hand);
- the batch sampler splits its chains too, and every rank gets them all;
- the sharded run's chains are the same on both ranks, step for step; chain groups x data shards (4
  processes as 2 x 2) combine;
- a rank that raises stops every rank with its error, in setup and after sampling.
"""

import math
import time

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import zuko

from pyro_nfmala import MCMC, NFMALA, ChainSampler, from_arrays, identity_flow
from pyro_nfmala.distributed import ChainParallel, Collective, ShardedData
from pyro_nfmala.distributed.launch import spawn
from pyro_nfmala.examples.posteriordb import MODELS, comparable_reference, derived, load_data, reference_names
from pyro_nfmala.model.density import model_density
from pyro_nfmala.model.sharded import ShardedLogDensity

TIMEOUT = 240.0


def regression(x, y):
    """A regression with a constrained scale (its Jacobian) and a hierarchical prior."""
    scale = pyro.sample("scale", dist.HalfNormal(1.0))
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    coef = pyro.sample("coef", dist.Normal(loc, scale).expand([x.shape[-1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(x @ coef, sigma), obs=y)


def flat_regression(x, y):
    """The same regression with a fixed prior on its coefficients: its Laplace map passes the check."""
    coef = pyro.sample("coef", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(x @ coef, sigma), obs=y)


def regression_data(n=400, p=3):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, p, generator=generator, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64) + 0.7 * torch.randn(
        n, generator=generator, dtype=torch.float64
    )
    return x, y


def points(d=6, n=5):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def shard(rank, size):
    x, y = regression_data()
    return x[rank::size], y[rank::size]


def value_and_grad(log_prob, at):
    at = at.clone().requires_grad_(True)
    value = log_prob(at)
    (grad,) = torch.autograd.grad(value.sum(), at)
    return value.detach(), grad


# ----------------------------------------------------------------------------------------------
# what each rank runs (module level: spawned processes import them)


def sharded_density_values():
    torch.set_default_dtype(torch.float64)
    group = Collective()
    args = shard(group.rank, group.size)
    density = model_density(regression, args, shards=ShardedData())
    value, grad = value_and_grad(density.log_prob, points())
    # the negative control: every rank's whole model summed, the prior counted on each
    whole = model_density(regression, args)
    twice = ShardedData().sum(value_and_grad(whole.log_prob, points())[0])
    return value, grad, twice, density.log_prob(points()[0]), hessian(density.log_prob)


def hessian(log_prob):
    """The Hessian at one point, as the Laplace stage takes it (a double backward)."""
    return torch.autograd.functional.hessian(lambda v: log_prob(v[None])[0], points()[0])


def chain_parallel_run(name):
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(0)
    kernels = []

    def keep_kernel(kernel, params, stage, i):
        if stage.startswith("Sample") and i == 0 and not kernels:
            kernels.append(kernel._chains.driver.parameters)

    kernel = NFMALA(
        MODELS[name], fit_options={"progress": False}, max_plate_nesting=1, distributed=ChainParallel()
    )
    mcmc = MCMC(
        kernel, num_samples=1000, warmup_steps=500, num_chains=4, disable_progbar=True, hook_fn=keep_kernel
    )
    mcmc.run(**load_data(name, dtype=torch.float64))
    (parameters,) = kernels
    samples = {key: value.numpy() for key, value in mcmc.get_samples(group_by_chain=True).items()}
    return float(parameters.step_size[0]), parameters.move.inverse_mass.clone(), samples


def chain_sampler_run():
    torch.set_default_dtype(torch.float64)
    group = Collective()
    sampler = ChainSampler.from_model(
        flat_regression, *shard(0, 1), num_chains=4, seed=0, fit_options={"progress": False},
        distributed=ChainParallel(),
    )  # fmt: skip
    idata = sampler.run(num_samples=50, warmup_steps=50, progress=False)
    return group.rank, sampler.num_chains, float(sampler.step_size[0]), idata.posterior["coef"].values


def refined_chain_sampler_run():
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)  # the same untrained flow on both ranks
    flow = zuko.flows.MAF(4, transforms=1, hidden_features=[8])
    sampler = ChainSampler.from_model(
        flat_regression, *shard(0, 1), num_chains=4, seed=0, flow=flow, refine_every=10,
        distributed=ChainParallel(),
    )  # fmt: skip
    sampler.warmup(40, progress=False)
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return sampler.refinements, sampler.flow.to_data(z)[0]


def sharded_run():
    torch.set_default_dtype(torch.float64)
    group = Collective()
    pyro.set_rng_seed(0)
    kernel = NFMALA(flat_regression, fit_options={"progress": False}, distributed=ShardedData(check_every=10))
    mcmc = MCMC(kernel, num_samples=60, warmup_steps=60, num_chains=2, disable_progbar=True)
    mcmc.run(*shard(group.rank, group.size))
    return {key: value.numpy() for key, value in mcmc.get_samples(group_by_chain=True).items()}


def sharded_run_seeded_by_rank():
    """The mistake ``check_every`` is for: each rank seeded on its own, so their chains part ways (a fixed
    map and step size, so that the ranks' evaluations still pair up until the check)."""
    torch.set_default_dtype(torch.float64)
    group = Collective()
    pyro.set_rng_seed(group.rank)
    kernel = NFMALA(
        flat_regression,
        flow=identity_flow(4),
        step_size=0.01,
        adapt_step_size=False,
        independence_every=None,
        distributed=ShardedData(check_every=5),
    )
    MCMC(kernel, num_samples=20, warmup_steps=0, num_chains=2, disable_progbar=True).run(
        *shard(group.rank, group.size)
    )


def chains_by_shards_run():
    """Four processes as 2 chain groups x 2 data shards: ranks (c, s) = (rank // 2, rank % 2); a row (the
    same c) shares its chains over the shards, a column (the same s) splits the chains."""
    torch.set_default_dtype(torch.float64)
    rank = torch.distributed.get_rank()
    rows = [torch.distributed.new_group([0, 1]), torch.distributed.new_group([2, 3])]
    columns = [torch.distributed.new_group([0, 2]), torch.distributed.new_group([1, 3])]
    row, column = rows[rank // 2], columns[rank % 2]
    pyro.set_rng_seed(0)
    kernel = NFMALA(
        flat_regression,
        fit_options={"progress": False},
        distributed=(ChainParallel(column), ShardedData(row, check_every=10)),
    )
    mcmc = MCMC(kernel, num_samples=40, warmup_steps=40, num_chains=4, disable_progbar=True)
    mcmc.run(*shard(rank % 2, 2))
    return {key: value.numpy() for key, value in mcmc.get_samples(group_by_chain=True).items()}


def sharded_evaluation_that_fails_on_rank_1():
    """Rank 1's likelihood raises in an evaluation (the gradient's path, then the value's alone); each rank
    says what it raised."""
    torch.set_default_dtype(torch.float64)
    shards = ShardedData()

    def local(x):
        if shards.rank == 1:
            raise ValueError("rank 1's likelihood failed")
        return -x.square().sum(-1)

    density, raised = ShardedLogDensity(local, shards), []
    for at in (points().requires_grad_(True), points()):
        try:
            density(at)
        except ValueError as error:
            raised.append((str(error), getattr(error, "__notes__", [])))
    return raised


def failing_model(x, y):
    if Collective().rank == 1:
        raise ValueError("rank 1's model cannot read its data")
    flat_regression(x, y)


def raise_in_setup():
    torch.set_default_dtype(torch.float64)
    group = Collective()
    kernel = NFMALA(failing_model, fit_options={"progress": False}, distributed=ChainParallel())
    MCMC(kernel, num_samples=20, warmup_steps=20, num_chains=2, disable_progbar=True).run(
        *shard(group.rank, 2)
    )


def raise_while_sampling():
    torch.set_default_dtype(torch.float64)
    group = Collective()

    def hook(kernel, params, stage, i):
        if group.rank == 1 and stage.startswith("Sample") and i == 5:
            raise RuntimeError("rank 1's hook failed at draw 5")

    kernel = NFMALA(flat_regression, fit_options={"progress": False}, distributed=ChainParallel())
    mcmc = MCMC(kernel, num_samples=200, warmup_steps=20, num_chains=2, disable_progbar=True, hook_fn=hook)
    mcmc.run(*shard(group.rank, 2))


# ----------------------------------------------------------------------------------------------
# tests


def test_in_one_process_every_collective_is_the_identity():
    group = ChainParallel()
    rows = torch.arange(6.0).reshape(3, 2)
    assert (group.size, group.rank, group.active) == (1, 0, False)
    assert group.gather_rows(rows) is rows and group.sum(rows) is rows
    assert group.gather_objects("a") == ["a"] and group.broadcast_object("b") == "b"
    assert group.split(5) == (5, 0)


def test_a_time_budget_on_a_sharded_fit_and_runs_that_cannot_split_chains_are_refused():
    with pytest.raises(ValueError, match="without a time budget"):
        NFMALA(flat_regression, fit_options={"max_seconds": 60}, distributed=ShardedData())
    with pytest.raises(TypeError, match="ChainParallel"):
        NFMALA(flat_regression, distributed="gloo")
    with pytest.raises(TypeError, match="one of each"):
        NFMALA(flat_regression, distributed=(ShardedData(), ShardedData()))
    kernel = NFMALA(flat_regression, distributed=ChainParallel())
    with pytest.raises(ValueError, match="run it with pyro_nfmala.MCMC"):
        pyro.infer.MCMC(kernel, num_samples=2, warmup_steps=2, disable_progbar=True).run(*shard(0, 1))
    with pytest.raises(ValueError, match="run it with pyro_nfmala.MCMC"):
        MCMC(kernel, 2, 2, chain_method="sequential", disable_progbar=True).run(*shard(0, 1))


def test_chains_are_split_in_consecutive_blocks_over_the_ranks():
    class Three(Collective):
        size, active = 3, True

        def __init__(self, rank):
            self._rank = rank

        @property
        def rank(self):
            return self._rank

    shares = [Three.split(Three(rank), 8) for rank in range(3)]
    assert shares == [(3, 0), (3, 3), (2, 6)]


def test_a_sharded_likelihood_its_gradient_and_hessian_equal_the_one_process_values():
    torch.set_default_dtype(torch.float64)
    try:
        results = spawn(sharded_density_values, nprocs=2, timeout=TIMEOUT)
        whole = model_density(regression, regression_data())
        expected_value, expected_grad = value_and_grad(whole.log_prob, points())
        expected_hessian = hessian(whole.log_prob)
    finally:
        torch.set_default_dtype(torch.float32)
    for value, grad, twice, single, second in results:
        assert torch.allclose(second, expected_hessian, rtol=0, atol=1e-9), (
            (second - expected_hessian).abs().max()
        )
        assert torch.allclose(value, expected_value, rtol=0, atol=1e-10), (value - expected_value).abs().max()
        assert torch.allclose(grad, expected_grad, rtol=0, atol=1e-10), (grad - expected_grad).abs().max()
        assert torch.allclose(single, expected_value[0], rtol=0, atol=1e-10)  # one point, (d,)
        assert (twice - expected_value).abs().min() > 1e-3  # the prior counted twice: caught
    assert torch.equal(results[0][1], results[1][1])  # every rank the same numbers


@pytest.mark.posteriordb
def test_chains_over_two_processes_adapt_one_kernel_and_their_pooled_draws_are_right():
    name = "kidiq_with_mom_work"
    (step0, mass0, samples0), (step1, mass1, samples1) = spawn(
        chain_parallel_run, 2, (name,), timeout=TIMEOUT
    )
    assert step0 == step1 and torch.equal(mass0, mass1)  # pooled warmup: one kernel
    assert not torch.equal(mass0, torch.ones_like(mass0))  # and it was adapted
    for key in samples0:
        assert samples0[key].shape[:2] == (4, 1000)
        np.testing.assert_array_equal(samples0[key], samples1[key])  # every rank holds every chain
    assert not np.array_equal(samples0[key][0], samples0[key][2])  # the ranks' chains are not copies
    reference = comparable_reference(name)
    flat = reference_names(derived(name, samples0))
    ours = from_arrays({key: flat[key] for key in reference})
    rhat = az.rhat(ours)
    for key, ref in reference.items():
        draws = np.asarray(flat[key])
        assert abs(draws.mean() - ref.mean()) <= 0.1 * ref.std(), key
        assert float(rhat[key]) <= 1.01, (key, float(rhat[key]))


def test_the_batch_sampler_splits_its_chains_too_and_every_rank_gets_them_all():
    (_, local0, step0, coef0), (_, local1, step1, coef1) = spawn(chain_sampler_run, 2, timeout=TIMEOUT)
    assert (local0, local1) == (2, 2) and step0 == step1
    assert coef0.shape[:2] == (4, 50)
    np.testing.assert_array_equal(coef0, coef1)
    assert not np.array_equal(coef0[0], coef0[2])


def test_flow_refits_on_two_processes_leave_one_map_on_both():
    (count0, x0), (count1, x1) = spawn(refined_chain_sampler_run, 2, timeout=TIMEOUT)
    assert count0 == count1 >= 2
    assert torch.equal(x0, x1)


def test_a_sharded_run_keeps_the_same_chains_on_every_rank():
    first, second = spawn(sharded_run, nprocs=2, timeout=TIMEOUT)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
        assert np.isfinite(first[key]).all() and first[key].std() > 0
    coef = first["coef"].reshape(-1, 3).mean(0)
    assert np.allclose(coef, [1.0, -0.5, 0.25], atol=0.2)


def test_chain_groups_and_data_shards_combine():
    results = spawn(chains_by_shards_run, nprocs=4, timeout=TIMEOUT)
    for other in results[1:]:
        for key in results[0]:
            np.testing.assert_array_equal(results[0][key], other[key])  # every rank: every chain
    coef = results[0]["coef"]
    assert coef.shape[:2] == (4, 40) and not np.array_equal(coef[0], coef[2])
    assert np.allclose(coef.reshape(-1, 3).mean(0), [1.0, -0.5, 0.25], atol=0.2)


def test_a_rank_whose_sharded_evaluation_raises_stops_every_rank_with_its_error():
    for raised in spawn(sharded_evaluation_that_fails_on_rank_1, nprocs=2, timeout=TIMEOUT):
        assert len(raised) == 2  # both evaluations, on both ranks
        for message, notes in raised:
            assert message == "rank 1's likelihood failed" and "raised on rank 1" in notes


def test_ranks_whose_sharded_chains_part_ways_stop_with_an_error_that_says_why():
    with pytest.raises(RuntimeError, match="the chains differ between ranks after step 5") as caught:
        spawn(sharded_run_seeded_by_rank, nprocs=2, timeout=TIMEOUT)
    assert "pyro.set_rng_seed" in str(caught.value)


@pytest.mark.parametrize(
    "fn, message",
    [(raise_in_setup, "rank 1's model cannot read"), (raise_while_sampling, "failed at draw 5")],
)
def test_a_rank_that_raises_stops_every_rank_with_its_error(fn, message):
    started = time.monotonic()
    with pytest.raises((ValueError, RuntimeError), match=message) as caught:
        spawn(fn, nprocs=2, timeout=TIMEOUT)
    assert any("rank 1" in note for note in getattr(caught.value, "__notes__", []))
    assert time.monotonic() - started < TIMEOUT / 2 and math.isfinite(started)
