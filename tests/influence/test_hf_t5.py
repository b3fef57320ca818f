"""Tiny random Hugging Face T5 (built from a config, nothing downloaded): its relative attention bias is a
table called on a [T_q, T_k] grid, which no rule reads per sample; broadcast= refuses it clearly and
reference= makes the whole model exact, also when T_enc == T_dec == B."""

import pytest
import torch
import torch.nn.functional as F

from reweighting.influence import SelfInfluence, per_sample_grads_loop
from reweighting.influence.verify import VerificationError

transformers = pytest.importorskip("transformers")


def tiny_t5():
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=23, d_model=16, d_ff=24, d_kv=4, num_layers=1, num_heads=2,
                                   decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(config).eval()


def t5_loss(model, ids, labels):
    logits = model(input_ids=ids, labels=labels).logits
    return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1)


def bias_tables(model):
    return [n for n, _ in model.named_modules() if n.endswith("relative_attention_bias")]


def batch(b, t):
    g = torch.Generator().manual_seed(2)
    return torch.randint(1, 23, (b, t), generator=g), torch.randint(1, 23, (b, t), generator=g)


def test_t5_bias_in_broadcast_is_refused_clearly():
    model = tiny_t5()
    si = SelfInfluence(model, broadcast=bias_tables(model))
    with pytest.raises(ValueError, match="relative_attention_bias.*reference=\\[\\.\\.\\.\\]"):
        with si.capture():
            t5_loss(model, *batch(3, 5))


def test_t5_bias_without_an_argument_is_never_silent_when_t_equals_b():
    model = tiny_t5()
    with pytest.raises((ValueError, VerificationError)):
        si = SelfInfluence(model)
        with si.capture():
            losses = t5_loss(model, *batch(4, 4))
        si.norms(losses)


@pytest.mark.parametrize("b, t", [(3, 5), (4, 4)])
def test_t5_with_the_bias_by_autograd_is_exact(b, t):
    model = tiny_t5()
    ids, labels = batch(b, t)
    si = SelfInfluence(model, reference=bias_tables(model))
    with si.capture():
        losses = t5_loss(model, ids, labels)
    got = si.norms(losses)
    grads = per_sample_grads_loop(model, t5_loss, ids, labels)
    want = sum(g.flatten(1).square().sum(1) for g in grads.values())
    assert ((got - want).abs().max() / want.max()) < 1e-4
    w = torch.softmax(torch.linspace(-1, 1, b), 0)
    si.weighted_backward(w)
    for name, p in model.named_parameters():
        ref = torch.einsum("b,b...->...", w, grads[name])
        assert ((p.grad - ref).abs().max() / ref.abs().max().clamp(min=1e-12)) < 1e-4, name
