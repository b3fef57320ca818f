"""The engine's per-sample norms and weighted update against the torch.func reference."""

import pytest
import torch
import torch.nn as nn

from reweighting.influence import SelfInfluence, per_sample_grads, per_sample_sq_norms
from reweighting.influence.factors import OuterFactor

from . import models as M

RTOL = 1e-4


def assert_rel_close(got, want, rtol=RTOL):
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < rtol, f"relative error {err:.2e}\ngot  {got}\nwant {want}"


def engine_norms(model, loss_fn, *inputs, **kwargs):
    microbatches = kwargs.pop("microbatches", None)
    si = SelfInfluence(model, **kwargs)
    with si.capture():
        losses = loss_fn(model, *inputs)
    return si.norms(losses, microbatches=microbatches), si, losses


def test_linear_on_flat_inputs_matches_reference():
    model = M.mlp()
    x, y = torch.randn(6, 5), torch.randn(6, 3)
    got, _, _ = engine_norms(model, M.regression_loss, x, y)
    assert_rel_close(got, per_sample_sq_norms(model, M.regression_loss, x, y))


def test_sequence_model_with_padding_tied_weights_layernorm_and_embeddings():
    model = M.SeqModel()
    tokens, mask = M.seq_batch()
    got, _, _ = engine_norms(model, M.seq_loss, tokens, mask, broadcast=[model.pos])
    want = per_sample_sq_norms(model, M.seq_loss, tokens, mask)
    assert_rel_close(got, want)


def test_padding_does_not_leak_into_the_norms():
    # Changing what sits in the padded positions must not change any norm.
    model = M.SeqModel()
    tokens, mask = M.seq_batch()
    noisy = torch.where(mask.bool(), tokens, torch.randint(1, 11, tokens.shape))
    a, _, _ = engine_norms(model, M.seq_loss, tokens, mask, broadcast=[model.pos])
    b, _, _ = engine_norms(model, M.seq_loss, noisy, mask, broadcast=[model.pos])
    assert_rel_close(a, b)


def test_chosen_subset_of_modules_including_one_half_of_a_tied_pair():
    model = M.SeqModel()
    tokens, mask = M.seq_batch()
    got, si, _ = engine_norms(model, M.seq_loss, tokens, mask, modules=["out", "ln"], bookkeeping=False)
    # "out.weight" is tied to "emb.weight": its gradient sums both uses (with their cross term).
    want = per_sample_sq_norms(model, M.seq_loss, tokens, mask, params=["emb.weight", "ln.weight", "ln.bias"])
    assert_rel_close(got, want)
    assert len(si.parameters) == 3


def test_tied_weights_with_the_ghost_cross_term():
    # Large enough a vocabulary that the tied weight's cross term is cheaper than materialising.
    model = M.SeqModel(vocab=40, d=16, tie=True)
    tokens, mask = M.seq_batch(vocab=40)
    si = SelfInfluence(model, broadcast=["pos"])
    with si.capture():
        losses = M.seq_loss(model, tokens, mask)
    got = si.norms(losses)
    assert model.emb.weight not in si._kept  # the cross-term path materialised nothing
    assert_rel_close(got, per_sample_sq_norms(model, M.seq_loss, tokens, mask))
    w = torch.tensor([0.1, 0.4, 0.2, 0.3])
    si.weighted_backward(w)
    assert_rel_close(model.emb.weight.grad, weighted_reference(model, M.seq_loss, w, tokens, mask)["emb.weight"])


def test_untied_sequence_model_on_the_ghost_path():
    model = M.SeqModel(vocab=40, d=16, tie=False)  # T = 6 < 16 * 40 / 56: the output layer takes the ghost form
    tokens, mask = M.seq_batch(vocab=40)
    got, _, _ = engine_norms(model, M.seq_loss, tokens, mask, broadcast=["pos"])
    assert_rel_close(got, per_sample_sq_norms(model, M.seq_loss, tokens, mask))


def test_conv1d_and_conv2d_with_groups_stride_dilation_and_padding_modes():
    model = M.ConvNet()
    seq, img, y = M.conv_batch()
    got, _, _ = engine_norms(model, M.conv_loss, seq, img, y)
    assert_rel_close(got, per_sample_sq_norms(model, M.conv_loss, seq, img, y))


@pytest.mark.parametrize("t, a, b", [(1, 3, 4), (3, 16, 16), (9, 4, 5)])
def test_ghost_and_materialised_norms_agree(t, a, b):
    g = torch.Generator().manual_seed(t)
    f = OuterFactor(torch.randn(4, t, 2, a, generator=g), torch.randn(4, t, 2, b, generator=g), torch.Size([2 * b, a]))
    assert_rel_close(f.sq_norms(), f.per_unit().flatten(1).square().sum(1))


def test_microbatch_units_are_norms_of_summed_gradients():
    model = M.SeqModel()
    tokens, mask = M.seq_batch(b=5)
    got, _, _ = engine_norms(model, M.seq_loss, tokens, mask, broadcast=[model.pos], microbatches=2)
    grads = per_sample_grads(model, M.seq_loss, tokens, mask)
    flat = torch.cat([g.flatten(1) for g in grads.values()], 1)
    want = torch.stack([flat[:3].sum(0).square().sum(), flat[3:].sum(0).square().sum()])
    assert_rel_close(got, want)


def weighted_reference(model, loss_fn, w, *inputs):
    grads = per_sample_grads(model, loss_fn, *inputs)
    return {n: torch.einsum("b,b...->...", w, g) for n, g in grads.items()}


