"""The vectorized many-chain sampler: invariance (with negative controls), reproducibility,
ArviZ output, NaN handling and bad input."""

import pytest
import torch
import zuko

from invariance import JacobianWithoutReverseLadj, exact_latents, max_abs_z_score, statistics

from pyro_nfmala import ChainSampler, LatentTarget, PosteriorPullback, TemperedFlow
from pyro_nfmala.engine.adaptation import find_reasonable_step_size
from pyro_nfmala.engine.langevin import JacobianPreconditioner, get_preconditioner
from pyro_nfmala.engine.step import init_state

NUM_PARTICLES = 5000


def _advance_from(sampler_kwargs, target, z0, steps=10):
    sampler = ChainSampler(target, len(z0), initial_z=z0, **sampler_kwargs)
    return sampler.advance(steps, progress=False)


@pytest.mark.statistical
@pytest.mark.parametrize("preconditioner", ["identity", "jacobian", "data_space"])
def test_vectorized_sampler_keeps_exact_posterior_law(latent_flow, mixture, preconditioner):
    target = PosteriorPullback(latent_flow, mixture.log_prob, dim=2)
    torch.manual_seed(0)
    z0 = exact_latents(latent_flow, mixture, NUM_PARTICLES)
    reference_z = exact_latents(latent_flow, mixture, 100_000)
    reference = statistics(reference_z, latent_flow.to_data(reference_z)[0].detach())
    probe = init_state(target, get_preconditioner(preconditioner), z0[:256])
    step = float(find_reasonable_step_size(probe, target, get_preconditioner(preconditioner)).median())
    state = _advance_from(dict(preconditioner=preconditioner, step_size=step, seed=3), target, z0)
    assert max_abs_z_score(statistics(state.z, state.x), reference) < 4.5
    if preconditioner == "jacobian":  # negative control through the same driver
        broken = _advance_from(
            dict(preconditioner=JacobianWithoutReverseLadj(), step_size=step, seed=3), target, z0
        )
        assert max_abs_z_score(statistics(broken.z, broken.x), reference) > 6.0


@pytest.mark.statistical
def test_tempered_beta_zero_keeps_the_latent_gaussian(latent_flow):
    """T2 with beta = 0 is q_Z = N(0, I); the jacobian preconditioner still uses the flow's J."""
    target = TemperedFlow(latent_flow, beta=0.0)
    torch.manual_seed(1)
    z0 = torch.randn(NUM_PARTICLES, 2, dtype=torch.float64)
    reference_z = torch.randn(100_000, 2, dtype=torch.float64)
    reference = statistics(reference_z, latent_flow.to_data(reference_z)[0].detach())
    probe = init_state(target, JacobianPreconditioner(), z0[:256])
    step = float(find_reasonable_step_size(probe, target, JacobianPreconditioner()).median())
    for precond in ("identity", "jacobian", "data_space"):
        state = _advance_from(dict(preconditioner=precond, step_size=step, seed=4), target, z0)
        assert max_abs_z_score(statistics(state.z, state.x), reference) < 4.5, precond
    broken = _advance_from(
        dict(preconditioner=JacobianWithoutReverseLadj(), step_size=step, seed=4), target, z0, steps=20
    )
    assert max_abs_z_score(statistics(broken.z, broken.x), reference) > 6.0


def test_same_seed_same_chains_and_other_seed_other_chains():
    flow = zuko.flows.RealNVP(2)
    target = TemperedFlow(flow, beta=1.0)
    runs = [
        ChainSampler(target, 16, seed=seed).run(10, warmup_steps=10, progress=False) for seed in (7, 7, 8)
    ]
    assert (runs[0].posterior["x"].values == runs[1].posterior["x"].values).all()
    assert (runs[0].sample_stats["accept_prob"].values == runs[1].sample_stats["accept_prob"].values).all()
    assert not (runs[0].posterior["x"].values == runs[2].posterior["x"].values).all()


