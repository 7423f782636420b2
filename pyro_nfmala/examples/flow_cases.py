r"""Posteriors where a Gaussian map is not enough, with data generated here (fixed seeds) and exact
or generated references: the benchmark rows of ``benchmarks/flow_cases.py``.

- :func:`funnel`: Neal's funnel written centred, :math:`\log\sigma \sim N(0, 3)`,
  :math:`x_i \sim N(0, e^{\log\sigma})`, :math:`i = 1..d`; its exact draws are the prior's
  (:func:`funnel_reference`);
- :func:`garch11`: a GARCH(1, 1) volatility model over a 200-step recursion, on returns generated
  from known parameters (:func:`garch_data`);
- :func:`approximate_gp`: a Gaussian-process regression approximated by Hilbert-space basis
  functions (Solin & Särkkä; Riutort-Mayol et al.), 66 parameters, on noisy draws of a smooth
  function (:func:`approximate_gp_data`);
- the centred eight schools is :func:`pyro_nfmala.examples.posteriordb.eight_schools_centered`.

Example:
    >>> data = garch_data()
    >>> data["y"].shape
    torch.Size([200])
"""

from __future__ import annotations

__all__ = [
    "CASES",
    "approximate_gp",
    "approximate_gp_data",
    "funnel",
    "funnel_reference",
    "garch11",
    "garch_data",
]

import math

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from ..model.recurrences import linear_recurrence


def funnel(d: int = 100) -> None:
    r"""Neal's funnel, centred: :math:`\log\sigma \sim N(0, 3)`, :math:`x_i \sim N(0, \sigma)`."""
    log_sigma = pyro.sample("log_sigma", dist.Normal(0.0, 3.0))
    with pyro.plate("i", d):
        pyro.sample("x", dist.Normal(0.0, log_sigma.exp()))


def funnel_reference(d: int = 100, n: int = 20000, seed: int = 0) -> dict[str, np.ndarray]:
    """Exact draws of :func:`funnel`'s posterior (its prior: there are no data)."""
    generator = np.random.default_rng(seed)
    log_sigma = 3.0 * generator.standard_normal(n)
    return {"log_sigma": log_sigma, "x": np.exp(log_sigma)[:, None] * generator.standard_normal((n, d))}


def garch_data(T: int = 200, seed: int = 1) -> dict[str, torch.Tensor | int]:
    r"""Returns of a GARCH(1, 1) with :math:`\mu = 0.5, \alpha_0 = 0.2, \alpha_1 = 0.3, \beta_1 = 0.5`."""
    generator = np.random.default_rng(seed)
    mu, alpha0, alpha1, beta1 = 0.5, 0.2, 0.3, 0.5
    y, sigma2 = np.zeros(T), alpha0 / (1 - alpha1 - beta1)
    for t in range(T):
        y[t] = mu + math.sqrt(sigma2) * generator.standard_normal()
        sigma2 = alpha0 + alpha1 * (y[t] - mu) ** 2 + beta1 * sigma2
    return {
        "T": T,
        "y": torch.tensor(y, dtype=torch.float64),
        "sigma1": torch.tensor(1.0, dtype=torch.float64),
    }


def garch11(T: int, y: torch.Tensor, sigma1: torch.Tensor) -> None:
    r"""GARCH(1, 1) as posteriordb's ``garch11.stan`` (flat priors made proper):

    .. math:: \mu \sim N(0, 10), \quad \alpha_0 \sim N^+(0, 10), \quad \alpha_1 \sim U(0, 1), \quad
              \beta_1 = (1 - \alpha_1) u, \; u \sim U(0, 1), \\
              \sigma_1 \text{ given}, \quad \sigma_t^2 = \alpha_0 + \alpha_1 (y_{t-1} - \mu)^2
              + \beta_1 \sigma_{t-1}^2, \quad y_t \sim N(\mu, \sigma_t).
    """
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 10.0))
    alpha0 = pyro.sample("alpha0", dist.HalfNormal(y.new_tensor(10.0)))
    alpha1 = pyro.sample("alpha1", dist.Uniform(y.new_tensor(0.0), 1.0))
    beta1_share = pyro.sample("beta1_share", dist.Uniform(y.new_tensor(0.0), 1.0))
    beta1 = pyro.deterministic("beta1", (1 - alpha1) * beta1_share)
    # the recursion as one parallel scan (linear_recurrence), not a Python loop over t: ~8 vectorized
    # steps for T = 200 instead of 200, the same sums
    first = (sigma1**2).expand(mu.shape).unsqueeze(-1)
    news = alpha0.unsqueeze(-1) + alpha1.unsqueeze(-1) * (y[: T - 1] - mu.unsqueeze(-1)) ** 2
    variance = linear_recurrence(beta1.unsqueeze(-1), torch.cat([first, news], -1))
    pyro.sample("y", dist.Normal(mu.unsqueeze(-1), variance.sqrt()).to_event(1), obs=y)


