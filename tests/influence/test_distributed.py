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


def single_process_presence_steps(steps):
    tokens, mask = W.global_batch()
    model = M.SeqModel()
    si = SelfInfluence(model, broadcast=[model.pos])
    presence = PresenceReweighter(switch_step=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        with si.capture():
            losses = M.seq_loss(model, tokens, mask)
        presence.backward(si, losses)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def fsdp2_and_rank_dependent():
    return launch(W.fsdp2_and_rank_dependent, 2, 2)


def test_fsdp2_presence_trains_like_one_process_with_sharded_gradients(fsdp2_and_rank_dependent):
    want = single_process_presence_steps(2)
    for rank, ((kinds, placements, full), _) in enumerate(fsdp2_and_rank_dependent):
        for step in kinds:
            for name, (kind, grad_placement, local) in step.items():
                # the gradient is a DTensor laid out like its (sharded) parameter: a reduce-scatter's result
                assert kind == "DTensor" and (grad_placement, local) == placements[name], (rank, name)
        assert placements["emb.weight"] == ("(Shard(dim=0),)", (6 if rank == 0 else 5, 6))
        for name, value in full.items():
            torch.testing.assert_close(torch.from_numpy(value), want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_module_used_on_one_rank_only_gives_the_global_update_without_hanging(fsdp2_and_rank_dependent):
    from reweighting.influence import per_sample_grads, presence_weights

    results = [r[1] for r in fsdp2_and_rank_dependent]
    model = W.TwoHeads()
    grads, norms = [], []
    for rank in range(2):
        x, y = W.two_heads_data(rank)
        g = per_sample_grads(model, lambda m, a, b, r=rank: W.two_heads_loss(m, a, b, r), x, y)
        grads.append(g)
        norms.append(sum(v.flatten(1).square().sum(1) for v in g.values()))
    w = presence_weights(torch.cat(norms), -1.0)
    torch.testing.assert_close(torch.cat([torch.from_numpy(r[0]) for r in results]), w, rtol=1e-4, atol=1e-7)
    ws = w.split(list(W.SIZES))
    want = {n: sum(torch.einsum("b,b...->...", ws[r], grads[r][n]) for r in range(2)) for n in grads[0]}
    for _, got in results:
        for name, g in got.items():
            torch.testing.assert_close(torch.from_numpy(g), want[name], rtol=1e-4, atol=1e-6, msg=name)
