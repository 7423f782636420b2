"""Any trained flow: Pyro transforms and guides, torch's TransformedDistribution and plain callables are read
as the samplers read a zuko flow (exact draws stay exact under MALA through each, a sign error in the
reverse drift caught), the tempered target uses each flow's own base law, and the construction check refuses
what a sampler cannot use exactly, naming the check."""

import contextlib
import copy
import functools
import math
import warnings

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import pytest
import torch

from invariance import exact_latents, max_abs_z_score, run_particles, statistics
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormalizingFlow

from pyro_nfmala import NFMALA, ChainSampler, PosteriorPullback, as_latent_flow
from pyro_nfmala.engine.adaptation import find_reasonable_step_size
from pyro_nfmala.engine.langevin import IdentityPreconditioner
from pyro_nfmala.engine.step import advance, init_state
from pyro_nfmala.engine.targets import TemperedFlow
from pyro_nfmala.flows.adapters import FlowMapError

STANDARD_NORMAL = dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1)


def pyro_coupling():
    """Pyro's affine coupling layer (its inverse is one pass; Pyro's autoregressive inverses make float32
    zeros, so they are not used in float64 tests)."""
    torch.manual_seed(3)
    return T.affine_coupling(2, hidden_dims=[16]).double()


def spline_then_iaf():
    torch.manual_seed(4)
    spline = T.Spline(2, count_bins=6, bound=6.0).double()
    base = dist.Normal(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)).to_event(1)
    return dist.TransformedDistribution(base, [spline, pyro_coupling()])


def affine_callable():
    matrix = torch.tensor([[2.0, 0.0], [0.7, 0.5]], dtype=torch.float64)
    shift = torch.tensor([0.5, -1.0], dtype=torch.float64)
    log_det = torch.linalg.slogdet(matrix).logabsdet

    def generator(z):
        return z @ matrix.T + shift, log_det.expand(z.shape[:-1])

    def inverse(x):
        return torch.linalg.solve(matrix, (x - shift).unsqueeze(-1)).squeeze(-1), -log_det.expand(
            x.shape[:-1]
        )

    return generator, inverse


def two_d(data):
    x = pyro.sample("x", dist.Normal(torch.zeros(2, dtype=torch.float64), 2.0).to_event(1))
    pyro.sample("y", dist.Normal(x, 1.0).to_event(1), obs=data)


