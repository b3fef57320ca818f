"""Hugging Face ``Trainer`` with per-sample weights: a loss-based reweighter, PRESENCE, a weight column, or both.

The loss the Trainer minimises becomes ``sum_i w_i l_i`` over the **global** batch, where ``l_i``
is the per-sequence loss (mean next-token cross-entropy over the tokens whose label is not
``-100``, after the causal shift) and the weights ``w`` sum to 1 over every device's samples and,
by default, over the whole gradient-accumulation window::

    from reweighting import LossReweighter
    from reweighting.integrations.hf_trainer import ReweightingTrainer

    trainer = ReweightingTrainer(
        model=model, args=args, train_dataset=ds,              # ds may carry a "sample_weight" column
        reweighter=LossReweighter("linupper", temperature=0.4),
    )
    trainer.train()                                            # logs weights/ess_fraction, ...

Weights of one step are ``w_i = c_i r_i / sum_j c_j r_j``: ``r`` from the reweighter
(``rw.weights(per_sample_loss)``; uniform without one) and ``c`` from the dataset's
``sample_weight`` column (1 without one). The column survives the Trainer's removal of columns the
model does not take and is split off before the user's collator sees the features.

**Gradient accumulation** (``K`` micro-batches per optimizer step):

- ``accumulation="global"`` (default): exact. Before the window's first micro-batch the adapter
  scores every micro-batch of the window under ``no_grad`` (one extra forward each, without stored
  activations; the RNG state is saved and replayed so dropout matches), normalises over the whole
  window and all ranks, then each micro-batch's ``backward`` uses its slice. The accumulated
  gradient equals one step on the concatenated window. Without a loss-dependent reweighter (only a
  weight column) no extra forward is needed.
- ``accumulation="micro"``: weights per micro-batch (over all ranks), each micro-batch's loss
  divided by ``K`` as for a mean: the paper's behaviour, no extra pass.

**PRESENCE** (``reweighter=PresenceReweighter(...)`` with ``self_influence=SelfInfluence(model,
...)``): each micro-batch is captured, its per-sample self-influence computed from one backward
and the weighted gradient written from the same stored tensors (see
:class:`reweighting.SelfInfluence`); the engine sums gradients over ranks itself, so the forward
runs on the unwrapped model. Its weights are per micro-batch (``accumulation="micro"``), and fp16
with a gradient scaler is refused (bf16 is fine).

The reweighter's step counter advances once per optimizer step and is set to the Trainer's
``global_step`` when training starts, so a run resumed from a checkpoint continues its schedule.
``Trainer`` evaluation is left unweighted. Diagnostics (:class:`reweighting.WeightStats`,
averaged over the steps since the last log) are added to the Trainer's logs as ``weights/<name>``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import fields
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback

from .. import distributed as D
from ..checks import check_nonnegative_weights, checks_enabled, describe_indices
from ..reduce import restore_rng_state, score_window, sequence_loss, weighted_loss
from ..weights import WeightStats, weight_stats

__all__ = [
    "WEIGHT_COLUMN",
    "TrainingReweighter",
    "SampleWeightCollator",
    "causal_lm_sequence_losses",
    "combine_weights",
    "ReweightingMixin",
    "ReweightingTrainer",
]

WEIGHT_COLUMN = "sample_weight"
ACCUMULATIONS = ("global", "micro")


@runtime_checkable
class TrainingReweighter(Protocol):
    """What the adapter needs from a loss-based reweighter (e.g. :class:`reweighting.LossReweighter`).

    ``weights(per_sample_loss)`` returns this rank's detached weights, normalised over the global
    batch it is given (all ranks); ``step()`` is called once after each optimizer step. An optional
    ``stats`` attribute (:class:`reweighting.WeightStats`) is logged when no weight column is used.
    """

    def weights(self, per_sample_loss: torch.Tensor) -> torch.Tensor: ...

    def step(self) -> None: ...


def causal_lm_sequence_losses(
    logits: torch.Tensor, labels: torch.Tensor, *, shift: bool = True, ignore_index: int = -100
) -> torch.Tensor:
    """Per-sequence mean cross-entropy ``[B]`` from ``logits [B, T, V]`` and ``labels [B, T]`` (float32, with graph).

    As Hugging Face's causal LM loss: with ``shift`` position ``t`` predicts ``labels[:, t + 1]``;
    tokens labelled ``ignore_index`` do not count. Then ``l_i = sum_t m_it CE_it / sum_t m_it``
    (:func:`reweighting.sequence_loss`). Logits are upcast to float32 (as HF does under mixed
    precision). A sequence with no labelled token raises, naming it.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"logits must be [B, T, V] and labels [B, T], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    labels = labels.to(logits.device)
    token_loss = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=ignore_index, reduction="none")
    return sequence_loss(token_loss, labels != ignore_index)


