r"""pyro_nfmala: Metropolis-adjusted Langevin in the latent space of a normalizing flow.

Give it a Pyro model: ``pyro_nfmala.MCMC(NFMALA(model), num_samples, warmup_steps, num_chains)`` fits a
map of the posterior and runs every chain as one batch (:class:`MCMC` is Pyro's ``MCMC``; Pyro's own runs
:class:`NFMALA` too, a chain at a time), and :func:`to_inference_data` hands ArviZ the run;
:meth:`ChainSampler.from_model` is the same run without Pyro's interface, and :class:`ChainSampler` samples
any latent target (the exact posterior pull-back, :class:`PosteriorPullback`, or a trained flow's tempered
measure, :class:`TemperedFlow`) with thousands of chains.

The package's folders go from leaves to front ends: :mod:`~pyro_nfmala.flows` (what a map is: a flow read
latent to data, the staged map, saving and loading), :mod:`~pyro_nfmala.engine` (pure torch: targets, the
Metropolis-Hastings step and its moves, warmup adaptation, the driver of a batch of chains),
:mod:`~pyro_nfmala.model` (a Pyro model as a flat batched density, its non-centred coordinates, and
:func:`linear_recurrence` and :func:`log_matrix_product` for recursions in a model),
:mod:`~pyro_nfmala.fit` (the staged map: Laplace, flow check, a flow stage adapted by chains),
:mod:`~pyro_nfmala.samplers` (the run both front ends share, the kernel, the batch sampler, the vectorized
``MCMC``) and :mod:`~pyro_nfmala.output` (ArviZ data and the end-of-run checks). The method is written out
in the documentation's method page (``docs/method.md`` in the repository).
"""

from .engine.targets import LatentTarget, PosteriorPullback, TemperedFlow
from .engine.tempering import preview_tempering
from .fit.staged import fit_flow_to_model
from .fit.train import FitResult, fit_flow, fit_flow_to_samples
from .flows.builders import default_flow, identity_flow
from .flows.files import load_flow, save_flow
from .flows.latent import LatentFlow, as_latent_flow
from .flows.staged import StagedFlow
from .model.recurrences import linear_recurrence, log_matrix_product
from .output.arviz import from_arrays, to_inference_data
from .output.convergence import ChainReport, chain_reports
from .samplers.chains import ChainSampler
from .samplers.kernel import NFMALA
from .samplers.mcmc import MCMC

__all__ = [
    "as_latent_flow",
    "MCMC",
    "NFMALA",
    "ChainReport",
    "ChainSampler",
    "FitResult",
    "LatentFlow",
    "LatentTarget",
    "PosteriorPullback",
    "StagedFlow",
    "TemperedFlow",
    "chain_reports",
    "default_flow",
    "fit_flow",
    "fit_flow_to_model",
    "fit_flow_to_samples",
    "from_arrays",
    "identity_flow",
    "linear_recurrence",
    "load_flow",
    "log_matrix_product",
    "preview_tempering",
    "save_flow",
    "to_inference_data",
]

__version__ = "0.1.0"
