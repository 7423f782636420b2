r"""Toy targets with an explicit density and an exact sampler.

Each toy has ``dim``, ``log_prob(x)`` (normalized, batched over ``x`` of shape ``(..., d)``),
``sample(n, generator=None)`` (exact draws, ``(n, d)``), ``weights`` (the true weight of each
mode) and ``assign_modes(x)`` (the mode each point belongs to), for tutorials, tests and
benchmarks.

- :class:`DoubleMoon`: two moons on a ring of radius 2, separated by near-empty gaps at
  :math:`x_1 = 0`,

  .. math:: p(x) \propto \exp\Big(-\frac{(|x| - 2)^2}{2 \sigma_r^2}\Big)
            \Big(e^{-(x_1 - 2)^2 / 2\sigma^2} + e^{-(x_1 + 2)^2 / 2\sigma^2}\Big),

  sampled exactly by rejection from a Gaussian mixture (the normalizing constant is computed
  once by quadrature in polar coordinates).
- :class:`GaussianRing`: equal-weight Gaussians on a circle.
- :class:`ConcentricRings`: rings of radii :math:`r_k` with Gaussian radial profiles
  (truncated at 0) and uniform angles.
- :class:`GaussianMixture`: a two-component mixture in ``d`` dimensions with unequal weights.
- :class:`NealFunnel`: Neal's funnel, :math:`v \sim N(0, 3^2)`, :math:`x_i \mid v \sim N(0, e^{v})`.
- :class:`Banana`: a Rosenbrock-type twisted Gaussian (Haario et al.) in pairs of coordinates.

Example:
    >>> moon = DoubleMoon()
    >>> x = moon.sample(1000)
    >>> x.shape, moon.assign_modes(x).float().mean().round(decimals=1)
    (torch.Size([1000, 2]), tensor(0.5000))
"""

from __future__ import annotations

__all__ = [
    "Banana",
    "ConcentricRings",
    "DoubleMoon",
    "GaussianMixture",
    "GaussianRing",
    "NealFunnel",
    "ToyTarget",
]

import math

import torch

from torch import Tensor
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal


class ToyTarget:
    """A target with an explicit normalized density and an exact sampler."""

    dim: int
    weights: Tensor
    dtype: torch.dtype = torch.float32

    def log_prob(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def assign_modes(self, x: Tensor) -> Tensor:
        """The index of the mode each point of ``x`` belongs to, shape ``x.shape[:-1]``."""
        raise NotImplementedError


class _Mixture(ToyTarget):
    """A Gaussian mixture with diagonal components: exact log density and sampler."""

    def __init__(self, weights: Tensor, locs: Tensor, scales: Tensor) -> None:
        self.weights = weights / weights.sum()
        self.locs, self.scales = locs, scales
        self.dim = locs.shape[-1]
        self.dtype = locs.dtype
        self._mixture = MixtureSameFamily(Categorical(self.weights), Independent(Normal(locs, scales), 1))

    def log_prob(self, x: Tensor) -> Tensor:
        return self._mixture.log_prob(x.to(self.dtype))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=self.dtype)
        return self.locs[component] + self.scales[component] * noise

    def assign_modes(self, x: Tensor) -> Tensor:
        x = x.to(self.dtype)
        components = Independent(Normal(self.locs, self.scales), 1)
        return (components.log_prob(x.unsqueeze(-2)) + self.weights.log()).argmax(-1)


class GaussianRing(_Mixture):
    """``num_modes`` equal-weight Gaussians of scale ``scale`` on a circle of radius ``radius``."""

    def __init__(
        self, num_modes: int = 8, radius: float = 4.0, scale: float = 0.3, dtype=torch.float32
    ) -> None:
        angles = torch.arange(num_modes, dtype=dtype) * 2 * math.pi / num_modes
        locs = radius * torch.stack([angles.cos(), angles.sin()], -1)
        super().__init__(torch.ones(num_modes, dtype=dtype), locs, torch.full_like(locs, scale))


class GaussianMixture(_Mixture):
    r"""Two Gaussians in ``dim`` dimensions: weights ``weights``, means
    :math:`\pm \frac{s}{2} \mathbf{1}/\sqrt{d}`, unit scale.

    ``separation`` :math:`s` is the distance between the means, in units of the scale.
    """

    def __init__(
        self, dim: int = 8, weights=(0.7, 0.3), separation: float = 6.0, dtype=torch.float32
    ) -> None:
        direction = torch.ones(dim, dtype=dtype) / math.sqrt(dim)
        locs = torch.stack([-0.5 * separation * direction, 0.5 * separation * direction])
        super().__init__(torch.tensor(weights, dtype=dtype), locs, torch.ones_like(locs))


