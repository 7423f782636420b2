"""What a map is: a trained flow seen from its latent space (:class:`LatentFlow`: :math:`x = f(z)` with
its log-determinant, :math:`f^{-1}`, Jacobian-vector products), the maps the library builds (the staged
map of a posterior, :class:`StagedFlow`; :func:`default_flow`, :func:`identity_flow`), and saving and
loading them safely. The leaves of the package: nothing here knows a sampler or a Pyro model."""

from .builders import default_flow, identity_flow
from .files import load_flow, save_flow
from .latent import LatentFlow, as_latent_flow
from .staged import StagedFlow

__all__ = [
    "LatentFlow",
    "StagedFlow",
    "as_latent_flow",
    "default_flow",
    "identity_flow",
    "load_flow",
    "save_flow",
]
