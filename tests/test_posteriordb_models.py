"""posteriordb's ten posteriors: each Pyro model against an independent NumPy transcription of its
Stan ``target`` at reference draws, vectorized densities, and the reference round trip."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pyro
import pytest
import torch

from pyro_nfmala.examples.posteriordb import (
    MODELS,
    POSTERIORS,
    comparable_reference,
    data_dir,
    derived,
    load_data,
    load_reference,
    reference_samples,
    standardized_errors,
)
from pyro_nfmala.model.density import model_density

NAMES = list(POSTERIORS)


def test_every_posterior_has_a_model():
    assert sorted(MODELS) == sorted(POSTERIORS) and len(NAMES) == 10


# ----------------------------------------------------------------------------------------------
# Stan's ``target`` in NumPy, written from the .stan files (constants dropped where Stan drops them)


def normal_lpdf(y, mu, sigma):
    return -0.5 * ((y - mu) / sigma) ** 2 - np.log(sigma)


def log_sum_exp(a, axis=-1):
    top = a.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(a - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def stan_eight_schools_centered(d, p):
    target = -np.log1p((p["tau"] / 5) ** 2)  # tau ~ cauchy(0, 5), tau > 0
    target += normal_lpdf(p["theta"], p["mu"], p["tau"]).sum()
    target += normal_lpdf(d["y"], p["theta"], d["sigma"]).sum()
    return target + normal_lpdf(p["mu"], 0, 5)


def stan_low_dim_gauss_mix(d, p):
    mu, sigma, theta = p["mu"], p["sigma"], p["theta"]
    target = normal_lpdf(sigma, 0, 2).sum() + normal_lpdf(mu, 0, 2).sum()
    target += 4 * np.log(theta) + 4 * np.log(1 - theta)
    lp1 = np.log(theta) + normal_lpdf(d["y"], mu[0], sigma[0])
    lp2 = np.log(1 - theta) + normal_lpdf(d["y"], mu[1], sigma[1])
    return target + np.logaddexp(lp1, lp2).sum()


def stan_kilpisjarvi(d, p):
    target = normal_lpdf(p["alpha"], d["pmualpha"], d["psalpha"])
    target += normal_lpdf(p["beta"], d["pmubeta"], d["psbeta"])
    return target + normal_lpdf(d["y"], p["alpha"] + p["beta"] * d["x"], p["sigma"]).sum()


def stan_logearn_interaction(d, p):
    b = p["beta"]
    log_earn, inter = np.log(d["earn"]), d["height"] * d["male"]
    return normal_lpdf(
        log_earn, b[0] + b[1] * d["height"] + b[2] * d["male"] + b[3] * inter, p["sigma"]
    ).sum()


def stan_kidscore_mom_work(d, p):
    b = p["beta"]
    work2, work3, work4 = (1.0 * (d["mom_work"] == w) for w in (2, 3, 4))
    loc = b[0] + b[1] * work2 + b[2] * work3 + b[3] * work4
    return normal_lpdf(d["kid_score"], loc, p["sigma"]).sum()


def stan_logmesquite_logvas(d, p):
    b = p["beta"]
    loc = (
        b[0]
        + b[1] * np.log(d["diam1"] * d["diam2"] * d["canopy_height"])
        + b[2] * np.log(d["diam1"] * d["diam2"])
        + b[3] * np.log(d["diam1"] / d["diam2"])
        + b[4] * np.log(d["total_height"])
        + b[5] * np.log(d["density"])
        + b[6] * d["group"]
    )
    return normal_lpdf(np.log(d["weight"]), loc, p["sigma"]).sum()


def stan_nes(d, p):
    b = p["beta"]
    age30_44, age45_64, age65up = (1.0 * (d["age_discrete"] == a) for a in (2, 3, 4))
    loc = (
        b[0]
        + b[1] * d["real_ideo"]
        + b[2] * d["race_adj"]
        + b[3] * age30_44
        + b[4] * age45_64
        + b[5] * age65up
        + b[6] * d["educ1"]
        + b[7] * d["gender"]
        + b[8] * d["income"]
    )
    return normal_lpdf(d["partyid7"], loc, p["sigma"]).sum()


def stan_arma11(d, p):
    y, mu, phi, theta, sigma = d["y"], p["mu"], p["phi"], p["theta"], p["sigma"]
    err = np.empty(d["T"])
    nu = mu + phi * mu
    err[0] = y[0] - nu
    for t in range(1, d["T"]):
        nu = mu + phi * y[t - 1] + theta * err[t - 1]
        err[t] = y[t] - nu
    target = normal_lpdf(mu, 0, 10) + normal_lpdf(phi, 0, 2) + normal_lpdf(theta, 0, 2)
    target += -np.log1p((sigma / 2.5) ** 2)  # sigma ~ cauchy(0, 2.5), sigma > 0
    return target + normal_lpdf(err, 0, sigma).sum()


def stan_gp_pois_regr(d, p):
    x, rho, alpha, f_tilde = d["x"], p["rho"], p["alpha"], p["f_tilde"]
    n = len(x)
    cov = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            cov[i, j] = alpha**2 * np.exp(-((x[i] - x[j]) ** 2) / (2 * rho**2))
    f = np.linalg.cholesky(cov + 1e-10 * np.eye(n)) @ f_tilde
    target = 24 * np.log(rho) - 4 * rho  # gamma(25, 4)
    target += normal_lpdf(alpha, 0, 2) + normal_lpdf(f_tilde, 0, 1).sum()
    return target + (d["k"] * f - np.exp(f)).sum()  # poisson_log


def stan_hmm_example(d, p):
    y, mu = d["y"], p["mu"]
    theta = np.stack([p["theta1"], p["theta2"]])
    target = normal_lpdf(mu[0], 3, 1) + normal_lpdf(mu[1], 10, 1)
    gamma = np.array([normal_lpdf(y[0], mu[k], 1) for k in range(d["K"])])
    for t in range(1, d["N"]):
        acc = np.array(
            [
                [gamma[j] + np.log(theta[j, k]) + normal_lpdf(y[t], mu[k], 1) for j in range(d["K"])]
                for k in range(d["K"])
            ]
        )
        gamma = log_sum_exp(acc)
    return target + log_sum_exp(gamma)


STAN_TARGETS = {
    "eight_schools": stan_eight_schools_centered,
    "low_dim_gauss_mix": stan_low_dim_gauss_mix,
    "kilpisjarvi_mod": stan_kilpisjarvi,
    "earnings": stan_logearn_interaction,
    "kidiq_with_mom_work": stan_kidscore_mom_work,
    "mesquite": stan_logmesquite_logvas,
    "nes2000": stan_nes,
    "arma": stan_arma11,
    "gp_pois_regr": stan_gp_pois_regr,
    "hmm_example": stan_hmm_example,
}


def raw_data(name):
    """The data straight from the shipped JSON: NumPy float64 arrays, integer scalars as ints."""
    with zipfile.ZipFile(data_dir() / f"{POSTERIORS[name][1]}.data.json.zip") as archive:
        raw = json.loads(archive.read(archive.namelist()[0]))
    return {
        key: value if isinstance(value, int) else np.asarray(value, dtype=np.float64)
        for key, value in raw.items()
    }


@pytest.mark.posteriordb
@pytest.mark.parametrize("name", NAMES)
def test_pyro_model_is_the_stan_model_up_to_a_constant(name):
    """Pyro's log joint minus Stan's target is the same at 40 reference draws (float64)."""
    samples = reference_samples(name)
    chosen = np.linspace(0, 10 * 1000 - 1, 40).astype(int)
    points = [
        {site: value.reshape((-1,) + value.shape[2:])[i] for site, value in samples.items()} for i in chosen
    ]
    data, stan_data = load_data(name, dtype=torch.float64), raw_data(name)
    model = MODELS[name]
    pyro_lp, stan_lp = [], []
    for point in points:
        values = {site: torch.tensor(value, dtype=torch.float64) for site, value in point.items()}
        trace = pyro.poutine.trace(pyro.poutine.condition(model, values)).get_trace(**data)
        pyro_lp.append(float(trace.log_prob_sum()))
        stan_lp.append(float(STAN_TARGETS[name](stan_data, point)))
        if name == "gp_pois_regr":  # the deterministic f is Stan's transformed parameter f
            reference_f = derived(name, {key: value[None] for key, value in point.items()})["f"][0]
            np.testing.assert_allclose(trace.nodes["f"]["value"].numpy(), reference_f, rtol=1e-8, atol=1e-8)
    pyro_lp, stan_lp = np.array(pyro_lp), np.array(stan_lp)
    assert np.isfinite(pyro_lp).all() and np.isfinite(stan_lp).all()
    difference = pyro_lp - stan_lp
    scale = max(np.abs(pyro_lp).max(), np.abs(stan_lp).max(), 1.0)
    assert difference.max() - difference.min() < 1e-6 * scale, (difference, scale)
    assert pyro_lp.max() - pyro_lp.min() > 1e-3  # the draws differ: the check is not vacuous


@pytest.mark.posteriordb
@pytest.mark.parametrize("name", NAMES)
def test_batch_density_equals_point_by_point(name):
    torch.manual_seed(0)
    density = model_density(MODELS[name], model_kwargs=load_data(name))
    assert density.vectorized
    x = torch.randn(5, density.layout.dim)
    expected = torch.stack([-density.potential_fn(density.layout.unpack(row)) for row in x])
    torch.testing.assert_close(density.log_prob(x), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.posteriordb
@pytest.mark.parametrize("name", NAMES)
def test_reference_round_trips_to_zero_standardized_errors(name):
    reference = load_reference(name)
    assert all(value.shape == (10, 1000) for value in reference.values())
    comparable = comparable_reference(name)
    assert comparable.keys() == reference.keys()  # no random generated quantities in these draws
    errors = standardized_errors(derived(name, reference_samples(name)), comparable)
    assert errors.keys() == reference.keys()
    for error in errors.values():
        assert abs(error["mean_error"]) < 1e-8 and abs(error["sd_error"]) < 1e-8


@pytest.mark.posteriordb
def test_comparable_reference_drops_the_hmm_viterbi_path(monkeypatch):
    import pyro_nfmala.examples.posteriordb as posteriordb

    reference = load_reference("hmm_example")
    fake = dict(reference, **{"z_star[1]": reference["mu[1]"], "log_p_z_star": reference["mu[2]"]})
    monkeypatch.setattr(posteriordb, "load_reference", lambda name: fake)
    assert posteriordb.comparable_reference("hmm_example").keys() == reference.keys()
