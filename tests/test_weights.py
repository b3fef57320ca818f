import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reweighting as rw

finite = st.floats(min_value=-50, max_value=50, allow_nan=False, width=32)
score_lists = st.lists(finite, min_size=1, max_size=64)
temperatures = st.floats(min_value=0.05, max_value=20.0)


@settings(max_examples=200, deadline=None)
@given(score_lists, temperatures)
def test_tilt_sums_to_one_and_is_nonnegative(scores, temperature):
    w = rw.tilt(torch.tensor(scores), temperature)
    assert w.dtype == torch.float32
    assert torch.all(w >= 0)
    assert abs(float(w.sum()) - 1.0) < 1e-5


@settings(max_examples=200, deadline=None)
@given(score_lists, temperatures, st.floats(min_value=-100, max_value=100))
def test_tilt_invariant_to_adding_a_constant(scores, temperature, shift):
    s = torch.tensor(scores, dtype=torch.float64)
    torch.testing.assert_close(rw.tilt(s, temperature), rw.tilt(s + shift, temperature), atol=1e-6, rtol=1e-4)


@settings(max_examples=200, deadline=None)
@given(score_lists, temperatures)
def test_tilt_ratio_bounded_by_range_over_temperature(scores, temperature):
    s = torch.tensor(scores, dtype=torch.float64)
    w = rw.tilt(s, temperature).double()
    spread = float(s.max() - s.min())
    if spread / temperature < 80 and w.min() > 0:  # beyond that the bound is astronomically loose anyway
        assert float(w.max() / w.min()) <= math.exp(spread / temperature) * (1 + 1e-4)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=20, width=32), min_size=1, max_size=64))
def test_uniform_weights_give_the_plain_mean(losses):
    loss = torch.tensor(losses)
    w = rw.tilt(torch.zeros_like(loss), 1.0)
    torch.testing.assert_close(rw.weighted_loss(loss, w), loss.mean(), rtol=1e-6, atol=1e-6)


def test_tilt_matches_hand_computation():
    s = torch.tensor([0.0, 1.0, 2.0])
    e = torch.exp(s / 0.5)
    torch.testing.assert_close(rw.tilt(s, 0.5), e / e.sum())


def test_tilt_single_sample_gets_weight_one():
    assert rw.tilt(torch.tensor([3.7]), 0.1).tolist() == [1.0]


def test_tilt_is_detached_and_float32_from_half_precision():
    s = torch.tensor([1.0, 2.0], dtype=torch.bfloat16, requires_grad=True)
    w = rw.tilt(s, 1.0)
    assert not w.requires_grad and w.dtype == torch.float32


def test_tilt_extreme_scores_do_not_overflow():
    w = rw.tilt(torch.tensor([1e4, 0.0, -1e4]), 0.01)
    assert torch.isfinite(w).all() and w[0] == 1.0


def test_mask_excludes_samples_from_normalisation():
    s = torch.tensor([1.0, float("nan"), 2.0])
    mask = torch.tensor([True, False, True])
    w = rw.tilt(s, 1.0, mask=mask)
    assert w[1] == 0
    torch.testing.assert_close(w[[0, 2]], rw.tilt(torch.tensor([1.0, 2.0]), 1.0))


def test_minmax_normalize_hand_case():
    h = rw.minmax_normalize(torch.tensor([1.0, 2.0, 5.0]), delta=2.0)
    torch.testing.assert_close(h, torch.tensor([-2.0, -1.0, 2.0]))


def test_minmax_normalize_all_equal_gives_zero():
    assert torch.equal(rw.minmax_normalize(torch.full((4,), 3.0)), torch.zeros(4))


def test_zscore_has_mean_zero_and_unit_variance():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 5 + 3
    s = rw.zscore(x)
    assert abs(float(s.mean())) < 1e-5
    assert abs(float(s.var(unbiased=False)) - 1) < 1e-4


def test_rank_normalize_ties_and_range():
    h = rw.rank_normalize(torch.tensor([10.0, -3.0, 10.0, 0.0, 1e9]))
    # sorted: -3 (0), 0 (1), 10 10 (2, 3 -> 2.5), 1e9 (4); n - 1 = 4
    torch.testing.assert_close(h, torch.tensor([0.25, -1.0, 0.25, -0.5, 1.0]))


def test_rank_normalize_single_sample():
    assert rw.rank_normalize(torch.tensor([5.0])).tolist() == [0.0]


def test_quantile_normalize_ignores_one_outlier():
    x = torch.cat([torch.linspace(0, 1, 99), torch.tensor([1e6])])
    minmax = rw.minmax_normalize(x)
    robust = rw.quantile_normalize(x, q=0.05)
    # min-max squashes 99 samples into a sliver at -1; quantile keeps them spread
    assert float(minmax[:99].max() - minmax[:99].min()) < 1e-5
    assert float(robust[:99].max() - robust[:99].min()) > 1.5
    assert robust.max() == 1.0 and robust.min() == -1.0


