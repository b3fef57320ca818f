"""Study ``loss-reweighting-packed``: loss-based reweighting of documents packed several to a row.

Each row of the byte-level TinyGPT's batches holds several short documents (see
:func:`.lm_training.packed_batches`), 15% of them near-duplicates of boilerplate; the model attends
across documents within a row (GPT-style packing) and the loss never crosses a document boundary.
The claim's methods weight *documents* (``reweighting.packing.document_losses``); beside them is
reported the plain mean over documents (which weights a short document's tokens more: the unit the
document weights start from), to tell the cost of the unit from the effect of the tilt.
``uniform`` is the plain mean over rows.

Selection and evidence are apart as in ``loss-reweighting``: the full run trains at one learning
rate fixed from pilot runs on other seeds; with several candidates (``Config.packed_lrs``) the rates
of uniform and of the claim's methods are chosen on selection seeds (the reweighted ones keep
uniform's unless beaten by more than 0.01 nats/byte) and the reported methods run at uniform's. The
verdict is on the evidence seeds, each redrawing initialisation, batch stream and test windows.
"""

from __future__ import annotations

import time
from dataclasses import asdict

from . import (
    PartSpec,
    Protocol,
    Selection,
    Study,
    StudyContext,
    StudyOutcome,
    compare,
    decide,
    declared_compare,
    select_best,
)
from .lm_training import (
    FULL,
    QUICK,
    Config,
    baseline_health,
    data_for,
    ngram_reference,
    packed_job,
    run_jobs,
    test_rows,
    worker_pool,
)
from .loss_reweighting import EXPECTED_GAIN, NGRAM_MARGIN, SELECTION_TOLERANCE, lr_rule

CLAIMED = ("linupper (documents)", "quadratic (documents)")
SELECTED = ("uniform", *CLAIMED)
REPORTED = ("uniform (documents)",)
PACKED_METHODS = (*SELECTED, *REPORTED)
CLAIM = ("LinUpper and Quadratic loss-based reweighting of documents packed several to a row beat uniform on LM "
         "data with redundant (near-duplicated) documents (Sow et al., ICLR 2025; packed mode)")

__all__ = ["STUDY", "PROTOCOL", "run_packed", "PACKED_METHODS", "CLAIMED"]


def protocol(cfg: Config, seeds: int, selection: int, first_seed: int = 0) -> Protocol:
    """The declared protocol of the packed study at configuration ``cfg``."""
    return Protocol(
        claim=CLAIM, metric="held-out test loss (nats/byte), lower is better",
        parts=tuple(PartSpec(f"{m} < uniform (packed, redundant)", "better", expected=EXPECTED_GAIN) for m in CLAIMED),
        seeds=seeds, selection_seeds=selection, first_seed=first_seed, settings=tuple(sorted(asdict(cfg).items())),
        selection=(lr_rule(cfg.packed_lrs, f"lr of uniform and of the claim's methods from {list(cfg.packed_lrs)}: "
                           "lowest mean validation loss over the selection seeds, the reweighted ones keeping "
                           f"uniform's unless better by more than {SELECTION_TOLERANCE}; the reported methods at "
                           "uniform's lr"),),
        baseline=f"uniform beats the tuned add-alpha n-gram of the clean windows by {NGRAM_MARGIN} nats/byte on the "
                 "test windows",
        replicates="each evidence seed redraws initialisation, the packed batch stream and its test windows",
        deviations=(("documents of 12-40 bytes packed into 65-byte rows", "many documents per row on a CPU "
                     "budget, where the unit of weighting matters most"),
                    ("the same strategies weighting whole rows are not run", "CPU budget; they decide no part")),
    )


# Seeds 0-3 were the pilots (the fixed lr comes from them): the evidence seeds start past them.
PROTOCOL = protocol(FULL, seeds=6, selection=0, first_seed=100)
QUICK_PROTOCOL = protocol(QUICK, seeds=2, selection=1)


