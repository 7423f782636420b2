"""The traced log density (pyro_nfmala.engine.traced): the same values and gradients as the model in float64
at points other than the one traced, eager where it cannot be right (a model that branches on a parameter's
value, a disagreeing graph: the negative control), errors and Hessians that are the model's own, and
chains that do not change when it is switched on."""

import pickle
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
import zuko

from pyro_nfmala import NFMALA, PosteriorPullback
from pyro_nfmala.engine.traced import TracedLogProb
from pyro_nfmala.examples.posteriordb import MODELS, eight_schools_data, load_data
from pyro_nfmala.model.density import model_density


def value_and_grad(log_prob, x):
    x = x.detach().requires_grad_(True)
    value = log_prob(x)
    (grad,) = torch.autograd.grad(value.sum(), x)
    return value.detach(), grad


def posteriordb_density(name):
    if name == "eight_schools":
        data = eight_schools_data(torch.float64)
    else:
        data = load_data(name, dtype=torch.float64)
    return model_density(MODELS[name], (), data, trace_density=True)


def near(density, n=4, scale=0.3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x0 = density.layout.pack(density.initial_params).detach().double()
    return x0 + scale * torch.randn(n, len(x0), dtype=torch.float64, generator=generator)


@pytest.mark.posteriordb
@pytest.mark.parametrize("name", ["eight_schools", "gp_pois_regr", "hmm_example", "low_dim_gauss_mix"])
def test_traced_values_and_gradients_equal_the_models_away_from_the_traced_point(name):
    density = posteriordb_density(name)
    density.traced.trace_after = 1
    traced_value, _ = value_and_grad(density.log_prob, near(density, seed=0))  # traces this shape
    assert density.traced.traced_shapes == [(4, density.layout.dim)]
    x = near(density, seed=1)
    value, grad = value_and_grad(density.log_prob, x)
    expected_value, expected_grad = value_and_grad(density._eager_log_prob, x)
    assert torch.allclose(value, expected_value, rtol=1e-12, atol=1e-10)
    assert torch.allclose(grad, expected_grad, rtol=1e-10, atol=1e-10)
    assert torch.isfinite(traced_value).all()


def branching(y):
    """A model whose Python branches on a parameter's value: a trace would freeze one branch."""
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0 if scale > 1.0 else 2.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(loc, scale), obs=y)


def test_a_model_that_branches_on_a_parameter_stays_eager_and_right_on_both_branches():
    density = model_density(branching, (torch.randn(10, dtype=torch.float64),), trace_density=True)
    density.traced.trace_after = 1
    x = torch.tensor([[1.0, 0.3], [-1.0, 0.3]], dtype=torch.float64)  # scale e and 1/e: both branches
    value = density.log_prob(x)
    assert density.traced.eager_shapes == [(2, 2)] and density.traced.traced_shapes == []
    assert torch.allclose(value, density.point_log_prob(x))


def test_a_graph_that_disagrees_with_the_model_is_refused(monkeypatch):
    """The negative control of the agreement check: a graph off by 1e-4 must stay unused."""
    import pyro_nfmala.engine.traced as traced_module

    real = traced_module._interpreted

    def off(graph, x):
        run = real(graph, x)
        return lambda point: tuple(t + 1e-4 for t in run(point))

    monkeypatch.setattr(traced_module, "_interpreted", off)
    traced = TracedLogProb(lambda x: -0.5 * (x**2).sum(-1), trace_after=1)
    x = torch.randn(3, 2, dtype=torch.float64)
    assert torch.allclose(traced(x), -0.5 * (x**2).sum(-1), rtol=0, atol=0)
    assert traced.eager_shapes == [(3, 2)]
    monkeypatch.setattr(traced_module, "_interpreted", real)
    agreeing = TracedLogProb(lambda x: -0.5 * (x**2).sum(-1), trace_after=1)
    agreeing(x)
    assert agreeing.traced_shapes == [(3, 2)]


def test_a_shape_is_traced_only_once_evaluated_often():
    traced = TracedLogProb(lambda x: -(x**2).sum(-1), trace_after=3)
    x = torch.randn(5, 2)
    for _ in range(2):
        traced(x)
    assert traced.traced_shapes == []
    traced(x)
    assert traced.traced_shapes == [(5, 2)]
    traced(torch.randn(2, 2))
    assert traced.traced_shapes == [(5, 2)]


def cholesky_model(y):
    """A correlation ``2 tanh(u / 10)`` that leaves (-1, 1) for ``|u| > 5.5``: the Cholesky factorization
    inside the model raises there."""
    u = pyro.sample("u", dist.Normal(torch.zeros((), dtype=y.dtype), 1.0))
    rho = (2 * torch.tanh(u / 10)).unsqueeze(-1).unsqueeze(-1)
    eye = torch.eye(2, dtype=y.dtype)
    scale_tril = torch.linalg.cholesky(eye + rho * (1 - eye))
    pyro.sample("y", dist.MultivariateNormal(torch.zeros_like(y), scale_tril=scale_tril), obs=y)


def test_an_error_inside_the_graph_is_the_models_own_error():
    y = torch.tensor([0.3, -0.2], dtype=torch.float64)
    density = model_density(cholesky_model, (y,))
    density.traced.trace_after = 1
    density.log_prob(torch.tensor([[0.1]], dtype=torch.float64))
    assert density.traced.traced_shapes == [(1, 1)]
    bad = torch.tensor([[8.0]], dtype=torch.float64)
    with pytest.raises(Exception) as traced_error:
        density.log_prob(bad)
    with pytest.raises(Exception) as eager_error:
        density._eager_log_prob(bad)
    assert type(traced_error.value) is type(eager_error.value) is torch.linalg.LinAlgError


