"""Direct unit tests of ``pyro_nfmala/adaptation.py``, each on a known answer or an exact reference.

- ``StepSizeAdapter``: dual averaging drives synthetic acceptance curves (``exp(-eps / c)`` and a
  logistic in ``log eps``, whose root ``eps*`` of ``accept_prob(eps*) = 0.574`` is known in closed
  form) to ``eps*``; per-chain tensors adapt elementwise; with seeded noisy acceptances the averaged
  ``final()`` is right where the last iterate is not; ``final()`` before any update is the initial
  step size; NaN acceptance probabilities count as 0.
- ``adaptation_windows``: for every ``num_steps`` in 0..2000, the exact invariants of the schedule
  (none below 150; contiguous windows from 75 to ``num_steps - 51``; sizes 25, 50, 100, ... and a
  last window that absorbs the rest, between one and three times its planned size).
- ``BatchWelfordCovariance``: uneven batches equal Pyro's ``WelfordCovariance`` fed row by row
  (diagonal and dense, regularized or not, to 1e-10), also after ``reset()``.
- ``find_reasonable_step_size``: on a standard normal with the identity flow, each chain's step size
  is a power-of-two multiple of the start, accepts its proposal with probability above 0.5, and
  twice it accepts the same proposal noise with probability at most 0.5 (doubling stops before
  the crossing, halving at it).
"""

import math

import pytest
import torch

from pyro.ops.welford import WelfordCovariance

from pyro_nfmala import PosteriorPullback, identity_flow
from pyro_nfmala.engine.adaptation import (
    FINAL_BUFFER,
    FIRST_WINDOW,
    INITIAL_BUFFER,
    BatchWelfordCovariance,
    StepSizeAdapter,
    adaptation_windows,
    find_reasonable_step_size,
)
from pyro_nfmala.engine.langevin import IdentityPreconditioner
from pyro_nfmala.engine.step import init_state, mala_step

TARGET = 0.574
DTYPE = torch.float64


def run_adapter(adapter: StepSizeAdapter, accept_prob, num_updates: int) -> torch.Tensor:
    """Feeds ``accept_prob(eps)`` of each step size the adapter proposes; returns ``final()``."""
    eps = adapter.final()
    for _ in range(num_updates):
        eps = adapter.update(accept_prob(eps))
    return adapter.final()


# ---------------------------------------------------------------- StepSizeAdapter


@pytest.mark.parametrize("c", [0.5, 2.0, 20.0])
def test_dual_averaging_finds_the_root_of_an_exponential_acceptance_curve(c):
    eps_star = -c * math.log(TARGET)  # exp(-eps* / c) = 0.574
    final = run_adapter(StepSizeAdapter(0.1, TARGET), lambda eps: torch.exp(-eps / c), 500)
    # Deterministic; after 500 updates the pull towards the prox centre leaves under 1% here.
    assert abs(float(final) / eps_star - 1) < 0.03


@pytest.mark.parametrize("eps_star", [0.1, 1.0])
def test_dual_averaging_finds_the_root_of_a_logistic_in_log_step_size(eps_star):
    logit = math.log(TARGET / (1 - TARGET))

    def accept_prob(eps):
        return torch.sigmoid(logit - 2.0 * torch.log(eps / eps_star))

    assert float(accept_prob(torch.tensor(eps_star, dtype=DTYPE))) == pytest.approx(TARGET)
    final = run_adapter(StepSizeAdapter(0.01, TARGET), accept_prob, 500)
    assert abs(float(final) / eps_star - 1) < 0.03


def test_the_target_accept_prob_is_the_one_aimed_at():
    c = 2.0
    for target in (0.3, 0.8):
        final = run_adapter(StepSizeAdapter(0.1, target), lambda eps: torch.exp(-eps / c), 500)
        assert abs(float(final) / (-c * math.log(target)) - 1) < 0.03


def test_per_chain_step_sizes_adapt_elementwise():
    c = torch.tensor([0.5, 2.0], dtype=DTYPE)
    eps_star = -c * math.log(TARGET)
    final = run_adapter(
        StepSizeAdapter(torch.tensor([0.1, 0.1], dtype=DTYPE), TARGET), lambda eps: torch.exp(-eps / c), 500
    )
    assert final.shape == (2,)
    assert (final / eps_star - 1).abs().max() < 0.03
    # Each chain is what it would be alone.
    for i in range(2):
        alone = run_adapter(StepSizeAdapter(0.1, TARGET), lambda eps, i=i: torch.exp(-eps / c[i]), 500)
        assert torch.equal(final[i], alone)


