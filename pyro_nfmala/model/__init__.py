"""A Pyro model as a flat, batched log density on its unconstrained parameters
(:mod:`~pyro_nfmala.model.density`), and the model in non-centred coordinates
(:mod:`~pyro_nfmala.model.centring`)."""

from .density import ModelDensity, ParamLayout, model_density

__all__ = ["ModelDensity", "ParamLayout", "model_density"]
