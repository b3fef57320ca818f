"""Per-token and per-sequence language-model losses computed without the ``[B, T, V]`` logits.

A causal LM's loss needs, for every token, ``CE_t = logsumexp_v(z_tv) - z_t,y_t`` with logits
``z_t = W h_t (+ b)``. Materialising ``z`` costs ``B * T * V`` floats (two to four times over, with
the softmax and its gradient), which dominates memory at large vocabularies. Fused and chunked
cross-entropy kernels avoid it but return only the batch mean; loss-based reweighting needs the
per-sample losses ``l_i`` (docs/core.md, per-sample losses), so this module returns them:

- :func:`per_token_lm_loss`: ``CE_t`` for every token, shape of ``targets``;
- :func:`per_sequence_lm_loss`: ``l_i = sum_t m_it CE_it / sum_t m_it`` (``[B]``), the core's
  :func:`reweighting.sequence_loss` applied to the token losses.

Both go through one autograd function that processes ``chunk_tokens`` tokens at a time. Forward
keeps only ``logsumexp`` (one float per token); backward recomputes each chunk's logits and forms
``dz = g * (softmax(z) - onehot(y))`` in place, from which ``grad_hidden = dz W``,
``grad_weight += dz^T h`` and ``grad_bias += sum dz``. The extra memory is one reused
``chunk_tokens x V`` logit buffer (two under autocast) and the gradient of ``W``; the price is one
more ``[N, H] x [H, V]`` matmul than the materialised path (the logits are computed twice), 4 matmuls
instead of 3.

Precision: the matmuls run in the inputs' dtype, or in the autocast dtype when called under
``torch.autocast`` (as ``F.linear`` would); ``logsumexp``, the softmax and the token losses are computed
in float32 (float64 for float64 inputs). Double backward (``create_graph=True``) raises.
"""

from __future__ import annotations

import torch

from reweighting.checks import checks_enabled, describe_indices
from reweighting.reduce import sequence_loss

__all__ = ["per_token_lm_loss", "per_sequence_lm_loss"]

# chunk_tokens=None: logit buffers of about 64 MiB (341 tokens at SmolLM2's 49,152 vocabulary in
# float32, 227 under bf16 autocast, which keeps a bf16 and a float32 buffer), but never fewer than
# 256 tokens: below that each chunk's matmuls re-read W for too little work (measured 1.3-2x slower
# on CPU at 64-128 tokens).
_AUTO_CHUNK_BYTES = 2**26
_MIN_AUTO_CHUNK = 256
# Vocabulary rows per block of the lower-precision grad_weight product.
_VOCAB_BLOCK = 8192


