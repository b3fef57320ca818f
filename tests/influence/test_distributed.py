"""Two gloo processes with unequal batches give the single-process PRESENCE update and scores."""

import pytest
import torch

from reweighting.influence import PresenceReweighter, SelfInfluence, score_dataset
from reweighting.testing import launch

from . import models as M
from . import workers as W

pytestmark = [pytest.mark.distributed]


def test_presence_update_and_offline_scores_equal_single_process():
    tokens, mask = W.global_batch()
    model = M.SeqModel()
    si = SelfInfluence(model, broadcast=[model.pos])
    with si.capture():
        losses = M.seq_loss(model, tokens, mask)
    want_w = PresenceReweighter(switch_step=0, tau_second=-1.0).backward(si, losses)
    want = {n: p.grad for n, p in model.named_parameters()}

    results = launch(W.presence_step_and_scores, 2, -1.0)
    torch.testing.assert_close(torch.cat([torch.from_numpy(r[0]) for r in results]), want_w, rtol=1e-5, atol=1e-7)
    for _, grads, _ in results:
        for name, g in grads.items():
            torch.testing.assert_close(torch.from_numpy(g), want[name], rtol=1e-4, atol=1e-6, msg=name)

    single = score_dataset(M.SeqModel(), torch.utils.data.TensorDataset(tokens, mask), M.seq_loss, batch_size=3,
                           broadcast=["pos"], progress=False)
    for *_, scores in results:
        torch.testing.assert_close(torch.from_numpy(scores), single, rtol=1e-5, atol=1e-7)
