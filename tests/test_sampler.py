"""AliasTable and DistributedWeightedSampler: exact distribution, sharding, resume, bad input."""

import pytest
import torch
from scipy import stats

import reweighting as rw
from reweighting.sampler import AliasTable, DistributedWeightedSampler
from reweighting.testing import launch

from .distributed import sampler_workers


def _shards(weights, world, **kwargs):
    return [list(DistributedWeightedSampler(weights, num_replicas=world, rank=r, **kwargs)) for r in range(world)]


@pytest.mark.parametrize(
    "weights",
    [
        torch.rand(1000, generator=torch.Generator().manual_seed(0)) ** 6,  # heavy tail
        torch.tensor([1.0, 1.0, 1.0]),
        torch.tensor([0.0, 5.0, 0.0, 1.0]),
        torch.tensor([3.0]),
        torch.tensor([1e-12, 1.0, 1e6, 2.0]),
        torch.cat([torch.full((999,), 1e-3), torch.tensor([1e3])]),
    ],
)
def test_alias_table_encodes_the_exact_distribution(weights):
    table = AliasTable(weights)
    want = weights.double() / weights.double().sum()
    torch.testing.assert_close(table.probabilities(), want, atol=1e-8, rtol=1e-6)
    assert table.nbytes == 8 * len(weights)  # the 16-bytes-per-item budget, with room to spare
    assert bool((table.prob >= 0).all() and (table.prob <= 1).all())
    assert bool((weights[table.sample(2000, generator=torch.Generator().manual_seed(1))] > 0).all())


def test_alias_table_goes_past_the_multinomial_limit():
    n = 2**24 + 3  # torch.multinomial refuses more than 2^24 categories
    weights = (torch.arange(n) % 3).float()
    table = AliasTable(weights)
    q = table.probabilities()
    torch.testing.assert_close(q, weights.double() / weights.double().sum(), atol=1e-12, rtol=1e-6)
    draws = table.sample(10_000, generator=torch.Generator().manual_seed(0))
    assert int(draws.max()) < n and bool((draws % 3 != 0).all())


def test_empirical_frequencies_match_weights_chi_square():
    weights = torch.tensor([1.0, 2.0, 3.0, 0.5, 7.0, 0.0, 1.5, 4.0])
    sampler = DistributedWeightedSampler(weights, num_samples=200_000, seed=3, chunk_size=4096)
    counts = torch.bincount(torch.tensor(list(sampler)), minlength=len(weights)).double()
    assert counts[5] == 0
    keep = weights > 0
    expected = weights[keep].double() / weights.sum() * counts.sum()
    result = stats.chisquare(counts[keep].numpy(), expected.numpy())
    assert result.pvalue > 1e-3, result


