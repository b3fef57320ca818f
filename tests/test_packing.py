"""Per-document losses from packed rows: exact against each document alone, in every boundary form."""

import pytest
import torch

import reweighting as rw
from reweighting.packing import document_index, document_losses

# Rows of (document length, labelled?) with trailing padding; row 2 is one document, row 3 padding-led.
LAYOUT = [[3, 5, 2], [4, 1, 4], [9], [2, 6]]
T = 10


def packed_batch(seed=0, left_pad_last_row=True):
    """Token losses of a small model (a graph to differentiate) and the layout's boundaries."""
    g = torch.Generator().manual_seed(seed)
    b = len(LAYOUT)
    ids = torch.full((b, T), -1, dtype=torch.long)
    pos = torch.zeros((b, T), dtype=torch.long)
    real = torch.zeros((b, T), dtype=torch.bool)
    docs = []  # (row, start, length)
    for r, lengths in enumerate(LAYOUT):
        start = T - sum(lengths) if (left_pad_last_row and r == b - 1) else 0
        for d, n in enumerate(lengths):
            ids[r, start:start + n] = d
            pos[r, start:start + n] = torch.arange(n)
            real[r, start:start + n] = True
            docs.append((r, start, n))
            start += n
    # Some tokens of each document carry no loss (an SFT prompt), never all of them.
    loss_mask = real & (torch.rand(b, T, generator=g) > 0.3)
    for r, s, n in docs:
        loss_mask[r, s + n - 1] = True
    theta = torch.randn(b, T, generator=g, requires_grad=True)
    token_loss = theta.exp() * torch.linspace(0.5, 2.0, T)
    token_loss = torch.where(real, token_loss, torch.full_like(token_loss, float("nan")))  # padding is garbage
    return theta, token_loss, loss_mask, real, ids, pos, docs


def alone(theta, loss_mask, docs):
    """Each document on its own row through sequence_loss (no shared code with packing)."""
    out = []
    for r, s, n in docs:
        token_loss = theta[r, s:s + n].exp() * torch.linspace(0.5, 2.0, T)[s:s + n]
        out.append(rw.sequence_loss(token_loss[None], loss_mask[r, s:s + n][None])[0])
    return torch.stack(out)


def cu_seq_lens_of(docs, b):
    """cu_seq_lens for the same layout with the padding given its own document per gap (cu covers every token)."""
    bounds, expected = [0], []
    for r in range(b):
        mine = [(s, n) for rr, s, n in docs if rr == r]
        at = r * T
        for s, n in mine:
            if r * T + s > at:
                bounds.append(r * T + s)
                expected.append(None)
            bounds.append(r * T + s + n)
            expected.append((r, s, n))
            at = r * T + s + n
        if at < (r + 1) * T:
            bounds.append((r + 1) * T)
            expected.append(None)
    return torch.tensor(bounds, dtype=torch.int32), expected


@pytest.mark.parametrize("form", ["document_ids", "document_ids_pad_id", "position_ids"])
def test_equals_each_document_alone_values_and_gradients(form):
    theta, token_loss, loss_mask, real, ids, pos, docs = packed_batch()
    kwargs = {"document_ids": dict(document_ids=ids, padding_mask=real),
              "document_ids_pad_id": dict(document_ids=ids, pad_id=-1),
              "position_ids": dict(position_ids=pos, padding_mask=real)}[form]
    out = document_losses(token_loss, loss_mask, **kwargs)
    want = alone(theta, loss_mask, docs)
    assert out.loss.shape == (len(docs),) and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=1e-7)
    assert out.documents.count == len(docs)
    assert out.documents.row.tolist() == [r for r, _, _ in docs]
    assert out.documents.start.tolist() == [s for _, s, _ in docs]
    assert out.documents.length.tolist() == [n for _, _, n in docs]
    # The map back to tokens: every token of document d says d, padding says -1.
    want_index = torch.full_like(ids, -1)
    for d, (r, s, n) in enumerate(docs):
        want_index[r, s:s + n] = d
    assert torch.equal(out.documents.index, want_index)
    c = torch.randn(len(docs), generator=torch.Generator().manual_seed(3))
    (grad,) = torch.autograd.grad((c * out.loss).sum(), theta)
    (want_grad,) = torch.autograd.grad((c * want).sum(), theta)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-7)
    assert torch.isfinite(grad).all()


def test_cu_seq_lens_equals_each_document_alone():
    theta, token_loss, loss_mask, real, ids, pos, docs = packed_batch()
    cu, expected = cu_seq_lens_of(docs, len(LAYOUT))
    # The padding runs are documents here: give each a labelled token and a finite loss.
    token_loss = torch.where(real, token_loss, theta.exp())
    loss_mask = loss_mask | ~real
    out = document_losses(token_loss, loss_mask, cu_seq_lens=cu)
    assert out.documents.count == len(expected)
    keep = torch.tensor([e is not None for e in expected])
    torch.testing.assert_close(out.loss[keep], alone(theta, loss_mask, docs), rtol=1e-6, atol=1e-7)
    (grad,) = torch.autograd.grad(out.loss[keep].sum(), theta)
    (want,) = torch.autograd.grad(alone(theta, loss_mask, docs).sum(), theta)
    torch.testing.assert_close(grad, want, rtol=1e-6, atol=1e-7)