def _compute_dtypes(hidden: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(matmul dtype, softmax/loss dtype): autocast's dtype where autocast would cast, else the input's."""
    device_type = hidden.device.type
    matmul = hidden.dtype
    if hidden.dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        matmul = torch.get_autocast_dtype(device_type)
    acc = torch.float64 if matmul == torch.float64 else torch.float32
    return matmul, acc


def _chunk_size(chunk_tokens: int | None, n: int, vocab: int, dtypes: tuple[torch.dtype, torch.dtype]) -> int:
    if chunk_tokens is None:
        matmul, acc = dtypes
        per_logit = acc.itemsize + (matmul.itemsize if matmul != acc else 0)
        chunk_tokens = max(_MIN_AUTO_CHUNK, _AUTO_CHUNK_BYTES // (per_logit * vocab))
    return max(1, min(int(chunk_tokens), max(n, 1)))


def _valid_rows(h: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``h`` in ``dtype`` with the rows of ignored tokens set to 0, so that a NaN there cannot reach
    ``grad_weight`` through ``0 * NaN`` in the ``dz^T h`` product."""
    return h.to(dtype).masked_fill(~valid[:, None], 0.0)


class _Logits:
    """Computes one chunk's logits ``h_c W^T (+ b)`` into buffers reused across chunks.

    Reusing one ``[chunk, V]`` buffer (and a float32 copy when the matmul runs in a lower precision)
    rather than allocating per chunk avoids returning hundreds of MiB to the OS and faulting them
    back in on every chunk.
    """

    def __init__(self, weight, bias, chunk, matmul_dtype, acc_dtype):
        self.wt = weight.to(matmul_dtype).t()
        self.bias = None if bias is None else bias.to(matmul_dtype)
        vocab = weight.shape[0]
        self.raw = torch.empty(chunk, vocab, dtype=matmul_dtype, device=weight.device)
        self.acc = self.raw if matmul_dtype == acc_dtype else torch.empty(
            chunk, vocab, dtype=acc_dtype, device=weight.device)

    def __call__(self, hc: torch.Tensor) -> torch.Tensor:
        rows = hc.shape[0]
        raw = self.raw[:rows]
        if self.bias is None:
            torch.mm(hc, self.wt, out=raw)
        else:
            torch.addmm(self.bias, hc, self.wt, out=raw)
        if self.acc is self.raw:
            return raw
        return self.acc[:rows].copy_(raw)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Token losses ``[N]`` from ``h [N, H]``, ``W [V, H]``, ``b [V] | None``, ``y [N]`` (ignored: ``valid`` False)."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, valid, chunk):
        matmul_dtype, acc_dtype = _compute_dtypes(h)
        n = h.shape[0]
        with torch.autocast(h.device.type, enabled=False):
            logits = _Logits(weight, bias, chunk, matmul_dtype, acc_dtype)
            # Ignored tokens gather index 0 (any valid id); their loss is replaced by 0 below.
            safe = torch.where(valid, targets, torch.zeros_like(targets))
            lse = torch.empty(n, dtype=acc_dtype, device=h.device)
            target_logit = torch.empty(n, dtype=acc_dtype, device=h.device)
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                z = logits(_valid_rows(h[start:stop], valid[start:stop], matmul_dtype))
                target_logit[start:stop] = z.gather(1, safe[start:stop, None]).squeeze(1)
                # logsumexp in place in the buffer: max + log(sum(exp(z - max))).
                top = z.amax(dim=1, keepdim=True)
                lse[start:stop] = z.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))
            del logits
            loss = torch.where(valid, lse - target_logit, torch.zeros_like(lse))
        ctx.save_for_backward(h, weight, bias, safe, valid, lse)
        ctx.chunk = chunk
        ctx.dtypes = (matmul_dtype, acc_dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():
            # create_graph=True: this backward is not itself differentiable, and returning gradients
            # without a graph would make a gradient penalty through them silently zero.
            raise RuntimeError(
                "per_token_lm_loss / per_sequence_lm_loss do not support double backward "
                "(backward with create_graph=True); use the materialised logits for that"
            )
        h, weight, bias, safe, valid, lse = ctx.saved_tensors
        matmul_dtype, acc_dtype = ctx.dtypes
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        n, chunk = h.shape[0], ctx.chunk
        grad_h = grad_w = grad_b = None
        with torch.autocast(h.device.type, enabled=False):
            # Ignored tokens get exactly zero gradient, whatever the upstream gradient there.
            g = torch.where(valid, grad_loss.to(acc_dtype), torch.zeros((), dtype=acc_dtype, device=h.device))
            logits = _Logits(weight, bias, chunk, matmul_dtype, acc_dtype)
            wc = logits.wt.t()
            if need_h:
                grad_h = torch.empty(h.shape, dtype=matmul_dtype, device=h.device)
            if need_w:
                grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
            if need_b:
                grad_b = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device)
            rows = torch.arange(min(chunk, n), device=h.device)
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                hc = _valid_rows(h[start:stop], valid[start:stop], matmul_dtype)
                # dz = g * (softmax(z) - onehot(y)), built in place in the logits buffer.
                p = logits(hc).sub_(lse[start:stop, None]).exp_()
                p[rows[: stop - start], safe[start:stop]] -= 1.0
                # Ignored rows: g = 0, and finite since their hidden rows were zeroed.
                p.mul_(g[start:stop, None])
                if need_b:
                    grad_b += p.sum(dim=0)
                dz = p if logits.acc is logits.raw else logits.raw[: stop - start].copy_(p)
                if need_h:
                    torch.mm(dz, wc, out=grad_h[start:stop])
                if need_w and dz.dtype == acc_dtype:
                    grad_w.addmm_(dz.t(), hc)
                elif need_w:
                    # Lower-precision products summed into float32 in vocabulary blocks, so that no
                    # [V, H] temporary exists besides grad_weight itself.
                    for v0 in range(0, grad_w.shape[0], _VOCAB_BLOCK):
                        v1 = min(v0 + _VOCAB_BLOCK, grad_w.shape[0])
                        grad_w[v0:v1] += dz[:, v0:v1].t() @ hc
            del logits
        if grad_h is not None:
            grad_h = grad_h.to(h.dtype)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None


