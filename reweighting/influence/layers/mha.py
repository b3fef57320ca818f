"""``nn.MultiheadAttention``: a call rule, since its projections act on tensors inside the call.

The module calls ``F.multi_head_attention_forward``, which uses ``in_proj_weight`` (or the
separate ``q/k/v_proj_weight``) and ``out_proj.weight`` functionally (``out_proj`` is never
called as a module). From the call's inputs the rule recomputes the projections
``Q = x_q W_q^T + b_q`` (and ``K``, ``V``) and the attention on them per head,
``A = softmax(Q K^T / sqrt(d_h) + M) V`` (``M``: the call's ``attn_mask`` and
``key_padding_mask`` merged as the module merges them, ``-inf`` where a boolean mask is True;
``add_zero_attn`` appends a zero key and value), which gives the input ``A`` of ``out_proj``
and, by a local backward of ``A`` with ``G_A = G W_o`` (plus the gradient of the returned
attention weights, when the loss uses them), the gradients ``G_Q, G_K, G_V`` of the
projections. Then, per sample, ``out_proj.weight: sum_t G_t^T A_t``, ``W_q: sum_t G_Qt^T x_qt``
(and ``W_k``, ``W_v``), and the biases are sums of the same output gradients. The attention is
computed once more here (the rule sees the call's inputs and output gradient, not the tensors
inside the call), but without the projections' matrix products. Refused: ``add_bias_kv`` (keys
and values get a shared extra position) and attention dropout in training mode (the
recomputation would draw other masks).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..factors import Factor, OuterFactor, StackedFactor, SumFactor
from . import register_call

__all__ = ["mha_refusal", "multihead_attention"]


def mha_refusal(module: nn.MultiheadAttention) -> str | None:
    if module.bias_k is not None or module.bias_v is not None:
        return "add_bias_kv=True appends shared key/value positions (not supported)"
    if module.training and module.dropout > 0:
        return ("attention dropout in training mode cannot be recomputed exactly: set dropout=0 or call .eval() "
                "on the attention module")
    return None


def _outer(x: torch.Tensor, g: torch.Tensor, shape: torch.Size) -> OuterFactor:
    b = x.shape[0]
    return OuterFactor(x.reshape(b, -1, 1, x.shape[-1]), g.reshape(b, -1, 1, g.shape[-1]), torch.Size(shape))


_CALL_ARGS = ("key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")


def _as_additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True: not allowed) as ``-inf``/``0``; a float mask as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def _merged_mask(args: dict, b: int, h: int, t: int, s: int, zero_attn: bool) -> torch.Tensor | None:
    """``[B, H, T, S]`` (broadcastable) additive mask: ``attn_mask`` plus ``key_padding_mask`` (as the module)."""
    mask = _as_additive(args.get("attn_mask"), torch.float32)
    if mask is not None:
        mask = mask.view(1, 1, t, s) if mask.dim() == 2 else mask.view(b, h, t, s)
    padding = _as_additive(args.get("key_padding_mask"), torch.float32)
    if padding is not None:
        padding = padding.view(b, 1, 1, s)
        mask = padding if mask is None else mask + padding
    if mask is not None and zero_attn:  # the appended zero key is visible to every query
        mask = F.pad(mask, (0, 1))
    return mask


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None,
               zero_attn: bool, want_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``A`` ``[B, T, E]`` from projected ``q`` ``[B, T, E]``, ``k``, ``v`` ``[B, S, E]``, and the
    attention probabilities ``[B, H, T, S]`` when ``want_weights``."""
    b, t, e = q.shape
    d = e // heads
    q, k, v = (x.reshape(b, -1, heads, d).transpose(1, 2) for x in (q, k, v))
    if zero_attn:
        k, v = (F.pad(x, (0, 0, 0, 1)) for x in (k, v))
    if want_weights:
        scores = (q * d ** -0.5) @ k.transpose(-1, -2)
        if mask is not None:
            scores = scores + mask
        probs = torch.softmax(scores, dim=-1)
        out = probs @ v
    else:
        probs = None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, t, e), probs


