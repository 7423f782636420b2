"""The Hamiltonian move: exact draws stay exact under it (a ratio without the kinetic energy is caught),
one leapfrog step is MALA, divergences are rejected and counted, the trajectory length adapts, and the
samplers choose it where the map is not serviceable."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from invariance import max_abs_z_score, run_particles, statistics

from pyro_nfmala import ChainSampler, PosteriorPullback, identity_flow
from pyro_nfmala.engine.hamiltonian import HamiltonianMove
from pyro_nfmala.engine.langevin import ConstantMetric, IdentityPreconditioner
from pyro_nfmala.engine.options import SamplerOptions
from pyro_nfmala.engine.step import advance, init_state, metropolis_hastings_step


class _WithoutKineticEnergy(ConstantMetric):
    def kinetic_energy(self, p):
        return torch.zeros(p.shape[:-1], dtype=p.dtype)


class HamiltonianWithoutKineticEnergy(HamiltonianMove):
    """Negative control: accepts on the potential alone, forgetting the momenta's kinetic energy."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.metric = _WithoutKineticEnergy(self.metric.inverse_mass)


@pytest.mark.statistical
def test_exact_law_is_invariant_and_a_ratio_without_the_kinetic_energy_is_caught(
    latent_flow, mixture, reference_statistics
):
    target = PosteriorPullback(latent_flow, mixture.log_prob)
    move = HamiltonianMove(torch.full((2,), 0.8, dtype=torch.float64), trajectory_length=1.2)
    state, accept_rate = run_particles(target, move, 0.3, mixture)
    assert 0.4 < accept_rate < 0.99  # the chains really move, several leapfrog steps each
    assert max_abs_z_score(statistics(state.z, state.x), reference_statistics) < 4.5
    broken = HamiltonianWithoutKineticEnergy(move.inverse_mass, trajectory_length=1.2)
    state, _ = run_particles(target, broken, 0.3, mixture)
    assert max_abs_z_score(statistics(state.z, state.x), reference_statistics) > 6.0


def test_one_leapfrog_step_is_mala_with_half_the_squared_step():
    """The same noise: the same proposal, and the same log acceptance ratio to 1e-10 (float64)."""
    target = PosteriorPullback(
        identity_flow(3).double(), lambda x: -0.5 * (x**2 * torch.arange(1.0, 4.0)).sum(-1)
    )
    start = torch.randn(32, 3, dtype=torch.float64)
    eps = 0.4
    hmc_state = init_state(target, HamiltonianMove(), start)
    _, hmc = advance(hmc_state, target, HamiltonianMove(), eps, generator=torch.Generator().manual_seed(1))
    mala_state = init_state(target, IdentityPreconditioner(), start)
    _, mala = metropolis_hastings_step(
        mala_state, target, IdentityPreconditioner(), eps**2 / 2, generator=torch.Generator().manual_seed(1)
    )
    assert hmc.trajectory.num_steps == 1
    torch.testing.assert_close(hmc.log_accept_ratio, mala.log_accept_ratio, rtol=1e-10, atol=1e-10)


def test_a_trajectory_into_a_nan_region_is_rejected_and_counted():
    def with_a_hole(x):
        value = -0.5 * x.square().sum(-1)
        return torch.where(x[..., 0] > 1.0, torch.full_like(value, float("nan")), value)

    target = PosteriorPullback(identity_flow(2).double(), with_a_hole)
    move = HamiltonianMove(trajectory_length=3.0)
    state = init_state(target, move, torch.zeros(256, 2, dtype=torch.float64))
    diverged = 0
    for _ in range(20):
        state, info = advance(state, target, move, 0.5)
        diverged += int(info.diverging.sum())
        assert bool((info.accept_prob[info.diverging] == 0).all())
    assert diverged > 0 and bool((state.x[:, 0] <= 1.0).all()) and bool(torch.isfinite(state.z).all())


def test_the_trajectory_length_adapts_to_the_scale_and_the_draws_are_right():
    """A Gaussian with scales 0.1 to 10 and no mass matrix, four chains: MALA's one step is bound by the
    narrowest scale; HMC's trajectories run to their U-turns in warmup, whose times (about half the
    widest scale's period) it draws its lengths from, and its draws have the right sds. (Adapted by ChEES
    across four chains, the length stayed near 1.7 where NUTS's trajectories ran 4.4: ESS 8 on the
    sparse logistic regression.)"""
    scales = torch.logspace(-1, 1, 6, dtype=torch.float64)
    target = PosteriorPullback(identity_flow(6).double(), lambda x: -0.5 * (x / scales).square().sum(-1))
    sampler = ChainSampler(target, 4, local_move="hmc", mass_matrix=None, seed=0)
    idata = sampler.run(1000, 300, progress=False)
    lengths = sampler.preconditioner.trajectory_lengths
    assert lengths is not None and len(lengths) >= 100
    assert 5.0 < float(lengths.median()) < 40.0, lengths.median()  # widest scale 10: half a period 31
    x = torch.as_tensor(idata.posterior["x"].values).reshape(-1, 6)
    ess = float(pyro.ops.stats.effective_sample_size(torch.as_tensor(idata.posterior["x"].values)).min())
    assert ess > 500  # MALA: about 70
    assert float((x.std(0) / scales - 1).abs().max()) < 4.5 * math.sqrt(0.5 / ess) + 0.02
    assert "n_steps" in idata.sample_stats and float(idata.sample_stats["n_steps"].max()) >= 2


def hierarchical(y):
    """A funnel the Laplace map cannot serve (no positive definite Hessian at the mode)."""
    log_tau = pyro.sample("log_tau", dist.Normal(0.0, 1.5))
    with pyro.plate("groups", len(y)):
        theta = pyro.sample("theta", dist.Normal(0.0, log_tau.exp().unsqueeze(-1)))
        pyro.sample("y", dist.Normal(theta, 3.0), obs=y)


def test_the_local_move_is_hmc_where_the_map_is_not_serviceable_and_mala_where_it_is():
    options = SamplerOptions(local_move="hmc")
    assert isinstance(options.move, HamiltonianMove) and options.mass_matrix == "diagonal"
    assert options.accept_target == 0.8 and SamplerOptions().accept_target == 0.574
    with pytest.raises(ValueError, match="local_move"):
        SamplerOptions(local_move="nut")
    with pytest.raises(ValueError, match="jacobian"):
        SamplerOptions(local_move="hmc", preconditioner="jacobian")
    sampler = ChainSampler.from_model(
        hierarchical,
        torch.tensor([1.0, -2.0, 0.5, 3.0]),
        num_chains=4,
        seed=0,
        parameterization="centred",
        fit_options={"progress": False, "flow_stage": "none"},
    )
    assert not sampler.flow_check.serviceable and isinstance(sampler.preconditioner, HamiltonianMove)

    def gaussian(y):
        loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(loc, 1.0), obs=y)

    plain = ChainSampler.from_model(
        gaussian, torch.ones(10), num_chains=4, seed=0, fit_options={"progress": False}
    )
    assert plain.flow_check.serviceable and not isinstance(plain.preconditioner, HamiltonianMove)
