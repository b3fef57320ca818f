"""``nn.MultiheadAttention``: a call rule, since its projections act on tensors inside the call.

The module calls ``F.multi_head_attention_forward``, which uses ``in_proj_weight`` (or the
separate ``q/k/v_proj_weight``) and ``out_proj.weight`` functionally (``out_proj`` is never
called as a module). From the call's inputs the rule recomputes the projections
``Q = x_q W_q^T + b_q`` (and ``K``, ``V``) and runs the module itself once more with identity
projections on them, which gives the attention output ``A`` (the input of ``out_proj``) and,
by a local backward of ``A`` with ``G_A = G W_o``, the gradients ``G_Q, G_K, G_V`` of the
projections, with every mask and option of the original call. Then, per sample,
``out_proj.weight: sum_t G_t^T A_t``, ``W_q: sum_t G_Qt^T x_qt`` (and ``W_k``, ``W_v``), and the
biases are sums of the same output gradients. Refused: ``add_bias_kv`` (keys and values get a
shared extra position) and attention dropout in training mode (the recomputation would draw
other masks).
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
    eye = torch.eye(e, device=query.device, dtype=torch.float32)
    subs = {"out_proj.weight": eye}
    if module.out_proj.bias is not None:
        subs["out_proj.bias"] = torch.zeros(e, device=query.device)
    if module._qkv_same_embed_dim:
        subs["in_proj_weight"] = eye.repeat(3, 1)
    else:
        subs.update(q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye)
    if module.in_proj_bias is not None:
        subs["in_proj_bias"] = torch.zeros(3 * e, device=query.device)
    # Three distinct leaves (even for self-attention), so the module projects each on its own.
    qp, kp, vp = (F.linear(x.float(), w, bias).requires_grad_() for x, w, bias in
                  ((query, wq, bq), (key, wk, bk), (value, wv, bv)))
    with torch.enable_grad():
        attended, attention = torch.func.functional_call(module, subs, (qp, kp, vp, *inputs[3:]), kwargs)
        g_out = output_grads[0].float()
        outs, grads = [attended], [g_out @ module.out_proj.weight.detach().float()]
        if len(output_grads) > 1 and output_grads[1] is not None and attention is not None:
            outs.append(attention)
            grads.append(output_grads[1].float())
        gq, gk, gv = (g if g is not None else torch.zeros_like(x) for g, x in
                      zip(torch.autograd.grad(outs, [qp, kp, vp], grads, allow_unused=True), (qp, kp, vp)))
    if not module.batch_first:  # [T, B, E] -> [B, T, E]
        query, key, value, attended, g_out, gq, gk, gv = (
            t.transpose(0, 1) for t in (query, key, value, attended, g_out, gq, gk, gv))
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
