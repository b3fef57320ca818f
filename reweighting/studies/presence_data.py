"""Data of the ``presence`` study: windows of the standard library's source, a share of them corrupted.

Every seed draws its own training pool (which windows, which of them are corrupted and how) and
its own held-out windows, so that replicates share no randomness; the corpus itself (the
standard library's files, split into training and held-out files by a hash of their names) is
fixed.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the study's configuration (only for annotations)
    from .presence_train import Config

__all__ = ["Data", "load_data", "permute_words", "permute_bytes", "random_bytes", "shuffled_continuation",
           "near_duplicate", "CORRUPTIONS", "DONOR_CORRUPTIONS", "NEAR_DUPLICATE_TEMPLATES", "unigram_entropy"]

NEAR_DUPLICATE_TEMPLATES = 8
# the data of seed s come from this generator seed, so that no run's data share a draw with another's
DATA_SEED_BASE = 1234


@dataclass
class Data:
    pool: torch.Tensor  # [N, seq_len + 1] training windows, a share of them corrupted
    corrupted: torch.Tensor  # [N] bool
    heldout: torch.Tensor  # clean windows of held-out files


def permute_words(row: bytes, g: torch.Generator) -> bytes:
    """The window with its words (runs of non-whitespace) in a random order and its whitespace in place.

    Same bytes, same length: only the order of the words changes.
    """
    parts = re.split(rb"(\s+)", row)
    words = parts[0::2]
    order = torch.randperm(len(words), generator=g).tolist()
    parts[0::2] = [words[i] for i in order]
    return b"".join(parts)


def permute_bytes(row: bytes, g: torch.Generator) -> bytes:
    """The window's bytes in a random order (the byte-level model's tokens permuted)."""
    return bytes(row[i] for i in torch.randperm(len(row), generator=g).tolist())


def random_bytes(row: bytes, g: torch.Generator) -> bytes:
    """Uniformly random bytes of the same length (noise that no text resembles)."""
    return bytes(torch.randint(256, (len(row),), generator=g).tolist())


def shuffled_continuation(row: bytes, g: torch.Generator, donor: bytes) -> bytes:
    """The window's first half followed by the second half of another window (an incoherent continuation)."""
    half = len(row) // 2
    return row[:half] + donor[half:]


def near_duplicate(row: bytes, g: torch.Generator, donor: bytes) -> bytes:
    """A copy of ``donor`` (one of a few template windows) with two bytes changed: redundant data."""
    out = bytearray(donor)
    for i in torch.randint(len(out), (2,), generator=g).tolist():
        out[i] = int(torch.randint(32, 127, (1,), generator=g))
    return bytes(out)


# name -> corruption. Permutations keep the bytes; the others do not.
CORRUPTIONS = {"words": permute_words, "tokens": permute_bytes, "random-bytes": random_bytes}
DONOR_CORRUPTIONS = {"shuffled-continuation": shuffled_continuation, "near-duplicate": near_duplicate}


@functools.lru_cache(maxsize=4)
def _windows(seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every window of the training files and of the held-out files (read once per process)."""
    from .lm import pack_sequences, stdlib_documents

    train_docs, heldout_docs = stdlib_documents()
    return pack_sequences(train_docs, seq_len), pack_sequences(heldout_docs, seq_len)


def load_data(cfg: Config, seed: int) -> Data:
    """Seed ``seed``'s pool of ``cfg.train_sequences`` training windows (a share ``cfg.corrupt_share``
    corrupted with ``cfg.corruption``) and ``cfg.eval_sequences`` clean held-out windows."""
    if cfg.corruption not in CORRUPTIONS and cfg.corruption not in DONOR_CORRUPTIONS:
        raise ValueError(f"corruption must be one of {[*CORRUPTIONS, *DONOR_CORRUPTIONS]}, got {cfg.corruption!r}")
    if not 0.0 < cfg.corrupt_share < 1.0:
        raise ValueError(f"corrupt_share must be in (0, 1), got {cfg.corrupt_share!r}")
    all_train, all_heldout = _windows(cfg.seq_len)
    g = torch.Generator().manual_seed(DATA_SEED_BASE + seed)
    pool = all_train
    pool = pool[torch.randperm(pool.shape[0], generator=g)[: cfg.train_sequences]].clone()
    n_bad = round(cfg.corrupt_share * pool.shape[0])
    corrupted = torch.zeros(pool.shape[0], dtype=torch.bool)
    corrupted[torch.randperm(pool.shape[0], generator=g)[:n_bad]] = True
    original = pool.clone()
    templates = torch.randint(pool.shape[0], (NEAR_DUPLICATE_TEMPLATES,), generator=g)
    for i in torch.nonzero(corrupted).flatten().tolist():
        row = bytes(pool[i].to(torch.uint8).tolist())
        if cfg.corruption in CORRUPTIONS:
            row = CORRUPTIONS[cfg.corruption](row, g)
        else:
            if cfg.corruption == "near-duplicate":
                donor_index = int(templates[torch.randint(len(templates), (1,), generator=g)])
            else:
                donor_index = int(torch.randint(pool.shape[0], (1,), generator=g))
            row = DONOR_CORRUPTIONS[cfg.corruption](row, g, bytes(original[donor_index].to(torch.uint8).tolist()))
        pool[i] = torch.tensor(list(row), dtype=torch.long)
    heldout = all_heldout[torch.randperm(all_heldout.shape[0], generator=g)[: cfg.eval_sequences]].clone()
    return Data(pool=pool, corrupted=corrupted, heldout=heldout)


def unigram_entropy(rows: torch.Tensor) -> float:
    """Entropy (nats) of the byte frequencies of ``rows``: the loss of the best context-free model."""
    counts = torch.bincount(rows.flatten(), minlength=256).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())
