"""Sampling k completions per prompt from a Hugging Face causal LM, with their Q-probe features.

The feature of a completion is the hidden state of a chosen layer at the position that emitted the
completion's final token, read from ``generate``'s own ``output_hidden_states`` (no second forward
pass). When generation ends by EOS that position is the completion's last text token, i.e. the state
after reading the whole completion, as in the paper (docs/methods/qprobe.md); after a stop string it
is the token before the stop string's last token; at ``max_new_tokens`` it is the token before the
last one drawn (whose own state generate never computes). Prompts are left-padded in a batch;
the feature depends on each prompt alone, which the tests check against a separate forward pass.

Each prompt is encoded once, not once per sample: a forward pass over the prompts (all but their
last token) fills the key/value cache, which is repeated ``k`` times along the batch, and
``generate`` continues from it (``reuse_prompt=False`` encodes each of the ``k`` copies, as
``num_return_sequences`` does).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["Samples", "sample_with_features", "completion_lengths", "check_prompts", "check_layer"]


def check_prompts(prompts: Sequence[str], name: str = "prompts") -> None:
    """A non-empty list of strings (one string is refused: it would be read as one prompt per character)."""
    if isinstance(prompts, (str, bytes)):
        raise TypeError(f"{name} must be a list of strings, got a single {type(prompts).__name__}: "
                        f"wrap it as [{name}]")
    if not isinstance(prompts, Sequence):
        raise TypeError(f"{name} must be a list of strings, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError(f"{name} is empty")
    wrong = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if wrong:
        raise TypeError(f"{name} must hold strings; not a string at indices {wrong[:10]}")


def check_layer(model, layer: int) -> int:
    """``layer`` as an index into ``output_hidden_states`` (``num_hidden_layers + 1`` entries: the
    embeddings, then each block), checked against the model's depth; returns it unchanged."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an integer, got {type(layer).__name__}")
    depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if depth is None:
        return layer
    states = int(depth) + 1
    if not -states <= layer < states:
        raise ValueError(f"layer must be in [{-states}, {states - 1}] for this model ({depth} layers: 0 is the "
                         f"embeddings, {depth} the last block), got {layer}")
    return layer


@dataclass
class Samples:
    """k completions of each of P prompts, with their features.

    ``completions[p][i]`` is the text of sample ``i`` of prompt ``p`` (without EOS or the stop
    string); ``features`` is ``[P, k, D]`` float32; ``finish[p][i]`` is ``"eos"``, ``"stop"`` or
    ``"length"``; ``token_ids[p][i]`` the generated tokens up to and including the one that ended
    the completion (the feature is the state that emitted that last token).
    """

    prompts: list[str]
    completions: list[list[str]]
    features: torch.Tensor
    finish: list[list[str]] = field(default_factory=list)
    token_ids: list[list[list[int]]] = field(default_factory=list)

    @property
    def k(self) -> int:
        return self.features.shape[1]


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def completion_lengths(
    generated: torch.Tensor, eos_ids: Sequence[int], tokenizer=None, stop_strings: Sequence[str] = ()
) -> tuple[list[int], list[str]]:
    """Tokens in each generated row up to and including the one that ended it, and why it ended.

    A row ends at its first EOS token, or at the first token after which its decoded text contains a
    stop string, whichever comes first; otherwise it ran to the last generated position.
    """
    lengths, reasons = [], []
    eos = set(int(e) for e in eos_ids)
    for row in generated.tolist():
        end, why = len(row), "length"
        for j, tok in enumerate(row):
            if tok in eos:
                end, why = j + 1, "eos"
                break
        if stop_strings:
            for j in range(end if why == "eos" else len(row)):
                text = tokenizer.decode(row[: j + 1], skip_special_tokens=False)
                if any(s in text for s in stop_strings):
                    end, why = j + 1, "stop"
                    break
        lengths.append(end)
        reasons.append(why)
    return lengths, reasons


def _prompt_texts(tokenizer, prompts: Sequence[str], chat: bool) -> list[str]:
    if not chat:
        return list(prompts)
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in prompts]


