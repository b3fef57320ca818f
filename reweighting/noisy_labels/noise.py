"""Synthetic label noise for experiments: corrupt clean labels through a known ``T[noisy, clean]``."""

from __future__ import annotations

import torch

from ..checks import check_batch
from .transition import _check_labels, check_transition, pair_transition, symmetric_transition

__all__ = ["corrupt_labels", "symmetric_noise", "pair_noise"]


def corrupt_labels(labels: torch.Tensor, T: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw each noisy label independently from column ``labels[i]`` of ``T``: ``P(noisy | clean = labels[i])``.

    Seeded through ``generator``; the same generator state gives the same noisy labels.
    """
    check_batch(labels, "labels")
    T = check_transition(T)
    _check_labels(labels, T.shape[0])
    clean = labels.long()
    columns = T.t()[clean.cpu()].double().clamp(min=0)
    return torch.multinomial(columns, 1, generator=generator).reshape(-1).to(labels.device)


def symmetric_noise(
    labels: torch.Tensor, rate: float, num_classes: int, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric noise (see :func:`symmetric_transition`); returns ``(noisy_labels, true_T)``."""
    T = symmetric_transition(num_classes, rate)
    return corrupt_labels(labels, T, generator=generator), T


def pair_noise(
    labels: torch.Tensor,
    rate: float,
    num_classes: int,
    mapping: list[int] | torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric noise through a class mapping (default ``j -> j + 1 mod C``, see
    :func:`pair_transition`); returns ``(noisy_labels, true_T)``."""
    T = pair_transition(num_classes, rate, mapping)
    return corrupt_labels(labels, T, generator=generator), T
