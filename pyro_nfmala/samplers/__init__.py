"""The front ends: the run both share (:mod:`~pyro_nfmala.samplers.run`), the Pyro kernel :class:`NFMALA`,
the batch sampler :class:`ChainSampler`, and :class:`MCMC`, Pyro's ``MCMC`` with every chain of an NFMALA
kernel as one batch."""

from .chains import ChainSampler
from .kernel import NFMALA
from .mcmc import MCMC

__all__ = ["MCMC", "NFMALA", "ChainSampler"]
