"""Data and metrics of the ``tiw-dsm`` study: thin rings with a long-tailed biased set and a nested reference set.

Eight small rings on a circle (each mode a thin ring, which a model cannot draw well from a few
dozen points). The **biased** set's mode proportions fall geometrically by ``imbalance``; the
**reference** set is unbiased (uniform over modes) and ``reference_share`` of the biased set's
size. Seed ``s`` draws both sets; the reference sets of one seed are nested (the first ``n``
points of one stream), so a sweep of the share compares like with like.

Metrics on generated samples: the total-variation error of the mode proportions (each sample goes
to the nearest centre; samples far from every ring are off-mode and left out), the within-mode
sliced Wasserstein distance to fresh points of that ring (quality that does not reward the
proportions), and the share of samples on a ring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the study's configuration (only for annotations)
    from .tiw_dsm_models import Config

__all__ = ["Dataset", "long_tail_proportions", "ring_centres", "ring_points", "ExactRingLogit", "make_rings",
           "on_ring_share", "tv_distance", "sliced_wasserstein", "mmd2", "evaluate_rings", "REFERENCE_POOL_SHARE"]

# The reference stream of a seed holds this share of the biased set's size; a smaller share takes its first points.
REFERENCE_POOL_SHARE = 0.05


def long_tail_proportions(k: int, imbalance: float) -> torch.Tensor:
    """``p_i proportional to imbalance^(-i / (k - 1))``: head / tail = ``imbalance``."""
    p = imbalance ** (-torch.arange(k, dtype=torch.float64) / (k - 1))
    return (p / p.sum()).float()


def _counts(total: int, p: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(total * p).long(), min=1)


@dataclass
class Dataset:
    name: str
    biased: torch.Tensor
    reference: torch.Tensor
    true_proportions: torch.Tensor  # p_data over modes / classes
    biased_proportions: torch.Tensor



def ring_centres(cfg: Config) -> torch.Tensor:
    angle = 2 * math.pi * torch.arange(cfg.ring_modes) / cfg.ring_modes
    return cfg.ring_circle_radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)


def ring_points(cfg: Config, mode: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Points on ring ``mode[i]``: centre + (radius + width * noise) (cos phi, sin phi)."""
    phi = 2 * math.pi * torch.rand(mode.shape[0], generator=g)
    r = cfg.ring_radius + cfg.ring_width * torch.randn(mode.shape[0], generator=g)
    return ring_centres(cfg)[mode] + r[:, None] * torch.stack([torch.cos(phi), torch.sin(phi)], dim=1)


class ExactRingLogit(torch.nn.Module):
    """``log p_data^t(x) - log p_bias^t(x)`` for the rings, by quadrature over each ring's angle.

    Mode ``k`` noised is approximately ``mean_phi N(alpha (c_k + R u(phi)), (alpha^2 w^2 + sigma^2) I)``
    (the ring's radial spread ``w`` taken as isotropic), so both marginals are mixtures over modes
    with the data's and the biased set's proportions, and their log-ratio is exact up to that
    approximation and the quadrature.
    """

    def __init__(self, cfg: Config, schedule, p_data: torch.Tensor, p_bias: torch.Tensor, angles: int = 64) -> None:
        super().__init__()
        self.cfg, self.schedule = cfg, schedule
        phi = 2 * math.pi * torch.arange(angles) / angles
        circle = torch.stack([torch.cos(phi), torch.sin(phi)], dim=1)
        self.register_buffer("points", ring_centres(cfg)[:, None, :] + cfg.ring_radius * circle[None])  # [K, A, 2]
        self.register_buffer("log_p_data", torch.log(p_data))
        self.register_buffer("log_p_bias", torch.log(p_bias))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.schedule.alpha_sigma(t)
        var = (alpha * self.cfg.ring_width) ** 2 + sigma**2
        d2 = (x[:, None, None, :] - alpha[:, None, None, None] * self.points[None]).pow(2).sum(-1)  # [B, K, A]
        log_mode = torch.logsumexp(-d2 / (2 * var[:, None, None]), dim=2)  # up to a constant shared by all modes
        return torch.logsumexp(log_mode + self.log_p_data, dim=1) - torch.logsumexp(log_mode + self.log_p_bias, dim=1)




