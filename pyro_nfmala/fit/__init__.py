"""Fitting maps: the staged map of a posterior (:mod:`~pyro_nfmala.fit.staged`: the Laplace
approximation, the flow check, a flow stage adapted by chains, in the better coordinates), and flows
fitted to a density by reverse KL or to samples by maximum likelihood (:mod:`~pyro_nfmala.fit.train`)."""

from .check import FlowCheck, check_flow
from .staged import fit_flow_to_model, fit_staged_map
from .train import FitResult, fit_flow, fit_flow_to_samples

__all__ = [
    "FitResult",
    "FlowCheck",
    "check_flow",
    "fit_flow",
    "fit_flow_to_model",
    "fit_flow_to_samples",
    "fit_staged_map",
]
