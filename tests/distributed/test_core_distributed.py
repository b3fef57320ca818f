"""Two gloo processes with unequal batch sizes (3 and 5) give the single-process result."""

import pytest
import torch

import reweighting as rw
from reweighting.testing import launch

from . import workers as W

pytestmark = [pytest.mark.distributed]


def single_process_gradient():
    x, y = W.global_batch()
    model = W.make_model()
    losses = W.per_sample_loss(model, x, y)
    w = W.weight_fn(losses.detach())
    rw.weighted_loss(losses, w).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]), w


def test_weighted_loss_gradient_equals_single_process():
    results = launch(W.gradient_of_weighted_loss, 2)
    want_grad, want_w = single_process_gradient()
    for grad, _ in results:
        torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.cat([w for _, w in results]), want_w, atol=1e-7, rtol=1e-6)


def test_accumulation_window_gradient_equals_single_process():
    results = launch(W.gradient_over_accumulation_window, 2)
    want_grad, want_w = single_process_gradient()
    for grad, _ in results:
        torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.cat([w for _, w in results]), want_w, atol=1e-7, rtol=1e-6)


def test_normalisations_and_diagnostics_are_global():
    results = launch(W.normalisations, 2)
    _, y = W.global_batch(1)
    full = y * 3
    want = {
        "minmax": rw.minmax_normalize(full),
        "zscore": rw.zscore(full),
        "rank": rw.rank_normalize(full),
        "quantile": rw.quantile_normalize(full, q=0.1),
        "tilt": rw.tilt(full, 0.7),
    }
    for key, value in want.items():
        got = torch.cat([r[key] for r in results])
        torch.testing.assert_close(got, value, atol=1e-6, rtol=1e-5, msg=key)
    stats = rw.weight_stats(rw.tilt(full, 0.7)).as_dict()
    for r in results:
        assert r["stats"] == pytest.approx(stats, rel=1e-5, abs=1e-6)
        torch.testing.assert_close(r["gathered"], full)
    counts = torch.cat([r["counts"] for r in results])
    want_counts = rw.resample_counts(full.abs(), 1000, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(counts, want_counts)


def test_gather_rows_counts_stay_exact_for_half_precision_rows():
    # The row count travels inside the buffer; in bf16 301 would arrive as 300 and a row be lost.
    for got in launch(W.gather_half_precision_rows, 2):
        assert got["counts"] == [301, 7]
        assert got["dtype"] == "torch.bfloat16"
        assert torch.equal(got["rows"][:, 0], torch.cat([torch.zeros(301), torch.ones(7)]))
