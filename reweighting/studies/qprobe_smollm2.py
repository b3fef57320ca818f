"""Q-probe on a real LM: SmolLM2-135M-Instruct doing one-digit arithmetic asked in words.

The 200 questions "What is seven plus five?" / "What is seven times five?" (every one-digit pair,
both operations) go through the model's chat template. Each question's pool of completions is
sampled once at temperature 1 (top 50 tokens, up to 10 new tokens) and cached (``qprobe_pool``); a
completion is rewarded 1 when the last number it writes is the answer (the model often repeats the
operands first, "Seven plus five is 12"). Its feature is the residual stream after block 20 of 30 at
the position that emitted its final token.

Each seed draws its own split of the 200 questions into test, fit and validation questions, and
its own completions of each question from that question's pool, without replacement, in its own
order; probes are fitted and scored as ``qprobe_eval`` describes (beta chosen on the validation
questions, a shuffled-reward control). Sampling dominates the cost, so the pool is drawn once; the
protocol says how far that makes the seeds' replicates independent.

The default setting decides at k up to 16 (a pool of 16 completions per question); the large
setting (``REWEIGHTING_QPROBE_SMOLLM2=large``) samples 64 per question and decides at k = 48, as
the paper does, at about four times the sampling cost.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import Study, StudyContext, StudyOutcome
from .protocol import Protocol, perturbation
from .qprobe_eval import SampleSet, declare_parts, fit_and_evaluate
from .qprobe_report import summarize_runs

__all__ = ["SmolConfig", "FULL", "LARGE", "QUICK", "SETTING_ENV", "questions", "split_questions", "draw_replicate",
           "protocol_for", "run_smollm2", "STUDY"]

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
OPERATIONS = {"plus": lambda a, b: a + b, "times": lambda a, b: a * b}
SETTING_ENV = "REWEIGHTING_QPROBE_SMOLLM2"


@dataclass(frozen=True)
class SmolConfig:
    layer: int = 20  # of SmolLM2-135M's 30 blocks: middle to late, as the paper's 26 of 32
    max_new_tokens: int = 10  # room for a short sentence that ends with the answer
    temperature: float = 1.0
    top_k: int = 50  # transformers' default for sampling, as the study's earlier runs used
    pool_seed: int = 0
    pool: int = 16  # completions sampled (once, cached) per question
    question_stride: int = 1  # every n-th of the 200 questions (quick mode samples fewer)
    # Each seed's split of the 200 questions, and the completions it draws from each question's pool.
    test_prompts: int = 80
    test_samples: int = 16
    train_prompts: int = 80
    train_samples: int = 8
    val_prompts: int = 40
    val_samples: int = 16
    ks: tuple[int, ...] = (1, 2, 4, 8, 16)
    betas: tuple[float, ...] = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
    beta_resamples: int = 200
    # The paper's lr of 5e-5 is tuned for ~100x more samples; 640 barely move the probe at that rate.
    probe_lr: float = 1e-3
    probe_epochs: int = 150
    probe_batch: int = 1000
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        available = len(range(0, len(WORDS) ** 2 * len(OPERATIONS), self.question_stride))
        if self.test_prompts + self.train_prompts + self.val_prompts > available:
            raise ValueError(f"SmolConfig: test + train + val prompts exceed the {available} questions")
        for name in ("test_samples", "train_samples", "val_samples"):
            if getattr(self, name) > self.pool:
                raise ValueError(f"SmolConfig: {name} = {getattr(self, name)} exceeds the pool of {self.pool}")
        if max(self.ks) > self.test_samples:
            raise ValueError(f"SmolConfig: the largest k ({max(self.ks)}) exceeds test_samples ({self.test_samples})")


FULL = SmolConfig()
LARGE = replace(FULL, pool=64, test_samples=48, train_samples=16, val_samples=48, ks=(1, 2, 4, 8, 16, 48))
QUICK = replace(FULL, pool=4, question_stride=6, test_prompts=12, test_samples=4, train_prompts=12, train_samples=4,
                val_prompts=8, val_samples=4, ks=(1, 2, 4), probe_epochs=100, beta_resamples=50)


def questions() -> list[tuple[str, int]]:
    """All 200 one-digit questions in words, with their answers."""
    return [(f"What is {WORDS[a]} {op} {WORDS[b]}?", fn(a, b))
            for op, fn in OPERATIONS.items() for a in range(10) for b in range(10)]


def split_questions(seed: int, sizes: tuple[int, int, int], total: int = 200) -> tuple[torch.Tensor, ...]:
    """Seed ``seed``'s disjoint test, fit and validation question indices (a random permutation of
    ``range(total)``, cut into ``sizes``)."""
    order = torch.randperm(total, generator=torch.Generator().manual_seed(1_000_003 * seed + 5))
    test, fit = sizes[0], sizes[0] + sizes[1]
    return order[:test], order[test:fit], order[fit: fit + sizes[2]]


def draw_replicate(cfg: SmolConfig, seed: int, features: torch.Tensor, rewards: torch.Tensor
                   ) -> tuple[dict[str, SampleSet], dict[str, torch.Tensor]]:
    """Seed ``seed``'s fit, validation and test sets from the pools ``features [200, pool, D]`` and
    ``rewards [200, pool]``: its own questions split, and for each question its own completions,
    drawn from the pool without replacement in a random order (the order sets the chunks of k)."""
    g = torch.Generator().manual_seed(1_000_003 * seed + 7)
    test, fit, val = split_questions(seed, (cfg.test_prompts, cfg.train_prompts, cfg.val_prompts), len(rewards))
    sets, picked = {}, {}
    for name, idx, n in (("fit", fit, cfg.train_samples), ("val", val, cfg.val_samples),
                         ("test", test, cfg.test_samples)):
        cols = torch.argsort(torch.rand(len(idx), rewards.shape[1], generator=g), dim=1)[:, :n]
        rows = idx[:, None].expand(-1, n)
        sets[name] = SampleSet(features[rows, cols], rewards[rows, cols].float())
        picked[name] = idx
    return sets, picked


def _smollm2_id() -> str:
    from ..qprobe.smollm2 import MODEL_NAME, gguf_path

    return f"{MODEL_NAME}-{gguf_path().stem}"


def _load_smollm2():
    from ..qprobe.smollm2 import load_smollm2

    return load_smollm2(progress=False)


def _rewards(completions: list[list[str]], answers: list[int]) -> torch.Tensor:
    from ..qprobe.rewards import numeric_match

    return torch.tensor([[numeric_match(c, answer, which="last") for c in row]
                         for row, answer in zip(completions, answers)])


def run_smollm2(cfg: SmolConfig, ctx: StudyContext, protocol: Protocol | None = None, *,
                load: Callable[[], tuple] = _load_smollm2, model_id: str | None = None,
                cache: Path | None = None, qa: list[tuple[str, int]] | None = None) -> StudyOutcome:
    """The whole study for one configuration on ``ctx.seeds``.

    ``load`` returns ``(model, tokenizer)`` and is called only when a question's pool is not cached;
    ``model_id`` names the model in the cache key and ``cache`` is the folder of cached pools
    (defaults: SmolLM2 and a folder next to its converted weights); ``qa`` the questions (default:
    all 200). Tests pass a tiny model and fewer questions.
    """
    import time

    from .qprobe_pool import pooled_samples

    protocol = protocol or protocol_for(cfg, len(ctx.seeds))
    if cache is None:
        from ..qprobe.smollm2 import cache_dir

        cache = cache_dir() / "qprobe-smollm2-pools"
    model_id = model_id or _smollm2_id()
    qa = qa or questions()[:: cfg.question_stride]
    if cfg.test_prompts + cfg.train_prompts + cfg.val_prompts > len(qa):
        raise ValueError(f"run_smollm2: test + train + val prompts exceed the {len(qa)} questions")
    box: dict = {}
    start = time.process_time()
    settings = {"layer": cfg.layer, "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                "top_k": cfg.top_k, "seed": cfg.pool_seed}
    if perturbation() is not None:
        # a perturbed run samples its own pool: a cached one would carry the unperturbed rounding over
        settings["perturbation"] = perturbation()
    pool = pooled_samples([q for q, _ in qa], cfg.pool, settings=settings, model_id=model_id, load=load, cache=cache,
                          model_box=box, progress=lambda it, desc: ctx.progress(it, desc=desc))
    sampling_cpu_s = time.process_time() - start
    rewards = _rewards(pool["completions"], [a for _, a in qa])
    runs, splits = [], []
    for seed in ctx.progress(ctx.seeds, "seeds"):
        sets, picked = draw_replicate(cfg, seed, pool["features"], rewards)
        runs.append({**fit_and_evaluate(cfg, sets["fit"], sets["val"], sets["test"], seed, ctx),
                     "train_mean_reward": float(sets["fit"].rewards.mean())})
        splits.append({name: idx.tolist() for name, idx in picked.items()})
    overlap = _test_overlap(splits)
    extra = {**asdict(cfg), "model": model_id, "sampled_now": "model" in box, "sampling_cpu_s": sampling_cpu_s,
             "pool_mean_reward": float(rewards.float().mean()),
             "train_mean_reward": [r["train_mean_reward"] for r in runs]}
    details = {"test_question_overlap_between_seeds": overlap,
               "example_completions": {qa[i][0]: pool["completions"][i][:4] for i in range(0, len(qa), 67)}}
    return summarize_runs(cfg, protocol, runs, ctx, "SmolLM2-135M-Instruct, one-digit arithmetic", extra, details)


def _test_overlap(splits: list[dict]) -> float | None:
    """Mean share of one seed's test questions that another seed also tests (None for one seed)."""
    shares = [len(set(a["test"]) & set(b["test"])) / len(a["test"])
              for i, a in enumerate(splits) for b in splits[i + 1:]]
    return sum(shares) / len(shares) if shares else None


