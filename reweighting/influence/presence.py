"""PRESENCE (Thakkar et al., EMNLP 2023): weights from z-scored self-influence, in two stages.

docs/methods/presence.md: per batch, ``s = (SI - mean SI) / sqrt(var SI + eps)`` and
``w = softmax(tau * s)``; the update is ``sum_i w_i grad l_i``. The first ``switch_step`` steps
use ``tau_first = +1`` (favour high self-influence: novel samples), the rest ``tau_second = -1``
(suppress it: likely noise). In the pre-training variant the batch is cut into ``n``
micro-batches, each scored as one unit (the squared norm of its summed gradient) and all its
samples share the unit's weight.

Usage with the self-influence engine (one forward, one backward)::

    si = SelfInfluence(model, broadcast=[model.pos])
    presence = PresenceReweighter(switch_step=1000)
    for batch in loader:
        with si.capture():
            losses = per_sample_loss(model, batch)       # [B]
        weights = presence.backward(si, losses)          # .grad = sum_i w_i grad l_i
        optimizer.step(); optimizer.zero_grad()
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..weights import WeightStats, tilt, weight_stats, zscore
from .engine import SelfInfluence, microbatch_sizes

__all__ = ["presence_weights", "PresenceReweighter"]


def presence_weights(
    self_influence: torch.Tensor, tau: float, *, eps: float = 1e-8, mask: torch.Tensor | None = None, group=None
) -> torch.Tensor:
    """``w = softmax(tau * zscore(SI))`` over the global batch (float32, detached, sums to 1).

    The sign of ``tau`` is folded into the scores and ``1 / |tau|`` is the temperature of
    :func:`reweighting.tilt`; ``tau = 0`` gives uniform weights.
    """
    tau = float(tau)
    if not math.isfinite(tau):
        raise ValueError(f"tau must be a finite number, got {tau!r}")
    s = zscore(self_influence, eps=eps, mask=mask, group=group)
    if tau == 0.0:
        return tilt(torch.zeros_like(s), 1.0, mask=mask, group=group)
    return tilt(math.copysign(1.0, tau) * s, 1.0 / abs(tau), mask=mask, group=group)


class PresenceReweighter:
    """Two-stage PRESENCE weights and the weighted update, with a step counter.

    Steps ``0 .. switch_step - 1`` use ``tau_first``; from step ``switch_step`` on, ``tau_second``.
    The counter counts optimizer steps: :meth:`backward` advances it by default; with gradient
    accumulation pass ``advance=False`` on every micro-batch and call :meth:`advance` once per
    optimizer step. It is saved by :meth:`state_dict`. ``microbatches=n`` scores ``n``
    contiguous micro-batches of each rank's batch as units; ``None`` scores each sample.
    """

    def __init__(
        self,
        switch_step: int,
        tau_first: float = 1.0,
        tau_second: float = -1.0,
        microbatches: int | None = None,
        *,
        eps: float = 1e-8,
        group=None,
    ):
        if isinstance(switch_step, bool) or not isinstance(switch_step, int) or switch_step < 0:
            raise ValueError(f"switch_step must be an integer >= 0, got {switch_step!r}")
        for name, tau in (("tau_first", tau_first), ("tau_second", tau_second)):
            if not math.isfinite(float(tau)):
                raise ValueError(f"{name} must be a finite number, got {tau!r}")
        if microbatches is not None and (not isinstance(microbatches, int) or microbatches < 1):
            raise ValueError(f"microbatches must be None or an integer >= 1, got {microbatches!r}")
        self.switch_step = switch_step
        self.tau_first = float(tau_first)
        self.tau_second = float(tau_second)
        self.microbatches = microbatches
        self.eps = eps
        self.group = group
        self.step = 0
        self.last_self_influence: torch.Tensor | None = None
        self.last_stats: WeightStats | None = None

    @property
    def tau(self) -> float:
        """The temperature sign and scale of the current step."""
        return self.tau_first if self.step < self.switch_step else self.tau_second

    def weights(self, self_influence: torch.Tensor) -> torch.Tensor:
        """Per-unit weights ``softmax(tau * zscore(SI))`` at the current step (state unchanged)."""
        return presence_weights(self_influence, self.tau, eps=self.eps, group=self.group)

    def per_sample(self, unit_weights: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Spread micro-batch weights over their samples: each gets ``w_unit / size_unit``."""
        if self.microbatches is None:
            return unit_weights
        # The sizes are known on the host: the first `extra` units hold base + 1 samples, the rest
        # base. Repeating by Python integers keeps every shape static (no wait for the device).
        sizes = microbatch_sizes(batch_size, self.microbatches)
        base, extra = sizes[-1], sizes.count(sizes[-1] + 1)
        parts = []
        if extra:
            parts.append(torch.repeat_interleave(unit_weights[:extra] / (base + 1), base + 1))
        parts.append(torch.repeat_interleave(unit_weights[extra:] / base, base))
        return torch.cat(parts)

    def backward(
        self,
        influence: SelfInfluence,
        losses: torch.Tensor,
        *,
        advance: bool = True,
        scale: float | torch.Tensor = 1.0,
        documents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Score the captured batch, add ``scale * sum_i w_i grad l_i`` to ``.grad``; returns ``w`` ``[B]``.

        The weights sum to one over the global batch, so the update is on the scale of a mean loss.
        ``scale`` multiplies only the gradient (e.g. ``1 / K`` for ``K`` accumulated micro-batches,
        times an fp16 loss scale); the returned weights and :attr:`last_stats` are unscaled.
        ``advance=True`` then counts one optimizer step; pass ``False`` for all but the last
        micro-batch of an accumulation window (or for all, and call :meth:`advance` yourself).
        Packed rows: ``losses`` per document ``[N]`` and ``documents`` the ``[rows, positions]`` ids
        (see :meth:`SelfInfluence.norms`); each document is then a unit with its own weight.
        """
        if documents is not None and self.microbatches is not None:
            raise ValueError("documents and microbatches cannot be combined: the units are either documents or "
                             "micro-batches")
        si = influence.norms(losses, microbatches=self.microbatches, documents=documents)
        unit_weights = self.weights(si)
        w = self.per_sample(unit_weights, losses.shape[0])
        influence.weighted_backward(w * scale)
        self.last_self_influence = si
        self.last_stats = weight_stats(unit_weights, group=self.group)
        if advance:
            self.advance()
        return w

    def advance(self) -> None:
        """Count one training step (for loops that use :meth:`weights` directly)."""
        self.step += 1

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "switch_step": self.switch_step, "tau_first": self.tau_first,
                "tau_second": self.tau_second, "microbatches": self.microbatches, "eps": self.eps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.switch_step = int(state["switch_step"])
        self.tau_first = float(state["tau_first"])
        self.tau_second = float(state["tau_second"])
        self.microbatches = state["microbatches"]
        self.eps = float(state["eps"])

    def __repr__(self) -> str:
        return (f"PresenceReweighter(step={self.step}, switch_step={self.switch_step}, tau_first={self.tau_first}, "
                f"tau_second={self.tau_second}, microbatches={self.microbatches})")
