"""A cached pool of sampled completions per question, for the ``qprobe-smollm2`` study.

Each question is answered ``n`` times from one forward pass over its prompt: the prompt's key/value
cache is computed once and repeated ``n`` times, then the ``n`` continuations are decoded together
(``generate(num_return_sequences=n)`` would run the prompt ``n`` times). Tokens are drawn from
``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens, from a generator
seeded by the question's text and the pool's seed, so a question's pool does not depend on which
other questions are sampled, or in what order. A completion's feature is the hidden state of
``layer`` at the position that emitted its final token (EOS, or the last token drawn), as
``reweighting.qprobe.features`` reads it from ``generate``.

The pool of a question is cached as one file keyed by the model, the prompt, the sampling settings
and ``n``, written whole or not at all, so an interrupted run keeps the questions it finished.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

__all__ = ["question_seed", "sample_question", "pooled_samples"]


def question_seed(text: str, seed: int) -> int:
    """A 63-bit generator seed from a question's text and the pool's seed."""
    return int(hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()[:15], 16)


@torch.no_grad()
def sample_question(model, tokenizer, prompt: str, n: int, *, layer: int, max_new_tokens: int,
                    temperature: float, top_k: int, generator: torch.Generator
                    ) -> tuple[list[str], torch.Tensor, list[list[int]]]:
    """``n`` completions of one chat prompt, their features ``[n, D]`` (see the module docstring) and
    their tokens up to and including the one that ended each (EOS, or the last drawn)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    eos = model.generation_config.eos_token_id
    eos_ids = torch.tensor(sorted(set(eos if isinstance(eos, (list, tuple)) else [eos or tokenizer.eos_token_id])))
    out = model(input_ids=ids, use_cache=True, output_hidden_states=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(n)  # the prompt is run once; its keys and values serve all n samples
    logits = out.logits[:, -1].float().expand(n, -1)
    emitting = out.hidden_states[layer][:, -1].expand(n, -1)
    features = torch.zeros(n, emitting.shape[-1])
    done = torch.zeros(n, dtype=torch.bool)
    drawn: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        scaled = logits / temperature
        if 0 < top_k < scaled.shape[-1]:
            floor = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < floor, -torch.inf)
        token = torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator).squeeze(1)
        # a finished row keeps its feature; an unfinished one takes the state that emitted this token
        features[~done] = emitting[~done].float()
        token = torch.where(done, eos_ids[0], token)
        drawn.append(token)
        done = done | torch.isin(token, eos_ids)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.ones(n, ids.shape[1] + step + 1, dtype=torch.long)
        out = model(input_ids=token[:, None], past_key_values=cache, attention_mask=mask, use_cache=True,
                    output_hidden_states=True)
        cache = out.past_key_values
        logits = out.logits[:, -1].float()
        emitting = out.hidden_states[layer][:, -1]
    tokens = torch.stack(drawn, dim=1)
    completions, ended = [], []
    for row in tokens.tolist():
        end = next((j for j, t in enumerate(row) if t in eos_ids.tolist()), len(row))
        completions.append(tokenizer.decode(row[:end], skip_special_tokens=True))
        ended.append(row[: end + 1])
    return completions, features, ended


def pooled_samples(prompts: Sequence[str], n: int, *, settings: dict, model_id: str, load: Callable[[], tuple],
                   cache: Path, model_box: dict, progress: Callable = lambda it, **_: it) -> dict:
    """``{"completions": [P][n] str, "features": [P, n, D]}`` for ``prompts``, each question's pool read
    from ``cache`` when there, else sampled (loading the model through ``load`` on first need, kept in
    ``model_box``) and cached. ``settings``: ``layer``, ``max_new_tokens``, ``temperature``, ``top_k``,
    ``seed``."""
    completions, features = [], []
    for prompt in progress(list(prompts), desc="sample pool"):
        key = json.dumps({"model": model_id, "prompt": prompt, "n": n, "chat": True, **settings}, sort_keys=True)
        path = cache / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"
        if path.exists():
            data = torch.load(path, weights_only=True)
        else:
            if "model" not in model_box:
                model_box["model"], model_box["tokenizer"] = load()
            g = torch.Generator().manual_seed(question_seed(prompt, settings["seed"]))
            texts, feats, _ = sample_question(
                model_box["model"], model_box["tokenizer"], prompt, n, layer=settings["layer"],
                max_new_tokens=settings["max_new_tokens"], temperature=settings["temperature"],
                top_k=settings["top_k"], generator=g)
            data = {"completions": texts, "features": feats, "key": key}
            cache.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".partial")
            torch.save(data, tmp)
            tmp.rename(path)  # only a complete file is ever read back
        completions.append(list(data["completions"]))
        features.append(data["features"])
    return {"completions": completions, "features": torch.stack(features)}
