"""LossReweighter on two gloo processes with unequal batch sizes equals one process on the whole batch."""

import pytest
import torch

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
