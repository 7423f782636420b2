"""The benchmark's models written in NumPyro, the same densities as the Pyro ones
(``pyro_nfmala.examples``), for the optional NumPyro NUTS column. Imported only when numpyro is installed."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import torch

from jax import lax, random
from jax.scipy.special import logsumexp

from pyro_nfmala.examples import inference_gym
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


def eight_schools_centered_vector(J, sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    theta = numpyro.sample("theta", dist.Normal(mu, tau).expand([J]).to_event(1))
    numpyro.sample("y", dist.Normal(theta, sigma).to_event(1), obs=y)


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


# ----------------------------------------------------------------------------------------------
# the ten posteriordb models of ``pyro_nfmala.examples.posteriordb.MODELS``, transcribed site for
# site (names, distributions, supports, plates and data keywords as in the Pyro models)


class OrderedNormal(dist.Distribution):
    """``size`` iid ``Normal(loc, scale)`` values, sorted (density ``size! prod N``), as the Pyro one."""

    support = dist.constraints.ordered_vector
    arg_constraints = {}

    def __init__(self, loc, scale, size, validate_args=None):
        self.loc, self.scale, self.size = loc, scale, size
        super().__init__(batch_shape=(), event_shape=(size,), validate_args=validate_args)

    def sample(self, key, sample_shape=()):
        draws = self.loc + self.scale * random.normal(key, tuple(sample_shape) + (self.size,))
        return jnp.sort(draws, -1)

    def log_prob(self, value):
        return dist.Normal(self.loc, self.scale).log_prob(value).sum(-1) + math.lgamma(self.size + 1)


def low_dim_gauss_mix(N, y):
    """A two-component mixture with ordered means."""
    mu = numpyro.sample("mu", OrderedNormal(0.0, 2.0, 2))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0).expand([2]).to_event(1))
    theta = numpyro.sample("theta", dist.Beta(5.0, 5.0))
    weights = jnp.stack([theta, 1 - theta], -1)
    with numpyro.plate("data", N):
        numpyro.sample("y", dist.MixtureSameFamily(dist.Categorical(weights), dist.Normal(mu, sigma)), obs=y)


def _linear(beta, *columns):
    loc = beta[..., 0]
    for k, column in enumerate(columns, 1):
        loc = loc + beta[..., k] * column
    return loc


def _flat_regression(observed, y, *columns):
    """``y ~ normal(beta[1] + beta[2] * columns[1] + ..., sigma)``, flat priors on ``beta``, ``sigma > 0``."""
    beta = numpyro.sample("beta", dist.ImproperUniform(dist.constraints.real, (), (len(columns) + 1,)))
    sigma = numpyro.sample("sigma", dist.ImproperUniform(dist.constraints.positive, (), ()))
    with numpyro.plate("data", len(y)):
        numpyro.sample(observed, dist.Normal(_linear(beta, *columns), sigma), obs=y)


def kilpisjarvi(N, x, y, pmualpha, psalpha, pmubeta, psbeta, xpred=None):
    """A linear trend on years (not centred); ``xpred`` is unused."""
    alpha = numpyro.sample("alpha", dist.Normal(pmualpha, psalpha))
    beta = numpyro.sample("beta", dist.Normal(pmubeta, psbeta))
    sigma = numpyro.sample("sigma", dist.ImproperUniform(dist.constraints.positive, (), ()))
    with numpyro.plate("data", N):
        numpyro.sample("y", dist.Normal(alpha + beta * x, sigma), obs=y)


def logearn_interaction(N, earn, height, male):
    """log earnings on height, sex and their interaction, flat priors."""
    _flat_regression("log_earn", jnp.log(earn), height, male, height * male)


def kidscore_mom_work(N, kid_score, mom_work, mom_hs=None, mom_iq=None):
    """kid_score on indicators of mom_work = 2, 3, 4, flat priors; ``mom_hs``, ``mom_iq`` unused."""
    work2, work3, work4 = ((mom_work == w).astype(kid_score.dtype) for w in (2, 3, 4))
    _flat_regression("kid_score", kid_score, work2, work3, work4)


def logmesquite_logvas(N, weight, diam1, diam2, canopy_height, total_height, density, group):
    """log weight on log canopy volume, area, shape, total height, density and group, flat priors."""
    _flat_regression(
        "log_weight",
        jnp.log(weight),
        jnp.log(diam1 * diam2 * canopy_height),
        jnp.log(diam1 * diam2),
        jnp.log(diam1 / diam2),
        jnp.log(total_height),
        jnp.log(density),
        group,
    )


def nes(N, partyid7, real_ideo, race_adj, educ1, gender, income, age_discrete, year=None):
    """partyid7 on 8 predictors (age as indicators), flat priors; ``year`` unused."""
    age30_44, age45_64, age65up = ((age_discrete == a).astype(partyid7.dtype) for a in (2, 3, 4))
    _flat_regression(
        "partyid7", partyid7, real_ideo, race_adj, age30_44, age45_64, age65up, educ1, gender, income
    )


def arma11(T, y):
    """ARMA(1, 1) with ``err_0 = 0``, the recursion for ``nu`` by ``lax.scan``."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    phi = numpyro.sample("phi", dist.Normal(0.0, 2.0))
    theta = numpyro.sample("theta", dist.Normal(0.0, 2.0))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))

    def step(nu, previous):
        new = mu + phi * previous + theta * (previous - nu)
        return new, new

    nu1 = mu + phi * mu
    _, rest = lax.scan(step, nu1, y[: T - 1])
    nu = jnp.concatenate([nu1[None], rest])
    numpyro.sample("y", dist.Normal(nu, sigma).to_event(1), obs=y)


