"""Hugging Face ``Trainer`` with per-sample weights: a loss-based reweighter, PRESENCE, a weight column, or both.

The loss the Trainer minimises becomes ``sum_i w_i l_i`` over the **global** batch, where ``l_i``
is the per-sequence (or per-document, below) loss: the mean next-token cross-entropy over the
tokens whose label is not ``-100``, after the causal shift. The weights ``w`` sum to 1 over every
device's samples and, with ``accumulation="global"``, over the whole gradient-accumulation window::

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
model does not take and is split off before the user's collator sees the features. Naming a
column explicitly (``weight_column="w"``) makes it required: a column the dataset does not have
raises, naming the columns it has.

**A sample is a document.** Padding-free batches (``DataCollatorWithFlattening``, TRL's
``padding_free=True``: ``position_ids`` that restart, or ``cu_seq_lens_q``) and packed rows with a
``document_ids`` column (``[T]`` per row, see :mod:`reweighting.packing`) are weighted per
document: ``l_d`` is the mean loss over document ``d``'s labelled tokens, exactly as if each
document were alone in a row. The loss of predicting token ``t + 1`` counts for the document of
token ``t`` (``DataCollatorWithFlattening`` labels each document's first token ``-100``, so no
loss crosses documents). A ``sample_weight`` column then needs one value per document (a list per
row for packed rows). The logs report ``weights/documents_per_step`` (all ranks).

**Sequences or documents with no labelled token** (SFT after truncation) have no mean loss: they
get weight 0, enter no statistic of the weights (no made-up loss of 0 in the min-max range), and
are counted in the logs as ``weights/n_masked``. A batch where no sample has a label raises.

**Gradient accumulation** (``K`` micro-batches per optimizer step):

- ``accumulation="global"``: exact. Before the window's first micro-batch is trained the adapter
  scores every micro-batch of the window under ``no_grad`` (one extra forward each, without stored
  activations; the RNG state is saved and replayed so dropout matches, and the scoring runs after
  the Trainer has restored a checkpoint's RNG state, so a resumed run equals an uninterrupted
  one), normalises over the whole window and all ranks, then each micro-batch's ``backward`` uses
  its slice. The accumulated gradient equals one step on the concatenated window.
- ``accumulation="micro"``: weights per micro-batch (over all ranks), each micro-batch's loss
  divided by ``K`` as for a mean: the paper's behaviour, no extra pass.

The default is the reweighter's own ``accumulation`` setting (``LossReweighter``'s default is
``"micro"``, the paper's), so one configured object means one behaviour in a hand-written loop
and in the Trainer; without a loss-dependent reweighter (only a weight column) it is ``"global"``,
which then costs nothing. Choose ``"global"`` when the result should not depend on how the batch
is split into micro-batches.

**PRESENCE** (``reweighter=PresenceReweighter(...)`` with ``self_influence=SelfInfluence(model,
...)``): each micro-batch is captured, its per-sample self-influence computed from one backward
and the weighted gradient written from the same stored tensors (see
:class:`reweighting.SelfInfluence`); the engine sums gradients over ranks itself, so the forward
runs on the unwrapped model. Its weights are per micro-batch (``accumulation="micro"``), and fp16
with a gradient scaler is refused (bf16 is fine). Padding-free batches are scored per document
(:meth:`reweighting.SelfInfluence.norms` with ``documents=``), which is exact when the attention
keeps documents apart (``position_ids`` restarting at each document, no ``attention_mask``, as
``DataCollatorWithFlattening`` gives); other packed rows raise.

The reweighter's step counter advances once per optimizer step and is set to the Trainer's
``global_step`` when training starts, so a run resumed from a checkpoint continues its schedule.
``Trainer`` evaluation is left unweighted. Errors about samples (a negative weight, a non-finite
loss, inconsistent document boundaries) name their batch positions and the dataset rows the batch
was collated from: training features carry their row under ``"_reweighting_row"`` (map-style
datasets, except with ``group_by_length``), which is taken out before the model or the user's
collator sees them. Diagnostics (:class:`reweighting.WeightStats`,
averaged over the steps since the last log) are added to the Trainer's logs as ``weights/<name>``.
"""

from __future__ import annotations

