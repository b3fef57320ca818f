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

import contextlib
import math
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass

import torch

from . import Baseline, Study, StudyContext, StudyOutcome, check_baseline, compare, decide, register, summarize
from .parallel import available_cores

METHODS = ("uniform", "linupper", "quadratic", "extremes", "inverse")
PAPER_METHODS = ("linupper", "quadratic", "extremes")
CLAIMED = ("linupper", "quadratic")  # the methods the paper's claim names (deprioritising low loss)
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
    # Packed mode (study ``loss-reweighting-packed``): each row holds several short documents (lengths
    # uniform in ``doc_len``), a ``duplicate_share`` of them boilerplate, and the weights go either to
    # documents (``reweighting.packing.document_losses``) or to whole rows.
    doc_len: tuple[int, int] = (12, 40)
    # Each packed method's lr is chosen on validation loss (seed 0), as in the main study: with one
    # shared lr (5e-3) every method was undertrained (all did better at 1.2e-2) and the comparison
    # turned with the lr (LinUpper on documents beat uniform by 0.04 at 2e-3, lost by 0.01 at 1.2e-2).
    packed_lrs: tuple[float, ...] = (5e-3, 1.2e-2, 2.5e-2)


FULL = Config()
QUICK = Config(steps=100, lrs=(4e-3, 8e-3), eval_sequences=128, curve_points=4)
# "uniform" is the plain mean over rows (each row's token mean), what packed training does without
# weights; "uniform (documents)" is the plain mean over documents, which weights a short document's tokens
# more: the unit the document weights start from, reported to separate the unit from the tilt.
PACKED_METHODS = ("uniform", "uniform (documents)", "linupper (documents)", "linupper (rows)",
                  "quadratic (documents)", "quadratic (rows)")
# The smallest configuration that still runs every code path (used by the test suite).
SMOKE = Config(steps=12, batch=8, seq_len=32, dim=32, layers=1, heads=2, lrs=(3e-3,), boilerplate_windows=2,
               train_sequences=400, eval_sequences=16, curve_points=2, workers=1, doc_len=(6, 16),
               packed_lrs=(3e-3, 6e-3))


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


def packed_batches(data: Data, cfg: Config, seed: int):
    """The packed batch stream of one seed: ``(rows [B, L + 1], document_ids [B, L + 1], is_dup [B, D])``
    per step, identical for every method.

    Each row is filled left to right with documents: with probability ``duplicate_share`` the
    opening ``doc_len[1]`` bytes of a boilerplate window (exact duplicates), else a random piece of a
    clean window, of a length uniform in ``doc_len``; the last one is cut to fit (at least 2 bytes).
    ``is_dup[b, d]`` flags document ``d`` of row ``b`` (False past the row's last document).
    """
    from ..packing import pack_documents

    g = torch.Generator().manual_seed(20_000 + seed)
    width = cfg.seq_len + 1
    lo, hi = cfg.doc_len
    if not 2 <= lo <= hi <= width:
        raise ValueError(f"doc_len must satisfy 2 <= low <= high <= seq_len + 1, got {cfg.doc_len}")
    for _ in range(cfg.steps):
        rows, ids, flags = [], [], []
        for _ in range(cfg.batch):
            docs, dups, filled = [], [], 0
            while width - filled >= 2:
                if float(torch.rand(1, generator=g)) < cfg.duplicate_share:
                    k = int(torch.randint(data.boilerplate.shape[0], (1,), generator=g))
                    doc, dup = data.boilerplate[k, :hi], True
                else:
                    k = int(torch.randint(data.clean.shape[0], (1,), generator=g))
                    length = int(torch.randint(lo, hi + 1, (1,), generator=g))
                    doc, dup = data.clean[k, :length], False
                doc = doc[: width - filled]
                docs.append(doc)
                dups.append(dup)
                filled += doc.numel()
            row, row_ids = pack_documents(docs, width, min_tokens=2)
            if row.shape[0] != 1:
                raise AssertionError("documents chosen to fill one row were packed into several")
            rows.append(row[0])
            ids.append(row_ids[0])
            flags.append(dups)
        is_dup = torch.zeros(cfg.batch, max(len(f) for f in flags), dtype=torch.bool)
        for b, f in enumerate(flags):
            is_dup[b, : len(f)] = torch.tensor(f)
        yield torch.stack(rows), torch.stack(ids), is_dup