def gp_pois_regr(N, x, k, y=None):
    """A latent GP (non-centred, ``f = L f_tilde``) with Poisson counts; ``y`` is unused."""
    rho = numpyro.sample("rho", dist.Gamma(25.0, 4.0))
    alpha = numpyro.sample("alpha", dist.HalfNormal(2.0))
    with numpyro.plate("data", N):
        f_tilde = numpyro.sample("f_tilde", dist.Normal(0.0, 1.0))
        cov = alpha**2 * jnp.exp(-((x[:, None] - x[None, :]) ** 2) / (2 * rho**2))
        cholesky = jnp.linalg.cholesky(cov + 1e-10 * jnp.eye(len(x)))
        f = numpyro.deterministic("f", cholesky @ f_tilde)
        numpyro.sample("k", dist.Poisson(jnp.exp(f)), obs=k)


def hmm_example(N, K, y):
    """A two-state HMM, the states summed out by the forward algorithm (``lax.scan``, logsumexp)."""
    theta1 = numpyro.sample("theta1", dist.Dirichlet(jnp.ones(K)))
    theta2 = numpyro.sample("theta2", dist.Dirichlet(jnp.ones(K)))
    mu = numpyro.sample("mu", dist.ImproperUniform(dist.constraints.positive_ordered_vector, (), (K,)))
    numpyro.factor("mu_prior", dist.Normal(3.0, 1.0).log_prob(mu[0]) + dist.Normal(10.0, 1.0).log_prob(mu[1]))
    log_theta = jnp.log(jnp.stack([theta1, theta2], -2))  # [j, k]: from state j to state k
    log_emission = dist.Normal(mu, 1.0).log_prob(y[:, None])  # (N, K)

    def step(gamma, emission):
        return logsumexp(gamma[:, None] + log_theta, -2) + emission, None

    gamma, _ = lax.scan(step, log_emission[0], log_emission[1:])
    numpyro.factor("forward", logsumexp(gamma, -1))


def _numpy(data):
    return {key: (np.asarray(value) if hasattr(value, "numpy") else value) for key, value in data.items()}


#: name -> () -> (model, data as keyword arguments)
MODELS = {
    "funnel100": lambda: (funnel, {"d": 100}),
    "eight_schools_centered": lambda: (eight_schools_centered, _numpy(load_data("eight_schools"))),
    "garch11": lambda: (garch11, _numpy(garch_data())),
    "approximate_gp": lambda: (approximate_gp, _numpy(approximate_gp_data())),
}


def _posteriordb(model, name):
    return lambda: (model, _numpy(load_data(name, dtype=torch.float64)))


