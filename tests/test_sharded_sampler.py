"""The two-level sampler: exact per-draw distribution, frequencies against w / sum w, rank slices, resume."""

import math

import pytest
import torch

from reweighting.sharded_sampler import ShardedWeightedSampler


def corpus(sizes=(7, 0, 13, 5, 9, 11), seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.rand(n, generator=g, dtype=torch.float64) ** 3 for n in sizes]
    weights[0][2] = 0.0  # a zero-weight item is never drawn
    loads = []

    def load(s):
        loads.append(s)
        return weights[s].clone()

    return list(sizes), [float(w.sum()) for w in weights], load, torch.cat(weights), loads


def expected_rank_distribution(w, rank, world):
    """Independent of the sampler: item i's share of the slice [r T / W, (r+1) T / W) of the line of weights."""
    total = float(w.sum())
    ends = torch.cumsum(w, 0)
    starts = ends - w
    lo, hi = rank * total / world, (rank + 1) * total / world
    inside = torch.minimum(ends, torch.tensor(hi)) - torch.maximum(starts, torch.tensor(lo))
    return inside.clamp(min=0) * world / total


@pytest.mark.parametrize("world", [1, 3, 4])
def test_each_rank_draws_from_its_slice_and_the_ranks_average_to_w_over_sum(world):
    sizes, totals, load, w, _ = corpus()
    mix = torch.zeros_like(w)
    for r in range(world):
        s = ShardedWeightedSampler(sizes, totals, load, num_replicas=world, rank=r)
        p = s.probabilities()
        torch.testing.assert_close(p, expected_rank_distribution(w, r, world), atol=1e-6, rtol=1e-5)
        mix += p / world
    torch.testing.assert_close(mix, w / w.sum(), atol=1e-6, rtol=1e-5)


def chi_square(counts, p):
    n = counts.sum()
    keep = p > 0
    assert counts[~keep].sum() == 0, "an item of probability 0 was drawn"
    expected = n * p[keep]
    return float(((counts[keep] - expected) ** 2 / expected).sum()), int(keep.sum()) - 1


def test_draw_frequencies_match_the_exact_distribution():
    sizes, totals, load, w, _ = corpus()
    world, n = 3, 60_000
    pooled = torch.zeros_like(w)
    for r in range(world):
        s = ShardedWeightedSampler(sizes, totals, load, num_samples=n * world, num_replicas=world, rank=r,
                                   chunk_size=4096, seed=7)
        counts = torch.bincount(torch.tensor(list(s)), minlength=w.numel()).double()
        stat, dof = chi_square(counts, expected_rank_distribution(w, r, world))
        assert stat < dof + 5 * math.sqrt(2 * dof), (r, stat, dof)  # about 5 standard deviations
        pooled += counts
    stat, dof = chi_square(pooled, w / w.sum())
    assert stat < dof + 5 * math.sqrt(2 * dof)


def test_ranks_load_only_the_shards_that_meet_their_slice():
    sizes = [1000] * 40
    g = torch.Generator().manual_seed(1)
    weights = [torch.rand(n, generator=g, dtype=torch.float64) for n in sizes]
    world = 4
    for r in range(world):
        loaded = []

        def load(k, loaded=loaded):
            loaded.append(k)
            return weights[k]

        s = ShardedWeightedSampler(sizes, [float(x.sum()) for x in weights], load, num_replicas=world, rank=r,
                                   num_samples=40_000)
        drawn = torch.tensor(list(s))
        assert sorted(set(loaded)) == s.shards.tolist() == s.loaded_shards
        assert len(s.shards) <= 40 // world + 2  # a quarter of the mass, plus the two boundary shards
        shard_of = drawn // 1000
        assert set(shard_of.tolist()) <= set(s.shards.tolist())
        items = sum(len(t.table) for t in s._tables.values())
        assert items <= 40_000 / world + 2 * 1000
        assert s.nbytes <= 8 * items + 16 * len(s.shards) + 64


def test_resume_mid_epoch_is_exact_and_the_draw_does_not_depend_on_the_cache():
    sizes, totals, load, w, loads = corpus()
    kwargs = dict(num_samples=50, num_replicas=2, rank=1, chunk_size=8, seed=3)
    full = ShardedWeightedSampler(sizes, totals, load, **kwargs)
    whole = list(full)
    s = ShardedWeightedSampler(sizes, totals, load, **kwargs)
    it = iter(s)
    first = [next(it) for _ in range(11)]
    state = s.state_dict()
    resumed = ShardedWeightedSampler(sizes, totals, load, max_loaded_shards=1, **kwargs)
    resumed.load_state_dict(state)
    assert first + list(resumed) == whole
    assert list(resumed) == whole  # the next iteration starts the epoch again
    resumed.set_epoch(1)
    assert list(resumed) != whole
    other_rank = ShardedWeightedSampler(sizes, totals, load, **{**kwargs, "rank": 0})
    assert list(other_rank) != whole


def test_bad_input_raises_naming_it():
    sizes, totals, load, _, _ = corpus()
    with pytest.raises(ValueError, match="shard_weights has 5 entries and shard_sizes 6"):
        ShardedWeightedSampler(sizes, totals[:5], load)
    with pytest.raises(ValueError, match=r"shards \[1\] have no items but a positive"):
        ShardedWeightedSampler(sizes, [1.0] * 6, load)
    with pytest.raises(ValueError, match="shard_weights"):
        ShardedWeightedSampler(sizes, [-1.0] + totals[1:], load)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        ShardedWeightedSampler(sizes, totals, load, num_replicas=2, rank=2)
    wrong = list(totals)
    wrong[0] *= 1.01
    s = ShardedWeightedSampler(sizes, wrong, load, num_samples=200)
    with pytest.raises(ValueError, match=r"load_shard\(0\) returned weights summing to .* but shard_weights\[0\]"):
        list(s)
    s = ShardedWeightedSampler(sizes, totals, lambda k: torch.ones(3), num_samples=200)
    with pytest.raises(ValueError, match=r"load_shard\(\d\) must return a 1-d tensor of \d+ weights, got \(3,\)"):
        list(s)
    s = ShardedWeightedSampler(sizes, totals, load, num_replicas=2, rank=0, num_samples=20, chunk_size=4)
    it = iter(s)
    next(it)
    state = s.state_dict()
    with pytest.raises(ValueError, match="saved on 2 ranks mid-epoch"):
        ShardedWeightedSampler(sizes, totals, load, num_replicas=3, rank=0, num_samples=20).load_state_dict(state)
    with pytest.raises(ValueError, match="fingerprints differ"):
        ShardedWeightedSampler(sizes[:-1] + [10], totals, load, num_replicas=2, rank=0).load_state_dict(state)


def test_a_state_saved_between_epochs_loads_on_another_world_size():
    sizes, totals, load, _, _ = corpus()
    s = ShardedWeightedSampler(sizes, totals, load, num_replicas=2, rank=0, num_samples=20, chunk_size=4, seed=5)
    s.set_epoch(3)
    state = s.state_dict()
    other = ShardedWeightedSampler(sizes, totals, load, num_replicas=3, rank=1, num_samples=20, seed=0)
    other.load_state_dict(state)
    assert (other.epoch, other.seed, other.position, other.chunk_size) == (3, 5, 0, 4)
    fresh = ShardedWeightedSampler(sizes, totals, load, num_replicas=3, rank=1, num_samples=20, chunk_size=4, seed=5)
    fresh.set_epoch(3)
    assert list(other) == list(fresh)
