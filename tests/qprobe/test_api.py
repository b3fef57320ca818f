import contextlib
import hashlib
import json
import socketserver
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from reweighting.qprobe.api import OpenAICompatible, RedirectError, sample_and_embed


def _vector(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [b / 255 for b in digest[:8]]


class _Handler(BaseHTTPRequestHandler):
    """OpenAI-like endpoints. Server flags reproduce real servers: ``ignore_n`` answers one completion
    per request, "<prompt> answer <seed>" (llama.cpp's server, Ollama); ``token_embeddings`` returns
    ``[n_tokens, 8]`` per text (llama.cpp without pooling); ``batch_fault`` gives the right vector
    only for the first text of a batch and, for the others, vectors read from the wrong place
    (llama-cpp-python's batched ``/embeddings``); ``models`` is the list ``GET /v1/models`` answers
    (``None``: 404, a server that lists none); ``reply_model`` the ``model`` field of every reply
    (``None``: none); ``redirects`` maps a path (GET or POST) to ``(status, location)``."""

    def log_message(self, *args):  # keep test output quiet
        pass

    def _answer(self, reply: dict) -> None:
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _redirect(self) -> bool:
        if self.path not in self.server.redirects:
            return False
        code, location = self.server.redirects[self.path]
        self.send_response(code)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()
        return True

    def do_GET(self):
        self.server.requests.append((self.path, self.headers.get("Authorization"), None, "GET"))
        if self._redirect():
            return
        if self.path == "/v1/models" and self.server.models is not None:
            self._answer({"object": "list", "data": [{"id": m, "object": "model"} for m in self.server.models]})
        else:
            self.send_error(404, "no such endpoint")

    def _answer_as_model(self, reply: dict) -> None:
        if self.server.reply_model is not None:
            reply["model"] = self.server.reply_model
        self._answer(reply)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, self.headers.get("Authorization"), body, "POST"))
        if self._redirect():
            return
        if self.path == "/v1/chat/completions":
            prompt = body["messages"][-1]["content"]
            if self.server.ignore_n:
                choices = [{"index": 0, "message": {"role": "assistant",
                                                    "content": f"{prompt} answer {body.get('seed', 0)}"}}]
            else:
                # Choices deliberately out of order: the client must sort them by index.
                choices = [{"index": i, "message": {"role": "assistant", "content": f"{prompt} answer {i}"}}
                           for i in reversed(range(body["n"]))]
            self._answer_as_model({"choices": choices})
        elif self.path == "/v1/embeddings":
            if self.server.token_embeddings:
                data = [{"index": i, "embedding": _token_vectors(t)} for i, t in enumerate(body["input"])]
            else:
                data = [{"index": i, "embedding": _vector(t)} for i, t in enumerate(body["input"])]
            if self.server.batch_fault:
                texts = body["input"]
                for i in range(1, len(texts)):  # an offset that advanced by too little: another place's floats
                    data[i]["embedding"] = _vector(f"{texts[0]}|offset {i}")
            self._answer_as_model({"data": data})
        else:
            self.send_error(404, "no such endpoint")


def _token_vectors(text: str) -> list[list[float]]:
    """One vector per whitespace-separated word (a stand-in for tokens)."""
    return [_vector(" ".join(text.split()[: i + 1])) for i in range(len(text.split()))]


