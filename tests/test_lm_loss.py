"""per_token_lm_loss / per_sequence_lm_loss against cross-entropy on the materialised logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import reweighting as rw
from reweighting import lm_loss
from reweighting.lm_loss import per_sequence_lm_loss, per_token_lm_loss

B, T, H, V = 3, 7, 16, 53


def _inputs(dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g, dtype=dtype) / 2).requires_grad_()
    b = torch.randn(V, generator=g, dtype=dtype).requires_grad_() if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, 2] = -100
    targets[2, :3] = -100
    upstream = torch.rand(B, T, generator=g, dtype=dtype) + 0.5
    return hidden, weight, b, targets, upstream


def _reference(hidden, weight, bias, targets, ignore_index=-100):
    """Cross-entropy on the materialised logits, upcast to float32 as Hugging Face does."""
    logits = F.linear(hidden, weight, bias)
    if logits.dtype != torch.float64:
        logits = logits.float()
    if logits.dim() == 3:
        logits = logits.transpose(1, 2)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")


def _grads(loss, upstream, params):
    params = [p for p in params if p is not None]
    return torch.autograd.grad((loss * upstream).sum(), params)


@pytest.mark.parametrize("chunk", [1, 4, 5, 21, 1000, None])
@pytest.mark.parametrize("use_bias", [True, False])
def test_values_and_gradients_match_materialised_float64(chunk, use_bias):
    hidden, weight, bias, targets, upstream = _inputs(bias=use_bias)
    loss = per_token_lm_loss(hidden, weight, targets, bias=bias, chunk_tokens=chunk)
    ref = _reference(hidden, weight, bias, targets)
    assert loss.shape == (B, T) and loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    assert bool((loss[targets == -100] == 0).all())
    for got, want in zip(_grads(loss, upstream, [hidden, weight, bias]), _grads(ref, upstream, [hidden, weight, bias])):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [3, None])
def test_float32_matches_materialised(chunk):
    hidden, weight, bias, targets, upstream = _inputs(dtype=torch.float32)
    loss = per_token_lm_loss(hidden, weight, targets, bias=bias, chunk_tokens=chunk)
    ref = _reference(hidden, weight, bias, targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(_grads(loss, upstream, [hidden, weight, bias]), _grads(ref, upstream, [hidden, weight, bias])):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk, vocab_block", [(1, 8192), (5, 7), (None, 8192)])
def test_bf16_autocast_matches_materialised_autocast(chunk, vocab_block, monkeypatch):
    monkeypatch.setattr(lm_loss, "_VOCAB_BLOCK", vocab_block)
    # Under autocast both paths run the matmuls in bfloat16 and the softmax in float32; they differ
    # only in bf16 rounding (the chunked path accumulates grad_weight in float32), so each must be
    # as close to the float32 answer as the materialised bf16 path is, and close to it.
    hidden, weight, bias, targets, upstream = _inputs(dtype=torch.float32)
    params = [hidden, weight, bias]
    exact = _reference(hidden, weight, bias, targets)
    exact_grads = _grads(exact, upstream, params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = per_token_lm_loss(hidden, weight, targets, bias=bias, chunk_tokens=chunk)
        ref = _reference(hidden, weight, bias, targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-5)  # same bf16 logits, same float32 softmax
    got_grads = _grads(loss, upstream, params)
    ref_grads = _grads(ref, upstream, params)
    for name, got, want, true, p in zip(["hidden", "weight", "bias"], got_grads, ref_grads, exact_grads, params):
        assert got.dtype == p.dtype, name
        bf16_error = (want - true).abs().max()
        assert bf16_error > 0, name  # the comparison below is about bf16 rounding
        assert (got - true).abs().max() <= 2 * bf16_error, name
        torch.testing.assert_close(got, want, rtol=0, atol=3 * float(bf16_error))


def test_bf16_weights_without_autocast():
    hidden, weight, bias, targets, upstream = _inputs(dtype=torch.float32)
    h16, w16 = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    loss = per_token_lm_loss(h16, w16, targets, chunk_tokens=4)
    ref = _reference(h16, w16, None, targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-5)
    got = _grads(loss, upstream, [h16, w16])
    want = _grads(ref, upstream, [h16, w16])
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.bfloat16
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[1].float(), want[1].float(), rtol=2e-2, atol=5e-2)


def test_custom_ignore_index_and_flat_inputs():
    hidden, weight, _, targets, upstream = _inputs()
    targets = torch.where(targets == -100, torch.full_like(targets, 7), targets)
    targets[1, 1] = 7
    loss = per_token_lm_loss(hidden.reshape(B * T, H), weight, targets.reshape(-1), ignore_index=7, chunk_tokens=2)
    ref = _reference(hidden.reshape(B * T, H), weight, None, targets.reshape(-1), ignore_index=7)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    assert bool((loss[targets.reshape(-1) == 7] == 0).all())


def test_shift_equals_hugging_face_causal_lm_loss():
    from reweighting.integrations.hf_trainer import causal_lm_sequence_losses

    hidden, weight, bias, labels, _ = _inputs()
    got = per_sequence_lm_loss(hidden, weight, labels, bias=bias, shift=True, chunk_tokens=3)
    want = causal_lm_sequence_losses(F.linear(hidden, weight, bias), labels, shift=True)
    assert got.dtype == want.dtype == torch.float32  # the core's sequence mean is float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    tokens = per_token_lm_loss(hidden, weight, labels, bias=bias, shift=True)
    assert tokens.shape == (B, T - 1)
    torch.testing.assert_close(tokens, _reference(hidden[:, :-1], weight, bias, labels[:, 1:]))
    gw = torch.autograd.grad(got.sum(), weight)[0]
    gw_ref = torch.autograd.grad(want.sum(), weight)[0]
    torch.testing.assert_close(gw, gw_ref, rtol=1e-6, atol=1e-7)


def test_per_sequence_with_mask_is_the_core_sequence_loss():
    hidden, weight, bias, targets, _ = _inputs()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    got = per_sequence_lm_loss(hidden, weight, targets, mask=mask, bias=bias)
    counts = mask & (targets != -100)
    want = rw.sequence_loss(_reference(hidden, weight, bias, targets), counts)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # by hand for one row, so that the reference is not only the core function
    row = _reference(hidden, weight, bias, targets)[1][counts[1]]
    torch.testing.assert_close(got[1], row.mean().float())
    # a masked-out token is left out entirely: a NaN hidden state there changes nothing
    with torch.no_grad():
        hidden[1, 5] = float("nan")
    again = per_sequence_lm_loss(hidden, weight, targets, mask=mask.int(), bias=bias)
    torch.testing.assert_close(again, got)
    assert bool(torch.isfinite(torch.autograd.grad(again.sum(), weight)[0]).all())


def test_sequence_without_counting_token_follows_sequence_loss():
    hidden, weight, _, targets, _ = _inputs()
    targets[1] = -100
    with pytest.raises(ValueError, match=r"sequences \[1\]"):
        per_sequence_lm_loss(hidden, weight, targets)
    token_loss = _reference(hidden, weight, None, targets)
    with rw.checks(False):
        got = per_sequence_lm_loss(hidden, weight, targets)
    assert bool(torch.isnan(got[1]))
    torch.testing.assert_close(got, rw.sequence_loss(token_loss, targets != -100, empty="nan"), equal_nan=True)
    got = per_sequence_lm_loss(hidden, weight, targets, empty="nan")
    assert bool(torch.isnan(got[1])) and bool(torch.isfinite(got[[0, 2]]).all())
    gw = torch.autograd.grad(got[[0, 2]].sum(), weight)[0]
    assert bool(torch.isfinite(gw).all())
    with pytest.raises(ValueError, match="empty"):
        per_sequence_lm_loss(hidden, weight, targets, empty="zero")


def test_nan_hidden_at_ignored_positions_does_not_leak():
    hidden, weight, bias, targets, upstream = _inputs()
    with torch.no_grad():
        hidden[0, 2] = float("nan")  # targets[0, 2] is ignore_index
        hidden[2, 0] = float("inf")
    loss = per_token_lm_loss(hidden, weight, targets, bias=bias, chunk_tokens=2)
    assert bool(torch.isfinite(loss).all())
    gh, gw, gb = _grads(loss, upstream, [hidden, weight, bias])
    assert bool(torch.isfinite(gw).all()) and bool(torch.isfinite(gb).all())
    assert bool((gh[targets == -100] == 0).all())
    keep = targets != -100
    clean = hidden.detach().clone()
    clean[~keep] = 0
    clean.requires_grad_()
    ref = _reference(clean, weight, bias, targets)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gw, _grads(ref, upstream, [weight])[0])


def test_gradients_only_where_required():
    hidden, weight, bias, targets, upstream = _inputs()
    frozen = weight.detach()
    loss = per_token_lm_loss(hidden, frozen, targets)
    (gh,) = _grads(loss, upstream, [hidden])
    torch.testing.assert_close(gh, _grads(_reference(hidden, frozen, None, targets), upstream, [hidden])[0])
    loss = per_token_lm_loss(hidden.detach(), weight, targets)
    (gw,) = _grads(loss, upstream, [weight])
    torch.testing.assert_close(gw, _grads(_reference(hidden.detach(), weight, None, targets), upstream, [weight])[0])
    with torch.no_grad():
        assert not per_token_lm_loss(hidden, weight, targets).requires_grad


def test_double_backward_raises():
    hidden, weight, _, targets, _ = _inputs()
    loss = per_token_lm_loss(hidden, weight, targets).sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, hidden, create_graph=True)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_logits_never_materialised():
    g = torch.Generator().manual_seed(1)
    n_tokens, vocab, width = 64, 401, 2
    hidden = torch.randn(4, n_tokens // 4, width, generator=g, requires_grad=True)
    weight = torch.randn(vocab, width, generator=g, requires_grad=True)
    targets = torch.randint(0, vocab, (4, n_tokens // 4), generator=g)
    mode = _LargestTensor()
    with mode:
        loss = per_sequence_lm_loss(hidden, weight, targets, chunk_tokens=3)
        loss.sum().backward()
    # one chunk of logits (3 x V) or grad_weight (V x H), never the N x V logits
    assert mode.largest <= 3 * vocab < n_tokens * vocab
    mode = _LargestTensor()
    with mode:
        F.cross_entropy(F.linear(hidden, weight).transpose(1, 2), targets, reduction="none").sum().backward()
    assert mode.largest >= n_tokens * vocab  # the test can see materialised logits


# ---------------------------------------------------------------- bad input


def test_targets_out_of_range_named():
    hidden, weight, _, targets, _ = _inputs()
    targets[1, 3] = V
    targets[2, 5] = -5
    with pytest.raises(ValueError, match=r"targets has token ids outside \[0, 53\).*\[-5, 53\].*\(1, 3\), \(2, 5\)"):
        per_token_lm_loss(hidden, weight, targets)
    with pytest.raises(ValueError, match="targets"):
        per_sequence_lm_loss(hidden, weight, targets, shift=True)


def test_checks_off_skips_the_host_reads():
    hidden, weight, _, targets, _ = _inputs()
    with torch.no_grad():
        hidden[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"hidden has NaN or infinite values at \(sequence, position\) \[\(1, 1\)\]"):
        per_token_lm_loss(hidden, weight, targets)
    with rw.checks(False):
        loss = per_token_lm_loss(hidden, weight, targets)
    assert bool(torch.isnan(loss[1, 1]))
    # out-of-range ids still fail (in the gather) rather than reading a wrong logit
    targets[0, 0] = V + 3
    with rw.checks(False), pytest.raises((RuntimeError, IndexError)):
        per_token_lm_loss(hidden.detach().nan_to_num(), weight, targets)


def test_nonfinite_weight_and_bias_named():
    hidden, weight, bias, targets, _ = _inputs()
    with torch.no_grad():
        weight[4, 0] = float("inf")
    with pytest.raises(ValueError, match=r"weight has NaN or infinite values in vocabulary rows \[4\]"):
        per_token_lm_loss(hidden, weight, targets)
    hidden, weight, bias, targets, _ = _inputs()
    with torch.no_grad():
        bias[9] = float("nan")
    with pytest.raises(ValueError, match=r"bias has NaN or infinite values at vocabulary ids \[9\]"):
        per_token_lm_loss(hidden, weight, targets, bias=bias)


@pytest.mark.parametrize("case, error, pattern", [
    (lambda h, w, y: (h[0], w, y), ValueError, "targets shape"),
    (lambda h, w, y: (h, w[:, :-1], y), ValueError, "weight has hidden size 15"),
    (lambda h, w, y: (h, w.t(), y), ValueError, "weight must be"),
    (lambda h, w, y: (h, w[None], y), ValueError, "weight must be the output embedding"),
    (lambda h, w, y: (h, w, y.float()), TypeError, "targets must be integer"),
    (lambda h, w, y: (h, w, y > 0), TypeError, "targets must be integer"),
    (lambda h, w, y: (h.long(), w, y), TypeError, "hidden must be a floating-point"),
    (lambda h, w, y: (h, w.long(), y), TypeError, "weight must be a floating-point"),
    (lambda h, w, y: (h.float(), w, y), TypeError, "hidden .* and weight .* same dtype"),
    (lambda h, w, y: (h.tolist(), w, y), TypeError, "hidden must be a torch.Tensor"),
    (lambda h, w, y: (h, w, y[:, :-1]), ValueError, "targets shape"),
    (lambda h, w, y: (h, w.to("meta"), y), ValueError, "weight is on meta"),
    (lambda h, w, y: (h[0, 0], w, y[0, 0]), ValueError, "hidden must be"),
])
def test_bad_shapes_and_dtypes(case, error, pattern):
    hidden, weight, _, targets, _ = _inputs()
    with pytest.raises(error, match=pattern):
        per_token_lm_loss(*case(hidden, weight, targets))


def test_bad_options():
    hidden, weight, _, targets, _ = _inputs()
    for chunk in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_tokens"):
            per_token_lm_loss(hidden, weight, targets, chunk_tokens=chunk)
    with pytest.raises(TypeError, match="ignore_index"):
        per_token_lm_loss(hidden, weight, targets, ignore_index=-100.0)
    with pytest.raises(ValueError, match=r"bias must be \[V\]"):
        per_token_lm_loss(hidden, weight, targets, bias=torch.zeros(V + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="mask shape"):
        per_sequence_lm_loss(hidden, weight, targets, mask=torch.ones(B, T + 1))
    with pytest.raises(ValueError, match=r"hidden must be \[B, T, H\]"):
        per_sequence_lm_loss(hidden.reshape(-1, H), weight, targets.reshape(-1))
    with pytest.raises(TypeError):
        per_token_lm_loss(hidden, weight, targets, chunk=4)  # keyword-only, no silent aliases
