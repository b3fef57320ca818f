"""The small byte-level GPT and the standard-library text corpus shared by studies and examples.

The corpus is the Python standard library's own source files, which ship with every Python
install, so nothing is downloaded. Files are split deterministically into training and held-out
documents by a hash of their path. The text depends on the Python version; studies record it.
"""

from __future__ import annotations

import hashlib
import math
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GPTConfig", "TinyGPT", "stdlib_documents", "pack_sequences", "python_version"]

VOCAB_SIZE = 256  # bytes


def python_version() -> str:
    """The version whose standard library is the corpus (recorded in study configs)."""
    return ".".join(map(str, sys.version_info[:3]))


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "turtledemo"}
    files = [p for p in root.rglob("*.py") if not (skip & set(p.relative_to(root).parts))]
    return sorted(files, key=lambda p: str(p.relative_to(root)))


def _is_heldout(path: Path, heldout_fraction: float) -> bool:
    digest = hashlib.sha256(path.name.encode() + str(path.parent.name).encode()).digest()
    return int.from_bytes(digest[:4], "little") / 2**32 < heldout_fraction


def stdlib_documents(
    max_documents: int | None = None, *, heldout_fraction: float = 0.1, min_bytes: int = 2000, max_bytes: int = 60_000
) -> tuple[list[bytes], list[bytes]]:
    """Training and held-out documents (file contents as bytes) from the standard library.

    Files smaller than ``min_bytes`` are skipped and longer ones truncated to ``max_bytes``; the
    split is by a hash of the file's name, so it is the same on every run and machine with the
    same Python version. ``max_documents`` caps each list (the first ones in path order).
    """
    train, heldout = [], []
    for path in _stdlib_files():
        data = path.read_bytes()
        if len(data) < min_bytes:
            continue
        (heldout if _is_heldout(path, heldout_fraction) else train).append(data[:max_bytes])
    if max_documents is not None:
        train, heldout = train[:max_documents], heldout[:max_documents]
    if not train or not heldout:
        raise RuntimeError("the standard library's source files were not found; is this a full Python install?")
    return train, heldout


def pack_sequences(documents: list[bytes], seq_len: int, *, max_sequences: int | None = None) -> torch.Tensor:
    """Cut each document into non-overlapping windows of ``seq_len + 1`` bytes (input and shifted target).

    Returns a ``uint8``-valued long tensor ``[N, seq_len + 1]``; a window never crosses documents,
    so each row belongs to exactly one document. Leftover bytes at a document's end are dropped.
    """
    rows, count = [], 0
    width = seq_len + 1
    for doc in documents:
        t = torch.frombuffer(bytearray(doc), dtype=torch.uint8).long()
        n = t.numel() // width
        if n:
            rows.append(t[: n * width].view(n, width))
            count += n
        if max_sequences is not None and count >= max_sequences:
            break
    out = torch.cat(rows)
    return out[:max_sequences] if max_sequences is not None else out


@dataclass
class GPTConfig:
    vocab_size: int = VOCAB_SIZE
    context: int = 128
    dim: int = 128
    layers: int = 2
    heads: int = 4
    dropout: float = 0.0
    tie_embeddings: bool = True


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.fc = nn.Linear(cfg.dim, 4 * cfg.dim)
        self.out = nn.Linear(4 * cfg.dim, cfg.dim)
        self.heads = cfg.heads
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        x = x + F.dropout(self.proj(a.transpose(1, 2).reshape(b, t, d)), p, self.training)
        return x + F.dropout(self.out(F.gelu(self.fc(self.ln2(x)))), p, self.training)


class TinyGPT(nn.Module):
    """A small pre-LayerNorm decoder-only transformer (Linear, Embedding and LayerNorm layers only).

    ``forward(tokens) -> logits [B, T, V]``; ``token_losses(batch)`` gives ``[B, T]`` next-token
    cross-entropies for rows of ``pack_sequences``. With ``tie_embeddings`` the output layer
    shares the token embedding's weight (as GPT-2 does).
    """

    def __init__(self, cfg: GPTConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or GPTConfig()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Embedding(cfg.context, cfg.dim)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok.weight
        self.apply(self._init)
        for block in self.blocks:  # scaled init of residual projections (GPT-2)
            for lin in (block.proj, block.out):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * cfg.layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.cfg.context:
            raise ValueError(f"sequence length {t} exceeds the model's context {self.cfg.context}")
        x = self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def token_losses(self, batch: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy ``[B, T]`` for rows ``[B, T + 1]`` (inputs ``[:, :-1]``, targets ``[:, 1:]``)."""
        logits = self(batch[:, :-1])
        return F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")


def ngram_log_loss(train_rows: torch.Tensor, eval_rows: torch.Tensor, order: int, alpha: float) -> float:
    """Mean next-byte cross-entropy (nats) of an add-``alpha`` byte ``order``-gram model on ``eval_rows``.

    Counts come from the windows ``train_rows`` ``[N, L + 1]``; the model predicts byte ``t + 1`` of a
    window from the ``min(t + 1, order - 1)`` bytes before it inside the same window (the context the
    network sees, cut to the n-gram's), as ``(c(ctx, x) + alpha) / (c(ctx) + 256 alpha)``. It scores
    the same positions as ``TinyGPT.token_losses``, so the two losses compare directly.
    """
    if order < 1 or alpha <= 0:
        raise ValueError(f"ngram_log_loss: order must be >= 1 and alpha > 0, got {order}, {alpha}")
    total, count = 0.0, 0
    width = eval_rows.shape[1]
    for k in range(1, order + 1):  # k - 1 bytes of context
        # positions of the target byte whose context has exactly k - 1 bytes (or at least, for the top order)
        targets = [k - 1] if k < order else list(range(k - 1, width))
        targets = [t for t in targets if 1 <= t < width] if k > 1 else [t for t in targets if t == 0]
        if k == 1:
            targets = []  # the network never predicts byte 0 of a window: nothing to score at k = 1
        if not targets:
            continue
        train_keys, train_ctx = _ngram_keys(train_rows, k, range(k - 1, train_rows.shape[1]))
        eval_keys, eval_ctx = _ngram_keys(eval_rows, k, targets)
        joint = _lookup(torch.unique(train_keys, return_counts=True), eval_keys)
        ctx = _lookup(torch.unique(train_ctx, return_counts=True), eval_ctx)
        p = (joint + alpha) / (ctx + VOCAB_SIZE * alpha)
        total += float(-p.log().sum())
        count += p.numel()
    return total / count


def _ngram_keys(rows: torch.Tensor, k: int, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer keys of (context of k - 1 bytes, byte) and of the context alone, for each target position."""
    rows = rows.long()
    joint, ctx = [], []
    for t in targets:
        c = torch.zeros(rows.shape[0], dtype=torch.long)
        for j in range(t - k + 1, t):
            c = c * VOCAB_SIZE + rows[:, j]
        ctx.append(c)
        joint.append(c * VOCAB_SIZE + rows[:, t])
    return torch.cat(joint), torch.cat(ctx)


def _lookup(table: tuple[torch.Tensor, torch.Tensor], keys: torch.Tensor) -> torch.Tensor:
    """Counts of ``keys`` in ``(sorted unique keys, counts)`` (0 where absent), as float64."""
    values, counts = table
    idx = torch.searchsorted(values, keys).clamp(max=values.numel() - 1)
    return torch.where(values[idx] == keys, counts[idx], torch.zeros_like(counts[idx])).double()
