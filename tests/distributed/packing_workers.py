"""Rank functions for the packed-document distributed test: documents per rank differ (7 and 3)."""

import torch

import reweighting as rw
from reweighting.packing import document_losses

# Rows of document lengths; rank 0 takes rows 0-1 (7 documents), rank 1 rows 2-3 (3 documents).
LAYOUT = [[3, 5, 2], [4, 1, 1, 4], [9], [2, 6]]
ROWS = ((0, 2), (2, 4))
T = 10


def global_batch():
    g = torch.Generator().manual_seed(0)
    b = len(LAYOUT)
    pos = torch.zeros(b, T, dtype=torch.long)
    real = torch.zeros(b, T, dtype=torch.bool)
    for r, lengths in enumerate(LAYOUT):
        at = 0
        for n in lengths:
            pos[r, at:at + n] = torch.arange(n)
            real[r, at:at + n] = True
            at += n
    x = torch.randn(b, T, 4, generator=g)
    y = torch.randn(b, T, generator=g)
    return x, y, pos, real


def make_model():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 1)


def per_document_loss(model, x, y, pos, real):
    token_loss = (model(x).squeeze(-1) - y) ** 2
    return document_losses(token_loss, position_ids=pos, padding_mask=real).loss


def reweighter():
    return rw.LossReweighter("linupper", temperature=0.4)


def gradient(rank, world):
    """This rank's documents weighted by a LossReweighter; gradients averaged over ranks as DDP does."""
    x, y, pos, real = global_batch()
    lo, hi = ROWS[rank] if world > 1 else (0, len(LAYOUT))
    model = make_model()
    losses = per_document_loss(model, x[lo:hi], y[lo:hi], pos[lo:hi], real[lo:hi])
    w = reweighter().weights(losses.detach())
    rw.weighted_loss(losses, w).backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    if world > 1:
        torch.distributed.all_reduce(grads)
    return grads / world, w, losses.detach()
