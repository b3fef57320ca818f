"""Study ``presence``: self-influence flags corrupted LM data, and two-stage PRESENCE beats uniform.

A byte-level TinyGPT is trained on windows of the Python standard library's source files, of which
a share (30%) is corrupted by permuting the window's tokens (its bytes). Within a seed every method
shares the initialisation, the batch order and the data (paired); each seed redraws all three.
The metric is the next-byte loss on clean windows of held-out files.

Methods (``w = softmax(tau * zscore(SI))`` per batch, ``SI`` the squared norm of each unit's own
loss gradient over the parameters ``K``; from :class:`~reweighting.influence.SelfInfluence`):
``uniform`` (plain mean), ``direct`` (tau = +1 throughout), ``inverse`` (tau = -1 throughout) and
``presence`` (+1 for the first 10% of steps, then -1).

The method assumes that self-influence flags noisy samples, so that assumption is measured first,
on a selection seed (:func:`assumption_table`): the AUROC, corrupted vs clean window, of the
z-score each window gets in a training batch (batches drawn as training draws them, so with
micro-batch units of 4 windows a unit is a random mix of clean and corrupted windows), for four
corruptions and three choices of K. The best setting other than the study's own is chosen there
(:func:`~reweighting.studies.stats.select_best`); the evidence seeds then measure the AUROC and
the methods anew on the own setting and on the chosen one.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace

import torch

from . import (
    PartSpec,
    Protocol,
    Study,
    StudyContext,
    StudyOutcome,
    check_baseline,
    decide,
    declared_compare,
    select_best,
    summarize,
)
from .presence_data import (
    CORRUPTIONS,
    DONOR_CORRUPTIONS,
    Data,
    load_data,
    near_duplicate,
    permute_bytes,
    permute_words,
    random_bytes,
    shuffled_continuation,
    unigram_entropy,
)
from .presence_train import (
    FULL,
    METHODS,
    QUICK,
    SMOKE,
    Config,
    auroc,
    bigram_loss,
    evaluate,
    scope_modules,
    self_influence_loop,
    sequence_losses,
    train,
    train_uniform_cached,
    training_unit_auroc,
)

# The assumption is measured for these corruptions and choices of K (scopes) on the selection seeds.
ASSUMPTION_CORRUPTIONS = ("tokens", "random-bytes", "shuffled-continuation", "near-duplicate")
ASSUMPTION_SCOPES = ("first-block", "all", "units-of-4")
OWN_METHODS = ("uniform", "direct", "inverse", "presence")
SELECTED_METHODS = ("uniform", "direct", "presence")
SETTINGS = ("own setting", "selected setting")
# The base model must have learned this much context beyond byte frequencies (nats/byte).
CONTEXT_MARGIN = 0.5
# Paper-scaled effects. The paper reports no AUROC; "clearly above chance" is 0.6 and the effect
# expected beyond it 0.1. Its toy with 30% permuted sequences gave PRESENCE 2.8% below uniform and
# 12% below direct-only in held-out NLL; at this study's ~2.6 nats/byte that is 0.07 and 0.3.
EXPECTED = {"auroc": 0.1, "uniform": 0.07, "direct": 0.3}


def part_names(cfg: Config) -> list[str]:
    bar = 0.5 + cfg.auroc_margin
    return [name for s in SETTINGS for name in (f"{s}: self-influence AUROC on training units > {bar:.2f}",
                                                f"{s}: presence < uniform", f"{s}: presence < direct")]


def make_protocol(cfg: Config, seeds: int, selection: int, first_seed: int = 0) -> Protocol:
    names = part_names(cfg)
    expected = [EXPECTED["auroc"], EXPECTED["uniform"], EXPECTED["direct"]] * 2
    return Protocol(
        claim=STUDY_CLAIM, metric="clean held-out loss (nats/byte), lower is better; AUROC for the assumption",
        parts=tuple(PartSpec(n, expected=e) for n, e in zip(names, expected)), seeds=seeds,
        first_seed=first_seed, selection_seeds=selection, settings=tuple(sorted(asdict(cfg).items())),
        selection=(f"the selected setting: among {list(ASSUMPTION_CORRUPTIONS)} x {list(ASSUMPTION_SCOPES)} other "
                   f"than the own ({cfg.corruption}, K = {cfg.scope}), the highest mean AUROC on training units over "
                   "the selection seeds (one uniform model per corruption and seed); its AUROC there is never "
                   "evidence: the evidence seeds train and score anew",),
        baseline=f"uniform's mean clean held-out loss (own setting) is at least {CONTEXT_MARGIN} nats/byte below the "
                 "unigram entropy of the held-out bytes (an untrained or frequency-only model fails); an add-0.1 "
                 "byte-bigram of the same windows is reported beside it",
        replicates="each seed draws its own training windows, corruption draw, held-out windows, initialisation "
                   "and batch order; the methods of one seed share them (paired); the two settings are decided "
                   "separately, never pooled",
        deviations=(("a 2-layer, 64-wide byte-level GPT for 300 steps, not mT5 for 1M steps",
                     "a 2-core CPU budget; the weighting is the library's code at any size"),
                    ("the switch after 10% of the steps, as the paper's 100k of 1M", "scaled to the run length"),
                    ("corruption by permuting a window's bytes rather than its words", "word permutation barely "
                     "moves a byte-level model's self-influence (AUROC 0.54 in an earlier 600-step run)"),
                    ("no inverse-then-direct control", "its cost; the order of the stages is what presence vs "
                     "inverse shows")),
    )


STUDY_CLAIM = ("Self-influence flags corrupted sequences (higher SI), and two-stage PRESENCE beats uniform "
               "and direct-only weighting on clean held-out loss (Thakkar et al., EMNLP 2023)")
# 10 evidence seeds, sized from a pilot (the 3-seed run on seeds 0-2: paired sd 0.03-0.13 per part; at 10
# seeds the MDE of the AUROC and presence-vs-uniform parts is near their expected effects); the
# evidence seeds start at 100, past the pilot's.
FULL_SEEDS, FULL_FIRST_SEED = 10, 100
PROTOCOL = make_protocol(FULL, seeds=FULL_SEEDS, selection=1, first_seed=FULL_FIRST_SEED)
QUICK_PROTOCOL = make_protocol(QUICK, seeds=1, selection=1)


def setting_config(cfg: Config, corruption: str, scope: str) -> Config:
    """``cfg`` with ``corruption`` and the choice of K (``units-of-4``: the first block, micro-batch units of 4)."""
    if scope not in ASSUMPTION_SCOPES:
        raise ValueError(f"scope must be one of {ASSUMPTION_SCOPES}, got {scope!r}")
    units = scope == "units-of-4"
    return replace(cfg, corruption=corruption, scope="first-block" if units else scope,
                   microbatches=cfg.batch // 4 if units else None)


def unit_size(cfg: Config) -> int:
    return cfg.batch // cfg.microbatches if cfg.microbatches else 1


def assumption_row(cfg: Config, corruption: str, seed: int, device: torch.device,
                   cache: dict | None = None) -> dict[str, float]:
    """AUROC of the training z-scores, corrupted vs clean window, per choice of K, for a uniform model
    trained on ``corruption`` with seed ``seed``."""
    c_cfg = replace(cfg, corruption=corruption)
    data = load_data(c_cfg, seed)
    model = train_uniform_cached(data, c_cfg, seed, device, None, cache)["model"]
    row = {}
    for scope in ASSUMPTION_SCOPES:
        s_cfg = setting_config(c_cfg, corruption, scope)
        row[scope] = training_unit_auroc(model, data, s_cfg, s_cfg.scope, unit_size(s_cfg), seed, device)
    return row


def assumption_table(cfg: Config, seed: int, device: torch.device) -> dict[str, dict[str, float]]:
    """:func:`assumption_row` for every corruption, on seed ``seed`` (its rows in a worker pool)."""
    from .seed_pool import pool_map

    rows = pool_map(assumption_row, [(cfg, c, seed, device) for c in ASSUMPTION_CORRUPTIONS])
    return dict(zip(ASSUMPTION_CORRUPTIONS, rows))


def choose_setting(cfg: Config, tables: list[dict[str, dict[str, float]]]):
    """The :class:`Selection` of ``"corruption|scope"`` with the highest mean AUROC over the tables (one per
    selection seed), the own setting left out."""
    own = f"{cfg.corruption}|{'units-of-4' if cfg.microbatches else cfg.scope}"
    scores = {f"{c}|{s}": [t[c][s] for t in tables] for c in ASSUMPTION_CORRUPTIONS for s in ASSUMPTION_SCOPES}
    scores.pop(own, None)
    return select_best(scores, lower_is_better=False)


def setting_seed(cfg: Config, methods: tuple[str, ...], seed: int, device: torch.device, cache: dict) -> dict:
    """Every method of ``methods`` (uniform first) on seed ``seed``, and the AUROC of its uniform model on
    the units training uses."""
    data = load_data(cfg, seed)
    out = {"heldout": {}, "online_auroc": {}, "corrupted_weight_share": {}, "ess_fraction": {},
           "bigram": bigram_loss(data.pool, data.heldout), "unigram": unigram_entropy(data.heldout)}
    for m in methods:
        r = (train_uniform_cached(data, cfg, seed, device, None, cache) if m == "uniform"
             else train(data, cfg, m, seed, device))
        out["heldout"][m] = r["heldout"]
        if m == "uniform":
            out["auroc"] = training_unit_auroc(r["model"], data, cfg, cfg.scope, unit_size(cfg), seed, device)
        else:
            out["online_auroc"][m] = r.get("online_auroc")
            out["corrupted_weight_share"][m] = r["corrupted_weight_share"]
            out["ess_fraction"][m] = r["ess_fraction"]
    return out


def evidence_seed(own: Config, selected: Config, seed: int, device: torch.device) -> dict:
    """Both settings on one evidence seed (a uniform run both share is trained once)."""
    cache: dict = {}
    return {SETTINGS[0]: setting_seed(own, OWN_METHODS, seed, device, cache),
            SETTINGS[1]: setting_seed(selected, SELECTED_METHODS, seed, device, cache)}


def gather(per_seed: list[dict], cfg: Config) -> dict:
    """A setting's per-seed results as lists over the seeds."""
    methods = list(per_seed[0]["heldout"])
    weighted = list(per_seed[0]["corrupted_weight_share"])
    return {"heldout": {m: [r["heldout"][m] for r in per_seed] for m in methods},
            "auroc": [r["auroc"] for r in per_seed], "bigram": [r["bigram"] for r in per_seed],
            "unigram": [r["unigram"] for r in per_seed],
            **{k: {m: [r[k][m] for r in per_seed] for m in weighted}
               for k in ("online_auroc", "corrupted_weight_share", "ess_fraction")},
            "config": asdict(cfg)}