@contextlib.contextmanager
def loopback_server(lifetime: float = 60.0, *, ignore_n: bool = False, token_embeddings: bool = False,
                    batch_fault: bool = False, models: list[str] | None = None, reply_model: str | None = None):
    """An OpenAI-like server on 127.0.0.1 (only), stopped on exit or after ``lifetime`` seconds."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.requests = []
    server.ignore_n = ignore_n
    server.token_embeddings = token_embeddings
    server.batch_fault = batch_fault
    server.models = models
    server.reply_model = reply_model
    server.redirects = {}
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(lifetime, server.shutdown)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield server
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_openai_compatible_over_http():
    with loopback_server() as server:
        host, port = server.server_address
        assert host == "127.0.0.1"
        client = OpenAICompatible(f"http://127.0.0.1:{port}/v1", "chat-model", "embed-model", api_key="sk-test")
        samples = sample_and_embed(["two plus two", "three"], client.sample, client.embed, k=3, progress=False)
        assert samples.completions[0] == [f"two plus two answer {i}" for i in range(3)]
        assert samples.features.shape == (2, 3, 8)
        expected = torch.tensor(_vector("three\n\nthree answer 2"))
        torch.testing.assert_close(samples.features[1, 2], expected)
        paths = [p for p, _, _, _ in server.requests]
        # the models are looked up once; the first batch is checked against one text per request
        assert paths == ["/v1/chat/completions", "/v1/models", "/v1/embeddings", *["/v1/embeddings"] * 3,
                         "/v1/chat/completions", "/v1/embeddings"]
        assert [len(body["input"]) for p, _, body, _ in server.requests if p == "/v1/embeddings"] == [3, 1, 1, 1, 3]
        assert client.batched_embeddings_agree is True
        assert all(auth == "Bearer sk-test" for _, auth, _, _ in server.requests)
        assert server.requests[0][2]["n"] == 3 and server.requests[2][2]["model"] == "embed-model"
        with pytest.raises(RuntimeError, match="HTTP 404"):
            client._post("/missing", {})


def test_sample_and_embed_with_plain_callables_checks_shapes():
    def sample(prompt, n):
        return [prompt * (i + 1) for i in range(n)]

    def embed(texts):
        return [[len(t), 1.0] for t in texts]

    samples = sample_and_embed(["ab"], sample, embed, k=2, progress=False)
    assert samples.features.tolist() == [[[6.0, 1.0], [8.0, 1.0]]]
    with pytest.raises(ValueError, match="expected k = 3"):
        sample_and_embed(["ab"], lambda p, n: ["x"], embed, k=3, progress=False)


def _client(server, path="/v1", model="m", **kwargs):
    kwargs.setdefault("check_model", False)  # the model checks have their own tests
    return OpenAICompatible(f"http://127.0.0.1:{server.server_address[1]}{path}", model, api_key="sk-secret", **kwargs)


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_cross_origin_redirects_are_refused_and_the_key_stays_home(code):
    with loopback_server() as home, loopback_server() as elsewhere:
        target = f"http://127.0.0.1:{elsewhere.server_address[1]}/v1/chat/completions"
        home.redirects["/r/chat/completions"] = (code, target)
        with pytest.raises(RedirectError, match=f"HTTP {code}.*another origin"):
            _client(home, "/r").sample("hi", 2)
        assert elsewhere.requests == []  # nothing at all reached the other origin, let alone the key
        # "localhost" is another origin than "127.0.0.1", even on the same port
        port = home.server_address[1]
        home.redirects["/r/embeddings"] = (code, f"http://localhost:{port}/v1/embeddings")
        with pytest.raises(RedirectError, match="another origin"):
            _client(home, "/r").embed(["x"])
        assert [p for p, _, _, _ in home.requests] == ["/r/chat/completions", "/r/embeddings"]


def test_same_origin_redirects_keep_post_only_with_307_and_308():
    with loopback_server() as server:
        port = server.server_address[1]
        server.redirects["/old/chat/completions"] = (307, "/v1/chat/completions")  # relative Location
        server.redirects["/old/embeddings"] = (308, f"http://127.0.0.1:{port}/v1/embeddings")
        client = _client(server, "/old")
        assert client.sample("q", 2) == ["q answer 0", "q answer 1"]
        assert client.embed(["a"]).shape == (1, 8)
        followed = [(p, auth, method) for p, auth, _, method in server.requests]
        assert followed == [("/old/chat/completions", "Bearer sk-secret", "POST"),
                            ("/v1/chat/completions", "Bearer sk-secret", "POST"),
                            ("/old/embeddings", "Bearer sk-secret", "POST"),
                            ("/v1/embeddings", "Bearer sk-secret", "POST")]
        assert server.requests[1][2]["messages"][0]["content"] == "q"  # the body went along
        for code in (301, 302, 303):
            server.requests.clear()
            server.redirects["/moved/chat/completions"] = (code, "/v1/chat/completions")
            with pytest.raises(RedirectError, match=f"HTTP {code}.*POST into a GET"):
                _client(server, "/moved").sample("q", 1)
            assert [p for p, _, _, _ in server.requests] == ["/moved/chat/completions"]


def test_server_that_ignores_n_is_asked_again_with_distinct_seeds():
    with loopback_server(ignore_n=True) as server:
        client = _client(server, seed=10)
        assert client.sample("p", 3) == ["p answer 10", "p answer 11", "p answer 12"]
        sent = [body for _, _, body, _ in server.requests]
        assert [b["seed"] for b in sent] == [10, 11, 12] and [b["n"] for b in sent] == [3, 2, 1]
        samples = sample_and_embed(["a", "b"], _client(server).sample, _client(server).embed, k=4, progress=False)
        assert samples.completions[1] == [f"b answer {i}" for i in range(4)]
        server.requests.clear()
        assert _client(server, seed=None).sample("p", 2) == ["p answer 0", "p answer 0"]
        assert all("seed" not in body for _, _, body, _ in server.requests)


def test_token_level_embeddings_are_pooled_by_the_chosen_rule():
    texts = ["one two three", "four five"]
    with loopback_server(token_embeddings=True) as server:
        last = _client(server).embed(texts)  # the default
        mean = _client(server, pooling="mean").embed(texts)
        tokens = [torch.tensor(_token_vectors(t)) for t in texts]
        torch.testing.assert_close(last, torch.stack([t[-1] for t in tokens]))
        torch.testing.assert_close(mean, torch.stack([t.mean(0) for t in tokens]))
        torch.testing.assert_close(last[0], torch.tensor(_vector("one two three")))
        with pytest.raises(RuntimeError, match="one vector per token.*pooling"):
            _client(server, pooling="error").embed(texts)
    with pytest.raises(ValueError, match="pooling must be one of"):
        OpenAICompatible("http://127.0.0.1:1/v1", "m", pooling="max")


def test_llamacpp_example_runs_against_a_server_that_behaves_like_llamacpp():
    import importlib.util
    import pathlib
    import runpy

    script = pathlib.Path(__file__).parents[2] / "examples" / "qprobe_llamacpp.py"
    main = runpy.run_path(str(script))["main"]
    with loopback_server(ignore_n=True, token_embeddings=True) as server:
        base = f"http://127.0.0.1:{server.server_address[1]}/v1"
        assert main(["--api-base", base, "--questions", "6", "--k", "3"]) == 0
        chats = [body for path, _, body, _ in server.requests if path.endswith("/chat/completions")]
        assert len(chats) == 6 * 3 and [b["seed"] for b in chats[:3]] == [0, 1, 2]
    if importlib.util.find_spec("llama_cpp") is None:
        assert main([]) == 1  # says what is missing instead of failing later


def test_malformed_replies_are_clear_errors():
    from reweighting.qprobe import APIError

    with loopback_server() as server:
        client = _client(server)
        for reply, words in [({"choices": [{"index": 0}]}, "message.content"), ({"oops": 1}, "without completions"),
                             ({"choices": [{"message": {"content": 3}}]}, "non-text")]:
            client._post = lambda path, payload, reply=reply: reply
            with pytest.raises(APIError, match=words):
                client.sample("p", 1)
        for reply, words in [({"data": [{"index": 0, "vector": [1.0]}]}, "numeric 'embedding'"),
                             ({"data": [{"embedding": ["a"]}]}, "numeric 'embedding'"),
                             ({"data": []}, "returned 0 embeddings for 1 texts")]:
            client._post = lambda path, payload, reply=reply: reply
            with pytest.raises(APIError, match=words):
                client.embed(["x"])


def test_batched_embedding_fault_is_caught_on_first_use_and_the_client_falls_back_once():
    texts = ["q\n\nfirst answer", "q\n\nsecond answer", "q\n\nthird answer"]
    alone = torch.tensor([_vector(t) for t in texts])
    with loopback_server(batch_fault=True) as server:
        trusting = _client(server, batch="trust")
        wrong = trusting.embed(texts)  # the fault as a client that trusts batches sees it
        torch.testing.assert_close(wrong[0], alone[0])
        assert not torch.allclose(wrong[1:], alone[1:])
        server.requests.clear()
        client = _client(server)
        with pytest.warns(UserWarning, match=r"rows \[1, 2\] of the first batch of 3.*one text per request"):
            first = client.embed(texts)
        torch.testing.assert_close(first, alone)
        assert client.batched_embeddings_agree is False
        server.requests.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once, not again
            second = client.embed(texts[::-1])
        torch.testing.assert_close(second, alone.flip(0))
        assert [len(body["input"]) for _, _, body, _ in server.requests] == [1, 1, 1]


def test_features_from_a_server_with_the_batch_fault_equal_one_text_per_request():
    with loopback_server(batch_fault=True, ignore_n=True) as server:
        client = _client(server)
        with pytest.warns(UserWarning, match="one text per request"):
            samples = sample_and_embed(["two", "three"], client.sample, client.embed, k=4, progress=False)
        expected = torch.tensor([[_vector(f"{p}\n\n{c}") for c in drawn]
                                 for p, drawn in zip(samples.prompts, samples.completions)])
        torch.testing.assert_close(samples.features, expected)
        single = _client(server, batch="single")
        server.requests.clear()
        torch.testing.assert_close(single.embed(["a", "b"]), torch.tensor([_vector("a"), _vector("b")]))
        assert [len(body["input"]) for _, _, body, _ in server.requests] == [1, 1]


def test_a_healthy_server_keeps_batches_after_the_check():
    with loopback_server() as server:
        client = _client(server)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            client.embed(["a", "b"])
            server.requests.clear()
            client.embed(["c", "d", "e"])
        assert [len(body["input"]) for _, _, body, _ in server.requests] == [3]
        assert client.batched_embeddings_agree is True


def test_disagreement_rule_on_cosine_and_norm():
    from reweighting.qprobe.api import _disagreeing_rows

    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [1.0, 1.0]])
    rotated = torch.tensor([[0.9995, 0.0316], [0.0, 2.0], [3.0, 4.0], [1.0, 1.0]])  # cosine 0.9995: agrees
    assert _disagreeing_rows(rotated, a) == []
    assert _disagreeing_rows(torch.tensor([[0.99, 0.141], [0.0, 2.0], [3.0, 4.0], [1.0, 1.0]]), a) == [0]
    scaled = a.clone()
    scaled[2] *= 1.02  # same direction, norms 2 % apart
    assert _disagreeing_rows(scaled, a) == [2]
    scaled[2] = a[2] * 1.009
    assert _disagreeing_rows(scaled, a) == []
    assert _disagreeing_rows(a[:, :1], a) == [0, 1, 2, 3]


def test_the_model_asked_for_must_be_the_one_that_answers():
    with loopback_server(models=["served-model"]) as server:
        with pytest.raises(RuntimeError, match=r"does not serve the model 'typo'.*\['served-model'\]"):
            _client(server, check_model=True, model="typo").sample("q", 1)
        with pytest.raises(RuntimeError, match="does not serve the model 'typo'"):
            OpenAICompatible(f"http://127.0.0.1:{server.server_address[1]}/v1", "served-model", "typo").embed(["a"])
        assert _client(server, check_model=True, model="served-model").sample("q", 1) == ["q answer 0"]
        assert _client(server, model="typo").sample("q", 1) == ["q answer 0"]  # check_model=False
    with loopback_server(reply_model="the-default") as server:  # lists no models, but names the one that answered
        with pytest.raises(RuntimeError, match="answered with the model 'the-default' when 'm' was asked"):
            _client(server, check_model=True).embed(["a"])
    with loopback_server(reply_model="m-2024-08-06") as server:  # a dated snapshot of the model asked for
        assert _client(server, check_model=True).sample("q", 1) == ["q answer 0"]


class _BrokenHandler(socketserver.StreamRequestHandler):
    def handle(self):
        self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        mode = self.server.mode
        if mode == "drop":
            return  # closes the connection without a word
        if mode == "slow":
            time.sleep(1.5)
        body = {"utf8": b'{"data": "\xff\xfe"}', "html": b"<html>502 Bad Gateway</html>"}.get(mode, b'{"data": []}')
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)


@pytest.mark.parametrize("mode, words", [("utf8", "not UTF-8"), ("drop", "closed the connection"),
                                         ("slow", "within timeout = 0.3 s"), ("html", "did not answer JSON")])
def test_a_broken_server_gives_an_api_error_naming_the_url(mode, words):
    from reweighting.qprobe import APIError

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _BrokenHandler)
    server.daemon_threads = True
    server.mode = mode
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        client = OpenAICompatible(url, "m", timeout=0.3, check_model=False)
        with pytest.raises(APIError, match=words) as info:
            client.embed(["a"])
        assert f"{url}/embeddings" in str(info.value)
    finally:
        server.shutdown()
        server.server_close()


def test_empty_vectors_and_null_content_are_errors():
    from reweighting.qprobe import APIError

    client = OpenAICompatible("http://127.0.0.1:9/v1", "m", check_model=False)
    client._post = lambda path, payload: {"data": [{"index": 0, "embedding": []}]}
    with pytest.raises(APIError, match="empty vector .width 0. for text 0"):
        client.embed(["a"])
    client._post = lambda path, payload: {"choices": [{"index": 0, "message": {"content": None}}]}
    with pytest.raises(APIError, match="message.content null"):
        client.sample("p", 1)
