"""A tiny random Llama with a byte-level tokenizer, for tests and benchmarks that need a Hugging Face
causal LM but not a trained one (nothing is downloaded)."""

from __future__ import annotations

__all__ = ["byte_tokenizer", "tiny_llama"]


def byte_tokenizer(chat_template: str | None = None):
    """A byte-level tokenizer built in memory (one token per byte, no merges), plus ``<eos>``;
    ``chat_template`` (a Jinja string) is set when given."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)} | {"<eos>": len(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def tiny_llama(*, hidden_size: int = 32, intermediate_size: int = 64, layers: int = 3, heads: int = 2,
               kv_heads: int = 1, max_positions: int = 2048, chat_template: str | None = None, seed: int = 0):
    """``(model, tokenizer)``: a random ``LlamaForCausalLM`` (weights from ``torch.manual_seed(seed)``,
    eval mode) over :func:`byte_tokenizer` (``<eos>`` is also bos and pad)."""
    import torch
    import transformers

    tokenizer = byte_tokenizer(chat_template)
    # The config says <eos> pads; the tokenizer must agree, or padding a batch fails.
    tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token_id
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                                   intermediate_size=intermediate_size, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   max_position_embeddings=max_positions, bos_token_id=eos, eos_token_id=eos,
                                   pad_token_id=eos)
    return transformers.LlamaForCausalLM(cfg).eval(), tokenizer
