"""Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2's linear layer, weight ``[d_in, d_out]``):
``g_i = sum_t A_it^T G_it``, the transpose of ``nn.Linear``'s layout.

Registered by name, so ``transformers`` is not imported unless a model uses it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..factors import Factor, OuterFactor, SumFactor
from . import register_by_name


@register_by_name("transformers.pytorch_utils.Conv1D")
def hf_conv1d(module: nn.Module, activation: torch.Tensor, output_grad: torch.Tensor) -> dict[str, Factor]:
    b = activation.shape[0]
    d_in, d_out = module.weight.shape
    x = activation.reshape(b, -1, 1, d_in)
    g = output_grad.reshape(b, -1, 1, d_out)
    # OuterFactor forms g^T x; with the roles swapped that is A^T G, already in the [d_in, d_out] layout.
    out: dict[str, Factor] = {"weight": OuterFactor(g, x, module.weight.shape)}
    if module.bias is not None:
        out["bias"] = SumFactor(g.reshape(b, -1, d_out), module.bias.shape)
    return out