@contextlib.contextmanager
def float64_default():
    """Libraries that make some tensors in the default dtype (Pyro's guides, normflows, nflows) build in
    float64 under it."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(default)


def trained_guide(kind, *args):
    """A guide trained briefly in float64."""
    pyro.clear_param_store()
    pyro.set_rng_seed(5)
    with float64_default():
        guide = kind(two_d, *args)
        data = torch.tensor([1.0, -0.5], dtype=torch.float64)
        svi = SVI(two_d, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
        for _ in range(50):
            svi.step(data)
    return guide


def coupling_layers(dim):
    return T.ComposeTransformModule(
        [T.affine_coupling(dim, hidden_dims=[16]), T.Permute(torch.tensor([1, 0]))]
    )


def subnet(features_in, features_out):
    return torch.nn.Sequential(
        torch.nn.Linear(features_in, 16), torch.nn.Tanh(), torch.nn.Linear(16, features_out)
    ).double()


def normflows_flow(*extra):
    nf = pytest.importorskip("normflows")
    torch.manual_seed(6)
    with float64_default():
        coupling = nf.flows.AffineCouplingBlock(nf.nets.MLP([1, 16, 2], init_zeros=False))
        layers = [coupling, nf.flows.Permute(2, "swap"), *(make() for make in extra)]
        return nf.NormalizingFlow(nf.distributions.DiagGaussian(2, trainable=True), layers)


def nflows_flow():
    pytest.importorskip("nflows")
    from nflows.distributions import StandardNormal
    from nflows.flows import Flow
    from nflows.transforms import CompositeTransform, MaskedAffineAutoregressiveTransform, ReversePermutation

    torch.manual_seed(7)
    with float64_default():
        transform = CompositeTransform([MaskedAffineAutoregressiveTransform(2, 16), ReversePermutation(2)])
        return Flow(transform, StandardNormal([2]))


def freia_flow():
    pytest.importorskip("FrEIA")
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    torch.manual_seed(8)
    network = Ff.SequenceINN(2)
    network.append(Fm.AllInOneBlock, subnet_constructor=subnet, permute_soft=False)
    return network.double()


ADAPTED = {
    "pyro transform": lambda: as_latent_flow(pyro_coupling(), base=2),
    "transformed distribution": lambda: as_latent_flow(spline_then_iaf()),
    "callable": lambda: as_latent_flow(
        affine_callable()[0], base=STANDARD_NORMAL, inverse=affine_callable()[1]
    ),
    "AutoNormalizingFlow": lambda: as_latent_flow(trained_guide(AutoNormalizingFlow, coupling_layers)),
    "normflows": lambda: as_latent_flow(normflows_flow()),
    "nflows": lambda: as_latent_flow(nflows_flow()),
    "FrEIA": lambda: as_latent_flow(freia_flow(), base=STANDARD_NORMAL),
}


def read_backwards(flow):
    """Negative control: the flow read in the wrong direction (its data-to-latent map taken as the
    generator, with that map's log-determinant), the error an adapter that mistakes a library's direction
    makes."""
    broken = copy.copy(flow)
    broken.to_data = flow.to_latent_and_ladj
    return broken


@pytest.mark.statistical
@pytest.mark.parametrize("kind", list(ADAPTED))
def test_exact_draws_stay_exact_through_each_adapted_flow(kind, mixture):
    """5,000 exact draws of a two-component mixture (float64), 10 MALA steps in each flow's latent space;
    the same flow read in the wrong direction must be caught by the same comparison."""
    with float64_default():  # normflows sums log-determinants in the default dtype
        flow = ADAPTED[kind]()
        with torch.random.fork_rng():
            torch.manual_seed(123)
            z = flow.to_latent(mixture.sample((100_000,)))
            reference = statistics(z, flow.to_data(z)[0].detach())
        move = IdentityPreconditioner()
        target = PosteriorPullback(flow, mixture.log_prob)
        torch.manual_seed(0)
        probe = init_state(target, move, exact_latents(flow, mixture, 256))
        step_size = float(find_reasonable_step_size(probe, target, move).median())
        state, accept_rate = run_particles(target, move, step_size, mixture)
        assert 0.2 < accept_rate < 0.95  # the chains really move
        assert max_abs_z_score(statistics(state.z, state.x), reference) < 4.5
        state, _ = run_particles(
            PosteriorPullback(read_backwards(flow), mixture.log_prob), move, step_size, mixture
        )
        assert max_abs_z_score(statistics(state.z, state.x), reference) > 6.0


def tempered_draws(flow, beta, n, generator):
    """Exact draws of the tempered target of an elementwise 2-d flow, pi(z) = prod_i N(z_i) |g_i'(z_i)|^-beta:
    each coordinate by the inverse of its CDF on a grid of 200,001 points in (-9, 9), from the adapted
    flow's own log-determinant along that coordinate."""
    grid = torch.linspace(-9.0, 9.0, 200_001, dtype=torch.float64)
    columns = []
    for i in range(2):
        z = torch.zeros(len(grid), 2, dtype=torch.float64)
        z[:, i] = grid
        with torch.no_grad():
            log_density = -0.5 * grid**2 - beta * flow.to_data(z)[1]
        cdf = torch.cumsum((log_density - log_density.max()).exp(), 0)
        cdf = cdf / cdf[-1]
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        right = torch.searchsorted(cdf, u).clamp(1, len(grid) - 1)
        low, high = cdf[right - 1], cdf[right]
        fraction = (u - low) / (high - low).clamp(min=1e-300)
        columns.append(grid[right - 1] + fraction * (grid[right] - grid[right - 1]))
    return torch.stack(columns, -1)


def curved(module, scale=1.5):
    """``module`` with its parameters drawn at random from N(0, scale^2), wide: a strongly curved map."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0.0, scale)
    return module


def sinh_arcsinh():
    """An elementwise callable x_i = sinh(b_i asinh(z_i) - a_i) with its inverse."""
    a = torch.tensor([0.5, -0.3], dtype=torch.float64)
    b = torch.tensor([1.5, 0.7], dtype=torch.float64)

    def generator(z):
        inner = b * torch.asinh(z) - a
        return torch.sinh(inner), (torch.log(b * torch.cosh(inner)) - 0.5 * torch.log1p(z**2)).sum(-1)

    def inverse(x):
        z = torch.sinh((torch.asinh(x) + a) / b)
        return z, -generator(z)[1]

    return as_latent_flow(generator, base=STANDARD_NORMAL, inverse=inverse)


def spline_guide():
    pyro.clear_param_store()
    with float64_default():
        guide = AutoNormalizingFlow(two_d, lambda dim: T.Spline(dim, count_bins=8, bound=4.0))
        guide(torch.zeros(2))
    curved(guide.transform)
    return as_latent_flow(guide)


def nflows_spline():
    pytest.importorskip("nflows")
    from nflows.distributions import StandardNormal
    from nflows.flows import Flow
    from nflows.transforms import PiecewiseRationalQuadraticCDF

    with float64_default():
        transform = curved(
            PiecewiseRationalQuadraticCDF(shape=[2], num_bins=8, tails="linear", tail_bound=4.0)
        )
        return as_latent_flow(Flow(transform, StandardNormal([2])))


#: Strongly curved elementwise flows read by the adapters, whose tempered laws are drawn exactly by
#: :func:`tempered_draws`.
ELEMENTWISE = {
    "pyro transform": lambda: as_latent_flow(curved(T.Spline(2, count_bins=8, bound=4.0).double()), base=2),
    "transformed distribution": lambda: as_latent_flow(
        dist.TransformedDistribution(STANDARD_NORMAL, [curved(T.Spline(2, count_bins=8, bound=4.0).double())])
    ),
    "AutoNormalizingFlow": spline_guide,
    "nflows": nflows_spline,
    "callable": sinh_arcsinh,
}


def rejection_draws(flow, beta, lower_bound, n, generator):
    """Exact draws of the tempered target pi(z) = q(z) exp(-beta ladj(z)) of a flow on a standard normal
    base q whose log-determinant is bounded below, ladj >= lower_bound: z ~ q, kept with probability
    exp(-beta (ladj(z) - lower_bound)) <= 1. Checked, not assumed: the base is N(0, I) and no proposal has
    ladj below the bound."""
    draws, kept = [], 0
    while kept < n:
        z = torch.randn(50_000, 2, generator=generator, dtype=torch.float64)
        torch.testing.assert_close(flow.base_log_prob(z), STANDARD_NORMAL.log_prob(z))
        with torch.no_grad():
            ladj = flow.to_data(z)[1]
        assert float(ladj.min()) >= lower_bound, f"ladj {float(ladj.min()):.6g} below its bound {lower_bound}"
        keep = (
            torch.rand(len(z), generator=generator, dtype=torch.float64)
            < (-beta * (ladj - lower_bound)).exp()
        )
        draws.append(z[keep])
        kept += int(keep.sum())
    return torch.cat(draws)[:n]


def normflows_bounded_coupling():
    """Two normflows masked affine couplings (RealNVP), each scaling one coordinate by exp(s), with
    s = c tanh(MLP) and c = 1.5, wide random weights: strongly curved, and ladj = s_1 + s_2 >= -2c."""
    nf = pytest.importorskip("normflows")
    clamp = 1.5
    torch.manual_seed(1)
    with float64_default():
        layers = [
            nf.flows.MaskedAffineFlow(
                torch.tensor(mask),
                nf.nets.MLP([2, 16, 2]),
                nf.nets.MLP([2, 16, 2], output_fn="tanh", output_scale=clamp),
            )
            for mask in ([1.0, 0.0], [0.0, 1.0])
        ]
        flow = nf.NormalizingFlow(nf.distributions.DiagGaussian(2, trainable=False), layers)
        curved(flow.flows, 1.0)
        return as_latent_flow(flow), -2 * clamp


def freia_bounded_coupling():
    """A FrEIA GLOW coupling block with soft clamp c = 1.5, wide random weights: each coordinate scaled by
    exp(s), s = c 0.636 atan(u) with |s| < c, so that ladj >= -2c (2 coordinates)."""
    pytest.importorskip("FrEIA")
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    clamp = 1.5
    torch.manual_seed(0)
    network = Ff.SequenceINN(2)
    network.append(Fm.GLOWCouplingBlock, subnet_constructor=subnet, clamp=clamp)
    curved(network.double(), 1.0)
    return as_latent_flow(network, base=STANDARD_NORMAL), -2 * clamp


#: Strongly curved flows of libraries without an elementwise curved layer, on a N(0, I) base, with a lower
#: bound of their log-determinant derived from their clamp: their tempered laws are drawn exactly by
#: :func:`rejection_draws`.
BOUNDED_LADJ = {"normflows": normflows_bounded_coupling, "FrEIA": freia_bounded_coupling}


def tempered_z_scores(flow, draw):
    """The max |z| of the statistics of 5,000 exact draws of the tempered target (beta = 1) after 10 MALA
    steps against 100,000 fresh exact draws (``draw(n, generator)``), for the flow, the flow read in the
    wrong direction and the flow with its log-determinant's sign flipped."""
    generator = torch.Generator().manual_seed(1)
    reference_z = draw(100_000, generator)
    reference = statistics(reference_z, flow.to_data(reference_z)[0].detach())
    z0 = draw(5_000, generator)

    def score(read):
        target, move = TemperedFlow(read, 1.0), IdentityPreconditioner()
        torch.manual_seed(3)
        probe = init_state(target, move, z0[:256])
        step_size = float(find_reasonable_step_size(probe, target, move).median())
        state = init_state(target, move, z0)
        for _ in range(10):
            state, _ = advance(state, target, move, step_size)
        return max_abs_z_score(statistics(state.z, state.x), reference)

    flipped = copy.copy(flow)
    flipped.to_data = lambda z: (flow.to_data(z)[0], -flow.to_data(z)[1])
    return score(flow), score(read_backwards(flow)), score(flipped)


@pytest.mark.statistical
@pytest.mark.parametrize("kind", list(ELEMENTWISE) + [f"{kind}, bounded ladj" for kind in BOUNDED_LADJ])
def test_the_tempered_target_keeps_its_exact_law_through_each_adapted_flow(kind):
    """The tempered target (beta = 1) through a strongly curved flow of each kind: 5,000 exact draws stay
    exact under 10 MALA steps; the flow read in the wrong direction, or with its log-determinant's sign
    flipped, is caught by the same comparison. Exact draws: for an elementwise flow, a product of 1-d laws
    drawn by their CDFs; for normflows and FrEIA (no elementwise curved layer), coupling layers with a
    clamped scale, drawn by rejection from the base with the clamp's bound of ladj."""
    torch.manual_seed(0)
    with float64_default():  # normflows sums its log-determinants in the default dtype
        if kind in ELEMENTWISE:
            flow = ELEMENTWISE[kind]()
            draw = functools.partial(tempered_draws, flow, 1.0)
        else:
            flow, lower_bound = BOUNDED_LADJ[kind.removesuffix(", bounded ladj")]()
            draw = functools.partial(rejection_draws, flow, 1.0, lower_bound)
            # the bound is checked on every proposal, and near what the flow reaches: 1.5 above it fails
            with pytest.raises(AssertionError, match="below its bound"):
                rejection_draws(flow, 1.0, lower_bound + 1.5, 10, torch.Generator().manual_seed(0))
        correct, backwards, flipped = tempered_z_scores(flow, draw)
    assert correct < 4.5
    assert backwards > 6.0 and flipped > 6.0


@pytest.mark.parametrize("kind", list(ADAPTED))
def test_each_adapted_flow_reads_the_generator_and_its_base(kind):
    with float64_default():  # normflows sums log-determinants in the default dtype
        flow = ADAPTED[kind]()
        z = torch.randn(7, 2, dtype=torch.float64)
        x, ladj = flow.to_data(z)
        jacobian = torch.autograd.functional.jacobian(lambda u: flow.to_data(u[None])[0][0], z[0])
        torch.testing.assert_close(ladj[0], torch.linalg.slogdet(jacobian).logabsdet, atol=1e-8, rtol=0)
        torch.testing.assert_close(flow.to_latent(x), z, atol=1e-6, rtol=0)
        assert flow.base_log_prob(z).shape == (7,)
        beta = 0.5
        log_pi, _, _ = TemperedFlow(flow, beta).log_density(z)
        torch.testing.assert_close(log_pi, flow.base_log_prob(z) - beta * ladj)


@pytest.mark.parametrize("kind", list(ADAPTED))
def test_the_jacobian_aware_moves_run_through_each_adapted_flow(kind):
    """The 'jacobian' and 'data_space' preconditioners (which need the flow's inverse and its Jacobian
    products) on the tempered target, a few steps of 16 chains; a flow without an inverse says so."""
    with float64_default():
        flow = ADAPTED[kind]()
        for preconditioner in ("jacobian", "data_space"):
            sampler = ChainSampler(TemperedFlow(flow, 1.0), 16, preconditioner=preconditioner, seed=0)
            idata = sampler.run(5, 5, progress=False)
            assert float(idata.sample_stats["accept_prob"].mean()) > 0.2
    without_inverse = as_latent_flow(affine_callable()[0], base=STANDARD_NORMAL)
    with pytest.raises(NotImplementedError, match="'data_space' preconditioners and data-space starts need"):
        ChainSampler(TemperedFlow(without_inverse, 1.0), 4, preconditioner="data_space", seed=0)


def test_the_tempered_target_uses_a_flows_own_base_law():
    """A TransformedDistribution on a learnt diagonal Gaussian base N(m, s^2): with beta = 0 the tempered
    target is that base (not N(0, I)), and its log density is the base's."""
    loc = torch.tensor([1.0, -2.0], dtype=torch.float64)
    scale = torch.tensor([0.5, 3.0], dtype=torch.float64)
    base = dist.Normal(loc, scale).to_event(1)
    flow = as_latent_flow(dist.TransformedDistribution(base, [pyro_coupling()]))
    z = torch.randn(5, 2, dtype=torch.float64)
    log_pi, _, _ = TemperedFlow(flow, 0.0).log_density(z)
    torch.testing.assert_close(log_pi, base.log_prob(z))
    draws = flow.sample_base((20_000,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(draws.mean(0), loc, atol=0.1, rtol=0)
    torch.testing.assert_close(draws.std(0), scale, atol=0.1, rtol=0)


def test_a_trained_pyro_guide_is_the_map_neutra_reads():
    """The guide's transform, as Pyro's NeuTraReparam reads it (its latent vector: the model's
    unconstrained sites in the order they run): the same x for the same z, and NFMALA samples with it."""
    guide = trained_guide(AutoMultivariateNormal)
    flow = as_latent_flow(guide)
    assert flow.sites == {"x": 2}
    z = torch.randn(4, 2, dtype=torch.float64)
    expected = guide.get_transform()(z)
    torch.testing.assert_close(flow.to_data(z)[0], expected)
    data = torch.tensor([1.0, -0.5], dtype=torch.float64)
    mcmc = pyro.infer.MCMC(NFMALA(two_d, flow=guide), num_samples=300, warmup_steps=100, disable_progbar=True)
    mcmc.run(data)
    draws = mcmc.get_samples()["x"]
    # conjugate: posterior N(data * 4/5, 4/5) per coordinate
    posterior_sd = math.sqrt(0.8)
    assert float((draws.mean(0) - 0.8 * data).abs().max()) < 5 * posterior_sd / math.sqrt(50)


def test_a_guide_of_another_model_or_not_run_yet_is_a_clear_error():
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="has not been run yet"):
        as_latent_flow(AutoMultivariateNormal(two_d))

    def three_d(data):
        pyro.sample("x", dist.Normal(torch.zeros(3, dtype=torch.float64), 1.0).to_event(1))

    guide = trained_guide(AutoMultivariateNormal)
    kernel = NFMALA(three_d, flow=guide)
    with pytest.raises(ValueError, match="dimension 2"):
        pyro.infer.MCMC(kernel, num_samples=2, warmup_steps=2, disable_progbar=True).run(torch.zeros(3))


def _batch_norm_with_batch_statistics(z):
    centred = z - z.mean(0)
    return centred, torch.zeros(z.shape[:-1], dtype=z.dtype)


def _straight_through_clamped_scale(z):
    """x = z exp(s), s = clamp(z, -1/2, 1/2) with the clamp's gradient passed through (a straight-through
    clamp); its ladj is the exact one, log(exp(s) (1 + z [|z| < 1/2])), which autograd's Jacobian, through
    the pass-through gradient, is not."""
    scale = z + (z.clamp(-0.5, 0.5) - z).detach()
    inside = (z.abs() < 0.5).to(z.dtype)
    return z * scale.exp(), (scale + torch.log1p(z * inside)).sum(-1)


@pytest.mark.parametrize(
    "generator, check",
    [
        (lambda z: (z, 0.01 * torch.randn(z.shape[:-1], dtype=z.dtype)), "deterministic"),
        (_batch_norm_with_batch_statistics, "independent rows"),
        (lambda z: (2 * z, torch.zeros(z.shape[:-1], dtype=z.dtype)), "exact log-determinant"),
        (lambda z: (z.detach() + 1.0, torch.zeros(z.shape[:-1], dtype=z.dtype)), "gradient"),
        (_straight_through_clamped_scale, "exact log-determinant"),
    ],
    ids=[
        "stochastic log-determinant",
        "batch statistics",
        "wrong log-determinant",
        "no finite gradient",
        "clamped scale with a pass-through gradient",
    ],
)
def test_a_flow_a_sampler_cannot_use_exactly_is_refused_naming_the_check(generator, check):
    with pytest.raises(FlowMapError, match=f"fails the '{check}' check") as refusal:
        as_latent_flow(generator, base=2)
    assert "caused by" not in str(refusal.value)  # no layer to blame: none named


def test_the_same_clamped_scale_with_its_own_gradient_is_accepted():
    """The control of the pass-through case above: with the clamp's own gradient, autograd's Jacobian is the
    map's, and the flow is accepted."""

    def clamped_scale(z):
        scale = z.clamp(-0.5, 0.5)
        inside = (z.abs() < 0.5).to(z.dtype)
        return z * scale.exp(), (scale + torch.log1p(z * inside)).sum(-1)

    with float64_default():
        assert as_latent_flow(clamped_scale, base=2).dim == 2


def test_a_refusal_names_the_layer_that_explains_it_and_only_that_one():
    """A generator through a dropout layer in training mode is refused, naming that layer (found through
    the generator's closure) and why; the same layer in eval mode is the identity, and accepted."""

    def through(dropout):
        def generator(z):
            return dropout(z), torch.zeros(z.shape[:-1], dtype=z.dtype)

        return generator

    dropout = torch.nn.Dropout(0.5)
    layer = r"caused by layer 'Dropout' \(torch\.nn\.modules\.dropout\.Dropout, which drops units at random"
    with pytest.raises(FlowMapError, match=f"'deterministic' check .*{layer}"):
        as_latent_flow(through(dropout), base=2)
    as_latent_flow(through(dropout.eval()), base=2)


def test_normflows_layers_a_sampler_cannot_use_are_refused_naming_the_check():
    """A residual layer's log-determinant is a Russian-roulette estimate (random), and normflows' batch
    normalization always uses the batch's statistics (it couples the chains): both refused."""
    nf = pytest.importorskip("normflows")

    def residual():
        return nf.flows.Residual(nf.nets.LipschitzMLP([2, 16, 2], init_zeros=False), reduce_memory=False)

    # in eval mode its estimate is drawn for the batch as a whole: refused as a coupling of the rows
    check = "fails the '(deterministic|independent rows)' check"
    layer = r"caused by layer 'flows.2' \(normflows\.flows\.residual\.Residual, which estimates its log-det"
    with float64_default(), pytest.raises(FlowMapError, match=f"{check}.*{layer}"):
        as_latent_flow(normflows_flow(residual))
    layer = r"caused by layer 'flows.2' \(normflows\.flows\.normalization\.BatchNorm, which normalizes"
    with float64_default(), pytest.raises(FlowMapError, match=f"fails the 'independent rows' check.*{layer}"):
        as_latent_flow(normflows_flow(nf.flows.BatchNorm))
    with float64_default():  # negative control: the same flow without them is accepted
        as_latent_flow(normflows_flow())


def test_a_generator_through_autoregressive_layers_run_backwards_warns_that_it_is_slow():
    """nflows' masked autoregressive flow generates by its inverse, and a Pyro autoregressive transform used
    inverted: d network passes an evaluation (exact, legal: a warning); Pyro's forward (IAF) direction not."""
    with float64_default():  # Pyro's autoregressive inverse makes its zeros in the default dtype
        iaf = T.AffineAutoregressive(pyro.nn.AutoRegressiveNN(3, [8]))
        base = dist.Normal(torch.zeros(3), 1.0).to_event(1)
        with pytest.warns(UserWarning, match=r"autoregressive layers run backwards \(AffineAutoregressive\)"):
            as_latent_flow(dist.TransformedDistribution(base, [iaf.inv]))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            as_latent_flow(iaf, base=base)
        with pytest.warns(UserWarning, match="MaskedAffineAutoregressiveTransform.*2 network passes"):
            as_latent_flow(nflows_flow())


def test_a_freia_residual_layer_with_a_hutchinson_log_determinant_is_refused():
    """FrEIA's IResNetLayer estimates its log-determinant with random (Hutchinson) probes."""
    pytest.importorskip("FrEIA")
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    torch.manual_seed(9)
    with float64_default():
        network = Ff.SequenceINN(2)
        network.append(Fm.IResNetLayer, hutchinson_samples=1, internal_size=16)
        check = r"\(SequenceINN from FrEIA\) fails the 'deterministic' check"
        layer = r"caused by layer 'module_list.0' \(FrEIA\.modules\.invertible_resnet\.IResNetLayer, which"
        with pytest.raises(FlowMapError, match=f"{check}.*{layer}.*Hutchinson"):
            as_latent_flow(network, base=2)


def test_a_pyro_batch_norm_in_training_mode_is_read_with_its_running_statistics():
    """Pyro's BatchNorm uses the batch's statistics in training mode (it would couple the chains): the frozen
    copy is in eval mode, with the running statistics, and the user's module is left as it was."""
    with float64_default():
        batch_norm = T.BatchNorm(2)
        base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        assert batch_norm.training
        flow = as_latent_flow(dist.TransformedDistribution(base, [pyro_coupling(), batch_norm]))
        assert batch_norm.training  # the user's module, untouched
        z = torch.randn(6, 2)
        alone = torch.cat([flow.to_data(row[None])[0] for row in z])
        torch.testing.assert_close(flow.to_data(z)[0], alone)


def test_what_is_not_a_flow_and_a_missing_base_are_clear_errors():
    with pytest.raises(TypeError, match="cannot read a int as a flow"):
        as_latent_flow(42)
    with pytest.raises(ValueError, match=r"needs its base law: read it with pyro_nfmala.as_latent_flow"):
        as_latent_flow(pyro_coupling())
    with pytest.raises(ValueError, match=r"shape \(1, 2\) to data of shape \(1, 1\)"):
        as_latent_flow(lambda z: (z[..., :1], torch.zeros(z.shape[:-1], dtype=z.dtype)), base=2)


@pytest.mark.slow
@pytest.mark.posteriordb
def test_a_trained_iaf_guide_gives_the_posterior_on_a_posteriordb_model_as_neutra_does():
    """posteriordb's low_dim_gauss_mix (a two-component mixture, 5 parameters; Pyro's autoguides cannot trace
    the flat ImproperUniform priors of its regressions): an AutoIAFNormal trained by SVI, then
    NFMALA(model, flow=guide) (4 chains as one batch) and NUTS on NeuTraReparam(guide) (2 chains): every
    posterior mean within 0.1 reference sd (plus 4.5 Monte Carlo standard errors) of the reference, and so
    of each other."""
    from pyro.infer.autoguide import AutoIAFNormal

    from pyro_nfmala.examples.posteriordb import MODELS, comparable_reference, load_data, reference_names
    from pyro_nfmala.model.density import default_init

    name = "low_dim_gauss_mix"
    model, data = MODELS[name], load_data(name, dtype=torch.float64)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with float64_default():
        guide = AutoIAFNormal(model, num_transforms=2, hidden_dim=[20], init_loc_fn=default_init)
        svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 5e-3}), Trace_ELBO(num_particles=4))
        for _ in range(1500):
            svi.step(**data)
    guide.requires_grad_(False)
    reference = comparable_reference(name)

    def check(samples, label):
        flat = reference_names({key: value.double().numpy() for key, value in samples.items()})
        for key, ref in reference.items():
            draws = torch.as_tensor(flat[key])
            ess = float(pyro.ops.stats.effective_sample_size(draws.unsqueeze(-1)))
            tolerance = 0.1 * ref.std() + 4.5 * ref.std() * math.sqrt(1 / ess + 1 / len(ref))
            error = abs(float(draws.mean()) - ref.mean())
            assert error < tolerance, (
                f"{label}, {key}: mean {float(draws.mean()):.4f}, reference {ref.mean():.4f}"
            )

    with (
        float64_default()
    ):  # Pyro's autoregressive inverse, which starts the chains, makes default-dtype zeros
        run_nfmala_and_neutra(model, data, guide, check)


def run_nfmala_and_neutra(model, data, guide, check):
    """NFMALA(model, flow=guide) and NUTS on NeuTraReparam(guide), each run's draws given to ``check``."""
    from pyro import poutine
    from pyro.infer import NUTS
    from pyro.infer.reparam import NeuTraReparam

    import pyro_nfmala

    mcmc = pyro_nfmala.MCMC(
        NFMALA(model, flow=guide), num_samples=1000, warmup_steps=300, num_chains=4, disable_progbar=True
    )
    mcmc.run(**data)
    check(mcmc.get_samples(group_by_chain=True), "NFMALA(flow=guide)")
    neutra = NeuTraReparam(guide)
    nuts = pyro.infer.MCMC(
        NUTS(poutine.reparam(model, config=lambda _: neutra)),
        num_samples=300,
        warmup_steps=200,
        num_chains=2,
        disable_progbar=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        nuts.run(**data)
    (latent,) = nuts.get_samples(group_by_chain=True).values()
    rows = [neutra.transform_sample(row) for row in latent.reshape(-1, latent.shape[-1])]
    samples = {
        key: torch.stack([row[key] for row in rows]).reshape(2, 300, *rows[0][key].shape) for key in rows[0]
    }
    check(samples, "NeuTra + NUTS")
