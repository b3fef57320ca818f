"""Packed-layout detection (detect_documents) and the per-document and per-sequence losses' bad inputs:
each plausible wrong input raises naming the cause, each layout gives the documents it holds."""

import pytest
import torch

import reweighting as rw
from reweighting.lm_loss import per_sequence_lm_loss
from reweighting.packing import detect_documents, document_index, document_losses


def lengths(docs):
    return docs.length.tolist() if docs is not None else None


def test_position_ids_detection_cases():
    grid = torch.zeros(1, 5, dtype=torch.long)
    # A one-token document is a document of its own.
    assert lengths(detect_documents(grid, position_ids=torch.tensor([[0, 0, 1, 2, 3]]))) == [1, 4]
    assert lengths(detect_documents(grid, position_ids=torch.tensor([[0, 1, 0, 1, 0]]))) == [2, 2, 1]
    # Positions that jump up are neither a new document nor a continuation.
    with pytest.raises(ValueError, match="neither restart at 0"):
        detect_documents(grid, position_ids=torch.tensor([[0, 1, 2, 7, 8]]))
    # Positions given once for every row.
    two = torch.zeros(2, 4, dtype=torch.long)
    assert lengths(detect_documents(two, position_ids=torch.tensor([[0, 1, 0, 1]]))) == [2, 2, 2, 2]
    # An ordinary padded batch with Hugging Face's position ids (padding filled with 1) is not packed,
    # whether padded on the left or on the right.
    left_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    left_pos = (left_mask.cumsum(1) - 1).masked_fill(left_mask == 0, 1)
    assert detect_documents(torch.zeros(2, 5), position_ids=left_pos, attention_mask=left_mask) is None
    right_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    right_pos = (right_mask.cumsum(1) - 1).masked_fill(right_mask == 0, 1)
    assert detect_documents(torch.zeros(2, 5), position_ids=right_pos, attention_mask=right_mask) is None
    assert detect_documents(grid, position_ids=torch.arange(5)[None]) is None
    # Padding-free rows with padding at the end: the padding is in no document.
    docs = detect_documents(torch.zeros(1, 6), position_ids=torch.tensor([[0, 1, 0, 1, 2, 0]]),
                            attention_mask=torch.tensor([[1, 1, 1, 1, 1, 0]]))
    assert lengths(docs) == [2, 3] and docs.index.tolist() == [[0, 0, 1, 1, 1, -1]]


def test_cu_seq_lens_with_padding_in_the_attention_mask_is_refused():
    grid = torch.zeros(1, 6, dtype=torch.long)
    cu = torch.tensor([0, 2, 6])
    assert lengths(detect_documents(grid, cu_seq_lens=cu)) == [2, 4]
    assert lengths(detect_documents(grid, cu_seq_lens=cu, attention_mask=torch.ones(1, 6))) == [2, 4]
    with pytest.raises(ValueError, match="cu_seq_lens and padding in its attention_mask"):
        detect_documents(grid, cu_seq_lens=cu, attention_mask=torch.tensor([[1, 1, 1, 1, 1, 0]]))


def test_document_ids_negative_are_padding_only_when_said():
    ids = torch.tensor([[0, 0, 1, 1, -1, -1], [-1, -1, -1, -1, -1, -1]])
    with pytest.raises(ValueError, match="negative at real tokens.*pad_id"):
        document_index(ids, document_ids=ids)
    assert lengths(document_index(ids, document_ids=ids, pad_id=-1)) == [2, 2]
    assert lengths(detect_documents(ids, document_ids=ids)) == [2, 2]  # pack_documents' ids
    with pytest.raises(ValueError, match="negative at real tokens"):
        document_index(ids, document_ids=ids - 1, pad_id=-2)


def test_positions_across_padding_are_two_documents_or_an_error():
    # Positions [0, 1, 1, 2] with the third token padding: the fourth token continues the third's
    # position but not a real token's, so it starts no run it could continue.
    with pytest.raises(ValueError, match="neither restart"):
        document_index((1, 4), position_ids=torch.tensor([[0, 1, 1, 2]]),
                       padding_mask=torch.tensor([[1, 1, 0, 1]]))
    docs = document_index((1, 4), position_ids=torch.tensor([[0, 1, 5, 0]]), padding_mask=torch.tensor([[1, 1, 0, 1]]))
    assert lengths(docs) == [2, 1]


def test_document_losses_refuses_labels_soft_masks_and_integer_losses():
    loss = torch.tensor([[0.5, 0.4, 0.3, 0.2]])
    pos = torch.tensor([[0, 1, 0, 1]])
    labels = torch.tensor([[5, -100, 0, 7]])
    with pytest.raises(ValueError, match="labels are not a mask"):
        document_losses(loss, labels, position_ids=pos)
    with pytest.raises(ValueError, match="soft mask"):
        document_losses(loss, torch.tensor([[1, 0.5, 0, 1]]), position_ids=pos)
    with pytest.raises(TypeError, match="floating-point losses"):
        document_losses(torch.tensor([[1, 2, 3, 4]]), position_ids=pos)
    got = document_losses(loss, labels != -100, position_ids=pos).loss
    torch.testing.assert_close(got, torch.tensor([0.5, 0.25]))
    got = document_losses(loss, torch.tensor([[1, 0, 1, 1]]), position_ids=pos).loss  # 0/1 numbers are fine
    torch.testing.assert_close(got, torch.tensor([0.5, 0.25]))


def test_per_sequence_lm_loss_refuses_labels_and_soft_masks_as_mask():
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 4, 3), torch.randn(7, 3)
    targets = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 1]])
    labels = torch.tensor([[1, 2, -100, 4], [5, -100, 0, 1]])
    with pytest.raises(ValueError, match="labels are not a mask"):
        per_sequence_lm_loss(hidden, weight, targets, mask=labels)
    with pytest.raises(ValueError, match="soft mask"):
        per_sequence_lm_loss(hidden, weight, targets, mask=torch.tensor([[1, 0.5, 1, 1], [1, 1, 1, 1]]))
    good = per_sequence_lm_loss(hidden, weight, targets, mask=(labels != -100).long())
    torch.testing.assert_close(good, per_sequence_lm_loss(hidden, weight, labels))


def test_zscore_ignores_anything_at_masked_out_samples():
    x = torch.tensor([1.0, 2.0, float("inf"), 3.0, float("nan")])
    mask = torch.tensor([True, True, False, True, False])
    got = rw.zscore(x, mask=mask)
    want = rw.zscore(torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(got[mask], want)
    assert got[~mask].tolist() == [0.0, 0.0]


def test_the_restart_position_is_read_from_real_tokens_only():
    # Positions counted from 1 with padding holding 0: documents restart at 1, not at the padding's 0.
    docs = detect_documents(torch.zeros(1, 6), position_ids=torch.tensor([[1, 2, 1, 2, 3, 0]]),
                            attention_mask=torch.tensor([[1, 1, 1, 1, 1, 0]]))
    assert lengths(docs) == [2, 3]
