"""``nn.Embedding``: ``g_i = sum_t onehot(tok_it) G_it^T``; positions holding ``padding_idx`` get no gradient."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..factors import Factor, RowsFactor
from . import register


@register(nn.Embedding)
def embedding(module: nn.Embedding, activation: torch.Tensor, output_grad: torch.Tensor) -> dict[str, Factor]:
    b = activation.shape[0]
    idx = activation.reshape(b, -1).long()
    if module.padding_idx is not None:
        idx = torch.where(idx == module.padding_idx, torch.full_like(idx, -1), idx)
    g = output_grad.reshape(b, idx.shape[1], module.embedding_dim)
    return {"weight": RowsFactor(idx, g, module.weight.shape, masked=module.padding_idx is not None)}
