"""A Pyro model as a flat, batched log density on its unconstrained parameters
(:mod:`~pyro_nfmala.model.density`; summed over data shards on several processes:
:mod:`~pyro_nfmala.model.sharded`), the model in non-centred coordinates
(:mod:`~pyro_nfmala.model.centring`), and recursions written for batches
(:mod:`~pyro_nfmala.model.recurrences`)."""

from .density import ModelDensity, ParamLayout, model_density
from .recurrences import linear_recurrence, log_matrix_product

__all__ = ["ModelDensity", "ParamLayout", "linear_recurrence", "log_matrix_product", "model_density"]
