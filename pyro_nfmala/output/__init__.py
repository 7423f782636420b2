"""What a run hands back: ArviZ data (:mod:`~pyro_nfmala.output.arviz`, one builder for both front ends)
and the end-of-run checks that say when a run may be wrong (:mod:`~pyro_nfmala.output.convergence`)."""

from .arviz import from_arrays, to_inference_data
from .convergence import ChainReport, chain_reports

__all__ = ["ChainReport", "chain_reports", "from_arrays", "to_inference_data"]
