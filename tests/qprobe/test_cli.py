import json

import pyarrow.parquet as pq
import pytest

from reweighting.cli import main
from reweighting.qprobe import QProbe

from .test_api import loopback_server


@pytest.mark.parametrize("llamacpp_like", [False, True])
def test_cli_sample_train_select_evaluate_over_an_api(tmp_path, capsys, llamacpp_like):
    prompts = tmp_path / "prompts.jsonl"
    # The loopback server answers "<prompt> answer <i>" for i = 0..k-1: sample 1 is the right one.
    prompts.write_text("".join(json.dumps({"prompt": f"question {p}", "answer": 1}) + "\n" for p in range(6)))
    out = tmp_path / "run"
    # llama.cpp-like: the server ignores n (so the client repeats with seeds 0..3) and embeds per token.
    with loopback_server(ignore_n=llamacpp_like, token_embeddings=llamacpp_like) as server:
        port = server.server_address[1]
        assert main(["qprobe", "sample", "--model", "m", "--api-base", f"http://127.0.0.1:{port}/v1",
                     "--prompts", str(prompts), "--k", "4", "--out", str(out)]) == 0
    samples, features = str(out / "samples.parquet"), str(out / "features.safetensors")
    table = pq.read_table(samples).to_pydict()
    assert len(table["completion"]) == 24
    assert table["reward"] == [float(i == 1) for _ in range(6) for i in range(4)]
    probe = tmp_path / "probe.safetensors"
    assert main(["qprobe", "train", "--samples", samples, "--features", features, "--out", str(probe),
                 "--epochs", "3", "--lr", "1e-2"]) == 0
    assert QProbe.load(probe).dim == 8
    chosen = tmp_path / "chosen.parquet"
    assert main(["qprobe", "select", "--probe", str(probe), "--samples", samples, "--features", features,
                 "--out", str(chosen), "--beta", "0"]) == 0
    picked = pq.read_table(chosen).to_pydict()
    assert picked["prompt_id"] == list(range(6)) and all(w == 1.0 for w in picked["weight"])
    result = tmp_path / "eval.json"
    assert main(["qprobe", "evaluate", "--probe", str(probe), "--samples", samples, "--features", features,
                 "--k", "1", "4", "--json", str(result)]) == 0
    numbers = json.loads(result.read_text())
    assert numbers["baseline"] == 0.25 and numbers["pass_at_k"]["4"] == 1.0
    assert "pass@1 (mean reward): 0.2500" in capsys.readouterr().out


def test_cli_sample_from_a_local_hugging_face_model(tmp_path, capsys):
    from .test_features import byte_tokenizer, tiny_model

    tokenizer = byte_tokenizer()
    model = tiny_model("llama", len(tokenizer), [tokenizer.eos_token_id])
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "one"}\n{"prompt": "two two"}\n')
    assert main(["qprobe", "sample", "--model", str(tmp_path / "model"), "--prompts", str(prompts), "--k", "2",
                 "--max-new-tokens", "3", "--layer", "1", "--out", str(tmp_path / "run")]) == 0
    table = pq.read_table(tmp_path / "run" / "samples.parquet").to_pydict()
    assert table["prompt_id"] == [0, 0, 1, 1] and table["reward"] == [None] * 4
    from safetensors.torch import load_file

    assert load_file(tmp_path / "run" / "features.safetensors")["features"].shape == (4, 32)
    assert main(["qprobe", "train", "--samples", str(tmp_path / "run" / "samples.parquet"),
                 "--features", str(tmp_path / "run" / "features.safetensors"), "--out", str(tmp_path / "p")]) == 2
    assert "no reward at rows" in capsys.readouterr().err


def test_cli_rejects_bad_prompts(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt field"}\n')
    assert main(["qprobe", "sample", "--model", "m", "--api-base", "http://127.0.0.1:9/v1", "--prompts", str(bad),
                 "--out", str(tmp_path / "o")]) == 2
    assert f"{bad} line 2 needs a string field 'prompt'" in capsys.readouterr().err