def train_packed(data: Data, cfg: Config, method: str, lr: float, seed: int, device: torch.device) -> dict:
    """One packed-mode run: ``method`` in :data:`PACKED_METHODS`; test loss and the weight share on duplicates."""
    from ..loss_based import LossReweighter
    from ..packing import document_losses
    from .lm import GPTConfig, TinyGPT

    torch.manual_seed(seed)
    model = TinyGPT(GPTConfig(context=cfg.seq_len, dim=cfg.dim, layers=cfg.layers, heads=cfg.heads)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, cfg.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / cfg.steps))))
    name = method.split(" ")[0]
    unit = "documents" if "documents" in method else "rows"
    rw = LossReweighter(name, temperature=cfg.temperature)
    dup_share, docs_per_row = [], []
    for rows, ids, is_dup in packed_batches(data, cfg, seed):
        rows, ids = rows.to(device), ids.to(device)
        token_loss = model.token_losses(rows)  # position t predicts token t + 1
        target_ids = ids[:, 1:]
        # no loss across a document boundary (the first byte of a document) or on padding
        keep = (ids[:, :-1] == target_ids) & (target_ids >= 0)
        per_doc = document_losses(token_loss, keep, document_ids=target_ids, pad_id=-1).loss
        # the documents of each row in row-major order, as document_losses numbers them
        doc_dup = is_dup[torch.arange(is_dup.shape[1])[None] < (ids.max(1).values + 1).cpu()[:, None]]
        if unit == "documents":
            loss = rw(per_doc)
            w = rw.weights(per_doc.detach())
            dup_share.append(float(w[doc_dup.to(device)].sum()))
        else:
            per_row = (token_loss * keep).sum(1) / keep.sum(1)
            loss = rw(per_row)
            # a row's weight spread evenly over its loss tokens: the share that lands on duplicate documents
            w = rw.weights(per_row.detach())
            doc_of = torch.where(keep, target_ids, torch.zeros_like(target_ids))
            row_dup = is_dup.to(device).gather(1, doc_of.clamp(max=is_dup.shape[1] - 1))
            tokens_dup = (row_dup & keep).float().sum(1) / keep.sum(1)
            dup_share.append(float((w * tokens_dup).sum()))
        docs_per_row.append(per_doc.numel() / rows.shape[0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        rw.step()
    return {"test": evaluate(model, data.test, device), "validation": evaluate(model, data.validation, device),
            "duplicate_weight_share": sum(dup_share) / len(dup_share),
            "documents_per_row": sum(docs_per_row) / len(docs_per_row)}


def run_packed(ctx: StudyContext, cfg: Config) -> StudyOutcome:
    """The packed-mode study: weighting documents vs weighting rows, against uniform, each method at
    its own lr (chosen on validation loss with the first seed)."""
    data = _data_for(cfg)
    seeds = list(ctx.seeds)
    with _worker_pool(cfg, ctx) as pool:
        sweep = [(m, lr, seeds[0]) for m in PACKED_METHODS for lr in cfg.packed_lrs]
        results = _run_jobs(ctx, _packed_job, cfg, sweep, pool, f"packed lr sweep (seed {seeds[0]})")
        best_lr = {m: min(cfg.packed_lrs, key=lambda lr, m=m: results[(m, lr, seeds[0])]["validation"])
                   for m in PACKED_METHODS}
        rest = [(m, best_lr[m], seed) for m in PACKED_METHODS for seed in seeds[1:]]
        results.update(_run_jobs(ctx, _packed_job, cfg, rest, pool, "packed runs, other seeds at the chosen lr"))
    test = {m: [results[(m, best_lr[m], s)]["test"] for s in seeds] for m in PACKED_METHODS}
    share = {m: [results[(m, best_lr[m], s)]["duplicate_weight_share"] for s in seeds] for m in PACKED_METHODS}
    parts = [compare(f"{m} < uniform (packed, redundant)", test[m], test["uniform"], lower_is_better=True)
             for m in ("linupper (documents)", "quadratic (documents)")]
    extra = [compare(f"{m} (documents) < {m} (rows)", test[f"{m} (documents)"], test[f"{m} (rows)"],
                     lower_is_better=True) for m in ("linupper", "quadratic")]
    extra += [compare(f"{m} (documents) < uniform (documents)", test[f"{m} (documents)"], test["uniform (documents)"],
                      lower_is_better=True) for m in ("linupper", "quadratic")]
    extra.append(compare("uniform (documents) < uniform", test["uniform (documents)"], test["uniform"],
                         lower_is_better=True))
    baseline = baseline_health(test["uniform"], unigram_entropy(data.clean))
    verdict = decide(parts, baseline)
    per_row = results[(PACKED_METHODS[0], best_lr[PACKED_METHODS[0]], seeds[0])]["documents_per_row"]
    at_edge = [m for m in PACKED_METHODS if len(cfg.packed_lrs) > 1 and best_lr[m] in (min(cfg.packed_lrs),
                                                                                       max(cfg.packed_lrs))]
    lines = [f"Packed rows: several documents per row ({per_row:.1f} on average, lengths {cfg.doc_len[0]}-"
             f"{cfg.doc_len[1]} bytes), {cfg.duplicate_share:.0%} of them exact boilerplate duplicates; each method "
             f"at its own lr from {', '.join(f'{lr:g}' for lr in cfg.packed_lrs)} (lowest validation loss, seed "
             f"{seeds[0]}), {cfg.steps} steps, {len(seeds)} seed(s); held-out test loss (nats/byte). The model "
             "attends across documents within a row (as in GPT-style packing); the loss never crosses a "
             "document boundary.", "",
             "| method | lr | test loss | weight share on duplicate documents (tokens, for rows) |",
             "|---|---|---|---|"]
    for m in PACKED_METHODS:
        st = summarize(test[m])
        lines.append(f"| {m} | {best_lr[m]:g} | {st['mean']:.4f} ± {st['std']:.4f} | "
                     f"{sum(share[m]) / len(share[m]):.3f} |")
    if at_edge:
        lines += ["", f"The chosen lr is at an end of the grid for: {', '.join(at_edge)}."]
    sweep_rows = ["", "Validation loss of the lr sweep (seed 0):", "",
                  "| method | " + " | ".join(f"lr {lr:g}" for lr in cfg.packed_lrs) + " |",
                  "|---|" + "---|" * len(cfg.packed_lrs)]
    for m in PACKED_METHODS:
        sweep_rows.append(f"| {m} | " + " | ".join(f"{results[(m, lr, seeds[0])]['validation']:.4f}"
                                                   for lr in cfg.packed_lrs) + " |")
    lines += sweep_rows
    lines += ["", "| comparison | verdict | margin | noise | seeds |", "|---|---|---|---|---|"]
    for part in parts + extra:
        noise = f"{part.noise:.4f}" if part.noise is not None else "n/a (1 seed)"
        lines.append(f"| {part.name} | {part.verdict} | {part.margin:+.4f} | {noise} | {part.n} |")
    lines += ["", f"Baseline: {baseline.describe()}. Verdict on the claim (documents as the samples): **{verdict}**. "
              "The other comparisons are reported, not part of the paper's claim."]
    return StudyOutcome(methods=test, holds=verdict == "holds",
                        config={**asdict(cfg), "packed": True, "unigram_entropy": unigram_entropy(data.clean)},
                        summary="\n".join(lines),
                        details={"duplicate_weight_share": share, "reported_comparisons": [p.as_dict() for p in extra],
                                 "documents_per_row": per_row, "chosen_lr": best_lr, "lr_at_grid_end": at_edge,
                                 "sweep_validation": {m: {str(lr): results[(m, lr, seeds[0])]["validation"]
                                                          for lr in cfg.packed_lrs} for m in PACKED_METHODS}},
                        parts=parts, baseline=baseline)


_DATA: dict[Config, Data] = {}


def _data_for(cfg: Config) -> Data:
    if cfg not in _DATA:
        _DATA[cfg] = load_data(cfg)
    return _DATA[cfg]


def _init_worker() -> None:
    torch.set_num_threads(1)


def _train_job(cfg: Config, setting: str, method: str, lr: float, seed: int, device: str) -> dict:
    """One training run in a worker process (the data are loaded once per process)."""
    return train(_data_for(cfg), cfg, setting, method, lr, seed, torch.device(device), curve=True)


def _packed_job(cfg: Config, method: str, lr: float, seed: int, device: str) -> dict:
    """One packed-mode training run in a worker process."""
    return train_packed(_data_for(cfg), cfg, method, lr, seed, torch.device(device))


def _worker_count(cfg: Config, ctx: StudyContext) -> int:
    return (cfg.workers or available_cores()) if ctx.device.type == "cpu" else 1


@contextlib.contextmanager
def _worker_pool(cfg: Config, ctx: StudyContext):
    """Processes of one thread each for independent training runs (None: run them here)."""
    workers = _worker_count(cfg, ctx)
    if workers <= 1:
        yield None
        return
    import multiprocessing

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker)
    try:
        yield pool
    finally:
        pool.shutdown()


def _run_jobs(ctx: StudyContext, fn, cfg: Config, jobs: list[tuple], pool, desc: str) -> dict:
    """``{job: fn(cfg, *job, device)}`` for every job, in the pool if there is one."""
    results = {}
    if pool is None:
        for job in ctx.progress(jobs, desc=desc, total=len(jobs)):
            results[job] = fn(cfg, *job, str(ctx.device))
        return results
    futures = {pool.submit(fn, cfg, *job, str(ctx.device)): job for job in jobs}
    for future in ctx.progress(as_completed(futures), desc=desc, total=len(futures)):
        results[futures[future]] = future.result()
    return results


def _plot_curves(curves: dict, cfg: Config, out_dir) -> str:
    from .report import new_figure, save_figure

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
    have lower test loss than uniform on redundant data, and are not worse than uniform on clean
    data beyond the noise (METHODS.md: "on clean data the method costs almost nothing")."""
    parts = [compare(f"{m} < uniform (redundant)", test["redundant"][m], test["redundant"]["uniform"],
                     lower_is_better=True) for m in ("linupper", "quadratic")]
    parts += [compare(f"{m} not worse than uniform (clean)", test["clean"][m], test["clean"]["uniform"],
                      lower_is_better=True, kind="not worse") for m in CLAIMED]
    return parts


def reported_parts(test: dict) -> list:
    """Comparisons reported beside the claim: Extremes, which the paper proposes but does not claim
    to be free (it up-weights both tails), against uniform in both settings."""
    return [compare(f"extremes < uniform ({s})", test[s]["extremes"], test[s]["uniform"], lower_is_better=True)
            for s in SETTINGS]


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
    with _worker_pool(cfg, ctx) as pool:
        sweep = [(s, m, lr, sweep_seed) for s in SETTINGS for m in METHODS for lr in cfg.lrs]
        results = _run_jobs(ctx, _train_job, cfg, sweep, pool, f"lr sweep (seed {sweep_seed})")
        best_lr = {s: {m: min(cfg.lrs, key=lambda lr, s=s, m=m: results[(s, m, lr, sweep_seed)]["validation"])
                       for m in METHODS} for s in SETTINGS}
        rest = [(s, m, best_lr[s][m], seed) for s in SETTINGS for m in METHODS for seed in seeds[1:]]
        results.update(_run_jobs(ctx, _train_job, cfg, rest, pool, "other seeds at the chosen lr"))

    chosen = {s: {m: [results[(s, m, best_lr[s][m], seed)] for seed in seeds] for m in METHODS} for s in SETTINGS}
    test = {s: {m: [r["test"] for r in chosen[s][m]] for m in METHODS} for s in SETTINGS}
    table, lines = _verdict(test)
    parts = claim_parts(test)
    reported = reported_parts(test)
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
        "Reported beside the claim (Extremes is proposed by the paper but not claimed to be free): "
        + "; ".join(f"{p.name}: {p.verdict}, margin {p.margin:+.4f}, noise "
                    + (f"{p.noise:.4f}" if p.noise is not None else "n/a") for p in reported) + ".",
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
        "The claim needs linupper and quadratic to beat uniform on redundant data and not to be worse than "
        "uniform beyond noise on clean data; extremes and the inverse control are reported but not part of "
        "the verdict.",
    ])
    from .lm import python_version

    config = {**asdict(cfg), "lrs": list(cfg.lrs), "best_lr": best_lr, "methods_in_verdict": list(CLAIMED),
              "unigram_entropy": entropy,
              "workers": _worker_count(cfg, ctx), "training_seconds": time.perf_counter() - start,
              "python": python_version()}  # the corpus is this Python's standard library
    details = {"verdict": table, "reported_parts": [p.as_dict() for p in reported],
               "duplicate_weight_share": shares, "hardest_clean_quarter_share": hard,
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
    cores=2,  # a pool of worker processes, one training run each
    cost=1020,
    description="loss-based reweighting (LinUpper, Quadratic, Extremes) vs uniform on a byte-level GPT with "
                "duplicated boilerplate",
)

PACKED_STUDY = Study(
    name="loss-reweighting-packed",
    claim="LinUpper and Quadratic loss-based reweighting of documents packed several to a row beat uniform on LM "
          "data with redundant (duplicated) documents (Sow et al., ICLR 2025; packed mode)",
    metric="held-out test loss (nats/byte)",
    lower_is_better=True,
    run=lambda ctx: run_packed(ctx, QUICK if ctx.quick else FULL),
    seeds=5,
    quick_seeds=3,  # about 25 CPU-seconds a seed in quick mode: enough seeds for a noise estimate
    cores=2,  # a pool of worker processes, one training run each
    cost=700,
    description="loss-based reweighting of packed documents vs of whole rows vs uniform on a byte-level GPT",
)

__all__ = ["STUDY", "PACKED_STUDY", "Config", "FULL", "QUICK", "SMOKE", "run_with", "run_packed", "train",
           "train_packed", "packed_batches", "load_data"]

register(PACKED_STUDY)  # a second study from this module (the registry finds STUDY by name)