def test_second_derivatives_go_through_the_model():
    density = posteriordb_density("eight_schools")
    density.traced.trace_after = 1
    x = near(density, n=1)
    density.log_prob(x)  # traced
    assert density.traced.traced_shapes == [(1, 10)]
    hessian = torch.autograd.functional.hessian(lambda v: density.log_prob(v[None])[0], x[0])
    expected = torch.autograd.functional.hessian(lambda v: density._eager_log_prob(v[None])[0], x[0])
    assert torch.allclose(hessian, expected, rtol=1e-10, atol=1e-10)


def standard_normal(x):
    return -0.5 * (x**2).sum(-1)


def test_a_pickled_copy_forgets_its_graphs():
    """Pyro pickles kernels for parallel chains: the copy traces again in its own process."""
    traced = TracedLogProb(standard_normal, trace_after=1)
    traced(torch.randn(3, 2))
    copy = pickle.loads(pickle.dumps(traced))
    assert copy.traced_shapes == [] and traced.traced_shapes == [(3, 2)]
    x = torch.randn(3, 2)
    assert torch.allclose(copy(x), standard_normal(x)) and copy.traced_shapes == [(3, 2)]


class Tempered:
    """A density whose temperature is Python state: changed after tracing, the spot check must see it."""

    def __init__(self) -> None:
        self.temperature = 1.0

    def __call__(self, x):
        return -0.5 * (x**2).sum(-1) / self.temperature


def test_a_density_changed_after_tracing_is_caught_by_a_spot_check(monkeypatch):
    monkeypatch.setattr("pyro_nfmala.engine.traced.CHECK_EVERY", 5)
    density = Tempered()
    traced = TracedLogProb(density, trace_after=1)
    x = torch.randn(3, 2, dtype=torch.float64)
    for _ in range(10):  # spot checks pass while nothing changes
        traced(x)
    assert traced.traced_shapes == [(3, 2)]
    density.temperature = 2.0
    with pytest.warns(RuntimeWarning, match="spot check"):
        for _ in range(5):
            value = traced(x)
    assert torch.allclose(value, density(x)) and traced.eager_shapes == [(3, 2)]


@pytest.mark.posteriordb
def test_nfmala_draws_the_same_chain_traced_or_not():
    data = load_data("kidiq_with_mom_work", dtype=torch.float64)
    draws = []
    for trace_density in (True, False):
        pyro.set_rng_seed(0)
        kernel = NFMALA(
            MODELS["kidiq_with_mom_work"], fit_options={"progress": False}, trace_density=trace_density
        )
        mcmc = pyro.infer.MCMC(kernel, num_samples=150, warmup_steps=150, disable_progbar=True)
        mcmc.run(**data)
        draws.append(mcmc.get_samples()["beta"])
    assert kernel.fit_result is not None
    assert torch.allclose(draws[0], draws[1], rtol=1e-6, atol=1e-6)


def test_a_whole_target_evaluation_traced_equals_autograd_and_the_inner_density_runs_inside_it():
    """The flow's pass, the density and both gradients as one graph: float64 agreement with autograd away
    from the traced point, and the model's own traced density not traced apart (it runs inside)."""
    density = posteriordb_density("eight_schools")
    flow = zuko.flows.RealNVP(density.layout.dim, transforms=2).double().requires_grad_(False)
    target = PosteriorPullback(flow, density.log_prob, trace=True)
    target._traced.trace_after = 1
    generator = torch.Generator().manual_seed(0)
    target.evaluate(torch.randn(4, 10, dtype=torch.float64, generator=generator))
    assert target._traced.traced_shapes == [(4, 10)] and density.traced.traced_shapes == []
    z = torch.randn(4, 10, dtype=torch.float64, generator=generator)
    untraced = PosteriorPullback(flow, density._eager_log_prob)
    for got, want in zip(target.evaluate(z), untraced.evaluate(z)):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # the graph reads the flow's parameters, not copies of them
        next(flow.parameters()).add_(0.1)
    for got, want in zip(target.evaluate(z), untraced.evaluate(z)):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)


def test_a_density_that_reads_a_tensor_in_python_says_which_line_and_a_tensor_one_traces():
    data = torch.tensor([1.0, -3.0, 2.0], dtype=torch.float64)

    def reads_a_float(x):
        scale = float(data.abs().max())  # the line the warning names
        return -0.5 * (x**2).sum(-1) / scale

    def stays_a_tensor(x):
        return -0.5 * (x**2).sum(-1) / data.abs().max()

    x = torch.randn(4, 2, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eager = TracedLogProb(reads_a_float, trace_after=1)
        assert torch.allclose(eager(x), reads_a_float(x)) and eager.eager_shapes == [(4, 2)]
        traced = TracedLogProb(stays_a_tensor, trace_after=1)
        assert torch.allclose(traced(x), stays_a_tensor(x)) and traced.traced_shapes == [(4, 2)]
    said = [str(w.message) for w in caught if "cannot be traced" in str(w.message)]
    assert len(said) == 1 and "float(data.abs().max())" in said[0] and "torch.where" in said[0]
