"""Fitting a Q-probe to features and rewards with one of the objectives of METHODS.md section 4.

Defaults are the paper's: AdamW, learning rate 5e-5, 150 epochs, batches of 1000 samples, the
weight decay given here used as given (the authors' public code dropped it, so AdamW silently
applied its own default 0.01), and for ``L_PG`` groups of 10 samples of the same prompt at
temperature 1.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from ..checks import check_finite, check_temperature, checks, describe_indices
from .objectives import OBJECTIVES, bce_loss, mse_loss, pg_loss, preference_loss
from .probe import QProbe

__all__ = ["fit_probe", "chunk_groups"]


def chunk_groups(groups: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Split the samples of each group into disjoint chunks of at most ``size``, in random order.

    ``groups[i]`` is the group (prompt) of sample ``i``. Returns ``[C, size]`` sample indices, one
    chunk per row, padded with -1 where a group's last chunk is short. Rows come in random order and
    samples are shuffled within their group, drawn from ``generator``.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size (group_size) must be an integer >= 1, got {size!r}")
    _check_groups(groups, "groups")
    n = groups.shape[0]
    order = torch.randperm(n, generator=generator)
    # A stable sort by group keeps the random order inside each group.
    order = order[torch.sort(groups[order], stable=True).indices]
    _, counts = torch.unique_consecutive(groups[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(n) - torch.repeat_interleave(starts, counts)
    chunks_per_group = (counts + size - 1) // size
    first_chunk = torch.cumsum(chunks_per_group, 0) - chunks_per_group
    chunk = torch.repeat_interleave(first_chunk, counts) + position // size
    table = torch.full((int(chunks_per_group.sum()), size), -1, dtype=torch.long)
    table[chunk, position % size] = order
    return table[torch.randperm(table.shape[0], generator=generator)]


def _check_groups(groups: torch.Tensor, name: str, n: int | None = None) -> None:
    if not isinstance(groups, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of prompt ids, got {type(groups).__name__}")
    if groups.dim() != 1 or (n is not None and groups.shape[0] != n):
        expected = f"({n},) to match features" if n is not None else "1-d (one prompt id per sample)"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(groups.shape)}")
    if groups.dtype.is_floating_point or groups.dtype.is_complex or groups.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer prompt ids, got dtype {groups.dtype}")


def _check_device(device: str | torch.device) -> torch.device:
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device") from None
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {device!r}: CUDA is not available on this machine or has no such device "
                         f"({torch.cuda.device_count()} CUDA devices)")
    return parsed


def _preference_pairs(r: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Within each row, every (preferred, rejected) pair of real samples with a strictly higher reward."""
    better = (r.unsqueeze(2) > r.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)
    g, i, j = torch.nonzero(better, as_tuple=True)
    return g * r.shape[1] + i, g * r.shape[1] + j


def _check_group_signal(objective: str, groups: torch.Tensor, rewards: torch.Tensor, group_size: int) -> None:
    """The group objectives learn only from groups of two or more samples (a softmax over one sample
    has zero gradient) and, for ``preference``, from a group with two different rewards: refuse
    training data that cannot move the probe instead of returning the initial one."""
    if group_size < 2:
        raise ValueError(f"objective {objective!r} needs group_size >= 2 (groups of one sample have zero "
                         f"gradient), got {group_size}")
    _, inverse, counts = torch.unique(groups.cpu(), return_inverse=True, return_counts=True)
    if not bool((counts > 1).any()):
        raise ValueError(f"objective {objective!r}: every prompt in groups has only one sample, so the loss has "
                         "zero gradient; give several samples per prompt")
    if objective == "preference":
        r = rewards.detach().cpu().float()
        hi = torch.full((counts.shape[0],), -math.inf).scatter_reduce(0, inverse, r, "amax")
        lo = torch.full((counts.shape[0],), math.inf).scatter_reduce(0, inverse, r, "amin")
        if not bool((hi > lo).any()):
            raise ValueError("objective 'preference' needs a prompt with two samples of different rewards; "
                             "within every group of the given groups the rewards are all equal")


