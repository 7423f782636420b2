"""The flow adapter: log-determinants and Jacobian products against autograd, in float64."""

import pickle

import pytest
import torch
import zuko

from pyro_nfmala import LatentFlow
from pyro_nfmala.flows.latent import jvp, latent_to_data, vjp
from pyro_nfmala.flows.staged import StagedFlow

ALL_FLOWS = {
    "MAF": lambda d: zuko.flows.MAF(d),
    "NSF": lambda d: zuko.flows.NSF(d),
    "NCSF": lambda d: zuko.flows.NCSF(d),
    "RealNVP": lambda d: zuko.flows.RealNVP(d),
    "NICE": lambda d: zuko.flows.NICE(d),
    "NAF": lambda d: zuko.flows.NAF(d),
    "UNAF": lambda d: zuko.flows.UNAF(d),
    "BPF": lambda d: zuko.flows.BPF(d),
    "SOSPF": lambda d: zuko.flows.SOSPF(d),
    "GF": lambda d: zuko.flows.GF(d),
    "CNF": lambda d: zuko.flows.CNF(d),
}
# Flows whose log-determinant comes from an ODE solver or a quadrature, not exactly.
APPROXIMATE = {"CNF": 1e-3}


def dense_jacobian(fn, point):
    return torch.stack([torch.autograd.functional.jacobian(fn, row) for row in point])


@pytest.mark.parametrize("name", sorted(ALL_FLOWS))
def test_ladj_and_jacobian_products_match_autograd(name):
    torch.manual_seed(0)
    d = 3
    flow = LatentFlow(ALL_FLOWS[name](d).double())
    z = 0.5 * torch.randn(4, d, dtype=torch.float64)
    x, ladj = flow.to_data(z)
    jac = dense_jacobian(lambda u: flow.to_data(u[None])[0][0], z)
    tol = APPROXIMATE.get(name, 1e-10)
    assert torch.allclose(ladj, torch.linalg.slogdet(jac)[1], atol=tol)
    assert torch.allclose(flow.jacobian_to_data(z), jac, atol=tol)  # the batched dense reference

    v = torch.randn(4, d, dtype=torch.float64)
    assert torch.allclose(flow.jvp_to_data(z, v), torch.einsum("nij,nj->ni", jac, v), atol=tol)
    # Products through the inverse are checked against the inverse's own Jacobian: they are
    # what the sampler computes, and J_{f^-1}(x) = J_f(z)^-1 only up to the inverse's accuracy.
    jac_inv = dense_jacobian(lambda u: flow.to_latent(u[None])[0], x)
    assert torch.allclose(flow.jvp_to_latent(x, v), torch.einsum("nij,nj->ni", jac_inv, v), atol=tol)
    assert torch.allclose(flow.vjp_to_latent(x, v), torch.einsum("nji,nj->ni", jac_inv, v), atol=tol)
    # the data-space move's pieces: f^-1 with its log-determinant, and the data-space gradient
    z_back, ladj_inv = flow.to_latent_and_ladj(x)
    assert torch.allclose(ladj_inv, torch.linalg.slogdet(jac_inv)[1], atol=tol)
    grad_ladj_inv = dense_jacobian(lambda u: flow.to_latent_and_ladj(u[None])[1][0], x)
    expected = torch.einsum("nji,nj->ni", jac_inv, v) + grad_ladj_inv
    # (the CNF's adjoint gradients differ from differentiating its solver by about 2e-3 here)
    assert torch.allclose(flow.data_gradient(x, v), expected, atol=max(10 * tol, 1e-8))


def test_jacobian_products_of_exactly_invertible_flow_invert_each_other(latent_flow):
    z = torch.randn(16, 2, dtype=torch.float64)
    x, _ = latent_flow.to_data(z)
    v = torch.randn(16, 2, dtype=torch.float64)
    assert torch.allclose(latent_flow.jvp_to_data(z, latent_flow.jvp_to_latent(x, v)), v, atol=1e-10)
    assert torch.allclose(latent_flow.to_latent(x), z, atol=1e-10)


def test_generic_jvp_and_vjp_on_a_linear_map():
    a = torch.tensor([[1.0, 2.0], [0.5, -3.0]], dtype=torch.float64)
    v = torch.tensor([0.3, -1.2], dtype=torch.float64)
    assert torch.allclose(jvp(lambda p: p @ a.T, torch.ones(2, dtype=torch.float64), v)[1], a @ v)
    assert torch.allclose(vjp(lambda p: p @ a.T, torch.ones(2, dtype=torch.float64), v)[1], a.T @ v)


