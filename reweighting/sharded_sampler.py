"""Weighted sampling from a corpus too large for one rank's memory: a table over shards, and item
tables loaded only for the shards a rank draws from.

An item ``i`` of weight ``w_i`` (total ``T = sum_i w_i``) is drawn with probability ``w_i / T``.
Lay the items end to end on ``[0, T)``, shard after shard, each item an interval of length
``w_i``. Rank ``r`` of ``W`` owns the slice ``[r T / W, (r + 1) T / W)`` of that line (its
*stratum*) and draws i.i.d. from it: a point uniform on the slice falls in item ``i`` with
probability ``W |I_i ∩ slice_r| / T`` (``I_i`` the item's interval). Averaged over the ranks,
which draw equally often, that is exactly ``w_i / T``: every draw of a global batch (``B`` per
rank) has the exact marginal, and the batch is a stratified sample (one equal-mass stratum per
rank, so its frequencies vary less than i.i.d. draws would). An item whose interval straddles a
slice boundary is drawn by both ranks, each with its part.

The draw is two-level. A rank holds an alias table over the shards that meet its slice (each
with the mass it has there, from the shard totals ``shard_weights``: O(shards)), and an alias
table over the items of each such shard, built the first time it draws from the shard, from
``load_shard(s)`` (8 bytes per item). Since a rank's slice covers ``1 / W`` of the mass, it loads
about ``items / W`` items plus two boundary shards: memory O(items / W + shards) per rank. A
shard's loaded weights must sum to its declared total (relative 1e-6), else it raises naming the
shard: the two levels would disagree.

Draws come in chunks of ``chunk_size`` per rank, each from its own seed ``f(seed, epoch, rank,
chunk)`` (so a resume needs no replay) and independent of which shards are loaded.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import operator
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

from . import distributed as D
from .checks import check_count, check_nonnegative_weights
from .sampler import AliasTable, _as_weights, _mix_seed

__all__ = ["ShardedWeightedSampler", "stratum"]

_SUM_RTOL = 1e-6


def stratum(rank: int, world: int, total: float) -> tuple[float, float]:
    """``[r T / W, (r + 1) T / W)``: the slice of the weight line that rank ``r`` of ``W`` draws from."""
    return rank * total / world, (rank + 1) * total / world if rank + 1 < world else total


def _clipped(starts: torch.Tensor, lengths: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``|[start, start + length) ∩ [lo, hi)|`` per interval (float64)."""
    return (torch.clamp(starts + lengths, max=hi) - torch.clamp(starts, min=lo)).clamp_(min=0.0)


class _ItemTable:
    """A shard's alias table over the items ``[first, first + len)`` that have mass in the rank's slice."""

    def __init__(self, weights: torch.Tensor, start: float, lo: float, hi: float):
        starts = start + torch.cumsum(weights, 0) - weights
        mass = _clipped(starts, weights, lo, hi)
        inside = torch.nonzero(mass > 0).squeeze(1)
        if inside.numel() == 0:  # the shard's sliver of the slice was lost to rounding: its nearest item
            nearest = min(int(torch.searchsorted(starts + weights, torch.tensor([lo], dtype=torch.float64))),
                          weights.shape[0] - 1)
            mass, inside = torch.zeros_like(weights), torch.tensor([nearest])
            mass[nearest] = 1.0
        self.first = int(inside[0])
        self.table = AliasTable(mass[self.first: int(inside[-1]) + 1])

    @property
    def nbytes(self) -> int:
        return self.table.nbytes


