"""The attention rule's own recomputation under every mask and option of nn.MultiheadAttention,
against per-sample gradients from a loop of single-sample backward passes."""

import pytest
import torch
import torch.nn as nn

from reweighting.influence import SelfInfluence, per_sample_grads_loop

from .test_uses import weighted_check


class Masked(nn.Module):
    def __init__(self, mask_kind, zero_attn=False, average=True, weights_in_loss=True, heads=2):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(4, 8)
        self.mha = nn.MultiheadAttention(8, heads, batch_first=True, add_zero_attn=zero_attn)
        self.mask_kind, self.average, self.weights_in_loss, self.heads = mask_kind, average, weights_in_loss, heads

    def forward(self, x, pad):
        h = torch.tanh(self.proj(x))
        b, t = h.shape[:2]
        kw = {}
        if self.mask_kind == "causal_bool":
            kw["attn_mask"] = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
            kw["is_causal"] = True
        elif self.mask_kind == "float_per_head":
            # per sample and head, from the sample itself (a per-sample loss must not see the batch)
            base = (x[..., 0].unsqueeze(-1) - x[..., 1].unsqueeze(-2)).detach()
            scales = torch.arange(1.0, self.heads + 1).view(1, -1, 1, 1)
            kw["attn_mask"] = (base.unsqueeze(1) * scales).reshape(b * self.heads, t, t)
        if self.mask_kind == "float_padding":
            kw["key_padding_mask"] = pad.float() * -1e4
        elif self.mask_kind == "float_per_head":
            kw["key_padding_mask"] = pad.float() * -1e4  # the same type as attn_mask
        else:
            kw["key_padding_mask"] = pad
        out, attn = self.mha(h, h, h, need_weights=self.weights_in_loss, average_attn_weights=self.average, **kw)
        return out, attn


def masked_loss(model, x, pad):
    out, attn = model(x, pad)
    loss = out.square().sum((1, 2))
    if attn is not None:
        loss = loss + attn.reshape(attn.shape[0], -1)[:, ::3].sum(-1) ** 2
    return loss


@pytest.mark.parametrize("kind, zero_attn, average, weights_in_loss", [
    ("causal_bool", False, True, True),
    ("causal_bool", False, True, False),  # scaled_dot_product_attention with the merged mask
    ("float_per_head", False, False, True),
    ("float_padding", True, True, False),
    ("float_per_head", True, True, True),
])
def test_masks_and_options_are_exact(kind, zero_attn, average, weights_in_loss):
    model = Masked(kind, zero_attn, average, weights_in_loss)
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(2))
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1, 4] = pad[2, 3:] = True
    weighted_check(model, SelfInfluence(model), masked_loss, (x, pad), reference=per_sample_grads_loop)
