"""A small time-conditioned MLP, enough for score models and discriminators on vectors (2-D points, 8x8 digits).

Any ``model(x_t, t)`` works with the losses and samplers of this package; this one is for
experiments, tests and the studies.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["TimeMLP", "fourier_time_features"]


def fourier_time_features(t: torch.Tensor, n_frequencies: int, scale: float = 1.0) -> torch.Tensor:
    """``[c t, sin(2^k pi c t), cos(2^k pi c t)]`` for ``k < n_frequencies`` (``c = scale``)."""
    c = scale * t.float().reshape(-1, 1)
    freqs = math.pi * 2.0 ** torch.arange(n_frequencies, device=t.device, dtype=torch.float32)
    angles = c * freqs
    return torch.cat([c, torch.sin(angles), torch.cos(angles)], dim=1)


class TimeMLP(nn.Module):
    """``f(x, t)``: an MLP on ``[x, fourier(t)]`` with SiLU activations.

    The output is shaped like ``x`` when ``out_dim`` is the flattened size of ``x`` (the default),
    ``[B]`` with ``out_dim=1, squeeze=True`` (a discriminator), ``[B, out_dim]`` otherwise.

    ``time_transform`` maps the schedule's ``t`` into a range of order one before the Fourier
    features (for example ``torch.log`` scaled by a quarter for EDM's noise levels).
    """

    def __init__(
        self,
        dim: int,
        out_dim: int | None = None,
        *,
        hidden: int = 128,
        depth: int = 3,
        n_frequencies: int = 4,
        time_transform=None,
        squeeze: bool = False,
    ) -> None:
        super().__init__()
        out_dim = dim if out_dim is None else out_dim
        if squeeze and out_dim != 1:
            raise ValueError(f"squeeze needs out_dim == 1, got out_dim={out_dim}")
        self.dim = int(dim)
        self.n_frequencies = n_frequencies
        self.time_transform = time_transform
        self.squeeze = squeeze
        width = dim + 1 + 2 * n_frequencies
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = self.time_transform(t) if self.time_transform is not None else t
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"x has {flat.shape[1]} features per sample (shape {tuple(x.shape)}) but this TimeMLP "
                             f"was built for dim={self.dim}")
        if tt.numel() != x.shape[0]:
            raise ValueError(f"t must have one time per sample ({x.shape[0]}), got shape {tuple(tt.shape)}")
        out = self.net(torch.cat([flat, fourier_time_features(tt, self.n_frequencies).to(flat.dtype)], dim=1))
        if self.squeeze:
            return out.squeeze(1)
        # A score model predicts something shaped like its input.
        return out.reshape(x.shape) if out.shape[1] == flat.shape[1] else out