class ShardedWeightedSampler(Sampler[int]):
    """Draws global item indices with probability ``w_i / sum w`` from a sharded corpus (see the module).

    Args:
        shard_sizes: items per shard; shard ``s`` holds the global items
            ``[sum(shard_sizes[:s]), sum(shard_sizes[:s + 1]))``.
        shard_weights: each shard's total weight (the sum of its items' weights, e.g. written by
            the scoring run next to the shard), finite, >= 0, not all zero.
        load_shard: ``load_shard(s)`` returns shard ``s``'s item weights (1-d, ``shard_sizes[s]``
            long, finite, >= 0); called only for shards that meet this rank's slice, once each
            (again after an eviction, see ``max_loaded_shards``).
        num_samples: draws per epoch over all ranks (default: the number of items); each rank
            yields ``ceil(num_samples / W)``.
        seed: base seed, the same on every rank.
        num_replicas, rank: default to the ``torch.distributed`` world (1 and 0 outside it).
        chunk_size: draws per chunk (the unit of generation and resume).
        max_loaded_shards: keep at most this many item tables (least recently used evicted);
            ``None`` keeps every one loaded. The draws do not depend on it.

    **Resume**: :meth:`state_dict` holds the epoch, the draws this rank has yielded in it, the seed
    and a fingerprint of the shard table (no item tables: they are loaded again on demand). It
    loads on the same number of ranks; on another one only at an epoch boundary, since each
    rank's slice depends on the world size.
    """

    def __init__(
        self,
        shard_sizes: Sequence[int],
        shard_weights: Sequence[float] | torch.Tensor,
        load_shard: Callable[[int], torch.Tensor],
        num_samples: int | None = None,
        seed: int = 0,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        chunk_size: int = 1 << 16,
        max_loaded_shards: int | None = None,
    ) -> None:
        self.num_replicas = D.world_size() if num_replicas is None else check_count(num_replicas, "num_replicas", 1)
        self.rank = D.rank() if rank is None else check_count(rank, "rank")
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank must be in [0, {self.num_replicas}), got {rank!r}")
        if not callable(load_shard):
            raise TypeError(f"load_shard must be a callable shard -> weights, got {type(load_shard).__name__}")
        sizes = torch.as_tensor([check_count(s, f"shard_sizes[{k}]") for k, s in enumerate(shard_sizes)],
                                dtype=torch.int64)
        totals = _as_weights(shard_weights).detach().to("cpu", torch.float64).reshape(-1)
        if totals.shape[0] != sizes.shape[0] or sizes.shape[0] == 0:
            raise ValueError(f"shard_weights has {totals.shape[0]} entries and shard_sizes {sizes.shape[0]}: "
                             "one total per shard, at least one shard")
        check_nonnegative_weights(totals, "shard_weights")
        empty = torch.nonzero((sizes == 0) & (totals > 0)).squeeze(1)
        if empty.numel():
            raise ValueError(f"shards {empty[:5].tolist()} have no items but a positive shard_weights")
        self.shard_sizes = sizes
        self.shard_weights = totals
        self.load_shard = load_shard
        self.item_offsets = torch.cumsum(sizes, 0) - sizes
        self.num_items = int(sizes.sum())
        self.num_samples = self.num_items if num_samples is None else check_count(num_samples, "num_samples", 1)
        self.seed = check_count(seed, "seed", -(2**63))
        self.chunk_size = check_count(chunk_size, "chunk_size", 1)
        if max_loaded_shards is not None:
            check_count(max_loaded_shards, "max_loaded_shards", 1)
        self.max_loaded_shards = max_loaded_shards
        self.epoch = 0
        self._position = 0
        self._current: Iterator[int] | None = None
        self._current_end = 0
        self._tables: OrderedDict[int, _ItemTable] = OrderedDict()
        self.loads = 0  # item tables built so far (a reload after eviction counts again)
        # The shard level: the shards meeting this rank's slice, with the mass each has there.
        self._starts = torch.cumsum(totals, 0) - totals
        self.total = float(totals.sum())
        self._lo, self._hi = stratum(self.rank, self.num_replicas, self.total)
        mass = _clipped(self._starts, totals, self._lo, self._hi)
        self.shards = torch.nonzero(mass > 0).squeeze(1)  # this rank's shards, ascending
        self._shard_table = AliasTable(mass[self.shards])

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        return -(-self.num_samples // self.num_replicas)

    @property
    def nbytes(self) -> int:
        """Bytes of the tables this rank holds now: the shard level and every loaded item table."""
        return self._shard_table.nbytes + self.shards.nbytes + sum(t.nbytes for t in self._tables.values())

    @property
    def loaded_shards(self) -> list[int]:
        """The shards whose item tables are held now."""
        return sorted(self._tables)

    def fingerprint(self) -> str:
        """A hash of the shard sizes and totals (a resumed sampler must have the same)."""
        digest = hashlib.sha256(self.shard_sizes.numpy().tobytes())
        digest.update(self.shard_weights.numpy().tobytes())
        return digest.hexdigest()[:32]

    # ------------------------------------------------------------------ item tables
    def _items(self, shard: int) -> _ItemTable:
        table = self._tables.get(shard)
        if table is not None:
            self._tables.move_to_end(shard)
            return table
        weights = self.load_shard(shard)
        size, declared = int(self.shard_sizes[shard]), float(self.shard_weights[shard])
        if not isinstance(weights, torch.Tensor) or weights.dim() != 1 or weights.shape[0] != size:
            raise ValueError(f"load_shard({shard}) must return a 1-d tensor of {size} weights, got "
                             f"{tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__}")
        weights = weights.detach().to("cpu", torch.float64)
        check_nonnegative_weights(weights, f"load_shard({shard})")
        actual = float(weights.sum())
        if not math.isclose(actual, declared, rel_tol=_SUM_RTOL, abs_tol=0.0):
            raise ValueError(f"load_shard({shard}) returned weights summing to {actual!r} but shard_weights[{shard}] "
                             f"is {declared!r}: the shard totals must be the sums of the shards' weights")
        table = _ItemTable(weights * (declared / actual), float(self._starts[shard]), self._lo, self._hi)
        self._tables[shard] = table
        self.loads += 1
        if self.max_loaded_shards is not None and len(self._tables) > self.max_loaded_shards:
            self._tables.popitem(last=False)
        return table

    # ------------------------------------------------------------------ drawing
    def _chunk(self, chunk: int) -> torch.Tensor:
        """This rank's draws ``[chunk * C, (chunk + 1) * C)`` of the epoch (global item indices)."""
        start = chunk * self.chunk_size
        count = min(self.chunk_size, len(self) - start)
        generator = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch, self.rank, self.num_replicas, chunk))
        u_shard = torch.rand(count, dtype=torch.float64, generator=generator)
        u_item = torch.rand(count, dtype=torch.float64, generator=generator)
        local = self._shard_table.from_uniform(u_shard)
        order = torch.argsort(local, stable=True)
        present, counts = torch.unique_consecutive(local[order], return_counts=True)
        out = torch.empty(count, dtype=torch.int64)
        for k, positions in zip(present.tolist(), order.split(counts.tolist())):
            shard = int(self.shards[k])
            table = self._items(shard)
            out[positions] = table.table.from_uniform(u_item[positions]) + (int(self.item_offsets[shard]) + table.first)
        return out

    @property
    def position(self) -> int:
        """Draws this rank has yielded so far in the current epoch (0 between epochs)."""
        if self._current is None:
            return self._position
        return self._current_end - operator.length_hint(self._current)

    def _lists(self) -> Iterator[Iterator[int]]:
        per_rank = len(self)
        while self._position < per_rank:
            chunk, offset = divmod(self._position, self.chunk_size)
            indices = self._chunk(chunk)[offset:].tolist()
            self._current_end = self._position + len(indices)
            self._current = iter(indices)
            yield self._current
            self._position, self._current = self._current_end, None
        self._position = 0

    def __iter__(self) -> Iterator[int]:
        self._position, self._current = self.position, None  # an abandoned iteration stopped here
        return itertools.chain.from_iterable(self._lists())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draws the next iteration yields (same on every rank)."""
        epoch = check_count(epoch, "epoch", 0)
        if epoch != self.epoch:
            self.epoch = epoch
            self._position, self._current = 0, None

    def probabilities(self) -> torch.Tensor:
        """``[items]`` float64: the exact distribution of one of this rank's draws, from its tables
        (loads every shard of the rank: for checks on small corpora)."""
        out = torch.zeros(self.num_items, dtype=torch.float64)
        shard_p = self._shard_table.probabilities()
        for k, shard in enumerate(self.shards.tolist()):
            table = self._items(shard)
            first = int(self.item_offsets[shard]) + table.first
            out[first: first + len(table.table)] += shard_p[k] * table.table.probabilities()
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self, position: int | None = None) -> dict[str, Any]:
        """Everything an exact resume needs; ``position`` overrides the count of draws consumed this epoch."""
        pos = self.position if position is None else int(position)
        if not 0 <= pos <= len(self):
            raise ValueError(f"position must be in [0, {len(self)}], got {position!r}")
        return {"seed": self.seed, "epoch": self.epoch, "position": pos, "num_samples": self.num_samples,
                "chunk_size": self.chunk_size, "num_replicas": self.num_replicas, "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (same shard table; same world size unless between epochs)."""
        if not isinstance(state, dict):
            raise TypeError("state must be a dict from ShardedWeightedSampler.state_dict(), got "
                            f"{type(state).__name__}")
        missing = [k for k in ("seed", "epoch", "position", "num_samples", "chunk_size", "num_replicas", "fingerprint")
                   if k not in state]
        if missing:
            raise ValueError(f"state is missing {missing}")
        if state["fingerprint"] != self.fingerprint():
            raise ValueError("state was saved for other shard sizes or totals (fingerprints differ): build the "
                             "sampler from the same shard table")
        position, saved_world = int(state["position"]), int(state["num_replicas"])
        if saved_world != self.num_replicas and position != 0:
            raise ValueError(f"state was saved on {saved_world} ranks mid-epoch (position {position}); each rank's "
                             f"slice depends on the world size, so it resumes exactly only on {saved_world} ranks "
                             "or at an epoch boundary")
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self.num_samples = check_count(state["num_samples"], "num_samples", 1)
        self.chunk_size = check_count(state["chunk_size"], "chunk_size", 1)
        if not 0 <= position <= len(self):
            raise ValueError(f"state position {position} is outside the epoch of {len(self)} draws per rank")
        self._position = 0 if position == len(self) else position
        self._current = None