@register_call(nn.MultiheadAttention, covers=("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight",
                                              "v_proj_weight", "out_proj.weight", "out_proj.bias"))
def multihead_attention(module: nn.MultiheadAttention, inputs: tuple, kwargs: dict,
                        output_grads: tuple) -> dict[str, Factor]:
    reason = mha_refusal(module)
    if reason is not None:
        raise ValueError(f"MultiheadAttention: {reason}")
    query, key, value = inputs[:3]
    if query.dim() != 3:
        raise ValueError(f"MultiheadAttention needs batched inputs (3-d), got query of shape {tuple(query.shape)}")
    e = module.embed_dim
    if module._qkv_same_embed_dim:
        wq, wk, wv = module.in_proj_weight.detach().float().chunk(3)
    else:
        wq, wk, wv = (w.detach().float() for w in (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight))
    bq = bk = bv = None
    if module.in_proj_bias is not None:
        bq, bk, bv = module.in_proj_bias.detach().float().chunk(3)
    args = dict(zip(_CALL_ARGS, inputs[3:]))
    args.update(kwargs)
    if not module.batch_first:  # [T, B, E] -> [B, T, E]
        query, key, value = (x.transpose(0, 1) for x in (query, key, value))
    b, t, s_len, heads = query.shape[0], query.shape[1], key.shape[1], module.num_heads
    mask = _merged_mask(args, b, heads, t, s_len, module.add_zero_attn)
    g_out = output_grads[0].float()
    if not module.batch_first:
        g_out = g_out.transpose(0, 1)
    g_weights = output_grads[1] if len(output_grads) > 1 else None
    # Three distinct leaves (even for self-attention), so that each projection gets its own gradient.
    qp, kp, vp = (F.linear(x.float(), w, bias).requires_grad_() for x, w, bias in
                  ((query, wq, bq), (key, wk, bk), (value, wv, bv)))
    with torch.enable_grad():
        attended, probs = _attention(qp, kp, vp, heads, mask, module.add_zero_attn, g_weights is not None)
        outs, grads = [attended], [g_out @ module.out_proj.weight.detach().float()]
        if g_weights is not None:
            if args.get("average_attn_weights", True):
                probs = probs.mean(1)
            outs.append(probs)
            grads.append(g_weights.float())
        gq, gk, gv = (g if g is not None else torch.zeros_like(x) for g, x in
                      zip(torch.autograd.grad(outs, [qp, kp, vp], grads, allow_unused=True), (qp, kp, vp)))
    attended = attended.detach()
    b = query.shape[0]
    out: dict[str, Factor] = {"out_proj.weight": _outer(attended, g_out, module.out_proj.weight.shape)}
    if module.out_proj.bias is not None:
        out["out_proj.bias"] = SumFactor(g_out.reshape(b, -1, e), module.out_proj.bias.shape)
    self_attention = inputs[0] is inputs[1] and inputs[1] is inputs[2]
    if module._qkv_same_embed_dim:
        if self_attention:  # one input: the three projections are one [3E, E] product
            out["in_proj_weight"] = _outer(query.float(), torch.cat([gq, gk, gv], -1), module.in_proj_weight.shape)
        else:
            out["in_proj_weight"] = StackedFactor(
                [_outer(x.float(), g, (e, e)) for x, g in ((query, gq), (key, gk), (value, gv))],
                module.in_proj_weight.shape)
    else:
        for name, x, g in (("q_proj_weight", query, gq), ("k_proj_weight", key, gk), ("v_proj_weight", value, gv)):
            out[name] = _outer(x.float(), g, getattr(module, name).shape)
    if module.in_proj_bias is not None:
        shape = module.in_proj_bias.shape
        if gq.shape[1] == gk.shape[1]:
            out["in_proj_bias"] = SumFactor(torch.cat([gq, gk, gv], -1).reshape(b, -1, 3 * e), shape)
        else:
            out["in_proj_bias"] = StackedFactor([SumFactor(g.reshape(b, -1, e), torch.Size([e])) for g in (gq, gk, gv)],
                                                shape)
    return out