#: Basis functions of the approximate GP (with alpha, rho, sigma and the intercept: 66 parameters).
GP_BASIS = 62
#: The half-width of the approximate GP's domain, as a multiple of the inputs' half-range.
GP_BOUNDARY = 1.5


def approximate_gp_data(n: int = 100, seed: int = 2) -> dict[str, torch.Tensor]:
    r"""Noisy draws, :math:`y = \sin(3x) + x^2/2 + \epsilon`, :math:`\epsilon \sim N(0, 0.3)`, at ``n``
    inputs uniform in :math:`(-2, 2)`."""
    generator = np.random.default_rng(seed)
    x = np.sort(generator.uniform(-2, 2, n))
    y = np.sin(3 * x) + x**2 / 2 + 0.3 * generator.standard_normal(n)
    return {"x": torch.tensor(x, dtype=torch.float64), "y": torch.tensor(y, dtype=torch.float64)}


def approximate_gp(x: torch.Tensor, y: torch.Tensor) -> None:
    r"""A Hilbert-space approximate GP regression with a squared-exponential kernel:

    .. math:: f(x) = \sum_{m=1}^{M} \sqrt{S(\sqrt{\lambda_m})}\, \phi_m(x)\, \beta_m, \quad
              \phi_m(x) = L^{-1/2} \sin\bigl(\sqrt{\lambda_m}(x + L)\bigr), \quad
              \sqrt{\lambda_m} = \frac{m \pi}{2L}, \\
              S(\omega) = \alpha^2 \sqrt{2\pi}\, \rho\, e^{-\rho^2 \omega^2 / 2}, \quad
              \beta_m \sim N(0, 1), \; \alpha \sim N^+(0, 2), \; \rho \sim \mathrm{InvGamma}(5, 5),
              \; \sigma \sim N^+(0, 1), \; c \sim N(0, 5), \quad y \sim N(c + f(x), \sigma).
    """
    # tensors, not Python floats, so that the density can be traced (float() of a tensor cannot be)
    half_width = GP_BOUNDARY * x.abs().max()
    frequencies = torch.arange(1, GP_BASIS + 1, dtype=x.dtype) * math.pi / (2 * half_width)
    basis = torch.sin(frequencies * (x.unsqueeze(-1) + half_width)) / half_width.sqrt()  # (n, M)
    alpha = pyro.sample("alpha", dist.HalfNormal(x.new_tensor(2.0)))
    rho = pyro.sample("rho", dist.InverseGamma(x.new_tensor(5.0), x.new_tensor(5.0)))
    sigma = pyro.sample("sigma", dist.HalfNormal(x.new_tensor(1.0)))
    intercept = pyro.sample("intercept", dist.Normal(x.new_tensor(0.0), 5.0))
    beta = pyro.sample("beta", dist.Normal(x.new_zeros(GP_BASIS), 1.0).to_event(1))
    # sqrt(S(omega)) in log space: S underflows to 0 at long length scales, where sqrt's gradient is inf
    root_spectral = alpha.unsqueeze(-1) * (2 * math.pi) ** 0.25 * rho.unsqueeze(-1).sqrt()
    root_spectral = root_spectral * torch.exp(-0.25 * (rho.unsqueeze(-1) * frequencies) ** 2)
    f = ((root_spectral * beta).unsqueeze(-2) * basis).sum(-1)
    pyro.sample("y", dist.Normal(intercept.unsqueeze(-1) + f, sigma.unsqueeze(-1)).to_event(1), obs=y)


#: The benchmark cases, by name, each a model and a function that makes its data (keyword arguments).
CASES = {
    "funnel100": (funnel, lambda: {"d": 100}),
    "garch11": (garch11, garch_data),
    "approximate_gp": (approximate_gp, approximate_gp_data),
}