CLAIM = ("On a real LM's sampled answers, choosing among k with a Q-probe beats one sample; L_PG beats L_CE "
         "and L_Q and keeps improving with k (Li et al., 2024)")
METRIC = "expected reward at the largest k (beta per probe and k, chosen on held-out validation questions)"
# pass@k - pass@1 on the test questions at the largest k, which scales the paper's gains (shares of its
# headroom): estimated from the study's earlier single sample set (pass@8 - pass@1 = 0.21 on 70 test
# questions), extrapolated to k = 16 and 48; not yet re-measured on the pooled samples.
PILOT_HEADROOM = {"default": 0.25, "large": 0.35}
# The control's margin: the shuffled-reward probe may exceed pass@1 by at most 0.015 (about a third of
# the smallest expected gain at the default k).
CONTROL_TOLERANCE = 0.015
SELECTION = (
    "beta: for each evidence seed, probe and k, the beta of the grid (0 to 10, 0 = argmax) with the best mean "
    "expected return over that seed's validation questions (at k, or at the validation samples per question if "
    "fewer), by select_best with the validation questions as units; its stability (share of 200 bootstrap "
    "resamples of those questions that pick the same beta) is reported. Neither the probe's fit questions nor "
    "the test questions enter the choice.",
    "The paper's fixed beta (0.1) is reported beside the tuned one for every probe and k.",
    "No other setting is chosen in this protocol: layer 20, temperature 1 with the top 50 tokens, 10 new "
    "tokens and the probe's learning rate 1e-3 are fixed as declared (carried from the study's earlier runs).",
)
BASELINE = ("healthy when the mean over seeds of pass@k - pass@1 on the test questions at the largest k is >= 0.1. "
            "The control part checks the pipeline: L_PG fitted on rewards shuffled within each fit question, "
            "scored like the others (beta tuned on the validation questions), must not beat pass@1 by more than "
            "the tolerance; a leak of the test rewards into Q or the choice of beta would. The check presumes that a "
            "random direction of the 576-dimensional features carries little of the signal (in few dimensions "
            "one can, and beta tuned on held-out questions keeps its sign when it helps).")
