r"""pyro_nfmala: Metropolis-adjusted Langevin in the latent space of a normalizing flow.

A Pyro MCMC kernel (:class:`NFMALA`) and a batch sampler (:class:`ChainSampler`) run MALA on a
latent target: the exact pull-back of a posterior through a zuko flow
(:class:`PosteriorPullback`), or the flow's tempered measure (:class:`TemperedFlow`). The
building blocks live in their modules, read top-down: :mod:`~pyro_nfmala.flow` (a frozen flow
read latent-to-data), :mod:`~pyro_nfmala.target`, :mod:`~pyro_nfmala.precond`,
:mod:`~pyro_nfmala.mala` (the pure step), :mod:`~pyro_nfmala.adaptation`,
:mod:`~pyro_nfmala.driver` (the layer both samplers share), :mod:`~pyro_nfmala.kernel` and
:mod:`~pyro_nfmala.chains`; around them :mod:`~pyro_nfmala.model` (Pyro models as flat
densities), :mod:`~pyro_nfmala.fit` and :mod:`~pyro_nfmala.flows` (fitting, building, saving
flows), :mod:`~pyro_nfmala.tempering` and :mod:`~pyro_nfmala.arviz`. The method is written out
in the documentation's method page (``docs/method.md`` in the repository).
"""

from .arviz import from_arrays, to_inference_data
from .chains import ChainSampler
from .fit import FitResult, fit_flow, fit_flow_to_model, fit_flow_to_samples
from .flow import LatentFlow
from .flows import default_flow, identity_flow, load_flow, save_flow
from .kernel import NFMALA
from .report import ChainReport, chain_reports
from .target import LatentTarget, PosteriorPullback, TemperedFlow
from .tempering import preview_tempering

__all__ = [
    "NFMALA",
    "ChainReport",
    "ChainSampler",
    "FitResult",
    "LatentFlow",
    "LatentTarget",
    "PosteriorPullback",
    "TemperedFlow",
    "chain_reports",
    "default_flow",
    "fit_flow",
    "fit_flow_to_model",
    "fit_flow_to_samples",
    "from_arrays",
    "identity_flow",
    "load_flow",
    "preview_tempering",
    "save_flow",
    "to_inference_data",
]

__version__ = "0.1.0"
