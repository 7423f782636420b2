"""Which models run for a batch of parameter points at once, and how: the share of the shared
posteriordb and inference-gym transcriptions, our own benchmark models, and models written as
Pyro's examples and tutorials write them (issue 35).

For each model, :func:`pyro_nfmala.model.density.model_density` is built on its data and says how a
batch of chains is evaluated:

- ``particle plate``: one run of the model inside an outer plate (the model broadcasts over a leading
  batch dimension of its parameters); the only batched way before issue 35;
- ``vmap``: the one-point model vectorized by ``torch.func.vmap`` (``x @ beta``, ``nn.Linear``,
  ``.expand([J]).to_event(1)`` of scalar hyperparameters, ``torch.mm``);
- ``point by point``: one model run per chain, with the reason each batched way failed.

Both batched ways are checked against Pyro's potential at three points when the density is built.
Then the value and gradient of 16 points are timed batched and point by point (eager, no tracing).

    python benchmarks/batched_share.py          # about a minute

Writes ``benchmarks/results/batched_share.{json,md}``. The posteriordb and inference-gym rows need
``$PYRO_NFMALA_POSTERIORDB`` and ``$PYRO_NFMALA_INFERENCE_GYM`` (skipped, and said so, without them).
"""

from __future__ import annotations

import json
import platform
import time
import warnings

from pathlib import Path

import pyro
import pyro.contrib.gp as gp
import pyro.distributions as dist
import torch

from pyro.nn import PyroModule, PyroSample
from torch import nn

from pyro_nfmala.examples import flow_cases, inference_gym, posteriordb
from pyro_nfmala.model.density import _ParticleModel, _VmappedModel, model_density

RESULTS = Path(__file__).resolve().parent / "results"
POINTS = 16


# ----------------------------------------------------------------------------------------------
# Models as Pyro's examples and tutorials write them, on generated data (a fixed seed)


class BayesianRegression(PyroModule):
    """Pyro's "Bayesian regression" tutorial: a ``PyroModule[nn.Linear]`` with ``PyroSample`` weights."""

    def __init__(self, in_features: int = 3) -> None:
        super().__init__()
        self.linear = PyroModule[nn.Linear](in_features, 1)
        self.linear.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, in_features]).to_event(2))
        self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([1]).to_event(1))

    def forward(self, x, y=None):
        sigma = pyro.sample("sigma", dist.Uniform(0.0, 10.0))
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mean, sigma), obs=y)


def rugged_regression(is_cont_africa, ruggedness, log_gdp=None):
    """Pyro's "Bayesian regression II" tutorial: scalar coefficients, the data in a plate."""
    a = pyro.sample("a", dist.Normal(0.0, 10.0))
    b_a = pyro.sample("bA", dist.Normal(0.0, 1.0))
    b_r = pyro.sample("bR", dist.Normal(0.0, 1.0))
    b_ar = pyro.sample("bAR", dist.Normal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.Uniform(0.0, 10.0))
    mean = a + b_a * is_cont_africa + b_r * ruggedness + b_ar * is_cont_africa * ruggedness
    with pyro.plate("data", len(ruggedness)):
        pyro.sample("obs", dist.Normal(mean, sigma), obs=log_gdp)


def baseball_partially_pooled(at_bats, hits=None):
    """Pyro's ``examples/baseball.py``, the partially pooled model (a Pareto concentration)."""
    m = pyro.sample("m", dist.Uniform(0.0, 1.0))
    kappa = pyro.sample("kappa", dist.Pareto(1.0, 1.5))
    with pyro.plate("num_players", at_bats.shape[0]):
        phi = pyro.sample("phi", dist.Beta(m * kappa, (1 - m) * kappa))
        pyro.sample("obs", dist.Binomial(at_bats, probs=phi), obs=hits)


def lkj_covariance(y):
    """Pyro's ``examples/lkj.py``: scales and an LKJ Cholesky factor, combined with ``torch.mm``."""
    d = y.shape[1]
    theta = pyro.sample("theta", dist.HalfCauchy(torch.ones(d, dtype=y.dtype)).to_event(1))
    l_omega = pyro.sample("L_omega", dist.LKJCholesky(d, torch.ones((), dtype=y.dtype)))
    l_full = torch.mm(torch.diag(theta.sqrt()), l_omega)
    with pyro.plate("observations", y.shape[0]):
        pyro.sample("obs", dist.MultivariateNormal(torch.zeros(d, dtype=y.dtype), scale_tril=l_full), obs=y)


@pyro.infer.config_enumerate
def gaussian_mixture(data):
    """Pyro's "Gaussian mixture model" tutorial: the assignments summed out by enumeration."""
    weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(2, dtype=data.dtype)))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
    with pyro.plate("components", 2):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


def gp_regression(x, y):
    """Pyro's "Gaussian processes" tutorial run by MCMC: ``pyro.contrib.gp``'s ``GPRegression`` with
    ``PyroSample`` priors on the kernel's hyperparameters and the noise."""
    kernel = gp.kernels.RBF(input_dim=1)
    kernel.variance = PyroSample(dist.LogNormal(torch.tensor(0.0), torch.tensor(1.0)))
    kernel.lengthscale = PyroSample(dist.LogNormal(torch.tensor(0.0), torch.tensor(1.0)))
    regression = gp.models.GPRegression(x, y, kernel)
    regression.noise = PyroSample(dist.LogNormal(torch.tensor(-2.0), torch.tensor(1.0)))
    return regression.model