#: the ten posteriordb models (as ``pyro_nfmala.examples.posteriordb.MODELS``): name -> () -> (model,
#: float64 data as keyword arguments)
POSTERIORDB_MODELS = {
    "eight_schools": _posteriordb(eight_schools_centered, "eight_schools"),
    "low_dim_gauss_mix": _posteriordb(low_dim_gauss_mix, "low_dim_gauss_mix"),
    "kilpisjarvi_mod": _posteriordb(kilpisjarvi, "kilpisjarvi_mod"),
    "earnings": _posteriordb(logearn_interaction, "earnings"),
    "kidiq_with_mom_work": _posteriordb(kidscore_mom_work, "kidiq_with_mom_work"),
    "mesquite": _posteriordb(logmesquite_logvas, "mesquite"),
    "nes2000": _posteriordb(nes, "nes2000"),
    "arma": _posteriordb(arma11, "arma"),
    "gp_pois_regr": _posteriordb(gp_pois_regr, "gp_pois_regr"),
    "hmm_example": _posteriordb(hmm_example, "hmm_example"),
}


# ----------------------------------------------------------------------------------------------
# inference-gym's four posteriors and the Brownian motion of ``pyro_nfmala.examples.inference_gym``,
# transcribed site for site (names, distributions, supports and data keywords as in the Pyro models,
# so that NUTS draws are scored by ``inference_gym.standardized_errors``)


class AR1(dist.Distribution):
    """A Gaussian AR(1) path of ``num_steps`` as one event: ``x_0 ~ N(loc, initial_scale)`` (default: the
    stationary sd ``scale / sqrt(1 - persistence^2)``), ``x_t ~ N(loc + persistence (x_{t-1} - loc),
    scale)``; the log density vectorized over time, sampling by ``lax.scan`` (as the Pyro one)."""

    support = dist.constraints.real_vector
    arg_constraints = {}

    def __init__(self, loc, persistence, scale, num_steps, initial_scale=None, validate_args=None):
        if initial_scale is None:
            initial_scale = scale / jnp.sqrt(1 - persistence**2)
        self.loc, self.persistence, self.scale, self.initial_scale = jnp.broadcast_arrays(
            loc, persistence, scale, initial_scale
        )
        self.num_steps = num_steps
        super().__init__(jnp.shape(self.loc), (num_steps,), validate_args=validate_args)

    def sample(self, key, sample_shape=()):
        shape = tuple(sample_shape) + self.batch_shape
        noise = random.normal(key, (self.num_steps,) + shape)

        def step(previous, innovation):
            new = self.loc + self.persistence * (previous - self.loc) + self.scale * innovation
            return new, new

        first = self.loc + self.initial_scale * noise[0]
        _, rest = lax.scan(step, first, noise[1:])
        return jnp.moveaxis(jnp.concatenate([first[None], rest]), 0, -1)

    def log_prob(self, value):
        loc, persistence = self.loc[..., None], self.persistence[..., None]
        first = dist.Normal(self.loc, self.initial_scale).log_prob(value[..., 0])
        innovations = value[..., 1:] - loc - persistence * (value[..., :-1] - loc)
        return first + dist.Normal(0.0, self.scale[..., None]).log_prob(innovations).sum(-1)


def logistic_regression(features, labels=None):
    """German credit's plain logistic regression: N(0, 1) weights."""
    weights = numpyro.sample("weights", dist.Normal(jnp.zeros(features.shape[-1]), 1.0).to_event(1))
    with numpyro.plate("data", features.shape[0]):
        numpyro.sample("labels", dist.Bernoulli(logits=features @ weights), obs=labels)


def regression(x, y):
    """beta ~ N(0, I), y ~ N(x beta, 1): ``front_ends.regression``."""
    beta = numpyro.sample("beta", dist.Normal(jnp.zeros(x.shape[-1]), 1.0).to_event(1))
    with numpyro.plate("data", len(y)):
        numpyro.sample("y", dist.Normal(x @ beta, 1.0), obs=y)


def sparse_logistic_regression(features, labels=None):
    """Sparse logistic regression: Gamma(1/2, 1/2) global and local scales on N(0, 1) weights."""
    global_scale = numpyro.sample("global_scale", dist.Gamma(0.5, 0.5))
    with numpyro.plate("features", features.shape[-1]):
        local_scales = numpyro.sample("local_scales", dist.Gamma(0.5, 0.5))
        unscaled_weights = numpyro.sample("unscaled_weights", dist.Normal(0.0, 1.0))
    weights = unscaled_weights * local_scales * global_scale
    with numpyro.plate("data", features.shape[0]):
        numpyro.sample("labels", dist.Bernoulli(logits=features @ weights), obs=labels)


