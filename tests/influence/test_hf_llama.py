"""Tiny random Hugging Face Llama and Qwen2 (built from configs, nothing downloaded): RMSNorms recognised by
structure, tied embeddings, rotary attention and a padded batch, with no ``unsupported=`` argument."""

import pytest
import torch
import torch.nn.functional as F

from reweighting.influence import SelfInfluence, per_sample_grads_loop

transformers = pytest.importorskip("transformers")


def tiny(kind):
    torch.manual_seed(0)
    common = dict(vocab_size=37, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=True, pad_token_id=0,
                  attn_implementation="eager")
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    return model.eval()


def lm_loss(model, ids, mask):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    tok = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    m = mask[:, 1:].float()
    return (tok * m).sum(1) / m.sum(1)


def padded_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 37, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 4:] = 0
    ids[1, 3] = 0  # the padding token inside a real sequence, at a position that carries loss
    return ids * (mask > 0) + 0 * mask, mask


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_norms_and_update_match_the_reference(kind):
    model = tiny(kind)
    norm_types = {type(m).__name__ for m in model.modules() if "RMSNorm" in type(m).__name__}
    assert norm_types == {"LlamaRMSNorm" if kind == "llama" else "Qwen2RMSNorm"}
    ids, mask = padded_batch()
    si = SelfInfluence(model)
    assert si.second_backward_parameters == []  # every parameter has a rule
    with si.capture():
        losses = lm_loss(model, ids, mask)
    got = si.norms(losses)
    grads = per_sample_grads_loop(model, lm_loss, ids, mask)
    want = sum(g.flatten(1).square().sum(1) for g in grads.values())
    assert ((got - want).abs().max() / want.abs().max()) < 1e-4
    w = torch.tensor([0.2, 0.5, 0.3])
    si.weighted_backward(w)
    for name, p in model.named_parameters():
        ref = torch.einsum("b,b...->...", w, grads[name])
        assert ((p.grad - ref).abs().max() / ref.abs().max()) < 1e-4, name


def test_a_weight_and_eps_module_with_another_formula_is_refused():
    class NotRMS(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(4))
            self.eps = 1e-6

        def forward(self, x):  # a LayerNorm without bias: not weight * x / rms(x)
            return self.weight * F.layer_norm(x, (4,), eps=self.eps)

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), NotRMS())
    si = SelfInfluence(model)
    with pytest.raises(ValueError, match=r"'1' \(NotRMS\) holds a 1-d weight and an eps"):
        with si.capture():
            model(torch.randn(2, 3))


def test_gradient_checkpointing_default_is_exact_and_reentrant_raises():
    ids, mask = padded_batch()
    for kwargs in ({}, {"gradient_checkpointing_kwargs": {"use_reentrant": True}}):
        model = tiny("llama").train()
        model.gradient_checkpointing_enable(**kwargs)
        si = SelfInfluence(model)
        with si.capture():
            losses = lm_loss(model, ids, mask)
        if kwargs:
            with pytest.raises(RuntimeError, match="use_reentrant=False"):
                si.norms(losses)
        else:  # transformers' default is the non-reentrant kind
            got = si.norms(losses)
            grads = per_sample_grads_loop(model, lm_loss, ids, mask)
            want = sum(g.flatten(1).square().sum(1) for g in grads.values())
            assert ((got - want).abs().max() / want.abs().max()) < 1e-4