def test_with_noisy_acceptances_the_averaged_step_size_is_right_and_the_last_iterate_is_not():
    # 16 chains, 8 per curve, each with its own seeded noise of standard deviation 0.1.
    c = torch.tensor([0.5, 2.0], dtype=DTYPE).repeat(8)
    eps_star = -c * math.log(TARGET)
    generator = torch.Generator().manual_seed(0)
    adapter = StepSizeAdapter(torch.full((16,), 0.1, dtype=DTYPE), TARGET)
    eps = adapter.final()
    for _ in range(500):
        noise = 0.1 * torch.randn(16, generator=generator, dtype=DTYPE)
        eps = adapter.update((torch.exp(-eps / c) + noise).clamp(0, 1))
    # Seeded, so deterministic. The worst of the 16 averaged step sizes is 5.0% off here (2.7% to 5.7%
    # over seeds 0-9); the worst last iterate, which carries the noise of the last few updates, 35%
    # (19% to 45% over seeds 0-9).
    assert (adapter.final() / eps_star - 1).abs().max() < 0.06
    assert (eps / eps_star - 1).abs().max() > 0.1


@pytest.mark.parametrize("step_size", [0.3, torch.tensor([0.3, 2.5], dtype=DTYPE)])
def test_final_before_any_update_is_the_initial_step_size(step_size):
    final = StepSizeAdapter(step_size, TARGET).final()
    assert torch.allclose(final, torch.as_tensor(step_size, dtype=DTYPE), rtol=1e-12, atol=0)


def test_nan_accept_probs_count_as_zero_and_shrink_the_step_size():
    nan, zero = StepSizeAdapter(torch.tensor([0.3, 0.3], dtype=DTYPE), TARGET), StepSizeAdapter(0.3, TARGET)
    steps, zero_steps = [], []
    for _ in range(10):
        steps.append(nan.update(torch.tensor([float("nan"), 0.9], dtype=DTYPE)))
        zero_steps.append(zero.update(0.0))
    steps, zero_steps = torch.stack(steps), torch.stack(zero_steps)
    assert torch.isfinite(steps).all() and torch.isfinite(nan.final()).all()
    assert torch.equal(steps[:, 0], zero_steps)
    assert torch.equal(nan.final()[0], zero.final())
    # Acceptance 0 drives the step size down (below the start, after the first few updates that the
    # prox centre at 10x the start pulls up); acceptance 0.9 drives the other chain up.
    assert steps[-1, 0] < 0.3 and nan.final()[0] < 0.3
    assert steps[-1, 1] > 0.3
    # A plain float NaN too.
    scalar = StepSizeAdapter(0.3, TARGET)
    assert torch.equal(scalar.update(float("nan")), StepSizeAdapter(0.3, TARGET).update(0.0))


# ---------------------------------------------------------------- adaptation_windows


def test_the_buffers_are_stans():
    assert (INITIAL_BUFFER, FIRST_WINDOW, FINAL_BUFFER) == (75, 25, 50)


@pytest.mark.parametrize(
    ("num_steps", "expected"),
    [
        (149, []),
        (150, [(75, 99)]),
        (199, [(75, 148)]),
        (200, [(75, 99), (100, 149)]),
        (500, [(75, 99), (100, 149), (150, 249), (250, 449)]),
    ],
)
def test_windows_at_the_boundaries(num_steps, expected):
    assert adaptation_windows(num_steps) == expected


def test_window_invariants_for_every_number_of_steps_up_to_2000():
    for num_steps in range(2001):
        windows = adaptation_windows(num_steps)
        if num_steps < INITIAL_BUFFER + FIRST_WINDOW + FINAL_BUFFER:
            assert windows == [], num_steps
            continue
        assert windows, num_steps
        assert all(0 <= first <= last < num_steps for first, last in windows), num_steps
        assert windows[0][0] == INITIAL_BUFFER, num_steps
        assert windows[-1][1] == num_steps - FINAL_BUFFER - 1, num_steps
        # Contiguous, so non-overlapping.
        for (_, last), (first, _) in zip(windows, windows[1:]):
            assert first == last + 1, num_steps
        # Sizes 25, 50, 100, ...: each doubles the one before, except the last, which stretches to
        # the final buffer: at least its planned size 25 * 2^k (so at least twice the one before), and
        # under 3 times it (otherwise it would be split into its planned size and a following window
        # of at least double size). Together these fix the schedule for each num_steps.
        sizes = [last - first + 1 for first, last in windows]
        k = len(sizes) - 1
        assert sizes[:k] == [FIRST_WINDOW * 2**i for i in range(k)], num_steps
        assert FIRST_WINDOW * 2**k <= sizes[k] < 3 * FIRST_WINDOW * 2**k, num_steps


# ---------------------------------------------------------------- BatchWelfordCovariance


def pyro_welford(rows: torch.Tensor, diagonal: bool) -> WelfordCovariance:
    welford = WelfordCovariance(diagonal=diagonal)
    for row in rows:
        welford.update(row)
    return welford


def assert_same_covariances(batch: WelfordCovariance, rowwise: WelfordCovariance) -> None:
    assert batch.n_samples == rowwise.n_samples
    for regularize in (False, True):
        torch.testing.assert_close(
            batch.get_covariance(regularize=regularize),
            rowwise.get_covariance(regularize=regularize),
            rtol=1e-10,
            atol=1e-10,
        )


