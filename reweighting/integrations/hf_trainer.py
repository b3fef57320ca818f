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
from collections.abc import Callable
from dataclasses import fields
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback

from .. import distributed as D
from ..checks import check_nonnegative_weights, checks_enabled, describe_indices
from ..lm_loss import per_token_lm_loss
from ..packing import Documents, detect_documents, document_index, document_losses
from ..reduce import restore_rng_state, score_window, sequence_loss, weighted_loss
from ..weights import WeightStats, weight_stats

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

WEIGHT_COLUMN = "sample_weight"
DOCUMENT_COLUMN = "document_ids"
ROW_KEY = "_reweighting_row"  # each training feature's dataset row, so errors can name it
ACCUMULATIONS = ("global", "micro")


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


def causal_lm_sequence_losses(
    logits: torch.Tensor, labels: torch.Tensor, *, shift: bool = True, ignore_index: int = -100,
    empty: str = "raise",
) -> torch.Tensor:
    """Per-sequence mean cross-entropy ``[B]`` from ``logits [B, T, V]`` and ``labels [B, T]`` (float32, with graph).

    As Hugging Face's causal LM loss: with ``shift`` position ``t`` predicts ``labels[:, t + 1]``;
    tokens labelled ``ignore_index`` do not count. Then ``l_i = sum_t m_it CE_it / sum_t m_it``
    (:func:`reweighting.sequence_loss`). Logits are upcast to float32 (as HF does under mixed
    precision). A sequence with no labelled token raises, naming it (``empty="raise"``), or is
    NaN (``empty="nan"``, see :func:`reweighting.sequence_loss`).
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"logits must be [B, T, V] and labels [B, T], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    labels = labels.to(logits.device)
    token_loss = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=ignore_index, reduction="none")
    return sequence_loss(token_loss, labels != ignore_index, empty=empty)


def _input_aligned_targets(labels: torch.Tensor, shift: bool, ignore_index: int) -> torch.Tensor:
    """``labels`` shifted left by one with ``ignore_index`` at the end (position ``t`` predicts ``t + 1``)."""
    if not shift:
        return labels
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], ignore_index)], dim=1)


def causal_lm_token_losses(
    logits: torch.Tensor, labels: torch.Tensor, *, shift: bool = True, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token losses ``[B, T]`` aligned with the inputs and the mask of tokens that carry loss.

    With ``shift`` position ``t`` holds the cross-entropy of predicting ``labels[:, t + 1]`` and the
    last position carries none (Hugging Face's shift), so document boundaries given for the inputs
    (``position_ids``, ``document_ids``, ``cu_seq_lens``) apply to the losses as they are. float32,
    with graph; positions without loss hold 0.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"logits must be [B, T, V] and labels [B, T], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    targets = _input_aligned_targets(labels.to(logits.device), shift, ignore_index)
    token_loss = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=ignore_index, reduction="none")
    return token_loss, targets != ignore_index


def batch_documents(batch: dict[str, Any], *, document_column: str = DOCUMENT_COLUMN) -> Documents | None:
    """The documents of a collated batch, or ``None`` when each row is one sample: the
    ``document_column`` entry, ``cu_seq_lens_q``, ``position_ids`` and ``attention_mask`` given to
    :func:`reweighting.packing.detect_documents` (which says what each form means)."""
    grid = batch.get("input_ids")
    if grid is None:
        grid = batch.get("labels")
    return detect_documents(grid, document_ids=batch.get(document_column), cu_seq_lens=batch.get("cu_seq_lens_q"),
                            position_ids=batch.get("position_ids"), attention_mask=batch.get("attention_mask"))


def combine_weights(
    reweighter_weights: torch.Tensor | None, column: torch.Tensor | None, n: int, device: torch.device, group=None,
    *, include: torch.Tensor | None = None,
) -> torch.Tensor:
    """``w_i = c_i r_i / sum_j c_j r_j`` over all ranks (``r``, ``c`` default to 1); float32, detached.

    ``column`` holds the ``sample_weight`` values of this rank's ``n`` samples: finite, >= 0, and
    not all zero over the global batch (else a ``ValueError`` names the samples). ``include``
    (bool ``[n]``, optional): samples that take part; the others get weight 0.
    """
    keep = None if include is None else include.to(device=device, dtype=torch.float32)
    if column is None:
        if reweighter_weights is not None:
            return reweighter_weights.detach().float()
        ones = torch.ones(n, dtype=torch.float32, device=device) if keep is None else keep
        total = D.global_count(n, device, group) if keep is None else D.all_reduce_sum(keep.sum(), group)
        if keep is not None and checks_enabled() and not bool(total > 0):
            raise ValueError("no sample of the global batch has a labelled token: nothing to train on")
        return ones / total
    c = column.detach().to(device=device, dtype=torch.float32).reshape(-1)
    if c.shape[0] != n:
        raise ValueError(f"{WEIGHT_COLUMN} has {c.shape[0]} values for a batch of {n} samples (one value per "
                         f"sample; with packed or padding-free batches, one per document)")
    check_nonnegative_weights(c, WEIGHT_COLUMN, allow_all_zero=True)
    product = c if reweighter_weights is None else c * reweighter_weights.detach().float().to(device)
    if keep is not None:
        product = product * keep
    total = D.all_reduce_sum(product.sum(), group)
    # bool() reads the total back to the host: only when checks are on, as for the core's checks.
    if checks_enabled() and not bool(total > 0):
        raise ValueError(f"{WEIGHT_COLUMN} (times the reweighter's weights) is zero for every sample of the "
                         f"global batch; positive on this rank at {describe_indices(c > 0)}")
    return product / total


class SampleWeightCollator:
    """Wraps a collator: takes ``sample_weight`` out of each feature, collates the rest, adds it as float32.

    A feature's value is a number, or a list of numbers (one per document of a packed row); the
    batch gets them all in order, ``[n]``. With ``required`` a feature without the column raises,
    naming the columns it has.
    """

    def __init__(self, collator: Callable[[list[Any]], dict[str, Any]], column: str = WEIGHT_COLUMN,
                 required: bool = False):
        self.collator = collator
        self.column = column
        self.required = required

    def __call__(self, features: list[Any]) -> dict[str, Any]:
        rows = None
        if features and isinstance(features[0], dict) and ROW_KEY in features[0]:
            rows = torch.as_tensor([int(f[ROW_KEY]) for f in features], dtype=torch.long)
            features = [{k: v for k, v in f.items() if k != ROW_KEY} for f in features]
        batch = self._collate(features)
        if rows is not None:
            batch[ROW_KEY] = rows
        return batch

    def _collate(self, features: list[Any]) -> dict[str, Any]:
        if not features or not isinstance(features[0], dict) or self.column not in features[0]:
            if self.required and features and isinstance(features[0], dict):
                raise ValueError(f"weight_column={self.column!r} is not in the training features; they have "
                                 f"{sorted(features[0])} (after the Trainer removed the columns the model does "
                                 f"not take)")
            return self.collator(features)
        missing = [i for i, f in enumerate(features) if self.column not in f]
        if missing:
            raise ValueError(f"features {missing[:10]} of the batch have no {self.column!r} but others do")
        values: list[float] = []
        for f in features:
            v = f[self.column]
            v = v.tolist() if hasattr(v, "tolist") else v
            values.extend(float(x) for x in v) if isinstance(v, (list, tuple)) else values.append(float(v))
        batch = self.collator([{k: v for k, v in f.items() if k != self.column} for f in features])
        batch[self.column] = torch.as_tensor(values, dtype=torch.float32)
        return batch


class _RowTagged(torch.utils.data.Dataset):
    """A map-style dataset whose items also carry their index (``ROW_KEY``); everything else is forwarded."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[i], ROW_KEY: int(i)}

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        fetch = getattr(self.dataset, "__getitems__", None)
        items = fetch(indices) if fetch is not None else [self.dataset[i] for i in indices]
        return [{**item, ROW_KEY: int(i)} for item, i in zip(items, indices)]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _with_rows(error: ValueError, rows: torch.Tensor | None) -> ValueError:
    """``error`` with the dataset rows the batch was collated from appended (the error names batch positions).

    One feature per sample, or per document with ``DataCollatorWithFlattening``: position ``i`` of
    the batch is then dataset row ``rows[i]``.
    """
    if rows is None:
        return error
    listed = rows.reshape(-1).tolist()
    shown = ", ".join(str(r) for r in listed[:32]) + (f", ... ({len(listed)} in all)" if len(listed) > 32 else "")
    return ValueError(f"{error} [the batch was collated from dataset rows [{shown}], in this order]")


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


class _LogWindow(TrainerCallback):
    """Starts the documents-per-step average at the step training (re)starts from."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._last_logged_step = int(state.global_step)


def _is_presence(reweighter: Any) -> bool:
    from ..influence import PresenceReweighter

    return isinstance(reweighter, PresenceReweighter)


def _takes_mask(reweighter: Any) -> bool:
    try:
        return "mask" in inspect.signature(reweighter.weights).parameters
    except (TypeError, ValueError):
        return False


def _dataset_columns(dataset: Any) -> list[str] | None:
    columns = getattr(dataset, "column_names", None)
    if isinstance(columns, dict):  # a DatasetDict
        return None
    return list(columns) if isinstance(columns, (list, tuple)) else None


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
