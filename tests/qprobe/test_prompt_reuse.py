"""Sampling encodes each prompt once and shares its cache among the k samples, with the same draws."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from reweighting.qprobe.features import sample_with_features  # noqa: E402
from reweighting.qprobe.tiny import byte_tokenizer  # noqa: E402

from .test_features import tiny_model  # noqa: E402


@pytest.mark.parametrize("kind", ["llama"])
def test_each_prompt_is_encoded_once_and_the_samples_are_unchanged(kind):
    tokenizer = byte_tokenizer()
    eos_ids = [tokenizer.eos_token_id] + list(range(70, 100))
    model = tiny_model(kind, len(tokenizer), eos_ids).double()  # float64: both ways give the same logits
    prompts = ["hi", "a much longer prompt than the first", "mid-size prompt"]
    k, new = 4, 6
    embed = model.get_input_embeddings()
    runs = {}
    for reuse in (False, True):
        seen = []
        handle = embed.register_forward_hook(lambda m, args, out, seen=seen: seen.append(args[0].shape))
        try:
            runs[reuse] = sample_with_features(model, tokenizer, prompts, k=k, layer=1, max_new_tokens=new, seed=3,
                                               batch_size=2, progress=False, reuse_prompt=reuse)
        finally:
            handle.remove()
        runs[reuse, "tokens"] = sum(s.numel() for s in seen)
    assert runs[True].token_ids == runs[False].token_ids
    assert runs[True].completions == runs[False].completions
    torch.testing.assert_close(runs[True].features, runs[False].features)
    # Padded prompt tokens read: once per prompt rather than once per sample.
    lengths = [max(len(tokenizer(p)["input_ids"]) for p in prompts[:2]), len(tokenizer(prompts[2])["input_ids"])]
    batches = [2, 1]
    prompt_once = sum(b * (n - 1) + b * k for b, n in zip(batches, lengths))
    prompt_k = sum(b * k * n for b, n in zip(batches, lengths))
    generated = sum(b * k for b in batches) * (new - 1)
    assert runs[False, "tokens"] <= prompt_k + generated
    assert runs[True, "tokens"] <= prompt_once + generated
    assert runs[True, "tokens"] < runs[False, "tokens"] - (k - 1) * sum(lengths) // 2
