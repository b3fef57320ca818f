"""Per-document losses from packed and padding-free rows: one sample is one document.

Pre-training packs several documents into each row, and padding-free fine-tuning (Hugging Face's
``DataCollatorWithFlattening``, TRL's ``padding_free=True``) puts a whole batch into one row. The
sample the reweighting methods weight is then a **document**, not a row. Given token losses
``[B, T]`` and the document boundaries in one of the forms people have, :func:`document_losses`
returns the per-document mean token loss

    l_d = sum_{t in d} m_t l_t / sum_{t in d} m_t          (m_t = 1 where token t carries loss)

for the ``N`` documents of the batch, in row-major order, with its graph, and the map from tokens to
documents. ``l_d`` equals :func:`reweighting.sequence_loss` on document ``d`` alone (values and
gradients). The result is a plain per-sample loss vector: ``LossReweighter``, ``tilt`` and
``weighted_loss`` take it unchanged, also under ``torch.distributed`` with a different number of
documents on each rank (the weight core normalises over the global batch).

Boundary forms (exactly one; none means one document per row):

- ``document_ids [B, T]``: integers; a document is a run of equal ids within a row. Ids are per row
  (equal ids in two rows are two documents) and must not decrease along a row. With ``pad_id``,
  tokens with that id are padding (in no document).
- ``position_ids [B, T]``: positions restart at ``position_start`` (0) at each document and
  otherwise go up by one, as ``DataCollatorWithFlattening`` and TRL write them.
- ``cu_seq_lens [N + 1]``: cumulative document lengths over the row-major flattened ``B * T``
  tokens (FlashAttention's varlen form): starts at 0, strictly increasing, ends at ``B * T``; a
  document may not cross a row.

``padding_mask [B, T]`` (True = a real token, e.g. the ``attention_mask``) marks padding for the ids
and position forms; a padding token belongs to no document and a real token after padding starts a
new one.

Alignment: the boundaries describe the same positions as ``token_loss``. For a causal LM, compute
the token losses aligned with the inputs (position ``t`` holds the loss of predicting token
``t + 1``, the last position has none: Hugging Face's shift with ``-100`` padding), or pass the
boundaries of the targets (``ids[:, 1:]``). With ``DataCollatorWithFlattening`` the first label of
every document is ``-100``, so no loss crosses a document boundary and the two agree.

Every check here is decided in the one host read the function needs anyway (the number of
documents), so they stay on whatever :func:`reweighting.set_checks` says: a wrong boundary gives
wrong weights silently, which is the failure this module exists to prevent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["Documents", "DocumentLosses", "detect_documents", "document_index", "document_losses",
           "pack_documents"]


@dataclass(frozen=True)
class Documents:
    """The documents of a ``[B, T]`` token grid.

    ``index [B, T]`` (int64): the document of each token, numbered ``0 .. count - 1`` in row-major
    order, ``-1`` for padding. ``row``, ``start`` and ``length`` (``[count]``, int64): each
    document's row, first position in that row and number of tokens.
    """

    index: torch.Tensor
    count: int
    row: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor

    def describe(self, docs: torch.Tensor, limit: int = 10) -> str:
        """'document 3 (row 1, positions 4-9), ...' for a 1-d bool mask or index tensor over documents."""
        ids = torch.nonzero(docs.reshape(-1)).reshape(-1) if docs.dtype == torch.bool else docs.reshape(-1)
        ids = ids.tolist()
        rows, starts, lengths = self.row.tolist(), self.start.tolist(), self.length.tolist()
        parts = [f"document {d} (row {rows[d]}, positions {starts[d]}-{starts[d] + lengths[d] - 1})"
                 for d in ids[:limit]]
        if len(ids) > limit:
            parts.append(f"... ({len(ids)} in all)")
        return ", ".join(parts)


class DocumentLosses(NamedTuple):
    """``loss [N]``: per-document mean token loss (float32, with graph); ``documents``: the token map;
    ``has_loss [N]`` (bool): whether the document has a loss-carrying token (False only with
    ``empty="nan"``, where such documents' losses are NaN)."""

    loss: torch.Tensor
    documents: Documents
    has_loss: torch.Tensor


def _grid(x: torch.Tensor, name: str, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have the token grid's shape {shape}, got {tuple(x.shape)}")
    return x.to(device)


def _integer(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {x.dtype}")
    return x.long()


def _where(mask: torch.Tensor, limit: int = 5) -> str:
    """'(row 0, position 3), (row 2, position 0)' for a [B, T] bool mask."""
    idx = torch.nonzero(mask).tolist()
    shown = ", ".join(f"(row {r}, position {t})" for r, t in idx[:limit])
    return shown + (f", ... ({len(idx)} in all)" if len(idx) > limit else "")


def _previous(x: torch.Tensor, fill: int) -> torch.Tensor:
    """``x`` shifted right by one along the tokens, ``fill`` at each row's first position."""
    return torch.cat([torch.full_like(x[:, :1], fill), x[:, :-1]], dim=1)


def _from_ids(ids: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, str]]]:
    prev_real = _previous(real.long(), 0).bool()
    # The id of the nearest real token to the left (the running maximum is that id, because ids may
    # not decrease along a row: where they do, the error below fires).
    low = torch.iinfo(torch.long).min
    running = torch.cummax(torch.where(real, ids, torch.full_like(ids, low)), dim=1).values
    before = _previous(running, low)
    new = real & (ids != before)  # after padding, ids == before is the error below
    errors = [
        (real & (before != low) & (ids < before), "a document id decreases along the row (ids must not go back; "
                                                  "rows are packed left to right)"),
        (real & ~prev_real & (ids == before), "a document id resumes after padding (a document must be one "
                                              "run of tokens)"),
    ]
    return new, errors


def _from_positions(pos: torch.Tensor, real: torch.Tensor, start: int) -> tuple[torch.Tensor, list]:
    prev_real = _previous(real.long(), 0).bool()
    prev = _previous(pos, start - 2)
    new = real & (pos == start)
    continues = real & prev_real & (pos == prev + 1)
    bad = real & ~new & ~continues
    message = (f"position_ids neither restart at {start} (a new document) nor continue the previous "
               f"token's position + 1")
    return new, [(bad, message)]


def _padding_hint(errors: list[tuple[torch.Tensor, str]], padding_mask: torch.Tensor | None) -> list:
    if padding_mask is not None:
        return errors
    return [(mask, message + " (if those tokens are padding, pass padding_mask, e.g. the attention_mask)")
            for mask, message in errors]


def _from_cu_seq_lens(cu: torch.Tensor, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    b, t = shape
    cu = _integer(cu, "cu_seq_lens").to(device)
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"cu_seq_lens must be 1-d with at least 2 entries [0, len_0, len_0 + len_1, ...], "
                         f"got shape {tuple(cu.shape)}")
    starts, ends = cu[:-1], cu[1:] - 1
    crossing = (starts // t) != (ends // t)
    # One host read for every condition.
    first, last, nonpositive, crosses = torch.stack([cu[0], cu[-1], (ends < starts).sum(), crossing.sum()]).tolist()
    if first != 0:
        raise ValueError(f"cu_seq_lens must start at 0, got {first}")
    if nonpositive:
        bad = torch.nonzero(ends < starts).reshape(-1).tolist()[:10]
        pairs = [(i, int(cu[i]), int(cu[i + 1])) for i in bad]
        raise ValueError(f"cu_seq_lens must be strictly increasing (every document at least one token); entries "
                         f"(index, value, next value) {pairs} are not (an empty or negative-length document)")
    if last != b * t:
        raise ValueError(f"cu_seq_lens must end at the number of tokens B * T = {b} * {t} = {b * t}, got {last}")
    if crosses:
        i = int(torch.nonzero(crossing)[0])
        s, e = int(starts[i]), int(ends[i])
        raise ValueError(f"cu_seq_lens document {i} (tokens {s}-{e} of the flattened batch) crosses from row "
                         f"{s // t} to row {e // t}: documents may not cross rows")
    new = torch.zeros(b * t, dtype=torch.bool, device=device)
    new[starts] = True
    return new.view(b, t)


def document_index(
    grid: torch.Tensor | tuple[int, int],
    *,
    document_ids: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seq_lens: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    pad_id: int | None = None,
    position_start: int = 0,
) -> Documents:
    """The documents of a ``[B, T]`` token grid from one boundary form (see the module docstring).

    ``grid`` is a ``[B, T]`` tensor (its shape and device are used) or a ``(B, T)`` tuple. Raises
    ``ValueError`` naming the rows and positions where the boundaries are inconsistent.
    """
    if isinstance(grid, torch.Tensor):
        if grid.dim() != 2:
            raise ValueError(f"the token grid must be [batch, tokens], got shape {tuple(grid.shape)}")
        shape, device = (int(grid.shape[0]), int(grid.shape[1])), grid.device
    else:
        shape, device = (int(grid[0]), int(grid[1])), torch.device("cpu")
    b, t = shape
    if b == 0 or t == 0:
        raise ValueError(f"the token grid {shape} is empty: a batch needs at least one token")
    given = [name for name, v in (("document_ids", document_ids), ("position_ids", position_ids),
                                  ("cu_seq_lens", cu_seq_lens)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give exactly one boundary form, got {' and '.join(given)}")
    if pad_id is not None and document_ids is None:
        raise ValueError("pad_id applies to document_ids only")
    if padding_mask is not None and cu_seq_lens is not None:
        raise ValueError("cu_seq_lens covers every token (they must sum to B * T): padding_mask does not apply; "
                         "make padding its own entry or use document_ids / position_ids with padding_mask")
    real = torch.ones(shape, dtype=torch.bool, device=device)
    if padding_mask is not None:
        real = _grid(padding_mask, "padding_mask", shape, device).bool()
    errors: list[tuple[torch.Tensor, str]] = []
    if document_ids is not None:
        ids = _integer(_grid(document_ids, "document_ids", shape, device), "document_ids")
        if pad_id is not None:
            is_pad = ids == int(pad_id)
            if padding_mask is not None:
                errors.append((is_pad & real, f"document_ids is pad_id={pad_id} where padding_mask marks a real "
                                              f"token"))
            real = real & ~is_pad
        # A negative id is a padding marker (pack_documents writes -1), never a document of its own.
        errors.append((real & (ids < 0), "document_ids is negative at real tokens: if negative ids mark padding, "
                                         "pass pad_id (pad_id=-1 for pack_documents' ids) or a padding_mask"))
        new, more = _from_ids(ids, real)
        errors += more
    elif position_ids is not None:
        pos = _integer(_grid(position_ids, "position_ids", shape, device), "position_ids")
        new, errors = _from_positions(pos, real, int(position_start))
        errors = _padding_hint(errors, padding_mask)
    elif cu_seq_lens is not None:
        if not isinstance(cu_seq_lens, torch.Tensor):
            cu_seq_lens = torch.as_tensor(cu_seq_lens)
        new = _from_cu_seq_lens(cu_seq_lens, shape, device)
    else:
        # Without boundaries each row's real tokens are one document; padding between them would split it.
        seen = real.long().cumsum(1)
        new = real & (seen == 1)
        gap = real & ~_previous(real.long(), 0).bool() & (seen > 1)
        errors = [(gap, "padding_mask has padding between real tokens of a row, which without boundaries is "
                        "one document")]
    return _index(new, real, errors, shape)


def detect_documents(
    grid: torch.Tensor | None,
    *,
    document_ids: torch.Tensor | None = None,
    cu_seq_lens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> Documents | None:
    """The documents of a collated batch, or ``None`` when each row is one sample.

    ``grid``: the ``[B, T]`` token ids (or labels). In order: ``document_ids`` (packed rows; -1 and
    the ``attention_mask``'s zeros are padding), ``cu_seq_lens`` (``DataCollatorWithFlattening(
    return_flash_attn_kwargs=True)``; padding in the ``attention_mask`` is refused, as the lengths
    cover every token), or ``position_ids`` that break their ``+1`` run between two real tokens of a
    row (padding-free and packed rows: every break must restart at the batch's first position, else
    ``ValueError``). ``position_ids`` without a break (an ordinary batch, left- or right-padded with
    Hugging Face's position ids) give ``None``.
    """
    real = attention_mask.bool() if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
    if document_ids is not None:
        return document_index(grid, document_ids=document_ids, padding_mask=real, pad_id=-1)
    if cu_seq_lens is not None:
        if real is not None and not bool(real.all()):
            raise ValueError("the batch has cu_seq_lens and padding in its attention_mask: cu_seq_lens must cover "
                             "every token")
        return document_index(grid, cu_seq_lens=cu_seq_lens)
    pos = position_ids
    if not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.shape[1] < 2:
        return None
    if grid is not None and pos.shape != grid.shape:
        pos = pos.expand(grid.shape)  # position ids given once for every row
    live = torch.ones_like(pos, dtype=torch.bool) if real is None else real
    # A break between two real tokens: padding around them (left or right) is no break.
    breaks = live[:, 1:] & live[:, :-1] & (pos[:, 1:] != pos[:, :-1] + 1)
    if not bool(breaks.any()):
        return None
    start = int(torch.where(live, pos, torch.full_like(pos, torch.iinfo(pos.dtype).max)).min())
    return document_index(pos, position_ids=pos, padding_mask=real, position_start=start)


def _index(new: torch.Tensor, real: torch.Tensor, errors: list[tuple[torch.Tensor, str]],
           shape: tuple[int, int]) -> Documents:
    b, t = shape
    flat_new = new.reshape(-1)
    counts = torch.stack([flat_new.sum()] + [e.sum() for e, _ in errors]).tolist()  # the one host read
    n = int(counts[0])
    for (mask, message), c in zip(errors, counts[1:]):
        if c:
            raise ValueError(f"{message}: at {_where(mask)}")
    if n == 0:
        raise ValueError("the batch holds no document (every token is padding)")
    number = flat_new.long().cumsum(0) - 1
    index = torch.where(real.reshape(-1), number, torch.full_like(number, -1)).view(b, t)
    first = torch.nonzero_static(flat_new, size=n).reshape(-1)  # n is known: no second host read
    length = torch.zeros(n, dtype=torch.long, device=new.device).index_add_(
        0, index.reshape(-1).clamp(min=0), real.reshape(-1).long())
    return Documents(index=index, count=n, row=first // t, start=first % t, length=length)


def document_losses(
    token_loss: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    *,
    documents: Documents | None = None,
    document_ids: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seq_lens: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    pad_id: int | None = None,
    position_start: int = 0,
    empty: str = "raise",
) -> DocumentLosses:
    """Per-document mean token losses ``[N]`` (float32, with graph) and the token-to-document map.

    ``token_loss [B, T]``: e.g. ``cross_entropy(..., reduction="none")``; ``loss_mask [B, T]``: True
    where the token carries loss (``labels != -100``; ``None``: every token of a document). The
    boundaries come as ``documents`` (from :func:`document_index`) or one of the forms of
    :func:`document_index`. ``l_d = sum_{t in d} m_t l_t / sum_{t in d} m_t``: exactly
    :func:`reweighting.sequence_loss` of each document alone.

    A document with no loss-carrying token (an SFT example whose answer was truncated away) has no
    mean; a stand-in 0 would enter every other document's weight. As for
    :func:`reweighting.sequence_loss`: ``empty="raise"`` (default) raises ``ValueError`` naming the
    documents; ``empty="nan"`` makes their loss NaN (gradient exactly 0, other documents untouched)
    and reports them in ``has_loss``, to pass as the reweighter's ``mask`` so they get weight 0.
    Raises ``ValueError`` where a loss-carrying token is padding (the mask and the boundaries
    disagree).
    """
    if empty not in ("raise", "nan"):
        raise ValueError(f"empty must be 'raise' or 'nan', got {empty!r}")
    if not isinstance(token_loss, torch.Tensor):
        raise TypeError(f"token_loss must be a torch.Tensor, got {type(token_loss).__name__}")
    if token_loss.dim() != 2:
        raise ValueError(f"token_loss must be [batch, tokens], got shape {tuple(token_loss.shape)}")
    if not token_loss.is_floating_point():
        raise TypeError(f"token_loss must hold floating-point losses, got dtype {token_loss.dtype} (token ids or "
                        "labels passed as losses?)")
    if documents is None:
        documents = document_index(token_loss, document_ids=document_ids, position_ids=position_ids,
                                   cu_seq_lens=cu_seq_lens, padding_mask=padding_mask, pad_id=pad_id,
                                   position_start=position_start)
    elif any(v is not None for v in (document_ids, position_ids, cu_seq_lens, padding_mask, pad_id)):
        raise ValueError("give either documents or a boundary form, not both")
    elif tuple(documents.index.shape) != tuple(token_loss.shape):
        raise ValueError(f"documents cover a grid of shape {tuple(documents.index.shape)}, token_loss has "
                         f"{tuple(token_loss.shape)}")
    shape = tuple(token_loss.shape)
    index = documents.index.to(token_loss.device)
    in_doc = index >= 0
    if loss_mask is None:
        carries, soft = in_doc, torch.zeros_like(in_doc)
    else:
        mask = _grid(loss_mask, "loss_mask", shape, token_loss.device)
        if mask.is_complex():
            raise TypeError(f"loss_mask must be bool or 0/1 numbers, got dtype {mask.dtype}")
        carries = mask if mask.dtype == torch.bool else mask != 0
        soft = torch.zeros_like(in_doc) if mask.dtype == torch.bool else (mask != 0) & (mask != 1)
    loss = token_loss.float()
    flat = index.reshape(-1).clamp(min=0)
    counts = torch.zeros(documents.count, dtype=loss.dtype, device=loss.device).index_add_(
        0, flat, (carries & in_doc).reshape(-1).to(loss.dtype))
    outside, n_empty, n_soft = torch.stack([(carries & ~in_doc).sum(), (counts == 0).sum(), soft.sum()]).tolist()
    if n_soft:
        raise ValueError(f"loss_mask must hold only 0 and 1 (or booleans), got other values at {_where(soft)}: a "
                         "soft mask is not a token mask, and labels are not a mask (pass labels != -100)")
    if outside:
        raise ValueError(f"loss_mask marks tokens that are in no document (padding by the boundaries) as carrying "
                         f"loss: the mask and the boundaries disagree at {_where(carries & ~in_doc)}")
    if n_empty and empty == "raise":
        raise ValueError(f"{n_empty} document(s) have no loss-carrying token, so their mean loss is undefined: "
                         f"{documents.describe(counts == 0)}; leave them out of the batch or label a token")
    # where() rather than multiplication so that a NaN at a token without loss cannot leak in.
    kept = torch.where(carries & in_doc, loss, torch.zeros_like(loss)).reshape(-1)
    sums = torch.zeros(documents.count, dtype=loss.dtype, device=loss.device).index_add(0, flat, kept)
    has_loss = counts > 0
    mean = torch.where(has_loss, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))
    return DocumentLosses(loss=mean, documents=documents, has_loss=has_loss)


def pack_documents(
    documents: list[torch.Tensor] | list[bytes],
    width: int,
    *,
    min_tokens: int = 2,
    pad_value: int = 0,
    max_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack token sequences left to right into rows of ``width`` tokens, with per-row document ids.

    Returns ``rows [N, width]`` (int64) and ``document_ids [N, width]`` (0, 1, ... along each row,
    ``-1`` for padding), the ``document_ids`` form of :func:`document_index` with ``pad_id=-1``.
    A document that does not fit in the rest of a row continues in the next one as a new document
    (documents never cross rows); pieces shorter than ``min_tokens`` are not made: a row whose
    remaining space is shorter is padded, and a document's last piece shorter than that is dropped
    (with ``min_tokens=2`` every piece has at least one next-token prediction inside itself).
    ``bytes`` documents are read as byte tokens.
    """
    if width < 1 or min_tokens < 1 or min_tokens > width:
        raise ValueError(f"need 1 <= min_tokens <= width, got min_tokens={min_tokens}, width={width}")
    rows: list[torch.Tensor] = []
    ids: list[torch.Tensor] = []
    row_tokens: list[torch.Tensor] = []
    row_ids: list[torch.Tensor] = []
    filled = 0

    def close_row() -> None:
        nonlocal row_tokens, row_ids, filled
        if filled < width:
            row_tokens.append(torch.full((width - filled,), pad_value, dtype=torch.long))
            row_ids.append(torch.full((width - filled,), -1, dtype=torch.long))
        rows.append(torch.cat(row_tokens))
        ids.append(torch.cat(row_ids))
        row_tokens, row_ids, filled = [], [], 0

    for doc in documents:
        tokens = torch.frombuffer(bytearray(doc), dtype=torch.uint8).long() if isinstance(doc, bytes) \
            else torch.as_tensor(doc, dtype=torch.long).reshape(-1)
        at = 0
        while tokens.numel() - at >= min_tokens:
            if width - filled < min_tokens:
                close_row()
                if max_rows is not None and len(rows) >= max_rows:
                    return torch.stack(rows), torch.stack(ids)
            take = min(tokens.numel() - at, width - filled)
            row_tokens.append(tokens[at:at + take])
            row_ids.append(torch.full((take,), len(row_ids) and int(row_ids[-1][0]) + 1, dtype=torch.long))
            filled += take
            at += take
    if filled:
        close_row()
    if not rows:
        raise ValueError(f"no document has {min_tokens} or more tokens: nothing to pack")
    rows_t, ids_t = torch.stack(rows), torch.stack(ids)
    return (rows_t, ids_t) if max_rows is None else (rows_t[:max_rows], ids_t[:max_rows])
