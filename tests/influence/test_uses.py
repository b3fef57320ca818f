"""Every use of a tracked parameter is accounted for: functional tied heads, attention, checkpointing,
compiled models and Hugging Face RMSNorms, each exact against the torch.func reference or a clear error."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp

from reweighting.influence import SelfInfluence, per_sample_grads, per_sample_grads_loop

from . import models as M

RTOL = 1e-4


def rel_err(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def weighted_check(model, si, loss_fn, inputs, reference=per_sample_grads):
    """The engine's norms and update against the per-sample reference (every parameter)."""
    with si.capture():
        losses = loss_fn(model, *inputs)
    got = si.norms(losses)
    grads = reference(model, loss_fn, *inputs)
    want = sum(g.flatten(1).float().square().sum(1) for g in grads.values())
    assert rel_err(got, want) < RTOL
    w = torch.softmax(torch.linspace(-1, 1, losses.shape[0]), 0)
    model.zero_grad(set_to_none=True)
    si.weighted_backward(w)
    for name, p in model.named_parameters():
        want_g = torch.einsum("b,b...->...", w, grads[name])
        assert p.grad is not None, name
        assert rel_err(p.grad, want_g) < RTOL, name


class FunctionalHead(M.SeqModel):
    """The tied output layer as ``F.linear(h, emb.weight)`` (no output module)."""

    def __init__(self, **kw):
        super().__init__(tie=False, **kw)
        del self.out

    def forward(self, tokens):
        x = self.emb(tokens) + self.pos(torch.arange(tokens.shape[1]))
        x = x + torch.tanh(self.fc(self.ln(x)))
        return F.linear(self.rms(x), self.emb.weight)


@pytest.mark.parametrize("vocab, d", [(11, 6), (40, 16)])  # materialised and tied cross-term paths
def test_tied_head_through_f_linear_is_exact(vocab, d):
    model = FunctionalHead(vocab=vocab, d=d)
    tokens, mask = M.seq_batch(vocab=vocab)
    weighted_check(model, SelfInfluence(model, broadcast=["pos"]), M.seq_loss, (tokens, mask))


class MatmulHead(FunctionalHead):
    def forward(self, tokens):
        x = self.emb(tokens) + self.pos(torch.arange(tokens.shape[1]))
        return self.rms(x) @ self.emb.weight.t()


def test_an_unseen_use_raises_naming_the_parameter():
    model = MatmulHead()
    tokens, mask = M.seq_batch()
    si = SelfInfluence(model, broadcast=["pos"])
    with si.capture():
        losses = M.seq_loss(model, tokens, mask)
    with pytest.raises(RuntimeError, match=r"parameter 'emb.weight' is used by an operation \(TBackward0\)"):
        si.norms(losses)


class Attention(nn.Module):
    def __init__(self, batch_first=True, kdim=None, bias=True, cross=False):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(4, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias)
        self.memory = nn.Linear(4, kdim or 8) if cross else None
        self.batch_first = batch_first

    def forward(self, x, pad):
        h = torch.tanh(self.proj(x))
        kv = torch.tanh(self.memory(x[:, :3])) if self.memory is not None else h
        if not self.batch_first:
            h, kv = h.transpose(0, 1), kv.transpose(0, 1)
        out, attn = self.mha(h, kv, kv, key_padding_mask=pad[:, : kv.shape[0 if not self.batch_first else 1]],
                             need_weights=True)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, attn


def attention_loss(model, x, pad):
    out, attn = model(x, pad)
    return out.square().sum((1, 2)) + attn[:, 0].sum(-1) * attn[:, :, 0].sum(-1)


@pytest.mark.parametrize("kw", [{}, {"batch_first": False}, {"cross": True}, {"cross": True, "kdim": 5},
                                {"bias": False}])
def test_multihead_attention_is_exact(kw):
    model = Attention(**kw)
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(2))
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1, 4] = pad[2, 2:] = True
    weighted_check(model, SelfInfluence(model), attention_loss, (x, pad), reference=per_sample_grads_loop)


