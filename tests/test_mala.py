"""The step math: proposal densities against references in float64, detailed balance, NaN
handling, and invariance of an exact law with a negative control."""

import math

import pyro.ops.integrator
import pytest
import torch

from dense_reference import DenseJacobianPreconditioner, dense_log_accept_ratio
from invariance import (
    IdentityWithFlippedReverseDrift,
    JacobianWithoutReverseLadj,
    check_invariance,
)

from pyro_nfmala import PosteriorPullback, TemperedFlow, identity_flow
from pyro_nfmala.engine.errors import is_numerical_error
from pyro_nfmala.engine.langevin import IdentityPreconditioner, JacobianPreconditioner, get_preconditioner
from pyro_nfmala.engine.step import init_state, mala_step

EPS = torch.tensor(0.3, dtype=torch.float64)


@pytest.fixture
def target(latent_flow, mixture):
    return PosteriorPullback(latent_flow, mixture.log_prob)


def test_identity_proposal_density_is_torch_normal(target):
    precond = IdentityPreconditioner()
    state = init_state(target, precond, torch.randn(6, 2, dtype=torch.float64))
    noise = torch.randn(6, 2, dtype=torch.float64)
    z_new, log_q = precond.propose(target.flow, state, EPS, noise)
    normal = torch.distributions.Normal(state.z + EPS * state.grad, torch.sqrt(2 * EPS))
    assert torch.allclose(log_q, normal.log_prob(z_new).sum(-1), atol=1e-12)
    assert torch.allclose(
        precond.log_proposal_density(target.flow, init_state(target, precond, z_new), state, EPS),
        normal.log_prob(z_new).sum(-1),
        atol=1e-12,
    )
    other = torch.randn(6, 2, dtype=torch.float64)
    assert torch.allclose(
        precond.log_proposal_density(target.flow, init_state(target, precond, other), state, EPS),
        normal.log_prob(other).sum(-1),
        atol=1e-12,
    )


def test_matrix_free_jacobian_step_equals_dense_reference(target):
    free, dense = JacobianPreconditioner(), DenseJacobianPreconditioner()
    z = torch.randn(8, 2, dtype=torch.float64)
    state_free, state_dense = init_state(target, free, z), init_state(target, dense, z)
    noise = torch.randn(8, 2, dtype=torch.float64)
    z_free, log_q_free = free.propose(target.flow, state_free, EPS, noise)
    z_dense, log_q_dense = dense.propose(target.flow, state_dense, EPS, noise)
    # mean + noise (the proposal itself) and the forward log density
    assert torch.allclose(z_free, z_dense, atol=1e-8, rtol=0)
    assert torch.allclose(log_q_free, log_q_dense, atol=1e-8, rtol=0)
    # the mean alone (zero noise)
    zero = torch.zeros_like(noise)
    assert torch.allclose(
        free.propose(target.flow, state_free, EPS, zero)[0],
        dense.propose(target.flow, state_dense, EPS, zero)[0],
        atol=1e-8,
        rtol=0,
    )
    # the reverse log density, at the proposal and at arbitrary points
    new_free, new_dense = init_state(target, free, z_free), init_state(target, dense, z_free)
    back_free = free.log_proposal_density(target.flow, state_free, new_free, EPS)
    back_dense = dense.log_proposal_density(target.flow, state_dense, new_dense, EPS)
    assert torch.allclose(back_free, back_dense, atol=1e-8, rtol=0)
    other = torch.randn(8, 2, dtype=torch.float64)
    assert torch.allclose(
        free.log_proposal_density(target.flow, init_state(target, free, other), state_free, EPS),
        dense.log_proposal_density(target.flow, init_state(target, dense, other), state_dense, EPS),
        atol=1e-8,
        rtol=0,
    )


@pytest.mark.parametrize("name", ["identity", "jacobian", "dense_jacobian"])
def test_detailed_balance_on_random_pairs(target, name):
    r"""pi(z) q(z'|z) a(z, z') = pi(z') q(z|z') a(z', z), with every density as the sampler computes it.

    The forward density comes from ``propose`` (noise-based), the reverse from
    ``log_proposal_density``; the reverse move is then replayed through ``propose`` from z' with
    the noise that lands on z, so both code paths must agree for the identity to hold.
    """
    precond = DenseJacobianPreconditioner() if name == "dense_jacobian" else get_preconditioner(name)
    flow = target.flow
    state = init_state(target, precond, torch.randn(10, 2, dtype=torch.float64))
    z_new, log_q_forward = precond.propose(flow, state, EPS, torch.randn(10, 2, dtype=torch.float64))
    state_new = init_state(target, precond, z_new)

    # the noise that takes z' back to z: xi = A(z')^{1/2} (z - mu(z')) / sqrt(2 eps), A^{1/2} = J_f or I
    mean_new = precond.propose(flow, state_new, EPS, torch.zeros_like(z_new))[0]
    residual = state.z - mean_new
    if name != "identity":
        residual = flow.jvp_to_data(state_new.z, residual)
    back, log_q_backward = precond.propose(flow, state_new, EPS, residual / torch.sqrt(2 * EPS))
    assert torch.allclose(back, state.z, atol=1e-8)
    assert torch.allclose(
        log_q_backward, precond.log_proposal_density(flow, state, state_new, EPS), atol=1e-8
    )


