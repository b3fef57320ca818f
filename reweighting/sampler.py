"""Dataset-level weighted sampling at any scale: an alias table and a distributed sampler.

``torch.multinomial`` (and :class:`torch.utils.data.WeightedRandomSampler`, built on it) costs
``O(n + m log n)`` for ``m`` draws over ``n`` items, rebuilds its cumulative table on every call
and refuses more than ``2^24`` categories. An alias table (Walker 1977, Vose 1991) costs ``O(n)``
space once and ``O(1)`` per draw: split the probability mass into ``n`` buckets of equal size,
each holding at most two items (its own item with probability ``prob[j]`` and one ``alias[j]``),
then a draw is one uniform bucket and one biased coin.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

from . import distributed as D
from .checks import check_count, check_nonnegative_weights, checks_enabled

__all__ = ["AliasTable", "DistributedWeightedSampler"]

_MAX_ITEMS = 2**31 - 1  # the alias shares an int64 with the probability's 32 bits
_LOW32 = 0xFFFFFFFF


class AliasTable:
    """Walker's alias table for drawing indices ``i`` with probability ``w_i / sum_j w_j``.

    Built from ``weights`` (1-d, finite, >= 0, not all zero; up to 2^31 - 1 items, no ``2^24``
    limit) in vectorised form. With ``p_i = n w_i / sum w`` (mean 1), items are *light*
    (``p <= 1``) or *heavy* (``p > 1``). The sweep of Vose's construction (fill light buckets from
    the current heavy item; when a heavy item's remainder drops to 1 or below, its own bucket
    becomes light and is filled by the next heavy item) is written with two prefix sums: the
    deficits of the light items ``D_m = sum_{k<m} (1 - p_light_k)`` and the surpluses of the heavy
    items ``S_j = sum_{k<=j} (p_heavy_k - 1)``. Light item ``m`` is aliased to the first heavy ``j``
    with ``S_j > D_m``; heavy item ``j`` keeps ``1 + S_j - D_{m*}`` of its bucket, where ``m*`` is the
    first ``m`` with ``D_m >= S_j``, and is aliased to heavy ``j + 1`` (the last heavy keeps its whole
    bucket). The two look-ups are ``searchsorted`` calls, so the build is ``O(n log n)`` vectorised
    work in float64 (about a second of CPU at 10^7 items, a transient ~25 bytes per item); a draw
    is ``O(1)``.

    Storage: one int64 per item (8 bytes), the bucket's own-item probability as float32 bits in the
    low half and its alias in the high half, so that a draw reads one memory location.
    """

    def __init__(self, weights: torch.Tensor) -> None:
        weights = _as_weights(weights)
        check_nonnegative_weights(weights, "weights")
        if weights.shape[0] > _MAX_ITEMS:
            raise ValueError(f"weights has {weights.shape[0]} items; an AliasTable holds at most {_MAX_ITEMS}")
        self.table = _build_table(weights.detach())

    def __len__(self) -> int:
        return self.table.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by the table."""
        return self.table.nbytes

    @property
    def prob(self) -> torch.Tensor:
        """Probability (float32) that a draw landing in bucket ``j`` returns ``j`` itself."""
        return (self.table & _LOW32).int().view(torch.float32)

    @property
    def alias(self) -> torch.Tensor:
        """The item (int64) a draw landing in bucket ``j`` returns otherwise."""
        return self.table >> 32

    def from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        """Map float64 uniforms ``u in [0, 1)`` to indices (int64): one uniform per draw.

        ``n u`` is split into a bucket ``floor(n u)`` and a fraction; the draw is the bucket's own
        item when the fraction is below ``prob[bucket]``, otherwise its alias. A float64 uniform has
        53 random bits, of which ``log2 n`` pick the bucket and the rest (26 at 10^8 items) the coin.
        """
        if not isinstance(u, torch.Tensor) or not u.is_floating_point():
            raise TypeError(f"u must be a floating-point tensor of uniforms in [0, 1), got "
                            f"{type(u).__name__ if not isinstance(u, torch.Tensor) else u.dtype}")
        if checks_enabled() and u.numel() and bool(((u < 0) | ~(u < 1)).any()):
            raise ValueError(f"u must lie in [0, 1), got values from {float(u.min())} to {float(u.max())}")
        n = len(self)
        x = u.to(torch.float64) * n
        bucket = x.long().clamp_(max=n - 1)
        entry = self.table[bucket]
        # Non-negative float32 values order like their bit patterns, so the coin is an integer compare.
        fraction_bits = x.sub_(bucket).float().view(torch.int32)
        own = fraction_bits < (entry & _LOW32)
        return torch.where(own, bucket, entry >> 32)

    def sample(self, num_samples: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``num_samples`` i.i.d. indices (int64), ``O(1)`` each."""
        num_samples = check_count(num_samples, "num_samples", 0)
        u = torch.rand(num_samples, dtype=torch.float64, generator=generator, device=self.table.device)
        return self.from_uniform(u)

    def probabilities(self) -> torch.Tensor:
        """The exact distribution the table draws from (float64): ``(prob_i + sum_{j: alias_j = i} (1 - prob_j)) / n``.

        Equals ``w / sum w`` up to rounding; used to check a table without sampling.
        """
        own = self.prob.double()
        given = torch.zeros(len(self), dtype=torch.float64, device=own.device)
        given.index_add_(0, self.alias, 1.0 - own)
        return (own + given) / len(self)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"table": self.table}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> AliasTable:
        """The table saved by :meth:`state_dict`, without rebuilding it."""
        table = state.get("table") if isinstance(state, dict) else None
        if not isinstance(table, torch.Tensor) or table.dim() != 1 or table.dtype != torch.int64:
            raise ValueError("state must hold a 1-d int64 tensor 'table' (from AliasTable.state_dict)")
        out = cls.__new__(cls)
        out.table = table
        return out


def _as_weights(weights: Any) -> torch.Tensor:
    """A tensor of weights from a tensor or a sequence of numbers, with a clear error otherwise."""
    if isinstance(weights, torch.Tensor):
        if weights.dtype == torch.bool or weights.is_complex():
            raise TypeError(f"weights must hold real numbers, got dtype {weights.dtype}")
        return weights
    if isinstance(weights, (str, bytes)):
        raise TypeError(f"weights must be a tensor or a sequence of numbers, got {type(weights).__name__}")
    try:
        return torch.as_tensor(weights, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"weights must be a tensor or a sequence of numbers, got {type(weights).__name__} "
                        f"({err})") from None


_CHUNK = 1 << 20  # elements per chunk where a full-length temporary is not needed


def _build_table(weights: torch.Tensor) -> torch.Tensor:
    """The packed alias table for ``weights`` (validated): the vectorised Vose sweep of :class:`AliasTable`.

    ``p = n w / sum w`` is never held for all items at once in float64: the light/heavy split and
    the bucket probabilities are computed in chunks, and only the heavy items' surpluses and the
    light items' deficits are kept (8 bytes per item), so the transient peak stays near 25 bytes
    per item besides the weights.
    """
    n = weights.shape[0]
    device = weights.device
    # p = n w / sum w, computed as (w / max w) * (n / sum(w / max w)): the sum of weights near the
    # largest float would overflow, and n / sum of subnormal weights would (p = inf or 0 everywhere).
    top = max(float(weights[s : s + _CHUNK].max()) for s in range(0, n, _CHUNK))
    scale = n / sum(float((weights[s : s + _CHUNK].double() / top).sum()) for s in range(0, n, _CHUNK))

    def p_of(w: torch.Tensor) -> torch.Tensor:  # out of place: w.double() may be the caller's tensor
        return (w.double() / top).mul_(scale)

    heavy_mask = torch.empty(n, dtype=torch.bool, device=device)
    prob = torch.empty(n, dtype=torch.float32, device=device)
    for s in range(0, n, _CHUNK):
        p = p_of(weights[s : s + _CHUNK])
        heavy_mask[s : s + _CHUNK] = p > 1.0
        prob[s : s + _CHUNK] = p.clamp_(max=1.0)
    heavy = torch.nonzero(heavy_mask).squeeze(1).int()
    light = torch.nonzero(heavy_mask.logical_not_()).squeeze(1).int()
    del heavy_mask
    alias = torch.arange(n, dtype=torch.int32, device=device)
    if heavy.numel() > 0:
        surplus = torch.empty(heavy.numel(), dtype=torch.float64, device=device)  # S_j
        for s in range(0, heavy.numel(), _CHUNK):
            surplus[s : s + _CHUNK] = p_of(weights[heavy[s : s + _CHUNK]]).sub_(1.0)
        surplus.cumsum_(0)
        deficit = torch.zeros(light.numel() + 1, dtype=torch.float64, device=device)  # D_m, with D_0 = 0
        for s in range(0, light.numel(), _CHUNK):
            deficit[1 + s : 1 + s + _CHUNK] = p_of(weights[light[s : s + _CHUNK]]).neg_().add_(1.0)
        deficit.cumsum_(0)
        last = heavy.numel() - 1
        # Light m goes to the first heavy j with S_j > D_m (rounding may leave none: then the last).
        owner = torch.searchsorted(surplus, deficit[:-1], right=True, out_int32=True).clamp_(max=last)
        for s in range(0, light.numel(), _CHUNK):
            alias[light[s : s + _CHUNK]] = heavy[owner[s : s + _CHUNK]]
        del owner, light
        # Heavy j closes at the first m with D_m >= S_j and keeps 1 + S_j - D_m of its bucket.
        closing = torch.searchsorted(deficit, surplus, out_int32=True)
        closes = closing < deficit.numel()
        kept = surplus.add_(1.0).sub_(deficit[closing.clamp_(max=deficit.numel() - 1)])
        kept = torch.where(closes, kept, torch.ones_like(kept)).clamp_(0.0, 1.0)
        kept[last] = 1.0  # the last heavy item has no successor: its bucket is its own
        del deficit, closing, closes
        prob[heavy] = kept.float()
        alias[heavy[:-1]] = heavy[1:]
        del kept, heavy
    else:  # every p is 1 within rounding: each bucket is its own item
        prob.fill_(1.0)
    table = alias.long().bitwise_left_shift_(32)
    del alias
    for s in range(0, n, _CHUNK):
        table[s : s + _CHUNK].bitwise_or_(prob[s : s + _CHUNK].view(torch.int32).long())
    return table


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), so chunk streams do not overlap by accident."""
    x = 0
    for part in parts:
        x = (x + (int(part) & 0xFFFFFFFFFFFFFFFF) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


class DistributedWeightedSampler(Sampler[int]):
    """Draws dataset indices with probability ``w_i / sum w``, sharded over data-parallel ranks.

    Every epoch draws one **global** sequence of ``total_size = len(self) * num_replicas`` indices
    that is the same on every rank, and rank ``r`` takes the positions ``r, r + W, r + 2W, ...``
    (``W = num_replicas``): the shards are disjoint and together complete, and a global batch of
    ``B * W`` consecutive positions is exactly what ``W`` ranks see as their ``k``-th batches of ``B``.
    The global sequence depends only on ``(seed, epoch, weights)``, not on ``W``.

    Args:
        weights: per-item weights (1-d, finite, >= 0, not all zero), any length.
        num_samples: draws per epoch over all ranks (default: ``len(weights)``); each rank yields
            ``ceil(num_samples / W)``, so up to ``W - 1`` extra draws pad the last global batch.
        replacement: ``True`` (default): i.i.d. draws from an :class:`AliasTable`, ``O(1)`` each,
            generated lazily in chunks of ``chunk_size`` positions, each chunk from its own seed
            ``f(seed, epoch, chunk)`` so that resuming mid-epoch needs no replay. ``False``: a
            weighted permutation (Efraimidis-Spirakis keys ``E_i / w_i``, ``E_i ~ Exp(1)``, sorted),
            ``O(n log n)`` per epoch; ``num_samples`` may not exceed the number of positive weights.
        seed: base seed, the same on every rank.
        num_replicas: the number of ranks; defaults to the ``torch.distributed`` world size (1 outside it).
        rank: this process's rank; defaults to the ``torch.distributed`` rank (0 outside it).

    **Changing weights**: :meth:`update_weights` rebuilds the table; it applies from the next epoch
    that starts (immediately if no epoch is in progress), so an epoch is always drawn from one
    distribution and can be resumed exactly.

    **Resume**: :meth:`state_dict` holds the epoch, the number of indices this rank has yielded in
    it, the seed and the tables (8 bytes per item each). After :meth:`load_state_dict` the next
    iteration continues where the saved one stopped, then later epochs start from the beginning.
    A ``DataLoader`` with workers fetches indices ahead of training; pass the number of indices
    actually consumed as ``state_dict(position=...)`` in that case (``batches_done * batch_size``).
    An iteration abandoned part-way continues where it stopped at the next ``iter()``, unless
    :meth:`set_epoch` moves to another epoch.

    Memory: the table (8 bytes per item; building it needs about 25 more, briefly), a second one
    only while an update waits for the epoch to end, and one chunk of draws; nothing proportional
    to ``num_samples``. Without replacement: the weights (4 bytes per item) and, while an epoch's
    permutation is drawn, its keys and order (16 bytes per item).
    """

    def __init__(
        self,
        weights: torch.Tensor,
        num_samples: int | None = None,
        replacement: bool = True,
        seed: int = 0,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        chunk_size: int = 1 << 16,
    ) -> None:
        self.num_replicas = D.world_size() if num_replicas is None else check_count(num_replicas, "num_replicas")
        self.rank = D.rank() if rank is None else check_count(rank, "rank")
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas!r}")
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank must be in [0, {self.num_replicas}), got {rank!r}")
        check_count(chunk_size, "chunk_size", 1)
        if isinstance(replacement, str) or replacement not in (True, False):
            raise TypeError(f"replacement must be True or False, got {type(replacement).__name__} {replacement!r}")
        self.replacement = bool(replacement)
        self.seed = check_count(seed, "seed", -(2**63))
        self.chunk_size = int(chunk_size)
        self.epoch = 0
        self._position = 0  # indices this rank had yielded in the current epoch when the current list began
        self._current: Iterator[int] | None = None  # the list being yielded, and where its end puts us
        self._current_end = 0
        self._num_samples_arg = num_samples
        self._table: AliasTable | torch.Tensor
        self._pending: AliasTable | torch.Tensor | None = None
        self._table, self.num_samples = self._prepare(weights)

    # ------------------------------------------------------------------ weights
    def _prepare(self, weights: torch.Tensor) -> tuple[AliasTable | torch.Tensor, int]:
        weights = _as_weights(weights)
        check_nonnegative_weights(weights, "weights")
        n = weights.shape[0]
        num = n if self._num_samples_arg is None else check_count(self._num_samples_arg, "num_samples", 1)
        if self.replacement:
            return AliasTable(weights), num
        positive = int((weights > 0).sum())
        if num > positive:
            raise ValueError(
                f"num_samples={num} draws without replacement need as many items with positive weight, "
                f"but weights has only {positive}"
            )
        return weights.detach().to(torch.float32).clone(), num

    def update_weights(self, weights: torch.Tensor) -> None:
        """New weights (same rules as the constructor); used from the next epoch that starts."""
        table, num = self._prepare(weights)
        if num != self.num_samples:
            raise ValueError(
                f"weights has {weights.shape[0]} items, which changes num_samples from {self.num_samples} to {num}; "
                "pass num_samples to the constructor to keep the epoch length fixed"
            )
        if self.position == 0:
            self._table, self._pending = table, None
        else:
            self._pending = table

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draw the next iteration yields (call before each epoch, same on every rank)."""
        epoch = check_count(epoch, "epoch", 0)
        if epoch != self.epoch:
            self.epoch = epoch
            self._position, self._current = 0, None

    def __len__(self) -> int:
        return -(-self.num_samples // self.num_replicas)

    @property
    def total_size(self) -> int:
        """Draws per epoch over all ranks, padding included."""
        return len(self) * self.num_replicas

    # ------------------------------------------------------------------ drawing
    def _chunk(self, chunk: int) -> torch.Tensor:
        """Global positions ``[chunk * C, (chunk + 1) * C)`` of this epoch's sequence (with replacement)."""
        start = chunk * self.chunk_size
        count = min(self.chunk_size, self.total_size - start)
        generator = torch.Generator(device=self._table.table.device)
        generator.manual_seed(_mix_seed(self.seed, self.epoch, chunk))
        return self._table.sample(count, generator=generator)

    def global_indices(self) -> torch.Tensor:
        """This epoch's whole global sequence (``total_size`` indices; every rank's shard interleaved).

        Materialises ``total_size`` indices: meant for checks and small data, not the training loop.
        """
        if self.replacement:
            chunks = -(-self.total_size // self.chunk_size)
            return torch.cat([self._chunk(c) for c in range(chunks)])
        return self._permutation()[: self.total_size]

    def _permutation(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch, -1))
        w = self._table.double()
        exp = torch.empty_like(w).exponential_(1.0, generator=generator)
        keys = torch.where(w > 0, exp / w, torch.full_like(w, math.inf))
        order = torch.argsort(keys, stable=True)
        order = order[: self.num_samples]
        # Pad like the with-replacement sampler does, cycling through the draw.
        if self.total_size > order.numel():
            order = torch.cat([order, order[: self.total_size - order.numel()]])
        return order

    @property
    def position(self) -> int:
        """Indices this rank has yielded so far in the current epoch (0 between epochs)."""
        if self._current is None:
            return self._position
        # A list iterator knows how many items it has left, so nothing is counted per item.
        return self._current_end - operator.length_hint(self._current)

    def _begin(self, indices: list[int]) -> Iterator[int]:
        self._current_end = self._position + len(indices)
        self._current = iter(indices)
        return self._current

    def _lists(self) -> Iterator[Iterator[int]]:
        """This rank's remaining indices of the epoch, one list iterator per chunk."""
        per_rank = len(self)
        W, r = self.num_replicas, self.rank
        if not self.replacement:
            yield self._begin(self._permutation()[r + W * self._position :: W].tolist())
            self._position, self._current = self._current_end, None
        while self._position < per_rank:
            # The chunk holding global position r + W * position, and this rank's positions in it.
            global_pos = r + W * self._position
            chunk = global_pos // self.chunk_size
            offset = global_pos - chunk * self.chunk_size
            yield self._begin(self._chunk(chunk)[offset::W][: per_rank - self._position].tolist())
            self._position, self._current = self._current_end, None
        self._position = 0

    def __iter__(self) -> Iterator[int]:
        self._position, self._current = self.position, None  # an abandoned iteration stopped here
        if self._position == 0 and self._pending is not None:
            self._table, self._pending = self._pending, None
        # chain() hands out the items in C; the position is read off the current list iterator.
        return itertools.chain.from_iterable(self._lists())

    # ------------------------------------------------------------------ state
    def state_dict(self, position: int | None = None) -> dict[str, Any]:
        """Everything an exact resume needs; ``position`` overrides the count of indices consumed this epoch."""
        pos = self.position if position is None else int(position)
        if not 0 <= pos <= len(self):
            raise ValueError(f"position must be in [0, {len(self)}], got {position!r}")

        def table_state(table):
            return table.state_dict() if isinstance(table, AliasTable) else {"weights": table}

        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": pos,
            "num_samples": self.num_samples,
            "replacement": self.replacement,
            "chunk_size": self.chunk_size,
            "num_replicas": self.num_replicas,
            "table": table_state(self._table),
            "pending": None if self._pending is None else table_state(self._pending),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, also on a different number of ranks when that is exact.

        The state records the world size ``W_saved`` it was saved under. Ranks run in lock-step,
        so at per-rank position ``p`` the first ``W_saved * p`` positions of the epoch's global
        sequence (which does not depend on the world size) are consumed. On ``W`` ranks the resume
        continues at per-rank position ``W_saved * p / W``, which must be a whole number
        (``ValueError`` otherwise, saying so); at or past the end of the epoch's real draws it
        starts from 0. A state without ``num_replicas`` (saved before it was recorded) loads only
        between epochs (``position`` 0); mid-epoch it raises, since its resume point depends on
        the unknown world size: add ``state["num_replicas"] = <saved world size>`` to load it.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from DistributedWeightedSampler.state_dict(), "
                            f"got {type(state).__name__}")
        required = ("seed", "epoch", "position", "num_samples", "replacement", "chunk_size", "table")
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"state is missing {missing}")
        if bool(state["replacement"]) != self.replacement:
            raise ValueError(f"state has replacement={state['replacement']} but this sampler {self.replacement}")

        def table_from(s):
            return AliasTable.from_state_dict(s) if self.replacement else s["weights"]

        table = table_from(state["table"])
        saved_items, items = len(table), len(self._table)
        if saved_items != items:  # another data set: loading it would silently change what is drawn
            raise ValueError(f"state is from a sampler over {saved_items} items, but this sampler draws from "
                             f"{items}: load it into a sampler built over the same data set")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.num_samples = int(state["num_samples"])
        self.chunk_size = int(state["chunk_size"])
        self._table = table
        self._pending = None if state.get("pending") is None else table_from(state["pending"])
        position = int(state["position"])
        saved_world = state.get("num_replicas")
        if saved_world is None:
            if position != 0:
                raise ValueError(
                    f"state has no 'num_replicas' (it was saved before the world size was recorded) and a "
                    f"mid-epoch position {position}: where to resume depends on the number of ranks it was "
                    "saved under; set state['num_replicas'] to that number and load it again"
                )
            saved_world = self.num_replicas
        saved_world = int(saved_world)
        if saved_world < 1:
            raise ValueError(f"state num_replicas must be >= 1, got {saved_world}")
        saved_len = -(-self.num_samples // saved_world)
        if not 0 <= position <= saved_len:
            raise ValueError(f"state position {position} is outside the saved epoch of {saved_len} indices per "
                             f"rank (num_replicas={saved_world})")
        consumed = saved_world * position  # global positions consumed by all ranks in lock-step
        if position == saved_len or consumed >= self.num_samples:
            position = len(self)
        elif consumed % self.num_replicas:
            raise ValueError(
                f"cannot resume exactly on {self.num_replicas} ranks: the state was saved on {saved_world} ranks "
                f"after {position} indices each ({consumed} of the epoch's global draws), which {self.num_replicas} "
                "ranks cannot split evenly; resume on a world size that divides it, or at an epoch boundary"
            )
        else:
            position = consumed // self.num_replicas
        self._position = 0 if position == len(self) else position
        self._current = None