def combine_weights(
    reweighter_weights: torch.Tensor | None, column: torch.Tensor | None, n: int, device: torch.device, group=None
) -> torch.Tensor:
    """``w_i = c_i r_i / sum_j c_j r_j`` over all ranks (``r``, ``c`` default to 1); float32, detached.

    ``column`` holds the ``sample_weight`` values of this rank's ``n`` samples: finite, >= 0, and
    not all zero over the global batch (else a ``ValueError`` names the samples).
    """
    if column is None:
        if reweighter_weights is not None:
            return reweighter_weights.detach().float()
        ones = torch.ones(n, dtype=torch.float32, device=device)
        return ones / D.global_count(n, device, group)
    c = column.detach().to(device=device, dtype=torch.float32).reshape(-1)
    if c.shape[0] != n:
        raise ValueError(f"{WEIGHT_COLUMN} has {c.shape[0]} values for a batch of {n} samples")
    check_nonnegative_weights(c, WEIGHT_COLUMN, allow_all_zero=True)
    product = c if reweighter_weights is None else c * reweighter_weights.detach().float().to(device)
    total = D.all_reduce_sum(product.sum(), group)
    # bool() reads the total back to the host: only when checks are on, as for the core's checks.
    if checks_enabled() and not bool(total > 0):
        raise ValueError(f"{WEIGHT_COLUMN} (times the reweighter's weights) is zero for every sample of the "
                         f"global batch; positive on this rank at {describe_indices(c > 0)}")
    return product / total


class SampleWeightCollator:
    """Wraps a collator: takes ``sample_weight`` out of each feature, collates the rest, adds it as float32 ``[B]``."""

    def __init__(self, collator: Callable[[list[Any]], dict[str, Any]], column: str = WEIGHT_COLUMN):
        self.collator = collator
        self.column = column

    def __call__(self, features: list[Any]) -> dict[str, Any]:
        if not features or not isinstance(features[0], dict) or self.column not in features[0]:
            return self.collator(features)
        missing = [i for i, f in enumerate(features) if self.column not in f]
        if missing:
            raise ValueError(f"features {missing[:10]} of the batch have no {self.column!r} but others do")
        values = [f[self.column] for f in features]
        batch = self.collator([{k: v for k, v in f.items() if k != self.column} for f in features])
        batch[self.column] = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
        return batch


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


