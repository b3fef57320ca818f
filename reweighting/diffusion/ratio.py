"""The time-dependent density ratio ``w_t(x_t) = p_data^t(x_t) / p_bias^t(x_t)`` from a discriminator.

docs/methods/tiw-dsm.md.

A discriminator ``d(x_t, t) = sigmoid(logit)`` trained with balanced classes (reference = 1,
biased = 0) on samples noised by the same schedule gives ``w_t = d / (1 - d) = exp(logit)``.
Everything is in log space. If the score model's training stream mixes reference and biased
samples with reference fraction ``pi``, the weight needed is ``p_data^t / p_mix^t`` with
``p_mix = pi p_data + (1 - pi) p_bias``:

    log w_t = logit - logaddexp(logit + log pi, log(1 - pi))

which is ``logit`` at ``pi = 0`` and ``0`` at ``pi = 1``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..checks import check_finite, checks_enabled
from .schedules import check_samples

__all__ = ["log_ratio_from_logit", "TimeDependentRatio"]


def _check_fraction(reference_fraction: float) -> float:
    pi = float(reference_fraction)
    if not (0.0 <= pi <= 1.0):
        raise ValueError(f"reference_fraction must be in [0, 1], got {reference_fraction!r}")
    return pi


def _check_clip(clip: float | None) -> float | None:
    if clip is None:
        return None
    c = float(clip)
    if not (c > 0.0) or math.isinf(c):
        raise ValueError(f"clip must be a finite number > 0 or None, got {clip!r}")
    return c


def log_ratio_from_logit(
    logit: torch.Tensor, reference_fraction: float = 0.0, clip: float | None = None
) -> torch.Tensor:
    """``log w = logit - logaddexp(logit + log pi, log(1 - pi))``, then clamped to ``[-clip, clip]``.

    Differentiable (the clamp has zero gradient where it is active, so the score correction
    ``grad_x log w`` is that of the clipped weight). Computed in float32.
    """
    clip = _check_clip(clip)
    z = _mixture_log_ratio(logit, _check_fraction(reference_fraction))
    return z if clip is None else torch.clamp(z, -clip, clip)


def _mixture_log_ratio(logit: torch.Tensor, pi: float) -> torch.Tensor:
    z = logit.float()
    if pi == 0.0:
        return z
    if pi == 1.0:
        return z - z  # the stream is p_data itself: weight 1, no correction (keeps the graph and shape)
    return z - torch.logaddexp(z + math.log(pi), torch.full_like(z, math.log1p(-pi)))


class TimeDependentRatio(nn.Module):
    """``log w_t(x_t)`` and ``grad_x log w_t(x_t)`` from a discriminator ``discriminator(x_t, t) -> logit [B]``.

    ``reference_fraction`` is the share ``pi`` of reference samples in the stream the score model
    is trained on (0 when it sees biased samples only). ``clip`` bounds ``|log w|`` (``None``: no
    bound); clipped samples are counted in the buffers ``n_clipped`` / ``n_evaluated`` (part of
    ``state_dict``), read with :meth:`clip_fraction`.

    Both methods return detached float32 tensors and never touch the discriminator's ``.grad``:
    the weight and the correction are targets, not part of the score model's graph. The
    discriminator should be in ``eval()`` mode (a batch-norm in training mode would couple samples).
    """

    def __init__(self, discriminator: nn.Module, reference_fraction: float = 0.0, clip: float | None = 20.0) -> None:
        super().__init__()
        self.discriminator = discriminator
        self.reference_fraction = _check_fraction(reference_fraction)
        self.clip = _check_clip(clip)
        self.register_buffer("n_clipped", torch.zeros((), dtype=torch.long))
        self.register_buffer("n_evaluated", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"reference_fraction={self.reference_fraction}, clip={self.clip}"

    def _logit(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(x_t, torch.Tensor) or x_t.dim() == 0 or x_t.shape[0] == 0:
            raise ValueError(f"x_t must be a non-empty batch, got {getattr(x_t, 'shape', type(x_t).__name__)}")
        check_samples(x_t, "x_t", self.discriminator, "discriminator")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"t must be a torch.Tensor of times, got {type(t).__name__}")
        if checks_enabled():
            check_finite(t.detach().reshape(-1).float(), "t")
        batch = x_t.shape[0]
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must have shape [{batch}] (one time per sample), got {tuple(t.shape)}")
        logit = self.discriminator(x_t, t)
        if logit.dim() == 2 and logit.shape[1] == 1:
            logit = logit.squeeze(1)
        if logit.shape != (batch,):
            raise ValueError(
                f"the discriminator must return one logit per sample (shape [{batch}]), got {tuple(logit.shape)}"
            )
        if checks_enabled():
            check_finite(logit.detach(), "discriminator logits (x_t and t are finite)")
        return logit

    def _log_weight(self, logit: torch.Tensor) -> torch.Tensor:
        z = _mixture_log_ratio(logit, self.reference_fraction)
        self.n_evaluated += logit.shape[0]
        if self.clip is None:
            return z
        self.n_clipped += (z.detach().abs() > self.clip).sum()
        return torch.clamp(z, -self.clip, self.clip)

    def log_weight(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``log w_t(x_t)``, shape ``[B]``, float32, detached."""
        with torch.no_grad():
            return self._log_weight(self._logit(x_t, t)).detach()

    def weight(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``w_t(x_t) = exp(log w_t(x_t))``, shape ``[B]``."""
        return torch.exp(self.log_weight(x_t, t))

    def log_weight_and_grad(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log w_t(x_t) [B], grad_x log w_t(x_t))`` (the gradient shaped like ``x_t``), float32, detached.

        The gradient is taken with respect to a detached copy of ``x_t``, so it never enters the
        score model's graph, and only with respect to that input, so the discriminator's
        parameters receive no gradient.
        """
        x = x_t.detach().requires_grad_(True)
        with torch.enable_grad():
            z = self._log_weight(self._logit(x, t.detach()))
            (grad,) = torch.autograd.grad(z.sum(), x)
        return z.detach(), grad.detach().float()

    def clip_fraction(self) -> float:
        """Share of evaluated samples whose ``|log w|`` exceeded ``clip`` so far (reads back to the host)."""
        return float(self.n_clipped) / max(int(self.n_evaluated), 1)