def test_no_boundaries_is_one_document_per_row_like_sequence_loss():
    g = torch.Generator().manual_seed(0)
    token_loss = torch.rand(3, 6, generator=g)
    mask = torch.rand(3, 6, generator=g) > 0.4
    mask[:, 0] = True
    torch.testing.assert_close(document_losses(token_loss, mask).loss, rw.sequence_loss(token_loss, mask))


def test_hf_flattening_form_single_row():
    """DataCollatorWithFlattening: one row, position_ids restarting at 0, int32 cu_seq_lens; both agree."""
    lengths = [4, 2, 5]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 4, 6, 11], dtype=torch.int32)
    a = document_index(pos, position_ids=pos)
    b = document_index(pos, cu_seq_lens=cu)
    assert torch.equal(a.index, b.index) and a.index.tolist() == [[0] * 4 + [1] * 2 + [2] * 5]
    # position_start as for RoBERTa-like models (collator's position_ids_start=2).
    c = document_index(pos, position_ids=pos + 2, position_start=2)
    assert torch.equal(a.index, c.index)


def test_documents_object_reused_and_describe():
    theta, token_loss, loss_mask, real, ids, pos, docs = packed_batch()
    d = document_index(token_loss, document_ids=ids, pad_id=-1)
    again = document_losses(token_loss, loss_mask, documents=d)
    torch.testing.assert_close(again.loss, alone(theta, loss_mask, docs))
    assert d.describe(torch.tensor([1])) == "document 1 (row 0, positions 3-7)"
    with pytest.raises(ValueError, match="not both"):
        document_losses(token_loss, loss_mask, documents=d, document_ids=ids)


def test_reweighters_work_on_documents_unchanged():
    """LossReweighter / tilt / weighted_loss on packed documents = on the same documents one per row."""
    theta, token_loss, loss_mask, real, ids, pos, docs = packed_batch()
    packed = document_losses(token_loss, loss_mask, position_ids=pos, padding_mask=real).loss
    padded = alone(theta, loss_mask, docs)
    grads = []
    for losses in (packed, padded):
        w = rw.LossReweighter("linupper", temperature=0.4).weights(losses.detach())
        w2 = rw.tilt(rw.minmax_normalize(losses.detach()), 0.7)
        (grad,) = torch.autograd.grad(rw.weighted_loss(losses, w) + rw.weighted_loss(losses, w2), theta)
        grads.append((w, w2, grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # Weights are per document: as many as documents, not rows.
    assert grads[0][0].shape == (len(docs),) and len(docs) != len(LAYOUT)


def test_empty_document_raises_or_is_nan_with_zero_gradient():
    theta, token_loss, loss_mask, real, ids, pos, docs = packed_batch()
    loss_mask[0, 3:8] = False  # document 1 (row 0, positions 3-7) loses every labelled token
    with pytest.raises(ValueError, match=r"1 document\(s\) have no loss-carrying token.*document 1 \(row 0, "
                                         r"positions 3-7\)"):
        document_losses(token_loss, loss_mask, document_ids=ids, pad_id=-1)
    with rw.checks(False):  # the check costs nothing extra, so it stays on
        with pytest.raises(ValueError, match="no loss-carrying token"):
            document_losses(token_loss, loss_mask, document_ids=ids, pad_id=-1)
    out = document_losses(token_loss, loss_mask, document_ids=ids, pad_id=-1, empty="nan")
    assert out.has_loss.tolist() == [d != 1 for d in range(len(docs))]
    assert torch.isnan(out.loss[1]) and torch.isfinite(out.loss[out.has_loss]).all()
    w = torch.where(out.has_loss, torch.full_like(out.loss, 0.1), torch.zeros_like(out.loss))
    (grad,) = torch.autograd.grad(torch.where(out.has_loss, w * out.loss, 0.0).sum(), theta)
    assert torch.isfinite(grad).all() and (grad[0, 3:8] == 0).all()
    with pytest.raises(ValueError, match="empty must be"):
        document_losses(token_loss, loss_mask, document_ids=ids, pad_id=-1, empty="zero")


# ---------------------------------------------------------------------------------------- bad input
def test_mask_disagrees_with_boundaries():
    theta, token_loss, loss_mask, real, ids, pos, docs = packed_batch()
    loss_mask[1, 9] = True  # row 1 is full (4 + 1 + 4 = 9 tokens): position 9 is padding
    with pytest.raises(ValueError, match=r"loss_mask.*disagree at \(row 1, position 9\)"):
        document_losses(token_loss, loss_mask, document_ids=ids, pad_id=-1)
    with pytest.raises(ValueError, match=r"pad_id=-1 where padding_mask marks a real token: at \(row 0, position 1\)"):
        bad = ids.clone()
        bad[0, 1] = -1
        document_index(ids, document_ids=bad, pad_id=-1, padding_mask=real)


def test_document_id_jumping_back():
    ids = torch.tensor([[0, 0, 1, 1, 0, 2]])
    with pytest.raises(ValueError, match=r"document id decreases.*\(row 0, position 4\)"):
        document_index(ids, document_ids=ids)
    # Per-row ids: restarting at 0 on the next row is fine, and equal ids in two rows are two documents.
    two = torch.tensor([[0, 0, 1], [0, 1, 1]])
    assert document_index(two, document_ids=two).count == 4


def test_document_resuming_after_padding():
    ids = torch.tensor([[0, 0, 9, 0, 1]])
    with pytest.raises(ValueError, match=r"resumes after padding.*\(row 0, position 3\)"):
        document_index(ids, document_ids=ids, pad_id=9)


def test_position_ids_not_restarting_at_zero():
    pos = torch.tensor([[0, 1, 2, 0, 1, 5, 6]])
    with pytest.raises(ValueError, match=r"restart at 0.*\(row 0, position 5\)"):
        document_index(pos, position_ids=pos)
    row_start = torch.tensor([[1, 2, 0]])
    with pytest.raises(ValueError, match=r"\(row 0, position 0\)"):
        document_index(row_start, position_ids=row_start)
    with pytest.raises(ValueError, match=r"restart at 2"):
        document_index(pos, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3]]), position_start=2)


