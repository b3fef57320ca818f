"""With value checks off, the PRESENCE step never waits for the device: no operation whose output shape
or value must be read back to the host (counted on CPU by a dispatch mode, as they would sync on a GPU)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import reweighting as rw
from reweighting.influence import PresenceReweighter, SelfInfluence

from . import models as M

aten = torch.ops.aten
ALWAYS_SYNC = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
               aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
               aten.equal.default, aten.is_nonzero.default, aten.bincount.default, aten.argwhere.default}


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in ALWAYS_SYNC:
            self.syncs.append(str(func))
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.syncs.append("repeat_interleave without output_size")
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
                self.syncs.append(f"{func} with a boolean mask")
        return func(*args, **kwargs)


def test_the_counter_sees_the_syncing_operations():
    with SyncCounter() as counter:
        x = torch.arange(4.0)
        x[x > 1].sum()
        torch.unique(x)
        torch.repeat_interleave(x, torch.tensor([1, 2, 0, 1]))
        float(x.sum())
    assert len(counter.syncs) == 4


@pytest.mark.parametrize("microbatches", [None, 2])
def test_presence_step_with_checks_off_has_no_host_sync(microbatches):
    model = M.SeqModel(vocab=40, d=16)  # tied embedding: the cross-term path and the embedding rule
    tokens, mask = M.seq_batch(b=5, vocab=40)
    si = SelfInfluence(model, broadcast=[model.pos])
    presence = PresenceReweighter(switch_step=1, microbatches=microbatches)
    with rw.checks(False):
        for _ in range(2):  # the first step runs the one-time structural checks
            with SyncCounter() as counter:
                with si.capture():
                    losses = M.seq_loss(model, tokens, mask)
                presence.backward(si, losses)
            model.zero_grad(set_to_none=True)
    assert counter.syncs == []
    assert si.verifications == 1  # the first step verified (reading back to the host), the second did not
    with SyncCounter() as counter:  # with checks on, the losses' finiteness is read back
        with si.capture():
            losses = M.seq_loss(model, tokens, mask)
        presence.backward(si, losses)
    assert counter.syncs
