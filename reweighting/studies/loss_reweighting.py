"""Study ``loss-reweighting``: LinUpper and Quadratic against uniform on redundant LM pre-training data.

A byte-level TinyGPT is trained on the Python standard library's source files in two settings:

- ``redundant``: a fixed share of every batch are duplicates drawn from a handful of boilerplate
  windows (the opening window of a few source files: licence headers and module docstrings);
- ``clean``: every sample is a fresh window of source text (the control).

Methods: ``uniform``, ``linupper``, ``quadratic``, ``extremes`` and the ``inverse`` control
(tilting toward low loss), all at the paper's temperature ``r = 0.4`` with min-max normalisation.
Since the advantage of a reweighting can be a mere step-size effect, each method gets its own
learning rate: the grid is swept on seed 0 and the lr with the lowest loss on a *validation*
split of held-out files is chosen per method and setting; the reported metric is the loss on a
disjoint *test* split of held-out files after a fixed number of steps, over all seeds. Every
method sees the same initialisation and the same batches for a given seed (paired comparison).
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass

import torch

from . import Baseline, Study, StudyContext, StudyOutcome, check_baseline, compare, decide

METHODS = ("uniform", "linupper", "quadratic", "extremes", "inverse")
PAPER_METHODS = ("linupper", "quadratic", "extremes")
SETTINGS = ("redundant", "clean")


@dataclass(frozen=True)
class Config:
    steps: int = 400
    batch: int = 32
    seq_len: int = 64
    dim: int = 64
    layers: int = 2
    heads: int = 4
    lrs: tuple[float, ...] = (2e-3, 5e-3, 1.2e-2)
    temperature: float = 0.4
    duplicate_share: float = 0.5  # share of every batch drawn from the boilerplate windows
    boilerplate_windows: int = 8
    train_sequences: int = 20_000
    eval_sequences: int = 256
    curve_points: int = 8  # validation evaluations along each chosen run (the loss-curve plot)
    # Training runs are independent: on a CPU they run in this many processes of one thread each
    # (0: one per available core), which is faster than intra-op threads for a model this small.
    workers: int = 0


FULL = Config()
QUICK = Config(steps=100, lrs=(4e-3, 8e-3), eval_sequences=128, curve_points=4)
# The smallest configuration that still runs every code path (used by the test suite).
SMOKE = Config(steps=12, batch=8, seq_len=32, dim=32, layers=1, heads=2, lrs=(3e-3,), boilerplate_windows=2,
               train_sequences=400, eval_sequences=16, curve_points=2, workers=1)


@dataclass
class Data:
    clean: torch.Tensor  # [N, seq_len + 1] training windows
    boilerplate: torch.Tensor  # [K, seq_len + 1] the windows that are duplicated
    validation: torch.Tensor
    test: torch.Tensor


def load_data(cfg: Config) -> Data:
    """Training windows, boilerplate windows and the validation / test splits of held-out files."""
    from .lm import pack_sequences, stdlib_documents

    train_docs, heldout_docs = stdlib_documents()
    # Boilerplate: the opening window of the last few training files, which the clean pool (taken
    # from the first files) does not contain.
    boilerplate = pack_sequences([d[: cfg.seq_len + 1] for d in train_docs[-cfg.boilerplate_windows:]], cfg.seq_len)
    clean = pack_sequences(train_docs[: -cfg.boilerplate_windows], cfg.seq_len, max_sequences=cfg.train_sequences)
    g = torch.Generator().manual_seed(1234)

    def sample(docs: list[bytes]) -> torch.Tensor:
        rows = pack_sequences(docs, cfg.seq_len)
        return rows[torch.randperm(rows.shape[0], generator=g)[: cfg.eval_sequences]]

    return Data(clean=clean, boilerplate=boilerplate, validation=sample(heldout_docs[0::2]),
                test=sample(heldout_docs[1::2]))


def batches(data: Data, cfg: Config, setting: str, seed: int):
    """The batch stream of one seed: ``(rows, is_duplicate)`` per step, identical for every method."""
    g = torch.Generator().manual_seed(10_000 + seed)
    n_dup = round(cfg.duplicate_share * cfg.batch) if setting == "redundant" else 0
    for _ in range(cfg.steps):
        clean = data.clean[torch.randint(data.clean.shape[0], (cfg.batch - n_dup,), generator=g)]
        dup = data.boilerplate[torch.randint(data.boilerplate.shape[0], (n_dup,), generator=g)]
        is_dup = torch.cat([torch.zeros(cfg.batch - n_dup, dtype=torch.bool), torch.ones(n_dup, dtype=torch.bool)])
        order = torch.randperm(cfg.batch, generator=g)
        yield torch.cat([clean, dup])[order], is_dup[order]


def unigram_entropy(rows: torch.Tensor) -> float:
    """Entropy (nats) of the byte frequencies of ``rows``: the loss of the best model that ignores context."""
    counts = torch.bincount(rows.flatten(), minlength=256).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def baseline_health(uniform_test_loss: list[float], bar: float) -> Baseline:
    """The health check: the uniform model's mean held-out loss must beat ``bar``, the unigram entropy
    of the training bytes (a model that does not beat it has learned no context, so nothing that
    reweighting could help or hurt)."""
    return check_baseline("uniform's held-out test loss vs the unigram entropy of the training bytes (nats/byte)",
                          sum(uniform_test_loss) / len(uniform_test_loss), bar, higher_is_better=False)


@torch.no_grad()
def evaluate(model, rows: torch.Tensor, device: torch.device, chunk: int = 64) -> float:
    """Mean next-byte cross-entropy (nats) over ``rows``."""
    model.eval()
    total = 0.0
    for start in range(0, rows.shape[0], chunk):
        part = rows[start : start + chunk].to(device)
        total += float(model.token_losses(part).mean()) * part.shape[0]
    model.train()
    return total / rows.shape[0]


def train(data: Data, cfg: Config, setting: str, method: str, lr: float, seed: int, device: torch.device,
          curve: bool = False) -> dict:
    """Train one model; returns validation / test loss at the end, the weight share on duplicates, a curve."""
    from ..loss_based import LossReweighter
    from ..reduce import sequence_loss
    from .lm import GPTConfig, TinyGPT

    torch.manual_seed(seed)
    model = TinyGPT(GPTConfig(context=cfg.seq_len, dim=cfg.dim, layers=cfg.layers, heads=cfg.heads)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, cfg.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / cfg.steps))))
    rw = LossReweighter(method, temperature=cfg.temperature)
    checkpoints = {round(cfg.steps * (k + 1) / cfg.curve_points) for k in range(cfg.curve_points)} if curve else set()
    points, dup_share, hard_share, train_loss = [], [], [], []
    for step, (rows, is_dup) in enumerate(batches(data, cfg, setting, seed), start=1):
        per_sample = sequence_loss(model.token_losses(rows.to(device)))
        loss = rw(per_sample)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        rw.step()
        if setting == "redundant":
            w = rw.weights(per_sample.detach())
            dup = is_dup.to(device)
            dup_share.append(float(w[dup].sum()))
            # Of the weight on clean samples, the share on the hardest quarter of them (0.25 if uniform).
            clean_loss, clean_w = per_sample.detach()[~dup], w[~dup]
            hard = clean_loss >= torch.quantile(clean_loss, 0.75)
            hard_share.append(float(clean_w[hard].sum() / clean_w.sum()))
        train_loss.append(float(per_sample.detach().mean()))
        if step in checkpoints:
            points.append((step, evaluate(model, data.validation, device)))
    return {
        "validation": evaluate(model, data.validation, device),
        "test": evaluate(model, data.test, device),
        "duplicate_weight_share": sum(dup_share) / len(dup_share) if dup_share else 0.0,
        "hardest_clean_quarter_share": sum(hard_share) / len(hard_share) if hard_share else 0.0,
        "curve": points,
        "final_train_loss": sum(train_loss[-10:]) / len(train_loss[-10:]),
    }


_DATA: dict[Config, Data] = {}


def _data_for(cfg: Config) -> Data:
    if cfg not in _DATA:
        _DATA[cfg] = load_data(cfg)
    return _DATA[cfg]


def _available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _init_worker() -> None:
    torch.set_num_threads(1)


def _train_job(cfg: Config, setting: str, method: str, lr: float, seed: int, device: str) -> dict:
    """One training run in a worker process (the data are loaded once per process)."""
    return train(_data_for(cfg), cfg, setting, method, lr, seed, torch.device(device), curve=True)


def _run_jobs(ctx: StudyContext, cfg: Config, jobs: list[tuple], pool, desc: str) -> dict:
    """``{job: result}`` for jobs ``(setting, method, lr, seed)``, in the pool if there is one."""
    results = {}
    if pool is None:
        for job in ctx.progress(jobs, desc=desc, total=len(jobs)):
            results[job] = _train_job(cfg, *job, str(ctx.device))
        return results
    futures = {pool.submit(_train_job, cfg, *job, str(ctx.device)): job for job in jobs}
    for future in ctx.progress(as_completed(futures), desc=desc, total=len(futures)):
        results[futures[future]] = future.result()
    return results


def _plot_curves(curves: dict, cfg: Config, out_dir) -> str:
    from ..report import new_figure, save_figure

    fig, axes = new_figure(10.0, 3.8)
    fig.clf()
    for k, setting in enumerate(SETTINGS):
        ax = fig.add_subplot(1, 2, k + 1)
        for method in METHODS:
            runs = curves[setting][method]
            steps = [s for s, _ in runs[0]]
            mean = [sum(run[i][1] for run in runs) / len(runs) for i in range(len(steps))]
            ax.plot(steps, mean, marker="o", label=method)
        ax.set_title(f"{setting} data")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation loss (nats / byte)")
        ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, out_dir / "loss_curves.png")


def claim_parts(test: dict) -> list:
    """The claim's parts, paired by seed (same initialisation and batches): LinUpper and Quadratic
    have lower test loss than uniform on redundant data, and no paper method is worse than uniform
    on clean data beyond the noise."""
    parts = [compare(f"{m} < uniform (redundant)", test["redundant"][m], test["redundant"]["uniform"],
                     lower_is_better=True) for m in ("linupper", "quadratic")]
    parts += [compare(f"{m} not worse than uniform (clean)", test["clean"][m], test["clean"]["uniform"],
                      lower_is_better=True, kind="not worse") for m in PAPER_METHODS]
    return parts


def _verdict(test: dict) -> tuple[dict, list[str]]:
    """Every method against uniform per setting, on the paired per-seed differences (table rows)."""
    from . import summarize

    table, lines = {}, []
    for setting in SETTINGS:
        table[setting] = {}
        for method in METHODS:
            s = summarize(test[setting][method])
            part = compare(method, test[setting][method], test[setting]["uniform"], lower_is_better=True)
            noise = part.noise if part.noise is not None else 0.0
            table[setting][method] = {"mean": s["mean"], "std": s["std"], "diff_vs_uniform": -part.margin,
                                      "noise": noise, "beats_uniform": -part.margin < -noise,
                                      "within_noise": abs(part.margin) <= noise}
    for setting in SETTINGS:
        for method in METHODS[1:]:
            r = table[setting][method]
            lines.append(f"| {setting} | {method} | {r['mean']:.4f} ± {r['std']:.4f} | {r['diff_vs_uniform']:+.4f} | "
                         f"{r['noise']:.4f} |")
    return table, lines


def _listing(rows: dict, methods: list[str]) -> str:
    """'linupper (-0.117 vs noise 0.060), ...' or 'none'."""
    parts = [f"{m} ({rows[m]['diff_vs_uniform']:+.3f} vs noise {rows[m]['noise']:.3f})" for m in methods]
    return ", ".join(parts) or "none"


def run_with(ctx: StudyContext, cfg: Config) -> StudyOutcome:
    """The study at configuration ``cfg`` (``STUDY.run`` picks FULL or QUICK)."""
    start = time.perf_counter()
    seeds = list(ctx.seeds)
    sweep_seed = seeds[0]
    workers = (cfg.workers or _available_cores()) if ctx.device.type == "cpu" else 1
    pool = None
    if workers > 1:
        import multiprocessing

        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker)
    try:
        sweep = [(s, m, lr, sweep_seed) for s in SETTINGS for m in METHODS for lr in cfg.lrs]
        results = _run_jobs(ctx, cfg, sweep, pool, f"lr sweep (seed {sweep_seed})")
        best_lr = {s: {m: min(cfg.lrs, key=lambda lr, s=s, m=m: results[(s, m, lr, sweep_seed)]["validation"])
                       for m in METHODS} for s in SETTINGS}
        rest = [(s, m, best_lr[s][m], seed) for s in SETTINGS for m in METHODS for seed in seeds[1:]]
        results.update(_run_jobs(ctx, cfg, rest, pool, "other seeds at the chosen lr"))
    finally:
        if pool is not None:
            pool.shutdown()

    chosen = {s: {m: [results[(s, m, best_lr[s][m], seed)] for seed in seeds] for m in METHODS} for s in SETTINGS}
    test = {s: {m: [r["test"] for r in chosen[s][m]] for m in METHODS} for s in SETTINGS}
    table, lines = _verdict(test)
    parts = claim_parts(test)
    entropy = unigram_entropy(_data_for(cfg).clean)
    baseline = baseline_health(test["clean"]["uniform"], entropy)
    verdict = decide(parts, baseline)
    shares = {m: [r["duplicate_weight_share"] for r in chosen["redundant"][m]] for m in METHODS}
    hard = {m: [r["hardest_clean_quarter_share"] for r in chosen["redundant"][m]] for m in METHODS}
    plots = [_plot_curves({s: {m: [r["curve"] for r in chosen[s][m]] for m in METHODS} for s in SETTINGS},
                          cfg, ctx.out_dir)]

    methods = {f"{m} (redundant)": test["redundant"][m] for m in METHODS}
    methods.update({f"{m} (clean)": test["clean"][m] for m in METHODS})
    share_text = ", ".join(f"{m} {sum(v) / len(v):.3f}" for m, v in shares.items())
    hard_text = ", ".join(f"{m} {sum(v) / len(v):.3f}" for m, v in hard.items())
    lr_text = "; ".join(f"{s}: " + ", ".join(f"{m} {best_lr[s][m]:g}" for m in METHODS) for s in SETTINGS)
    beat = [m for m in PAPER_METHODS if table["redundant"][m]["beats_uniform"]]
    costly = [m for m in PAPER_METHODS
              if not (table["clean"][m]["within_noise"] or table["clean"][m]["diff_vs_uniform"] < 0)]
    same_lr = "; ".join(
        f"lr {lr:g}: " + ", ".join(f"{m} {results[('redundant', m, lr, sweep_seed)]['validation']:.3f}"
                                   for m in ("uniform", "linupper", "quadratic"))
        for lr in cfg.lrs)
    part_lines = ["| part of the claim | verdict | margin (nats/byte, + favours the claim) | noise | seeds |",
                  "|---|---|---|---|---|"]
    for part in parts:
        noise = f"{part.noise:.4f}" if part.noise is not None else "n/a (1 seed)"
        part_lines.append(f"| {part.name} | {part.verdict} | {part.margin:+.4f} | {noise} | {part.n} |")
    summary = "\n".join([
        f"Held-out test loss (nats/byte) after {cfg.steps} steps, {len(seeds)} seed(s), each method at its own "
        f"learning rate chosen on a validation split ({lr_text}). 'noise' = half-width of the paired 95% "
        "t-interval of the per-seed differences to uniform (none with one seed, so any difference counts).",
        "",
        *part_lines,
        "",
        f"Baseline: {baseline.describe()}. Verdict on the whole claim: **{verdict}**.",
        "",
        "| setting | method | test loss | minus uniform | noise |",
        "|---|---|---|---|---|",
        f"| redundant | uniform | {table['redundant']['uniform']['mean']:.4f} ± "
        f"{table['redundant']['uniform']['std']:.4f} | | |",
        f"| clean | uniform | {table['clean']['uniform']['mean']:.4f} ± {table['clean']['uniform']['std']:.4f} | | |",
        *lines,
        "",
        f"Mean weight share on the duplicates ({cfg.duplicate_share:.0%} of each redundant batch): {share_text}. "
        f"Of the weight on clean samples, the share on the hardest quarter of them (0.25 when uniform): "
        f"{hard_text}.",
        "",
        f"Redundant data at a common learning rate (validation loss, seed {sweep_seed}): {same_lr}.",
        "",
        f"Redundant data, beating uniform beyond noise: {_listing(table['redundant'], beat)}; not: "
        f"{_listing(table['redundant'], [m for m in PAPER_METHODS if m not in beat])}. "
        f"Clean control, worse than uniform beyond noise: {_listing(table['clean'], costly)}. "
        "The claim needs linupper and quadratic to beat uniform on redundant data and no paper method "
        "(linupper, quadratic, extremes) to be worse than uniform beyond noise on clean data; the inverse "
        "control is reported but not part of the verdict.",
    ])
    from .lm import python_version

    config = {**asdict(cfg), "lrs": list(cfg.lrs), "best_lr": best_lr, "methods_in_verdict": list(PAPER_METHODS),
              "unigram_entropy": entropy,
              "workers": workers, "training_seconds": time.perf_counter() - start,
              "python": python_version()}  # the corpus is this Python's standard library
    details = {"verdict": table, "duplicate_weight_share": shares, "hardest_clean_quarter_share": hard,
               "final_train_loss": {s: {m: [r["final_train_loss"] for r in chosen[s][m]] for m in METHODS}
                                    for s in SETTINGS},
               "sweep_validation": {s: {m: {str(lr): results[(s, m, lr, sweep_seed)]["validation"] for lr in cfg.lrs}
                                        for m in METHODS} for s in SETTINGS},
               "curves": {s: {m: [r["curve"] for r in chosen[s][m]] for m in METHODS} for s in SETTINGS}}
    return StudyOutcome(methods=methods, holds=verdict == "holds", config=config, summary=summary, details=details,
                        plots=plots, parts=parts, baseline=baseline)


def _run(ctx: StudyContext) -> StudyOutcome:
    return run_with(ctx, QUICK if ctx.quick else FULL)


STUDY = Study(
    name="loss-reweighting",
    claim="LinUpper and Quadratic loss-based reweighting beat uniform on LM data with redundant (duplicated) "
          "samples, and cost nothing on clean data (Sow et al., ICLR 2025)",
    metric="held-out test loss (nats/byte)",
    lower_is_better=True,
    run=_run,
    # Five: with three, Quadratic's margin on redundant data (-0.044) could not be told from its noise.
    seeds=5,
    quick_seeds=2,
    description="loss-based reweighting (LinUpper, Quadratic, Extremes) vs uniform on a byte-level GPT with "
                "duplicated boilerplate",
)

__all__ = ["STUDY", "Config", "FULL", "QUICK", "SMOKE", "run_with", "train", "load_data"]
