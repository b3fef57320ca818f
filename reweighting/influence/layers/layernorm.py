"""``nn.LayerNorm`` (and ``nn.RMSNorm``): weight ``g_i = sum_t G_it * xhat_it``, bias ``g_i = sum_t G_it``.

``xhat`` (the normalised input) is recomputed from the stored input rather than stored by a hook.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..factors import Factor, SumFactor
from . import register


def _factors(module: nn.Module, xhat: torch.Tensor, output_grad: torch.Tensor) -> dict[str, Factor]:
    b = xhat.shape[0]
    size = math.prod(module.normalized_shape)
    g = output_grad.reshape(b, -1, size)
    out: dict[str, Factor] = {}
    if getattr(module, "weight", None) is not None:
        out["weight"] = SumFactor(g * xhat.reshape(b, -1, size), module.weight.shape)
    if getattr(module, "bias", None) is not None:
        out["bias"] = SumFactor(g, module.bias.shape)
    return out


@register(nn.LayerNorm)
def layer_norm(module: nn.LayerNorm, activation: torch.Tensor, output_grad: torch.Tensor) -> dict[str, Factor]:
    xhat = F.layer_norm(activation, module.normalized_shape, eps=module.eps)
    return _factors(module, xhat, output_grad)


if hasattr(nn, "RMSNorm"):

    @register(nn.RMSNorm)
    def rms_norm(module: nn.Module, activation: torch.Tensor, output_grad: torch.Tensor) -> dict[str, Factor]:
        xhat = F.rms_norm(activation, module.normalized_shape, eps=module.eps)
        return _factors(module, xhat, output_grad)
