"""``reweighting qprobe sample | train | select | evaluate``: a Q-probe on a user's own model and prompts.

- ``sample``: k completions per prompt (JSONL, one ``{"prompt": ...}`` per line) from a Hugging Face
  model (a local folder, a model already in the Hugging Face cache, or ``smollm2`` for the bundled
  SmolLM2-135M-Instruct; nothing is downloaded) or an
  OpenAI-compatible API, written as ``samples.parquet`` (one row per completion) and
  ``features.safetensors`` (the same rows). A prompt line may carry its reward's ground truth:
  ``"answer"`` (numeric match of the completion's last number) or ``"test"`` and ``"entry_point"``
  (the completion is run against the tests in the sandbox, HumanEval style).
- ``train``: fit a probe on the samples' ``reward`` column and write ``probe.safetensors``.
- ``select``: choose one completion per prompt with ``softmax(Q / beta)``; writes Parquet.
- ``evaluate``: the exact chunked expected return for each k and beta, with pass@1 and pass@k.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

import torch

from ..cli import (
    HelpFormatter,
    Parser,
    UsageError,
    check_device,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    probability,
    run_command,
)

__all__ = ["add_parser", "main"]

SAMPLES_FILE = "samples.parquet"
FEATURES_FILE = "features.safetensors"


def _read_prompts(path: str) -> list[dict]:
    """The prompt rows of a JSONL file, each checked (``prompt``; ``answer`` a finite number; ``test``
    and ``entry_point`` strings), naming the file and line of the first bad one."""
    if not Path(path).is_file():
        raise UsageError(f"--prompts {path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as err:
            raise UsageError(f"{path} is not UTF-8 text: {err}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path} line {n} is not valid JSON: {err}") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise UsageError(f"{path} line {n} needs a string field 'prompt'")
        if "answer" in row:
            answer = row["answer"]
            try:
                ok = not isinstance(answer, bool) and math.isfinite(float(answer))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise UsageError(f"{path} line {n}: 'answer' must be a finite number, got {answer!r}")
        if ("test" in row) != ("entry_point" in row):
            raise UsageError(f"{path} line {n}: a code prompt needs both 'test' and 'entry_point'")
        if "test" in row and not (isinstance(row["test"], str) and isinstance(row["entry_point"], str)):
            raise UsageError(f"{path} line {n}: 'test' and 'entry_point' must be strings")
        rows.append(row)
    if not rows:
        raise UsageError(f"{path} holds no prompts")
    return rows


def _rewards(rows: list[dict], completions: list[list[str]], workers: int) -> list[list[float | None]]:
    from .rewards import numeric_match
    from .sandbox import code_reward, humaneval_program

    out: list[list[float | None]] = []
    for row, drawn in zip(rows, completions):
        if "answer" in row:
            out.append([numeric_match(c, row["answer"]) for c in drawn])
        elif "test" in row and "entry_point" in row:
            out.append(code_reward([humaneval_program(row, c) for c in drawn], workers=workers))
        else:
            out.append([None] * len(drawn))
    return out


def _check_model_name(name: str) -> None:
    """``smollm2``, a local folder with ``config.json``, or a model already in the Hugging Face cache.

    Nothing is downloaded: a name that is neither a folder nor in the cache is an error at once,
    before any model code runs (a lookup on the Hub would retry for half a minute without a network).
    """
    if name == "smollm2":
        from .smollm2 import gguf_path

        try:
            gguf_path()
        except RuntimeError as err:
            raise UsageError(f"--model smollm2: {err}") from None
        return
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UsageError(f"--model {name}: not a model folder (expected a folder with config.json, as "
                             "save_pretrained writes)")
        return
    looks_like_path = name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep + os.sep in name \
        or name.endswith("/")
    if looks_like_path or not _in_hf_cache(name):
        raise UsageError(f"--model {name}: no such folder, and no model of that name in the Hugging Face cache "
                         "(this command downloads nothing: give a folder written by save_pretrained, or "
                         "download the model first)")


def _in_hf_cache(name: str) -> bool:
    """Whether the Hugging Face cache holds a ``config.json`` of ``name`` (looked up without the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        found = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not shaped like a repo id
        return False
    return isinstance(found, str)


def _load_model(name: str, device: str):
    if name == "smollm2":
        from .smollm2 import load_smollm2

        return load_smollm2(device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # local files only: a folder, or the Hugging Face cache; never the network
        model = AutoModelForCausalLM.from_pretrained(name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"--model {name}: not a model transformers could load from local files ({first})") from None
    return model.to(device).eval(), tokenizer


def _output_folder(path: str, option: str = "--out") -> Path:
    """Check that ``path`` can become the output folder (made only when the results are written, so
    a command that fails leaves nothing behind)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{option} {path} exists and is not a folder")
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: cannot create a folder under {existing}")
    return out


def _output_file(path: str, option: str = "--out") -> Path:
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"{option} {path} is a folder; give a file name")
    if not out.parent.is_dir():
        raise UsageError(f"{option} {path}: the folder {out.parent} does not exist")
    return out


def write_samples(out: Path, rows: list[dict], samples, rewards, metadata: dict) -> None:
    """``out/samples.parquet`` and ``out/features.safetensors``, one row per completion, prompt-major."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    k = samples.k
    table = {
        "prompt_id": [p for p in range(len(rows)) for _ in range(k)],
        "sample_id": [i for _ in rows for i in range(k)],
        "prompt": [r["prompt"] for r in rows for _ in range(k)],
        "completion": [c for cs in samples.completions for c in cs],
        "finish": [f for fs in samples.finish for f in fs],
        "reward": [x for rs in rewards for x in rs],
    }
    pq.write_table(pa.table(table, schema=pa.schema([
        ("prompt_id", pa.int64()), ("sample_id", pa.int64()), ("prompt", pa.string()), ("completion", pa.string()),
        ("finish", pa.string()), ("reward", pa.float64())])), out / SAMPLES_FILE)
    features = samples.features.reshape(-1, samples.features.shape[-1]).contiguous()
    save_file({"features": features}, str(out / FEATURES_FILE), metadata={k: str(v) for k, v in metadata.items()})


def read_samples(samples_path: str, features_path: str) -> tuple[dict, torch.Tensor]:
    """The samples table (as lists) and the features ``[N, D]``, checked to line up."""
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    for option, path in (("--samples", samples_path), ("--features", features_path)):
        if not Path(path).is_file():
            raise UsageError(f"{option} {path}: no such file")
    try:
        table = pq.read_table(samples_path).to_pydict()
    except Exception as err:  # pyarrow raises several types for a file that is not Parquet
        raise UsageError(f"--samples {samples_path} is not a samples Parquet file: {err}") from None
    columns = {"prompt_id", "sample_id", "prompt", "completion", "reward"}
    if not columns <= set(table):
        raise UsageError(f"--samples {samples_path} lacks the columns {sorted(columns - set(table))} (write it with "
                         "'reweighting qprobe sample')")
    try:
        features = load_file(features_path)["features"]
    except Exception as err:  # safetensors raises its own error type for a bad file; a KeyError without the tensor
        raise UsageError(f"--features {features_path} is not a features file with a 'features' tensor: "
                         f"{err}") from None
    if features.dim() != 2:
        raise UsageError(f"--features {features_path}: 'features' must be [rows, dim], got shape "
                         f"{tuple(features.shape)}")
    if features.shape[0] != len(table["prompt_id"]):
        raise UsageError(f"{features_path} has {features.shape[0]} rows but {samples_path} has "
                         f"{len(table['prompt_id'])}: they must come from the same sample run")
    return table, features


def _grid(table: dict, values: torch.Tensor) -> torch.Tensor:
    """Per-row values as ``[prompts, k]`` (every prompt must have the same number of samples)."""
    prompt_ids = torch.tensor(table["prompt_id"])
    order = torch.argsort(prompt_ids * (int(max(table["sample_id"])) + 1) + torch.tensor(table["sample_id"]))
    counts = torch.bincount(prompt_ids)
    counts = counts[counts > 0]
    if not bool((counts == counts[0]).all()):
        raise UsageError("every prompt needs the same number of samples for selection and evaluation")
    return values[order].reshape(len(counts), int(counts[0]))


def _reward_tensor(table: dict) -> torch.Tensor:
    missing = [i for i, r in enumerate(table["reward"]) if r is None]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise UsageError(f"the samples have no reward at rows [{shown}]: give prompts an 'answer' or 'test', "
                         "or fill the 'reward' column")
    return torch.tensor(table["reward"], dtype=torch.float32)


def _scored(args: argparse.Namespace) -> tuple[dict, torch.Tensor]:
    """The samples table and the probe's scores ``[prompts, k]`` (``--probe``, ``--samples``, ``--features``)."""
    from .probe import QProbe

    if not Path(args.probe).is_file():
        raise UsageError(f"--probe {args.probe}: no such file")
    probe = QProbe.load(args.probe)
    table, features = read_samples(args.samples, args.features)
    if features.shape[1] != probe.dim:
        raise UsageError(f"--features {args.features} has width {features.shape[1]} but --probe {args.probe} takes "
                         f"{probe.dim}: the probe was trained on other features")
    return table, _grid(table, probe.score(features))


def _cmd_sample(args: argparse.Namespace) -> int:
    # Everything that can be checked is checked before a model loads or a request is sent.
    rows = _read_prompts(args.prompts)
    prompts = [r["prompt"] for r in rows]
    out = _output_folder(args.out)
    if args.api_base:
        from .api import APIError, OpenAICompatible, sample_and_embed

        try:
            client = OpenAICompatible(args.api_base, args.model, args.embedding_model, temperature=args.temperature,
                                      max_tokens=args.max_new_tokens, seed=args.seed, pooling=args.pooling)
        except ValueError as err:
            raise UsageError(f"--api-base/--model: {err}") from None
        try:
            samples = sample_and_embed(prompts, client.sample, client.embed, args.k)
        except APIError as err:
            raise UsageError(str(err)) from None
        metadata = {"source": "api", "model": args.model, "embedding_model": args.embedding_model or args.model}
    else:
        from .features import check_layer, sample_with_features

        check_device(args.device)
        _check_model_name(args.model)
        model, tokenizer = _load_model(args.model, args.device)
        try:
            check_layer(model, args.layer)
        except ValueError as err:
            raise UsageError(f"--layer {args.layer}: {err}") from None
        samples = sample_with_features(model, tokenizer, prompts, args.k, layer=args.layer,
                                       max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                       top_p=args.top_p, stop_strings=args.stop or (), chat=args.chat,
                                       batch_size=args.batch_size, seed=args.seed)
        metadata = {"source": "hf", "model": args.model, "layer": args.layer}
    rewards = _rewards(rows, samples.completions, args.workers)
    write_samples(out, rows, samples, rewards, metadata)
    print(f"wrote {len(prompts)} x {args.k} samples to {out / SAMPLES_FILE} and {FEATURES_FILE}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .fit import fit_probe

    _output_file(args.out)
    table, features = read_samples(args.samples, args.features)
    probe = fit_probe(features, _reward_tensor(table), torch.tensor(table["prompt_id"]), args.objective,
                      hidden=args.hidden, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                      weight_decay=args.weight_decay, group_size=args.group_size, temperature=args.train_temperature,
                      seed=args.seed)
    probe.save(args.out)
    print(f"wrote {args.out}")
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .select import select

    _output_file(args.out)
    table, q = _scored(args)
    rows = _grid(table, torch.arange(len(table["prompt_id"])))
    choice, weights = select(q, args.beta, torch.Generator().manual_seed(args.seed))
    picked = rows.gather(1, choice.unsqueeze(1)).squeeze(1).tolist()
    out = {
        "prompt_id": [table["prompt_id"][i] for i in picked],
        "sample_id": [table["sample_id"][i] for i in picked],
        "prompt": [table["prompt"][i] for i in picked],
        "completion": [table["completion"][i] for i in picked],
        "q": [float(x) for x in q.gather(1, choice.unsqueeze(1)).squeeze(1)],
        "weight": [float(x) for x in weights.gather(1, choice.unsqueeze(1)).squeeze(1)],
    }
    pq.write_table(pa.table(out), args.out)
    print(f"wrote {len(picked)} selections to {args.out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_probe

    if args.json:
        _output_file(args.json, "--json")
    table, q = _scored(args)
    r = _grid(table, _reward_tensor(table))
    too_big = [k for k in args.k if k > r.shape[1]]
    if too_big:
        raise UsageError(f"--k {' '.join(map(str, too_big))}: the samples have only {r.shape[1]} per prompt; every k "
                         f"must be <= {r.shape[1]}")
    ks = list(dict.fromkeys(args.k))
    result = evaluate_probe(q, r, ks, args.beta)
    print(f"pass@1 (mean reward): {result['baseline']:.4f}")
    print("| k | pass@k | " + " | ".join(f"beta={b:g}" for b in args.beta) + " |")
    print("|---" * (len(args.beta) + 2) + "|")
    for k in ks:
        cells = " | ".join(f"{result['expected_return'][float(b)][k]:.4f}" for b in args.beta)
        print(f"| {k} | {result['pass_at_k'][k]:.4f} | {cells} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _add_inputs(p: argparse.ArgumentParser, *, probe: bool) -> None:
    if probe:
        p.add_argument("--probe", required=True, help="probe file written by 'qprobe train'")
    p.add_argument("--samples", required=True, help="samples.parquet written by 'qprobe sample'")
    p.add_argument("--features", required=True, help="features.safetensors written by 'qprobe sample'")


def _plain(text: str) -> str:
    """Docstring markup (double backticks, ``:func:`` roles) as plain text for ``--help``."""
    return re.sub(r":(?:func|class|meth|data):`~?([^`]*)`", r"\1", text).replace("``", "")


class _RawHelpFormatter(HelpFormatter):
    """Keeps the description's own line breaks (its list of subcommands)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


def add_parser(subparsers) -> None:
    """Add ``qprobe`` and its subcommands to the ``reweighting`` command line."""
    qp = subparsers.add_parser("qprobe", help="Q-probe: sample, train a probe, select, evaluate",
                               description=_plain(__doc__), formatter_class=_RawHelpFormatter)
    sub = qp.add_subparsers(dest="qprobe_command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)

    p = command("sample", "k completions per prompt, with features and rewards")
    p.add_argument("--model", required=True, help="Hugging Face model folder or name, 'smollm2', or the API's model")
    p.add_argument("--prompts", required=True, help="JSONL file, one {'prompt': ...} per line")
    p.add_argument("--out", required=True, help="output folder for samples.parquet and features.safetensors")
    p.add_argument("--k", type=positive_int, default=8, help="completions per prompt")
    p.add_argument("--layer", type=int, default=-1,
                   help="hidden-state layer to read: 0 the embeddings, i after block i, -1 the last")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="new tokens per completion at most")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature")
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass")
    p.add_argument("--stop", nargs="*", default=None, help="stop strings (default: none)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts per generate call")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="random seed (for an API: the first request's seed; repeats use the next ones)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--workers", type=positive_int, default=4, help="parallel sandboxed runs for code rewards")
    p.add_argument("--api-base", default=None,
                   help="OpenAI-compatible API root instead of a local model (default: a local model)")
    p.add_argument("--embedding-model", default=None, help="the API's embedding model (default: --model)")
    p.add_argument("--pooling", choices=["last", "mean", "error"], default="last",
                   help="for an API that returns one embedding per token: keep the last, average, or refuse")
    p.set_defaults(func=_cmd_sample)

    p = command("train", "fit a probe on samples with rewards")
    _add_inputs(p, probe=False)
    p.add_argument("--out", required=True, help="probe file (safetensors)")
    p.add_argument("--objective", default="pg", choices=["mse", "bce", "pg", "preference"],
                   help="mse: L_Q, bce: L_CE, pg: L_PG, preference: L_QP (docs/methods/qprobe.md)")
    p.add_argument("--hidden", type=positive_int, nargs="*", default=[], help="MLP hidden widths (default: linear)")
    p.add_argument("--lr", type=positive_float, default=5e-5, help="AdamW learning rate")
    p.add_argument("--epochs", type=positive_int, default=150, help="passes over the samples")
    p.add_argument("--batch-size", type=positive_int, default=1000, help="samples per step")
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.0, help="AdamW weight decay")
    p.add_argument("--group-size", type=positive_int, default=10, help="samples per group for pg and preference")
    p.add_argument("--train-temperature", type=positive_float, default=1.0, help="beta_train of L_PG")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="random seed")
    p.set_defaults(func=_cmd_train)

    p = command("select", "choose one completion per prompt with softmax(Q / beta)")
    _add_inputs(p, probe=True)
    p.add_argument("--out", required=True, help="selections (Parquet)")
    p.add_argument("--beta", type=nonnegative_float, default=0.1, help="selection temperature (0 = argmax)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="random seed of the draws")
    p.set_defaults(func=_cmd_select)

    p = command("evaluate", "expected return for each k and beta, with pass@1 and pass@k")
    _add_inputs(p, probe=True)
    p.add_argument("--k", type=positive_int, nargs="+", default=[1, 2, 4, 8],
                   help="candidates per choice; each must be <= the samples per prompt")
    p.add_argument("--beta", type=nonnegative_float, nargs="+", default=[0.0, 0.1, 1.0],
                   help="selection temperatures (0 = argmax)")
    p.add_argument("--json", default=None, help="also write the table as JSON to this file (default: no)")
    p.set_defaults(func=_cmd_evaluate)


def main(argv: list[str] | None = None) -> int:
    """``python -m reweighting.qprobe.cli``: the ``reweighting qprobe`` subcommands alone."""
    parser = Parser(prog="reweighting", formatter_class=HelpFormatter)
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    from reweighting.qprobe.cli import main as _main  # see reweighting/cli.py

    sys.exit(_main())
