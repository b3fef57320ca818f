"""Study ``noisy-labels``: RENT against forward correction, reweighting, DWS and CE on noisy digits.

Bae et al. (ICLR 2024) claim that resampling by the transition-matrix importance weights (RENT)
outperforms the existing ways of using a transition matrix, forward loss correction (FL) and
reweighting (RW) among them, and that it beats plain cross-entropy under heavy noise. Here:
scikit-learn's bundled 8x8 digits (1797 real images, nothing downloaded), a small MLP, symmetric
20% / 50% and pair 20% / 40% label noise on the training and validation labels. Every method trains
from scratch (one initialisation per seed, shared by the methods); ``T`` is estimated by anchor
points (the paper's "Forward") from the cross-entropy run's model after its first epochs (the
warm-up the estimator needs). Each method reports the clean test accuracy at the epoch with the best
accuracy on the noisy validation split (the paper's model selection), the final epoch beside it.

The weight decay is chosen on selection seeds (their own splits, noise draws and initialisations)
by the noisy-validation accuracy; the verdict is on the evidence seeds only. Settings share a seed,
so the comparisons over settings average each seed's settings first and compare across seeds.
The run's pieces (data, model, one job) are in :mod:`.noisy_labels_run`, the report in
:mod:`.noisy_labels_report`.
"""

from __future__ import annotations

from dataclasses import replace

from . import Study, StudyContext, StudyOutcome, check_baseline, decide, declared_compare, select_best
from .noisy_labels_run import CLEAN, CLEAN_CE, MLP, Batches, Config, digits_split, job_pool, noisy_labels, run_jobs
from .protocol import PartSpec, Protocol

__all__ = ["STUDY", "PROTOCOL_FULL", "PROTOCOL_QUICK", "CONFIGS", "MLP", "Batches", "digits_split", "noisy_labels",
           "baseline_health", "claim_parts", "run"]

CLAIM = ("Resampling by transition-matrix importance weights (RENT) outperforms the existing ways of using the "
         "transition matrix, forward correction (FL) and reweighting (RW), and beats cross-entropy at 50% "
         "symmetric noise (Bae et al., ICLR 2024).")
METRIC = "clean test accuracy at the epoch with the best noisy-validation accuracy"
PART_FL = "RENT > FL (estimated T; per seed, mean over the noise settings)"
PART_RW = "RENT > RW (estimated T; per seed, mean over the noise settings)"
PART_CE = "RENT > CE at symmetric 50%"
# Expected effects: the paper's margin (CIFAR-10, T by Forward) as a share of its CE error in the same
# setting (RENT - FL: 4.9/26.6 = 18% at symmetric 20%, 10.2/53.4 = 19% at symmetric 50%, 3.6/30.3 = 12% at
# asymmetric 40%, taken for both pair settings; RENT - RW: 16%, 12%, 15.5%; RENT - CE at symmetric 50%:
# 22.4/53.4 = 42%), times CE's error here in that setting (pilot on selection seeds 1000-1003: 4.5, 8.3,
# 10.4 and 33.4 points at symmetric 20%, symmetric 50%, pair 20%, pair 40%), averaged over the settings.
EXPECTED = {PART_FL: 0.019, PART_RW: 0.021, PART_CE: 0.035}
WEIGHT_DECAYS = (1e-4, 1e-3)
PREFERRED_WEIGHT_DECAY = 1e-4
# a weight decay other than the preferred one must beat it by more than this much noisy-validation accuracy
SELECTION_TOLERANCE = 0.005

CONFIGS: dict[str, Config] = {
    # The true-T rows are diagnostics; at 8 seeds they do not fit the CPU budget.
    "full": Config(true_t=()),
    "quick": Config(epochs=15, estimate_epoch=5, true_t=()),
    # For the test suite: the real code path on a fraction of the work.
    "smoke": Config(hidden=32, lr=1e-2, batch_size=128, epochs=3, estimate_epoch=2, noises=("sym-50",),
                    true_t=("RENT",)),
}
# 24 evidence seeds, sized from a pilot (the 8-seed run on seeds 0-7: paired sd 0.015-0.025 per part, so
# 24 seeds put the noise near 0.006-0.010, below the expected effects and below the pilot's margins);
# the evidence seeds start at 100, past the pilot's.
FULL_SEEDS, FULL_SELECTION_SEEDS, FULL_FIRST_SEED = 24, 2, 100

