"""A loss-based DDP step with checks off reads nothing back to the host (two gloo processes)."""

import pytest
import torch

import reweighting as rw
from reweighting.testing import launch

from . import loss_based_workers as LB
from . import sync_workers as SW

pytestmark = [pytest.mark.distributed]


@pytest.fixture(scope="module")
def results():
    return launch(SW.step_syncs, 2)


def test_a_ddp_step_with_checks_off_makes_no_host_sync(results):
    for r in results:
        assert len(r["syncs"]) == 2 * len(SW.CASES)
        assert all(s == [] for s in r["syncs"]), r["syncs"]


def test_the_padded_gather_gives_the_single_process_weights(results):
    for k, (strategy, normalize) in enumerate(SW.CASES):
        for m, masked in enumerate((False, True)):
            keep = torch.ones(sum(LB.SIZES), dtype=torch.bool)
            keep[LB.SIZES[0]] = not masked
            losses = torch.cat([r["losses"][2 * k + m] for r in results])
            want = rw.LossReweighter(strategy, normalize=normalize, temperature=0.4).weights(losses, mask=keep)
            got = torch.cat([r["weights"][2 * k + m] for r in results])
            torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-6)


def test_a_batch_beyond_the_buffer_raises_with_checks_off(results):
    for rank, r in enumerate(results):
        assert f"x has {LB.SIZES[rank]} rows on rank {rank}, more than the gather capacity of 2" in r["overflow"]


def test_padded_layout_counts_and_truncation(results):
    rows, valid, counts = results[0]["padded"]
    assert counts.tolist() == [300, 301]
    assert rows.shape == (1024, 1) and rows.dtype == torch.bfloat16
    assert valid.tolist() == [True] * 300 + [False] * 212 + [True] * 301 + [False] * 211
    for r in (0, 1):
        want = torch.arange(300 + r, dtype=torch.bfloat16)
        assert torch.equal(rows[512 * r: 512 * r + 300 + r, 0], want)
    rows, valid, counts = results[1]["truncated"]
    assert counts.tolist() == [300, 301] and valid.tolist() == [True] * 8
    assert rows[:, 0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