@pytest.mark.parametrize(
    "name, broken",
    [("identity", IdentityWithFlippedReverseDrift()), ("jacobian", JacobianWithoutReverseLadj())],
)
def test_acceptance_ratio_matches_an_independent_dense_computation(target, name, broken):
    """On fixed noise, the step's log acceptance ratio equals the dense one; a wrong reverse
    density does not."""
    z = 0.7 * torch.randn(6, 2, dtype=torch.float64)
    step_size = 0.3
    noise = torch.randn(
        z.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64
    )  # the step's first draw
    expected = dense_log_accept_ratio(target, name, z, step_size, noise)
    precond = get_preconditioner(name)
    info = mala_step(
        init_state(target, precond, z),
        target,
        precond,
        step_size,
        generator=torch.Generator().manual_seed(11),
    )[1]
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(info.log_accept_ratio, expected, atol=1e-8, rtol=1e-8)
    wrong = mala_step(
        init_state(target, broken, z), target, broken, step_size, generator=torch.Generator().manual_seed(11)
    )[1]
    assert (wrong.log_accept_ratio - expected).abs().max() > 1e-3  # the comparison can fail


def test_non_finite_proposals_are_rejected_and_counted(latent_flow):
    def log_prob(x):  # NaN on half of the plane
        return torch.where(
            x[..., 0] > 0.0, torch.full_like(x[..., 0], float("nan")), -0.5 * x.square().sum(-1)
        )

    target = PosteriorPullback(latent_flow, log_prob)
    for precond in (IdentityPreconditioner(), JacobianPreconditioner()):
        z0 = latent_flow.to_latent(-torch.rand(200, 2, dtype=torch.float64) - 0.1)
        state = init_state(target, precond, z0)
        diverging = 0
        for _ in range(5):
            state, info = mala_step(state, target, precond, 0.5)
            diverging += int(info.diverging.sum())
            assert torch.all(info.accept_prob[info.diverging] == 0)
            assert not torch.any(info.accepted & info.diverging)
        assert diverging > 0
        for field in (state.z, state.x, state.log_density, state.grad):
            assert torch.isfinite(field).all()
        assert torch.all(state.x[:, 0] <= 0)


def test_a_proposal_whose_evaluation_raises_a_registered_error_is_rejected(latent_flow, out_of_domain):
    def log_prob(x):
        if torch.any(x[..., 0] > 0):
            raise out_of_domain("out of support")
        return -0.5 * x.square().sum(-1)

    target = PosteriorPullback(latent_flow, log_prob)
    state = init_state(
        target,
        IdentityPreconditioner(),
        latent_flow.to_latent(torch.tensor([-0.05, 0.0], dtype=torch.float64)),
    )
    outcomes = [mala_step(state, target, IdentityPreconditioner(), 2.0)[1] for _ in range(20)]
    assert any(bool(info.diverging) for info in outcomes)
    assert all(float(info.accept_prob) == 0 and len(info.errors) == 1 for info in outcomes if info.diverging)
    assert all(not info.errors for info in outcomes if not info.diverging)


def _cpu_out_of_memory() -> RuntimeError:
    """The error torch's CPU allocator really raises (a plain RuntimeError, not OutOfMemoryError)."""
    try:
        torch.empty(2**50)
    except RuntimeError as error:
        return error
    raise AssertionError("allocating 8 PiB succeeded")


OUT_OF_MEMORY = (MemoryError, torch.OutOfMemoryError)