# The warm-up model (cross-entropy on the noisy labels) must reach this clean test accuracy in every
# noise setting (chance is 0.1): below it, T would be estimated from a model that has not learned the
# digits and the methods' differences would say nothing about how they use T.
HEALTHY_WARMUP_ACCURACY = 0.6


def _protocol(quick: bool) -> Protocol:
    config = CONFIGS["quick" if quick else "full"]
    return Protocol(
        claim=CLAIM,
        metric=METRIC,
        parts=tuple(PartSpec(name, expected=EXPECTED[name]) for name in (PART_FL, PART_RW, PART_CE)),
        seeds=2 if quick else FULL_SEEDS,
        first_seed=0 if quick else FULL_FIRST_SEED,
        selection_seeds=1 if quick else FULL_SELECTION_SEEDS,
        settings=(("dataset", "scikit-learn digits, 1797 8x8 images; per seed 30% test, 20% of the rest a "
                   "validation split with noisy labels, the rest training"),
                  ("noise", list(config.noises)), ("model", f"MLP 64-{config.hidden}-{config.hidden}-10"),
                  ("optimizer", f"Adam lr {config.lr}, batch {config.batch_size}, {config.epochs} epochs"),
                  ("T estimator", f"anchor points (quantile {config.quantile}) on the CE run's model after "
                   f"{config.estimate_epoch} epochs"),
                  ("DWS alpha", config.dws_alpha), ("weight decay candidates", list(WEIGHT_DECAYS)),
                  ("methods", ["CE", "FL", "RW", "DWS", "RENT", CLEAN_CE]
                   + [f"{m} (true T)" for m in config.true_t])),
        selection=(f"weight decay: among {list(WEIGHT_DECAYS)}, the best mean noisy-validation accuracy (at each "
                   "run's selected epoch, averaged over the methods and noise settings) on the selection seeds; "
                   f"{PREFERRED_WEIGHT_DECAY} is kept unless another beats it by more than {SELECTION_TOLERANCE}; "
                   "one value for every method",
                   "epoch: per run, the first epoch with the highest accuracy on the noisy validation split "
                   "(the final epoch is reported beside it)"),
        baseline=("the CE run's model after the warm-up epochs (the one T is estimated from) must reach clean "
                  f"test accuracy >= {HEALTHY_WARMUP_ACCURACY} in every noise setting (mean over seeds)"),
        replicates=("each seed redraws the test/validation/training split, the initialisation (shared by the "
                    "methods of that seed), the data order, the resampling draws and, per setting, the label-noise "
                    "draw; settings share a seed, so they are averaged per seed before comparing across seeds"),
        deviations=(("scikit-learn digits instead of CIFAR-10", "no data set may be downloaded; no installed "
                     "package ships a harder image data set"),
                    ("a two-hidden-layer MLP with Adam instead of a ResNet with SGD", "fits the CPU budget of a "
                     "2-core machine for 8 + 2 seeds x 4 settings x 5 methods"),
                    ("T is estimated from the CE run's own checkpoint, and all methods train from scratch",
                     "the estimator needs a warm-up model; the CE run provides it without a separate run"),
                    ("pair 20% added beside the paper's settings", "a mild asymmetric setting"),
                    ("expected effects scaled by CE's error", "accuracy on digits is far higher than on CIFAR-10; "
                     "the paper's margins are taken as shares of its CE error"),
                    ("no runs with the true T", "the CPU budget of the default run (they are diagnostics, "
                     "available through Config.true_t)")),
        notes=("cleanlab, when installed, is a peer of the T estimate only (its error to the true T beside "
               "the anchor and DualT estimates)",
               f"expected effects: {', '.join(f'{k}: {v}' for k, v in EXPECTED.items())}",),
    )

PROTOCOL_FULL, PROTOCOL_QUICK = _protocol(False), _protocol(True)