import inspect
from collections import deque
from dataclasses import fields
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from ..checks import describe_indices
from ..lm_loss import per_token_lm_loss
from ..packing import Documents, document_index, document_losses
from ..reduce import restore_rng_state, score_window, sequence_loss, weighted_loss
from ..weights import WeightStats, weight_stats
from ._hf_losses import _input_aligned_targets, causal_lm_sequence_losses, causal_lm_token_losses
from ._hf_reweighter import TrainingReweighter, _is_presence, _StepCounter, _takes_mask
from ._hf_reweighter import _advance as _advance
from ._hf_reweighter import _set_step as _set_step
from ._hf_training_columns import (
    DOCUMENT_COLUMN,
    ROW_KEY,
    WEIGHT_COLUMN,
    SampleWeightCollator,
    _dataset_columns,
    _RowTagged,
    _with_rows,
    batch_documents,
    combine_weights,
)

__all__ = [
    "WEIGHT_COLUMN",
    "DOCUMENT_COLUMN",
    "TrainingReweighter",
    "SampleWeightCollator",
    "causal_lm_sequence_losses",
    "causal_lm_token_losses",
    "batch_documents",
    "combine_weights",
    "ReweightingMixin",
    "ReweightingTrainer",
]

ACCUMULATIONS = ("global", "micro")


