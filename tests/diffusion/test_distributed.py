"""TIW-DSM on two gloo processes with unequal batches gives the single-process gradient (DDP averaging)."""

import pytest
import torch

from reweighting.testing import launch

from . import workers as W

pytestmark = [pytest.mark.distributed]


def test_tiw_dsm_gradient_equals_single_process():
    results = launch(W.tiw_dsm_gradients, 2)
    for self_normalize in (False, True):
        want_grad, want_per_sample = W.single_process(self_normalize)
        for r in results:
            torch.testing.assert_close(r[self_normalize][0], want_grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(torch.cat([r[self_normalize][1] for r in results]), want_per_sample)