@pytest.mark.parametrize("modules, kept", [(None, 2**30), (None, 0), (["fc"], 2**30)])
def test_weighted_backward_equals_weighted_sum_of_per_sample_gradients(modules, kept):
    model = M.SeqModel()
    tokens, mask = M.seq_batch()
    _, si, losses = engine_norms(model, M.seq_loss, tokens, mask, broadcast=[model.pos], modules=modules,
                                 max_kept_bytes=kept)
    w = torch.tensor([0.1, 0.4, 0.2, 0.3])
    si.weighted_backward(w)
    want = weighted_reference(model, M.seq_loss, w, tokens, mask)
    for name, p in model.named_parameters():
        assert_rel_close(p.grad, want[name])


def test_weighted_backward_falls_back_to_a_second_backward_for_uncovered_parameters():
    model = M.mlp(with_scale=True)
    x, y = torch.randn(5, 5), torch.randn(5, 3)
    _, si, _ = engine_norms(model, M.regression_loss, x, y, modules=[model[0], model[3]])
    assert si.second_backward_parameters == [model[2].gain]
    w = torch.softmax(torch.randn(5), 0)
    model[2].gain.grad = torch.ones(7)  # the update accumulates, as .backward() does
    si.weighted_backward(w)
    want = weighted_reference(model, M.regression_loss, w, x, y)
    assert_rel_close(model[2].gain.grad - 1, want["2.gain"])
    assert_rel_close(model[0].weight.grad, want["0.weight"])


def test_unsupported_module_raises_naming_it_or_uses_the_reference():
    model = M.mlp(with_scale=True)
    with pytest.raises(ValueError, match=r"'2' \(Scale\)"):
        SelfInfluence(model)
    x, y = torch.randn(4, 5), torch.randn(4, 3)
    got, _, _ = engine_norms(model, M.regression_loss, x, y, unsupported="reference")
    assert_rel_close(got, per_sample_sq_norms(model, M.regression_loss, x, y))


def test_batch_statistics_are_refused_in_any_mode_with_the_real_cause():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\) is in training mode"):  # not "unsupported=..."
        SelfInfluence(model, modules=[model[0], model[2]])
    model.eval()
    si = SelfInfluence(model, modules=[model[0], model[2]])
    model.train()  # put back in training mode after the engine was made
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\) is in training mode"):
        with si.capture():
            pass
    model.eval()
    with pytest.raises(ValueError, match="BatchNorm1d"):  # no rule for its parameters either
        SelfInfluence(model)
    # No parameters and eval mode, but no running statistics: it still normalises with the batch's.
    stats_free = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False, track_running_stats=False),
                               nn.Linear(4, 1)).eval()
    with pytest.raises(ValueError, match="track_running_stats=False, so it uses batch statistics even in eval"):
        SelfInfluence(stats_free)


def test_outputs_modified_in_place_are_exact_and_modified_inputs_raise():
    # The output gradient is taken where the output entered the graph, before ReLU(inplace=True).
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    got, _, _ = engine_norms(model, M.regression_loss, x, y)
    assert_rel_close(got, per_sample_sq_norms(model, M.regression_loss, x, y))

    class ModifiesInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 1)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            out = self.b(h)
            h.mul_(2)  # b's input, after b ran: autograd itself never reads it back in norms()
            return out + h.sum(1, keepdim=True)

    model = ModifiesInput()
    si = SelfInfluence(model)
    with si.capture():
        losses = model(torch.randn(2, 3)).sum(1)
    with pytest.raises(RuntimeError, match=r"input of 'b' \(Linear\) was modified in place"):
        si.norms(losses)


def test_refused_configurations_and_bad_input():
    with pytest.raises(ValueError, match="scale_grad_by_freq"):
        SelfInfluence(nn.Embedding(5, 2, scale_grad_by_freq=True))
    model = M.mlp()
    with pytest.raises(ValueError, match="not a module"):
        SelfInfluence(model, modules=["nope"])
    si = SelfInfluence(model)
    with si.capture():
        losses = M.regression_loss(model, torch.randn(3, 5), torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"losses has NaN values at sample indices \[1\]"):
        si.norms(losses * torch.tensor([1.0, float("nan"), 1.0]))
    with pytest.raises(ValueError, match="losses has 2 samples"):
        si.norms(losses.view(3)[:2])
    with pytest.raises(RuntimeError, match="before weighted_backward"):
        SelfInfluence(model).weighted_backward(torch.ones(3))


@pytest.mark.parametrize("vocab, d", [(11, 6), (40, 16)])  # materialised and tied cross-term paths
def test_padding_tokens_at_loss_carrying_positions_get_no_embedding_gradient(vocab, d):
    # padding_idx rows get no gradient even where the padding token is a real input with a loss.
    model = M.SeqModel(vocab=vocab, d=d)
    tokens, mask = M.seq_batch(vocab=vocab)
    tokens[0, 2] = tokens[1, 1] = tokens[3, 4] = 0  # inside each sequence, mask = 1
    assert bool(mask[0, 2] and mask[1, 1] and mask[3, 4])
    got, si, _ = engine_norms(model, M.seq_loss, tokens, mask, broadcast=[model.pos], max_kept_bytes=0)
    assert_rel_close(got, per_sample_sq_norms(model, M.seq_loss, tokens, mask))
    w = torch.tensor([0.1, 0.4, 0.2, 0.3])
    si.weighted_backward(w)
    want = weighted_reference(model, M.seq_loss, w, tokens, mask)
    for name, p in model.named_parameters():
        assert_rel_close(p.grad, want[name])
