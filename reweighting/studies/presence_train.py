"""Training and scoring for the ``presence`` study: the configuration, one training run per method,
and the self-influence AUROC on the units training weights.

A run of seed ``s`` draws everything random from ``s``: the initialisation, the batch order (its
own generator) and, through :func:`~.presence_data.load_data`, the data. Methods of one seed share
all three, so a method's difference from uniform is paired.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from . import StudyContext, perturb_initial_weights
from .presence_data import Data

__all__ = ["Config", "FULL", "QUICK", "SMOKE", "METHODS", "train", "train_uniform_cached", "evaluate",
           "sequence_losses", "auroc", "self_influence_loop", "training_unit_auroc", "scope_modules",
           "bigram_loss", "ORDER_SEED_BASE"]

# name -> (tau before the switch, tau after it); None: the plain mean loss.
METHODS: dict[str, tuple[float, float] | None] = {
    "uniform": None,
    "direct": (1.0, 1.0),
    "inverse": (-1.0, -1.0),
    "presence": (1.0, -1.0),
}
ORDER_SEED_BASE = 10_000  # the batch order of seed s: its own generator, apart from the data's


@dataclass(frozen=True)
class Config:
    steps: int = 300
    batch: int = 32
    seq_len: int = 64
    dim: int = 64
    layers: int = 2
    heads: int = 4
    lr: float = 3e-3
    corrupt_share: float = 0.3
    # "tokens" (bytes), "words", "random-bytes", "shuffled-continuation" or "near-duplicate"
    corruption: str = "tokens"
    switch_fraction: float = 0.1  # the paper switches after 100k of 1M steps
    microbatches: int | None = None  # score n micro-batches per batch as units (the paper's pre-training variant)
    scope: str = "first-block"  # parameters K of the self-influence: the paper's first layers, or "all"
    train_sequences: int = 8000
    eval_sequences: int = 512
    scored_batches: int = 16  # training-like batches scored for the AUROC (16 x 32 = 512 windows)
    auroc_margin: float = 0.1  # "clearly above chance": AUROC > 0.5 + margin


FULL = Config()
QUICK = Config(steps=150, eval_sequences=128, scored_batches=8)
SMOKE = Config(steps=6, batch=8, seq_len=16, dim=16, layers=1, heads=2, train_sequences=200, eval_sequences=16,
               scored_batches=4)


def sequence_losses(model, rows: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean next-byte loss ``[B]``."""
    from ..reduce import sequence_loss

    return sequence_loss(model.token_losses(rows))


@torch.no_grad()
def evaluate(model, rows: torch.Tensor, device: torch.device, chunk: int = 128) -> float:
    """Mean next-byte cross-entropy (nats) over ``rows``."""
    model.eval()
    total = sum(float(model.token_losses(rows[s : s + chunk].to(device)).sum()) for s in range(0, len(rows), chunk))
    model.train()
    return total / (rows.shape[0] * (rows.shape[1] - 1))