class _LogWindow(TrainerCallback):
    """Starts the documents-per-step average at the step training (re)starts from."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._last_logged_step = int(state.global_step)



class ReweightingMixin:
    """Per-sample reweighting for a ``transformers.Trainer`` subclass (put it first in the bases).

    Keyword arguments (the rest go to the Trainer):
        reweighter: ``None`` (only the weight column, or the plain per-sequence mean), a
            :class:`TrainingReweighter` such as :class:`reweighting.LossReweighter`, or a
            :class:`reweighting.PresenceReweighter` (then ``self_influence`` is required).
        self_influence: the :class:`reweighting.SelfInfluence` engine on ``model`` for PRESENCE.
        accumulation: ``"global"`` or ``"micro"`` (see the module docstring); default: the
            reweighter's own ``accumulation`` attribute if it has one, else ``"global"``.
        weight_column: the dataset column with per-sample weights; default ``"sample_weight"``,
            used when present. A name given explicitly must be a column of the dataset.
        document_column: the dataset column with per-token document ids of packed rows; default
            ``"document_ids"``, used when present. A name given explicitly must be a column.
        shift_labels: whether logits at ``t`` predict ``labels[t + 1]`` (causal LMs; the default).
        chunked_loss: compute the token losses from the final hidden states and the output
            embedding in chunks of ``chunk_tokens`` tokens (:func:`reweighting.lm_loss.per_token_lm_loss`),
            so the ``[B, T, V]`` logits never exist; the same losses and gradients as the plain
            path. Needs a Hugging Face causal LM whose ``forward`` takes ``logits_to_keep`` and
            whose logits are exactly ``get_output_embeddings()(last hidden state)`` (models that
            scale or soft-cap their logits are refused). Not with PRESENCE.
        chunk_tokens: tokens per chunk for ``chunked_loss`` (``None``: about ``2**25 / V``).

    Override :meth:`per_sample_loss` for models that are not token-level LMs.
    """

    def __init__(
        self,
        *args: Any,
        reweighter: Any = None,
        self_influence: Any = None,
        accumulation: str | None = None,
        weight_column: str | None = None,
        document_column: str | None = None,
        shift_labels: bool = True,
        chunked_loss: bool = False,
        chunk_tokens: int | None = None,
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
        for name, value in (("weight_column", weight_column), ("document_column", document_column)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a column name (str), got {type(value).__name__}")
        self.reweighter = reweighter
        self.self_influence = self_influence
        self.accumulation = accumulation
        self.weight_column = weight_column or WEIGHT_COLUMN
        self.document_column = document_column or DOCUMENT_COLUMN
        self.shift_labels = shift_labels
        self.chunked_loss = bool(chunked_loss)
        self.chunk_tokens = chunk_tokens
        if self.chunked_loss:
            self._check_chunked_loss()
        columns = _dataset_columns(self.train_dataset)
        for name, value in (("weight_column", weight_column), ("document_column", document_column)):
            if value is not None and columns is not None and value not in columns:
                raise ValueError(f"{name}={value!r} is not a column of train_dataset; its columns are {columns}")
        # Window weights are already normalised over the accumulation window; micro ones need / K.
        self.loss_is_scaled_for_ga = accumulation == "global"
        self.data_collator = SampleWeightCollator(self.data_collator, self.weight_column,
                                                  required=weight_column is not None)
        if reweighter is not None:
            self.add_callback(_StepCounter(reweighter))
        self.add_callback(_LogWindow(self))
        self._window: deque[tuple[torch.Tensor, Any]] = deque()
        self._pending: list[dict[str, Any]] | None = None
        self._stats_sum: torch.Tensor | None = None
        self._stats_count = 0
        self._samples_sum: torch.Tensor | None = None
        self._last_logged_step = 0

    def _check_chunked_loss(self) -> None:
        if self.presence:
            raise ValueError("chunked_loss=True does not go with PRESENCE: the self-influence engine needs the "
                             "output layer's own forward")
        if not self._default_losses():
            raise ValueError("chunked_loss=True computes the causal LM losses itself; it cannot use an overridden "
                             "per_sample_loss")
        model = self.model
        head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
        if not isinstance(head, torch.nn.Linear):
            raise ValueError(f"chunked_loss=True needs a model whose get_output_embeddings() is an nn.Linear; "
                             f"{type(model).__name__} gives {type(head).__name__}")
        if "logits_to_keep" not in inspect.signature(model.forward).parameters:
            raise ValueError(f"chunked_loss=True needs a forward that takes logits_to_keep (to skip the logits); "
                             f"{type(model).__name__}.forward does not")
        config = getattr(model, "config", None)
        scaled = {name: getattr(config, name, None) for name in
                  ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")}
        scaled = {k: v for k, v in scaled.items() if v is not None and v != 1}
        if scaled:
            raise ValueError(f"chunked_loss=True computes logits as the output embedding of the last hidden state, "
                             f"but {type(model).__name__} transforms its logits ({scaled}): use the plain path")

    # ------------------------------------------------------------------ columns
    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        for column in (self.weight_column, self.document_column):
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def _remove_unused_columns(self, dataset: Any, description: str | None = None) -> Any:
        """As the Trainer, and for training each feature also carries its dataset row (for error messages)."""
        dataset = super()._remove_unused_columns(dataset, description=description)
        if description == "Training" and getattr(self.args, "train_sampling_strategy", None) != "group_by_length":
            return _RowTagged(dataset)
        return dataset

    # ------------------------------------------------------------------ losses and weights
    def per_sample_loss(self, outputs: Any, labels: torch.Tensor) -> torch.Tensor:
        """``[B]`` per-sample losses with a graph; by default :func:`causal_lm_sequence_losses`.

        The default makes a row without a labelled token NaN; the adapter gives it weight 0.
        """
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        return causal_lm_sequence_losses(logits, labels, shift=self.shift_labels, empty="nan")

    def per_document_loss(self, outputs: Any, labels: torch.Tensor, documents: Documents) -> torch.Tensor:
        """``[N]`` per-document losses with a graph for packed or padding-free batches (NaN: no labelled token)."""
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        token_loss, carries = causal_lm_token_losses(logits, labels, shift=self.shift_labels)
        return document_losses(token_loss, carries, documents=documents, empty="nan").loss

    def _default_losses(self) -> bool:
        return type(self).per_sample_loss is ReweightingMixin.per_sample_loss

    def _samples(self, inputs: dict[str, Any]) -> tuple[Documents | None, torch.Tensor | None, int]:
        """This micro-batch's documents (None: a sample per row), which samples have a labelled token, and how many."""
        if "labels" not in inputs:
            raise ValueError("the batch has no 'labels': per-sample losses need them")
        labels = inputs["labels"]
        documents = batch_documents(inputs, document_column=self.document_column)
        if documents is None:
            include = None
            if self._default_losses() and labels.dim() == 2:
                carries = _input_aligned_targets(labels, self.shift_labels, -100) != -100
                include = carries.any(dim=1)
            return None, include, int(labels.shape[0])
        if self.presence:
            self._check_presence_documents(inputs, documents)
        carries = _input_aligned_targets(labels.to(documents.index.device), self.shift_labels, -100) != -100
        counts = torch.zeros(documents.count, dtype=torch.long, device=carries.device).index_add_(
            0, documents.index.reshape(-1).clamp(min=0), (carries & (documents.index >= 0)).reshape(-1).long())
        return documents, counts > 0, documents.count

    def _without_cache(self, inputs: dict[str, Any], documents: Documents | None) -> dict[str, Any]:
        """Packed inputs get ``use_cache=False``: Hugging Face models keep packed documents apart (from the
        restarting ``position_ids``) only without a cache, and a model whose config says ``use_cache=True``
        would otherwise let them attend to each other."""
        if documents is None or "use_cache" in inputs:
            return inputs
        try:
            takes = "use_cache" in inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):
            takes = False
        return {**inputs, "use_cache": False} if takes else inputs

    def _check_presence_documents(self, inputs: dict[str, Any], documents: Documents) -> None:
        """PRESENCE's per-document norms sum per-position terms: exact only if documents do not attend to each other."""
        pos = inputs.get("position_ids")
        apart = isinstance(pos, torch.Tensor) and inputs.get("attention_mask") is None
        if apart:
            by_position = document_index(pos.expand(documents.index.shape), position_ids=pos.expand(
                documents.index.shape), position_start=int(pos.min()))
            apart = by_position.count == documents.count and bool(torch.equal(by_position.index, documents.index))
        if not apart:
            raise ValueError(f"this batch packs {documents.count} documents into {documents.index.shape[0]} rows, "
                             f"and PRESENCE's per-document self-influence is exact only when the attention keeps "
                             f"them apart: give position_ids that restart at each document and no attention_mask "
                             f"(as DataCollatorWithFlattening does), or one document per row")

    def _forward_losses(
        self, model: torch.nn.Module, inputs: dict[str, Any], documents: Documents | None = None
    ) -> tuple[torch.Tensor, Any]:
        inputs = {k: v for k, v in inputs.items() if k not in (self.weight_column, self.document_column, ROW_KEY)}
        if "labels" not in inputs:
            raise ValueError("the batch has no 'labels': per-sample losses need them")
        labels = inputs.pop("labels")
        inputs = self._without_cache(inputs, documents)
        if self.chunked_loss:
            return self._chunked_losses(model, inputs, labels, documents)
        outputs = model(**inputs)
        if documents is None:
            return self.per_sample_loss(outputs, labels), outputs
        return self.per_document_loss(outputs, labels, documents), outputs

    def _chunked_losses(self, model, inputs, labels, documents) -> tuple[torch.Tensor, Any]:
        """Per-sample losses from the last hidden state and the output embedding, without the logits."""
        nothing = torch.zeros(0, dtype=torch.long, device=labels.device)
        outputs = model(**inputs, output_hidden_states=True, logits_to_keep=nothing)
        hidden = outputs["hidden_states"][-1] if isinstance(outputs, dict) else outputs.hidden_states[-1]
        head = self.model.get_output_embeddings()
        targets = _input_aligned_targets(labels.to(hidden.device), self.shift_labels, -100)
        token_loss = per_token_lm_loss(hidden, head.weight, targets, bias=head.bias, chunk_tokens=self.chunk_tokens)
        carries = targets != -100
        if documents is None:
            return sequence_loss(token_loss, carries, empty="nan"), outputs
        return document_losses(token_loss, carries, documents=documents, empty="nan").loss, outputs

    def _weights(self, losses: torch.Tensor, column: torch.Tensor | None, include: torch.Tensor | None) -> torch.Tensor:
        """Weights for ``losses`` (one micro-batch or a whole window), normalised over all ranks; records stats.

        Samples outside ``include`` (no labelled token) get weight 0 and enter no statistic.
        """
        r = None
        if self.reweighter is not None:
            if _takes_mask(self.reweighter):
                r = self.reweighter.weights(losses.detach(), mask=include)
            else:
                if include is not None and not bool(include.all()):
                    raise ValueError(f"samples {describe_indices(~include)} have no labelled token, and "
                                     f"{type(self.reweighter).__name__}.weights takes no mask= to leave them out")
                r = self.reweighter.weights(losses.detach())
        n = losses.shape[0]
        w = combine_weights(r, column, n, losses.device, include=include)
        own = getattr(self.reweighter, "stats", None) if column is None else None
        if not isinstance(own, WeightStats):
            masked = 0 if include is None else (~include).sum()
            own = weight_stats(w, mask=include, n_dropped=masked, n_masked=masked)
        self._record(own)
        return w

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Collect the window as the Trainer does; in ``"global"`` mode it is weighed before its first micro-batch."""
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._window.clear()
        # Scored lazily, at the first micro-batch's compute_loss: on a resumed run the Trainer restores
        # the checkpoint's RNG state after this call, and the scoring passes must start from it.
        global_window = self.accumulation == "global" and len(batch_samples) > 1 and not self.presence
        self._pending = list(batch_samples) if global_window else None
        return batch_samples, num_items

    def _weigh_window(self, batches: list[dict[str, Any]]) -> None:
        batches = [self._prepare_inputs(b) for b in batches]
        samples = [self._samples(b) for b in batches]
        states: list[Any] = [None] * len(batches)
        if self.reweighter is not None:
            model = self.model_wrapped
            model.train()
            docs = iter([s[0] for s in samples])
            with self.compute_loss_context_manager():
                losses, states = score_window(batches, lambda b: self._forward_losses(model, b, next(docs))[0])
            # The Trainer's training forward of micro-batch k starts from states[k], as in accumulate_weighted.
            window_losses = torch.cat(losses)
        else:
            window_losses = torch.cat([torch.zeros(n, device=self.args.device) for _, _, n in samples])
        columns = [b.get(self.weight_column) for b in batches]
        column = torch.cat([c.reshape(-1) for c in columns]) if all(c is not None for c in columns) else None
        if column is None and any(c is not None for c in columns):
            raise ValueError(f"some micro-batches of the window have a {self.weight_column!r} column and some not")
        includes = [s[1] for s in samples]
        include = None if all(i is None for i in includes) else torch.cat(
            [torch.ones(n, dtype=torch.bool, device=window_losses.device) if i is None else i.to(window_losses.device)
             for i, (_, _, n) in zip(includes, samples)])
        weights = self._weights(window_losses, column, include)
        for w, state in zip(weights.split([n for _, _, n in samples]), states):
            self._window.append((w, state))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``sum_i w_i l_i`` with the DDP factor (:func:`reweighting.weighted_loss`); unweighted in evaluation."""
        if not model.training:
            inputs = {k: v for k, v in inputs.items() if k not in (self.weight_column, self.document_column, ROW_KEY)}
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            try:
                self._weigh_window(pending)
            except ValueError as err:
                rows = [b.get(ROW_KEY) for b in pending]
                rows = torch.cat(rows) if all(r is not None for r in rows) else None
                raise _with_rows(err, rows) from err
        window = self._window.popleft() if self._window else None
        if window is not None and window[1] is not None:
            restore_rng_state(window[1])
        try:
            documents, include, _ = self._samples(inputs)
            losses, outputs = self._forward_losses(model, inputs, documents)
            w = window[0] if window is not None else self._weights(losses, inputs.get(self.weight_column), include)
            loss = weighted_loss(losses, w)
        except ValueError as err:
            raise _with_rows(err, inputs.get(ROW_KEY)) from err
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ PRESENCE
    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.presence:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)
        try:
            documents, _, _ = self._samples(inputs)
        except ValueError as err:
            raise _with_rows(err, inputs.get(ROW_KEY)) from err
        si, presence = self.self_influence, self.reweighter
        # The engine sums the weighted gradient over ranks itself: run the unwrapped model so that
        # DDP does not wait for a backward of its own. PRESENCE's norms need every sample's loss, so
        # a sample without a labelled token raises here rather than being left out.
        with self.compute_loss_context_manager(), si.capture():
            inputs_ = {k: v for k, v in inputs.items() if k not in (self.weight_column, self.document_column, ROW_KEY)}
            labels = inputs_.pop("labels")
            outputs = self.model(**self._without_cache(inputs_, documents))
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
            if documents is not None:
                token_loss, carries = causal_lm_token_losses(logits, labels, shift=self.shift_labels)
                losses = document_losses(token_loss, carries, documents=documents).loss
            elif not self._default_losses():
                losses = self.per_sample_loss(outputs, labels)
            else:
                losses = causal_lm_sequence_losses(logits, labels, shift=self.shift_labels)
        if documents is not None and presence.microbatches is not None:
            raise ValueError("PRESENCE with microbatches scores groups of rows; this batch packs several documents "
                             "per row: use microbatches=None (one unit per document)")
        norms = si.norms(losses, microbatches=presence.microbatches,
                         documents=None if documents is None else documents.index)
        unit = presence.weights(norms)
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
        # Every sample of the step, whether or not it took part (n counts those that did).
        samples = (stats.n + stats.n_dropped).detach().float().reshape(())
        self._samples_sum = samples if self._samples_sum is None else self._samples_sum + samples.to(
            self._samples_sum.device)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds the mean weight diagnostics since the last training log as ``weights/<name>``.

        ``weights/documents_per_step``: samples (documents, or rows when each row is one) per
        optimizer step over all ranks, averaged over the steps since the last log.
        """
        if self._stats_sum is not None and "loss" in logs:
            mean = (self._stats_sum / self._stats_count).tolist()
            logs = {**logs, **{f"weights/{f.name}": v for f, v in zip(fields(WeightStats), mean)}}
            steps = max(int(self.state.global_step) - self._last_logged_step, 1)
            logs["weights/documents_per_step"] = float(self._samples_sum) / steps
            self._stats_sum, self._stats_count, self._samples_sum = None, 0, None
            self._last_logged_step = int(self.state.global_step)
        super().log(logs, *args, **kwargs)


class ReweightingTrainer(ReweightingMixin, Trainer):
    """``transformers.Trainer`` with :class:`ReweightingMixin`'s per-sample weights."""
