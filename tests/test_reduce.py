import pytest
import torch

import reweighting as rw


def test_sequence_loss_hand_case_with_padding():
    token_loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), float("nan")]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    torch.testing.assert_close(rw.sequence_loss(token_loss, mask), torch.tensor([2.0, 4.0]))


def test_sequence_loss_without_mask_and_gradient_flows():
    token_loss = torch.tensor([[1.0, 3.0]], requires_grad=True)
    out = rw.sequence_loss(token_loss)
    out.sum().backward()
    torch.testing.assert_close(token_loss.grad, torch.tensor([[0.5, 0.5]]))


def test_sequence_loss_bad_input():
    with pytest.raises(ValueError, match=r"no real token in sequences \[1\]"):
        rw.sequence_loss(torch.ones(2, 3), torch.tensor([[1, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="does not match"):
        rw.sequence_loss(torch.ones(2, 3), torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"\[batch, tokens\]"):
        rw.sequence_loss(torch.ones(3))


def test_weighted_loss_value_and_detached_weights():
    loss = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    w = torch.tensor([0.5, 0.25, 0.25], requires_grad=True)
    out = rw.weighted_loss(loss, w)
    out.backward()
    assert float(out.detach()) == pytest.approx(1.75)
    torch.testing.assert_close(loss.grad, torch.tensor([0.5, 0.25, 0.25]))
    assert w.grad is None


def test_weighted_loss_shape_mismatch():
    with pytest.raises(ValueError, match="per_sample_loss has 3 samples but weights has 2"):
        rw.weighted_loss(torch.ones(3), torch.ones(2) / 2)


def _model_and_window(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    x = torch.randn(10, 4, generator=g)
    y = torch.randn(10, 1, generator=g)
    return model, x, y


def test_accumulate_weighted_equals_one_big_batch_even_with_dropout():
    model, x, y = _model_and_window()

    def per_sample_loss(batch):
        xb, yb = batch
        return ((model(xb) - yb) ** 2).squeeze(1)

    def weight_fn(losses):
        return rw.tilt(rw.minmax_normalize(losses), 0.4)

    torch.manual_seed(123)
    micro = [(x[:3], y[:3]), (x[3:7], y[3:7]), (x[7:], y[7:])]
    weights, losses = rw.accumulate_weighted(micro, per_sample_loss, weight_fn)
    window_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    # Reference: the same dropout masks in one batch, i.e. the same per-sample losses as the window.
    torch.manual_seed(123)
    with torch.no_grad():
        _ = [per_sample_loss(mb) for mb in micro]  # advance the RNG exactly as the scoring pass did
    torch.manual_seed(123)
    pieces = [per_sample_loss(mb) for mb in micro]
    full = torch.cat(pieces)
    torch.testing.assert_close(full.detach(), losses)
    reference_w = weight_fn(full.detach())
    torch.testing.assert_close(reference_w, weights)
    rw.weighted_loss(full, reference_w).backward()
    for got, want in zip(window_grads, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_accumulate_weighted_rejects_empty_window():
    with pytest.raises(ValueError, match="micro_batches is empty"):
        rw.accumulate_weighted([], lambda b: b, lambda v: v)


def test_score_window_states_replay_dropout_for_a_training_pass():
    model, x, y = _model_and_window()
    micro = [(x[:4], y[:4]), (x[4:], y[4:])]

    def per_sample_loss(batch):
        xb, yb = batch
        return ((model(xb) - yb) ** 2).squeeze(1)

    losses, states = rw.score_window(micro, per_sample_loss)
    assert [loss.requires_grad for loss in losses] == [False, False]
    for mb, scored, state in zip(micro, losses, states):
        rw.restore_rng_state(state)
        torch.testing.assert_close(per_sample_loss(mb).detach(), scored)
    # without the replay, dropout draws different masks
    assert not torch.allclose(per_sample_loss(micro[0]).detach(), losses[0])


def test_sequence_loss_empty_row_raises_or_is_nan_never_zero():
    token_loss = torch.tensor([[1.0, 3.0], [2.0, 2.0], [5.0, 7.0]], requires_grad=True)
    mask = torch.tensor([[1, 1], [0, 0], [1, 0]])
    with pytest.raises(ValueError, match=r"no real token in sequences \[1\].*empty='nan'"):
        rw.sequence_loss(token_loss, mask)
    for out in (rw.sequence_loss(token_loss, mask, empty="nan"), _unchecked_sequence_loss(token_loss, mask)):
        assert torch.isnan(out[1]) and out[0] == 2.0 and out[2] == 5.0
    out = rw.sequence_loss(token_loss, mask, empty="nan")
    torch.where(torch.isfinite(out), out, torch.zeros_like(out)).sum().backward()
    torch.testing.assert_close(token_loss.grad, torch.tensor([[0.5, 0.5], [0.0, 0.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="empty must be one of"):
        rw.sequence_loss(token_loss, mask, empty="zero")


def _unchecked_sequence_loss(token_loss, mask):
    with rw.checks(False):
        return rw.sequence_loss(token_loss, mask)


def test_sequence_loss_mask_must_be_binary_and_loss_float():
    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1.*sequences \[0\]"):
        rw.sequence_loss(torch.ones(2, 2), torch.tensor([[0.5, 1.0], [1.0, 1.0]]))
    with pytest.raises(TypeError, match="token_loss must be a floating-point tensor"):
        rw.sequence_loss(torch.ones(2, 2, dtype=torch.long))
    torch.testing.assert_close(rw.sequence_loss(torch.tensor([[1.0, 3.0]]), torch.tensor([[True, False]])),
                               torch.tensor([1.0]))


@pytest.mark.parametrize("bad, word", [(float("nan"), "NaN"), (float("inf"), "infinite"), (-0.1, "negative")])
def test_weighted_loss_rejects_nan_inf_and_negative_weights(bad, word):
    w = torch.tensor([0.5, bad, 0.5])
    with pytest.raises(ValueError, match=rf"weights must be finite and >= 0, but has {word} values at sample "
                                         r"indices \[1\]"):
        rw.weighted_loss(torch.ones(3), w)
    with rw.checks(False):  # the check is a host read: it obeys set_checks(False)
        rw.weighted_loss(torch.ones(3), w)
    with pytest.raises(ValueError, match="all zero"):
        rw.weighted_loss(torch.ones(3), torch.zeros(3))


def test_weighted_loss_leaves_out_zero_weight_samples_even_when_their_loss_is_nan():
    loss = torch.tensor([1.0, float("nan"), 3.0], requires_grad=True)
    out = rw.weighted_loss(loss, torch.tensor([0.5, 0.0, 0.5]))
    out.backward()
    assert float(out.detach()) == 2.0
    torch.testing.assert_close(loss.grad, torch.tensor([0.5, 0.0, 0.5]))
