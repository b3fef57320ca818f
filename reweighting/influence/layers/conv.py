"""``nn.Conv1d`` / ``nn.Conv2d``: each output position ``t`` is a linear layer on its input patch, so
``g_i = sum_t G_it^T patch_it`` per group of channels.

The rule chooses per layer, from the shapes, as :class:`~reweighting.influence.factors.OuterFactor`
does for a linear layer: with ``T`` output positions, patches of ``a`` values and ``b`` output
channels per group, the ghost norm costs ``T^2 (a + b)`` per sample and materialising ``g_i``
costs ``T a b``. Where the ghost form is cheaper the input is unfolded into patches and the
factor kept; otherwise the per-sample gradients are formed directly by the convolution's own
weight-gradient kernel run with the batch as groups (input ``[1, B C_in, ...]``, output gradient
``[1, B C_out, ...]``, ``B * groups`` groups), which gives ``[B C_out, C_in / groups, k...]`` without
the unfolded copy of the input (``k^d`` times its size).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..factors import Factor, OuterFactor, SumFactor
from . import register


def _padded(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The input padded as the module's forward pads it (including padding="same" and non-zero modes)."""
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, module._reversed_padding_repeated_twice, mode=mode)


def _patches(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``[B, positions, C_in * prod(kernel)]`` in the weight's (channel, kernel...) order."""
    x = _padded(module, x)
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, dilation, stride = (1, *module.kernel_size), (1, *module.dilation), (1, *module.stride)
    else:
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    return F.unfold(x, kernel, dilation=dilation, stride=stride).transpose(1, 2)


def per_sample_weight_grads(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[B, numel(weight)]``: ``g_i`` of every sample by one grouped weight-gradient convolution."""
    b = x.shape[0]
    x = _padded(module, x)
    stacked_x = x.reshape(1, b * x.shape[1], *x.shape[2:])
    stacked_g = g.reshape(1, b * g.shape[1], *g.shape[2:])
    weight_like = x.new_empty(b * module.out_channels, *module.weight.shape[1:])
    zeros = [0] * len(module.kernel_size)
    _, grads, _ = torch.ops.aten.convolution_backward(
        stacked_g, stacked_x, weight_like, None, module.stride, zeros, module.dilation, False, zeros,
        b * module.groups, [False, True, False])
    return grads.reshape(b, -1)


@register(nn.Conv1d, nn.Conv2d)
def conv(module: nn.Conv1d | nn.Conv2d, activation: torch.Tensor, output_grad: torch.Tensor) -> dict[str, Factor]:
    b, h = activation.shape[0], module.groups
    positions = output_grad[0, 0].numel()
    a = module.weight[0].numel()  # C_in / groups * prod(kernel)
    c = module.out_channels // h
    g = output_grad.reshape(b, module.out_channels, -1).transpose(1, 2)
    out: dict[str, Factor] = {}
    if positions * (a + c) < a * c:  # the ghost form is cheaper: keep the factor
        patches = _patches(module, activation)
        x = patches.reshape(b, patches.shape[1], h, -1)
        out["weight"] = OuterFactor(x, g.reshape(b, g.shape[1], h, -1), module.weight.shape)
    else:
        grads = per_sample_weight_grads(module, activation, output_grad.reshape(b, module.out_channels,
                                                                                *output_grad.shape[2:]))
        out["weight"] = SumFactor(grads, module.weight.shape, summed=True)
    if module.bias is not None:
        out["bias"] = SumFactor(g, module.bias.shape)
    return out
