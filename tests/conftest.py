"""Shared fixtures: one thread, fixed seeds, a two-mode target and a flow trained on it."""

from collections.abc import Iterator

import pyro.ops.integrator
import pytest
import torch
import zuko

from pyro_nfmala import LatentFlow
from pyro_nfmala.examples import inference_gym, posteriordb


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``posteriordb`` or ``inference_gym`` read reference data from the folder that
    ``$PYRO_NFMALA_POSTERIORDB`` or ``$PYRO_NFMALA_INFERENCE_GYM`` names (never part of the repository;
    ``.ci/run`` points the variables at them): where it does not name a folder with the data, they skip
    and say why."""
    for marker, source in (("posteriordb", posteriordb), ("inference_gym", inference_gym)):
        if source.available():
            continue
        reason = (
            f"needs {marker}'s reference data: set {source.ENV_VAR} to a folder holding them "
            "(benchmarks/README.md says how to make one)"
        )
        for item in items:
            if marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _one_thread_and_seed() -> Iterator[None]:
    # torch's thread pool oversubscribes 2-core machines; seeds make every test deterministic.
    torch.set_num_threads(1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


def two_gaussian_mixture(dtype=torch.float64) -> torch.distributions.Distribution:
    """0.7 N((-2, 0), 0.5^2 I) + 0.3 N((2, 1), 0.5^2 I): two modes with a near-empty gap."""
    weights = torch.tensor([0.7, 0.3], dtype=dtype)
    locs = torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=dtype)
    components = torch.distributions.Independent(
        torch.distributions.Normal(locs, torch.full_like(locs, 0.5)), 1
    )
    return torch.distributions.MixtureSameFamily(torch.distributions.Categorical(weights), components)


@pytest.fixture(scope="session")
def mixture() -> torch.distributions.Distribution:
    return two_gaussian_mixture()


@pytest.fixture(scope="session")
def trained_flow(mixture) -> zuko.flows.Flow:
    """A float64 NSF fitted by maximum likelihood to the mixture: it stretches the gap."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        torch.set_num_threads(1)
        flow = zuko.flows.NSF(2, transforms=3, hidden_features=(32, 32)).double()
        optimizer = torch.optim.Adam(flow.parameters(), lr=3e-3)
        for _ in range(300):
            loss = -flow().log_prob(mixture.sample((512,))).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return flow


@pytest.fixture(scope="session")
def latent_flow(trained_flow) -> LatentFlow:
    return LatentFlow(trained_flow)


@pytest.fixture(scope="session")
def reference_statistics(latent_flow, mixture) -> torch.Tensor:
    """The invariance tests' statistics (tests/invariance.py) of 100,000 exact draws of the mixture."""
    from invariance import exact_latents, statistics

    with torch.random.fork_rng():
        torch.manual_seed(123)
        z = exact_latents(latent_flow, mixture, 100_000)
    return statistics(z, latent_flow.to_data(z)[0].detach())


class OutOfDomain(ValueError):
    """What a model raises outside its domain, in these tests; registered as a numerical failure."""


@pytest.fixture(scope="session")
def out_of_domain() -> type[OutOfDomain]:
    """``OutOfDomain``, registered with Pyro's exception handlers (as a user would register theirs)."""
    pyro.ops.integrator.register_exception_handler(
        "pyro_nfmala_tests_out_of_domain",
        lambda error: isinstance(error, OutOfDomain),
        warn_on_overwrite=False,
    )
    return OutOfDomain
