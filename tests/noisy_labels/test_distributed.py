"""RW, DWS and RENT on two gloo ranks with unequal batches give the single-process gradient."""

import pytest
import torch

from reweighting.testing import launch

from . import workers as W

pytestmark = [pytest.mark.distributed]


def test_global_normalisation_and_draws_match_one_process():
    want = W.single_process_gradients()
    for got in launch(W.averaged_gradients, 2):
        for loss in W.LOSSES:
            torch.testing.assert_close(torch.tensor(got[loss]), want[loss], atol=1e-6, rtol=1e-5, msg=loss)