def setting_parts(protocol: Protocol, label: str, run: dict, cfg: Config) -> list:
    bar = 0.5 + cfg.auroc_margin
    h = run["heldout"]
    return [
        declared_compare(protocol, f"{label}: self-influence AUROC on training units > {bar:.2f}", run["auroc"],
                         [bar] * len(run["auroc"])),
        declared_compare(protocol, f"{label}: presence < uniform", h["presence"], h["uniform"], lower_is_better=True),
        declared_compare(protocol, f"{label}: presence < direct", h["presence"], h["direct"], lower_is_better=True),
    ]


def baseline_health(uniform_heldout: list[float], unigram: list[float] | float, margin: float = CONTEXT_MARGIN):
    """Uniform's mean clean held-out loss against the held-out bytes' unigram entropy (mean over seeds)
    less ``margin``: a model that learned byte frequencies and little context fails."""
    unigram = sum(unigram) / len(unigram) if isinstance(unigram, list) else unigram
    return check_baseline(f"uniform's clean held-out loss vs the held-out unigram entropy - {margin:g} (nats/byte)",
                          sum(uniform_heldout) / len(uniform_heldout), unigram - margin, higher_is_better=False)


def _plot(ctx: StudyContext, runs: dict) -> list[str]:
    from .report import new_figure, save_figure

    fig, ax = new_figure(7.0, 3.8)
    x = 0
    ticks, labels = [], []
    for label, (_, run) in runs.items():
        for m, values in run["heldout"].items():
            st = summarize(values)
            ax.bar(x, st["mean"], yerr=st["std"], capsize=3, color="#888888" if m == "uniform" else "#4C72B0")
            ticks.append(x)
            labels.append(f"{m}\n({label.split()[0]})")
            x += 1
        x += 1
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, fontsize=7)
    means = [summarize(v)["mean"] for _, run in runs.values() for v in run["heldout"].values()]
    ax.set_ylim(min(means) - 0.2, max(means) + 0.2)
    ax.set_ylabel("clean held-out loss (nats/byte)")
    return [save_figure(fig, ctx.out_dir / "heldout_loss.png")]