def _prompt_cache(model, enc, k: int) -> tuple[str, object] | None:
    """``(keyword, cache)``: the key/value cache of every prompt but its last token, computed once per
    prompt and repeated ``k`` times along the batch; None where the model or its cache cannot do that."""
    ids, mask = enc["input_ids"], enc["attention_mask"]
    params = inspect.signature(model.forward).parameters
    keyword = "cache" if "cache" in params else "past_key_values" if "past_key_values" in params else None
    if ids.shape[1] < 2 or keyword is None:
        return None
    kwargs = {"input_ids": ids[:, :-1], "attention_mask": mask[:, :-1], "use_cache": True}
    if "position_ids" in params:  # as generate numbers left-padded prompts
        kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, :-1]
    out = model(**kwargs)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(k)
    return keyword, cache


@torch.no_grad()
def sample_with_features(
    model,
    tokenizer,
    prompts: Sequence[str],
    k: int,
    *,
    layer: int = -1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop_strings: Sequence[str] = (),
    chat: bool = False,
    batch_size: int = 8,
    seed: int | None = None,
    progress: bool = True,
    reuse_prompt: bool = True,
) -> Samples:
    """Draw ``k`` completions of each prompt with ``model.generate`` and read their features.

    ``layer`` indexes ``output_hidden_states`` (0: embeddings, ``i``: after block ``i``, -1: the last,
    which most models return after their final norm). ``chat`` wraps each prompt in the tokenizer's
    chat template. ``batch_size`` prompts (``batch_size * k`` sequences) go to one ``generate`` call.
    ``seed`` seeds torch's global generator, which ``generate`` samples from. ``reuse_prompt``
    encodes each prompt once and shares its cache among its ``k`` samples (see the module).
    """
    check_prompts(prompts)
    for name, value in (("k", k), ("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature!r}")
    if not 0 < float(top_p) <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(stop_strings, str):
        raise TypeError(f"stop_strings must be a list of strings, got the single string {stop_strings!r}: "
                        "wrap it in a list")
    check_layer(model, layer)
    if seed is not None:
        torch.manual_seed(seed)
    from tqdm.auto import tqdm

    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    texts = _prompt_texts(tokenizer, prompts, chat)
    device = next(model.parameters()).device
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # so that every prompt ends at the last input position
    if tokenizer.pad_token is None:
        tokenizer.pad_token_id = pad_id
    completions, features, finish, token_ids = [], [], [], []
    try:
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="sample", disable=not progress, leave=False, dynamic_ncols=True):
            batch = texts[start: start + batch_size]
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=not chat).to(device)
            shared = _prompt_cache(model, enc, k) if reuse_prompt else None
            if shared is None:
                inputs, copies = dict(enc), k
            else:  # the k copies of each prompt, in generate's order, continuing from the shared cache
                inputs = {name: t.repeat_interleave(k, 0) for name, t in enc.items()}
                inputs[shared[0]], copies = shared[1], 1
            out = model.generate(
                **inputs, do_sample=True, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                num_return_sequences=copies, output_hidden_states=True, return_dict_in_generate=True,
                pad_token_id=pad_id, eos_token_id=eos_ids or None,
                stop_strings=list(stop_strings) or None, tokenizer=tokenizer if stop_strings else None,
            )
            generated = out.sequences[:, enc["input_ids"].shape[1]:]
            lengths, reasons = completion_lengths(generated, eos_ids, tokenizer, stop_strings)
            # Step s's hidden states end with the position that emitted generated token s.
            emitted = torch.stack([step[layer][:, -1] for step in out.hidden_states], dim=1)
            rows = torch.arange(generated.shape[0], device=emitted.device)
            last = torch.tensor(lengths, device=emitted.device) - 1
            features.append(emitted[rows, last].float().cpu().view(len(batch), k, -1))
            for i, (row, n, why) in enumerate(zip(generated.tolist(), lengths, reasons)):
                if i % k == 0:
                    completions.append([])
                    finish.append([])
                    token_ids.append([])
                token_ids[-1].append(row[:n])
                keep = row[: n - 1] if why == "eos" else row[:n]
                text = tokenizer.decode(keep, skip_special_tokens=True)
                if why == "stop":
                    cut = min((text.find(s) for s in stop_strings if s in text), default=len(text))
                    text = text[:cut]
                completions[-1].append(text)
                finish[-1].append(why)
    finally:
        tokenizer.padding_side = previous_side
    return Samples(prompts=list(prompts), completions=completions, features=torch.cat(features), finish=finish,
                   token_ids=token_ids)
