"""Offline self-influence: score a data set with a trained model, and PRESENCE-Sequential filtering.

docs/methods/presence.md, offline variant: score every sample of a pool with a trained model's
current weights, drop the highest-self-influence share, and train a fresh model on the rest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from .. import distributed as D
from ..checks import check_batch, check_finite
from .engine import SelfInfluence

__all__ = ["score_dataset", "drop_highest", "load_scores"]


def _to_device(batch: Any, device: torch.device) -> tuple:
    items = tuple(batch) if isinstance(batch, (list, tuple)) else (batch,)
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in items)


def score_dataset(
    model: nn.Module,
    dataset: Any,
    loss_fn: Callable[..., torch.Tensor],
    *,
    batch_size: int = 32,
    modules: Iterable[nn.Module | str] | None = None,
    broadcast: Iterable[nn.Module | str] = (),
    collate_fn: Callable | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    group=None,
) -> torch.Tensor:
    """``[N]`` float32: ``SI(z) = ||grad_K l(z)||^2`` for every sample of ``dataset``, in order.

    ``loss_fn(model, *batch) -> [B]`` gives per-sample losses of a collated batch (a tensor or a
    tuple of tensors, moved to the model's device). The model is put in eval mode while scoring
    (dropout would make the scores random) and restored afterwards; ``modules`` and ``broadcast``
    are passed to :class:`SelfInfluence`.

    Under ``torch.distributed`` (e.g. ``torchrun``) each rank scores one contiguous shard and the
    scores are gathered, so every rank returns all ``N``; rank 0 writes ``out`` (``.pt``: a
    tensor for ``torch.load``, ``.npy``: a NumPy array) when given.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset is empty: nothing to score")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    world, rank = D.world_size(group), D.rank(group)
    shard = range(rank * n // world, (rank + 1) * n // world)
    device = next(model.parameters()).device
    si = SelfInfluence(model, modules, bookkeeping=False, broadcast=broadcast, max_kept_bytes=0, group=group)
    loader = DataLoader(Subset(dataset, shard), batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    was_training = model.training
    model.eval()
    scores = []
    try:
        if progress and rank == 0:
            from tqdm.auto import tqdm

            loader = tqdm(loader, desc="self-influence", leave=False, dynamic_ncols=True)
        for batch in loader:
            with si.capture():
                losses = loss_fn(model, *_to_device(batch, device))
            scores.append(si.norms(losses))
            si.clear()
    finally:
        model.train(was_training)
    local = torch.cat(scores) if scores else torch.zeros(0, device=device)
    everything, _ = D.all_gather_uneven(local, group)
    if out is not None and rank == 0:
        _write(everything.cpu(), Path(out))
    return everything


def _write(scores: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        import numpy as np

        np.save(path, scores.numpy())
    else:
        torch.save(scores, path)


def load_scores(path: str | Path) -> torch.Tensor:
    """Scores written by :func:`score_dataset` (``.pt`` or ``.npy``)."""
    path = Path(path)
    if path.suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(path))
    return torch.load(path)


def drop_highest(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices (ascending) of the samples kept after dropping the ``fraction`` with the highest score.

    ``round(fraction * N)`` samples are dropped; ties at the threshold are broken by index (the
    later sample is dropped first), so the result is deterministic. PRESENCE-Sequential.
    """
    check_batch(scores, "scores")
    check_finite(scores, "scores")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
    n = scores.shape[0]
    dropped = int(math.floor(fraction * n + 0.5))
    order = torch.sort(scores.detach().cpu().double(), stable=True).indices  # ascending, ties by index
    return torch.sort(order[: n - dropped]).values
