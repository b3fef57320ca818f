"""Behaviour of reweighting/qprobe/api.py that test_api.py left open to a one-line mistake (found by
mutating the module): the validation of every setting, where the key comes from, origins and GET
redirects, timeouts and unreachable servers, the model-name rule, replies with too few or too many
items, out-of-order and ragged embeddings, and the exact edges of the batch-agreement rule."""

import socket
import urllib.error

import pytest
import torch

from reweighting.qprobe.api import (
    APIError,
    OpenAICompatible,
    RedirectError,
    _disagreeing_rows,
    _origin,
    sample_and_embed,
)

from .test_api import _client, loopback_server

NAN, INF = float("nan"), float("inf")
NOWHERE = "http://127.0.0.1:9/v1"  # never contacted: the tests below replace _post or _opener


def _sample(prompt, n):
    return [f"{prompt}{i}" for i in range(n)]


def _flat(texts):
    return [[1.0, 2.0] for _ in texts]


def _offline(**kwargs):
    kwargs.setdefault("check_model", False)
    client = OpenAICompatible(NOWHERE, "m", **kwargs)

    def no_request(path, payload):
        raise AssertionError(f"no request expected, got {path}")

    client._post = no_request
    return client


# --- sample_and_embed


def test_sample_and_embed_k_must_be_an_integer_not_a_bool():
    with pytest.raises(ValueError, match="k must be an integer"):
        sample_and_embed(["a"], _sample, _flat, True, progress=False)


def test_sample_and_embed_refuses_more_completions_than_k():
    with pytest.raises(ValueError, match="sample returned 3 completions for prompt 0, expected k = 2"):
        sample_and_embed(["a"], lambda p, n: ["x", "y", "z"], _flat, 2, progress=False)


def test_sample_and_embed_names_every_row_with_a_nan_or_inf_anywhere():
    with pytest.raises(ValueError, match=r"prompt 0 at completion indices \[1, 2\]"):
        sample_and_embed(["a"], _sample, lambda t: [[1.0, 2.0], [1.0, NAN], [INF, 0.0]], 3, progress=False)


def test_sample_and_embed_refuses_widths_that_change_between_prompts():
    widths = iter([2, 3])

    def embed(texts):
        width = next(widths)
        return [[1.0] * width for _ in texts]

    with pytest.raises(ValueError, match=r"vectors of different sizes \[2, 3\]"):
        sample_and_embed(["a", "b"], _sample, embed, 2, progress=False)


# --- settings


@pytest.mark.parametrize("kwargs, error, word", [
    (dict(base_url="ftp://127.0.0.1/v1"), ValueError, "base_url"),  # a host, but not HTTP
    (dict(base_url="http:///v1"), ValueError, "base_url"),  # HTTP, but no host
    (dict(max_tokens=True), ValueError, "max_tokens"),
    (dict(seed=True), ValueError, "seed"),
    (dict(timeout=INF), ValueError, "timeout"),
    (dict(temperature=INF), ValueError, "temperature"),
    (dict(timeout=True), TypeError, "timeout"),
    (dict(temperature=False), TypeError, "temperature"),
], ids=["ftp", "no host", "max_tokens bool", "seed bool", "timeout inf", "temperature inf", "timeout bool",
        "temperature bool"])
def test_client_refuses_bad_settings(kwargs, error, word):
    kwargs = {"base_url": NOWHERE, "model": "m", **kwargs}
    with pytest.raises(error, match=word):
        OpenAICompatible(**kwargs)


def test_n_must_be_an_integer_not_a_bool():
    with pytest.raises(ValueError, match="n must be an integer"):
        _offline().sample("a", True)


def test_temperature_zero_and_an_upper_case_scheme_are_allowed():
    with loopback_server() as server:
        assert _client(server, temperature=0).sample("q", 1) == ["q answer 0"]
        assert server.requests[0][2]["temperature"] == 0
    assert OpenAICompatible("HTTPS://example.com/v1", "m").base_url == "HTTPS://example.com/v1"