@pytest.mark.parametrize("cu, message", [
    ([0, 3, 3, 8], r"strictly increasing.*\(1, 3, 3\)"),        # an empty document
    ([0, 5, 3, 8], r"strictly increasing.*\(1, 5, 3\)"),
    ([0, 3, 7], r"must end at the number of tokens B \* T = 2 \* 4 = 8, got 7"),
    ([0, 3, 9], r"must end at .* got 9"),
    ([1, 3, 8], r"must start at 0, got 1"),
    ([0, 3, 6, 8], r"document 1 \(tokens 3-5 of the flattened batch\) crosses from row 0 to row 1"),
    ([0.0, 4.0, 8.0], r"cu_seq_lens must hold integers"),
    ([[0, 4, 8]], r"cu_seq_lens must be 1-d"),
])
def test_bad_cu_seq_lens(cu, message):
    cu = torch.tensor(cu)
    with pytest.raises((ValueError, TypeError), match=message):
        document_index((2, 4), cu_seq_lens=cu)


def test_bad_arguments():
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one boundary form, got document_ids and position_ids"):
        document_index(ids, document_ids=ids, position_ids=ids)
    with pytest.raises(ValueError, match=r"document_ids must have the token grid's shape \(2, 3\), got \(3, 2\)"):
        document_index(ids, document_ids=ids.T)
    with pytest.raises(TypeError, match="position_ids must hold integers"):
        document_index(ids, position_ids=ids.float())
    with pytest.raises(ValueError, match="pad_id applies to document_ids only"):
        document_index(ids, position_ids=ids, pad_id=0)
    with pytest.raises(ValueError, match="padding_mask does not apply"):
        document_index(ids, cu_seq_lens=torch.tensor([0, 6]), padding_mask=ids.bool())
    with pytest.raises(ValueError, match="no document"):
        document_index(ids, document_ids=ids, pad_id=0)
    with pytest.raises(ValueError, match="token_loss must be"):
        document_losses(torch.zeros(6))
    with pytest.raises(ValueError, match=r"loss_mask must have the token grid's shape"):
        document_losses(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool), document_ids=ids)
    with pytest.raises(ValueError, match="padding between real tokens"):
        document_losses(torch.zeros(1, 3), padding_mask=torch.tensor([[True, False, True]]))


def test_pack_documents_rows_and_ids():
    from reweighting.packing import pack_documents

    docs = [bytes(range(1, 1 + n)) for n in (5, 3, 9, 1, 4, 7)]
    rows, ids = pack_documents(docs, 6)
    assert rows.shape == ids.shape and rows.shape[1] == 6
    d = document_index(rows, document_ids=ids, pad_id=-1)
    assert int(d.length.min()) >= 2
    # Reading the pieces back in order gives every document (a 1-token document or tail is left out).
    pieces = [rows[r, s:s + n].tolist() for r, s, n in zip(d.row.tolist(), d.start.tolist(), d.length.tolist())]
    assert pieces == [[1, 2, 3, 4, 5], [1, 2, 3], [1, 2, 3], [4, 5, 6, 7, 8, 9], [1, 2, 3, 4], [1, 2],
                      [3, 4, 5, 6, 7]]  # row 0 padded (1 slot left), document 3 (1 token) left out
    assert ids[0, 5] == -1 and rows[ids == -1].eq(0).all()
    assert pack_documents(docs, 6, max_rows=2)[0].shape == (2, 6)
    with pytest.raises(ValueError, match="min_tokens"):
        pack_documents(docs, 4, min_tokens=5)
    with pytest.raises(ValueError, match="nothing to pack"):
        pack_documents([b"x"], 4)


def test_readme_packing_block_runs(capsys):
    """The docs' per-document block runs as written and prints what its comment says."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "document_losses(token_loss" in b]
    assert len(blocks) == 1
    exec(compile(blocks[0], "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "[0, 0, 0, 1, 1] [3, 2, 3, 6, 2]"
