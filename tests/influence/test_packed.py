"""Packed rows: per-document norms and update (``documents=`` ids), against per-document autograd gradients."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from reweighting.influence import SelfInfluence

from . import models as M


def packed_batch():
    """3 rows of 7 positions holding 6 documents (one row has padding at its end)."""
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(1, 11, (3, 8), generator=g)
    documents = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1],
                              [2, 2, 2, 2, 2, 2, 3, 3],
                              [4, 4, 5, 5, 5, 5, -1, -1]])
    return tokens, documents


def doc_losses(model, tokens, documents):
    """Mean next-token loss of each document over its own positions (targets inside the same document)."""
    logits = model(tokens[:, :-1])
    tok = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    inside = (documents[:, 1:] == documents[:, :-1]) & (documents[:, :-1] >= 0)
    n = int(documents.max()) + 1
    ids = torch.where(inside, documents[:, :-1], n).reshape(-1)
    sums = tok.new_zeros(n + 1).index_add(0, ids, tok.reshape(-1))[:n]
    counts = tok.new_zeros(n + 1).index_add(0, ids, inside.reshape(-1).float())[:n]
    return sums / counts


def per_document_grads(model, tokens, documents):
    losses = doc_losses(model, tokens, documents)
    params = dict(model.named_parameters())
    rows = [torch.autograd.grad(losses[d], list(params.values()), retain_graph=True, allow_unused=True)
            for d in range(losses.shape[0])]
    return {n: torch.stack([r[k] if r[k] is not None else torch.zeros_like(p) for r in rows])
            for k, (n, p) in enumerate(params.items())}


@pytest.mark.parametrize("vocab_d, kept", [((11, 6), 2**30), ((11, 6), 0), ((40, 16), 0)])
def test_per_document_norms_and_update_on_packed_rows(vocab_d, kept):
    model = M.SeqModel(*vocab_d)  # position-wise layers, a tied embedding, positions broadcast over rows
    tokens, documents = packed_batch()
    inputs_docs = documents[:, :-1]
    si = SelfInfluence(model, broadcast=["pos"], max_kept_bytes=kept)
    with si.capture():
        losses = doc_losses(model, tokens, documents)
    got = si.norms(losses, documents=inputs_docs)
    grads = per_document_grads(model, tokens, documents)
    want = sum(g.flatten(1).square().sum(1) for g in grads.values())
    assert got.shape == (6,)
    assert ((got - want).abs().max() / want.abs().max()) < 1e-4
    w = torch.softmax(torch.linspace(-1, 1, 6), 0)
    si.weighted_backward(w)
    for name, p in model.named_parameters():
        ref = torch.einsum("b,b...->...", w, grads[name])
        assert ((p.grad - ref).abs().max() / ref.abs().max()) < 1e-4, name


def test_packed_rows_are_never_scored_as_one_sample_silently():
    model = M.SeqModel()
    tokens, documents = packed_batch()
    si = SelfInfluence(model, broadcast=["pos"])
    with si.capture():
        losses = doc_losses(model, tokens, documents)
    with pytest.raises(ValueError, match="pass documents="):  # 6 document losses, 3 rows, no ids
        si.norms(losses)
    for bad, match in [(torch.tensor([[0, 0, 1, 1, 0, 0, 2]] * 3), "one contiguous run"),  # 0 comes back
                       (documents[:, :-1].clamp(max=4), "documents \\[5\\] are empty"),
                       (documents[:, :-1] + 1, "must be in \\[-1, 6\\)")]:
        with si.capture():
            losses = doc_losses(model, tokens, documents)
        with pytest.raises(ValueError, match=match):
            si.norms(losses, documents=bad)


def test_layers_that_mix_positions_are_refused_with_documents():
    conv = nn.Conv1d(2, 2, 3, padding=1)
    si = SelfInfluence(conv)
    x = torch.randn(2, 2, 5)
    with si.capture():
        out = conv(x)
    losses = torch.stack([out[0].sum(), out[1, :, :2].sum(), out[1, :, 2:].sum()])
    with pytest.raises(ValueError, match="mixes positions"):
        si.norms(losses, documents=torch.tensor([[0, 0, 0, 0, 0], [1, 1, 2, 2, 2]]))


def test_presence_weights_documents():
    from reweighting.influence import PresenceReweighter, presence_weights

    model = M.SeqModel()
    tokens, documents = packed_batch()
    si = SelfInfluence(model, broadcast=["pos"])
    with si.capture():
        losses = doc_losses(model, tokens, documents)
    w = PresenceReweighter(switch_step=0).backward(si, losses, documents=documents[:, :-1])
    grads = per_document_grads(model, tokens, documents)
    want = presence_weights(sum(g.flatten(1).square().sum(1) for g in grads.values()), -1.0)
    torch.testing.assert_close(w, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("verify", [False, True])
def test_an_all_padding_row_after_the_last_document_leaves_it_intact(verify):
    # Padding goes to a spare slot row; were it written over the last document's slots, that
    # document's norm would lose its positions (the engine path alone, then with the check on).
    model = M.SeqModel()
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(1, 11, (3, 6), generator=g)
    documents = torch.tensor([[0, 0, 0, 1, 1, 1],
                              [2, 2, 2, 2, 2, -1],
                              [-1, -1, -1, -1, -1, -1]])
    tokens = torch.where(documents >= 0, tokens, torch.zeros_like(tokens))
    si = SelfInfluence(model, broadcast=["pos"], verify=verify)
    with si.capture():
        losses = doc_losses(model, tokens, documents)
    got = si.norms(losses, documents=documents[:, :-1])
    grads = per_document_grads(model, tokens, documents)
    want = sum(g.flatten(1).square().sum(1) for g in grads.values())
    assert got.shape == (3,) and want[2] > 0
    assert ((got - want).abs().max() / want.max()) < 1e-4
