"""Packed documents on 2 gloo ranks with different document counts (7 and 3) equal one process."""

import pytest
import torch

from reweighting.testing import launch

from . import packing_workers as W

pytestmark = [pytest.mark.distributed]


def test_documents_weighted_over_ranks_equal_one_process():
    results = launch(W.gradient, 2)
    want_grad, want_w, want_losses = W.gradient(0, 1)
    assert [r[1].shape[0] for r in results] == [7, 3]
    for grad, _, _ in results:
        torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.cat([r[1] for r in results]), want_w, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(torch.cat([r[2] for r in results]), want_losses)
    assert float(want_w.sum()) == pytest.approx(1.0)