def baseline_health(warmup_accuracy: dict[str, list[float]], bar: float = HEALTHY_WARMUP_ACCURACY):
    """The health check: the lowest per-setting mean clean test accuracy of the warm-up model against ``bar``."""
    worst = min(_mean(values) for values in warmup_accuracy.values())
    return check_baseline("warm-up model's clean test accuracy (lowest noise-setting mean)", worst, bar)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def per_seed_mean(methods: dict[str, list[float]], noises: list[str], name: str) -> list[float]:
    """Method ``name``'s metric averaged over the noise settings, one value per seed."""
    columns = [methods[f"{noise} / {name}"] for noise in noises]
    return [_mean([column[i] for column in columns]) for i in range(len(columns[0]))]


def claim_parts(methods: dict[str, list[float]], noises: list[str], protocol: Protocol = PROTOCOL_FULL):
    """The claim's parts: RENT vs FL and vs RW on each seed's mean over the settings, and RENT vs CE at
    symmetric 50% (compared on the settings' mean when that setting did not run)."""
    rent = per_seed_mean(methods, noises, "RENT")
    parts = [declared_compare(protocol, name, rent, per_seed_mean(methods, noises, other))
             for name, other in ((PART_FL, "FL"), (PART_RW, "RW"))]
    heavy = ["sym-50"] if "sym-50" in noises else noises
    parts.append(declared_compare(protocol, PART_CE, per_seed_mean(methods, heavy, "RENT"),
                                  per_seed_mean(methods, heavy, "CE")))
    return parts


def _collect(results: dict, seeds: list[int], weight_decay: float, noises: list[str], key: str) -> dict:
    """``{"<noise> / <method>": [value per seed]}`` of ``key`` ("selected", "final" or "epoch")."""
    methods: dict[str, list[float]] = {}
    for seed in seeds:
        for noise in noises:
            for name, run in results[(seed, weight_decay, noise)]["runs"].items():
                methods.setdefault(f"{noise} / {name}", []).append(float(run[key]))
        methods.setdefault(CLEAN_CE, []).append(float(results[(seed, weight_decay, CLEAN)]["runs"][CLEAN_CE][key]))
    return methods


def choose_weight_decay(results: dict, seeds: list[int], noises: list[str], candidates=WEIGHT_DECAYS):
    """:func:`select_best` over ``candidates`` of each selection seed's noisy-validation accuracy at the
    selected epoch, averaged over the methods and noise settings."""
    scores = {}
    for wd in candidates:
        per_seed = []
        for seed in seeds:
            values = [run["val"][run["epoch"] - 1] for noise in noises
                      for name, run in results[(seed, wd, noise)]["runs"].items() if "true T" not in name]
            per_seed.append(_mean(values))
        scores[wd] = per_seed
    return select_best(scores, lower_is_better=False, prefer=PREFERRED_WEIGHT_DECAY if PREFERRED_WEIGHT_DECAY
                       in scores else None, tolerance=SELECTION_TOLERANCE)


def _workers(ctx: StudyContext, workers: int | None) -> int:
    from .parallel import available_cores

    if workers is not None:
        return workers
    return max(1, min(2, available_cores()))


