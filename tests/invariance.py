"""Helpers for invariance tests: exact samples stay exact.

Each particle runs its own chain from an exact draw, so after any number of steps the particles
are iid from the target if and only if the kernel leaves it invariant: every statistic's standard
error is exact, with an effective sample size of N. We compare seven test functions to fresh exact
draws by two-sample z-scores; a kernel with a deliberately wrong accept ratio must fail the same
comparison.
"""

import torch

from pyro_nfmala.engine.adaptation import find_reasonable_step_size
from pyro_nfmala.engine.langevin import (
    DataSpacePreconditioner,
    IdentityPreconditioner,
    JacobianPreconditioner,
)
from pyro_nfmala.engine.step import advance, init_state

NUM_PARTICLES = 5000  # particles, each an independent chain
NUM_STEPS = 10


def exact_latents(flow, mixture, n):
    with torch.no_grad():
        return flow.to_latent(mixture.sample((n,)))


def statistics(z, x):
    """Test functions: mode indicator, coordinates and squared norms in both spaces."""
    return torch.stack(
        [(x[:, 0] > 0).double(), x[:, 0], x[:, 1], z[:, 0], z[:, 1], z.square().sum(-1), x.square().sum(-1)],
        -1,
    )


def max_abs_z_score(particles, reference):
    diff = particles.mean(0) - reference.mean(0)
    se = (particles.var(0) / len(particles) + reference.var(0) / len(reference)).sqrt()
    return float((diff / se).abs().max())


class JacobianWithoutReverseLadj(JacobianPreconditioner):
    """Negative control: forgets the log-determinant term of the reverse proposal density."""

    def log_proposal_density(self, flow, state_to, state_from, step_size):
        return super().log_proposal_density(flow, state_to, state_from, step_size) - state_from.ladj


class IdentityWithFlippedReverseDrift(IdentityPreconditioner):
    """Negative control: a sign error in the reverse density's drift, mu(z') = z' - eps g(z')."""

    def log_proposal_density(self, flow, state_to, state_from, step_size):
        flipped = state_from._replace(grad=-state_from.grad)
        return super().log_proposal_density(flow, state_to, flipped, step_size)


def run_particles(target, move, step_size, mixture, seed=2):
    """``NUM_STEPS`` steps of ``move`` (a Langevin or a trajectory move) from ``NUM_PARTICLES`` exact
    draws; the last states and the mean acceptance probability."""
    torch.manual_seed(seed)
    state = init_state(target, move, exact_latents(target.flow, mixture, NUM_PARTICLES))
    accept = []
    for _ in range(NUM_STEPS):
        state, info = advance(state, target, move, step_size)
        accept.append(float(info.accept_prob.mean()))
    return state, sum(accept) / len(accept)


class DataSpaceWithoutReverseLadj(DataSpacePreconditioner):
    """Negative control: reads the reverse data-space density as a latent one, forgetting ladj(z)."""

    def log_proposal_density(self, flow, state_to, state_from, step_size):
        return super().log_proposal_density(flow, state_to, state_from, step_size) - state_to.ladj


def check_invariance(target, correct, broken, mixture, reference):
    """Exact draws stay exact under ``correct`` (which really moves them), and not under ``broken``,
    at a step size found for ``correct``."""
    torch.manual_seed(0)
    probe = init_state(target, correct, exact_latents(target.flow, mixture, 256))
    step_size = float(find_reasonable_step_size(probe, target, correct).median())
    state, accept_rate = run_particles(target, correct, step_size, mixture)
    assert 0.2 < accept_rate < 0.95  # the chains really move
    assert max_abs_z_score(statistics(state.z, state.x), reference) < 4.5
    state, _ = run_particles(target, broken, step_size, mixture)
    assert max_abs_z_score(statistics(state.z, state.x), reference) > 6.0
