"""Q-probe features from an API that only gives samples and embeddings (METHODS.md section 4).

:func:`sample_and_embed` works with any two plain callables: ``sample(prompt, n) -> list[str]``
and ``embed(texts) -> [len(texts), D]``. :class:`OpenAICompatible` provides both for endpoints
that speak the OpenAI HTTP API (``/chat/completions`` with ``n``, ``/embeddings``), using only the
standard library.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

import torch

from .features import Samples

__all__ = ["sample_and_embed", "OpenAICompatible"]


def _join(prompt: str, completion: str) -> str:
    return f"{prompt}\n\n{completion}"


def sample_and_embed(
    prompts: Sequence[str],
    sample: Callable[[str, int], Sequence[str]],
    embed: Callable[[list[str]], Sequence[Sequence[float]] | torch.Tensor],
    k: int,
    *,
    join: Callable[[str, str], str] = _join,
    progress: bool = True,
) -> Samples:
    """Draw ``k`` completions per prompt with ``sample`` and embed ``join(prompt, completion)`` with ``embed``.

    ``phi(x, a)`` must depend on both the prompt and the completion, hence the join (by default the
    prompt, a blank line and the completion). Returns :class:`~reweighting.qprobe.features.Samples`
    with features ``[P, k, D]``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    if not prompts:
        raise ValueError("prompts is empty")
    from tqdm.auto import tqdm

    completions, features = [], []
    for p, prompt in enumerate(tqdm(prompts, desc="sample and embed", disable=not progress, leave=False)):
        drawn = list(sample(prompt, k))
        if len(drawn) != k:
            raise ValueError(f"sample returned {len(drawn)} completions for prompt {p}, expected k = {k}")
        vectors = torch.as_tensor(embed([join(prompt, c) for c in drawn]), dtype=torch.float32)
        if vectors.dim() != 2 or vectors.shape[0] != k:
            raise ValueError(f"embed returned shape {tuple(vectors.shape)} for prompt {p}, expected [{k}, dim]")
        completions.append(drawn)
        features.append(vectors)
    dims = {f.shape[1] for f in features}
    if len(dims) != 1:
        raise ValueError(f"embed returned vectors of different sizes {sorted(dims)}")
    return Samples(prompts=list(prompts), completions=completions, features=torch.stack(features),
                   finish=[["api"] * k for _ in prompts])


class OpenAICompatible:
    """Sampler and embedder for an OpenAI-compatible HTTP endpoint.

    ``base_url`` is the API root (e.g. ``http://localhost:8000/v1``); ``model`` the chat model and
    ``embedding_model`` the embedding model. The key is ``api_key`` or the ``OPENAI_API_KEY``
    environment variable (none for a local server).
    """

    def __init__(self, base_url: str, model: str, embedding_model: str | None = None, *, api_key: str | None = None,
                 temperature: float = 1.0, max_tokens: int = 256, timeout: float = 60.0):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.embedding_model = embedding_model or model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.timeout = timeout

    def _post(self, path: str, payload: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(f"{self.base_url}{path}", data=json.dumps(payload).encode(),
                                         headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            body = err.read()[:500].decode(errors="replace")
            raise RuntimeError(f"{self.base_url}{path} answered HTTP {err.code}: {body}") from err

    def sample(self, prompt: str, n: int) -> list[str]:
        """``n`` chat completions of ``prompt`` in one request (the ``n`` parameter)."""
        reply = self._post("/chat/completions", {
            "model": self.model, "messages": [{"role": "user", "content": prompt}], "n": int(n),
            "temperature": self.temperature, "max_tokens": self.max_tokens,
        })
        choices = sorted(reply["choices"], key=lambda c: c.get("index", 0))
        return [c["message"]["content"] or "" for c in choices]

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Embeddings ``[len(texts), D]`` from ``/embeddings``."""
        reply = self._post("/embeddings", {"model": self.embedding_model, "input": list(texts)})
        data = sorted(reply["data"], key=lambda d: d.get("index", 0))
        return torch.tensor([d["embedding"] for d in data], dtype=torch.float32)