def test_multihead_attention_refusals():
    mha = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    with pytest.raises(ValueError, match="add_bias_kv"):
        SelfInfluence(mha)
    with pytest.raises(ValueError, match="dropout"):
        SelfInfluence(nn.MultiheadAttention(8, 2, dropout=0.1))


class Blocks(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.ln = nn.Linear(4, 6), nn.Linear(6, 2), nn.LayerNorm(6)
        self.reentrant = reentrant

    def inner(self, x):
        return self.ln(torch.tanh(self.a(x)))

    def forward(self, x):
        return self.b(cp.checkpoint(self.inner, x, use_reentrant=self.reentrant))


def test_non_reentrant_checkpointing_is_exact_and_reentrant_raises():
    x, y = torch.randn(5, 3, 4, requires_grad=True), torch.randn(5, 3, 2)
    model = Blocks(reentrant=False)
    weighted_check(model, SelfInfluence(model), M.regression_loss_3d, (x.detach(), y), reference=per_sample_grads_loop)
    model = Blocks(reentrant=True)
    si = SelfInfluence(model)
    with si.capture():
        losses = M.regression_loss_3d(model, x, y)
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        si.norms(losses)


def test_compiled_models_are_refused_with_what_to_do():
    model = M.mlp()
    with pytest.raises(ValueError, match=r"_orig_mod"):
        SelfInfluence(torch.compile(model))
    model[0].compile()
    with pytest.raises(ValueError, match=r"\['0'\] are compiled"):
        SelfInfluence(model)


def test_a_compiled_loss_function_around_the_model_raises_at_norms():
    model = M.mlp()
    si = SelfInfluence(model)
    loss = torch.compile(M.regression_loss, backend="aot_eager")
    with si.capture():
        losses = loss(model, torch.randn(4, 5), torch.randn(4, 3))
    with pytest.raises(RuntimeError, match=r"CompiledFunctionBackward: torch.compile'd code"):
        si.norms(losses)


def test_a_subclass_that_overrides_forward_gets_no_inherited_rule():
    class DoubleUse(nn.Linear):
        def forward(self, x):  # uses the weight twice: the Linear rule would be wrong
            return F.linear(F.linear(x, self.weight), self.weight, self.bias)

    model = nn.Sequential(DoubleUse(3, 3), nn.Linear(3, 1))
    with pytest.raises(ValueError, match=r"'0' \(DoubleUse\)"):
        SelfInfluence(model)
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    weighted_check(model, SelfInfluence(model, unsupported="reference"), M.regression_loss, (x, y))


def test_functional_uses_are_watched_while_seen_and_a_later_one_raises():
    class Sometimes(FunctionalHead):
        functional_head = False

        def forward(self, tokens):
            x = self.emb(tokens) + self.pos(torch.arange(tokens.shape[1]))
            h = self.rms(x + torch.tanh(self.fc(self.ln(x))))
            return F.linear(h, self.emb.weight) if self.functional_head else self.fc(h)

    model = Sometimes(vocab=6, d=6)  # fc maps to 6 logits too
    tokens, mask = M.seq_batch(vocab=6)
    si = SelfInfluence(model, broadcast=["pos"])
    with si.capture():
        losses = M.seq_loss(model, tokens, mask)
    si.norms(losses)
    model.functional_head = True  # the first capture saw no functional use: no longer watched
    with si.capture():
        losses = M.seq_loss(model, tokens, mask)
    with pytest.raises(RuntimeError, match="pass functional=True"):
        si.norms(losses)
    weighted_check(model, SelfInfluence(model, broadcast=["pos"], functional=True), M.seq_loss, (tokens, mask))


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer_is_exact(norm_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=norm_first)
    model = nn.Sequential(nn.Linear(4, 8), layer, nn.Linear(8, 2))
    x, y = torch.randn(3, 5, 4), torch.randn(3, 5, 2)
    weighted_check(model, SelfInfluence(model), M.regression_loss_3d, (x, y), reference=per_sample_grads_loop)