def make_rings(cfg: Config, seed: int) -> Dataset:
    """Seed ``seed``'s biased set (long-tailed, head / tail ``imbalance``, the head mode drawn) and its
    reference set: the first ``round(reference_share * ring_biased)`` points of the seed's unbiased stream."""
    if not 0.0 < cfg.reference_share <= 1.0:
        raise ValueError(f"reference_share must be in (0, 1], got {cfg.reference_share!r}")
    g = torch.Generator().manual_seed(10_000 + seed)
    k = cfg.ring_modes
    p_bias = long_tail_proportions(k, cfg.imbalance)[torch.randperm(k, generator=g)]
    biased_modes = torch.repeat_interleave(torch.arange(k), _counts(cfg.ring_biased, p_bias))
    biased = ring_points(cfg, biased_modes, g)
    n_ref = max(1, round(cfg.reference_share * cfg.ring_biased))
    pool = max(n_ref, round(REFERENCE_POOL_SHARE * cfg.ring_biased))
    g_ref = torch.Generator().manual_seed(15_000 + seed)
    reference = ring_points(cfg, torch.randint(k, (pool,), generator=g_ref), g_ref)[:n_ref]
    return Dataset("rings", biased, reference, torch.full((k,), 1.0 / k), p_bias)


def on_ring_share(cfg: Config, samples: torch.Tensor) -> float:
    """Share of ``samples`` within three ring widths of some ring (the data: about 99.7%)."""
    radial = (torch.cdist(samples, ring_centres(cfg)) - cfg.ring_radius).abs().min(dim=1).values
    return float((radial < 3 * cfg.ring_width).float().mean())


def tv_distance(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 64, levels: int = 64,
                       g: torch.Generator | None = None) -> float:
    """Mean over random directions of the 1-Wasserstein distance between the projected samples (quantile form)."""
    theta = torch.randn(a.shape[1], projections, generator=g)
    theta = theta / theta.norm(dim=0, keepdim=True)
    q = (torch.arange(levels, dtype=torch.float32) + 0.5) / levels
    qa = torch.quantile(a @ theta, q, dim=0)
    qb = torch.quantile(b @ theta, q, dim=0)
    return float((qa - qb).abs().mean())


def mmd2(a: torch.Tensor, b: torch.Tensor, bandwidth: float) -> float:
    """Unbiased squared MMD with the Gaussian kernel ``exp(-|x - y|^2 / (2 h^2))``."""
    def k(x, y):
        return torch.exp(-torch.cdist(x, y).pow(2) / (2 * bandwidth**2))

    n, m = a.shape[0], b.shape[0]
    kaa = (k(a, a).sum() - n) / (n * (n - 1))
    kbb = (k(b, b).sum() - m) / (m * (m - 1))
    return float(kaa + kbb - 2 * k(a, b).mean())


def evaluate_rings(cfg: Config, samples: torch.Tensor, seed: int) -> dict[str, float]:
    centres = ring_centres(cfg)
    dist = torch.cdist(samples, centres)
    nearest_dist, mode = dist.min(dim=1)
    on_mode = nearest_dist < 2 * cfg.ring_radius
    counts = torch.bincount(mode[on_mode], minlength=cfg.ring_modes).float()
    proportions = counts / counts.sum().clamp(min=1)
    g = torch.Generator().manual_seed(30_000 + seed)
    quality = []
    for k in range(cfg.ring_modes):
        mine = samples[on_mode & (mode == k)]
        if mine.shape[0] < 10:
            continue  # too few to score; the proportion error already counts the missing mode
        truth = ring_points(cfg, torch.full((max(mine.shape[0], 500),), k), g)
        quality.append(sliced_wasserstein(mine, truth, g=g))
    return {
        "tv": tv_distance(proportions, torch.full_like(proportions, 1.0 / cfg.ring_modes)),
        "quality": sum(quality) / len(quality) if quality else float("nan"),
        "off_mode": float(1 - on_mode.float().mean()),
        "proportions": proportions.tolist(),
    }