def test_shards_are_disjoint_complete_and_the_same_draw_for_any_world_size():
    weights = torch.rand(50, generator=torch.Generator().manual_seed(2))
    reference = DistributedWeightedSampler(weights, num_samples=101, seed=7, chunk_size=16)
    for world in (1, 2, 3):
        shards = _shards(weights, world, num_samples=101, seed=7, chunk_size=16)
        assert all(len(s) == -(-101 // world) for s in shards)
        # Interleaving the shards back (rank r holds global positions r, r + W, ...) gives the global draw.
        merged = [shards[p % world][p // world] for p in range(world * len(shards[0]))]
        sampler = DistributedWeightedSampler(weights, num_samples=101, seed=7, num_replicas=world, rank=0,
                                             chunk_size=16)
        assert merged == sampler.global_indices().tolist()
        # Positions (not values) partition the epoch; the first num_samples draws do not depend on W.
        assert merged[:101] == reference.global_indices()[:101].tolist()


def test_epochs_and_seeds_change_the_draw_and_repeat_exactly():
    weights = torch.ones(1000)
    sampler = DistributedWeightedSampler(weights, seed=1)
    first = list(sampler)
    assert list(sampler) == first  # the same epoch again
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(DistributedWeightedSampler(weights, seed=2)) != first


@pytest.mark.parametrize("replacement", [True, False])
def test_state_dict_resumes_mid_epoch_exactly(replacement):
    weights = torch.rand(300, generator=torch.Generator().manual_seed(4)) + 0.01
    kwargs = dict(num_samples=250, replacement=replacement, seed=5, num_replicas=2, rank=1, chunk_size=32)
    uninterrupted = DistributedWeightedSampler(weights, **kwargs)
    uninterrupted.set_epoch(3)
    want_epoch3 = list(uninterrupted)
    uninterrupted.set_epoch(4)
    want_epoch4 = list(uninterrupted)

    sampler = DistributedWeightedSampler(weights, **kwargs)
    sampler.set_epoch(3)
    it = iter(sampler)
    head = [next(it) for _ in range(77)]
    state = sampler.state_dict()
    assert state["position"] == 77

    resumed = DistributedWeightedSampler(torch.ones(300), **kwargs)  # different weights: the state wins
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # a training loop calls this again on resume: it must not restart the epoch
    assert head + list(resumed) == want_epoch3
    resumed.set_epoch(4)
    assert list(resumed) == want_epoch4


def test_state_dict_position_override_for_prefetching_loaders():
    weights = torch.rand(100, generator=torch.Generator().manual_seed(6))
    sampler = DistributedWeightedSampler(weights, seed=0)
    full = list(sampler)
    it = iter(sampler)
    for _ in range(40):  # a loader fetched 40 indices ahead but training consumed only 30
        next(it)
    resumed = DistributedWeightedSampler(weights, seed=0)
    resumed.load_state_dict(sampler.state_dict(position=30))
    assert list(resumed) == full[30:]


def test_update_weights_applies_from_the_next_epoch_and_survives_resume():
    old = torch.tensor([1.0, 0.0, 0.0, 0.0])
    new = torch.tensor([0.0, 0.0, 0.0, 1.0])
    sampler = DistributedWeightedSampler(old, num_samples=64, seed=0, chunk_size=8)
    it = iter(sampler)
    head = [next(it) for _ in range(10)]
    sampler.update_weights(new)  # mid-epoch: the epoch in progress keeps its distribution
    state = sampler.state_dict()
    tail = list(it)
    assert set(head + tail) == {0}
    resumed = DistributedWeightedSampler(torch.ones(4), num_samples=64)
    resumed.load_state_dict(state)
    assert list(resumed) == tail
    for s in (sampler, resumed):
        s.set_epoch(1)
        assert set(s) == {3}
    sampler.update_weights(torch.tensor([0.0, 1.0, 0.0, 0.0]))  # between epochs: immediately
    assert set(sampler) == {1}
    with pytest.raises(ValueError, match="num_samples"):
        DistributedWeightedSampler(old).update_weights(torch.ones(5))


def test_without_replacement_draws_distinct_positive_items():
    weights = torch.tensor([0.0, 1.0, 2.0, 3.0, 0.0, 4.0, 5.0])
    shards = _shards(weights, 2, num_samples=5, replacement=False, seed=1)
    drawn = shards[0] + shards[1]
    assert len(drawn) == 6  # 5 draws padded to 2 x 3 by repeating the first one
    assert sorted(set(drawn)) == [1, 2, 3, 5, 6] and drawn[5] == drawn[0]
    with pytest.raises(ValueError, match="positive weight"):
        DistributedWeightedSampler(weights, num_samples=6, replacement=False)
    # Heavier items come first more often: the mean position of item 6 is earlier than item 1's.
    first = [DistributedWeightedSampler(weights, num_samples=5, replacement=False, seed=s).global_indices()[0]
             for s in range(200)]
    assert first.count(6) > first.count(1)


@pytest.mark.parametrize(
    "weights, match",
    [
        (torch.tensor([1.0, -2.0, 3.0, -0.1]), r"negative values at sample indices \[1, 3\]"),
        (torch.tensor([1.0, float("nan"), 3.0]), r"NaN values at sample indices \[1\]"),
        (torch.tensor([1.0, float("inf")]), r"infinite values at sample indices \[1\]"),
        (torch.zeros(4), "all zero"),
        (torch.ones(2, 2), "1-d"),
        (torch.ones(0), "empty"),
    ],
)
def test_bad_weights_raise_clear_errors(weights, match):
    with pytest.raises(ValueError, match=match):
        DistributedWeightedSampler(weights)
    with pytest.raises(ValueError, match=match):
        AliasTable(weights)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_samples"):
        DistributedWeightedSampler(torch.ones(3), num_samples=0)
    with pytest.raises(ValueError, match="rank"):
        DistributedWeightedSampler(torch.ones(3), num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="position"):
        DistributedWeightedSampler(torch.ones(3)).state_dict(position=4)


def test_lazy_exports():
    assert rw.AliasTable is AliasTable and rw.DistributedWeightedSampler is DistributedWeightedSampler


@pytest.mark.distributed
def test_ranks_of_a_real_process_group_share_one_draw():
    # The workers import a light module (not this one, with scipy): less to start on a loaded machine.
    results = launch(sampler_workers.draw_on_rank, 2)
    assert [(w, r) for w, r, _ in results] == [(2, 0), (2, 1)]
    single = DistributedWeightedSampler(torch.arange(1.0, 31.0), num_samples=45, seed=11, chunk_size=8)
    single.set_epoch(2)
    want = single.global_indices().tolist()
    shards = [s for _, _, s in results]
    assert [shards[p % 2][p // 2] for p in range(46)][:45] == want  # rank 1 pads the 46th draw


@pytest.mark.parametrize("replacement", [True, False])
@pytest.mark.parametrize("new_world", [1, 4, 5])
def test_resume_on_another_world_size_continues_the_global_sequence(replacement, new_world):
    # Saved on 2 ranks after 10 indices each: 20 global positions consumed. On 1, 4 or 5 ranks
    # (each divides 20) the rest of the epoch's global sequence is split as if uninterrupted.
    weights = torch.rand(90, generator=torch.Generator().manual_seed(8)) + 0.01
    kwargs = dict(num_samples=80, replacement=replacement, seed=3, chunk_size=16)
    saved = DistributedWeightedSampler(weights, num_replicas=2, rank=0, **kwargs)
    it = iter(saved)
    for _ in range(10):
        next(it)
    state = saved.state_dict()
    assert state["num_replicas"] == 2
    full = saved.global_indices().tolist()
    for r in range(new_world):
        resumed = DistributedWeightedSampler(weights, num_replicas=new_world, rank=r, **kwargs)
        resumed.load_state_dict(state)
        want = full[20 + r :: new_world][: len(resumed) - 20 // new_world]
        assert list(resumed) == want


def test_resume_on_a_world_size_that_cannot_split_the_consumed_draws_raises():
    saved = DistributedWeightedSampler(torch.ones(50), num_replicas=2, rank=1, seed=0)
    it = iter(saved)
    for _ in range(5):
        next(it)
    with pytest.raises(ValueError, match=r"cannot resume exactly on 3 ranks.* saved on 2 ranks after 5 indices"):
        DistributedWeightedSampler(torch.ones(50), num_replicas=3, rank=0, seed=0).load_state_dict(saved.state_dict())


def test_old_state_without_world_size_loads_only_between_epochs():
    sampler = DistributedWeightedSampler(torch.ones(50), num_replicas=2, rank=0, seed=0)
    it = iter(sampler)
    for _ in range(5):
        next(it)
    old = {k: v for k, v in sampler.state_dict().items() if k != "num_replicas"}
    with pytest.raises(ValueError, match="no 'num_replicas'.*mid-epoch position 5"):
        DistributedWeightedSampler(torch.ones(50), num_replicas=2, rank=0).load_state_dict(old)
    fixed = DistributedWeightedSampler(torch.ones(50), num_replicas=2, rank=0)
    fixed.load_state_dict({**old, "num_replicas": 2})
    assert fixed.position == 5
    between = {k: v for k, v in DistributedWeightedSampler(torch.ones(50)).state_dict().items()
               if k != "num_replicas"}
    DistributedWeightedSampler(torch.ones(50), num_replicas=2, rank=0).load_state_dict(between)


@pytest.mark.parametrize("weights, expected", [
    # near the largest float64: their sum overflows to inf
    (torch.tensor([1e308, 1e308, 1e300], dtype=torch.float64), [0.5, 0.5, 5e-9]),
    # subnormal float64: n / sum overflows to inf
    (torch.tensor([5e-324, 1e-323, 1.5e-323], dtype=torch.float64), [1 / 6, 1 / 3, 1 / 2]),
    # subnormal float32 next to normal ones
    (torch.tensor([2.0**-140, 2.0**-139, 3 * 2.0**-140], dtype=torch.float32), [1 / 6, 1 / 3, 1 / 2]),
    # a huge heavy item beside many light ones
    (torch.tensor([1.7e308] + [1e307] * 5, dtype=torch.float64), [1.7 / 2.2] + [0.1 / 2.2] * 5),
])
def test_alias_table_is_exact_at_the_ends_of_the_float_range(weights, expected):
    saved = weights.clone()
    table = AliasTable(weights)
    torch.testing.assert_close(table.probabilities(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-6, atol=1e-12)
    assert torch.equal(weights, saved)  # the caller's weights are left as they were
    rel = weights.double() / weights.double().max()  # frequencies from the exact build of a rescaled copy
    torch.testing.assert_close(AliasTable(rel).probabilities(), table.probabilities())


@pytest.mark.parametrize("replacement", [True, False])
def test_load_state_dict_from_a_sampler_over_other_items_raises(replacement):
    small = DistributedWeightedSampler(torch.ones(10), replacement=replacement, num_replicas=1, rank=0)
    large = DistributedWeightedSampler(torch.ones(1000), replacement=replacement, num_replicas=1, rank=0)
    with pytest.raises(ValueError, match="sampler over 10 items, but this sampler draws from 1000"):
        large.load_state_dict(small.state_dict())
    assert len(large) == 1000 and len(set(iter(large))) > 10  # nothing of the refused state was taken
    same = DistributedWeightedSampler(torch.ones(1000), replacement=replacement, num_replicas=1, rank=0, seed=3)
    large.load_state_dict(same.state_dict())
    assert list(large) == list(same)