DEVIATIONS = (
    ("SmolLM2-135M-Instruct on 200 one-digit questions in words, reward = the last number is the answer, "
     "instead of Code-LLaMA-7B on MBPP with unit tests", "the largest model whose sampling fits the 2-core CPU "
     "budget, shipped as a GGUF file by an installed package (nothing is downloaded)"),
    ("the control is one-sided (the shuffled-reward probe must not beat pass@1)", "a probe without signal is "
     "not neutral: the right completions of a question are often the same few words, with near-identical "
     "features, so a signal-free score ties them while it spreads the many different wrong ones, and a "
     "choice among the spread falls on a wrong one more often than one random sample does; in the tiny-GPT "
     "pilot the shuffled-reward probe scored below pass@1"),
    ("probe learning rate 1e-3 instead of 5e-5", "the paper's rate suits ~100x more samples"),
    ("beta chosen per probe and k on held-out validation questions, beside the paper's fixed 0.1",
     "the scale of Q differs between objectives, so one fixed beta favours some"),
)


def _replicates(cfg: SmolConfig) -> str:
    share = cfg.test_prompts / 200
    return (f"each question's pool of {cfg.pool} completions is sampled once (a generator seeded by the question "
            f"and the pool seed) and cached. Each evidence seed s draws its own split of the 200 questions into "
            f"test ({cfg.test_prompts}), fit ({cfg.train_prompts}) and validation ({cfg.val_prompts}), and for each "
            f"question its own {cfg.test_samples} / {cfg.train_samples} / {cfg.val_samples} completions from the "
            "pool without replacement in its own order, and its own reward shuffle for the control. Not fully "
            f"independent: two seeds test about {share:.0%} of the same questions (reported), and for those "
            f"they share {cfg.test_samples} of {cfg.pool} completions of each (all of them in the default setting, "
            "chunked differently), so the noise leaves out part of the sampling variance of those questions; "
            "what varies freely between seeds is which questions are tested, fitted on and tuned on.")


