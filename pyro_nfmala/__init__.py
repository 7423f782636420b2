r"""pyro_nfmala: Metropolis-adjusted Langevin in the latent space of a normalizing flow.

A Pyro MCMC kernel (:class:`NFMALA`) and its pure tensor building blocks: a zuko flow read
latent-to-data (:class:`LatentFlow`), latent targets (:class:`PosteriorPullback`, exact;
:class:`TemperedFlow`, the paper's tempered flow measure), preconditioners, batched MALA
steps, step-size adaptation and ArviZ output. See DESIGN.md for the math.
"""

from .adaptation import StepSizeAdapter, find_reasonable_step_size
from . import posteriordb
from .arviz import diverging_draws, from_arrays, to_inference_data
from .baselines import NeuTraResult, neutra_nuts
from .chains import ChainSampler, final_states, posterior_target, sample_chains, tempered_target
from .fit import FitResult, default_flow, identity_flow, fit_flow, fit_flow_to_model, fit_flow_to_samples, load_flow, save_flow
from .flow import LatentFlow
from .kernel import NFMALA
from .metrics import energy_distance, gap_mass, gap_threshold, knn_precision_recall, mode_weights, sample_metrics
from .mala import MALAState, StepInfo, init_state, mala_step
from .precond import (
    DenseJacobianPreconditioner,
    IdentityPreconditioner,
    JacobianPreconditioner,
    get_preconditioner,
)
from .tempering import TemperingPreview, preview_tempering, tempered_weights
from .target import LatentTarget, ModelDensity, ParamLayout, PosteriorPullback, TemperedFlow, model_density

__all__ = [
    "NFMALA",
    "NeuTraResult",
    "neutra_nuts",
    "posteriordb",
    "ChainSampler",
    "energy_distance",
    "final_states",
    "fit_flow_to_samples",
    "gap_mass",
    "gap_threshold",
    "load_flow",
    "mode_weights",
    "posterior_target",
    "sample_chains",
    "knn_precision_recall",
    "sample_metrics",
    "save_flow",
    "tempered_target",
    "tempered_weights",
    "preview_tempering",
    "TemperingPreview",
    "DenseJacobianPreconditioner",
    "FitResult",
    "ModelDensity",
    "IdentityPreconditioner",
    "JacobianPreconditioner",
    "LatentFlow",
    "LatentTarget",
    "MALAState",
    "ParamLayout",
    "PosteriorPullback",
    "StepInfo",
    "StepSizeAdapter",
    "TemperedFlow",
    "default_flow",
    "diverging_draws",
    "identity_flow",
    "find_reasonable_step_size",
    "fit_flow",
    "fit_flow_to_model",
    "from_arrays",
    "get_preconditioner",
    "init_state",
    "mala_step",
    "model_density",
    "to_inference_data",
]

__version__ = "0.1.0"
