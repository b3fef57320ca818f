"""The columns a training batch carries besides the model's inputs, and what is done with them.

Per-sample weights (``sample_weight``) are taken out of the features and collated on their own,
then combined with a reweighter's weights; the documents of packed or padding-free rows are read
from the batch; each training feature carries its dataset row (``ROW_KEY``) so that errors can
name the rows a batch was collated from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import distributed as D
from ..checks import check_nonnegative_weights, checks_enabled, describe_indices
from ..packing import Documents, detect_documents

WEIGHT_COLUMN = "sample_weight"
DOCUMENT_COLUMN = "document_ids"
ROW_KEY = "_reweighting_row"  # each training feature's dataset row, so errors can name it


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



def _dataset_columns(dataset: Any) -> list[str] | None:
    columns = getattr(dataset, "column_names", None)
    if isinstance(columns, dict):  # a DatasetDict
        return None
    return list(columns) if isinstance(columns, (list, tuple)) else None

