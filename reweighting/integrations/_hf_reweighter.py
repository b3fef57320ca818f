"""What the Trainer adapter needs from a reweighter: the :class:`TrainingReweighter` protocol, telling
PRESENCE from a loss-based reweighter, whether its ``weights`` can leave samples out, and the
callback that keeps its step counter equal to the Trainer's optimizer steps."""

from __future__ import annotations

import inspect
from typing import Any, Protocol, runtime_checkable

import torch
from transformers import TrainerCallback


@runtime_checkable
class TrainingReweighter(Protocol):
    """What the adapter needs from a loss-based reweighter (e.g. :class:`reweighting.LossReweighter`).

    ``weights(per_sample_loss)`` returns this rank's detached weights, normalised over the global
    batch it is given (all ranks); ``step()`` is called once after each optimizer step. An optional
    ``stats`` attribute (:class:`reweighting.WeightStats`) is logged when no weight column is used.
    If ``weights`` takes a ``mask`` keyword (True = takes part), samples without a labelled token
    are excluded through it; a reweighter without one cannot exclude them and raises when they occur.
    """

    def weights(self, per_sample_loss: torch.Tensor) -> torch.Tensor: ...

    def step(self) -> None: ...


def _advance(reweighter: Any) -> None:
    """One optimizer step for either counter style (``advance()`` on PRESENCE, ``step()`` otherwise)."""
    if callable(getattr(reweighter, "advance", None)):
        reweighter.advance()
    elif callable(getattr(reweighter, "step", None)):
        reweighter.step()


def _set_step(reweighter: Any, step: int) -> None:
    """Set a reweighter's optimizer-step counter (``num_steps`` or ``step`` in its state dict)."""
    if not callable(getattr(reweighter, "state_dict", None)):
        return
    state = reweighter.state_dict()
    key = "num_steps" if "num_steps" in state else "step" if "step" in state else None
    if key is not None:
        reweighter.load_state_dict({**state, key: int(step)})


class _StepCounter(TrainerCallback):
    """Keeps the reweighter's step counter equal to the Trainer's optimizer steps, resumed runs included."""

    def __init__(self, reweighter: Any):
        self.reweighter = reweighter

    def on_train_begin(self, args, state, control, **kwargs):
        _set_step(self.reweighter, state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        _advance(self.reweighter)



def _is_presence(reweighter: Any) -> bool:
    from ..influence import PresenceReweighter

    return isinstance(reweighter, PresenceReweighter)


def _takes_mask(reweighter: Any) -> bool:
    try:
        return "mask" in inspect.signature(reweighter.weights).parameters
    except (TypeError, ValueError):
        return False