def _stage_mean(per_seed: list[dict], stage: str) -> float:
    values = [v[stage] for v in per_seed if v[stage] is not None]
    return sum(values) / len(values) if values else float("nan")


def _setting_lines(label: str, cfg: Config, run: dict, n_seeds: int) -> list[str]:
    h = run["heldout"]
    rows = []
    for m, values in h.items():
        st = summarize(values)
        d = summarize([a - b for a, b in zip(values, h["uniform"])])
        rows.append(f"| {m} | {st['mean']:.4f} ± {st['std']:.4f} | {d['mean']:+.4f} ± {d['std']:.4f} |")
    au = summarize(run["auroc"])
    online = {m: [v for v in vs if v is not None] for m, vs in run["online_auroc"].items()}
    shares = run["corrupted_weight_share"]
    return [
        f"### {label}: {cfg.corruption}, K = {cfg.scope}"
        + (f", micro-batch units of {unit_size(cfg)} windows" if cfg.microbatches else ""), "",
        f"{cfg.corrupt_share:.0%} of {cfg.train_sequences} training windows corrupted; {cfg.steps} steps of batch "
        f"{cfg.batch}, lr {cfg.lr:g}, switch after {round(cfg.switch_fraction * cfg.steps)} steps; {n_seeds} seed(s). "
        f"AUROC of the training z-scores (uniform's final model, {cfg.scored_batches} training-like batches): "
        f"{au['mean']:.3f} ± {au['std']:.3f}; pooled over the steps of training: "
        + ", ".join(f"{m} {sum(v) / len(v):.3f}" for m, v in online.items() if v) + ".", "",
        "| method | clean held-out loss | minus uniform (paired) |", "|---|---|---|", *rows, "",
        "| method | corrupted share of the weight, before the switch | after | ESS fraction before | after |",
        "|---|---|---|---|---|",
        *[f"| {m} | {_stage_mean(shares[m], 'first'):.3f} | {_stage_mean(shares[m], 'second'):.3f} | "
          f"{_stage_mean(run['ess_fraction'][m], 'first'):.2f} | {_stage_mean(run['ess_fraction'][m], 'second'):.2f} |"
          for m in shares], "",
    ]


