"""Training objectives of the Q-probe (docs/methods/qprobe.md).

- ``L_Q  = mean (Q - r)^2``                                   (:func:`mse_loss`)
- ``L_CE = BCE(sigmoid(Q), r)`` for ``r in [0, 1]``           (:func:`bce_loss`)
- ``L_PG = - mean_g sum_i softmax(Q_g / beta_train)_i (r_i - b)`` over groups ``g`` of samples of
  the same prompt                                             (:func:`pg_loss`)
- ``L_QP = - mean log sigmoid(Q(a_w) - Q(a_l))``              (:func:`preference_loss`)

All take the probe's outputs ``Q`` (with their graph) and return a scalar. Their input checks read
values on the host and are skipped under ``reweighting.checks.checks(False)``, as :func:`fit_probe` runs
its steps after validating the whole training set once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..checks import check_finite, check_temperature, checks_enabled, describe_indices

__all__ = ["mse_loss", "bce_loss", "pg_loss", "preference_loss", "OBJECTIVES"]

OBJECTIVES = ("mse", "bce", "pg", "preference")


def _check_pair(q: torch.Tensor, r: torch.Tensor) -> None:
    if q.shape != r.shape:
        raise ValueError(f"q and rewards must have the same shape, got {tuple(q.shape)} and {tuple(r.shape)}")
    if q.numel() == 0:
        raise ValueError("q is empty: a batch needs at least one sample")
    check_finite(r.reshape(-1), "rewards")


def mse_loss(q: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """``L_Q = mean_i (Q_i - r_i)^2``: the probe regresses the reward."""
    _check_pair(q, rewards)
    return F.mse_loss(q.float(), rewards.to(q.device).float())


def bce_loss(q: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """``L_CE = - mean_i [r_i log sigmoid(Q_i) + (1 - r_i) log(1 - sigmoid(Q_i))]``, rewards in [0, 1]."""
    _check_pair(q, rewards)
    r = rewards.to(q.device).float()
    outside = (r < 0) | (r > 1)
    if checks_enabled() and bool(outside.any()):
        raise ValueError(f"bce_loss needs rewards in [0, 1]; out of range at sample indices "
                         f"{describe_indices(outside.reshape(-1))}")
    return F.binary_cross_entropy_with_logits(q.float(), r)


def pg_loss(
    q: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    baseline: float = 0.0,
) -> torch.Tensor:
    """``L_PG = - mean_g sum_i softmax(Q_g / beta_train)_i (r_i - b)``.

    ``q`` and ``rewards`` are ``[G, K]``: row ``g`` holds the samples of one group (samples of the
    same prompt). ``mask`` (``[G, K]``, True = a real sample) allows groups of different sizes: masked
    entries take no part in the softmax. ``temperature`` is ``beta_train`` (the paper's code uses 1).
    Since each group's softmax sums to one, a constant ``baseline`` ``b`` shifts the loss by ``b``
    and leaves its gradient unchanged. This is the gradient of the expected reward of the policy
    that picks one of the group's samples with probability ``softmax(Q / beta_train)``.
    """
    check_temperature(temperature, "temperature")
    if not math.isfinite(float(baseline)):
        raise ValueError(f"baseline must be a finite number, got {baseline!r}")
    if q.dim() != 2:
        raise ValueError(f"pg_loss needs q of shape [groups, samples], got {tuple(q.shape)}")
    _check_pair(q, rewards)
    if mask is None:
        mask = torch.ones_like(q, dtype=torch.bool)
    elif mask.shape != q.shape:
        raise ValueError(f"mask must have the shape of q {tuple(q.shape)}, got {tuple(mask.shape)}")
    mask = mask.to(device=q.device, dtype=torch.bool)
    empty = ~mask.any(dim=1)
    if checks_enabled() and bool(empty.any()):
        raise ValueError(f"pg_loss: groups with no sample at group indices {describe_indices(empty)}")
    logits = torch.where(mask, q.float() / float(temperature), torch.full_like(q, -math.inf, dtype=torch.float32))
    probs = torch.softmax(logits, dim=1)
    advantage = torch.where(mask, rewards.to(q.device).float() - float(baseline), torch.zeros_like(probs))
    return -(probs * advantage).sum(dim=1).mean()


def preference_loss(q_preferred: torch.Tensor, q_rejected: torch.Tensor) -> torch.Tensor:
    """``L_QP = - mean log sigmoid(Q(a_w) - Q(a_l))`` over pairs (preferred ``a_w``, rejected ``a_l``)."""
    if q_preferred.shape != q_rejected.shape:
        raise ValueError(f"q_preferred and q_rejected must have the same shape, got {tuple(q_preferred.shape)} "
                         f"and {tuple(q_rejected.shape)}")
    if q_preferred.numel() == 0:
        raise ValueError("preference_loss needs at least one pair: q_preferred and q_rejected are empty")
    return F.softplus(-(q_preferred.float() - q_rejected.float())).mean()