@pytest.mark.parametrize(
    "error",
    [
        ValueError("a model's own check"),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
        torch.OutOfMemoryError("CUDA out of memory"),
        MemoryError(),
        _cpu_out_of_memory(),
    ],
    ids=["value_error", "shape_error", "cuda_out_of_memory", "memory_error", "cpu_out_of_memory"],
)
def test_errors_that_are_not_registered_numerical_failures_propagate(latent_flow, out_of_domain, error):
    """Only what Pyro's exception handlers accept becomes a divergence; anything else stops the run,
    and running out of memory (Python's MemoryError, CUDA's, the CPU allocator's RuntimeError) stops
    it even when a handler claims every error."""
    armed = []

    def log_prob(x):
        if armed:
            raise error
        return -0.5 * x.square().sum(-1)

    out_of_memory = isinstance(error, OUT_OF_MEMORY) or "can't allocate memory" in str(error)
    pyro.ops.integrator.register_exception_handler(
        "pyro_nfmala_tests_everything", lambda e: True, warn_on_overwrite=False
    )
    try:
        target = PosteriorPullback(latent_flow, log_prob)
        state = init_state(target, IdentityPreconditioner(), torch.zeros(4, 2, dtype=torch.float64))
        armed.append(True)
        if out_of_memory:  # never a divergence, whatever the handlers say
            assert not is_numerical_error(error)
            with pytest.raises(type(error)):
                mala_step(state, target, IdentityPreconditioner(), 0.1)
        else:  # the negative control: the same error is a divergence when a handler claims it
            assert is_numerical_error(error)
    finally:
        pyro.ops.integrator.register_exception_handler(
            "pyro_nfmala_tests_everything", lambda e: False, warn_on_overwrite=False
        )
    if not out_of_memory:
        with pytest.raises(type(error)) as raised:
            mala_step(state, target, IdentityPreconditioner(), 0.1)
        assert any("register_exception_handler" in note for note in getattr(raised.value, "__notes__", []))


def test_a_failing_batch_is_bisected_to_the_failing_chains(latent_flow, out_of_domain):
    """One failing chain among 64 costs a bounded number of extra evaluations, not one per chain."""
    sizes = []

    def log_prob(x):
        sizes.append(len(x))
        if bool((x[..., 0] > 10.0).any()):
            raise out_of_domain("too far right")
        return -0.5 * x.square().sum(-1)

    target = PosteriorPullback(identity_flow(2).double(), log_prob)
    state = init_state(target, IdentityPreconditioner(), torch.zeros(64, 2, dtype=torch.float64))
    # a drift of 20 for chain 17 only: its proposal lands near x = 20 (noise sd 0.63), the others near 0
    pushed = state._replace(grad=torch.zeros_like(state.grad).index_fill_(0, torch.tensor([17]), 100.0))
    sizes.clear()
    _, info = mala_step(
        pushed, target, IdentityPreconditioner(), 0.2, generator=torch.Generator().manual_seed(0)
    )
    assert info.diverging.nonzero().flatten().tolist() == [17] and len(info.errors) >= 1
    # bisection: the batch, then two halves per level down to the failing chain: 1 + 2 log2(64) evaluations
    assert len(sizes) <= 1 + 2 * math.ceil(math.log2(64))


# ----------------------------------------------------------------------------------------------
# Invariance (see tests/invariance.py): exact samples stay exact, and a wrong accept ratio is caught.


@pytest.mark.statistical
@pytest.mark.parametrize(
    "correct, broken",
    [
        (IdentityPreconditioner, IdentityWithFlippedReverseDrift),
        (JacobianPreconditioner, JacobianWithoutReverseLadj),
    ],
)
def test_exact_law_is_invariant_and_a_wrong_accept_ratio_is_caught(
    latent_flow, mixture, reference_statistics, correct, broken
):
    target = PosteriorPullback(latent_flow, mixture.log_prob)
    check_invariance(target, correct(), broken(), mixture, reference_statistics)


def test_tempered_target_formula(latent_flow):
    z = torch.randn(5, 2, dtype=torch.float64)
    x, ladj = latent_flow.to_data(z)
    base = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    for beta in (0.0, 0.5, 1.0):
        log_pi, x_t, _ = TemperedFlow(latent_flow, beta).log_density(z)
        assert torch.allclose(log_pi, base - beta * ladj)
        assert torch.allclose(x_t, x)
    with pytest.raises(ValueError, match="beta"):
        TemperedFlow(latent_flow, -0.1)


def test_pullback_target_formula(latent_flow, mixture):
    z = torch.randn(5, 2, dtype=torch.float64)
    x, ladj = latent_flow.to_data(z)
    assert torch.allclose(
        PosteriorPullback(latent_flow, mixture.log_prob).log_density(z)[0], mixture.log_prob(x) + ladj
    )


def test_step_works_on_a_single_chain(target):
    state = init_state(target, JacobianPreconditioner(), torch.zeros(2, dtype=torch.float64))
    new_state, info = mala_step(state, target, JacobianPreconditioner(), 0.1)
    assert new_state.z.shape == (2,) and info.accept_prob.shape == ()
    assert math.isfinite(float(new_state.log_density))
