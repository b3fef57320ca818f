"""The pre-training example under torchrun (2 CPU processes, gloo) gives the single-process losses."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from reweighting.testing import launch

pytestmark = [pytest.mark.distributed]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "pretrain_gpt.py"
TINY = ["--steps", "3", "--batch-size", "8", "--micro-batches", "2", "--seq-len", "32", "--dim", "32",
        "--layers", "1", "--heads", "2", "--max-documents", "20", "--eval-sequences", "8", "--lr", "1e-2"]
CONFIGS = {
    "linupper": ["--reweighter", "linupper", "--accumulation", "global"],
    "quadratic-micro": ["--reweighter", "quadratic", "--accumulation", "micro"],
    "none": ["--reweighter", "none"],
    "presence": ["--reweighter", "presence", "--accumulation", "micro", "--switch-step", "2"],
    # Several documents per row, a different number on each rank: weights over all documents.
    "packed-linupper": ["--reweighter", "linupper", "--accumulation", "global", "--packed"],
    "packed-chunked": ["--reweighter", "quadratic", "--accumulation", "micro", "--packed", "--chunked-loss"],
}


def load_example(path=EXAMPLE):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def single_process(config: str) -> dict:
    example = load_example()
    return example.train(example.parse_args(TINY + CONFIGS[config]))


def assert_same_run(got: dict, want: dict) -> None:
    assert got["world_size"] == 2 and want["world_size"] == 1
    # Same global batches, weights and updates; only the order of floating-point sums differs.
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-4)
    assert got["ess_fraction"] == pytest.approx(want["ess_fraction"], rel=1e-4)
    assert got["heldout_loss"] == pytest.approx(want["heldout_loss"], rel=1e-4)
    assert got["samples_per_step"] == want["samples_per_step"]
    assert got["losses"][-1] < got["losses"][0]  # it trains


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_torchrun_two_processes_equal_one_process(tmp_path):
    out = tmp_path / "run.json"
    proc = torchrun(EXAMPLE, [*TINY, *CONFIGS["linupper"], "--out", str(out)])
    assert "held-out loss" in proc.stdout
    assert_same_run(json.loads(out.read_text()), single_process("linupper"))


@pytest.mark.parametrize("mode", [[], ["--padding-free"]], ids=["rows", "padding-free"])
def test_trainer_under_torchrun_equals_one_process(tmp_path, mode):
    """2 ranks x 4 sequences x 2 micro-batches give the Trainer steps of 1 process x 8 x 2 (weights over all 16).

    Padding-free: each rank's micro-batch is one row of 4 documents, the single process's one row
    of 8; the documents are weighted over both ranks all the same.
    """
    script = ROOT / "examples" / "trainer_reweighting.py"
    common = ["--steps", "2", "--max-documents", "10", "--reweighter", "linupper", "--sampling", "sequential",
              "--dropout", "0", "--accumulation-steps", "2", *mode]
    out = tmp_path / "log.json"
    torchrun(script, [*common, "--batch-size", "4", "--out", str(out)])
    single = load_example(script).main([*common, "--batch-size", "8"])
    got, want = ([h for h in log if "loss" in h] for log in (json.loads(out.read_text()), single))
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert g["weights/n"] == w["weights/n"] == 16
        assert g["weights/documents_per_step"] == w["weights/documents_per_step"] == 16
        for key in ("loss", "grad_norm", "weights/ess", "weights/max_min_ratio"):
            assert g[key] == pytest.approx(w[key], rel=1e-5), key


def _run_configs(rank, world, configs):
    example = load_example()
    return {c: example.train(example.parse_args(TINY + CONFIGS[c])) for c in configs}


def test_every_reweighter_on_two_gloo_processes_equals_one_process():
    configs = ["none", "quadratic-micro", "presence", "packed-linupper", "packed-chunked"]
    results = launch(_run_configs, 2, configs, timeout=300)
    for config in configs:
        want = single_process(config)
        for per_rank in results:
            assert_same_run(per_rank[config], want)


def test_packed_mode_weights_documents_not_rows():
    """--packed: more samples than rows per step, and the documents' losses differ from the rows' run."""
    packed, rows = single_process("packed-linupper"), single_process("linupper")
    assert all(n >= 8 for n in packed["samples_per_step"]) and max(packed["samples_per_step"]) > 8
    assert rows["samples_per_step"] == [8, 8, 8]
    assert packed["losses"][-1] < packed["losses"][0]
    example = load_example()
    with pytest.raises(ValueError, match="PRESENCE"):
        example.train(example.parse_args(TINY + ["--reweighter", "presence", "--packed"]))


def test_chunked_loss_gives_the_plain_run():
    """--chunked-loss (no [B, T, V] logits) trains exactly like the plain cross-entropy (packed rows here)."""
    example = load_example()
    flags = TINY + CONFIGS["packed-linupper"]
    plain = example.train(example.parse_args(flags))
    chunked = example.train(example.parse_args(flags + ["--chunked-loss", "--chunk-tokens", "7"]))
    assert chunked["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    assert chunked["heldout_loss"] == pytest.approx(plain["heldout_loss"], rel=1e-5)
    assert chunked["ess_fraction"] == pytest.approx(plain["ess_fraction"], rel=1e-5)
    with pytest.raises(ValueError, match="PRESENCE"):
        example.train(example.parse_args(TINY + ["--reweighter", "presence", "--chunked-loss"]))

