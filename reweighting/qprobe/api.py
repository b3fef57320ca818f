"""Q-probe features from an API that only gives samples and embeddings (docs/methods/qprobe.md#features-from-an-api).

:func:`sample_and_embed` works with any two plain callables: ``sample(prompt, n) -> list[str]``
and ``embed(texts) -> [len(texts), D]``. :class:`OpenAICompatible` provides both for endpoints
that speak the OpenAI HTTP API (``/chat/completions``, ``/embeddings``), using only the standard
library. Real servers differ from the OpenAI API in two ways that the client handles:

- Some ignore ``n`` and return one completion per request (llama.cpp's server, Ollama). The client
  asks again for the completions still missing, each request with the next ``seed`` (``seed``,
  ``seed + 1``, ...), until it has ``n``.
- Some ``/embeddings`` endpoints return one vector per token (``[n_tokens, D]`` for each text, as
  llama.cpp does for a model without a pooling layer) instead of one per text. ``pooling`` says what
  to do: ``"last"`` (the default) keeps the last token's vector, the state after reading the whole
  text, which is what :func:`~reweighting.qprobe.sample_with_features` reads from a local model;
  ``"mean"`` averages the tokens; ``"error"`` refuses token-level embeddings.

Features must not depend on how texts are grouped into requests, and some servers get batches
wrong (llama-cpp-python's ``/embeddings`` returns a correct vector only for the first input of a
batch). ``batch`` says what to do: ``"check"`` (the default) embeds the first batch of two or more
texts both as one request and one text per request, compares the vectors (cosine >= 0.999 and norms
within 1 %), and when they differ warns once and sends one text per request from then on;
``"single"`` always sends one text per request; ``"trust"`` never checks.

The model asked for must be the one that answers: on first use of a model name the client asks
``/models`` and raises when the server lists its models and that name is not among them (a server
that does not list models is not checked), and any reply whose ``model`` field names another model
raises (a dated or numbered snapshot, ``<model>-<digits...>`` such as ``gpt-4o-2024-08-06``, counts
as the same; ``gpt-4o-mini`` for ``gpt-4o`` does not). ``check_model=False`` turns
both checks off.

A server that cannot be reached, times out, drops the connection, or answers something that is not
UTF-8 JSON raises :class:`APIError` naming the URL and what happened.

Credentials never leave the origin of ``base_url``: a redirect to another scheme, host or port is
refused with :class:`RedirectError` before anything is sent there. Redirects within the origin are
followed only when they keep the method and body (HTTP 307 and 308); a 301, 302 or 303, which
would turn the ``POST`` into a ``GET`` without its body, is refused too.
"""

from __future__ import annotations

import http.client
import json
import math
import numbers
import os
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Sequence

import torch

from .features import Samples, check_prompts

__all__ = ["sample_and_embed", "OpenAICompatible", "APIError", "RedirectError", "POOLINGS", "BATCHING"]

POOLINGS = ("last", "mean", "error")
BATCHING = ("check", "single", "trust")
# A batched vector agrees with the same text embedded alone when their cosine is at least this and
# their norms differ by at most NORM_TOLERANCE (relative): room for the float rounding of a batched
# forward, none for another text's vector.
COSINE_AGREEMENT = 0.999
NORM_TOLERANCE = 0.01


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
    check_prompts(prompts)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    from tqdm.auto import tqdm

    completions, features = [], []
    for p, prompt in enumerate(tqdm(prompts, desc="sample and embed", disable=not progress, leave=False)):
        drawn = list(sample(prompt, k))
        if len(drawn) != k:
            raise ValueError(f"sample returned {len(drawn)} completions for prompt {p}, expected k = {k}")
        if not all(isinstance(c, str) for c in drawn):
            raise TypeError(f"sample must return strings; for prompt {p} it returned "
                            f"{sorted({type(c).__name__ for c in drawn})}")
        vectors = torch.as_tensor(embed([join(prompt, c) for c in drawn]), dtype=torch.float32)
        if vectors.dim() != 2 or vectors.shape[0] != k:
            raise ValueError(f"embed returned shape {tuple(vectors.shape)} for prompt {p}, expected [{k}, dim]")
        bad = ~torch.isfinite(vectors).all(dim=1)
        if bool(bad.any()):
            raise ValueError(f"embed returned NaN or infinite values for prompt {p} at completion indices "
                             f"{bad.nonzero().reshape(-1).tolist()}")
        completions.append(drawn)
        features.append(vectors)
    dims = {f.shape[1] for f in features}
    if len(dims) != 1:
        raise ValueError(f"embed returned vectors of different sizes {sorted(dims)}")
    return Samples(prompts=list(prompts), completions=completions, features=torch.stack(features),
                   finish=[["api"] * k for _ in prompts])


