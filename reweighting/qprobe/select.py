"""Choosing one of k sampled completions with a Q-probe: sample from ``softmax(Q / beta)``.

docs/methods/qprobe.md. The selection is per prompt: each prompt's k candidates get their own
softmax. (The core's :func:`reweighting.tilt` normalises over the whole, possibly distributed,
batch, which is the wrong support here, so the softmax is taken locally along the last dimension.)
As k grows, the chosen completion's distribution tends to ``p0(a|x) exp(Q/beta) / Z``, the
maximiser of ``E[Q] - beta KL(pi || p0)``.
"""

from __future__ import annotations

import math

import torch

from ..checks import check_finite, describe_indices

__all__ = ["selection_weights", "select"]


def _check_q(q: torch.Tensor, beta: float, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(q, torch.Tensor) or q.dim() not in (1, 2):
        raise ValueError(f"q must be a tensor [k] or [prompts, k], got {getattr(q, 'shape', type(q))}")
    if q.shape[-1] == 0:
        raise ValueError("q has no candidates (k = 0)")
    b = float(beta)
    if not (b >= 0.0) or math.isinf(b):
        raise ValueError(f"beta must be a finite number >= 0 (0 = argmax), got {beta!r}")
    values = q.detach().float()
    if mask is None:
        mask = torch.ones_like(values, dtype=torch.bool)
    else:
        if mask.shape != q.shape:
            raise ValueError(f"mask must have the shape of q {tuple(q.shape)}, got {tuple(mask.shape)}")
        mask = mask.to(device=values.device, dtype=torch.bool)
    check_finite(torch.where(mask, values, torch.zeros_like(values)).reshape(-1), "q")
    empty = ~mask.reshape(-1, q.shape[-1]).any(dim=1)
    if bool(empty.any()):
        raise ValueError(f"mask leaves no candidate for prompt indices {describe_indices(empty)}")
    return values, mask


def selection_weights(q: torch.Tensor, beta: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(Q / beta)`` over each prompt's candidates (last dimension), float32 and detached.

    ``beta = 0`` is the argmax policy with ties shared equally (its exact expectation). Masked
    candidates (``mask`` False) get weight 0.
    """
    values, mask = _check_q(q, beta, mask)
    masked = torch.where(mask, values, torch.full_like(values, -math.inf))
    if float(beta) == 0.0:
        top = masked == masked.amax(dim=-1, keepdim=True)
        return top.float() / top.sum(dim=-1, keepdim=True)
    return torch.softmax(masked / float(beta), dim=-1)


def select(
    q: torch.Tensor,
    beta: float,
    generator: torch.Generator | None = None,
    *,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one candidate per prompt with probability ``softmax(Q / beta)``; ``beta = 0`` is argmax.

    ``q`` is ``[k]`` or ``[prompts, k]``. Returns ``(choice, weights)``: the chosen index (a scalar
    or ``[prompts]``) and the selection probabilities (the shape of ``q``; one-hot on the choice
    for ``beta = 0``, where ties go to the first candidate). Draws come from ``generator``.
    """
    weights = selection_weights(q, beta, mask)
    flat = weights.reshape(-1, weights.shape[-1])
    if float(beta) == 0.0:
        choice = flat.argmax(dim=-1)  # the first of tied maxima
        flat = torch.zeros_like(flat).scatter_(1, choice.unsqueeze(1), 1.0)
    else:
        choice = torch.multinomial(flat, 1, generator=generator).squeeze(1)
    return choice.reshape(q.shape[:-1]), flat.reshape(q.shape)