def test_jvp_method_falls_back_when_double_backward_is_wrong():
    # zuko's NAF inverts by bisection in a custom autograd function: double-backward through it
    # is silently wrong, so the adapter must not pick it for the latent-to-data direction.
    flow = LatentFlow(zuko.flows.NAF(2).double())
    assert flow.jvp_methods["to_data"] == "dense"
    assert LatentFlow(zuko.flows.RealNVP(2)).jvp_methods == {
        "to_data": "double_backward",
        "to_latent": "double_backward",
    }


def graph_leaves(tensor):
    """The leaves of the autograd graph behind ``tensor`` (the tensors gradients would flow to)."""
    leaves, stack, seen = [], [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


@pytest.mark.parametrize("built", [False, True], ids=["module", "normalizing_flow"])
def test_user_flow_is_not_modified_and_later_training_is_not_seen(built):
    """Both kinds of flow the adapter accepts are deep-copied and frozen: editing the user's
    module afterwards changes nothing, and the sampler computes with no parameter gradients."""
    module = zuko.flows.RealNVP(2)
    module.train()
    flow = LatentFlow(module() if built else module)
    assert module.training
    assert all(p.requires_grad for p in module.parameters())
    z = torch.randn(3, 2)
    before = flow.to_data(z)[0]
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    assert torch.equal(flow.to_data(z)[0], before)
    z = z.requires_grad_()
    x, ladj = flow.to_data(z)
    leaves = graph_leaves(x.sum() + ladj.sum())
    assert len(leaves) == 1 and leaves[0] is z  # gradients flow to z only, not to any parameter


@pytest.mark.parametrize("built", [False, True], ids=["module", "normalizing_flow"])
def test_a_flow_with_non_finite_parameters_is_refused(built):
    module = zuko.flows.RealNVP(2)
    with torch.no_grad():
        next(module.parameters())[0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        LatentFlow(module() if built else module)


def test_pickles_and_evaluates_the_same():
    flow = LatentFlow(zuko.flows.NSF(2, transforms=2))
    z = torch.randn(5, 2)
    clone = pickle.loads(pickle.dumps(flow))
    assert torch.equal(clone.to_data(z)[0], flow.to_data(z)[0])


def test_accepts_a_built_normalizing_flow():
    module = zuko.flows.RealNVP(2)
    flow = LatentFlow(module())
    z = torch.randn(3, 2)
    assert torch.allclose(flow.to_data(z)[0], module().transform.inv(z))


@pytest.mark.parametrize("bad", [torch.nn.Linear(2, 2), "NSF", torch.distributions.Normal(0.0, 1.0)])
def test_rejects_what_is_not_a_zuko_flow(bad):
    with pytest.raises(TypeError, match="zuko flow"):
        LatentFlow(bad)


def test_rejects_a_conditional_flow():
    with pytest.raises(ValueError, match="context"):
        LatentFlow(zuko.flows.NSF(2, context=3))


@pytest.mark.parametrize(
    "build",
    [
        lambda: zuko.flows.RealNVP(4, transforms=3),
        lambda: zuko.flows.NICE(3),
        lambda: zuko.flows.NSF(3, passes=2, transforms=2),
        lambda: zuko.flows.MAF(3),
        lambda: StagedFlow(torch.ones(4), 0.5 * torch.eye(4), zuko.flows.RealNVP(4)),
    ],
    ids=["RealNVP", "NICE", "NSF_coupling", "MAF", "staged_RealNVP"],
)
def test_the_one_pass_inverse_is_zukos_inverse_and_its_log_determinant_is_autograds(build):
    """latent_to_data builds each coupling layer's transform once (zuko builds it twice); the map and
    log-determinant are zuko's (float64, to 1e-12) and the log-determinant autograd's Jacobian's."""
    torch.manual_seed(0)
    flow = build().double()
    with torch.no_grad():  # weights other than a fresh flow's, whose last layers are near the identity
        for parameter in flow.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    transform = flow().transform
    z = 1.5 * torch.randn(16, flow().base.sample().shape[-1], dtype=torch.float64)
    x, ladj = latent_to_data(transform, z)
    x_zuko, ladj_zuko = transform.inv.call_and_ladj(z)
    torch.testing.assert_close(x, x_zuko, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ladj, ladj_zuko, rtol=1e-12, atol=1e-12)
    jacobian = torch.autograd.functional.jacobian(lambda v: latent_to_data(transform, v[None])[0][0], z[0])
    torch.testing.assert_close(ladj[0], torch.linalg.slogdet(jacobian)[1], rtol=1e-9, atol=1e-9)