def run_packed(ctx: StudyContext, cfg: Config, proto: Protocol) -> StudyOutcome:
    """The packed-mode study at configuration ``cfg`` under protocol ``proto``."""
    from .lm import ngram_log_loss

    start = time.perf_counter()
    seeds, sel_seeds = list(ctx.seeds), list(ctx.selection_seeds) or [1000]
    data = data_for(cfg)
    grid = cfg.packed_lrs
    with worker_pool(cfg, ctx) as pool:
        jobs = [(m, lr, seed) for m in SELECTED for lr in grid for seed in sel_seeds] if len(grid) > 1 else []
        sel = run_jobs(ctx, packed_job, cfg, jobs, pool, "packed lr selection") if jobs else {}
        if jobs:
            scores = {m: {lr: [sel[(m, lr, seed)]["validation"] for seed in sel_seeds] for lr in grid}
                      for m in SELECTED}
            chosen = {"uniform": select_best(scores["uniform"])}
            for m in CLAIMED:
                chosen[m] = select_best(scores[m], prefer=chosen["uniform"].chosen, tolerance=SELECTION_TOLERANCE)
        else:  # one candidate: declared, nothing chosen
            chosen = {m: Selection.fixed(grid[0]) for m in SELECTED}
        lr_of = {m: chosen[m].chosen if m in chosen else chosen["uniform"].chosen for m in PACKED_METHODS}
        jobs = [(m, lr_of[m], seed) for m in PACKED_METHODS for seed in seeds]
        runs = run_jobs(ctx, packed_job, cfg, jobs, pool, "packed evidence seeds")
    test = {m: [runs[(m, lr_of[m], s)]["test"] for s in seeds] for m in PACKED_METHODS}
    share = {m: [runs[(m, lr_of[m], s)]["duplicate_weight_share"] for s in seeds] for m in PACKED_METHODS}
    parts = [declared_compare(proto, f"{m} < uniform (packed, redundant)", test[m], test["uniform"],
                              lower_is_better=True) for m in CLAIMED]
    reported = [compare(f"{m} (documents) < uniform (documents)", test[f"{m} (documents)"],
                         test["uniform (documents)"], lower_is_better=True) for m in ("linupper", "quadratic")]
    reported.append(compare("uniform (documents) < uniform", test["uniform (documents)"], test["uniform"],
                            lower_is_better=True))
    ngram = ngram_reference(data, cfg)
    ngram_test = [ngram_log_loss(data.clean, test_rows(data, cfg, s), ngram["order"], ngram["alpha"]) for s in seeds]
    baseline = baseline_health([u - n for u, n in zip(test["uniform"], ngram_test)], NGRAM_MARGIN)
    verdict = decide(parts, baseline)
    per_row = runs[(PACKED_METHODS[0], lr_of[PACKED_METHODS[0]], seeds[0])]["documents_per_row"]
    lines = [f"Packed rows ({per_row:.1f} documents per row on average, lengths {cfg.doc_len[0]}-{cfg.doc_len[1]} "
             f"bytes, {cfg.duplicate_share:.0%} near-duplicates), {cfg.steps} steps, {len(seeds)} evidence seeds; "
             "held-out test loss (nats/byte).", "",
             "| part | verdict | margin | noise | MDE |", "|---|---|---|---|---|"]
    for p in parts + reported:
        lines.append(f"| {p.name}{'' if p in parts else ' (reported)'} | {p.verdict} | {p.margin:+.3f} | "
                     + (f"{p.noise:.3f} | {p.mde:.3f} |" if p.noise is not None else "n/a | n/a |"))
    lines += ["", "| method | lr | test loss | weight share on near-duplicate documents |", "|---|---|---|---|"]
    for m in PACKED_METHODS:
        mean = sum(test[m]) / len(test[m])
        lines.append(f"| {m} | {lr_of[m]:g} | {mean:.3f} | {sum(share[m]) / len(share[m]):.3f} |")
    lines += ["", f"Baseline: {baseline.describe()}. Verdict on the claim: **{verdict}**."]
    return StudyOutcome(
        methods=test, holds=verdict == "holds", parts=parts, baseline=baseline, summary="\n".join(lines),
        config={**asdict(cfg), "packed": True, "chosen_lr": lr_of, "ngram": ngram,
                "training_seconds": time.perf_counter() - start},
        details={"selection": {m: c.as_dict() for m, c in chosen.items()}, "duplicate_weight_share": share,
                 "reported_parts": [p.as_dict() for p in reported], "documents_per_row": per_row,
                 "ngram_test": ngram_test})


STUDY = Study(
    name="loss-reweighting-packed",
    claim=CLAIM,
    metric="held-out test loss (nats/byte)",
    lower_is_better=True,
    run=lambda ctx: run_packed(ctx, QUICK if ctx.quick else FULL, QUICK_PROTOCOL if ctx.quick else PROTOCOL),
    seeds=PROTOCOL.seeds,
    quick_seeds=QUICK_PROTOCOL.seeds,
    full_only=True,  # about an hour of CPU together with its pair: reproduce --full
    cores=2,  # a pool of worker processes, one training run each
    cost=1170,  # CPU seconds of the full run (measured: 1147 and 1185 in two runs)
    protocol=lambda quick: QUICK_PROTOCOL if quick else PROTOCOL,
    description="loss-based reweighting of packed documents vs of whole rows vs uniform on a byte-level GPT",
)