def test_inference_data_has_a_real_chain_dimension():
    flow = zuko.flows.RealNVP(3)
    idata = ChainSampler(TemperedFlow(flow, 0.5), 12, seed=0).run(7, warmup_steps=15, thin=2, progress=False)
    assert idata.posterior["x"].shape == (12, 7, 3)
    assert idata.latent["z"].shape == (12, 7, 3)
    for name in ("accept_prob", "step_size", "diverging", "lp"):
        assert idata.sample_stats[name].shape == (12, 7)
    # x is f(z) draw by draw
    z = torch.as_tensor(idata.latent["z"].values[3, 4])
    with torch.no_grad():
        x = flow().transform.inv(z)
    assert torch.allclose(torch.as_tensor(idata.posterior["x"].values[3, 4]), x, atol=1e-5)
    # shared adaptation: one fixed step size for every chain and draw
    steps = idata.sample_stats["step_size"].values
    assert (steps == steps[0, 0]).all() and steps[0, 0] > 0


def test_per_chain_adaptation_gives_one_step_size_per_chain():
    sampler = ChainSampler(TemperedFlow(zuko.flows.RealNVP(2), 1.0), 8, adapt="per_chain", seed=0)
    step = sampler.warmup(30, progress=False)
    assert step.shape == (8,) and len(set(step.tolist())) > 1


@pytest.mark.statistical
def test_warmup_reaches_the_target_acceptance(latent_flow):
    sampler = ChainSampler(TemperedFlow(latent_flow, 1.0), 512, preconditioner="jacobian", seed=0)
    sampler.warmup(150, progress=False)
    idata = sampler.sample(50, progress=False)
    # Dual averaging fixes the averaged iterate, whose acceptance is near the target but not on it; the
    # Monte Carlo error of this mean (25,600 proposals) is below 0.01, so the band is the averaging's bias.
    assert abs(float(idata.sample_stats["accept_prob"].mean()) - 0.574) < 0.08


def test_the_papers_procedure_returns_one_sample_per_chain(latent_flow):
    sampler = ChainSampler(TemperedFlow(latent_flow, 1.0), 32, preconditioner="jacobian", seed=0)
    sampler.warmup(5, progress=False)
    x = sampler.advance(5, progress=False).x
    assert x.shape == (32, 2) and torch.isfinite(x).all()


@pytest.mark.statistical
def test_nan_proposals_are_rejected_counted_and_reported(latent_flow):
    def log_prob(x):  # NaN right of 0.5: chains started left of it must never go there
        return torch.where(
            x[..., 0] > 0.5, torch.full_like(x[..., 0], float("nan")), -0.5 * x.square().sum(-1)
        )

    target = PosteriorPullback(latent_flow, log_prob)
    z0 = latent_flow.to_latent(torch.zeros(64, 2, dtype=torch.float64) - 0.5)
    sampler = ChainSampler(target, 64, preconditioner="jacobian", initial_z=z0, step_size=0.5, seed=0)
    with pytest.warns(RuntimeWarning, match="divergent"):
        idata = sampler.sample(40, progress=False)
    x = idata.posterior["x"].values
    assert (x[..., 0] <= 0.5).all() and torch.isfinite(torch.as_tensor(x)).all()
    assert int(idata.sample_stats["diverging"].sum()) > 0
    assert sampler.num_divergent == int(idata.sample_stats["diverging"].sum())


def test_a_run_can_be_continued():
    sampler = ChainSampler(TemperedFlow(zuko.flows.RealNVP(2), 1.0), 8, seed=0)
    first = sampler.run(5, warmup_steps=5, progress=False)
    second = sampler.sample(5, progress=False)
    assert sampler.num_steps == 15
    assert not (first.posterior["x"].values[:, -1] == second.posterior["x"].values[:, 0]).all()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_chains=0), ValueError, "num_chains"),
        (dict(num_chains=2.5), ValueError, "num_chains"),
        (dict(num_chains=True), ValueError, "num_chains"),
        (dict(step_size=True), ValueError, "step_size"),
        (dict(step_size=-1.0), ValueError, "step_size"),
        (dict(adapt="sometimes"), ValueError, "adapt"),
        (dict(target_accept_prob=1.0), ValueError, "target_accept_prob"),
        (dict(initial_z=torch.zeros(4, 3)), ValueError, r"shape \(num_chains, d\) = \(4, 2\)"),
        (dict(initial_z=torch.zeros(4, 2, dtype=torch.float64)), TypeError, "dtype"),
        (dict(initial_z=torch.zeros(4, 2, device="meta")), ValueError, "is on meta"),
        (dict(initial_z=[[0.0, 0.0]] * 4), TypeError, "tensor"),
        (dict(preconditioner="newton"), ValueError, "unknown preconditioner"),
    ],
)
def test_bad_input(kwargs, error, match):
    options = dict(num_chains=4, seed=0)
    options.update(kwargs)
    with pytest.raises(error, match=match):
        ChainSampler(TemperedFlow(zuko.flows.RealNVP(2), 1.0), **options)


