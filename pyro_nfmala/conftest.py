r"""Doctest configuration: the names the docstring examples use, a fixed seed, one thread."""

from collections.abc import Iterator

import pyro
import pytest
import torch
import zuko

import pyro_nfmala


@pytest.fixture(autouse=True, scope="module")
def doctest_imports(doctest_namespace: dict) -> None:
    doctest_namespace.update(torch=torch, zuko=zuko, pyro=pyro, dist=pyro.distributions)
    doctest_namespace.update({name: getattr(pyro_nfmala, name) for name in pyro_nfmala.__all__})
    doctest_namespace["MCMC"] = pyro.infer.MCMC


@pytest.fixture(autouse=True)
def torch_seed() -> Iterator[None]:
    torch.set_num_threads(1)
    with torch.random.fork_rng():
        yield torch.random.manual_seed(0)
