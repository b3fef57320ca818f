"""``nn.Linear`` on inputs ``[B, d_in]`` or ``[B, ..., d_in]`` (sequences): ``g_i = sum_t G_it^T A_it``."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..factors import Factor, OuterFactor, SumFactor
from . import register


@register(nn.Linear)
def linear(module: nn.Linear, activation: torch.Tensor, output_grad: torch.Tensor) -> dict[str, Factor]:
    b = activation.shape[0]
    x = activation.reshape(b, -1, 1, module.in_features)
    g = output_grad.reshape(b, -1, 1, module.out_features)
    out: dict[str, Factor] = {"weight": OuterFactor(x, g, module.weight.shape)}
    if module.bias is not None:
        out["bias"] = SumFactor(g.reshape(b, -1, module.out_features), module.bias.shape)
    return out
