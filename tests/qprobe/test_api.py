import contextlib
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from reweighting.qprobe.api import OpenAICompatible, sample_and_embed


def _vector(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [b / 255 for b in digest[:8]]


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, self.headers.get("Authorization"), body))
        if self.path == "/v1/chat/completions":
            prompt = body["messages"][-1]["content"]
            # Choices deliberately out of order: the client must sort them by index.
            choices = [{"index": i, "message": {"role": "assistant", "content": f"{prompt} answer {i}"}}
                       for i in reversed(range(body["n"]))]
            reply = {"choices": choices}
        elif self.path == "/v1/embeddings":
            reply = {"data": [{"index": i, "embedding": _vector(t)} for i, t in enumerate(body["input"])]}
        else:
            self.send_error(404, "no such endpoint")
            return
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextlib.contextmanager
def loopback_server(lifetime: float = 60.0):
    """An OpenAI-like server on 127.0.0.1 (only), stopped on exit or after ``lifetime`` seconds."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.requests = []
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
        paths = [p for p, _, _ in server.requests]
        assert paths == ["/v1/chat/completions", "/v1/embeddings"] * 2
        assert all(auth == "Bearer sk-test" for _, auth, _ in server.requests)
        assert server.requests[0][2]["n"] == 3 and server.requests[1][2]["model"] == "embed-model"
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