def test_the_key_is_openai_api_key_unless_one_is_given_and_an_empty_one_sends_none(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    with loopback_server() as server:
        base = f"http://127.0.0.1:{server.server_address[1]}/v1"
        for key in (None, "sk-given", ""):
            OpenAICompatible(base, "m", api_key=key, check_model=False).sample("q", 1)
        assert [auth for _, auth, _, _ in server.requests] == ["Bearer sk-env", "Bearer sk-given", None]


def test_a_trailing_slash_in_base_url_is_dropped():
    with loopback_server() as server:
        client = _client(server, "/v1/")
        assert client.sample("q", 1) == ["q answer 0"] and client.embed(["a"]).shape == (1, 8)
        assert [p for p, _, _, _ in server.requests] == ["/v1/chat/completions", "/v1/embeddings"]


# --- origins and redirects


def test_an_origin_is_scheme_host_and_port_with_the_default_port_filled_in():
    assert _origin("http://Example.COM/v1") == _origin("HTTP://example.com:80/x") == ("http", "example.com", 80)
    assert _origin("https://example.com/v1") == _origin("https://example.com:443/v1") == ("https", "example.com", 443)
    assert _origin("http://example.com:8000/") != _origin("https://example.com:8000/")


def test_a_redirect_to_https_on_the_same_host_and_port_is_another_origin():
    with loopback_server() as server:
        port = server.server_address[1]
        server.redirects["/r/embeddings"] = (307, f"https://127.0.0.1:{port}/v1/embeddings")
        with pytest.raises(RedirectError, match="another origin"):
            _client(server, "/r").embed(["x"])
        assert [p for p, _, _, _ in server.requests] == ["/r/embeddings"]


def test_the_models_lookup_follows_a_same_origin_get_redirect():
    with loopback_server(models=["m"]) as server:
        server.redirects["/old/models"] = (301, "/v1/models")  # a GET keeps its meaning under 301
        server.redirects["/old/chat/completions"] = (307, "/v1/chat/completions")
        assert _client(server, "/old", check_model=True).sample("q", 1) == ["q answer 0"]
        with pytest.raises(APIError, match=r"does not serve the model 'typo'.*\['m'\]"):
            _client(server, "/old", model="typo", check_model=True).sample("q", 1)
        assert ("/v1/models", "Bearer sk-secret", None, "GET") in server.requests


def test_a_cross_origin_redirect_of_the_models_lookup_is_refused_not_taken_for_no_list():
    with loopback_server() as home, loopback_server(models=["m"]) as elsewhere:
        home.redirects["/v1/models"] = (302, f"http://127.0.0.1:{elsewhere.server_address[1]}/v1/models")
        with pytest.raises(RedirectError, match="another origin"):
            _client(home, check_model=True).sample("q", 1)
        assert elsewhere.requests == []


# --- transport errors


def test_a_timeout_before_any_reply_names_the_url_and_the_timeout():
    client = _offline(timeout=0.5)

    class TimedOut:  # what urllib raises when connecting or sending times out
        def open(self, request, timeout):
            assert timeout == 0.5
            raise urllib.error.URLError(TimeoutError("timed out"))

    client._opener = TimedOut()
    with pytest.raises(APIError, match=f"^{NOWHERE}/models did not answer within timeout = 0.5 s"):
        client._request("/models", None)


def test_an_unreachable_server_is_an_api_error_naming_the_url():
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # closed below: nothing listens there
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(APIError, match="could not reach") as info:
        OpenAICompatible(url, "m", check_model=False).embed(["a"])
    assert f"{url}/embeddings" in str(info.value)


# --- the model that answers


@pytest.mark.parametrize("answered", ["m2", "m-mini", "m-", "mx-2024"])
def test_a_longer_model_name_is_another_model_only_a_numbered_suffix_is_a_snapshot(answered):
    with loopback_server(reply_model=answered) as server:
        with pytest.raises(APIError, match=f"answered with the model '{answered}' when 'm' was asked"):
            _client(server, check_model=True).sample("q", 1)
    with loopback_server(reply_model="m-0613") as server:
        assert _client(server, check_model=True).sample("q", 1)


# --- replies


@pytest.mark.parametrize("choices, n, words", [
    ([], 1, "without completions"),
    ([{"index": i, "message": {"content": str(i)}} for i in range(3)], 2, "returned 3 completions when 2 were asked"),
], ids=["none", "too many"])
def test_chat_replies_with_no_or_too_many_completions_are_errors(choices, n, words):
    client = _offline()
    client._post = lambda path, payload: {"choices": choices}
    with pytest.raises(APIError, match=words):
        client.sample("p", n)


def test_embed_refuses_texts_that_are_not_strings():
    with pytest.raises(TypeError, match="texts must be a list of strings"):
        _offline().embed(["a", 1])


def test_embedding_no_texts_sends_no_request():
    assert _offline().embed([]).shape[0] == 0


def test_embeddings_are_put_in_index_order():
    client = _offline(batch="trust")
    client._post = lambda path, payload: {"data": [{"index": 1, "embedding": [0.0, 1.0]},
                                                   {"index": 0, "embedding": [1.0, 0.0]}]}
    assert client.embed(["a", "b"]).tolist() == [[1.0, 0.0], [0.0, 1.0]]


@pytest.mark.parametrize("embedding, shape", [(3.0, r"\(\)"), ([[[1.0, 2.0]]], r"\(1, 1, 2\)")], ids=["scalar", "3-d"])
def test_an_embedding_that_is_neither_a_vector_nor_token_vectors_is_an_error(embedding, shape):
    client = _offline()
    client._post = lambda path, payload: {"data": [{"index": 0, "embedding": embedding}]}
    with pytest.raises(APIError, match=f"embedding of shape {shape} for text 0"):
        client.embed(["a"])


def test_ragged_embeddings_in_one_reply_are_an_api_error():
    client = _offline(batch="trust")
    client._post = lambda path, payload: {"data": [{"index": 0, "embedding": [1.0, 2.0]},
                                                   {"index": 1, "embedding": [1.0, 2.0, 3.0]}]}
    with pytest.raises(APIError, match=r"different sizes \[2, 3\]"):
        client.embed(["a", "b"])


def test_ragged_embeddings_across_requests_are_an_api_error():
    client = _offline(batch="single")
    client._post = lambda path, payload: {"data": [{"index": 0, "embedding": [1.0] * len(payload["input"][0])}]}
    with pytest.raises(APIError, match=r"different sizes \[1, 2\]"):
        client.embed(["a", "bb"])


# --- the batch-agreement rule at its edges


def test_agreement_thresholds_are_inclusive_and_a_norm_gap_counts_either_way():
    # |b| = 1000 exactly (999² + 43² + 11² + 5² + 2² = 1000²), so the cosine is exactly 0.999
    assert _disagreeing_rows(torch.tensor([[999.0, 43, 11, 5, 2]]), torch.tensor([[1000.0, 0, 0, 0, 0]])) == []
    # norms 99 and 100: exactly 1 % of the larger apart, whichever is batched
    assert _disagreeing_rows(torch.tensor([[99.0, 0]]), torch.tensor([[100.0, 0]])) == []
    assert _disagreeing_rows(torch.tensor([[100.0, 0]]), torch.tensor([[99.0, 0]])) == []
    # a batched vector 2 % shorter than the same text alone disagrees, as a 2 % longer one does
    assert _disagreeing_rows(torch.tensor([[98.0, 0]]), torch.tensor([[100.0, 0]])) == [0]