class DoubleMoon(ToyTarget):
    r"""Two moons on a ring of radius ``radius`` (widths ``ring_scale`` and ``mode_scale``).

    The two moons have equal weights; the gaps between them, at :math:`x_1 = 0`, have density
    about :math:`e^{-2 / \sigma^2}` relative to the modes.
    """

    def __init__(
        self, radius: float = 2.0, ring_scale: float = 0.2, mode_scale: float = 0.3, dtype=torch.float32
    ) -> None:
        self.radius, self.ring_scale, self.mode_scale = radius, ring_scale, mode_scale
        self.dim = 2
        self.dtype = dtype
        self.weights = torch.tensor([0.5, 0.5], dtype=dtype)
        # Proposal: x1 from the two-Gaussian mixture of the moons, x2 ~ N(0, s^2) with s wide enough.
        self._proposal_scale = 1.25 * radius
        self._log_bound = self._log_ratio_bound()
        self._log_normalizer = self._compute_log_normalizer()

    def _unnormalized(self, x: Tensor) -> Tensor:
        radial = -0.5 * ((x.norm(dim=-1) - self.radius) / self.ring_scale) ** 2
        lobes = torch.logaddexp(
            -0.5 * ((x[..., 0] - self.radius) / self.mode_scale) ** 2,
            -0.5 * ((x[..., 0] + self.radius) / self.mode_scale) ** 2,
        )
        return radial + lobes

    def log_prob(self, x: Tensor) -> Tensor:
        return self._unnormalized(x.to(self.dtype)) - self._log_normalizer

    def _compute_log_normalizer(self) -> float:
        """Quadrature in polar coordinates, in float64 (the density is smooth and decays fast)."""
        r = torch.linspace(0.0, self.radius + 12 * self.ring_scale, 4001, dtype=torch.float64)
        theta = torch.linspace(-math.pi, math.pi, 4001, dtype=torch.float64)
        rr, tt = torch.meshgrid(r, theta, indexing="ij")
        x = torch.stack([rr * tt.cos(), rr * tt.sin()], -1)
        integrand = self._unnormalized(x).exp() * rr
        return float(torch.trapezoid(torch.trapezoid(integrand, theta, dim=1), r).log())

    def _log_ratio_bound(self) -> float:
        r"""Upper bound of :math:`\log` (target / proposal) up to the shared lobe factor.

        target / proposal :math:`\propto \exp(-(|x|-R)^2/2\sigma_r^2 + x_2^2 / 2 s^2)`, and
        :math:`|x| \ge |x_2|`: for :math:`|x_2| \le R` the bound is :math:`R^2/2s^2`, beyond it
        the concave function of :math:`t = |x_2|` peaks at
        :math:`t^* = (R/\sigma_r^2) / (1/\sigma_r^2 - 1/s^2)`.
        """
        big_r, sr, s = self.radius, self.ring_scale, self._proposal_scale
        t_star = (big_r / sr**2) / (1 / sr**2 - 1 / s**2)
        outer = -0.5 * ((t_star - big_r) / sr) ** 2 + t_star**2 / (2 * s**2)
        return max(big_r**2 / (2 * s**2), outer)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        out = []
        remaining = n
        while remaining > 0:
            m = max(4 * remaining, 1024)
            sign = torch.randint(0, 2, (m,), generator=generator, dtype=self.dtype) * 2 - 1
            x1 = sign * self.radius + self.mode_scale * torch.randn(m, generator=generator, dtype=self.dtype)
            x2 = self._proposal_scale * torch.randn(m, generator=generator, dtype=self.dtype)
            x = torch.stack([x1, x2], -1)
            log_ratio = -0.5 * ((x.norm(dim=-1) - self.radius) / self.ring_scale) ** 2 + x2**2 / (
                2 * self._proposal_scale**2
            )
            accept = torch.rand(m, generator=generator, dtype=self.dtype).log() < log_ratio - self._log_bound
            out.append(x[accept][:remaining])
            remaining -= len(out[-1])
        return torch.cat(out)

    def assign_modes(self, x: Tensor) -> Tensor:
        """0 for the left moon (:math:`x_1 < 0`), 1 for the right one."""
        return (x[..., 0] > 0).long()