def test_bad_targets():
    flow = zuko.flows.RealNVP(2)
    with pytest.raises(ValueError, match="flow has dimension 2 but the target has dimension 3"):
        PosteriorPullback(flow, lambda x: -x.square().sum(-1), dim=3)
    with pytest.raises(ValueError, match="beta"):
        TemperedFlow(flow, beta=-0.5)
    with pytest.raises(TypeError, match="LatentTarget"):
        ChainSampler(lambda z: z, 4)


class InterruptAfter(LatentTarget):
    """Wraps a target; raises KeyboardInterrupt (as Ctrl-C would) on its ``calls``-th evaluation."""

    def __init__(self, target, calls):
        self.target, self.flow, self.calls = target, target.flow, calls

    def log_density(self, z):
        self.calls -= 1
        if self.calls == 0:
            raise KeyboardInterrupt
        return self.target.log_density(z)


def test_interrupted_sampling_returns_the_draws_so_far_and_can_continue(latent_flow):
    target = InterruptAfter(TemperedFlow(latent_flow, 1.0), calls=10**9)
    sampler = ChainSampler(target, 8, seed=0, step_size=0.3)
    target.calls = 26  # the 26th evaluation: after 25 full steps
    with pytest.warns(UserWarning, match="interrupted after 25 of 100 draws"):
        idata = sampler.sample(100, progress=False)
    assert idata.posterior["x"].shape == (8, 25, 2) and idata.sample_stats["accept_prob"].shape == (8, 25)
    last = torch.as_tensor(idata.posterior["x"].values[:, -1])
    torch.testing.assert_close(sampler.state.x, last)  # the state is the last draw returned
    target.calls = 10**9
    more = sampler.sample(10, progress=False)  # continues the same chains
    assert more.posterior["x"].shape == (8, 10, 2)
    target.calls = 1  # interrupted before any draw: nothing to return, the interrupt propagates
    with pytest.raises(KeyboardInterrupt):
        sampler.sample(5, progress=False)


def test_interrupted_warmup_keeps_the_adapted_step_size(latent_flow):
    target = InterruptAfter(TemperedFlow(latent_flow, 1.0), calls=10**9)
    sampler = ChainSampler(target, 8, seed=0, step_size=1e-4)
    target.calls = 40
    with pytest.raises(KeyboardInterrupt):
        sampler.warmup(200, progress=False)
    assert float(sampler.step_size[0]) > 1e-3  # adapted up from 1e-4 before the interrupt


@pytest.mark.parametrize(
    "log_prob, num_chains",
    [
        (lambda x: -(x**2).sum(), 8),  # no dim=-1: one number for the whole batch
        (lambda x: -0.5 * x[0] ** 2 - 0.5 * x[1] ** 2, 8),  # indexes rows, not coordinates: shape (d,)
        (lambda x: -0.5 * x[0] ** 2 - 0.5 * x[1] ** 2, 2),  # ... which has the right shape when n = d
        (lambda x: -0.5 * (x - x.mean(0)).square().sum(-1), 4),  # mixes the points of a batch
    ],
    ids=["sum_without_dim", "row_indexing", "row_indexing_n_equals_d", "batch_mean"],
)
def test_a_log_density_that_does_not_treat_rows_alone_is_refused(log_prob, num_chains):
    """Each of these ran and sampled silently wrong before the check."""
    target = PosteriorPullback(zuko.flows.RealNVP(2), log_prob)
    with pytest.raises(
        ValueError,
        match=(
            r"log_prob (must return one value per point|gives the points of a batch"
            r"|fails on a batch of one)"
        ),
    ):
        ChainSampler(target, num_chains, seed=0)
    with pytest.raises(ValueError, match="x\\[..., i\\]"):
        init_state(target, get_preconditioner("identity"), torch.randn(num_chains, 2))


def test_a_log_density_that_treats_rows_alone_passes_the_check():
    target = PosteriorPullback(zuko.flows.RealNVP(2), lambda x: -0.5 * x[..., 0] ** 2 - 0.5 * x[..., 1] ** 2)
    assert ChainSampler(target, 8, seed=0).state.z.shape == (8, 2)
