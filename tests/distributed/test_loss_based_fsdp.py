"""LossReweighter under FSDP2 (``fully_shard``) on two gloo processes trains exactly as one process.

Each rank holds a different share of every global batch (3 and 5 samples); after three SGD steps
the gathered parameters (``DTensor.full_tensor``) must equal those of one unsharded model trained
on the whole batches, for several normalisations and with ``accumulation="global"`` over two
micro-batches per rank, with gradient sync held back until the last one or not.
"""

import pytest
import torch

from reweighting.testing import launch

from . import fsdp_workers as W

fsdp = pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed")
pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(not hasattr(fsdp, "fully_shard"), reason="FSDP2 (fully_shard) needs torch >= 2.6")]


@pytest.fixture(scope="module")
def results():
    return launch(W.on_rank, 2)


def _assert_same_training(got, want):
    assert got["sharded"], "the parameters should be DTensors sharded by fully_shard"
    assert got["params"].keys() == want["params"].keys()
    for name, value in want["params"].items():
        torch.testing.assert_close(got["params"][name], value, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    # the mean over ranks of the returned values is the global weighted loss, step by step
    torch.testing.assert_close(got["loss"], want["loss"], atol=1e-6, rtol=1e-6)


def test_training_moves_the_parameters():
    # Otherwise equal parameters would prove nothing.
    want = W.reference(W.CASES[0])
    start = dict(W.make_model().named_parameters())
    assert all((want["params"][n] - p).abs().max() > 1e-3 for n, p in start.items())


@pytest.mark.parametrize("k", range(len(W.CASES)), ids=[f"{c['strategy']}-{c['normalize']}" for c in W.CASES])
def test_fully_shard_on_two_ranks_trains_as_one_process(results, k):
    want = W.reference(W.CASES[k])
    for r in results:
        _assert_same_training(r["cases"][k], want)


@pytest.mark.parametrize("k", range(len(W.WINDOWS)),
                         ids=[f"{c['strategy']}-{c['normalize']}-{'held' if c['hold_sync'] else 'every'}-sync"
                              for c in W.WINDOWS])
def test_global_accumulation_under_fully_shard_equals_one_batch(results, k):
    spec = W.WINDOWS[k]
    want = W.reference({key: v for key, v in spec.items() if key != "hold_sync"})
    layers = 2  # fully_shard groups holding parameters: one reduce-scatter each per synced backward
    micro = 1 if spec["hold_sync"] else 2
    for r in results:
        got = r["windows"][k]
        _assert_same_training(got, want)
        assert got["reduce_scatters"] == W.STEPS * layers * micro
