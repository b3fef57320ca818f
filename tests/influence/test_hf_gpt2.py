"""A tiny Hugging Face GPT-2 (built from a config, nothing downloaded): Conv1D, tied wte/lm_head, wpe on [1, T]."""

import pytest
import torch

from reweighting.influence import SelfInfluence, per_sample_sq_norms

transformers = pytest.importorskip("transformers")


def test_gpt2_norms_match_the_reference():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=23, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                  attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    tokens = torch.randint(0, 23, (3, 7), generator=torch.Generator().manual_seed(1))

    def loss_fn(m, ids):
        logits = m(ids).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)

    si = SelfInfluence(model, broadcast=[model.transformer.wpe])
    with si.capture():
        losses = loss_fn(model, tokens)
    got = si.norms(losses)
    want = per_sample_sq_norms(model, loss_fn, tokens)
    assert ((got - want).abs().max() / want.abs().max()) < 1e-4