def stochastic_volatility(returns):
    """Stochastic volatility: persistence ``2u - 1``, ``u ~ Beta(20, 1.5)`` (a site on (-1, 1)), AR(1) log
    volatility, ``r_t ~ N(0, exp(h_t / 2))``."""
    persistence = numpyro.sample(
        "persistence_of_volatility",
        dist.TransformedDistribution(
            dist.Beta(20.0, 1.5),
            dist.transforms.AffineTransform(-1.0, 2.0, domain=dist.constraints.unit_interval),
        ),
    )
    mean_log_volatility = numpyro.sample("mean_log_volatility", dist.Cauchy(0.0, 5.0))
    shock_scale = numpyro.sample("white_noise_shock_scale", dist.HalfCauchy(2.0))
    log_volatility = numpyro.sample(
        "log_volatility", AR1(mean_log_volatility, persistence, shock_scale, returns.shape[-1])
    )
    numpyro.sample("returns", dist.Normal(0.0, jnp.exp(log_volatility / 2)).to_event(1), obs=returns)


def item_response_theory(student_ids, question_ids, correct=None, num_students=None, num_questions=None):
    """One-parameter item response theory: ``logit P(correct) = m + a[student] - d[question]``."""
    num_students = int(np.max(student_ids)) + 1 if num_students is None else num_students
    num_questions = int(np.max(question_ids)) + 1 if num_questions is None else num_questions
    mean_ability = numpyro.sample("mean_student_ability", dist.Normal(0.75, 1.0))
    with numpyro.plate("students", num_students):
        ability = numpyro.sample("centered_student_ability", dist.Normal(0.0, 1.0))
    with numpyro.plate("questions", num_questions):
        difficulty = numpyro.sample("question_difficulty", dist.Normal(0.0, 1.0))
    logits = mean_ability + ability[student_ids] - difficulty[question_ids]
    with numpyro.plate("answers", len(student_ids)):
        numpyro.sample("correct", dist.Bernoulli(logits=logits), obs=correct)


def brownian_motion_unknown_scales(observations):
    """A Brownian motion (Gaussian random walk from N(0, s_x)) with LogNormal(0, 2) innovation and observation
    scales, observed where ``observations`` is not NaN (the rest masked out)."""
    innovation_scale = numpyro.sample("innovation_scale", dist.LogNormal(0.0, 2.0))
    observation_scale = numpyro.sample("observation_scale", dist.LogNormal(0.0, 2.0))
    x = numpyro.sample(
        "x", AR1(0.0, 1.0, innovation_scale, observations.shape[-1], initial_scale=innovation_scale)
    )
    observed = ~jnp.isnan(observations)
    numpyro.sample(
        "observations",
        dist.Normal(x, observation_scale).mask(observed).to_event(1),
        obs=jnp.where(observed, observations, 0.0),
    )


def _inference_gym(model, name):
    if name == "brownian_motion_unknown_scales":
        return lambda: (model, _numpy(inference_gym.brownian_motion_data()))
    return lambda: (model, _numpy(inference_gym.load_data(name, dtype=torch.float64)))


#: inference-gym's four posteriors (as ``pyro_nfmala.examples.inference_gym.MODELS``) and the Brownian motion
#: with unknown scales: name -> () -> (model, float64 data as keyword arguments; ids int64)
INFERENCE_GYM_MODELS = {
    "german_credit_sparse_logistic": _inference_gym(
        sparse_logistic_regression, "german_credit_sparse_logistic"
    ),
    "stochastic_volatility_sp500_small": _inference_gym(
        stochastic_volatility, "stochastic_volatility_sp500_small"
    ),
    "stochastic_volatility_sp500": _inference_gym(stochastic_volatility, "stochastic_volatility_sp500"),
    "item_response_theory": _inference_gym(item_response_theory, "item_response_theory"),
    "brownian_motion_unknown_scales": _inference_gym(
        brownian_motion_unknown_scales, "brownian_motion_unknown_scales"
    ),
}