def draws(n: int, seed: int) -> torch.Tensor:
    """Correlated float64 draws with a mean far from 0 and scales from 0.1 to 10."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.tensor([0.1, 1.0, 3.0, 10.0], dtype=DTYPE)
    mixing = torch.randn(4, 4, generator=generator, dtype=DTYPE) * scales
    return 5.0 + torch.randn(n, 4, generator=generator, dtype=DTYPE) @ mixing


BATCH_SIZES = [1, 7, 1, 3, 20, 2, 1]


@pytest.mark.parametrize("diagonal", [True, False])
def test_batches_of_uneven_sizes_equal_pyros_welford_row_by_row(diagonal):
    rows = draws(sum(BATCH_SIZES), seed=1)
    welford = BatchWelfordCovariance(diagonal=diagonal)
    for batch in torch.split(rows, BATCH_SIZES):
        welford.update_batch(batch)
        n = welford.n_samples
        if n >= 2:
            assert_same_covariances(welford, pyro_welford(rows[:n], diagonal))
    expected_shape = (4,) if diagonal else (4, 4)
    assert welford.get_covariance().shape == expected_shape
    # Against the textbook estimate too.
    reference = torch.cov(rows.T)
    torch.testing.assert_close(
        welford.get_covariance(regularize=False),
        reference.diagonal() if diagonal else reference,
        rtol=1e-10,
        atol=1e-10,
    )


@pytest.mark.parametrize("diagonal", [True, False])
def test_a_batch_with_leading_chain_dimensions_is_its_rows(diagonal):
    rows = draws(12, seed=2)
    welford = BatchWelfordCovariance(diagonal=diagonal)
    welford.update_batch(rows[:2])
    welford.update_batch(rows[2:].reshape(2, 5, 4))
    assert_same_covariances(welford, pyro_welford(rows, diagonal))


@pytest.mark.parametrize("diagonal", [True, False])
def test_reset_then_feeding_again_is_a_fresh_estimate(diagonal):
    welford = BatchWelfordCovariance(diagonal=diagonal)
    for batch in torch.split(draws(30, seed=3), [10, 1, 19]):
        welford.update_batch(batch)
    welford.reset()
    assert welford.n_samples == 0
    with pytest.raises(RuntimeError, match="Insufficient samples"):
        welford.get_covariance()
    rows = draws(25, seed=4) * 0.01  # other draws, at another scale
    for batch in torch.split(rows, [1, 4, 1, 19]):
        welford.update_batch(batch)
    assert_same_covariances(welford, pyro_welford(rows, diagonal))


# ---------------------------------------------------------------- find_reasonable_step_size


def standard_normal_setup(num_chains: int = 16, dim: int = 3):
    target = PosteriorPullback(identity_flow(dim).double(), lambda x: -0.5 * x.square().sum(-1))
    precond = IdentityPreconditioner()
    state = init_state(target, precond, torch.randn(num_chains, dim, dtype=DTYPE))
    return target, precond, state


def one_proposal_accept_prob(state, target, precond, eps, seed):
    """The acceptance probability of each chain's proposal at ``eps``, with the noise of ``seed``."""
    local = torch.Generator().manual_seed(seed)
    return mala_step(state, target, precond, eps, generator=local)[1].accept_prob


@pytest.mark.parametrize(
    ("start", "direction"),
    [(1e-3, "up"), (1.0, "either"), (30.0, "down")],
)
def test_reasonable_step_size_is_a_power_of_two_on_the_right_side_of_one_half(start, direction):
    target, precond, state = standard_normal_setup()
    # The function draws one seed from the generator: the same seed gives the noise of every trial.
    seed = int(torch.randint(2**62, (), generator=torch.Generator().manual_seed(7)))
    eps = find_reasonable_step_size(state, target, precond, start, generator=torch.Generator().manual_seed(7))
    assert eps.shape == (16,) and eps.dtype == DTYPE
    doublings = torch.log2(eps / start)
    assert torch.allclose(doublings, doublings.round(), rtol=0, atol=1e-9)
    if direction == "up":
        assert (doublings >= 1).all()  # acceptance near 1 at 1e-3: doubled at least once
    elif direction == "down":
        assert (doublings <= -1).all()  # acceptance near 0 at 30: halved at least once
    # Doubling stops before the crossing, halving at it: either way the step size found accepts its
    # proposal with probability above 0.5, and twice it at most 0.5, with the same noise.
    assert (one_proposal_accept_prob(state, target, precond, eps, seed) > 0.5).all()
    assert (one_proposal_accept_prob(state, target, precond, 2 * eps, seed) <= 0.5).all()


def test_reasonable_step_size_is_reproducible_and_per_chain():
    target, precond, state = standard_normal_setup()
    first = find_reasonable_step_size(state, target, precond, 1.0, generator=torch.Generator().manual_seed(3))
    again = find_reasonable_step_size(state, target, precond, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert len(set(first.tolist())) > 1  # chains at other points get other step sizes
