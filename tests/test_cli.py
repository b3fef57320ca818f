"""The command line's user errors: one or two lines on stderr, no traceback, exit status 2, and
nothing slow (no model load, no request) before the arguments and files are checked."""

import json
import subprocess
import sys

import pytest
import torch

import reweighting.qprobe.cli as qcli
from reweighting.cli import build_parser, main
from reweighting.qprobe import QProbe

from .qprobe.test_api import loopback_server


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A samples run over the loopback API (4 prompts x 2 samples, features of width 8) and a probe."""
    root = tmp_path_factory.mktemp("cli")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{p}", "answer": 1}) + "\n" for p in range(4)))
    with loopback_server() as server:
        base = f"http://127.0.0.1:{server.server_address[1]}/v1"
        assert main(["qprobe", "sample", "--model", "m", "--api-base", base, "--prompts", str(prompts), "--k", "2",
                     "--out", str(root / "run")]) == 0
    samples, features = root / "run" / "samples.parquet", root / "run" / "features.safetensors"
    probe = root / "probe.safetensors"
    assert main(["qprobe", "train", "--samples", str(samples), "--features", str(features), "--out", str(probe),
                 "--epochs", "1"]) == 0
    QProbe(5).save(root / "narrow.safetensors")
    (root / "not-a-file.bin").write_bytes(b"\x00garbage")
    (root / "empty-model").mkdir()
    return {"root": root, "prompts": prompts, "samples": str(samples), "features": str(features),
            "probe": str(probe)}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from reweighting.qprobe.tiny import tiny_llama

    folder = tmp_path_factory.mktemp("tiny") / "model"
    model, tokenizer = tiny_llama(layers=2)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _call(argv, capsys):
    """Exit status and stderr of the command, whether it returns or exits through argparse."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def _user_errors(run, tiny, cuda: bool):
    r = run["root"]
    prompts = str(run["prompts"])
    bad_json = r / "bad.jsonl"
    bad_json.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": oops}\n')
    bad_answer = r / "bad-answer.jsonl"
    bad_answer.write_text('{"prompt": "a", "answer": "seven"}\n')
    a_file = r / "a-file"
    a_file.write_text("x")
    inputs = ["--samples", run["samples"], "--features", run["features"]]
    sample = ["qprobe", "sample", "--model", str(tiny), "--prompts", prompts, "--out", str(r / "o")]
    cases = [
        # (argv, words the message must hold)
        (["qprobe", "sample", "--model", "m", "--prompts", prompts, "--out", "o", "--k", "0"], ["--k", ">= 1"]),
        (sample + ["--temperature", "-1"], ["--temperature"]),
        (sample + ["--top-p", "1.5"], ["--top-p", "(0, 1]"]),
        (sample + ["--max-new-tokens", "zero"], ["--max-new-tokens", "'zero'"]),
        (sample + ["--batch-size", "0"], ["--batch-size"]),
        (["qprobe", "sample", "--model", str(tiny), "--out", "o"], ["--prompts"]),
        (["qprobe", "sample", "--model", str(tiny), "--prompts", str(r / "missing.jsonl"), "--out", "o"],
         ["--prompts", "missing.jsonl", "no such file"]),
        (["qprobe", "sample", "--model", str(tiny), "--prompts", str(bad_json), "--out", "o"],
         [str(bad_json), "line 3", "not valid JSON"]),
        (["qprobe", "sample", "--model", str(tiny), "--prompts", str(bad_answer), "--out", "o"],
         ["line 1", "'answer'", "'seven'"]),
        (sample[:3] + ["./no/such/model"] + sample[4:], ["--model", "./no/such/model", "no such folder"]),
        (sample[:3] + [str(r / "empty-model")] + sample[4:], ["--model", "config.json"]),
        (sample + ["--layer", "7"], ["--layer 7", "[-3, 2]"]),
        (sample + ["--device", "gpu"], ["--device", "'gpu'"]),
        (sample[:-1] + [str(a_file)], ["--out", "not a folder"]),
        (["qprobe", "sample", "--model", "m", "--api-base", "ftp://host/v1", "--prompts", prompts, "--out",
          str(r / "o")], ["base_url", "ftp://host/v1"]),
        (["qprobe", "sample", "--model", "m", "--api-base", "http://127.0.0.1:9/v1", "--prompts", prompts, "--out",
          str(r / "o")], ["could not reach", "127.0.0.1:9"]),
        (["qprobe", "train", "--samples", str(r / "none.parquet"), "--features", run["features"], "--out",
          str(r / "p.safetensors")], ["--samples", "none.parquet", "no such file"]),
        (["qprobe", "train", "--samples", str(a_file), "--features", run["features"], "--out",
          str(r / "p.safetensors")], ["--samples", "not a samples Parquet file"]),
        (["qprobe", "train", *inputs[:2], "--features", str(r / "not-a-file.bin"), "--out",
          str(r / "p.safetensors")], ["--features", "not-a-file.bin"]),
        (["qprobe", "train", *inputs, "--out", str(r / "p.safetensors"), "--objective", "hinge"], ["--objective"]),
        (["qprobe", "train", *inputs, "--out", str(r / "p.safetensors"), "--lr", "nan"], ["--lr"]),
        (["qprobe", "train", *inputs, "--out", str(r / "no-folder" / "p.safetensors")], ["--out", "does not exist"]),
        (["qprobe", "select", "--probe", str(r / "narrow.safetensors"), *inputs, "--out", str(r / "s.parquet")],
         ["--features", "width 8", "--probe", "takes 5"]),
        (["qprobe", "select", "--probe", str(r / "nothing.safetensors"), *inputs, "--out", str(r / "s.parquet")],
         ["--probe", "no such file"]),
        (["qprobe", "select", "--probe", run["probe"], *inputs, "--out", str(r / "s.parquet"), "--beta", "-0.1"],
         ["--beta"]),
        (["qprobe", "evaluate", "--probe", run["probe"], *inputs, "--k", "1", "4"],
         ["--k 4", "only 2 per prompt"]),
        (["qprobe", "evaluate", "--probe", str(r / "narrow.safetensors"), *inputs, "--k", "1"],
         ["width 8", "takes 5"]),
        (["qprobe", "evaluate", "--probe", run["probe"], *inputs, "--k", "0"], ["--k", ">= 1"]),
        (["qprobe", "evaluate", "--probe", run["samples"], *inputs], ["not a Q-probe file"]),
        (["reproduce", "no-such-study"], ["unknown study 'no-such-study'"]),
        (["reproduce", "--seeds", "0"], ["--seeds"]),
        (["reproduce", "--device", "tpu", "--out", str(r / "res")], ["--device", "'tpu'"]),
        (["report", "--out", str(r / "no-results")], ["--out", "no-results", "not a folder"]),
        (["no-such-command"], ["invalid choice"]),
    ]
    if not cuda:
        cases += [(sample + ["--device", "cuda"], ["--device cuda", "CUDA is not available"]),
                  (["reproduce", "--device", "cuda", "--out", str(r / "res")], ["CUDA is not available"])]
    return cases


