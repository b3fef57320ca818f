"""Packed rows in the engine: positions regrouped from ``[rows, positions]`` to ``[documents, positions]``.

A document's per-sample gradient under a position-wise rule is the sum of its positions' terms, so
moving each position's input and output gradient to its document's row (keeping its position, as a
document lies in one row) and padding to a spare row gives per-document factors with static shapes.
"""

from __future__ import annotations

import torch

from ..checks import checks_enabled

__all__ = ["document_slots", "check_documents", "by_document"]


def document_slots(documents: torch.Tensor, n: int) -> torch.Tensor:
    """``[rows * positions]``: where each position of a packed batch goes in ``[n + 1, positions]``.

    Document ``d``'s tokens keep their positions, in row ``d`` (a document lies in one row, so its
    positions are distinct); padding (id -1) goes to the spare row ``n``. Static shapes only.
    """
    r, t = documents.shape
    pos = torch.arange(t, device=documents.device).expand(r, t)
    return torch.where(documents >= 0, documents * t + pos, n * t + pos).reshape(-1)


def check_documents(documents: torch.Tensor, n: int) -> None:
    """Document ids ``[rows, positions]``: integers in ``[-1, n)``, each document one contiguous run in one row."""
    if not isinstance(documents, torch.Tensor) or documents.dim() != 2 or documents.is_floating_point() \
            or documents.dtype == torch.bool:
        raise ValueError("documents must be an integer tensor [rows, positions] of document ids (-1: padding), "
                         f"got {getattr(documents, 'dtype', type(documents).__name__)} of shape "
                         f"{tuple(getattr(documents, 'shape', ()))}")
    if not checks_enabled():
        return
    if bool((documents < -1).any()) or bool((documents >= n).any()):
        raise ValueError(f"documents ids must be in [-1, {n}) for {n} per-document losses, got values from "
                         f"{int(documents.min())} to {int(documents.max())}")
    prev = torch.cat([torch.full_like(documents[:, :1], -2), documents[:, :-1]], 1)
    starts = documents[(documents != prev) & (documents >= 0)]
    runs = torch.bincount(starts, minlength=n)
    if bool((runs != 1).any()):
        bad = torch.nonzero(runs != 1).reshape(-1)[:5].tolist()
        raise ValueError(f"documents {bad} are empty, split into several runs, or span rows: each document must be "
                         "one contiguous run of positions in one row")


def by_document(t: torch.Tensor, slots: torch.Tensor, n: int, positions: int) -> torch.Tensor:
    """``[rows, positions, ...]`` to ``[n, positions, ...]`` (zeros after a document's end)."""
    out = t.new_zeros((n + 1) * positions, *t.shape[2:])
    out.index_copy_(0, slots, t.reshape(-1, *t.shape[2:]))
    return out.reshape(n + 1, positions, *t.shape[2:])[:n]
