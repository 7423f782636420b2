"""inference-gym's four posteriors and the Brownian motion with unknown scales: each Pyro model against an
independent NumPy/SciPy transcription of its log density on the unconstrained space (up to a constant),
vectorized densities, the data preparation and the stored references."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to
from scipy import stats
from scipy.special import expit, log_expit

from pyro_nfmala.examples import inference_gym
from pyro_nfmala.examples.inference_gym import (
    DIMENSIONS,
    MODELS,
    POSTERIORS,
    UNSCORED,
    brownian_motion_data,
    brownian_motion_unknown_scales,
    load_data,
    reference,
    standardized_errors,
    worst_errors,
)
from pyro_nfmala.model.density import model_density

NAMES = list(POSTERIORS)
BROWNIAN = "brownian_motion_unknown_scales"
#: data-folder cases are marked; the Brownian motion needs no files
CASES = [pytest.param(name, marks=pytest.mark.inference_gym) for name in NAMES] + [BROWNIAN]
#: the latent sites of each model, in the order it runs them, and their shapes
SITES = {
    "german_credit_sparse_logistic": {"global_scale": (), "local_scales": (25,), "unscaled_weights": (25,)},
    "stochastic_volatility_sp500_small": {
        "persistence_of_volatility": (),
        "mean_log_volatility": (),
        "white_noise_shock_scale": (),
        "log_volatility": (100,),
    },
    "stochastic_volatility_sp500": {
        "persistence_of_volatility": (),
        "mean_log_volatility": (),
        "white_noise_shock_scale": (),
        "log_volatility": (2516,),
    },
    "item_response_theory": {
        "mean_student_ability": (),
        "centered_student_ability": (400,),
        "question_difficulty": (100,),
    },
    BROWNIAN: {"innovation_scale": (), "observation_scale": (), "x": (30,)},
}


# ----------------------------------------------------------------------------------------------
# the data, prepared here from the raw files as the data folder's README says (independently of
# load_data), and the log densities in NumPy/SciPy on the unconstrained space, written from the
# README's definitions with the constraint transforms' log-Jacobians added by hand


def raw(filename):
    with np.load(inference_gym.data_dir() / filename) as archive:
        return {key: archive[key] for key in archive.files}


def numpy_data(name):
    if name == BROWNIAN:
        return {"observations": brownian_motion_data()["observations"].numpy()}
    if name == "german_credit_sparse_logistic":
        files = raw("german_credit_data.npz")
        features = files["features"].astype(np.float64)
        standardized = (features - features.mean(0)) / features.std(0, ddof=0)
        ones = np.ones((len(features), 1))
        return {
            "features": np.hstack([standardized, ones]),
            "labels": files["uci_label"].astype(np.float64) - 1,
        }
    if name.startswith("stochastic_volatility"):
        returns = np.diff(np.log(raw("sp500_closing_prices.npz")["closing_prices"]))
        returns = returns[-100:] if name.endswith("small") else returns
        return {"returns": returns - returns.mean()}
    files = raw("item_response_theory_data.npz")
    return {key: files[key] for key in ("student_ids", "question_ids", "correct")}


def split(name, x):
    """The flat unconstrained vector, cut into the sites of ``SITES[name]`` (row-major, in order)."""
    parts, start = {}, 0
    for site, shape in SITES[name].items():
        size = int(np.prod(shape, dtype=int))
        parts[site] = x[start : start + size].reshape(shape)
        start += size
    assert start == len(x)
    return parts


def positive(u):
    """``exp(u)`` and its log-Jacobian ``u``."""
    return np.exp(u), u


def symmetric_interval(u):
    """``-1 + 2 sigmoid(u)`` (Pyro's bijection onto (-1, 1)) and its log-Jacobian."""
    return -1 + 2 * expit(u), np.log(2.0) + log_expit(u) + log_expit(-u)


def gamma_half_half(value):
    return stats.gamma.logpdf(value, a=0.5, scale=1 / 0.5)  # concentration 0.5, rate 0.5


def bernoulli_logits(y, logits):
    return y * logits - np.logaddexp(0.0, logits)


def sparse_logistic_log_density(d, p):
    global_scale, jacobian_global = positive(p["global_scale"])
    local_scales, jacobian_local = positive(p["local_scales"])
    weights = p["unscaled_weights"] * local_scales * global_scale
    target = gamma_half_half(global_scale) + jacobian_global
    target += (gamma_half_half(local_scales) + jacobian_local).sum()
    target += stats.norm.logpdf(p["unscaled_weights"]).sum()
    return target + bernoulli_logits(d["labels"], d["features"] @ weights).sum()


def stochastic_volatility_log_density(d, p):
    phi, jacobian_phi = symmetric_interval(p["persistence_of_volatility"])
    mu = p["mean_log_volatility"]
    sigma, jacobian_sigma = positive(p["white_noise_shock_scale"])
    h = p["log_volatility"]
    target = stats.beta.logpdf((phi + 1) / 2, 20.0, 1.5) - np.log(2.0) + jacobian_phi  # phi = 2u - 1
    target += stats.cauchy.logpdf(mu, 0.0, 5.0)
    target += stats.halfcauchy.logpdf(sigma, scale=2.0) + jacobian_sigma
    target += stats.norm.logpdf(h[0], mu, sigma / np.sqrt(1 - phi**2))
    for t in range(1, len(h)):
        target += stats.norm.logpdf(h[t], mu + phi * (h[t - 1] - mu), sigma)
    return target + stats.norm.logpdf(d["returns"], 0.0, np.exp(h / 2)).sum()


def item_response_log_density(d, p):
    mean, ability, difficulty = (
        p["mean_student_ability"],
        p["centered_student_ability"],
        p["question_difficulty"],
    )
    target = stats.norm.logpdf(mean, 0.75, 1.0)
    target += stats.norm.logpdf(ability).sum() + stats.norm.logpdf(difficulty).sum()
    logits = mean + ability[d["student_ids"]] - difficulty[d["question_ids"]]
    return target + bernoulli_logits(d["correct"], logits).sum()


def brownian_motion_log_density(d, p):
    innovation, jacobian_innovation = positive(p["innovation_scale"])
    observation, jacobian_observation = positive(p["observation_scale"])
    x, y = p["x"], d["observations"]
    target = stats.lognorm.logpdf(innovation, s=2.0) + jacobian_innovation
    target += stats.lognorm.logpdf(observation, s=2.0) + jacobian_observation
    target += stats.norm.logpdf(x[0], 0.0, innovation)
    target += sum(stats.norm.logpdf(x[t], x[t - 1], innovation) for t in range(1, len(x)))
    return target + sum(
        stats.norm.logpdf(y[t], x[t], observation) for t in range(len(x)) if not np.isnan(y[t])
    )


LOG_DENSITIES = {
    "german_credit_sparse_logistic": sparse_logistic_log_density,
    "stochastic_volatility_sp500_small": stochastic_volatility_log_density,
    "stochastic_volatility_sp500": stochastic_volatility_log_density,
    "item_response_theory": item_response_log_density,
    BROWNIAN: brownian_motion_log_density,
}


@functools.lru_cache(maxsize=None)
def density(name):
    if name == BROWNIAN:
        return model_density(brownian_motion_unknown_scales, model_kwargs=brownian_motion_data())
    return model_density(MODELS[name], model_kwargs=load_data(name))


def points(name, num):
    generator = torch.Generator().manual_seed(1)
    return 0.5 * torch.randn(num, DIMENSIONS.get(name, 32), generator=generator, dtype=torch.float64)


def test_the_transcribed_persistence_map_is_pyros():
    u = torch.linspace(-4, 4, 9, dtype=torch.float64)
    transform = biject_to(constraints.interval(-1.0, 1.0))
    value, log_jacobian = symmetric_interval(u.numpy())
    np.testing.assert_allclose(transform(u).numpy(), value, rtol=1e-12)
    np.testing.assert_allclose(
        transform.log_abs_det_jacobian(u, transform(u)).numpy(), log_jacobian, rtol=1e-12
    )


def test_registries_agree():
    assert sorted(MODELS) == sorted(POSTERIORS) == sorted(DIMENSIONS) and len(NAMES) == 4
    assert all(
        sum(int(np.prod(shape)) for shape in SITES[name].values()) == DIMENSIONS[name] for name in NAMES
    )
    assert set(UNSCORED) <= set(POSTERIORS)


@pytest.mark.parametrize("name", CASES)
def test_pyro_model_is_the_transcription_up_to_a_constant(name):
    """Pyro's log density on the flat unconstrained vector minus the NumPy one is the same at a few random
    points (two for the 2,519-parameter model)."""
    model_density_ = density(name)
    assert dict(model_density_.layout.shapes) == {
        site: torch.Size(shape) for site, shape in SITES[name].items()
    }
    x = points(name, 2 if name == "stochastic_volatility_sp500" else 4)
    pyro_lp = model_density_.point_log_prob(x).numpy()
    data = numpy_data(name)
    numpy_lp = np.array([LOG_DENSITIES[name](data, split(name, row)) for row in x.numpy()])
    assert np.isfinite(pyro_lp).all() and np.isfinite(numpy_lp).all()
    difference = pyro_lp - numpy_lp
    scale = max(np.abs(pyro_lp).max(), 1.0)
    assert difference.max() - difference.min() < 1e-9 * scale, (difference, scale)
    assert pyro_lp.max() - pyro_lp.min() > 1e-3  # the points differ: the check is not vacuous


@pytest.mark.parametrize("name", CASES)
def test_batch_density_equals_point_by_point(name):
    model_density_ = density(name)
    assert model_density_.vectorized
    x = points(name, 2 if name == "stochastic_volatility_sp500" else 5)
    torch.testing.assert_close(
        model_density_.log_prob(x), model_density_.point_log_prob(x), rtol=1e-10, atol=1e-8
    )


@pytest.mark.inference_gym
@pytest.mark.parametrize("name", NAMES)
def test_load_data_prepares_as_the_readme_says(name):
    data, expected = load_data(name), numpy_data(name)
    for key, value in expected.items():
        np.testing.assert_allclose(data[key].numpy(), value, rtol=1e-12, atol=1e-12)
        if key.endswith("_ids"):
            assert data[key].dtype == torch.long
        else:
            assert data[key].dtype == torch.float64
    if name == "german_credit_sparse_logistic":
        assert data["features"].shape == (1000, 25) and (data["features"][:, -1] == 1).all()
        assert set(data["labels"].tolist()) == {0.0, 1.0}
    if name == "item_response_theory":
        assert (data["num_students"], data["num_questions"]) == (400, 100)
        assert len(data["correct"]) == 30012
    assert load_data(name, dtype=torch.float32)[next(iter(expected))].dtype in (torch.float32, torch.long)


@pytest.mark.inference_gym
@pytest.mark.parametrize("name", NAMES)
def test_reference_holds_every_latent_site_with_its_shape(name):
    moments = reference(name)
    assert {site: stats_["mean"].shape for site, stats_ in moments.items()} == SITES[name]
    for stats_ in moments.values():
        assert set(stats_) == {"mean", "sd", "mean_se"}
        assert stats_["sd"].shape == stats_["mean_se"].shape == stats_["mean"].shape
        assert (stats_["sd"] > 0).all() and (stats_["mean_se"] < stats_["sd"]).all()


@pytest.mark.inference_gym
@pytest.mark.parametrize("name", ["german_credit_sparse_logistic", "stochastic_volatility_sp500_small"])
def test_standardized_errors(name):
    """Draws with exactly the reference mean and sd score zero; a shifted entry scores its shift; the sd
    of an unscored site is left out, its mean is not."""
    moments = reference(name)
    rng = np.random.default_rng(0)
    samples = {}
    for site, stats_ in moments.items():
        noise = rng.standard_normal((2, 50) + stats_["mean"].shape)
        noise = (noise - noise.mean((0, 1))) / noise.std((0, 1))
        samples[site] = stats_["mean"] + stats_["sd"] * noise
    errors = standardized_errors(samples, name)
    assert len(errors) == DIMENSIONS[name]
    for entry, values in errors.items():
        assert abs(values["mean_error"]) < 1e-10
        site = entry.partition("[")[0]
        assert ("sd_error" in values) == (site not in UNSCORED.get(name, ()))
        assert abs(values.get("sd_error", 0.0)) < 1e-10
    site = next(site for site, shape in SITES[name].items() if shape)
    samples[site] = samples[site].copy()
    samples[site][..., 3] += 0.5 * moments[site]["sd"][3]
    worst = worst_errors(standardized_errors(samples, name))
    assert worst["mean_error"][0] == f"{site}[3]" and worst["mean_error"][1] == pytest.approx(0.5)
    skipped = standardized_errors(
        {key: value for key, value in samples.items() if key != site}, name, skip=(site,)
    )
    assert not any(entry.startswith(site) for entry in skipped)
    with pytest.raises(KeyError, match=site):
        standardized_errors({key: value for key, value in samples.items() if key != site}, name)


def test_unscored_sites():
    assert UNSCORED == {
        "stochastic_volatility_sp500_small": ("mean_log_volatility",),
        "stochastic_volatility_sp500": ("mean_log_volatility",),
    }


def test_missing_folder_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv(inference_gym.ENV_VAR, raising=False)
    assert not inference_gym.available()
    with pytest.raises(FileNotFoundError, match=f"{inference_gym.ENV_VAR}.*inference_gym"):
        inference_gym.data_dir()
    monkeypatch.setenv(inference_gym.ENV_VAR, str(tmp_path))
    assert not inference_gym.available()
    with pytest.raises(FileNotFoundError, match="german_credit_data.npz"):
        load_data("german_credit_sparse_logistic")
    with pytest.raises(ValueError, match="unknown posterior"):
        load_data("german_credit")


def test_brownian_motion_data():
    observations = brownian_motion_data()["observations"]
    assert observations.shape == (30,) and observations.dtype == torch.float64
    assert torch.isnan(observations[10:20]).all() and not torch.isnan(observations[:10]).any()
    assert not torch.isnan(observations[20:]).any()
    torch.testing.assert_close(observations, brownian_motion_data(seed=0)["observations"], equal_nan=True)
    assert not torch.equal(observations[:10], brownian_motion_data(seed=1)["observations"][:10])


@pytest.mark.parametrize("persistence", [0.98, -0.7, 0.0, 1.0])
@pytest.mark.parametrize("num_steps", [1, 2, 7, 300])
def test_the_ar1_transform_is_the_recursion_its_inverse_and_log_determinant_exact(persistence, num_steps):
    """AR1's parallel scan against the recursion written as a loop, its inverse, its log-determinant
    against autograd's Jacobian (float64), and the transformed innovations' density against AR1's own
    log density (written out); a persistence of 1 is a random walk (its initial sd given)."""
    torch.manual_seed(num_steps)
    loc = torch.tensor([0.3, -1.0], dtype=torch.float64)
    phi, scale = torch.tensor(persistence, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64)
    law = inference_gym.AR1(loc, phi, scale, num_steps, initial_scale=scale if persistence == 1.0 else None)
    transform = law.transforms[0]
    noise = torch.randn(3, 2, num_steps, dtype=torch.float64)
    path = [law.initial_scale * noise[..., 0]]
    for t in range(1, num_steps):
        path.append(phi * path[-1] + scale * noise[..., t])
    torch.testing.assert_close(transform(noise), torch.stack(path, -1) + loc.unsqueeze(-1))
    torch.testing.assert_close(transform.inv(transform(noise)), noise)
    one = noise[0, 1].clone()
    one_law = inference_gym.AR1(loc[1], phi, scale, num_steps, law.initial_scale[1])
    jacobian = torch.autograd.functional.jacobian(one_law.transforms[0], one)
    log_det = one_law.transforms[0].log_abs_det_jacobian(one, one_law.transforms[0](one))
    torch.testing.assert_close(log_det, torch.linalg.slogdet(jacobian)[1])
    values = law.sample((4,))
    transformed = torch.distributions.TransformedDistribution.log_prob(law, values)
    torch.testing.assert_close(law.log_prob(values), transformed)
    assert law.expand([5, 2]).batch_shape == (5, 2) and values.shape == (4, 2, num_steps)
