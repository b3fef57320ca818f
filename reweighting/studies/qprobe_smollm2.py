"""Q-probe on a real LM: SmolLM2-135M-Instruct doing one-digit arithmetic asked in words (docs/methods/qprobe.md).

The 200 questions "What is seven plus five?" / "What is seven times five?" (every one-digit pair,
both operations) are split by a hash of their text into disjoint training and test prompts. Each
question goes through the model's chat template and is answered ``k`` times at temperature 1; a
completion is rewarded 1 when the number it ends its short answer with is right (the model often
repeats the operands first, "Seven plus five is 12", so the last number is the answer). Its feature
is the residual stream of a middle-to-late layer at the completion's last token, read from
``generate``'s own hidden states. Linear probes are fitted with ``L_Q``, ``L_CE`` and ``L_PG`` over
several probe seeds and evaluated, as in the ``qprobe`` study, by the exact chunked expected return
of ``softmax(Q / beta)`` selection among k samples, against pass@1 and pass@k.

Sampling is by far the slowest step, so it is done once per configuration and cached (completions
and features) next to the converted model weights, keyed by the model, the prompts and the
sampling settings: a second run loads neither the model nor anything else heavy.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import Study, StudyContext, StudyOutcome

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
OPERATIONS = {"plus": lambda a, b: a + b, "times": lambda a, b: a * b}


@dataclass(frozen=True)
class SmolConfig:
    layer: int = 20  # of SmolLM2-135M's 30 blocks: middle to late, as the paper's 26 of 32
    max_new_tokens: int = 10  # room for a short sentence that ends with the answer
    temperature: float = 1.0
    sample_seed: int = 0  # sampling is done once; the study's seeds vary the probes
    # Sampling SmolLM2 on two CPU cores is the budget, and its CPU time grows with the machine's load
    # (the two threads wait for each other): a first full run with 1,400 completions took over 700
    # CPU-s at a load average of 6, over its ~700 CPU-s share of `make reproduce`; with 1,160 it
    # took 491 at a load of 5-7. The probes learn from every training question (6 samples each:
    # fewer leave most questions without a right answer for L_PG to prefer); the test set is the
    # first 70 test questions (a prefix is a fair subset, see ``split_questions``), which gave the
    # same verdict as all 100.
    train_prompts: int = 100  # at most the training half of the 200 questions
    train_samples: int = 6
    test_prompts: int = 70
    test_samples: int = 8
    prompts_per_call: int = 16  # prompts (times k sequences) per generate call
    ks: tuple[int, ...] = (1, 2, 4, 8)
    # Up to 10 (near a uniform pick, pass@1): with the grid ending at 1, every seed chose beta = 1 at
    # k >= 16, the end of the grid, so the tuned result at large k was capped by the grid, not the probe.
    betas: tuple[float, ...] = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
    beta: float | None = None  # None: each probe's own beta, chosen on its training prompts
    # As in the ``qprobe`` study: the paper's lr of 5e-5 is tuned for ~100x more samples.
    probe_lr: float = 1e-3
    probe_epochs: int = 150
    probe_batch: int = 1000
    weight_decay: float = 0.0


FULL = SmolConfig()
QUICK = replace(FULL, train_prompts=12, train_samples=4, test_prompts=12, test_samples=4, ks=(1, 2, 4),
                probe_epochs=100)


def questions() -> list[tuple[str, int]]:
    """All 200 one-digit questions in words, with their answers."""
    return [(f"What is {WORDS[a]} {op} {WORDS[b]}?", fn(a, b))
            for op, fn in OPERATIONS.items() for a in range(10) for b in range(10)]


def split_questions() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Disjoint training and test questions, by a stable hash of the text (about half each), each
    ordered by that hash so that a prefix of either is a fair subset."""
    def digest(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    ordered = sorted(questions(), key=lambda qa: digest(qa[0]))
    train = [qa for qa in ordered if int(digest(qa[0]), 16) % 2 == 0]
    test = [qa for qa in ordered if int(digest(qa[0]), 16) % 2 == 1]
    return train, test


def _smollm2_id() -> str:
    from ..qprobe.smollm2 import MODEL_NAME, gguf_path

    return f"{MODEL_NAME}-{gguf_path().stem}"


def _load_smollm2():
    from ..qprobe.smollm2 import load_smollm2

    return load_smollm2(progress=False)


def sample_cached(prompts: list[str], k: int, cfg: SmolConfig, model_id: str, load: Callable[[], tuple],
                  cache: Path, model_box: dict, ctx: StudyContext) -> dict:
    """Completions and features of ``k`` samples per prompt, from ``cache`` when there, else sampled
    (loading the model through ``load`` on first need, kept in ``model_box``) and then cached."""
    key = json.dumps({"model": model_id, "prompts": prompts, "k": k, "layer": cfg.layer, "chat": True,
                      "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                      "seed": cfg.sample_seed, "per_call": cfg.prompts_per_call}, sort_keys=True)
    path = cache / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    from ..qprobe.features import sample_with_features

    if "model" not in model_box:
        model_box["model"], model_box["tokenizer"] = load()
    samples = sample_with_features(
        model_box["model"], model_box["tokenizer"], prompts, k, layer=cfg.layer, max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, chat=True, batch_size=cfg.prompts_per_call, seed=cfg.sample_seed,
        progress=ctx.show_progress)
    data = {"completions": samples.completions, "features": samples.features, "key": key}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    torch.save(data, tmp)
    tmp.rename(path)  # only a complete file is ever read back
    return data


def _rewards(completions: list[list[str]], answers: list[int]) -> torch.Tensor:
    from ..qprobe.rewards import numeric_match

    return torch.tensor([[numeric_match(c, answer, which="last") for c in row]
                         for row, answer in zip(completions, answers)])


def run_smollm2(cfg: SmolConfig, ctx: StudyContext, *, load: Callable[[], tuple] = _load_smollm2,
                model_id: str | None = None, cache: Path | None = None) -> StudyOutcome:
    """The whole study for one configuration.

    ``load`` returns ``(model, tokenizer)`` and is called only when a sample set is not cached;
    ``model_id`` names the model in the cache key and ``cache`` is the folder of cached samples
    (defaults: SmolLM2 and a folder next to its converted weights). Tests pass a tiny model.
    """
    import time

    from ..qprobe.smollm2 import cache_dir
    from .qprobe import fit_and_evaluate, summarize_runs

    model_id = model_id or _smollm2_id()
    cache = cache or cache_dir() / "qprobe-smollm2-samples"
    train_qa, test_qa = split_questions()
    train_qa, test_qa = train_qa[: cfg.train_prompts], test_qa[: cfg.test_prompts]
    box: dict = {}
    start = time.process_time()
    sets = {}
    for name, qa, k in (("train", train_qa, cfg.train_samples), ("test", test_qa, cfg.test_samples)):
        data = sample_cached([q for q, _ in qa], k, cfg, model_id, load, cache, box, ctx)
        sets[name] = {"features": data["features"], "rewards": _rewards(data["completions"], [a for _, a in qa]),
                      "completions": data["completions"]}
    sampling_cpu_s = time.process_time() - start
    train, test = sets["train"], sets["test"]
    runs = [fit_and_evaluate(cfg, train["features"], train["rewards"], test["features"], test["rewards"], seed, ctx)
            for seed in ctx.progress(ctx.seeds, "probe seeds")]
    extra = {"model": model_id, "sampled_now": "model" in box, "sampling_cpu_s": sampling_cpu_s,
             "train_mean_reward": float(sets["train"]["rewards"].mean()),
             "tuned_beta": [r["tuned_beta"] for r in runs],
             "example_test_completions": {q: sets["test"]["completions"][i][:4] for i, (q, _) in
                                          enumerate(test_qa[:3])}}
    return summarize_runs(cfg, runs, ctx, "SmolLM2-135M-Instruct, one-digit arithmetic", extra)


def _run(ctx: StudyContext) -> StudyOutcome:
    return run_smollm2(QUICK if ctx.quick else FULL, ctx)


STUDY = Study(
    name="qprobe-smollm2",
    claim=("On a real LM's sampled answers, choosing among k with a Q-probe beats one sample; L_PG beats L_CE "
           "and L_Q and keeps improving with k (Li et al., 2024)"),
    metric="expected reward at the largest k (beta per probe and k, chosen on training prompts)",
    lower_is_better=False,
    run=_run,
    seeds=5,
    quick_seeds=2,  # probes are cheap once the samples are cached; sampling dominates
    description="Q-probe selection on SmolLM2-135M-Instruct's answers to one-digit arithmetic in words",
    cores=2,
    cost=500,
    threads=2,  # the budget is two cores; more threads only contend (fixed: the numbers depend on it)
)