def _is_snapshot(answered: str, asked: str) -> bool:
    """Whether ``answered`` is a dated or numbered snapshot of ``asked``: ``asked-`` then a digit
    (``gpt-4o-2024-08-06``, ``gpt-4-0613``); another model of the family (``gpt-4o-mini``) is not."""
    suffix = answered[len(asked) + 1:]
    return answered.startswith(f"{asked}-") and suffix[:1].isdigit()


class APIError(RuntimeError):
    """The server could not be reached or answered something other than the OpenAI API's shapes."""


class RedirectError(APIError):
    """The server answered with a redirect that the client will not follow (see the module docstring)."""


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to the same origin, and only when it keeps the method and body (307, 308)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = urllib.parse.urljoin(req.full_url, newurl)
        fp.read()
        fp.close()
        if _origin(target) != _origin(req.full_url):
            raise RedirectError(
                f"{req.full_url} redirected (HTTP {code}) to {target}, another origin: refused, so that the "
                "API key is not sent there; set base_url to the address that serves the API")
        if code not in (307, 308) and req.get_method() != "GET":
            raise RedirectError(
                f"{req.full_url} redirected (HTTP {code}) to {target}; following it would turn the POST into "
                "a GET without its body: refused; set base_url to the address that serves the API")
        new = urllib.request.Request(target, data=req.data, method=req.get_method(), headers=dict(req.headers))
        for name, value in req.unredirected_hdrs.items():  # the same origin: the key may go along
            new.add_unredirected_header(name, value)
        return new