class ReweightingMixin:
    """Per-sample reweighting for a ``transformers.Trainer`` subclass (put it first in the bases).

    Keyword arguments (the rest go to the Trainer):
        reweighter: ``None`` (only the weight column, or the plain per-sequence mean), a
            :class:`TrainingReweighter` such as :class:`reweighting.LossReweighter`, or a
            :class:`reweighting.PresenceReweighter` (then ``self_influence`` is required).
        self_influence: the :class:`reweighting.SelfInfluence` engine on ``model`` for PRESENCE.
        accumulation: ``"global"`` or ``"micro"`` (see the module docstring); default: the
            reweighter's own ``accumulation`` attribute if it has one, else ``"global"``.
        weight_column: the dataset column with per-sample weights (``"sample_weight"``).
        shift_labels: whether logits at ``t`` predict ``labels[t + 1]`` (causal LMs; the default).

    Override :meth:`per_sample_loss` for models that are not token-level LMs.
    """

    def __init__(
        self,
        *args: Any,
        reweighter: Any = None,
        self_influence: Any = None,
        accumulation: str | None = None,
        weight_column: str = WEIGHT_COLUMN,
        shift_labels: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.presence = reweighter is not None and _is_presence(reweighter)
        if reweighter is not None and not self.presence and not isinstance(reweighter, TrainingReweighter):
            raise TypeError(f"reweighter must have weights(per_sample_loss) and step() methods (or be a "
                            f"PresenceReweighter), got {type(reweighter).__name__}")
        if self.presence and self_influence is None:
            raise ValueError("a PresenceReweighter needs self_influence=SelfInfluence(model, ...)")
        if self_influence is not None and not self.presence:
            raise ValueError("self_influence is used only with a PresenceReweighter")
        if accumulation is None:
            accumulation = "micro" if self.presence else getattr(reweighter, "accumulation", "global")
        if accumulation not in ACCUMULATIONS:
            raise ValueError(f"accumulation must be one of {ACCUMULATIONS}, got {accumulation!r}")
        if self.presence:
            if accumulation == "global" and self.args.gradient_accumulation_steps > 1:
                raise ValueError("PRESENCE weights each micro-batch on its own: use accumulation='micro'")
            if self.args.fp16:
                raise ValueError("PRESENCE writes gradients directly, which fp16's gradient scaler cannot see: "
                                 "use bf16 or float32")
        self.reweighter = reweighter
        self.self_influence = self_influence
        self.accumulation = accumulation
        self.weight_column = weight_column
        self.shift_labels = shift_labels
        # Window weights are already normalised over the accumulation window; micro ones need / K.
        self.loss_is_scaled_for_ga = accumulation == "global"
        self.data_collator = SampleWeightCollator(self.data_collator, weight_column)
        if reweighter is not None:
            self.add_callback(_StepCounter(reweighter))
        self._window: deque[tuple[torch.Tensor, Any]] = deque()
        self._stats_sum: torch.Tensor | None = None
        self._stats_count = 0

    # ------------------------------------------------------------------ columns
    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.weight_column not in self._signature_columns:
            self._signature_columns.append(self.weight_column)

    # ------------------------------------------------------------------ losses and weights
    def per_sample_loss(self, outputs: Any, labels: torch.Tensor) -> torch.Tensor:
        """``[B]`` per-sample losses with a graph; by default :func:`causal_lm_sequence_losses`."""
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        return causal_lm_sequence_losses(logits, labels, shift=self.shift_labels)

    def _forward_losses(self, model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        inputs = dict(inputs)
        inputs.pop(self.weight_column, None)
        if "labels" not in inputs:
            raise ValueError("the batch has no 'labels': per-sample losses need them")
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        return self.per_sample_loss(outputs, labels), outputs

    def _weights(self, losses: torch.Tensor, column: torch.Tensor | None) -> torch.Tensor:
        """Weights for ``losses`` (one micro-batch or a whole window), normalised over all ranks; records stats."""
        r = None if self.reweighter is None else self.reweighter.weights(losses.detach())
        w = combine_weights(r, column, losses.shape[0], losses.device)
        own = getattr(self.reweighter, "stats", None) if column is None else None
        self._record(own if isinstance(own, WeightStats) else weight_stats(w))
        return w

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Collect the window as the Trainer does; in ``"global"`` mode also weigh it as a whole."""
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._window.clear()
        if self.accumulation == "global" and len(batch_samples) > 1 and not self.presence:
            batch_samples = self._weigh_window(batch_samples)
        return batch_samples, num_items

    def _weigh_window(self, batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
        batches = [self._prepare_inputs(b) for b in batches]
        states = [None] * len(batches)
        if self.reweighter is not None:
            model = self.model_wrapped
            model.train()
            with self.compute_loss_context_manager():
                losses, states = score_window(batches, lambda b: self._forward_losses(model, b)[0])
            # The Trainer's training forward of micro-batch k starts from states[k], as in accumulate_weighted.
            window_losses = torch.cat(losses)
        else:
            window_losses = torch.cat([self._labels_placeholder(b) for b in batches])
        columns = [b.get(self.weight_column) for b in batches]
        column = torch.cat([c.reshape(-1) for c in columns]) if all(c is not None for c in columns) else None
        if column is None and any(c is not None for c in columns):
            raise ValueError(f"some micro-batches of the window have a {self.weight_column!r} column and some not")
        weights = self._weights(window_losses, column)
        for w, state in zip(weights.split([b["labels"].shape[0] for b in batches]), states):
            self._window.append((w, state))
        return batches

    @staticmethod
    def _labels_placeholder(batch: dict[str, Any]) -> torch.Tensor:
        """Zeros with one entry per sample (weights that do not depend on the loss need only the count)."""
        return torch.zeros(batch["labels"].shape[0], device=batch["labels"].device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``sum_i w_i l_i`` with the DDP factor (:func:`reweighting.weighted_loss`); unweighted in evaluation."""
        if not model.training:
            inputs = {k: v for k, v in inputs.items() if k != self.weight_column}
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        window = self._window.popleft() if self._window else None
        if window is not None and window[1] is not None:
            restore_rng_state(window[1])
        losses, outputs = self._forward_losses(model, inputs)
        w = window[0] if window is not None else self._weights(losses, inputs.get(self.weight_column))
        loss = weighted_loss(losses, w)
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ PRESENCE
    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.presence:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)
        si, presence = self.self_influence, self.reweighter
        # The engine sums the weighted gradient over ranks itself: run the unwrapped model so that
        # DDP does not wait for a backward of its own.
        with self.compute_loss_context_manager(), si.capture():
            losses, _ = self._forward_losses(self.model, inputs)
        unit = presence.weights(si.norms(losses, microbatches=presence.microbatches))
        w = combine_weights(presence.per_sample(unit, losses.shape[0]), inputs.get(self.weight_column),
                            losses.shape[0], losses.device)
        self._record(weight_stats(w))
        steps = max(int(getattr(self, "current_gradient_accumulation_steps", 1)), 1)
        si.weighted_backward(w / steps)
        return weighted_loss(losses.detach(), w) / steps

    # ------------------------------------------------------------------ logging
    def _record(self, stats: WeightStats) -> None:
        values = torch.stack([getattr(stats, f.name).detach().float().reshape(()) for f in fields(WeightStats)])
        self._stats_sum = values if self._stats_sum is None else self._stats_sum + values.to(self._stats_sum.device)
        self._stats_count += 1

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds the mean weight diagnostics since the last training log as ``weights/<name>``."""
        if self._stats_sum is not None and "loss" in logs:
            mean = (self._stats_sum / self._stats_count).tolist()
            logs = {**logs, **{f"weights/{f.name}": v for f, v in zip(fields(WeightStats), mean)}}
            self._stats_sum, self._stats_count = None, 0
        super().log(logs, *args, **kwargs)


class ReweightingTrainer(ReweightingMixin, Trainer):
    """``transformers.Trainer`` with :class:`ReweightingMixin`'s per-sample weights."""
