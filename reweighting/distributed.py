"""Collectives over data-parallel ranks that are no-ops in a single process.

Every normalisation in the library is over the *global* batch: all ranks, with per-rank batch
sizes allowed to differ. Reductions (sum, max, min) need no knowledge of other ranks' sizes and
never synchronise with the host. Gathering the values themselves (needed only by rank and
quantile normalisation) exchanges the per-rank sizes first, which costs one small host sync;
:func:`gather_rows` carries sizes and values in one collective, and :func:`gather_padded` (what
``LossReweighter`` uses) returns them in a padded buffer with a mask, so that nothing is read back
to the host at all.

All functions take an optional ``group`` (a ``torch.distributed`` process group); ``None`` means
the default group and :data:`LOCAL` means "this process only" (no collective even when
``torch.distributed`` is initialised: used to compute on a batch already gathered). Inputs are
not modified. These functions carry no gradient: the library uses
them only on detached signals (losses, scores), never on the graph of the loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "is_distributed",
    "world_size",
    "rank",
    "all_reduce_sum",
    "all_reduce_max",
    "all_reduce_min",
    "all_gather_uneven",
    "gather_rows",
    "gather_padded",
    "global_count",
    "LOCAL",
]


class _Local:
    """The process group of this process alone (see :data:`LOCAL`)."""

    def __repr__(self) -> str:
        return "reweighting.distributed.LOCAL"


LOCAL = _Local()
"""Pass as ``group`` to compute over this process's tensors only, with no collective."""


def is_distributed(group=None) -> bool:
    """True when ``torch.distributed`` is initialised with more than one rank in ``group``."""
    if group is LOCAL:
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group=None) -> int:
    """Number of ranks in ``group`` (1 outside distributed runs)."""
    return dist.get_world_size(group) if is_distributed(group) else 1


def rank(group=None) -> int:
    """This process's rank in ``group`` (0 outside distributed runs)."""
    return dist.get_rank(group) if is_distributed(group) else 0


