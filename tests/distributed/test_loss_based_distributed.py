"""LossReweighter on two gloo processes with unequal batch sizes equals one process on the whole batch."""

import pytest
import torch

import reweighting as rw
from reweighting.testing import launch

from . import loss_based_workers as W

pytestmark = [pytest.mark.distributed]


@pytest.fixture(scope="module")
def results():
    return launch(W.on_rank, 2)


@pytest.mark.parametrize("k", range(len(W.CASES)), ids=[c["strategy"] for c in W.CASES])
def test_two_ranks_equal_one_process(results, k):
    x, y = W.global_batch()
    want = W.run_case(W.CASES[k], x, y)
    got = [r["cases"][k] for r in results]
    weights = torch.cat([g["weights"] for g in got])
    torch.testing.assert_close(weights, want["weights"], atol=1e-7, rtol=1e-6)
    for g in got:
        torch.testing.assert_close(g["grad"], want["grad"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(g["loss"], want["loss"], atol=1e-6, rtol=1e-6)
        assert g["stats"] == pytest.approx(want["stats"], rel=1e-5)


def test_global_accumulation_over_ranks_and_micro_batches_equals_one_batch(results):
    x, y = W.global_batch()
    want = W.run_case({"strategy": "linupper"}, x, y)
    for r in results:
        torch.testing.assert_close(r["window"]["grad"], want["grad"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r["window"]["loss"], want["loss"], atol=1e-6, rtol=1e-6)
        assert r["window"]["stats"] == pytest.approx(want["stats"], rel=1e-5)


def test_a_nan_on_one_rank_raises_on_every_rank(results):
    assert "sample indices [2] on rank 1" in results[1]["nan_error"]
    assert "another rank" in results[0]["nan_error"]
    for r in results:
        assert r["nan_zero_stats"]["n_nonfinite"] == 1 and r["nan_zero_stats"]["n"] == sum(W.SIZES) - 1


@pytest.fixture(scope="module")
def counted():
    return launch(W.count_collectives, 2)


def test_one_collective_per_step_for_every_normalisation_and_policy(counted):
    # minmax, quantile and rank, tilted or uniform, NaN policy raise or zero, with or without a
    # mask: the losses are gathered once and the weights, checks and stats computed locally.
    for r in counted:
        per_case = {k: v for k, v in r.items() if isinstance(k, tuple)}
        assert len(per_case) == 24
        assert set(per_case.values()) == {1}, per_case


def test_the_gather_buffer_grows_once_on_every_rank(counted):
    # 300 and 301 samples exceed the first buffer (256 rows): one retry, agreed by all ranks.
    assert [r["grow"] for r in counted] == [2, 2]
    assert [r["after_grow"] for r in counted] == [1, 1]
    want = rw.LossReweighter("linupper").weights(torch.cat([torch.arange(300.0), torch.arange(301.0)]))
    torch.testing.assert_close(torch.cat([r["big_weights"] for r in counted]), want)


def test_a_mask_over_ranks_equals_one_process(counted):
    x, y = W.global_batch()
    model = W.make_model()
    losses = W.loss_fn(model)((x, y)).detach()
    keep = torch.ones_like(losses, dtype=torch.bool)
    keep[[1, W.SIZES[0] + 1]] = False
    r = rw.LossReweighter("linupper", normalize="rank")
    want = r.weights(torch.where(keep, losses, torch.full_like(losses, float("nan"))), mask=keep)
    torch.testing.assert_close(torch.cat([c["masked_weights"] for c in counted]), want)
    for c in counted:
        assert c["masked_stats"] == pytest.approx(r.stats.as_dict(), rel=1e-6)
        assert c["masked_stats"]["n_masked"] == 2 and c["masked_stats"]["n"] == sum(W.SIZES) - 2
