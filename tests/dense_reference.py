"""Dense references that the preconditioners' matrix-free code is compared against: the jacobian
preconditioner with explicit Jacobians (DenseJacobianPreconditioner), and the MALA log acceptance
ratio by dense algebra and torch's multivariate normal, one chain at a time."""

import math

import torch

from torch import Tensor

from pyro_nfmala.engine.langevin import _log_normalizer
from pyro_nfmala.engine.step import ChainState as ChainState
from pyro_nfmala.flows.latent import LatentFlow


def data_log_density(target, x):
    """log p_X(x) = log pi(f^-1(x)) + log|det J_{f^-1}(x)| for one point, by the flow's inverse."""
    z, ladj_to_latent = target.flow.to_latent_and_ladj(x[None])
    return target.log_density(z)[0][0] + ladj_to_latent[0]


def dense_log_accept_ratio(target, name, z, step_size, noise, inverse_mass=None):
    """The log acceptance ratio of one step of preconditioner ``name`` from each row of ``z`` with the
    noise ``noise``, a diagonal mass matrix with inverse ``inverse_mass`` (``None``: the identity).

    ``"identity"``: latent MALA with the metric M, scored in z. ``"jacobian"``: latent MALA with the
    metric A(z) = J^T M J, scored in z. ``"data_space"``: MALA in data space on p_X with covariance
    2 eps C, scored in x (the ratio of data-space MALA, which the latent step must reproduce).
    """
    flow = target.flow
    c = torch.ones(z.shape[-1], dtype=z.dtype) if inverse_mass is None else inverse_mass

    def log_pi(u):
        return target.log_density(u[None])[0][0]

    def jacobian(u):
        return torch.autograd.functional.jacobian(lambda v: flow.to_data(v[None])[0][0], u)

    def latent_proposal(v):  # mean and covariance of q(. | v), and a square root of the metric
        root = (jacobian(v) if name == "jacobian" else torch.eye(len(v), dtype=v.dtype)) / c.sqrt()[:, None]
        metric = root.T @ root
        grad = torch.autograd.functional.jacobian(log_pi, v)
        mean = v + step_size * torch.linalg.solve(metric, grad)
        return mean, 2 * step_size * torch.linalg.inv(metric), root

    def data_mean(v):
        return v + step_size * c * torch.autograd.functional.jacobian(
            lambda w: data_log_density(target, w), v
        )

    ratios = []
    for u, xi in zip(z, noise):
        if name == "data_space":
            x = flow.to_data(u[None])[0][0].detach()
            x_new = data_mean(x) + math.sqrt(2 * step_size) * c.sqrt() * xi
            covariance = 2 * step_size * torch.diag(c)
            forward = torch.distributions.MultivariateNormal(data_mean(x), covariance).log_prob(x_new)
            backward = torch.distributions.MultivariateNormal(data_mean(x_new), covariance).log_prob(x)
            gain = data_log_density(target, x_new) - data_log_density(target, x)
        else:
            mean, covariance, root = latent_proposal(u)
            u_new = mean + math.sqrt(2 * step_size) * torch.linalg.solve(root, xi)
            mean_new, covariance_new, _ = latent_proposal(u_new)
            forward = torch.distributions.MultivariateNormal(mean, covariance).log_prob(u_new)
            backward = torch.distributions.MultivariateNormal(mean_new, covariance_new).log_prob(u)
            gain = log_pi(u_new) - log_pi(u)
        ratios.append(gain + backward - forward)
    return torch.stack(ratios).detach()


class DenseJacobianPreconditioner:
    r"""The ``"jacobian"`` preconditioner with explicit :math:`d \times d` matrices.

    :math:`\mu = z + \epsilon (J^T J)^{-1} g`, :math:`z' = \mu + \sqrt{2\epsilon}\, J^{-1}\xi`,
    and :math:`\log q` by the formula at the top of this module with ``slogdet``. The
    reference for tests; costs :math:`O(d)` backward passes and :math:`O(d^3)` algebra.
    """

    name = "dense_jacobian"
    mass_space = None  # takes no mass matrix

    def prepare(self, flow, state):
        return None

    def _metric(self, flow: LatentFlow, z: Tensor) -> tuple[Tensor, Tensor]:
        jac = flow.jacobian_to_data(z)
        return jac, jac.transpose(-1, -2) @ jac

    def _mean(self, state: ChainState, metric: Tensor, step_size: Tensor) -> Tensor:
        eps = step_size[..., None] if step_size.dim() else step_size
        return state.z + eps * torch.linalg.solve(metric, state.grad)

    def propose(
        self, flow: LatentFlow, state: ChainState, step_size: Tensor, noise: Tensor
    ) -> tuple[Tensor, Tensor]:
        jac, metric = self._metric(flow, state.z)
        eps = step_size[..., None] if step_size.dim() else step_size
        z_new = self._mean(state, metric, step_size) + torch.sqrt(2 * eps) * torch.linalg.solve(jac, noise)
        return z_new, self._log_density(z_new, state, metric, step_size)

    def log_proposal_density(
        self, flow: LatentFlow, state_to: ChainState, state_from: ChainState, step_size: Tensor
    ) -> Tensor:
        _, metric = self._metric(flow, state_from.z)
        return self._log_density(state_to.z, state_from, metric, step_size)

    def _log_density(self, z_to: Tensor, state_from: ChainState, metric: Tensor, step_size: Tensor) -> Tensor:
        residual = z_to - self._mean(state_from, metric, step_size)
        quadratic = (residual * (metric @ residual[..., None])[..., 0]).sum(-1)
        return (
            -quadratic / (4 * step_size)
            + 0.5 * torch.linalg.slogdet(metric)[1]
            + _log_normalizer(z_to.shape[-1], step_size)
        )