def _all_reduce(x: torch.Tensor, op, group) -> torch.Tensor:
    out = x.detach().clone()
    if is_distributed(group):
        dist.all_reduce(out, op=op, group=group)
    return out


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Element-wise sum of ``x`` over ranks (a copy of ``x`` in one process)."""
    return _all_reduce(x, dist.ReduceOp.SUM, group)


def all_reduce_max(x: torch.Tensor, group=None) -> torch.Tensor:
    """Element-wise maximum of ``x`` over ranks."""
    return _all_reduce(x, dist.ReduceOp.MAX, group)


def all_reduce_min(x: torch.Tensor, group=None) -> torch.Tensor:
    """Element-wise minimum of ``x`` over ranks."""
    return _all_reduce(x, dist.ReduceOp.MIN, group)


def global_count(n: int | torch.Tensor, device: torch.device | str = "cpu", group=None) -> torch.Tensor:
    """Total number of samples over ranks, as a 0-d float tensor on ``device`` (no host sync)."""
    count = torch.as_tensor(n, dtype=torch.float32, device=device).reshape(())
    return all_reduce_sum(count, group)


def all_gather_uneven(x: torch.Tensor, group=None) -> tuple[torch.Tensor, int]:
    """Concatenate ``x`` (split along dim 0) from every rank, in rank order.

    Ranks may hold different numbers of rows. Returns ``(global_tensor, offset)`` where ``offset``
    is the index of this rank's first row in ``global_tensor``, so this rank's slice is
    ``global_tensor[offset : offset + len(x)]``. Costs one host sync to exchange sizes.
    """
    x = x.detach()
    if not is_distributed(group):
        return x.clone(), 0
    n_ranks = dist.get_world_size(group)
    me = dist.get_rank(group)
    sizes = torch.zeros(n_ranks, dtype=torch.long, device=x.device)
    sizes[me] = x.shape[0]
    dist.all_reduce(sizes, group=group)
    sizes_list = sizes.tolist()
    longest = max(sizes_list)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    pieces = [torch.empty_like(padded) for _ in range(n_ranks)]
    dist.all_gather(pieces, padded, group=group)
    out = torch.cat([p[:s] for p, s in zip(pieces, sizes_list)], dim=0)
    return out, sum(sizes_list[:me])


def gather_rows(x: torch.Tensor, capacity: int, group=None) -> tuple[torch.Tensor, list[int], int]:
    """Every rank's rows of ``x`` (``[n, k]``, ``n`` may differ per rank) in **one** collective.

    Each rank sends a buffer of ``capacity + 1`` rows, the first holding its row count, so a
    single ``all_gather`` carries both the sizes and the values (for the few KB of per-sample
    losses of a batch this costs one collective latency, the same as a scalar all-reduce).
    Every rank reads the sizes, so if one exceeds ``capacity`` all ranks agree to gather again
    with a larger buffer (a power of two); pass the returned capacity next time so that this
    happens once. Returns ``(rows [N, k] in rank order, row counts per rank, capacity used)``;
    this rank's rows start at ``sum(counts[:rank])``. The counts travel in ``x``'s dtype (float32
    counts are exact below 2^24).
    """
    x = x.detach()
    if x.dim() != 2:
        raise ValueError(f"x must be 2-d [rows, columns], got shape {tuple(x.shape)}")
    capacity = max(1, int(capacity))
    if not is_distributed(group):
        return x.clone(), [x.shape[0]], capacity
    n_ranks = dist.get_world_size(group)
    n = x.shape[0]
    # The count rides in the buffer: a half-precision buffer would round counts above 256 (bf16)
    # or 2048 (fp16), so those travel as float32 and come back in x's dtype.
    wire = torch.float32 if x.is_floating_point() and torch.finfo(x.dtype).bits < 32 else x.dtype
    buffer = x.new_zeros((capacity + 1, x.shape[1]), dtype=wire)
    buffer[0, 0] = n
    buffer[1 : 1 + min(n, capacity)] = x[:capacity]
    pieces = [torch.empty_like(buffer) for _ in range(n_ranks)]
    dist.all_gather(pieces, buffer, group=group)
    counts = [int(c) for c in torch.stack([p[0, 0] for p in pieces]).tolist()]
    if max(counts) > capacity:
        return gather_rows(x, 1 << (max(counts) - 1).bit_length(), group)
    rows = torch.cat([p[1 : 1 + c] for p, c in zip(pieces, counts)], dim=0).to(x.dtype)
    return rows, counts, capacity


def gather_padded(x: torch.Tensor, capacity: int, group=None, *, truncate: bool = False,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's rows of ``x`` (``[n, k]``, ``n <= capacity``, may differ per rank) in **one**
    collective and **without reading anything back to the host**.

    Each rank sends ``capacity`` rows and a validity column (1 for its ``n`` real rows, 0 for the
    padding) plus one row holding ``n``. Returns ``(rows, valid, counts)``: ``rows``
    ``[world * capacity, k]`` with rank ``r``'s row ``i`` at ``r * capacity + i``, ``valid``
    ``[world * capacity]`` (bool) marking the real rows, and ``counts`` ``[world]`` (long) each
    rank's ``n``, all on ``x``'s device. So this rank's rows are the static slice starting at
    ``rank * capacity``. A rank whose ``n`` exceeds ``capacity`` raises before the collective
    (its count is known to it alone; the others cannot agree on a larger buffer without a host
    read), unless ``truncate``: then it sends its first ``capacity`` rows and ``counts`` shows
    its true ``n``, for a caller that reads the counts and gathers again with a larger buffer
    (as :func:`gather_rows` does). In one process (or with
    :data:`LOCAL`) the rows come back as they are, all valid. Counts travel in float32 (exact
    below 2^24), and half-precision rows do too.
    """
    x = x.detach()
    if x.dim() != 2:
        raise ValueError(f"x must be 2-d [rows, columns], got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not is_distributed(group):
        return (x.clone(), torch.ones(n, dtype=torch.bool, device=x.device),
                torch.full((1,), n, dtype=torch.long, device=x.device))
    capacity = int(capacity)
    if n > capacity and not truncate:
        raise ValueError(f"x has {n} rows on rank {rank(group)}, more than the gather capacity of {capacity} rows "
                         "per rank: pass a capacity at least as large as the largest per-rank batch")
    wire = torch.float32 if x.is_floating_point() and torch.finfo(x.dtype).bits < 32 else x.dtype
    buffer = x.new_zeros((capacity + 1, x.shape[1] + 1), dtype=wire)
    sent = min(n, capacity)
    buffer[:sent, :-1] = x[:sent]
    buffer[:sent, -1] = 1
    buffer[capacity, -1] = n
    world = dist.get_world_size(group)
    out = buffer.new_empty((world * (capacity + 1), x.shape[1] + 1))
    gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather_into(out, buffer, group=group)
    out = out.view(world, capacity + 1, x.shape[1] + 1)
    rows = out[:, :capacity, :-1].reshape(world * capacity, x.shape[1]).to(x.dtype)
    valid = out[:, :capacity, -1].reshape(-1) == 1
    return rows, valid, out[:, capacity, -1].long()