class OpenAICompatible:
    """Sampler and embedder for an OpenAI-compatible HTTP endpoint.

    ``base_url`` is the API root (e.g. ``http://localhost:8000/v1``); ``model`` the chat model and
    ``embedding_model`` the embedding model. The key is ``api_key`` or the ``OPENAI_API_KEY``
    environment variable (none for a local server). ``seed`` goes with the first request for a
    prompt and ``seed + j`` with its ``j``-th repeat when the server returns fewer than ``n``
    completions (``None``: no seed is sent). ``pooling`` (one of :data:`POOLINGS`) is the rule for
    token-level embeddings, ``batch`` (one of :data:`BATCHING`) whether batched embeddings are
    checked against one text per request, and ``check_model`` whether the model that answers must be
    the one asked for; see the module docstring.
    """

    def __init__(self, base_url: str, model: str, embedding_model: str | None = None, *, api_key: str | None = None,
                 temperature: float = 1.0, max_tokens: int = 256, timeout: float = 60.0, seed: int | None = 0,
                 pooling: str = "last", batch: str = "check", check_model: bool = True):
        if not isinstance(base_url, str) or urllib.parse.urlsplit(base_url).scheme.lower() not in ("http", "https") \
                or not urllib.parse.urlsplit(base_url).hostname:
            raise ValueError(f"base_url must be an http:// or https:// URL with a host, got {base_url!r}")
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty string, got {model!r}")
        if embedding_model is not None and (not isinstance(embedding_model, str) or not embedding_model):
            raise ValueError(f"embedding_model must be a non-empty string or None, got {embedding_model!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if batch not in BATCHING:
            raise ValueError(f"batch must be one of {BATCHING}, got {batch!r}")
        if not isinstance(check_model, bool):
            raise TypeError(f"check_model must be True or False, got {check_model!r}")
        _check_number("temperature", temperature, lambda v: v >= 0, ">= 0")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        _check_number("timeout", timeout, lambda v: v > 0, "> 0 seconds")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.embedding_model = embedding_model or model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.timeout = timeout
        self.seed = seed
        self.pooling = pooling
        self.batch = batch
        self.check_model = check_model
        # None: not yet checked; True: batches agree with one text per request; False: they do not.
        self.batched_embeddings_agree: bool | None = None if batch == "check" else batch == "trust"
        self._listed_models: set[str] | None = None
        self._checked_models: set[str] = set()
        self._opener = urllib.request.build_opener(_SameOriginRedirects())

    def _request(self, path: str, payload: dict | None) -> dict:
        """POST ``payload`` (or GET when it is ``None``) to ``base_url + path``; the decoded JSON reply."""
        url = f"{self.base_url}{path}"
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                         method="GET" if payload is None else "POST")
        if self.api_key:
            # Unredirected: urllib itself never copies it to a redirect target (ours re-adds it only
            # within the origin).
            request.add_unredirected_header("Authorization", f"Bearer {self.api_key}")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            body = err.read()[:500].decode(errors="replace")
            raise APIError(f"{url} answered HTTP {err.code}: {body}") from err
        except urllib.error.URLError as err:
            if isinstance(err.reason, TimeoutError):
                raise APIError(f"{url} did not answer within timeout = {self.timeout} s") from err
            raise APIError(f"could not reach {url}: {err.reason}") from err
        except TimeoutError as err:
            raise APIError(f"{url} did not finish its answer within timeout = {self.timeout} s") from err
        except (http.client.HTTPException, OSError) as err:  # a dropped connection, a broken reply
            raise APIError(f"{url} closed the connection or answered something that is not HTTP: "
                           f"{type(err).__name__}: {err}") from err
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise APIError(f"{url} answered bytes that are not UTF-8 (at byte {err.start}): {raw[:200]!r}") from err
        except json.JSONDecodeError as err:
            raise APIError(f"{url} did not answer JSON: {raw[:200]!r}") from err

    def _post(self, path: str, payload: dict) -> dict:
        return self._request(path, payload)

    def _served_models(self) -> set[str] | None:
        """The model ids ``/models`` lists, or ``None`` when the server lists none (it is then not checked)."""
        if self._listed_models is None:
            try:
                reply = self._request("/models", None)
            except RedirectError:
                raise
            except APIError:
                self._listed_models = set()  # lists none: not asked again
                return None
            data = reply.get("data") if isinstance(reply, dict) else None
            ids = {m.get("id") for m in data if isinstance(m, dict)} if isinstance(data, list) else set()
            self._listed_models = {i for i in ids if isinstance(i, str)}
        return self._listed_models or None

    def _check_model(self, asked: str, reply: dict, path: str) -> None:
        """Raise unless the model that answered is ``asked`` (see the module docstring)."""
        if not self.check_model:
            return
        if asked not in self._checked_models:
            served = self._served_models()
            if served is not None and asked not in served:
                raise APIError(f"{self.base_url} does not serve the model {asked!r}; it lists {sorted(served)}. "
                               "A server may answer an unknown name with its default model: pass one of those "
                               "(or check_model=False)")
            self._checked_models.add(asked)
        answered = reply.get("model") if isinstance(reply, dict) else None
        if isinstance(answered, str) and answered != asked and not _is_snapshot(answered, asked):
            raise APIError(f"{self.base_url}{path} answered with the model {answered!r} when {asked!r} was asked "
                           "for (check_model=False to accept it)")

    def sample(self, prompt: str, n: int) -> list[str]:
        """``n`` chat completions of ``prompt``: one request with ``n``, repeated for the completions
        still missing when the server returns fewer (each repeat with the next seed)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        drawn: list[str] = []
        for attempt in range(n):  # at most n requests: each must return at least one completion
            payload = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "n": n - len(drawn),
                       "temperature": self.temperature, "max_tokens": self.max_tokens}
            if self.seed is not None:
                payload["seed"] = self.seed + attempt
            reply = self._post("/chat/completions", payload)
            self._check_model(self.model, reply, "/chat/completions")
            choices = reply.get("choices") if isinstance(reply, dict) else None
            if not isinstance(choices, list) or not choices:
                raise APIError(f"{self.base_url}/chat/completions answered without completions: "
                                   f"{json.dumps(reply)[:200]}")
            if len(choices) > n - len(drawn):
                raise APIError(f"{self.base_url}/chat/completions returned {len(choices)} completions when "
                                   f"{n - len(drawn)} were asked for")
            try:
                choices = sorted(choices, key=lambda c: c.get("index", 0))
                texts = [c["message"]["content"] for c in choices]
            except (AttributeError, KeyError, TypeError):
                raise APIError(f"{self.base_url}/chat/completions answered choices without message.content: "
                               f"{json.dumps(choices)[:200]}") from None
            if any(t is None for t in texts):  # e.g. a refusal or a tool call: no text to score
                raise APIError(f"{self.base_url}/chat/completions answered message.content null (no text) for "
                               f"choices {[i for i, t in enumerate(texts) if t is None]}: "
                               f"{json.dumps(choices)[:200]}")
            if not all(isinstance(t, str) for t in texts):
                raise APIError(f"{self.base_url}/chat/completions answered a non-text message.content")
            drawn += texts
            if len(drawn) == n:
                break
        return drawn

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Embeddings ``[len(texts), D]`` from ``/embeddings``; token-level ones pooled by ``pooling``.

        With ``batch="check"`` the first call with two or more texts also embeds each text alone and
        compares (module docstring); from a server whose batches disagree, one text per request.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of strings, not a single string" if isinstance(texts, str)
                            else "texts must be a list of strings")
        texts = list(texts)
        if len(texts) < 2 or self.batched_embeddings_agree is False:
            return self._stack([self._embed_request([t]) for t in texts])
        batched = self._embed_request(texts)
        if self.batched_embeddings_agree is None:
            alone = self._stack([self._embed_request([t]) for t in texts])
            disagree = _disagreeing_rows(batched, alone)
            self.batched_embeddings_agree = not disagree
            if disagree:
                warnings.warn(
                    f"{self.base_url}/embeddings gives other vectors for texts sent together than for the same "
                    f"texts sent one at a time (rows {disagree} of the first batch of {len(texts)}): its "
                    "batched embeddings are wrong, so this client now sends one text per request",
                    UserWarning, stacklevel=2)
                return alone
        return batched

    @staticmethod
    def _stack(parts: list[torch.Tensor]) -> torch.Tensor:
        if not parts:
            return torch.zeros(0, 0)
        widths = sorted({p.shape[1] for p in parts})
        if len(widths) > 1:
            raise APIError(f"the embeddings server returned vectors of different sizes {widths}")
        return torch.cat(parts)

    def _embed_request(self, texts: list[str]) -> torch.Tensor:
        """One ``/embeddings`` request for ``texts``: ``[len(texts), D]``."""
        reply = self._post("/embeddings", {"model": self.embedding_model, "input": list(texts)})
        self._check_model(self.embedding_model, reply, "/embeddings")
        data = reply.get("data") if isinstance(reply, dict) else None
        if not isinstance(data, list) or len(data) != len(texts):
            raise APIError(f"{self.base_url}/embeddings returned {len(data) if isinstance(data, list) else 'no'} "
                               f"embeddings for {len(texts)} texts")
        vectors = []
        try:
            items = [torch.tensor(d["embedding"], dtype=torch.float32)
                     for d in sorted(data, key=lambda d: d.get("index", 0))]
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError):
            raise APIError(f"{self.base_url}/embeddings answered data without numeric 'embedding' lists: "
                           f"{json.dumps(data)[:200]}") from None
        for i, v in enumerate(items):
            if v.dim() == 2:  # one vector per token
                if self.pooling == "error":
                    raise APIError(f"{self.base_url}/embeddings returned one vector per token "
                                       f"({tuple(v.shape)}) for text {i}; choose pooling='last' or 'mean'")
                if v.shape[0] == 0:
                    raise APIError(f"{self.base_url}/embeddings returned no token vectors for text {i}")
                v = v[-1] if self.pooling == "last" else v.mean(dim=0)
            elif v.dim() != 1:
                raise APIError(f"{self.base_url}/embeddings returned an embedding of shape {tuple(v.shape)} "
                                   f"for text {i}")
            if v.shape[0] == 0:
                raise APIError(f"{self.base_url}/embeddings returned an empty vector (width 0) for text {i}")
            vectors.append(v)
        if len({v.shape[0] for v in vectors}) > 1:
            raise APIError(f"{self.base_url}/embeddings returned vectors of different sizes "
                               f"{sorted({v.shape[0] for v in vectors})}")
        return torch.stack(vectors)


def _disagreeing_rows(batched: torch.Tensor, alone: torch.Tensor) -> list[int]:
    """Rows where a batched vector is not the same text's vector embedded alone: cosine below
    :data:`COSINE_AGREEMENT` or norms more than :data:`NORM_TOLERANCE` apart (all rows if the widths differ)."""
    if batched.shape != alone.shape:
        return list(range(alone.shape[0]))
    b, a = batched.double(), alone.double()
    nb, na = b.norm(dim=1), a.norm(dim=1)
    cosine = (b * a).sum(dim=1) / (nb * na).clamp_min(1e-300)
    close_norms = (nb - na).abs() <= NORM_TOLERANCE * torch.maximum(nb, na)
    agree = (cosine >= COSINE_AGREEMENT) & close_norms
    return (~agree).nonzero().reshape(-1).tolist()


def _check_number(name: str, value: object, test: Callable[[float], bool], expected: str) -> None:
    """A finite real number (not a bool, not a string) passing ``test``, or an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number {expected}, got {type(value).__name__} {value!r}")
    if not math.isfinite(float(value)) or not test(float(value)):
        raise ValueError(f"{name} must be a finite number {expected}, got {value!r}")