def _check_inputs(hidden, weight, targets, bias, ignore_index, chunk_tokens, mask=None) -> None:
    for name, x in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor (final hidden states), got dtype {hidden.dtype}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor (output embedding [V, H]), got dtype {weight.dtype}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be integer token ids, got dtype {targets.dtype}")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [B, T, H] (or [..., H]), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be the output embedding [V, H], got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight has hidden size {weight.shape[1]} (shape {tuple(weight.shape)}) but hidden has "
            f"{hidden.shape[-1]} (shape {tuple(hidden.shape)}): weight must be [V, H]"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (shape [0, H])")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} does not match hidden shape {tuple(hidden.shape)} "
            f"without its last dimension ({tuple(hidden.shape[:-1])})"
        )
    if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        raise TypeError(
            f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype outside torch.autocast"
        )
    for name, x in (("weight", weight), ("targets", targets)):
        if x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but hidden is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
        if not bias.is_floating_point():
            raise TypeError(f"bias must be floating-point, got dtype {bias.dtype}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be None (automatic) or an int >= 1, got {chunk_tokens!r}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.shape != targets.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match targets shape {tuple(targets.shape)}")


def _positions(bad: torch.Tensor, limit: int = 10) -> str:
    """'[(0, 3), (1, 7)]' (sequence, position) pairs of the True entries of ``bad``, at most ``limit``."""
    idx = torch.nonzero(bad).tolist()
    shown = ", ".join(str(tuple(i)) if len(i) > 1 else str(i[0]) for i in idx[:limit])
    if len(idx) > limit:
        shown += f", ... ({len(idx)} in all)"
    return f"[{shown}]"


