import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from reweighting.qprobe.features import completion_lengths, sample_with_features  # noqa: E402
from reweighting.qprobe.tiny import byte_tokenizer  # noqa: E402


def tiny_model(kind: str, vocab: int, eos_ids: list[int]):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=3, n_head=2, n_positions=128,
                                      bos_token_id=eos_ids[0], eos_token_id=eos_ids[0])
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                       bos_token_id=eos_ids[0], eos_token_id=eos_ids[0], pad_token_id=eos_ids[0])
        model = transformers.LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = eos_ids
    return model.eval()


@pytest.mark.parametrize("kind, stop", [("gpt2", ()), ("llama", ("q",))])
def test_features_match_a_separate_forward_pass(kind, stop):
    tokenizer = byte_tokenizer()
    vocab = len(tokenizer)
    # Many EOS ids, so that some samples end by EOS, some by the stop string and some by length.
    eos_ids = [tokenizer.eos_token_id] + list(range(70, 100))
    model = tiny_model(kind, vocab, eos_ids)
    prompts = ["hi", "a much longer prompt than the first", "mid-size prompt"]
    layer = 2
    samples = sample_with_features(model, tokenizer, prompts, k=4, layer=layer, max_new_tokens=12, seed=0,
                                   stop_strings=stop, progress=False)
    assert samples.features.shape == (3, 4, 32)
    reasons = {w for row in samples.finish for w in row}
    assert "eos" in reasons and "length" in reasons
    checked = 0
    for p, prompt in enumerate(prompts):
        prompt_ids = tokenizer(prompt)["input_ids"]
        for i, generated in enumerate(samples.token_ids[p]):
            why = samples.finish[p][i]
            if why == "eos":
                assert generated[-1] in eos_ids
            if why == "stop":
                assert stop[0] in tokenizer.decode(generated)
            # The state that emitted the final token has read the prompt and everything before that token.
            full = torch.tensor([prompt_ids + generated[:-1]])
            states = model(full, output_hidden_states=True).hidden_states[layer][0, -1]
            torch.testing.assert_close(samples.features[p, i], states, atol=2e-4, rtol=1e-3)
            checked += 1
    assert checked == 12


def test_completion_lengths_rules():
    tokenizer = byte_tokenizer()
    eos = tokenizer.eos_token_id
    ids = tokenizer("abcXdef")["input_ids"]
    gen = torch.tensor([ids + [eos], ids[:2] + [eos] + ids[:5], ids[:7] + ids[:1]])
    lengths, reasons = completion_lengths(gen, [eos], tokenizer, ["X"])
    assert reasons == ["stop", "eos", "stop"]
    assert lengths == [4, 3, 4]
    lengths, reasons = completion_lengths(gen, [eos], tokenizer, ())
    assert lengths == [8, 3, 8] and reasons == ["eos", "eos", "length"]


def test_tiny_llama_tokenizer_pads_a_batch_with_eos():
    from reweighting.qprobe.tiny import tiny_llama

    model, tokenizer = tiny_llama(layers=1)
    tokenizer.padding_side = "left"
    batch = tokenizer(["a", "bcd"], return_tensors="pt", padding=True)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == model.config.pad_token_id
    assert batch["input_ids"][0, :2].tolist() == [tokenizer.eos_token_id] * 2
    assert batch["attention_mask"].tolist() == [[0, 0, 1], [1, 1, 1]]