def pyro_examples() -> dict:
    """``name -> (model, args)`` for the models above, on data drawn with a fixed seed."""
    torch.manual_seed(0)
    x = torch.randn(50, 3)
    africa = (torch.rand(50) < 0.3).float()
    rugged = torch.rand(50) * 3
    at_bats = torch.randint(10, 60, (18,)).float()
    y = torch.randn(60, 3)
    mixture = torch.cat([torch.randn(30) - 3, torch.randn(30) + 3])
    gp_x = torch.linspace(0, 5, 30)
    gp_model = gp_regression(gp_x, torch.sin(gp_x) + 0.2 * torch.randn(30))
    coefficients = torch.tensor([1.0, -1.0, 0.5])
    return {
        "Bayesian regression (PyroModule nn.Linear)": (BayesianRegression(), (x, x @ coefficients)),
        "Bayesian regression II (rugged)": (rugged_regression, (africa, rugged, 8 - 0.2 * rugged)),
        "baseball, partially pooled": (baseball_partially_pooled, (at_bats, (0.27 * at_bats).round())),
        "LKJ covariance (examples/lkj.py)": (lkj_covariance, (y,)),
        "Gaussian mixture (enumerated)": (gaussian_mixture, (mixture,)),
        "GP regression (pyro.contrib.gp)": (gp_model, ()),
    }


def shared_models() -> dict:
    """``name -> (model, kwargs)`` for the transcriptions of posteriordb and inference-gym, and ours."""
    models = {}
    if posteriordb.available():
        for name, model in posteriordb.MODELS.items():
            models[f"posteriordb {name}"] = (model, posteriordb.load_data(name, dtype=torch.float64))
        models["posteriordb eight_schools, vector spelling"] = (
            posteriordb.eight_schools_centered_vector,
            posteriordb.load_data("eight_schools", dtype=torch.float64),
        )
    else:
        print(f"posteriordb rows skipped: ${posteriordb.ENV_VAR} is not set")
    if inference_gym.available():
        names = ["german_credit_sparse_logistic", "stochastic_volatility_sp500_small", "item_response_theory"]
        for name in names:
            models[f"inference-gym {name}"] = (
                inference_gym.MODELS[name],
                inference_gym.load_data(name, dtype=torch.float64),
            )
    else:
        print(f"inference-gym rows skipped: ${inference_gym.ENV_VAR} is not set")
    models["ours: Brownian motion, unknown scales"] = (
        inference_gym.brownian_motion_unknown_scales,
        inference_gym.brownian_motion_data(dtype=torch.float64),
    )
    for name, (model, make_data) in flow_cases.CASES.items():
        models[f"ours: {name}"] = (model, make_data())
    return models


def how_batched(model, args: tuple, kwargs: dict) -> dict:
    """How ``model_density`` evaluates a batch, and the time of a value and gradient of ``POINTS`` points
    batched and point by point (eager)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        density = model_density(model, args, kwargs, trace_density=False)
    ways = {_ParticleModel: "particle plate", _VmappedModel: "vmap"}
    way = ways.get(type(density.particles), "point by point")
    generator = torch.Generator().manual_seed(0)
    start = density.layout.pack(density.initial_params).detach()
    x = start + 0.05 * torch.randn((POINTS, density.layout.dim), generator=generator, dtype=start.dtype)

    def value_and_grad(log_prob) -> float:
        t = time.perf_counter()
        for _ in range(3):
            point = x.clone().requires_grad_(True)
            torch.autograd.grad(log_prob(point).sum(), point)
        return (time.perf_counter() - t) / 3

    batched = value_and_grad(density.log_prob) if density.vectorized else None
    pointwise = value_and_grad(density.point_log_prob)
    return {
        "dim": density.layout.dim,
        "way": way,
        "why not": "; ".join(density.unbatched_reasons),
        "batched ms": None if batched is None else 1e3 * batched,
        "point by point ms": 1e3 * pointwise,
    }


def markdown(rows: dict) -> str:
    ways = [row["way"] for row in rows.values()]
    count = len(ways)
    plate = ways.count("particle plate")
    batched = plate + ways.count("vmap")
    lines = [
        f"Batched before (particle plate only): {plate} of {count}; now (particle plate or vmap): "
        f"{batched} of {count}. Value and gradient of {POINTS} points, eager, one thread.",
        "",
        "| model | d | how a batch runs | batched ms | point by point ms | why not batched |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in rows.items():
        batched_ms = "" if row["batched ms"] is None else f"{row['batched ms']:.1f}"
        why = row["why not"].replace("|", "/")
        pointwise_ms = f"{row['point by point ms']:.1f}"
        lines.append(f"| {name} | {row['dim']} | {row['way']} | {batched_ms} | {pointwise_ms} | {why} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    rows = {}
    cases = {name: (model, (), kwargs) for name, (model, kwargs) in shared_models().items()}
    cases.update({name: (model, args, {}) for name, (model, args) in pyro_examples().items()})
    for name, (model, args, kwargs) in cases.items():
        pyro.clear_param_store()
        rows[name] = how_batched(model, args, kwargs)
        print(f"{name}: {rows[name]['way']}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    header = {"machine": platform.machine(), "torch": torch.__version__, "pyro": pyro.__version__}
    (RESULTS / "batched_share.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    table = markdown(rows)
    (RESULTS / "batched_share.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
