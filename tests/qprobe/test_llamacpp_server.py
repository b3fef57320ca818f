"""Against a real llama.cpp server (llama-cpp-python's, serving the bundled SmolLM2 GGUF file): the
features the client returns are the ones each text gets when embedded alone, whatever the server's
batched ``/embeddings`` does, and the example's whole workflow runs.

``make test`` installs ``llama-cpp-python[server]`` (it compiles llama.cpp once; pip keeps the wheel),
so this test runs there; elsewhere it is skipped when the package is absent.
"""

import pathlib
import runpy
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test installs it)")
pytest.importorskip("fastapi", reason="llama-cpp-python's server extra is not installed")

from reweighting.qprobe import OpenAICompatible  # noqa: E402
from reweighting.qprobe.smollm2 import gguf_path  # noqa: E402

EXAMPLE = pathlib.Path(__file__).parents[2] / "examples" / "qprobe_llamacpp.py"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def example():
    return runpy.run_path(str(EXAMPLE))


@pytest.fixture(scope="module")
def server(example):
    try:
        gguf = gguf_path()
    except RuntimeError as err:
        pytest.skip(str(err))
    port = example["free_port"]()
    base = f"http://127.0.0.1:{port}/v1"
    process = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                                "--port", str(port), "--embedding", "true", "--n_ctx", "2048",
                                "--model_alias", "smollm2", "--n_threads", "1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        example["wait_until_up"](base, process, 180.0)
        yield base
    finally:
        example["stop"](process)


def test_features_from_a_real_server_equal_one_text_per_request(server):
    client = OpenAICompatible(server, "smollm2", max_tokens=8, seed=0)
    prompt = "What is two plus three? Answer with the number."
    completions = client.sample(prompt, 4)
    assert len(completions) == 4 and all(isinstance(c, str) for c in completions)
    texts = [f"{prompt}\n\n{c}" for c in completions] + [f"{prompt}\n\nfive", f"{prompt}\n\nThe answer is 5."]
    alone = OpenAICompatible(server, "smollm2", batch="single").embed(texts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checked = client.embed(texts)
    assert checked.shape == alone.shape and checked.shape[1] == 576  # SmolLM2-135M's width
    torch.testing.assert_close(checked, alone, rtol=1e-4, atol=1e-4)
    # What a client that trusts batches would have been given: where the server's batches are wrong
    # (llama-cpp-python 0.3.x returns the right vector for the first text only), the checking client
    # must have said so once and fallen back.
    trusted = OpenAICompatible(server, "smollm2", batch="trust").embed(texts)
    batches_wrong = not torch.allclose(trusted, alone, rtol=1e-3, atol=1e-3)
    fallbacks = [w for w in caught if "one text per request" in str(w.message)]
    assert len(fallbacks) == (1 if batches_wrong else 0)
    assert client.batched_embeddings_agree is (not batches_wrong)


def test_the_example_workflow_runs_against_the_real_server(example, server, capsys):
    assert example["main"](["--api-base", server, "--questions", "6", "--k", "3", "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "6 questions x 3 completions" in out and "features (6, 3, 576)" in out
