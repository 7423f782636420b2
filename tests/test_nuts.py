"""The No-U-Turn move: exact draws stay exact under it (multinomial weights without the kinetic energy are
caught), its trajectories double to the U-turn, divergences are rejected and counted, and the samplers
run it by name."""

import math

import pyro
import pytest
import torch

from invariance import max_abs_z_score, run_particles, statistics

from pyro_nfmala import ChainSampler, PosteriorPullback, identity_flow
from pyro_nfmala.engine.hamiltonian import HamiltonianMove
from pyro_nfmala.engine.langevin import ConstantMetric
from pyro_nfmala.engine.nuts import NoUTurnMove
from pyro_nfmala.engine.options import SamplerOptions
from pyro_nfmala.engine.step import advance, init_state


class _WithoutKineticEnergy(ConstantMetric):
    def kinetic_energy(self, p):
        return torch.zeros(p.shape[:-1], dtype=p.dtype)


class NoUTurnWithoutKineticEnergy(NoUTurnMove):
    """Negative control: weighs the trajectory's states by the potential alone, forgetting the kinetic
    energy of their momenta."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.metric = _WithoutKineticEnergy(self.metric.inverse_mass)


@pytest.mark.statistical
def test_exact_law_is_invariant_and_weights_without_the_kinetic_energy_are_caught(
    latent_flow, mixture, reference_statistics
):
    """5,000 exact draws of a two-component mixture through a trained spline flow, 10 NUTS steps (trees
    up to depth 4: any depth is exact)."""
    target = PosteriorPullback(latent_flow, mixture.log_prob)
    move = NoUTurnMove(torch.full((2,), 0.8, dtype=torch.float64), max_tree_depth=4)
    state, accept_rate = run_particles(target, move, 0.3, mixture)
    assert 0.5 < accept_rate < 0.99  # the chains really move, along trajectories of several steps
    assert max_abs_z_score(statistics(state.z, state.x), reference_statistics) < 4.5
    broken = NoUTurnWithoutKineticEnergy(move.inverse_mass, max_tree_depth=4)
    state, _ = run_particles(target, broken, 0.3, mixture)
    assert max_abs_z_score(statistics(state.z, state.x), reference_statistics) > 6.0


def test_trajectories_double_until_they_turn_back():
    """On N(0, 1) with a small step, a trajectory turns back after about half a period (pi / 2 to pi in
    time): its length is a power of two near that, not the depth limit; with a depth limit of 2, at most
    3 steps."""
    target = PosteriorPullback(identity_flow(1).double(), lambda x: -0.5 * x.square().sum(-1))
    state = init_state(target, NoUTurnMove(), torch.zeros(512, 1, dtype=torch.float64))
    _, info = advance(state, target, NoUTurnMove(), 0.05, generator=torch.Generator().manual_seed(0))
    assert 31 <= info.trajectory.num_steps <= 127  # steps of the deepest chain: 2^k - 1, a time of 1.6-6.4
    assert bool((info.accept_prob > 0.99).all()) and bool(info.accepted.float().mean() > 0.9)
    _, short = advance(state, target, NoUTurnMove(max_tree_depth=2), 0.05)
    assert short.trajectory.num_steps == 3


def test_a_trajectory_into_a_nan_region_is_rejected_and_counted():
    def with_a_hole(x):
        value = -0.5 * x.square().sum(-1)
        return torch.where(x[..., 0] > 1.0, torch.full_like(value, float("nan")), value)

    target = PosteriorPullback(identity_flow(2).double(), with_a_hole)
    move = NoUTurnMove()
    state = init_state(target, move, torch.zeros(256, 2, dtype=torch.float64))
    diverged = 0
    for _ in range(20):
        state, info = advance(state, target, move, 0.5)
        diverged += int(info.diverging.sum())
    assert diverged > 0 and bool((state.x[:, 0] <= 1.0).all()) and bool(torch.isfinite(state.z).all())


def test_the_samplers_run_nuts_by_name_and_its_draws_are_right():
    """A Gaussian with scales 0.3 to 3 and no mass matrix, four chains: NUTS's trajectories follow the
    widest scale (several steps of the narrowest's), and the sds are right within their ESS."""
    options = SamplerOptions(local_move="nuts")
    assert isinstance(options.move, NoUTurnMove) and options.mass_matrix == "diagonal"
    assert options.accept_target == 0.8
    assert isinstance(options.move.one_step(), HamiltonianMove)
    with pytest.raises(ValueError, match="local_move='nuts' moves with the latent mass matrix"):
        SamplerOptions(local_move="nuts", preconditioner="jacobian")
    scales = torch.logspace(-0.5, 0.5, 4, dtype=torch.float64)
    target = PosteriorPullback(identity_flow(4).double(), lambda x: -0.5 * (x / scales).square().sum(-1))
    sampler = ChainSampler(target, 4, local_move="nuts", mass_matrix=None, seed=0)
    idata = sampler.run(250, 150, progress=False)
    x = torch.as_tensor(idata.posterior["x"].values)
    ess = float(pyro.ops.stats.effective_sample_size(x).min())
    assert ess > 100
    sd_error = (x.reshape(-1, 4).std(0) / scales - 1).abs().max()
    assert float(sd_error) < 4.5 * math.sqrt(0.5 / ess) + 0.02
    assert float(idata.sample_stats["n_steps"].mean()) > 3  # MALA-like one-step moves would not do
