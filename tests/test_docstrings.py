"""Every docstring example in the package runs and prints what it says (doctest).

The examples may use, besides their module's own names, ``torch``, ``zuko``, ``pyro``, ``dist``
(``pyro.distributions``), ``MCMC`` and the package's public names, as a user who wrote
``from pyro_nfmala import *`` would.
"""

import doctest
import importlib
import pkgutil

import pyro
import pytest
import torch
import zuko

import pyro_nfmala

MODULES = sorted(info.name for info in pkgutil.walk_packages(pyro_nfmala.__path__, prefix="pyro_nfmala.")) + [
    "pyro_nfmala"
]
EXTRA_NAMES = {
    "torch": torch,
    "zuko": zuko,
    "pyro": pyro,
    "dist": pyro.distributions,
    "MCMC": pyro.infer.MCMC,
    **{name: getattr(pyro_nfmala, name) for name in pyro_nfmala.__all__},
}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    tests = doctest.DocTestFinder().find(module, name, extraglobs=EXTRA_NAMES)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    for test in tests:
        torch.manual_seed(0)
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


#: The package and its folders' faces: they only hand on the names of their modules, whose examples run.
FACES = {"pyro_nfmala", "pyro_nfmala.examples"} | {
    f"pyro_nfmala.{folder}"
    for folder in ("distributed", "engine", "fit", "flows", "model", "output", "samplers")
}


def test_every_module_has_an_example():
    """A module without a runnable example is a module whose docs can rot unseen."""
    without = [
        name
        for name in MODULES
        if not any(
            test.examples for test in doctest.DocTestFinder().find(importlib.import_module(name), name)
        )
    ]
    assert sorted(without) == sorted(FACES), without
