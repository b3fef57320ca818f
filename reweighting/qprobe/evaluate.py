"""Evaluating a Q-probe without sampling noise (docs/methods/qprobe.md).

For each test prompt with ``n`` samples, the samples are split into ``n // k`` disjoint chunks of
``k`` (a remainder of ``n mod k`` samples is left out) and the policy's exact expected reward on
each chunk, ``sum_i softmax(Q/beta)_i r_i``, is averaged over chunks and then prompts. The
baseline is the mean reward (pass@1 for 0/1 rewards); the skyline is pass@k (an oracle picking
the best of k).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch

from ..checks import check_finite
from .select import selection_weights

__all__ = ["expected_return", "pass_at_k", "mean_reward", "evaluate_probe"]


def _check_table(q: torch.Tensor | None, r: torch.Tensor, k: int) -> int:
    if not isinstance(r, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor [prompts, samples], got {type(r).__name__}")
    try:
        if isinstance(k, bool):
            raise TypeError
        operator.index(k)  # Python, NumPy and 0-d torch integers; not 1.5
    except TypeError:
        raise TypeError(f"k must be an integer, got {k!r}") from None
    if r.dim() != 2:
        raise ValueError(f"rewards must be [prompts, samples], got shape {tuple(r.shape)}")
    if q is not None and q.shape != r.shape:
        raise ValueError(f"q and rewards must have the same shape, got {tuple(q.shape)} and {tuple(r.shape)}")
    if not 1 <= int(k) <= r.shape[1]:
        raise ValueError(f"k must be between 1 and the number of samples per prompt ({r.shape[1]}), got {k!r}")
    check_finite(r.reshape(-1), "rewards")
    return r.shape[1] // int(k)


def expected_return(q: torch.Tensor, rewards: torch.Tensor, k: int, beta: float) -> torch.Tensor:
    """Mean over prompts and disjoint chunks of ``k`` of ``sum_i softmax(Q_chunk / beta)_i r_i``.

    ``q`` and ``rewards`` are ``[prompts, n]``; chunk ``c`` of a prompt is columns
    ``[c k, (c + 1) k)``. ``beta = 0`` is argmax (ties averaged). Returns a float32 scalar tensor.
    """
    chunks = _check_table(q, rewards, k)
    p, k = rewards.shape[0], int(k)
    qc = q[:, : chunks * k].reshape(p * chunks, k)
    rc = rewards[:, : chunks * k].reshape(p * chunks, k).float()
    return (selection_weights(qc, beta) * rc).sum(dim=1).mean()


def pass_at_k(rewards: torch.Tensor, k: int, threshold: float = 1.0) -> torch.Tensor:
    """Unbiased pass@k, ``mean over prompts of 1 - C(n - c, k) / C(n, k)``, ``c`` = samples with ``r >= threshold``.

    ``rewards`` is ``[prompts, n]``. Computed with log-gamma in float64 (exact for any n).
    """
    _check_table(None, rewards, k)
    n = torch.tensor(float(rewards.shape[1]), dtype=torch.float64)
    wrong = n - (rewards >= threshold).double().sum(dim=1)

    def log_choose_k(m: torch.Tensor) -> torch.Tensor:  # log C(m, k) without the common -log k!
        return torch.lgamma(m + 1) - torch.lgamma(torch.clamp(m - k, min=0) + 1)

    fail = torch.where(wrong >= k, torch.exp(log_choose_k(wrong) - log_choose_k(n)), torch.zeros_like(wrong))
    return (1 - fail).mean().float()


def mean_reward(rewards: torch.Tensor) -> torch.Tensor:
    """The baseline: mean reward of one sample (pass@1 for 0/1 rewards)."""
    if not isinstance(rewards, torch.Tensor) or rewards.numel() == 0:
        raise ValueError("rewards must be a non-empty torch.Tensor")
    check_finite(rewards.reshape(-1), "rewards")
    return rewards.float().mean()


def evaluate_probe(
    q: torch.Tensor, rewards: torch.Tensor, ks: Iterable[int], betas: Iterable[float]
) -> dict[str, dict]:
    """Expected return for every ``(k, beta)``, with the baseline and pass@k: plain floats for a report.

    Returns ``{"baseline": float, "pass_at_k": {k: float}, "expected_return": {beta: {k: float}}}``.
    """
    ks, betas = [operator.index(k) if not isinstance(k, bool) else k for k in ks], [float(b) for b in betas]
    return {
        "baseline": float(mean_reward(rewards)),
        "pass_at_k": {k: float(pass_at_k(rewards, k)) for k in ks},
        "expected_return": {b: {k: float(expected_return(q, rewards, k, b)) for k in ks} for b in betas},
    }
