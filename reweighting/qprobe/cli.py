"""``reweighting qprobe sample | train | select | evaluate``: a Q-probe on a user's own model and prompts.

- ``sample``: k completions per prompt (JSONL, one ``{"prompt": ...}`` per line) from a Hugging Face
  model (a path or name, or ``smollm2`` for the bundled SmolLM2-135M-Instruct) or an
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
import sys
from pathlib import Path

import torch

__all__ = ["add_parser", "main"]

SAMPLES_FILE = "samples.parquet"
FEATURES_FILE = "features.safetensors"


def _read_prompts(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {n} is not valid JSON: {err}") from err
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path} line {n} needs a string field 'prompt'")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no prompts")
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


def _load_model(name: str, device: str):
    if name == "smollm2":
        from .smollm2 import load_smollm2

        return load_smollm2(device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(name).to(device).eval(), AutoTokenizer.from_pretrained(name)


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

    table = pq.read_table(samples_path).to_pydict()
    features = load_file(features_path)["features"]
    if features.shape[0] != len(table["prompt_id"]):
        raise ValueError(f"{features_path} has {features.shape[0]} rows but {samples_path} has "
                         f"{len(table['prompt_id'])}: they must come from the same sample run")
    return table, features


def _grid(table: dict, values: torch.Tensor) -> torch.Tensor:
    """Per-row values as ``[prompts, k]`` (every prompt must have the same number of samples)."""
    prompt_ids = torch.tensor(table["prompt_id"])
    order = torch.argsort(prompt_ids * (int(max(table["sample_id"])) + 1) + torch.tensor(table["sample_id"]))
    counts = torch.bincount(prompt_ids)
    counts = counts[counts > 0]
    if not bool((counts == counts[0]).all()):
        raise ValueError("every prompt needs the same number of samples for selection and evaluation")
    return values[order].reshape(len(counts), int(counts[0]))


def _reward_tensor(table: dict) -> torch.Tensor:
    missing = [i for i, r in enumerate(table["reward"]) if r is None]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise ValueError(f"the samples have no reward at rows [{shown}]: give prompts an 'answer' or 'test', "
                         "or fill the 'reward' column")
    return torch.tensor(table["reward"], dtype=torch.float32)


def _scored(args: argparse.Namespace) -> tuple[dict, torch.Tensor]:
    """The samples table and the probe's scores ``[prompts, k]`` (``--probe``, ``--samples``, ``--features``)."""
    from .probe import QProbe

    table, features = read_samples(args.samples, args.features)
    return table, _grid(table, QProbe.load(args.probe).score(features))


def _cmd_sample(args: argparse.Namespace) -> int:
    rows = _read_prompts(args.prompts)
    prompts = [r["prompt"] for r in rows]
    if args.api_base:
        from .api import OpenAICompatible, sample_and_embed

        client = OpenAICompatible(args.api_base, args.model, args.embedding_model, temperature=args.temperature,
                                  max_tokens=args.max_new_tokens)
        samples = sample_and_embed(prompts, client.sample, client.embed, args.k)
        metadata = {"source": "api", "model": args.model, "embedding_model": args.embedding_model or args.model}
    else:
        from .features import sample_with_features

        model, tokenizer = _load_model(args.model, args.device)
        samples = sample_with_features(model, tokenizer, prompts, args.k, layer=args.layer,
                                       max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                       top_p=args.top_p, stop_strings=args.stop or (), chat=args.chat,
                                       batch_size=args.batch_size, seed=args.seed)
        metadata = {"source": "hf", "model": args.model, "layer": args.layer}
    rewards = _rewards(rows, samples.completions, args.workers)
    write_samples(Path(args.out), rows, samples, rewards, metadata)
    print(f"wrote {len(prompts)} x {args.k} samples to {Path(args.out) / SAMPLES_FILE} and {FEATURES_FILE}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .fit import fit_probe

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

    table, q = _scored(args)
    r = _grid(table, _reward_tensor(table))
    ks = [k for k in args.k if k <= r.shape[1]]
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
        p.add_argument("--probe", required=True)
    p.add_argument("--samples", required=True)
    p.add_argument("--features", required=True)


def add_parser(subparsers) -> None:
    """Add ``qprobe`` and its subcommands to the ``reweighting`` command line."""
    qp = subparsers.add_parser("qprobe", help="Q-probe: sample, train a probe, select, evaluate")
    sub = qp.add_subparsers(dest="qprobe_command", required=True)

    p = sub.add_parser("sample", help="k completions per prompt, with features and rewards")
    p.add_argument("--model", required=True, help="Hugging Face model path or name, 'smollm2', or the API's model")
    p.add_argument("--prompts", required=True, help="JSONL file, one {'prompt': ...} per line")
    p.add_argument("--out", required=True, help="output folder for samples.parquet and features.safetensors")
    p.add_argument("--k", type=int, default=8, help="completions per prompt (default 8)")
    p.add_argument("--layer", type=int, default=-1, help="hidden-state layer to read (default -1, the last)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", nargs="*", default=None, help="stop strings")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=4, help="parallel sandboxed runs for code rewards")
    p.add_argument("--api-base", default=None, help="OpenAI-compatible API root instead of a local model")
    p.add_argument("--embedding-model", default=None, help="the API's embedding model")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("train", help="fit a probe on samples with rewards")
    _add_inputs(p, probe=False)
    p.add_argument("--out", required=True, help="probe file (safetensors)")
    p.add_argument("--objective", default="pg", choices=["mse", "bce", "pg", "preference"])
    p.add_argument("--hidden", type=int, nargs="*", default=[], help="MLP hidden widths (default: linear)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--group-size", type=int, default=10)
    p.add_argument("--train-temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("select", help="choose one completion per prompt with softmax(Q / beta)")
    _add_inputs(p, probe=True)
    p.add_argument("--out", required=True, help="selections (Parquet)")
    p.add_argument("--beta", type=float, default=0.1, help="selection temperature (0 = argmax)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_select)

    p = sub.add_parser("evaluate", help="expected return for each k and beta, with pass@1 and pass@k")
    _add_inputs(p, probe=True)
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--beta", type=float, nargs="+", default=[0.0, 0.1, 1.0])
    p.add_argument("--json", default=None, help="also write the table as JSON")
    p.set_defaults(func=_cmd_evaluate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reweighting")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