def per_token_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    shift: bool = False,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Token cross-entropies ``CE_t = logsumexp(W h_t + b) - (W h_t + b)_{y_t}``, without the full logits.

    Args:
        hidden: final hidden states ``[B, T, H]`` (after the model's final norm; any leading shape).
        weight: output embedding ``[V, H]`` (``model.get_output_embeddings().weight``).
        targets: integer token ids ``[B, T]`` aligned with ``hidden``: position ``t``'s loss is that of
            predicting ``targets[:, t]`` from ``hidden[:, t]``. Tokens equal to ``ignore_index`` carry
            no loss (0) and no gradient, whatever their hidden state.
        bias: optional output bias ``[V]``.
        shift: for Hugging Face style ``labels`` (the same tensor as the inputs): use
            ``hidden[:, :-1]`` with ``targets[:, 1:]``, so the result is ``[B, T - 1]``.
        chunk_tokens: tokens per chunk; the extra memory is one ``chunk_tokens x V`` float32 buffer
            (plus one in the autocast dtype), the gradient of ``weight`` and, under autocast, a copy
            of ``weight`` in that dtype. ``None``: buffers of about 64 MiB, at least 256 tokens.

    Returns:
        ``[B, T]`` (``[B, T - 1]`` with ``shift``) float32 losses (float64 for float64 inputs), with graph.

    Equal to ``F.cross_entropy(F.linear(hidden, weight, bias).float().transpose(1, 2), targets,
    ignore_index=ignore_index, reduction="none")`` in value and gradient, also under autocast.
    Targets outside ``[0, V)`` other than ``ignore_index`` raise; so do non-finite losses, naming
    the tokens and whether ``hidden``, ``weight`` or ``bias`` is at fault (both checks read back to
    the host and obey :func:`reweighting.set_checks`).
    """
    _check_inputs(hidden, weight, targets, bias, ignore_index, chunk_tokens)
    if shift:
        if hidden.dim() < 3:
            raise ValueError(f"shift=True needs hidden [B, T, H], got shape {tuple(hidden.shape)}")
        hidden, targets = hidden[..., :-1, :], targets[..., 1:]
    return _token_loss(hidden, weight, targets, bias, ignore_index, chunk_tokens)


def _token_loss(hidden, weight, targets, bias, ignore_index, chunk_tokens) -> torch.Tensor:
    out_shape = targets.shape
    vocab, width = weight.shape
    h = hidden.reshape(-1, width)
    y = targets.reshape(-1).long()
    valid = y != ignore_index
    if checks_enabled():
        out_of_range = valid & ((y < 0) | (y >= vocab))
        if bool(out_of_range.any()):
            bad = out_of_range.reshape(out_shape)
            values = sorted(set(y[out_of_range].tolist()))[:5]
            raise ValueError(
                f"targets has token ids outside [0, {vocab}) (the vocabulary of weight) that are not "
                f"ignore_index={ignore_index}: values {values} at (sequence, position) {_positions(bad)}"
            )
    chunk = _chunk_size(chunk_tokens, h.shape[0], vocab, _compute_dtypes(h))
    loss = _ChunkedCrossEntropy.apply(h, weight, bias, y, valid, chunk)
    loss = loss.reshape(out_shape)
    if checks_enabled():
        bad = ~torch.isfinite(loss.detach())
        if bool(bad.any()):
            raise ValueError(_nonfinite_message(hidden, weight, bias, bad, valid.reshape(out_shape)))
    return loss


def _nonfinite_message(hidden, weight, bias, bad, valid) -> str:
    bad_hidden = ~torch.isfinite(hidden.detach()).all(dim=-1) & valid
    if bool(bad_hidden.any()):
        return (f"hidden has NaN or infinite values at (sequence, position) {_positions(bad_hidden)}, "
                "which carry a loss")
    bad_rows = ~torch.isfinite(weight.detach()).all(dim=1)
    if bool(bad_rows.any()):
        return f"weight has NaN or infinite values in vocabulary rows {_positions(bad_rows)}"
    if bias is not None and not bool(torch.isfinite(bias.detach()).all()):
        return f"bias has NaN or infinite values at vocabulary ids {_positions(~torch.isfinite(bias.detach()))}"
    return (f"the token losses are not finite at (sequence, position) {_positions(bad)} although hidden "
            "and weight are finite: the logits overflow the matmul dtype (e.g. float16); use bfloat16 or float32")


def per_sequence_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    shift: bool = False,
    chunk_tokens: int | None = None,
    empty: str = "raise",
) -> torch.Tensor:
    """Per-sequence mean token loss ``l_i = sum_t m_it CE_it / sum_t m_it`` (``[B]``), without the full logits.

    ``CE`` is :func:`per_token_lm_loss` (same arguments). A token counts when ``mask`` is true
    there (``None``: every token) and its target is not ``ignore_index``; ``mask`` is aligned with
    ``targets`` and shifted with it; masked-out tokens are treated as ``ignore_index`` (no loss, no
    gradient, not checked for finiteness). The mean is :func:`reweighting.sequence_loss` (float32),
    so a sequence without any counting token is handled exactly as there: ``empty="raise"``
    (default) is an error naming it while checks are on and NaN with checks off; ``empty="nan"``
    makes it NaN with zero gradient, to be left out with ``LossReweighter.weights(losses, mask=...)``.
    """
    _check_inputs(hidden, weight, targets, bias, ignore_index, chunk_tokens, mask)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
    if shift:
        hidden, targets = hidden[:, :-1], targets[:, 1:]
        mask = None if mask is None else mask[:, 1:]
    if mask is not None:
        if mask.is_complex():
            raise TypeError(f"mask must be bool or 0/1 numbers, got dtype {mask.dtype}")
        if mask.dtype != torch.bool and checks_enabled() and bool(((mask != 0) & (mask != 1)).any()):
            rows = ((mask != 0) & (mask != 1)).any(dim=1)
            raise ValueError(f"mask must hold only 0 and 1 (or booleans), but sequences {describe_indices(rows)} have "
                             "other values: a soft mask is not a token mask, and labels are not a mask (pass "
                             "labels != ignore_index, or the labels as targets)")
        real = (mask if mask.dtype == torch.bool else mask != 0).to(targets.device)
        targets = torch.where(real, targets, torch.full_like(targets, ignore_index))
    token_loss = _token_loss(hidden, weight, targets, bias, ignore_index, chunk_tokens)
    return sequence_loss(token_loss, targets != ignore_index, empty=empty)