def bigram_loss(train_rows: torch.Tensor, eval_rows: torch.Tensor, add: float = 0.1) -> float:
    """Next-byte loss (nats) on ``eval_rows`` of an add-``add`` byte-bigram model counted on ``train_rows``:
    the loss of a model that knows one byte of context and nothing more."""
    counts = torch.full((256, 256), float(add), dtype=torch.float64)
    counts.index_put_((train_rows[:, :-1].flatten(), train_rows[:, 1:].flatten()),
                      torch.ones(train_rows[:, 1:].numel(), dtype=torch.float64), accumulate=True)
    log_p = (counts / counts.sum(1, keepdim=True)).log()
    return float(-log_p[eval_rows[:, :-1], eval_rows[:, 1:]].mean())


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count one half)."""
    pos, neg = scores[positive].double(), scores[~positive].double()
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError(f"auroc needs positives and negatives, got {pos.numel()} and {neg.numel()}")
    greater = (pos[:, None] > neg[None, :]).double().mean()
    equal = (pos[:, None] == neg[None, :]).double().mean()
    return float(greater + 0.5 * equal)


def _scope_params(model, scope: str) -> list:
    if scope == "first-block":
        return [p for m in model.blocks[0].modules() for p in m.parameters(recurse=False)]
    if scope == "all":
        return list(model.parameters())
    raise ValueError(f"scope must be 'all' or 'first-block', got {scope!r}")


def self_influence_loop(model, rows: torch.Tensor, scope: str, unit: int = 1) -> torch.Tensor:
    """``||grad_K mean-loss(unit)||^2`` per unit of ``unit`` consecutive rows, by plain autograd (one
    backward per unit): the reference the AUROCs use for every choice of K, micro-batch units included."""
    params = _scope_params(model, scope)
    model.eval()
    scores = []
    for start in range(0, rows.shape[0] - unit + 1, unit):
        loss = sequence_losses(model, rows[start : start + unit]).mean()
        grads = torch.autograd.grad(loss, params)
        scores.append(sum(float(g.pow(2).sum()) for g in grads))
    model.train()
    return torch.tensor(scores)


def training_unit_auroc(model, data: Data, cfg: Config, scope: str, unit: int, seed: int,
                        device: torch.device) -> float:
    """AUROC, corrupted vs clean window, of the z-score that training gives each window.

    ``cfg.scored_batches`` batches of ``cfg.batch`` windows are drawn from the pool as training
    draws them (uniformly, so each is a random mix at the pool's corruption share), cut into
    consecutive units of ``unit`` windows, each unit scored by its self-influence and z-scored
    within its batch (as :func:`~reweighting.influence.presence_weights` does); every window gets
    its unit's z-score. With ``unit = 1`` this is the per-window AUROC of the within-batch
    z-scores; with larger units it is what micro-batch weighting can see of a window's corruption.
    """
    if cfg.batch % unit:
        raise ValueError(f"the batch ({cfg.batch}) must be a multiple of the unit ({unit})")
    g = torch.Generator().manual_seed(20_000 + seed)
    zs, flags = [], []
    for _ in range(cfg.scored_batches):
        idx = torch.randint(data.pool.shape[0], (cfg.batch,), generator=g)
        si = self_influence_loop(model, data.pool[idx].to(device), scope, unit).double()
        z = (si - si.mean()) / si.std(unbiased=False).clamp(min=1e-30)
        zs.append(z.repeat_interleave(unit))
        flags.append(data.corrupted[idx])
    return auroc(torch.cat(zs), torch.cat(flags))


def scope_modules(model, cfg: Config) -> list | None:
    """The modules whose parameters make up ``K`` (None: all of them)."""
    if cfg.scope == "all":
        return None
    if cfg.scope == "first-block":
        return [m for m in model.blocks[0].modules() if any(True for _ in m.parameters(recurse=False))]
    raise ValueError(f"scope must be 'all' or 'first-block', got {cfg.scope!r}")


def _uniform_key(cfg: Config, seed: int) -> tuple[Config, int]:
    """What a uniform run depends on: the data and the training, not K, the micro-batch units, the
    switch or how it is scored afterwards (uniform never computes self-influence)."""
    return replace(cfg, scope=FULL.scope, microbatches=None, switch_fraction=FULL.switch_fraction,
                   scored_batches=FULL.scored_batches, auroc_margin=FULL.auroc_margin), seed


def train_uniform_cached(data: Data, cfg: Config, seed: int, device: torch.device, ctx: StudyContext | None,
                         cache: dict | None) -> dict:
    """``train(data, cfg, "uniform", seed, ...)``, reused from ``cache`` when the same uniform run was
    already trained (both settings of one corruption share it); a fresh dict each call, sharing the model."""
    if cache is None:
        return train(data, cfg, "uniform", seed, device, ctx)
    key = _uniform_key(cfg, seed)
    if key not in cache:
        cache[key] = train(data, cfg, "uniform", seed, device, ctx)
    return dict(cache[key])


def train(data: Data, cfg: Config, method: str, seed: int, device: torch.device,
          ctx: StudyContext | None = None) -> dict:
    """Train one model; returns its held-out loss, the weight share of corrupted samples and the
    effective sample size per stage, and the AUROC of the per-window weights' z-scores pooled over
    the steps (with ``ctx``, a progress bar over the steps)."""
    from ..influence import PresenceReweighter, SelfInfluence
    from .lm import GPTConfig, TinyGPT

    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if cfg.microbatches is not None and cfg.batch % cfg.microbatches:
        raise ValueError(f"the batch ({cfg.batch}) must split into {cfg.microbatches} equal micro-batches")
    torch.manual_seed(seed)
    model = TinyGPT(GPTConfig(context=cfg.seq_len, dim=cfg.dim, layers=cfg.layers, heads=cfg.heads)).to(device)
    perturb_initial_weights(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, cfg.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / cfg.steps))))
    taus = METHODS[method]
    switch = round(cfg.switch_fraction * cfg.steps)
    presence = PresenceReweighter(switch, *taus, microbatches=cfg.microbatches) if taus else None
    si = SelfInfluence(model, scope_modules(model, cfg), broadcast=[model.pos]) if taus else None
    g = torch.Generator().manual_seed(ORDER_SEED_BASE + seed)
    share = {"first": [], "second": []}
    ess = {"first": [], "second": []}
    online_z, online_bad = [], []
    steps = range(cfg.steps) if ctx is None else ctx.progress(range(cfg.steps), desc=f"{method} (seed {seed})")
    for step in steps:
        idx = torch.randint(data.pool.shape[0], (cfg.batch,), generator=g)
        rows, bad = data.pool[idx].to(device), data.corrupted[idx].to(device)
        optimizer.zero_grad(set_to_none=True)
        if presence is None:
            sequence_losses(model, rows).mean().backward()
        else:
            with si.capture():
                losses = sequence_losses(model, rows)
            w = presence.backward(si, losses)
            stage = "first" if step < switch else "second"
            share[stage].append(float(w[bad].sum()))
            ess[stage].append(float(presence.last_stats.ess_fraction))
            # the weight each window got, as a z-score of its unit's self-influence (a window of a
            # micro-batch unit gets the unit's): what training saw of each window's corruption
            si_units = presence.last_self_influence.double()
            z = (si_units - si_units.mean()) / si_units.std(unbiased=False).clamp(min=1e-30)
            online_z.append(z.repeat_interleave(cfg.batch // z.numel()).cpu())
            online_bad.append(bad.cpu())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    out = {"heldout": evaluate(model, data.heldout, device), "model": model,
           "corrupted_weight_share": {k: (sum(v) / len(v) if v else None) for k, v in share.items()},
           "ess_fraction": {k: (sum(v) / len(v) if v else None) for k, v in ess.items()}}
    if online_z and bool(torch.cat(online_bad).any()) and not bool(torch.cat(online_bad).all()):
        out["online_auroc"] = auroc(torch.cat(online_z), torch.cat(online_bad))
    return out