def run_with(ctx: StudyContext, cfg: Config, protocol: Protocol | None = None) -> StudyOutcome:
    """The study at configuration ``cfg`` (``STUDY.run`` picks FULL or QUICK and their protocol).

    The assumption table and the choice of the second setting use ``ctx.selection_seeds`` only; the
    parts are computed on ``ctx.seeds``.
    """
    protocol = protocol or make_protocol(cfg, seeds=len(ctx.seeds), selection=len(ctx.selection_seeds),
                                         first_seed=ctx.seeds[0])
    if not ctx.selection_seeds or set(ctx.selection_seeds) & set(ctx.seeds):
        raise ValueError(f"presence needs selection seeds disjoint from the evidence seeds, got "
                         f"{ctx.selection_seeds} and {ctx.seeds}")
    from .seed_pool import pool_map

    start = time.process_time()
    tables = [assumption_table(cfg, s, ctx.device) for s in ctx.selection_seeds]
    selection = choose_setting(cfg, tables)
    corruption, scope = selection.chosen.split("|")
    selected = setting_config(cfg, corruption, scope)
    per_seed = pool_map(evidence_seed, [(cfg, selected, seed, ctx.device) for seed in ctx.seeds],
                        progress=ctx.progress, desc="evidence seeds")
    runs = {label: (c, gather([r[label] for r in per_seed], c)) for label, c in zip(SETTINGS, (cfg, selected))}
    parts = [p for label, (c, run) in runs.items() for p in setting_parts(protocol, label, run, c)]
    own = runs[SETTINGS[0]][1]
    baseline = baseline_health(own["heldout"]["uniform"], own["unigram"])
    verdict = decide(parts, baseline)

    mean_table = {c: {s: sum(t[c][s] for t in tables) / len(tables) for s in ASSUMPTION_SCOPES}
                  for c in ASSUMPTION_CORRUPTIONS}
    lines = [f"**The assumption first** (selection seed(s) {ctx.selection_seeds}, never evidence): AUROC, corrupted "
             "vs clean window, of the z-score each window gets in a training batch (batches drawn as in training; "
             "with units of 4 each unit is a random mix), a uniform model per corruption:", "",
             "| corruption | " + " | ".join(ASSUMPTION_SCOPES) + " |", "|---" * (len(ASSUMPTION_SCOPES) + 1) + "|",
             *[f"| {c} | " + " | ".join(f"{row[s]:.3f}" for s in ASSUMPTION_SCOPES) + " |"
               for c, row in mean_table.items()], "",
             f"Selected setting (best other than the own): **{corruption}, K = {scope}**, chosen with bootstrap "
             f"stability {selection.describe_stability()} over {selection.seeds} selection seed(s).", "",
             "| part of the claim | verdict | margin | noise | MDE | expected | seeds |",
             "|---|---|---|---|---|---|---|"]
    for part in parts:
        def fmt(v):
            return "n/a" if v is None else f"{v:.4f}"
        lines.append(f"| {part.name} | {part.verdict} | {part.margin:+.4f} | {fmt(part.noise)} | {fmt(part.mde)} | "
                     f"{fmt(part.expected)} | {part.n} |")
    bigram = sum(own["bigram"]) / len(own["bigram"])
    lines += ["", f"Baseline: {baseline.describe()}. An add-0.1 byte-bigram counted on the same training windows "
              f"scores {bigram:.3f}: uniform is {'below' if baseline.value < bigram else 'not below'} it"
              f" ({baseline.value - bigram:+.3f}). Verdict on the whole claim: **{verdict}**.", ""]
    for label, (c, run) in runs.items():
        lines += _setting_lines(label, c, run, len(ctx.seeds))
    details = {"assumption_auroc": tables, "selection": selection.as_dict(),
               "settings": {label: run for label, (_, run) in runs.items()},
               }
    methods = {f"{m} [{label}]": v for label, (_, run) in runs.items() for m, v in run["heldout"].items()}
    config = {**asdict(cfg), "selected": asdict(selected), "own_methods": list(OWN_METHODS),
              "selected_methods": list(SELECTED_METHODS), "cpu_seconds": time.process_time() - start}
    return StudyOutcome(methods=methods, holds=verdict == "holds", config=config, summary="\n".join(lines),
                        details=details, plots=_plot(ctx, runs), parts=parts, baseline=baseline)


