"""PRESENCE weights, the two-stage schedule, state, and the weighted step against the reference."""

import math

import pytest
import torch

from reweighting import tilt
from reweighting.influence import PresenceReweighter, SelfInfluence, per_sample_grads, presence_weights

from . import models as M


def test_weights_are_softmax_of_signed_zscores():
    si = torch.tensor([1.0, 4.0, 2.0, 9.0])
    z = (si - si.mean()) / si.var(unbiased=False).sqrt()
    torch.testing.assert_close(presence_weights(si, 1.0), torch.softmax(z, 0))
    torch.testing.assert_close(presence_weights(si, -2.0), torch.softmax(-2 * z, 0))
    torch.testing.assert_close(presence_weights(si, 0.0), torch.full((4,), 0.25))
    assert presence_weights(si, 1.0).argmax() == 3 and presence_weights(si, -1.0).argmin() == 3
    with pytest.raises(ValueError, match="tau"):
        presence_weights(si, math.inf)


def test_two_stage_switch_happens_at_switch_step_and_state_round_trips():
    r = PresenceReweighter(switch_step=2)
    taus = []
    for _ in range(4):
        taus.append(r.tau)
        r.advance()
    assert taus == [1.0, 1.0, -1.0, -1.0]
    resumed = PresenceReweighter(switch_step=0, tau_first=5.0)
    resumed.load_state_dict(r.state_dict())
    assert (resumed.step, resumed.tau, resumed.switch_step) == (4, -1.0, 2)
    # under gradient accumulation only the optimizer step counts
    model = M.SeqModel()
    tokens, mask = M.seq_batch(b=4)
    si = SelfInfluence(model, broadcast=[model.pos])
    accumulating = PresenceReweighter(switch_step=1)
    for _ in range(2):
        with si.capture():
            losses = M.seq_loss(model, tokens, mask)
        accumulating.backward(si, losses, advance=False)
    assert accumulating.step == 0
    accumulating.advance()
    assert accumulating.tau == -1.0
    with pytest.raises(ValueError, match="switch_step"):
        PresenceReweighter(switch_step=-1)
    with pytest.raises(ValueError, match="microbatches"):
        PresenceReweighter(switch_step=1, microbatches=0)


@pytest.mark.parametrize("microbatches", [None, 2])
def test_backward_applies_sum_of_weighted_per_sample_gradients(microbatches):
    model = M.SeqModel()
    tokens, mask = M.seq_batch(b=5)
    si = SelfInfluence(model, broadcast=[model.pos])
    r = PresenceReweighter(switch_step=0, microbatches=microbatches)  # inverse stage from the start
    with si.capture():
        losses = M.seq_loss(model, tokens, mask)
    w = r.backward(si, losses)
    assert r.step == 1 and w.shape == (5,) and w.dtype == torch.float32
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))

    grads = per_sample_grads(model, M.seq_loss, tokens, mask)
    flat = torch.cat([g.flatten(1) for g in grads.values()], 1)
    if microbatches is None:
        units, sizes = flat, [1] * 5
    else:
        units, sizes = torch.stack([flat[:3].sum(0), flat[3:].sum(0)]), [3, 2]
    want_unit = tilt(-(lambda s: (s - s.mean()) / torch.sqrt(s.var(unbiased=False) + 1e-8))(units.square().sum(1)))
    want_w = torch.repeat_interleave(want_unit / torch.tensor(sizes), torch.tensor(sizes))
    torch.testing.assert_close(w, want_w, rtol=1e-4, atol=1e-6)
    for name, p in model.named_parameters():
        want = torch.einsum("b,b...->...", want_w, grads[name])
        assert ((p.grad - want).abs().max() / want.abs().max()) < 1e-4, name


def test_backward_scale_multiplies_only_the_gradient():
    model = M.SeqModel()
    tokens, mask = M.seq_batch(b=4)
    si = SelfInfluence(model, broadcast=[model.pos])
    grads = {}
    weights = {}
    for scale in (1.0, 0.25):
        model.zero_grad(set_to_none=True)
        r = PresenceReweighter(switch_step=1)
        with si.capture():
            losses = M.seq_loss(model, tokens, mask)
        weights[scale] = r.backward(si, losses, scale=scale)
        grads[scale] = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(weights[0.25], weights[1.0])
    for name, g in grads[1.0].items():
        torch.testing.assert_close(grads[0.25][name], 0.25 * g, msg=name)
