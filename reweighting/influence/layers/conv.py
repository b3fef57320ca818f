"""``nn.Conv1d`` / ``nn.Conv2d``: the input is unfolded into patches, so each output position ``t``
is a linear layer on its patch and ``g_i = sum_t G_it^T patch_it`` per group of channels."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..factors import Factor, OuterFactor, SumFactor
from . import register


def _patches(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``[B, positions, C_in * prod(kernel)]`` in the weight's (channel, kernel...) order."""
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    # The same padding the module's forward applies (including padding="same" and non-zero modes).
    x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, dilation, stride = (1, *module.kernel_size), (1, *module.dilation), (1, *module.stride)
    else:
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    return F.unfold(x, kernel, dilation=dilation, stride=stride).transpose(1, 2)


@register(nn.Conv1d, nn.Conv2d)
def conv(module: nn.Conv1d | nn.Conv2d, activation: torch.Tensor, output_grad: torch.Tensor) -> dict[str, Factor]:
    b, h = activation.shape[0], module.groups
    patches = _patches(module, activation)
    x = patches.reshape(b, patches.shape[1], h, -1)
    g = output_grad.reshape(b, module.out_channels, -1).transpose(1, 2)
    out: dict[str, Factor] = {"weight": OuterFactor(x, g.reshape(b, g.shape[1], h, -1), module.weight.shape)}
    if module.bias is not None:
        out["bias"] = SumFactor(g, module.bias.shape)
    return out