def test_user_errors_are_short_without_traceback_and_exit_2(run, tiny_model_dir, capsys, monkeypatch):
    real_load = qcli._load_model
    loads = []

    def counting_load(name, device):
        loads.append(name)
        return real_load(name, device)

    def no_generate(*args, **kwargs):
        raise AssertionError("sampling started before the arguments were checked")

    monkeypatch.setattr(qcli, "_load_model", counting_load)
    import transformers

    monkeypatch.setattr(transformers.GenerationMixin, "generate", no_generate)
    cases = _user_errors(run, tiny_model_dir, torch.cuda.is_available())
    assert len(cases) >= 30
    for argv, words in cases:
        code, err = _call(argv, capsys)
        assert code == 2, (argv, code, err)
        lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line]
        assert "Traceback" not in err and 1 <= len(lines) <= 2, (argv, err)  # progress bars aside
        for word in words:
            assert word in err, (argv, word, err)
    # Only the --layer case needs the model (its depth); every other case failed before loading one.
    assert loads == [str(tiny_model_dir)]
    assert not (run["root"] / "o").exists()  # nothing written by a failed command


def test_every_option_has_help_and_shows_its_default():
    parser = build_parser()

    def walk(p, path):
        for action in p._actions:
            if isinstance(action, type(p._subparsers._group_actions[0])) if p._subparsers else False:
                for name, child in action.choices.items():
                    yield from walk(child, path + [name])
            elif action.option_strings and action.dest != "help":
                yield path, action, p

    seen = 0
    for path, action, p in walk(parser, []):
        if action.dest == "version":
            continue
        seen += 1
        assert action.help, (path, action.option_strings)
        text = p.format_help()
        flag = action.option_strings[-1]
        if not (action.required or isinstance(action.default, bool) or action.default in (None, [])):
            shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
            assert f"(default: {shown})" in " ".join(text.split()) or f"(default: {action.default})" in \
                " ".join(text.split()), (path, flag)
        elif action.default is None and not action.required:
            assert "default" in action.help, (path, flag)  # says what leaving it out means
    assert seen >= 40


@pytest.mark.parametrize("module", ["reweighting.cli", "reweighting.qprobe.cli"])
def test_exit_status_when_run_as_a_program(tmp_path, module):
    # As a program (python -m), where the module is __main__: a user error raised by a subcommand
    # is still reported in one line with status 2.
    done = subprocess.run([sys.executable, "-m", module, "qprobe", "sample", "--model", "m", "--prompts",
                           str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [f"reweighting: error: --prompts {tmp_path / 'missing.jsonl'}: "
                                                "no such file"]