def test_normalize_dispatch_and_unknown_method():
    x = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(rw.normalize(x, "rank"), rw.rank_normalize(x))
    with pytest.raises(ValueError, match="method must be one of"):
        rw.normalize(x, "softmax")


def test_weight_stats_uniform_and_one_hot():
    uniform = rw.weight_stats(torch.full((8,), 1 / 8))
    assert float(uniform.ess) == pytest.approx(8)
    assert float(uniform.entropy) == pytest.approx(math.log(8), rel=1e-5)
    assert float(uniform.max_min_ratio) == pytest.approx(1)
    peaked = rw.weight_stats(torch.tensor([1.0, 0.0, 0.0, 0.0]), mask=torch.tensor([True, False, False, False]),
                             n_dropped=3)
    assert float(peaked.ess) == pytest.approx(1)
    assert float(peaked.entropy) == pytest.approx(0, abs=1e-6)
    d = peaked.as_dict(prefix="w/")
    assert d["w/n_dropped"] == 3 and d["w/n"] == 1


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_raises(temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        rw.tilt(torch.tensor([1.0, 2.0]), temperature)


@pytest.mark.parametrize("bad,word", [(float("nan"), "NaN"), (float("inf"), "infinite"), (-float("inf"), "infinite")])
def test_nonfinite_scores_name_the_indices(bad, word):
    s = torch.zeros(20)
    s[3] = bad
    s[17] = bad
    with pytest.raises(ValueError, match=rf"scores has {word} values at sample indices \[3, 17\]"):
        rw.tilt(s, 1.0)


def test_long_lists_of_bad_indices_are_abbreviated():
    s = torch.full((40,), float("nan"))
    with pytest.raises(ValueError, match=r"\.\.\. \(40 in all\)"):
        rw.tilt(s, 1.0)


def test_empty_batch_raises():
    with pytest.raises(ValueError, match="empty"):
        rw.tilt(torch.tensor([]), 1.0)
    with pytest.raises(ValueError, match="empty"):
        rw.minmax_normalize(torch.tensor([]))


def test_wrong_shape_raises():
    with pytest.raises(ValueError, match=r"scores must be 1-d .* shape \(2, 3\)"):
        rw.tilt(torch.zeros(2, 3), 1.0)
    with pytest.raises(TypeError, match="scores must be a torch.Tensor"):
        rw.tilt([1.0, 2.0], 1.0)


def test_mask_of_wrong_length_or_all_false_raises():
    with pytest.raises(ValueError, match=r"mask has shape \(2,\) but scores has \(3,\)"):
        rw.tilt(torch.zeros(3), 1.0, mask=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="mask excludes every sample"):
        rw.tilt(torch.zeros(3), 1.0, mask=torch.zeros(3, dtype=torch.bool))


def test_checks_can_be_switched_off():
    s = torch.tensor([float("nan"), 1.0])
    with rw.checks(False):
        w = rw.tilt(s, 1.0)  # no error; the NaN propagates, as documented
    assert torch.isnan(w).any()
    assert rw.checks_enabled()


@pytest.mark.parametrize("value", [2.0, 0.1, -3.7e5])
def test_zscore_of_a_constant_input_is_finite_zeros_and_gives_uniform_weights(value):
    # The epsilon in the variance: without it, 2.0 (exact mean, zero deviations) gives 0 / 0.
    x = torch.full((6,), value)
    s = rw.zscore(x)
    assert torch.isfinite(s).all() and s.abs().max() < 1e-3
    torch.testing.assert_close(rw.tilt(-s, 0.5), torch.full((6,), 1 / 6))
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        rw.zscore(x, eps=0.0)


@pytest.mark.parametrize("bad, word", [(-0.5, "negative"), (float("nan"), "NaN"), (float("inf"), "infinite")])
def test_weight_stats_rejects_negative_and_nonfinite_weights(bad, word):
    with pytest.raises(ValueError, match=rf"weights must be finite and >= 0, but has {word} values at sample "
                                         r"indices \[2\]"):
        rw.weight_stats(torch.tensor([0.5, 0.5, bad]))
    # a masked-out entry is not looked at
    stats = rw.weight_stats(torch.tensor([0.5, 0.5, bad]), mask=torch.tensor([True, True, False]))
    assert float(stats.n) == 2 and float(stats.entropy) == pytest.approx(math.log(2))


def test_weight_stats_of_unnormalised_weights():
    # ess = (sum w)^2 / sum w^2 and the entropy of w / sum w do not assume sum w = 1
    w = torch.tensor([2.0, 2.0, 4.0])
    stats = rw.weight_stats(w)
    p = w / w.sum()
    assert float(stats.ess) == pytest.approx(64 / 24)
    assert float(stats.entropy) == pytest.approx(float(-(p * p.log()).sum()))
    assert float(stats.max_min_ratio) == pytest.approx(2.0)
