import pytest
import torch
import torch.nn.functional as F

from reweighting import dirichlet_weights, multinomial_resample
from reweighting.noisy_labels import (
    backward_loss,
    dws_loss,
    forward_loss,
    importance_weights,
    noisy_label_loss,
    pair_transition,
    rent_loss,
    reweight_loss,
    symmetric_transition,
)

C, B = 5, 12


def batch(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(B, C, generator=g)).to(dtype).requires_grad_(True)
    labels = torch.randint(0, C, (B,), generator=g)
    return logits, labels


def T_asym():
    return 0.6 * pair_transition(C, 0.35) + 0.4 * symmetric_transition(C, 0.3)


def grad_of(fn, logits):
    logits.grad = None
    fn().backward()
    return logits.grad.clone()


def test_identity_T_gives_unit_weights_and_rw_equals_ce():
    logits, labels = batch()
    w = importance_weights(logits, labels, torch.eye(C))
    torch.testing.assert_close(w, torch.ones(B))
    assert not w.requires_grad and w.dtype == torch.float32
    ce = lambda: F.cross_entropy(logits, labels)  # noqa: E731
    rw = lambda: reweight_loss(logits, labels, torch.eye(C))  # noqa: E731
    torch.testing.assert_close(rw(), ce())
    torch.testing.assert_close(grad_of(rw, logits), grad_of(ce, logits))


def test_importance_weights_match_the_formula_in_our_layout():
    logits, labels = batch(1)
    T = T_asym()
    f = torch.softmax(logits.detach().double(), 1)
    noisy_posterior = f @ T.double().t()  # p(noisy | x) = T f
    want = f.gather(1, labels[:, None]).squeeze(1) / noisy_posterior.gather(1, labels[:, None]).squeeze(1)
    got = importance_weights(logits, labels, T)
    torch.testing.assert_close(got, want.float())
    # T is doubly stochastic, so its transpose passes validation: only the formula can tell them apart
    assert (importance_weights(logits, labels, T.t()) - got).abs().max() > 1e-2


def test_weights_stay_finite_for_confident_low_precision_logits():
    logits, labels = batch(2, torch.bfloat16)
    w = importance_weights(logits * 60, labels, T_asym())
    assert w.dtype == torch.float32 and bool(torch.isfinite(w).all())


def test_forward_loss_is_the_nll_of_T_f():
    logits, labels = batch(3)
    T = T_asym()
    want = F.nll_loss(torch.log(torch.softmax(logits, 1) @ T.t()), labels)
    torch.testing.assert_close(forward_loss(logits, labels, T), want)
    torch.testing.assert_close(forward_loss(logits, labels, torch.eye(C)), F.cross_entropy(logits, labels))
    per_sample = forward_loss(logits, labels, T, reduction="none")
    assert per_sample.shape == (B,)


def test_backward_loss_is_unbiased_for_the_clean_loss():
    logits, clean = batch(4)
    T = T_asym()
    expected = sum(T[k, clean] * backward_loss(logits, torch.full_like(clean, k), T, reduction="none")
                   for k in range(C))
    torch.testing.assert_close(expected, F.cross_entropy(logits, clean, reduction="none"), atol=1e-4, rtol=1e-4)


def test_dws_interpolates_between_reweighting_and_resampling():
    logits, labels = batch(5)
    T = T_asym()
    rw = reweight_loss(logits, labels, T)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(dws_loss(logits, labels, T, alpha=1e7, generator=g), rw, atol=1e-3, rtol=1e-3)
    ce = F.cross_entropy(logits, labels, reduction="none").detach()
    for seed in range(5):
        # one draw with a tiny concentration is (nearly) one-hot: the loss of a single sample
        value = dws_loss(logits, labels, T, alpha=1e-4, num_draws=1, generator=torch.Generator().manual_seed(seed))
        assert (ce - value.detach()).abs().min() < 1e-3


def test_dws_and_rent_equal_their_definitions_and_are_seeded():
    logits, labels = batch(6)
    T = T_asym()
    w = importance_weights(logits, labels, T)
    ce = F.cross_entropy(logits, labels, reduction="none")
    # DWS: mean over M = B draws of sum_i pi_i CE_i, with the same draws
    pi = dirichlet_weights(w, 10.0, B, generator=torch.Generator().manual_seed(1))
    want = (pi @ ce).mean()
    got = dws_loss(logits, labels, T, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, want)
    # RENT: mean CE over indices drawn with replacement, N * B = 2B of them, gradient included
    idx = multinomial_resample(w, 2 * B, generator=torch.Generator().manual_seed(2))
    ref = lambda: F.cross_entropy(logits[idx], labels[idx])  # noqa: E731
    ours = lambda: rent_loss(logits, labels, T, 2 * B, generator=torch.Generator().manual_seed(2))  # noqa: E731
    torch.testing.assert_close(ours(), ref())
    torch.testing.assert_close(grad_of(ours, logits), grad_of(ref, logits))
    assert ours() == ours()
    a = rent_loss(logits, labels, T, generator=torch.Generator().manual_seed(3))
    b = rent_loss(logits, labels, T, generator=torch.Generator().manual_seed(4))
    assert a != b


def test_invalid_inputs_raise_naming_what_is_wrong():
    logits, labels = batch(7)
    row_stochastic = torch.softmax(torch.randn(C, C, generator=torch.Generator().manual_seed(0)), 1)
    for name in ("forward", "reweight", "dws", "rent"):
        with pytest.raises(ValueError, match="columns summing to 1.*probably transposed"):
            noisy_label_loss(name, logits, labels, row_stochastic)
    with pytest.raises(ValueError, match="4 classes|shape"):
        reweight_loss(logits, labels, torch.eye(4))
    bad_labels = labels.clone()
    bad_labels[[2, 9]] = C
    with pytest.raises(ValueError, match="labels outside .*\\[2, 9\\]"):
        rent_loss(logits, bad_labels, torch.eye(C))
    nan_logits = logits.detach().clone()
    nan_logits[4, 1] = float("nan")
    with pytest.raises(ValueError, match="sample indices \\[4\\]"):
        importance_weights(nan_logits, labels, torch.eye(C))
    never = torch.eye(C)
    never[:, 3] = 0
    never[0, 3] = 1.0  # nothing is ever observed as label 3
    with pytest.raises(ValueError, match="probability 0 to the observed label"):
        importance_weights(logits, torch.full_like(labels, 3), never)
    with pytest.raises(ValueError, match="singular"):
        backward_loss(logits, labels, torch.full((C, C), 1 / C))
    with pytest.raises(ValueError, match="alpha"):
        dws_loss(logits, labels, torch.eye(C), alpha=0.0)
    with pytest.raises(ValueError, match="loss must be one of"):
        noisy_label_loss("bootstrap", logits, labels, torch.eye(C))
