r"""Baselines that use the same flow: NeuTra-NUTS (Hoffman et al. 2019).

NeuTra runs NUTS on the latent pull-back of the posterior through a flow,

.. math:: U_Z(z) = U(f(z)) - \mathrm{ladj}(z),

exactly the T1 target of :class:`~pyro_nfmala.NFMALA`, with NUTS instead of latent MALA: the
baseline the tutorials and benchmarks compare against. Pyro's
``NeuTraReparam`` needs an ``AutoContinuous`` guide and collapses all sites into one latent;
:func:`neutra_nuts` takes any zuko flow on the model's flat unconstrained layout (the one
:func:`~pyro_nfmala.fit_flow_to_model` fits) and maps the draws back to the model's own
constrained sites, so that both samplers can be compared on identical flows.

Example:
    >>> result = neutra_nuts(model, flow, model_args=(data,), num_samples=500)  # doctest: +SKIP
    >>> az.summary(result.to_inference_data())  # doctest: +SKIP
"""

from __future__ import annotations

__all__ = ["NeuTraResult", "neutra_nuts"]

from collections.abc import Callable
from typing import NamedTuple

import torch

from pyro.infer import MCMC, NUTS

from ..flows.latent import as_latent_flow
from ..model.density import check_flow_dim, model_density
from ..output.arviz import diverging_draws, from_arrays


class NeuTraResult(NamedTuple):
    """A NeuTra-NUTS run: the Pyro ``MCMC`` on the latent ``z`` and the model's constrained draws."""

    mcmc: MCMC  #: Pyro's ``MCMC`` of NUTS on the latent pull-back
    samples: dict[str, torch.Tensor]  #: constrained draws of each site, ``(chains, draws, *shape)``
    latent: torch.Tensor  #: the latent draws, ``(chains, draws, d)``

    def to_inference_data(self):
        """Posterior in the model's constrained sites; ``sample_stats.diverging`` from NUTS."""
        return from_arrays(
            {name: value.detach().numpy() for name, value in self.samples.items()},
            {"diverging": diverging_draws(self.mcmc)},
            groups={"latent": {"z": self.latent.detach().numpy()}},
        )


def neutra_nuts(
    model: Callable,
    flow,
    *,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    num_samples: int = 1000,
    warmup_steps: int = 1000,
    num_chains: int = 1,
    disable_progbar: bool = False,
    **nuts_kwargs,
) -> NeuTraResult:
    """NUTS on the latent pull-back of ``model``'s posterior through ``flow`` (T1).

    Chains start at draws of the flow; ``nuts_kwargs`` go to Pyro's :class:`~pyro.infer.NUTS`.
    """
    density = model_density(model, model_args, model_kwargs)
    latent_flow = as_latent_flow(flow)
    check_flow_dim(latent_flow, density.layout)

    def potential(params):
        x, ladj = latent_flow.to_data(params["z"])
        return -(density.log_prob(x) + ladj)

    z0 = latent_flow.sample_base((num_chains,))
    mcmc = MCMC(
        NUTS(potential_fn=potential, **nuts_kwargs),
        num_samples=num_samples,
        warmup_steps=warmup_steps,
        num_chains=num_chains,
        initial_params={"z": z0 if num_chains > 1 else z0[0]},
        disable_progbar=disable_progbar,
    )
    mcmc.run()
    z = mcmc.get_samples(group_by_chain=True)["z"].detach()
    with torch.no_grad():
        x, _ = latent_flow.to_data(z.reshape(-1, z.shape[-1]))
    samples = {
        name: value.reshape(z.shape[:2] + value.shape[1:]) for name, value in density.constrain(x).items()
    }
    return NeuTraResult(mcmc, samples, z)