def _run(ctx: StudyContext) -> StudyOutcome:
    return run_with(ctx, QUICK if ctx.quick else FULL, QUICK_PROTOCOL if ctx.quick else PROTOCOL)


STUDY = Study(
    name="presence",
    claim=STUDY_CLAIM,
    metric="clean held-out loss (nats/byte)",
    lower_is_better=True,
    run=_run,
    seeds=PROTOCOL.seeds,
    cost=1100,  # CPU seconds of the full run (measured)
    cores=2,  # the seeds (and the selection's corruptions) run in a pool of worker processes
    quick_seeds=QUICK_PROTOCOL.seeds,
    protocol=lambda quick: QUICK_PROTOCOL if quick else PROTOCOL,
    description="PRESENCE vs uniform and direct on a byte-level GPT with 30% corrupted windows, on its own setting "
                "and on the one where self-influence flags corruption best (chosen on a selection seed)",
)

__all__ = ["STUDY", "PROTOCOL", "QUICK_PROTOCOL", "Config", "FULL", "QUICK", "SMOKE", "METHODS", "run_with",
           "train", "load_data", "auroc", "permute_words", "permute_bytes", "random_bytes", "shuffled_continuation",
           "near_duplicate", "CORRUPTIONS", "DONOR_CORRUPTIONS", "Data", "assumption_table", "choose_setting",
           "self_influence_loop", "training_unit_auroc", "baseline_health", "unigram_entropy", "bigram_loss",
           "evaluate", "sequence_losses", "scope_modules", "make_protocol", "setting_config", "setting_seed",
           "evidence_seed", "assumption_row", "gather",
           "train_uniform_cached", "part_names", "setting_parts", "unit_size", "OWN_METHODS",
           "ASSUMPTION_CORRUPTIONS", "ASSUMPTION_SCOPES"]
