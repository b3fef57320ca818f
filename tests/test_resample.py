import pytest
import torch

import reweighting as rw


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_multinomial_frequencies_follow_weights():
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    idx = rw.multinomial_resample(w, 200_000, generator=gen())
    freq = torch.bincount(idx, minlength=4).float() / idx.numel()
    torch.testing.assert_close(freq, w / w.sum(), atol=5e-3, rtol=0)


def test_systematic_counts_are_floor_or_ceil():
    w = torch.rand(50, generator=gen(1))
    n = 137
    for seed in range(5):
        idx = rw.systematic_resample(w, n, generator=gen(seed))
        counts = torch.bincount(idx, minlength=50).double()
        expected = n * w.double() / w.double().sum()
        assert torch.all(counts >= torch.floor(expected) - 1e-9)
        assert torch.all(counts <= torch.ceil(expected) + 1e-9)
        assert idx.numel() == n and torch.all(idx[1:] >= idx[:-1])


def test_resampling_is_reproducible_with_a_generator():
    w = torch.rand(30, generator=gen(2))
    assert torch.equal(rw.multinomial_resample(w, generator=gen(7)), rw.multinomial_resample(w, generator=gen(7)))
    assert torch.equal(rw.systematic_resample(w, generator=gen(7)), rw.systematic_resample(w, generator=gen(7)))


def test_resample_counts_single_process_sum_and_zero_weight():
    w = torch.tensor([0.0, 1.0, 1.0, 2.0])
    counts = rw.resample_counts(w, 100, generator=gen())
    assert float(counts.sum()) == 100 and counts[0] == 0


def test_dirichlet_rows_sum_to_one_and_mean_matches():
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    draws = rw.dirichlet_weights(w, alpha=10.0, num_draws=20_000, generator=gen())
    assert draws.shape == (20_000, 4)
    torch.testing.assert_close(draws.sum(1), torch.ones(20_000))
    torch.testing.assert_close(draws.mean(0), w / w.sum(), atol=5e-3, rtol=0)


def test_dirichlet_large_alpha_approaches_the_weights():
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    draws = rw.dirichlet_weights(w, alpha=1e7, num_draws=10, generator=gen())
    torch.testing.assert_close(draws, (w / w.sum()).expand(10, -1), atol=1e-3, rtol=0)


def test_dirichlet_small_alpha_gives_nearly_one_hot_draws():
    w = torch.ones(16)
    draws = rw.dirichlet_weights(w, alpha=1e-3, num_draws=500, generator=gen())
    assert torch.isfinite(draws).all()
    # the total concentration is 1e-3, so a draw is not one-hot with probability of that order
    assert float((draws.max(1).values > 0.99).float().mean()) >= 0.99
    # each sample still wins about its share of the draws
    winners = torch.bincount(draws.argmax(1), minlength=16)
    assert int((winners > 0).sum()) >= 12


def test_dirichlet_zero_weights_stay_zero_and_reproducible():
    w = torch.tensor([0.0, 1.0, 3.0])
    a = rw.dirichlet_weights(w, 5.0, 7, generator=gen(3))
    b = rw.dirichlet_weights(w, 5.0, 7, generator=gen(3))
    assert torch.equal(a, b) and torch.all(a[:, 0] == 0)


@pytest.mark.parametrize("fn", [rw.multinomial_resample, rw.systematic_resample])
def test_bad_weights_raise(fn):
    with pytest.raises(ValueError, match=r"negative values at sample indices \[1\]"):
        fn(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="all zero"):
        fn(torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        fn(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="empty"):
        fn(torch.tensor([]))
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        fn(torch.ones(2), 0)


def test_dirichlet_bad_alpha():
    for alpha in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
            rw.dirichlet_weights(torch.ones(3), alpha)