def fit_probe(
    features: torch.Tensor,
    rewards: torch.Tensor,
    groups: torch.Tensor | None = None,
    objective: str = "pg",
    *,
    hidden: Sequence[int] = (),
    lr: float = 5e-5,
    epochs: int = 150,
    batch_size: int = 1000,
    weight_decay: float = 0.0,
    group_size: int = 10,
    temperature: float = 1.0,
    standardize: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> QProbe:
    """Train a :class:`QProbe` on ``features [N, D]`` and ``rewards [N]``.

    ``groups [N]`` names the prompt of each sample; the group objectives (``"pg"``: ``L_PG``,
    ``"preference"``: ``L_QP`` on every pair of a chunk with different rewards) work on disjoint
    chunks of ``group_size`` samples of the same prompt, redrawn every epoch, and a batch holds about
    ``batch_size`` samples in whole chunks. ``"mse"`` (``L_Q``) and ``"bce"`` (``L_CE``) use plain
    shuffled batches. ``standardize`` fits the probe on ``(phi - mean) / std`` of the training
    features (an affine change of variables that the probe stores, so the model class is the same;
    it makes one learning rate suit embeddings of any scale). The run is deterministic for a seed.
    Returns the probe in eval mode on ``device``.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    for name, value in (("features", features), ("rewards", rewards)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if features.dim() != 2:
        raise ValueError(f"features must be [samples, dim], got shape {tuple(features.shape)}")
    n, dim = features.shape
    if n == 0:
        raise ValueError("features is empty: fitting needs at least one sample")
    if rewards.shape != (n,):
        raise ValueError(f"rewards must have shape ({n},) to match features, got {tuple(rewards.shape)}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("group_size", group_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not (math.isfinite(float(lr)) and float(lr) > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not (math.isfinite(float(weight_decay)) and float(weight_decay) >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    check_temperature(temperature, "temperature")
    check_finite(rewards.float(), "rewards")
    bad_rows = ~torch.isfinite(features).all(dim=1)
    if bool(bad_rows.any()):
        raise ValueError(f"features has NaN or infinite values at sample indices {describe_indices(bad_rows)}")
    if objective == "bce":
        outside = (rewards < 0) | (rewards > 1)
        if bool(outside.any()):
            raise ValueError(f"objective 'bce' needs rewards in [0, 1]; out of range at sample indices "
                             f"{describe_indices(outside)}")
    grouped = objective in ("pg", "preference")
    if grouped:
        if groups is None:
            raise ValueError(f"objective {objective!r} needs groups (the prompt of each sample)")
        _check_groups(groups, "groups", n)
        _check_group_signal(objective, groups, rewards, group_size)
    device = _check_device(device) if device is not None else features.device

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the probe's initial weights
    probe = QProbe(dim, hidden)
    x = features.detach().to(device=device, dtype=torch.float32)
    r = rewards.detach().to(device=device, dtype=torch.float32)
    if standardize:
        # Standardise once here instead of in every step; the probe stores the statistics at the end.
        var, mean = torch.var_mean(x, dim=0, correction=0)
        std = var.sqrt()
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        x = (x - mean) / std
    probe.to(device).train()
    head = probe.net  # x is standardised already, so the probe's own (identity) standardisation is skipped
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    group_ids = groups.detach().cpu().long() if grouped else None
    chunks_per_batch = max(1, batch_size // group_size)

    from tqdm.auto import tqdm

    bar = tqdm(range(epochs), desc=f"fit Q-probe ({objective})", disable=not progress, leave=False, dynamic_ncols=True)
    buffer = None
    with checks(False):  # the inputs were validated above; no per-step host reads
        for _ in bar:
            if grouped:
                table = chunk_groups(group_ids, group_size, generator).to(device)
                order = table.clamp(min=0).reshape(-1)
            else:
                order = torch.randperm(n, generator=generator).to(device)
            # One gather per epoch into a reused buffer, so that every batch is a contiguous slice:
            # much cheaper than gathering scattered rows batch by batch.
            if buffer is None or buffer.shape[0] != order.shape[0]:
                buffer = torch.empty((order.shape[0], dim), device=device)
            torch.index_select(x, 0, order, out=buffer)
            shuffled_r = r[order]
            if grouped:
                per_batch = chunks_per_batch * group_size
                pieces = zip(buffer.split(per_batch), shuffled_r.split(per_batch), (table >= 0).split(chunks_per_batch))
            else:
                pieces = zip(buffer.split(batch_size), shuffled_r.split(batch_size), itertools.repeat(None))
            total, steps = torch.zeros((), device=device), 0
            for xb, rb, valid in pieces:
                if grouped:
                    q = head(xb).reshape(valid.shape)
                    rb = rb.reshape(valid.shape)
                    if objective == "pg":
                        loss = pg_loss(q, rb, valid, temperature=temperature)
                    else:
                        win, lose = _preference_pairs(rb, valid)
                        if win.numel() == 0:
                            continue
                        flat = q.reshape(-1)
                        loss = preference_loss(flat[win], flat[lose])
                else:
                    q = head(xb).squeeze(-1)
                    loss = mse_loss(q, rb) if objective == "mse" else bce_loss(q, rb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach()
                steps += 1
            if progress:
                bar.set_postfix(loss=float(total) / max(1, steps))
    if standardize:
        probe.set_standardization(mean, std)
    return probe.eval()