class ConcentricRings(ToyTarget):
    r"""Rings of radii ``radii`` (weights ``weights``), radial profile :math:`N(r_k, \sigma^2)`
    truncated at 0, uniform angle.

    .. math:: p(x) = \sum_k w_k \frac{N(|x|; r_k, \sigma^2)}{\Phi(r_k/\sigma)} \frac{1}{2\pi |x|}
    """

    def __init__(self, radii=(1.0, 2.5, 4.0), weights=None, scale: float = 0.15, dtype=torch.float32) -> None:
        self.radii = torch.tensor(radii, dtype=dtype)
        self.weights = torch.ones_like(self.radii) if weights is None else torch.tensor(weights, dtype=dtype)
        self.weights = self.weights / self.weights.sum()
        self.scale, self.dim, self.dtype = scale, 2, dtype
        self._log_mass = Normal(0.0, 1.0).cdf(self.radii / scale).log()

    def log_prob(self, x: Tensor) -> Tensor:
        r = x.to(self.dtype).norm(dim=-1)
        radial = (
            Normal(self.radii, self.scale).log_prob(r.unsqueeze(-1)) - self._log_mass + self.weights.log()
        )
        return torch.logsumexp(radial, -1) - torch.log(2 * math.pi * r)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        ring = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        r = self.radii[ring] + self.scale * torch.randn(n, generator=generator, dtype=self.dtype)
        while (r <= 0).any():  # exact truncation at 0 by redrawing (vanishingly rare)
            bad = r <= 0
            r[bad] = self.radii[ring[bad]] + self.scale * torch.randn(
                int(bad.sum()), generator=generator, dtype=self.dtype
            )
        theta = 2 * math.pi * torch.rand(n, generator=generator, dtype=self.dtype)
        return torch.stack([r * theta.cos(), r * theta.sin()], -1)

    def assign_modes(self, x: Tensor) -> Tensor:
        return (x.to(self.dtype).norm(dim=-1).unsqueeze(-1) - self.radii).abs().argmin(-1)


class _Unimodal(ToyTarget):
    """One mode: every point belongs to mode 0."""

    def assign_modes(self, x: Tensor) -> Tensor:
        return torch.zeros(x.shape[:-1], dtype=torch.long)


class NealFunnel(_Unimodal):
    r"""Neal's funnel in ``dim`` dimensions: :math:`v = x_1 \sim N(0, \sigma_v^2)`,
    :math:`x_{2..d} \mid v \sim N(0, e^{v} I)`.

    Example:
        >>> funnel = NealFunnel(10)
        >>> funnel.sample(4).shape, funnel.log_prob(torch.zeros(10)).shape
        (torch.Size([4, 10]), torch.Size([]))
    """

    def __init__(self, dim: int = 10, scale: float = 3.0, dtype=torch.float32) -> None:
        if dim < 2:
            raise ValueError(f"the funnel needs dim >= 2, got {dim}")
        self.dim, self.scale, self.dtype = dim, scale, dtype
        self.weights = torch.ones(1, dtype=dtype)

    def log_prob(self, x: Tensor) -> Tensor:
        r"""In log form, :math:`\log N(x_{2..d}; 0, e^v I) = -\frac12 |x_{2..d}|^2 e^{-v}
        - \frac{d-1}{2} (v + \log 2\pi)`: no scale to underflow to 0 deep in the neck (where a
        distribution object would raise), only a density that goes to minus infinity."""
        x = x.to(self.dtype)
        v, rest = x[..., 0], x[..., 1:]
        k = rest.shape[-1]
        conditional = -0.5 * rest.square().sum(-1) * (-v).exp() - 0.5 * k * (v + math.log(2 * math.pi))
        return Normal(0.0, self.scale).log_prob(v) + conditional

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        v = self.scale * torch.randn(n, 1, generator=generator, dtype=self.dtype)
        rest = (v / 2).exp() * torch.randn(n, self.dim - 1, generator=generator, dtype=self.dtype)
        return torch.cat([v, rest], -1)


class Banana(_Unimodal):
    r"""A twisted Gaussian in pairs: for each pair :math:`(x_{2k-1}, x_{2k})`,

    .. math:: x_{2k-1} = a y_{2k-1}, \quad x_{2k} = y_{2k} + b (x_{2k-1}^2 - a^2), \quad y \sim N(0, I),

    a banana of curvature ``curvature`` :math:`b` and width ``scale`` :math:`a`; the map has unit
    Jacobian determinant up to the factor :math:`a`, so the density is exact. ``dim`` is even.

    Example:
        >>> banana = Banana(2)
        >>> banana.sample(3).shape
        torch.Size([3, 2])
    """

    def __init__(self, dim: int = 2, scale: float = 3.0, curvature: float = 0.5, dtype=torch.float32) -> None:
        if dim < 2 or dim % 2:
            raise ValueError(f"the banana needs an even dim >= 2, got {dim}")
        self.dim, self.scale, self.curvature, self.dtype = dim, scale, curvature, dtype
        self.weights = torch.ones(1, dtype=dtype)

    def log_prob(self, x: Tensor) -> Tensor:
        pairs = x.to(self.dtype).unflatten(-1, (self.dim // 2, 2))
        u, w = pairs[..., 0], pairs[..., 1]
        y2 = w - self.curvature * (u**2 - self.scale**2)
        return (Normal(0.0, self.scale).log_prob(u) + Normal(0.0, 1.0).log_prob(y2)).sum(-1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        y = torch.randn(n, self.dim // 2, 2, generator=generator, dtype=self.dtype)
        u = self.scale * y[..., 0]
        w = y[..., 1] + self.curvature * (u**2 - self.scale**2)
        return torch.stack([u, w], -1).flatten(-2)
