"""The staged posterior map (Gaussian stage, flow check, flow stage), the one-line NFMALA(model),
latent mass-matrix adaptation, improper priors: exactness with negative controls, and right
answers (or a warning) on posteriors where the old default was confidently wrong."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
import zuko

from dense_reference import DenseJacobianPreconditioner
from invariance import check_invariance, exact_latents, statistics
from pyro.infer import MCMC
from pyro.ops.stats import effective_sample_size

from pyro_nfmala import (
    NFMALA,
    ChainSampler,
    LatentFlow,
    PosteriorPullback,
    identity_flow,
    load_flow,
    save_flow,
)
from pyro_nfmala.engine.langevin import MassMatrixPreconditioner, get_preconditioner
from pyro_nfmala.fit.check import FlowCheck, check_flow
from pyro_nfmala.fit.laplace import _runs_off, laplace_approximation
from pyro_nfmala.fit.staged import fit_staged_map
from pyro_nfmala.flows.staged import StagedFlow

# ----------------------------------------------------------------------------------------------
# the Gaussian stage and the staged flow


def test_laplace_falls_back_to_a_diagonal_where_the_hessian_is_not_positive_definite():
    def log_prob(x):  # flat in x[1]: no positive definite Hessian anywhere
        return -0.5 * ((x[..., 0] - 3.0) / 0.1) ** 2

    stage = laplace_approximation(log_prob, torch.zeros(2, 2, dtype=torch.float64))
    assert stage.method == "diagonal"
    torch.testing.assert_close(stage.loc[0], torch.tensor(3.0, dtype=torch.float64))
    torch.testing.assert_close(
        torch.diagonal(stage.scale_tril), torch.tensor([0.1, 1.0], dtype=torch.float64)
    )


def centred_funnel(x):
    """log sigma ~ N(0, 3), ten x_i ~ N(0, sigma): the joint density grows without bound as sigma -> 0."""
    log_sigma, rest = x[..., 0], x[..., 1:]
    return (
        -0.5 * (log_sigma / 3) ** 2
        - rest.shape[-1] * log_sigma
        - 0.5 * (rest**2).sum(-1) * torch.exp(-2 * log_sigma)
    )


def test_a_mode_search_that_runs_off_without_bound_stops_and_says_so():
    calls = []

    def counted(x):
        calls.append(1)
        return centred_funnel(x)

    starts = torch.randn(4, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    stage = laplace_approximation(counted, starts)
    assert stage.method == "unbounded" and torch.equal(stage.loc, starts[0])
    assert torch.equal(stage.scale_tril, torch.eye(11, dtype=torch.float64))
    assert len(calls) < 1500  # one round of one start, not 3 rounds of 4 (about 7,000 evaluations)
    # the control: the same funnel with data that pin sigma (a proper mode) is a Laplace approximation
    pinned = laplace_approximation(lambda x: centred_funnel(x) - 50 * (x[..., 0] - 0.5) ** 2, starts)
    assert pinned.method == "laplace"


def test_a_search_far_out_is_stopped_only_where_it_still_climbs_outward_or_meets_a_spike():
    """The criterion at a round's end, beyond the radius: a proper mode at -12 seen from -20 (the gradient,
    8, points back: a search that passed it) goes on; the centred funnel at log sigma = -20 (the gradient
    points further out) and at its degenerate spike (log sigma = -90: an astronomical gradient) stop.
    (With "any gradient entry above 1", the first was stopped too.)"""
    proper = lambda x: -0.5 * (x[..., 0] + 12.0) ** 2 - 0.5 * x[..., 1] ** 2  # noqa: E731
    assert not _runs_off(proper, torch.tensor([-20.0, 0.0], dtype=torch.float64))
    assert _runs_off(centred_funnel, torch.cat([torch.tensor([-20.0]), torch.zeros(10)]).double())
    spike = torch.cat([torch.tensor([-90.0]), torch.full((10,), 1e-40)]).double()
    assert _runs_off(centred_funnel, spike)


def test_a_proper_mode_far_out_is_not_taken_for_a_search_that_runs_off():
    """The 2,519-parameter stochastic volatility posterior's mean log volatility is -9 (daily returns), and
    L-BFGS on its 2,519 coordinates ends a round still climbing: with the radius at 10 its mode search
    was called unbounded and the staged fit lost its Laplace map. Here a level at -12 and a chain of 300
    states tied to it (fails with ``UNBOUNDED_RADIUS = 10``)."""

    def far_mode(x):
        level, states = x[..., :1], x[..., 1:]
        steps = torch.diff(torch.cat([level.expand(*states.shape[:-1], 1), states], -1), dim=-1)
        return (
            -0.5 * ((level[..., 0] + 12.0) / 0.1) ** 2
            - 0.5 * (steps / 0.01).pow(2).sum(-1)
            - 0.5e-3 * ((states + 12.0) ** 2).sum(-1)
        )

    stage = laplace_approximation(far_mode, torch.zeros(1, 301, dtype=torch.float64))
    assert stage.method == "laplace"
    torch.testing.assert_close(stage.loc, torch.full((301,), -12.0, dtype=torch.float64), atol=1e-3, rtol=0)


def test_the_mode_search_goes_on_after_a_round_whose_line_searches_met_non_finite_values():
    """A stochastic-volatility-like posterior (a level, a log scale and 300 innovations; the likelihood's
    exp(-h) overflows where a line search probes far): a round of L-BFGS whose line searches met inf
    left a history that stalled the next rounds at their first step (log density 1,004 from this start,
    the mode is above 1,400); each round starts a fresh L-BFGS."""
    steps = 300
    returns = 0.01 * torch.randn(steps, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def sv_like(x):
        level, log_scale, innovations = x[..., :1], x[..., 1:2], x[..., 2:]
        h = level + torch.exp(log_scale) * torch.cumsum(innovations, -1) / math.sqrt(steps)
        likelihood = (-0.5 * h - 0.5 * returns**2 * torch.exp(-h)).sum(-1)
        prior = (
            -0.5 * (innovations**2).sum(-1)
            - 0.5 * (log_scale[..., 0] + 2) ** 2
            - 0.5 * (level[..., 0] / 5) ** 2
        )
        return prior + likelihood

    start = 4 * torch.rand(steps + 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) - 2
    stage = laplace_approximation(sv_like, start[None])
    assert stage.method == "laplace" and stage.log_density > 1400


def test_a_log_density_finite_nowhere_the_search_goes_is_a_clear_error():
    with pytest.raises(ValueError, match="not finite at any of the 2 starts"):
        laplace_approximation(lambda x: torch.full(x.shape[:-1], float("nan")), torch.zeros(2, 3))


def test_staged_flow_log_determinant_matches_autograd_and_survives_save_and_load(tmp_path):
    torch.manual_seed(0)
    loc = torch.tensor([1000.0, -2.0, 0.5], dtype=torch.float64)
    scale_tril = torch.tensor([[0.5, 0.0, 0.0], [0.3, 2.0, 0.0], [-0.1, 0.2, 0.01]], dtype=torch.float64)
    flow = StagedFlow(loc, scale_tril, zuko.flows.RealNVP(3, transforms=2).double())
    latent = LatentFlow(flow)
    z = torch.randn(4, 3, dtype=torch.float64)
    x, ladj = latent.to_data(z)
    jacobians = torch.stack(
        [torch.autograd.functional.jacobian(lambda u: latent.to_data(u[None])[0][0], row) for row in z]
    )
    torch.testing.assert_close(ladj, torch.linalg.slogdet(jacobians)[1], atol=1e-10, rtol=0)
    torch.testing.assert_close(latent.to_latent(x), z, atol=1e-8, rtol=0)
    path = tmp_path / "staged.pt"
    save_flow(
        flow,
        path,
        spec={
            "name": "staged_flow",
            "args": [3],
            "kwargs": {"flow": {"name": "RealNVP", "args": [3], "kwargs": {"transforms": 2}}},
        },
    )
    loaded = load_flow(path)
    torch.testing.assert_close(LatentFlow(loaded).to_data(z)[0], x)


def test_the_flow_check_tells_a_good_map_from_a_misplaced_one():
    def log_prob(x):  # N((5, 5), 0.1^2 I)
        return -0.5 * ((x - 5.0) / 0.1).square().sum(-1)

    good = StagedFlow(torch.full((2,), 5.0), 0.1 * torch.eye(2))
    assert check_flow(good, log_prob).good
    misplaced = StagedFlow(torch.full((2,), 4.8), 0.1 * torch.eye(2))  # two sd off
    check = check_flow(misplaced, log_prob)
    assert not check.reliable and check.ess_fraction < 0.2
    with pytest.warns(RuntimeWarning, match=r"fails the flow check: Pareto k-hat .* > 0.7"):
        check.warn("the map")


def student_t(x, nu=5.0):
    """A bivariate Student-t (5 degrees of freedom): its Laplace map is serviceable, not good."""
    return -(nu + 2) / 2 * torch.log1p((x**2).sum(-1) / nu)


def test_flow_check_grades():
    laplace = StagedFlow(
        torch.zeros(2, dtype=torch.float64), math.sqrt(5 / 7) * torch.eye(2, dtype=torch.float64)
    )
    check = check_flow(laplace, student_t, num_samples=4000)
    assert check.reliable and check.serviceable and not check.good  # k-hat 0.53, importance ESS 48%
    assert FlowCheck(0.6, 290.0, 1000, 1000).reliable and not FlowCheck(0.6, 290.0, 1000, 1000).serviceable
    assert not FlowCheck(0.75, 950.0, 1000, 1000).serviceable  # unreliable, whatever the ESS
    assert FlowCheck(0.4, 10.0, 1000, 1000).good and FlowCheck(0.6, 950.0, 1000, 1000).good
    with pytest.raises(ValueError, match="keep_gaussian must be one of"):
        fit_staged_map(student_t, torch.zeros(1, 2), keep_gaussian="best")


@pytest.mark.statistical
def test_a_serviceable_gaussian_map_is_kept_unless_a_good_one_is_asked_for():
    torch.manual_seed(0)
    starts = torch.randn(4, 2, dtype=torch.float64)
    kept = fit_staged_map(student_t, starts, progress=False)
    assert kept.stage == "laplace" and kept.losses == [] and kept.check.serviceable
    polished = fit_staged_map(student_t, starts, progress=False, keep_gaussian="good")
    assert polished.stage == "flow" and polished.check.good


# ----------------------------------------------------------------------------------------------
# NFMALA(model): the one-line default


def far_from_origin(data):
    loc = pyro.sample("loc", dist.Normal(1000.0, 1.0).expand([2]).to_event(1))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(loc, 1.0).to_event(1), obs=data)


FAR_DATA = torch.full((20, 2), 1000.5)


@pytest.mark.statistical
def test_one_line_default_is_right_far_from_the_origin():
    """The case where a flow fitted from N(0, I) left loc at -0.1 with R-hat 1.02 (4,585 sd off)."""
    pyro.set_rng_seed(0)
    kernel = NFMALA(far_from_origin, fit_options={"progress": False})
    mcmc = MCMC(kernel, num_samples=500, warmup_steps=300, num_chains=2, disable_progbar=True)
    mcmc.run(FAR_DATA)
    loc = mcmc.get_samples(group_by_chain=True)["loc"]
    precision = 1.0 + len(FAR_DATA)
    mean, sd = (1000.0 + FAR_DATA.sum(0)[0]) / precision, 1 / math.sqrt(precision)
    ess = float(effective_sample_size(loc.double()).min())
    assert ess > 100
    assert float((loc.mean((0, 1)) - mean).abs().max()) < 4.5 * sd / math.sqrt(ess)
    assert kernel.fit_result.stage == "laplace" and kernel.flow_check.good
    diagnostics = mcmc.diagnostics()
    assert diagnostics["flow check"]["chain 0"]["khat"] < 0.5 and diagnostics["fit seconds"]["chain 0"] > 0


@pytest.mark.statistical
def test_the_map_is_fitted_once_per_run_and_reachable_afterwards(monkeypatch):
    import pyro_nfmala.fit.staged as centring_module  # the kernel fits through fit_in_better_coordinates

    fits = []
    fit = centring_module.fit_map_to_density

    def counting_fit(*args, **kwargs):
        fits.append(1)
        return fit(*args, **kwargs)

    monkeypatch.setattr(centring_module, "fit_map_to_density", counting_fit)
    kernel = NFMALA(far_from_origin, fit_options={"progress": False})
    MCMC(kernel, num_samples=20, warmup_steps=20, num_chains=3, disable_progbar=True).run(FAR_DATA)
    assert len(fits) == 1  # three chains, one after another, one fit
    assert isinstance(kernel.fit_result.flow, StagedFlow)


def normal_mean(data):
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    pyro.sample("obs", dist.Normal(loc, 1.0).expand([len(data)]).to_event(1), obs=data)


def fitted_location(kernel) -> float:
    return float(kernel.fit_result.flow.loc[0])


@pytest.mark.statistical
def test_a_later_run_on_other_data_refits_the_map_even_in_the_same_tensor():
    """The map was cached by the ids of the model's arguments: a second run on data changed in place
    (same id: Pyro's MCMC passes keyword arguments on as they are), or on a new tensor that took a
    freed tensor's id, reused the first run's map and flow check. Now the arguments are compared by
    value."""
    torch.manual_seed(0)
    data = torch.randn(20, dtype=torch.float64) + 3.0
    kernel = NFMALA(normal_mean, fit_options={"progress": False})
    mcmc = MCMC(kernel, num_samples=10, warmup_steps=10, num_chains=2, disable_progbar=True)
    mcmc.run(data=data)
    first = kernel.fit_result
    assert abs(fitted_location(kernel) - float(data.mean())) < 0.05
    data.sub_(6.0)  # the same tensor, other values
    mcmc.run(data=data)
    assert kernel.fit_result is not first
    assert abs(fitted_location(kernel) - float(data.mean())) < 0.05
    refitted = kernel.fit_result
    mcmc.run(data=data.clone())  # the same values in another tensor: no refit
    assert kernel.fit_result is refitted


@pytest.mark.statistical
def test_the_map_is_fitted_on_the_space_the_kernel_samples_with_the_users_transforms():
    """``NFMALA(model, transforms=...)`` with no flow fitted and checked the map on Pyro's default space,
    not on the one it samples: here u = 100 loc, so the map was 100 times too narrow and misplaced,
    while the flow check (of the wrong map on the wrong space) said it was good."""
    torch.manual_seed(0)
    data = torch.randn(20, dtype=torch.float64) + 3.0
    transforms = {"loc": dist.transforms.AffineTransform(0.0, 100.0)}
    kernel = NFMALA(normal_mean, transforms=transforms, fit_options={"progress": False})
    mcmc = MCMC(kernel, num_samples=200, warmup_steps=200, num_chains=2, disable_progbar=True)
    mcmc.run(data)
    posterior_sd = 100.0 / math.sqrt(len(data) + 0.01)  # in u = 100 loc
    assert abs(fitted_location(kernel) - 100.0 * float(data.mean())) < 0.1 * posterior_sd
    assert float(kernel.fit_result.flow.scale_tril[0, 0]) == pytest.approx(posterior_sd, rel=0.05)
    assert kernel.flow_check.good
    loc = mcmc.get_samples()["loc"]
    assert abs(float(loc.mean()) - float(data.mean())) < 0.1


def normal_at_five(params):
    return 0.5 * ((params["x"] - 5.0) ** 2).sum()


@pytest.mark.statistical
def test_an_untrained_flow_gives_the_right_answer_or_a_warning():
    """With a random spline flow, the chains once stopped at a kink near x = 5 (mean 5.76, sd 0.69,
    no warning). Now: chains start apart, and either they agree with N(5, 1) or the user is warned. (The
    flow fails its check, so the moves are Hamiltonian, with steps of 0.003-0.009 between the spline's
    kinks: 25-80 leapfrog steps a draw.)"""
    pyro.set_rng_seed(1)
    torch.manual_seed(1)
    kernel = NFMALA(potential_fn=normal_at_five, flow=zuko.flows.NSF(1), initial_params={"x": torch.zeros(1)})
    mcmc = MCMC(kernel, num_samples=150, warmup_steps=100, num_chains=2, disable_progbar=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mcmc.run()
        from pyro_nfmala import to_inference_data

        to_inference_data(mcmc)
    x = mcmc.get_samples(group_by_chain=True)["x"]
    ess = float(effective_sample_size(x.double()))
    right = ess > 100 and abs(float(x.mean()) - 5.0) < 4.5 / math.sqrt(ess)
    warned = any(issubclass(w.category, RuntimeWarning) for w in caught)
    assert right or warned


# ----------------------------------------------------------------------------------------------
# the latent mass matrix


class MassWithPlainReverseDrift(MassMatrixPreconditioner):
    """Negative control: the reverse density forgets the mass matrix in the drift, mu(z') = z' + eps g(z')."""

    def log_proposal_density(self, flow, state_to, state_from, step_size):
        c = self.inverse_mass  # replace g by C^-1 g, so that the drift C (C^-1 g) is g
        grad = (
            state_from.grad / c
            if c.dim() == 1
            else torch.linalg.solve(c, state_from.grad.unsqueeze(-1)).squeeze(-1)
        )
        return super().log_proposal_density(flow, state_to, state_from._replace(grad=grad), step_size)


@pytest.mark.statistical
@pytest.mark.parametrize(
    "inverse_mass",
    [
        torch.tensor([0.3, 3.0], dtype=torch.float64),
        torch.tensor([[0.3, 0.6], [0.6, 3.0]], dtype=torch.float64),
    ],
    ids=["diagonal", "dense"],
)
def test_a_mass_matrix_keeps_the_exact_law_and_a_wrong_accept_ratio_is_caught(
    latent_flow, mixture, inverse_mass
):
    target = PosteriorPullback(latent_flow, mixture.log_prob)
    reference_z = exact_latents(latent_flow, mixture, 100_000)
    reference = statistics(reference_z, latent_flow.to_data(reference_z)[0].detach())
    precond, broken = MassMatrixPreconditioner(inverse_mass), MassWithPlainReverseDrift(inverse_mass)
    check_invariance(target, precond, broken, mixture, reference)


@pytest.mark.statistical
def test_warmup_adapts_the_mass_matrix_to_the_scales_of_the_target():
    """A Gaussian with scales 0.01 and 100 and the identity flow: the adapted M^-1 recovers the
    variances (within 30%: 4 slow windows of 256 chains), and the step size is not stuck at 0.01."""
    scales = torch.tensor([0.01, 100.0])
    target = PosteriorPullback(identity_flow(2), lambda x: -0.5 * (x / scales).square().sum(-1))
    sampler = ChainSampler(target, 256, seed=0, initial_z=torch.randn(256, 2) * scales)
    sampler.warmup(500, progress=False)
    variances = sampler.preconditioner.inverse_mass
    assert torch.allclose(variances, scales**2, rtol=0.3)
    assert float(sampler.step_size[0]) > 0.3
    idata = sampler.sample(100, progress=False)
    assert float(idata.sample_stats["accept_prob"].mean()) > 0.4


def test_mass_matrix_options():
    target = PosteriorPullback(identity_flow(2), lambda x: -0.5 * x.square().sum(-1))
    dense = ChainSampler(target, 8, mass_matrix="dense", seed=0)
    dense.warmup(100, progress=False)
    assert dense.preconditioner.inverse_mass.shape == (2, 2)
    with pytest.raises(ValueError, match="takes none"):
        ChainSampler(target, 8, preconditioner=DenseJacobianPreconditioner(), mass_matrix="diagonal")
    with pytest.raises(ValueError, match="mass_matrix must be"):
        ChainSampler(target, 8, mass_matrix="full")
    with pytest.raises(ValueError, match="unknown preconditioner 'dense_jacobian'"):
        ChainSampler(target, 8, preconditioner="dense_jacobian")  # a test reference, not an option
    assert ChainSampler(
        target, 8, preconditioner=DenseJacobianPreconditioner(), seed=0
    ).preconditioner.name == ("dense_jacobian")  # auto: none
    for name in ("jacobian", "data_space"):  # auto: diagonal, in data space, on a new move of their own
        user = get_preconditioner(name)
        sampler = ChainSampler(target, 8, preconditioner=user, seed=0)
        assert sampler.preconditioner.name == name and sampler.preconditioner is not user
        assert user.inverse_mass is None and sampler.preconditioner.inverse_mass.shape == (2,)


# ----------------------------------------------------------------------------------------------
# improper priors, as with NUTS


X = torch.tensor(
    [[1.0, -1.2], [1.0, 0.3], [1.0, 0.8], [1.0, -0.5], [1.0, 1.9], [1.0, 0.1], [1.0, -0.9], [1.0, 1.2]]
)
Y = torch.tensor([0.9, 2.1, 2.7, 1.2, 3.8, 1.9, 0.6, 3.1])


def flat_regression(X, y):
    """Stan's default: flat priors on the coefficients and on sigma > 0."""
    beta = pyro.sample("beta", dist.ImproperUniform(dist.constraints.real, (), (2,)))
    sigma = pyro.sample("sigma", dist.ImproperUniform(dist.constraints.positive, (), ()))
    with pyro.plate("data", len(y)):
        pyro.sample(
            "y", dist.Normal(beta[..., 0:1] * X[:, 0] + beta[..., 1:2] * X[:, 1], sigma[..., None]), obs=y
        )


@pytest.mark.statistical
def test_improper_flat_priors_work_as_with_nuts():
    """The posterior mean of beta under flat priors is the least-squares estimate."""
    pyro.set_rng_seed(3)
    mcmc = MCMC(
        NFMALA(flat_regression, fit_options={"progress": False}),
        num_samples=800,
        warmup_steps=300,
        disable_progbar=True,
    )
    mcmc.run(X, Y)
    beta = mcmc.get_samples()["beta"]
    least_squares = torch.linalg.lstsq(X, Y.unsqueeze(-1)).solution.squeeze(-1)
    for k in range(2):
        draws = beta[:, k].reshape(1, -1, 1).double()
        ess = float(effective_sample_size(draws))
        assert ess > 100
        assert abs(float(draws.mean()) - float(least_squares[k])) < 4.5 * float(draws.std()) / math.sqrt(ess)


def positive_locations():
    pyro.sample("loc", dist.Normal(1.0, 0.1).expand([2]).to_event(1))


def test_a_start_the_map_cannot_reach_warns_and_starts_at_a_draw_of_the_map():
    """x = exp(30 z) has no inverse at x <= 0: a chain told to start at loc = (-1, 1) cannot."""
    from pyro.infer.autoguide.initialization import init_to_value
    from test_faults import exponential_flow

    pyro.set_rng_seed(3)
    start = init_to_value(values={"loc": torch.tensor([-1.0, 1.0])})
    kernel = NFMALA(positive_locations, flow=exponential_flow(), init_strategy=start)
    mcmc = MCMC(kernel, num_samples=50, warmup_steps=50, disable_progbar=True)
    with pytest.warns(RuntimeWarning, match="cannot reach the starting point"):
        mcmc.run()
    assert bool((mcmc.get_samples()["loc"] > 0).all())