def run(ctx: StudyContext, config: Config | None = None, *, weight_decays=WEIGHT_DECAYS,
        workers: int | None = None) -> StudyOutcome:
    from reweighting.noisy_labels.cleanlab_estimate import cleanlab_available

    from .noisy_labels_report import plot_bars, plot_curves, summary

    if config is None:
        config = CONFIGS["quick" if ctx.quick else "full"]
    if config.cleanlab is None:
        config = replace(config, cleanlab=cleanlab_available())
    left_out = [] if config.cleanlab else [
        "cleanlab's T estimate: cleanlab is not installed (pip install 'cleanlab>=2.6', part of the 'studies' extra)"]
    protocol = PROTOCOL_QUICK if ctx.quick else PROTOCOL_FULL
    noises = list(config.noises)
    selection_seeds = list(ctx.selection_seeds) or [1000]
    n_workers = _workers(ctx, workers)
    wrap = lambda it, desc, total: ctx.progress(it, desc=desc, total=total)  # noqa: E731
    with job_pool(n_workers) as pool:
        jobs = [(seed, wd, noise) for seed in selection_seeds for wd in weight_decays for noise in noises]
        # the true-T diagnostics play no part in the choice
        chosen_results = run_jobs(replace(config, true_t=()), jobs, pool, wrap)
        selection = choose_weight_decay(chosen_results, selection_seeds, noises, weight_decays)
        wd = selection.chosen
        jobs = [(seed, wd, noise) for seed in ctx.seeds for noise in [*noises, CLEAN]]
        results = run_jobs(config, jobs, pool, wrap)

    selected = _collect(results, ctx.seeds, wd, noises, "selected")
    final = _collect(results, ctx.seeds, wd, noises, "final")
    epochs = _collect(results, ctx.seeds, wd, noises, "epoch")
    warmup = {noise: [results[(s, wd, noise)]["warmup_accuracy"] for s in ctx.seeds] for noise in noises}
    errors = {noise: {} for noise in noises}
    for noise in noises:
        for s in ctx.seeds:
            for name, value in results[(s, wd, noise)]["T_error"].items():
                errors[noise].setdefault(name, []).append(value)
    observed = {noise: [results[(s, wd, noise)]["observed_noise"] for s in ctx.seeds] for noise in noises}

    baseline = baseline_health(warmup)
    parts = claim_parts(selected, noises, protocol)
    final_parts = claim_parts(final, noises, protocol)
    verdict = decide(parts, baseline)
    curves = {name: {"test": [], "val": []} for name in selected}
    for s in ctx.seeds:
        for noise in [*noises, CLEAN]:
            for name, r in results[(s, wd, noise)]["runs"].items():
                key = name if noise == CLEAN else f"{noise} / {name}"
                curves[key]["test"].append(r["test"])
                curves[key]["val"].append(r["val"])
    text = summary(selected=selected, final=final, epochs=epochs, noises=noises, parts=parts,
                   final_parts=final_parts, baseline=baseline, verdict=verdict, selection=selection,
                   warmup=warmup, errors=errors, true_t=config.true_t, left_out=left_out)
    plots = [plot_curves(curves, noises, ctx.out_dir / "curves.png"),
             plot_bars(selected, final, noises, ctx.out_dir / "accuracy.png")]
    methods = {**selected, **{f"{k} (final epoch)": v for k, v in final.items()}}
    return StudyOutcome(
        methods=methods,
        holds=verdict == "holds",
        config={**{k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items()},
                "weight_decay": wd, "dataset": "sklearn digits (8x8, 1797 images)", "optimizer": "Adam",
                "T_estimator": "anchor (Forward)", "workers": n_workers,
                "healthy_warmup_accuracy": HEALTHY_WARMUP_ACCURACY,
                # The MLP and the 1797 images are too small to gain from a GPU; the study stays on the CPU.
                "device": "cpu"},
        summary=text,
        details={"weight_decay_selection": {**selection.as_dict(), "candidates": list(weight_decays),
                                            "prefer": PREFERRED_WEIGHT_DECAY, "tolerance": SELECTION_TOLERANCE},
                 "final_epoch_parts": [p.as_dict() for p in final_parts],
                 "selected_epoch": epochs, "warmup_accuracy": warmup, "T_error": errors,
                 "observed_noise_rate": observed,
                 "curves_mean": {k: {m: [_mean(col) for col in zip(*v[m])] for m in v} for k, v in curves.items()}},
        plots=plots,
        parts=parts,
        baseline=baseline,
        left_out=left_out,
    )


STUDY = Study(
    name="noisy-labels",
    claim=CLAIM,
    metric=METRIC,
    lower_is_better=False,
    run=run,
    seeds=FULL_SEEDS,
    quick_seeds=2,
    description="RENT, DWS, RW, forward correction and CE trained from scratch on noisy sklearn digits, "
                "model selection on a noisy validation split",
    threads=1,
    cores=2,  # a pool of two worker processes, one (seed, noise setting) job each
    cost=470,  # CPU seconds of the full run (measured: 24 evidence and 2 selection seeds, 4 settings + clean)
    protocol=lambda quick: PROTOCOL_QUICK if quick else PROTOCOL_FULL,
)