def protocol_for(cfg: SmolConfig, seeds: int, setting: str = "default") -> Protocol:
    """The protocol of a run of ``cfg`` on ``seeds`` evidence seeds."""
    headroom = PILOT_HEADROOM.get(setting, PILOT_HEADROOM["default"])
    deviations = DEVIATIONS
    if setting == "default":
        deviations += ((f"k up to {max(cfg.ks)} instead of 48 (the large setting, {SETTING_ENV}=large, decides at "
                        "48)", "a pool of 64 completions for each of 200 questions costs about four times the "
                        "2-core CPU budget of the default run"),)
    return Protocol(claim=CLAIM, metric=METRIC, parts=declare_parts(cfg.ks, headroom, CONTROL_TOLERANCE),
                    seeds=seeds, selection_seeds=0,
                    settings=tuple(sorted(asdict(cfg).items())) + (("setting", setting),),
                    selection=SELECTION, baseline=BASELINE, replicates=_replicates(cfg), deviations=deviations)


def _setting() -> str:
    value = os.environ.get(SETTING_ENV, "").strip() or "default"
    if value not in ("default", "large"):
        raise ValueError(f"{SETTING_ENV}={value!r}: expected 'default' or 'large'")
    return value


def _config(quick: bool) -> tuple[SmolConfig, Protocol]:
    if quick:
        return QUICK, protocol_for(QUICK, 2, "quick")
    setting = _setting()
    cfg = LARGE if setting == "large" else FULL
    return cfg, protocol_for(cfg, 8, setting)


def _run(ctx: StudyContext) -> StudyOutcome:
    cfg, protocol = _config(ctx.quick)
    return run_smollm2(cfg, ctx, protocol)


STUDY = Study(
    name="qprobe-smollm2",
    claim=CLAIM,
    metric=METRIC,
    lower_is_better=False,
    run=_run,
    seeds=8,
    quick_seeds=2,
    description="Q-probe selection on SmolLM2-135M-Instruct's answers to one-digit arithmetic in words",
    cores=1,
    cost=380,  # CPU seconds of the full run with its completions sampled (measured)
    threads=1,  # sampling one question's batch on one thread: two contend on a busy 2-core machine
    protocol=lambda quick: _config(quick)[1],
)
