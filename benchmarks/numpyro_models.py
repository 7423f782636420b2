"""The benchmark's models written in NumPyro, the same densities as the Pyro ones
(``pyro_nfmala.examples``), for the optional NumPyro NUTS column. Imported only when numpyro is installed."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from jax import lax

from pyro_nfmala.examples.flow_cases import GP_BASIS, GP_BOUNDARY, approximate_gp_data, garch_data
from pyro_nfmala.examples.posteriordb import load_data


def funnel(d=100):
    log_sigma = numpyro.sample("log_sigma", dist.Normal(0.0, 3.0))
    with numpyro.plate("i", d):
        numpyro.sample("x", dist.Normal(0.0, jnp.exp(log_sigma)))


def eight_schools_centered(J, sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("schools", J):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def garch11(T, y, sigma1):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    alpha0 = numpyro.sample("alpha0", dist.HalfNormal(10.0))
    alpha1 = numpyro.sample("alpha1", dist.Uniform(0.0, 1.0))
    beta1_share = numpyro.sample("beta1_share", dist.Uniform(0.0, 1.0))
    beta1 = numpyro.deterministic("beta1", (1 - alpha1) * beta1_share)

    def step(variance, previous):
        new = alpha0 + alpha1 * (previous - mu) ** 2 + beta1 * variance
        return new, new

    _, rest = lax.scan(step, sigma1**2, y[:-1])
    sigma = jnp.sqrt(jnp.concatenate([jnp.array([sigma1**2]), rest]))
    numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


def approximate_gp(x, y):
    half_width = GP_BOUNDARY * float(np.abs(x).max())
    frequencies = jnp.arange(1, GP_BASIS + 1) * math.pi / (2 * half_width)
    basis = jnp.sin(frequencies * (x[:, None] + half_width)) / math.sqrt(half_width)
    alpha = numpyro.sample("alpha", dist.HalfNormal(2.0))
    rho = numpyro.sample("rho", dist.InverseGamma(5.0, 5.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    intercept = numpyro.sample("intercept", dist.Normal(0.0, 5.0))
    beta = numpyro.sample("beta", dist.Normal(jnp.zeros(GP_BASIS), 1.0).to_event(1))
    root_spectral = alpha * (2 * math.pi) ** 0.25 * jnp.sqrt(rho) * jnp.exp(-0.25 * (rho * frequencies) ** 2)
    f = basis @ (root_spectral * beta)
    numpyro.sample("y", dist.Normal(intercept + f, sigma), obs=y)


def _numpy(data):
    return {key: (np.asarray(value) if hasattr(value, "numpy") else value) for key, value in data.items()}


#: name -> () -> (model, data as keyword arguments)
MODELS = {
    "funnel100": lambda: (funnel, {"d": 100}),
    "eight_schools_centered": lambda: (eight_schools_centered, _numpy(load_data("eight_schools"))),
    "garch11": lambda: (garch11, _numpy(garch_data())),
    "approximate_gp": lambda: (approximate_gp, _numpy(approximate_gp_data())),
}
