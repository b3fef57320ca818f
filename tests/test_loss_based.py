"""LossReweighter against hand-computed weights, the plain mean, and its own resumed runs."""

import math

import pytest
import torch

import reweighting as rw
from reweighting.loss_based import STRATEGIES, strategy_scores

LOSSES = torch.tensor([1.0, 2.0, 3.0, 5.0])
# min-max with delta = 1: h = (2 l - 6) / 4
H = [-1.0, -0.5, 0.0, 1.0]
HAND_SCORES = {
    "linupper": [0.0, 0.5, 1.0, 1.0],  # min(h + 1, 1)
    "quadratic": [0.0, 0.75, 1.0, 0.0],  # 1 - h^2
    "extremes": [1.0, 0.5, 0.0, 1.0],  # |h|
    "inverse": [1.0, 0.5, 0.0, -1.0],  # -h
    "uniform": [0.0, 0.0, 0.0, 0.0],
}


def hand_softmax(scores, r):
    e = [math.exp(s / r) for s in scores]
    return torch.tensor([x / sum(e) for x in e])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_weights_match_hand_computed_softmax(strategy):
    r = 0.4
    w = rw.LossReweighter(strategy, temperature=r).weights(LOSSES)
    torch.testing.assert_close(w, hand_softmax(HAND_SCORES[strategy], r))
    assert w.dtype == torch.float32 and not w.requires_grad
    torch.testing.assert_close(strategy_scores(torch.tensor(H), strategy), torch.tensor(HAND_SCORES[strategy]))


def test_delta_scales_the_range():
    # delta = 2: h = [-2, -1, 0, 2]; linupper f = min(h + 2, 2) = [0, 1, 2, 2]; quadratic 1 - h^2/4.
    w = rw.LossReweighter("linupper", temperature=1.0, delta=2.0).weights(LOSSES)
    torch.testing.assert_close(w, hand_softmax([0.0, 1.0, 2.0, 2.0], 1.0))
    w = rw.LossReweighter("quadratic", temperature=1.0, delta=2.0).weights(LOSSES)
    torch.testing.assert_close(w, hand_softmax([0.0, 0.75, 1.0, 0.0], 1.0))


def test_loss_is_weighted_sum_with_gradient_through_losses_only():
    x = LOSSES.clone().requires_grad_(True)
    r = rw.LossReweighter("linupper", temperature=0.4)
    loss = r(x)
    w = hand_softmax(HAND_SCORES["linupper"], 0.4)
    torch.testing.assert_close(loss, (w * LOSSES).sum())
    loss.backward()
    torch.testing.assert_close(x.grad, w)  # weights are constants: d loss / d l_i = w_i


@pytest.mark.parametrize("strategy", ["linupper", "quadratic", "extremes"])
@pytest.mark.parametrize("temperature", [0.1, 0.4, 1.0])
def test_minmax_weight_ratio_is_bounded(strategy, temperature):
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        losses = torch.randn(64, generator=g).exp() * 3
        r = rw.LossReweighter(strategy, temperature=temperature)
        w = r.weights(losses)
        bound = math.exp(1 / temperature)
        assert float(w.max() / w.min()) <= bound * (1 + 1e-5)
        assert float(r.stats.max_min_ratio) == pytest.approx(float(w.max() / w.min()), rel=1e-6)
    # the bound is attained by linupper: a lowest-loss sample against the upper half
    w = rw.LossReweighter("linupper", temperature=temperature).weights(LOSSES)
    assert float(w.max() / w.min()) == pytest.approx(math.exp(1 / temperature), rel=1e-5)


def test_uniform_equals_plain_mean_exactly():
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(37, generator=g) * 5).requires_grad_(True)
    r = rw.LossReweighter("uniform")
    loss = r(x)
    assert torch.equal(loss, x.mean())
    loss.backward()
    torch.testing.assert_close(x.grad, torch.full((37,), 1 / 37))
    torch.testing.assert_close(r.weights(x), torch.full((37,), 1 / 37))
    assert float(r.stats.ess) == pytest.approx(37)


def test_warmup_is_uniform_then_tilted():
    r = rw.LossReweighter("linupper", temperature=0.4, warmup_steps=2)
    for _ in range(2):
        assert r.in_warmup and torch.equal(r(LOSSES), LOSSES.mean())
        r.step()
    assert not r.in_warmup
    torch.testing.assert_close(r.weights(LOSSES), hand_softmax(HAND_SCORES["linupper"], 0.4))


def test_warmup_temperature_tilts_gently():
    r = rw.LossReweighter("linupper", temperature=0.4, warmup_steps=1, warmup_temperature=100.0)
    torch.testing.assert_close(r.weights(LOSSES), hand_softmax(HAND_SCORES["linupper"], 100.0))
    r.step()
    torch.testing.assert_close(r.weights(LOSSES), hand_softmax(HAND_SCORES["linupper"], 0.4))


def test_attach_advances_with_the_optimizer():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    r = rw.LossReweighter(warmup_steps=3)
    handle = r.attach(opt)
    for _ in range(2):
        opt.step()
    assert r.num_steps == 2
    handle.remove()
    opt.step()
    assert r.num_steps == 2


def test_equal_losses_and_batch_of_one_give_uniform_weights():
    for strategy in STRATEGIES:
        r = rw.LossReweighter(strategy)
        torch.testing.assert_close(r.weights(torch.full((5,), 2.5)), torch.full((5,), 0.2))
        torch.testing.assert_close(r.weights(torch.tensor([7.0])), torch.tensor([1.0]))


@pytest.mark.parametrize("normalize", ["minmax", "quantile", "rank"])
def test_robust_normalisations_resist_one_outlier(normalize):
    # 40 ordinary losses spread over [1, 2] and one huge outlier (a corrupted sample). The 5 %
    # quantile range of fewer than ~20 samples would reach into the outlier itself.
    losses = torch.cat([torch.linspace(1, 2, 40), torch.tensor([1e4])])
    w = rw.LossReweighter("linupper", temperature=0.4, normalize=normalize).weights(losses)
    spread = float(w[:40].max() / w[:40].min())
    if normalize == "minmax":
        assert spread < 1.01  # every ordinary sample squashed to h = -1: the outlier dominates
        assert float(w[40] / w[0]) == pytest.approx(math.exp(1 / 0.4), rel=1e-4)
    else:
        assert spread > 5  # the ordinary samples keep their ordering and spread
        assert float(w[40]) <= float(w[:40].max()) * (1 + 1e-6)  # the outlier gets no more than the top


def test_sequence_loss_composes():
    g = torch.Generator().manual_seed(2)
    token_loss = torch.rand(4, 6, generator=g).requires_grad_(True)
    mask = torch.ones(4, 6)
    mask[1, 3:] = 0
    per_sample = rw.sequence_loss(token_loss, mask)
    r = rw.LossReweighter("quadratic", temperature=1.0)
    loss = r(per_sample)
    w = r.weights(per_sample)
    torch.testing.assert_close(loss, (w * per_sample).sum())
    loss.backward()
    assert torch.all(token_loss.grad[1, 3:] == 0)


def test_nonfinite_raises_with_indices_by_default():
    bad = torch.tensor([1.0, float("nan"), 2.0, float("inf"), 3.0])
    with pytest.raises(ValueError, match=r"NaN and infinite values at sample indices \[1, 3\]"):
        rw.LossReweighter()(bad)
    with pytest.raises(ValueError, match=r"indices \[1, 3\]"):
        rw.LossReweighter("uniform").weights(bad)


def test_nonfinite_zero_policy_drops_and_counts():
    bad = torch.tensor([1.0, float("nan"), 2.0, float("inf"), 5.0], requires_grad=True)
    good = torch.tensor([1.0, 2.0, 5.0])
    r = rw.LossReweighter("linupper", nonfinite="zero")
    w = r.weights(bad)
    assert w[1] == 0 and w[3] == 0
    torch.testing.assert_close(w[[0, 2, 4]], rw.LossReweighter("linupper").weights(good))
    assert float(r.stats.n_nonfinite) == 2 and float(r.stats.n_dropped) == 2 and float(r.stats.n) == 3
    loss = r(bad)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(bad.grad).all() and bad.grad[1] == 0
    u = rw.LossReweighter("uniform", nonfinite="zero")
    torch.testing.assert_close(u(bad), good.mean())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),
        ({"temperature": -1.0}, "temperature must be a finite number > 0"),
        ({"warmup_temperature": 0.0}, "warmup_temperature must be"),
        ({"strategy": "linear"}, "strategy must be one of"),
        ({"normalize": "zscore"}, "normalize must be one of"),
        ({"accumulation": "window"}, "accumulation must be one of"),
        ({"nonfinite": "drop"}, "nonfinite must be one of"),
        ({"delta": 0.0}, "delta must be"),
        ({"warmup_steps": -1}, "warmup_steps must be"),
        ({"warmup_steps": 1.5}, "warmup_steps must be"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rw.LossReweighter(**kwargs)


def test_bad_inputs_are_clear_errors():
    r = rw.LossReweighter()
    with pytest.raises(ValueError, match="empty"):
        r(torch.tensor([]))
    with pytest.raises(ValueError, match="1-d"):
        r(torch.ones(2, 3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        r([1.0, 2.0])
    with pytest.raises(ValueError, match="num_steps"):
        r.load_state_dict({"steps": 3})


def test_global_mode_refuses_a_second_call_in_one_step():
    r = rw.LossReweighter(accumulation="global")
    r(LOSSES)
    with pytest.raises(RuntimeError, match="rw.accumulate"):
        r(LOSSES)
    r.step()
    r(LOSSES)


def _model_and_window(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.3), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    g = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(10, 3, generator=g), torch.randn(10, generator=g)
    return model, x, y


def _loss_fn(model):
    return lambda b: (model(b[0]).squeeze(1) - b[1]) ** 2


def _grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("strategy", ["linupper", "uniform"])
def test_global_accumulation_over_two_micro_batches_equals_one_doubled_batch(strategy):
    model, x, y = _model_and_window()
    r = rw.LossReweighter(strategy, accumulation="global")
    torch.manual_seed(5)
    value = r.accumulate([(x[:4], y[:4]), (x[4:], y[4:])], _loss_fn(model))
    got, got_stats = _grads(model), r.stats.as_dict()

    model2, _, _ = _model_and_window()
    r2 = rw.LossReweighter(strategy)
    torch.manual_seed(5)
    # the dropout masks of one doubled batch equal those of the two micro-batches drawn in turn
    loss = r2(_loss_fn(model2)((x, y)))
    loss.backward()
    torch.testing.assert_close(got, _grads(model2), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(value, loss.detach(), atol=1e-6, rtol=1e-5)
    assert got_stats == pytest.approx(r2.stats.as_dict(), rel=1e-5)


def test_micro_accumulation_is_the_papers_per_micro_batch_weighting():
    model, x, y = _model_and_window()
    model.eval()  # no dropout: the two sides then draw no random numbers
    r = rw.LossReweighter("linupper", accumulation="micro")
    r.accumulate([(x[:4], y[:4]), (x[4:], y[4:])], _loss_fn(model))
    got = _grads(model)
    model.zero_grad()
    fn = _loss_fn(model)
    w0, w1 = (rw.LossReweighter("linupper").weights(fn(b).detach()) for b in ((x[:4], y[:4]), (x[4:], y[4:])))
    ((w0 * fn((x[:4], y[:4]))).sum() / 2 + (w1 * fn((x[4:], y[4:]))).sum() / 2).backward()
    torch.testing.assert_close(got, _grads(model))
    # and it differs from the exact window normalisation
    model.zero_grad()
    rw.LossReweighter("linupper", accumulation="global").accumulate([(x[:4], y[:4]), (x[4:], y[4:])], fn)
    assert not torch.allclose(got, _grads(model))


def _train(steps, reweighter, model, opt, data, start=0):
    for k in range(start, start + steps):
        x, y = data[k]
        loss = reweighter((model(x).squeeze(1) - y) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        reweighter.step()


def test_state_dict_round_trip_resumes_bit_identically():
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(16, 3, generator=g), torch.randn(16, generator=g)) for _ in range(8)]

    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        return model, torch.optim.Adam(model.parameters(), lr=0.05), rw.LossReweighter("linupper", warmup_steps=4)

    model, opt, r = fresh()
    _train(8, r, model, opt, data)
    straight = [p.detach().clone() for p in model.parameters()]

    model, opt, r = fresh()
    _train(3, r, model, opt, data)  # stop inside the warm-up: the counter decides what comes next
    saved = {"model": model.state_dict(), "opt": opt.state_dict(), "rw": r.state_dict()}
    model, opt, r = fresh()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    r.load_state_dict(saved["rw"])
    assert r.num_steps == 3
    _train(5, r, model, opt, data, start=3)
    for a, b in zip(straight, model.parameters()):
        assert torch.equal(a, b.detach())

    # without the counter the resumed run would redo the warm-up and diverge
    model, opt, r = fresh()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    _train(5, r, model, opt, data, start=3)
    assert not all(torch.equal(a, b.detach()) for a, b in zip(straight, model.parameters()))


def test_lazy_export_and_repr():
    assert rw.LossReweighter.__module__ == "reweighting.loss_based"
    assert "linupper" in repr(rw.LossReweighter())


def test_stats_are_those_of_the_core():
    r = rw.LossReweighter("quadratic", temperature=1.0)
    w = r.weights(LOSSES)
    assert r.stats.as_dict() == pytest.approx(rw.weight_stats(w).as_dict())


def test_finiteness_is_checked_once_per_call(monkeypatch):
    # The reweighter checks the gathered losses once (rank-agreed, since every rank sees them all):
    # the core's per-call re-checks (a host sync each) are skipped under both policies, and the
    # checks setting is restored afterwards.
    import reweighting.weights as core

    calls = []
    monkeypatch.setattr(core, "check_finite", lambda *a, **k: calls.append(a))
    for normalize in ("minmax", "quantile", "rank"):
        w = rw.LossReweighter("linupper", normalize=normalize).weights(LOSSES)
        assert torch.isfinite(w).all()
    assert calls == [] and rw.checks_enabled()
    rw.LossReweighter("linupper", nonfinite="zero").weights(LOSSES)
    assert calls == [] and rw.checks_enabled()


def test_attach_twice_or_step_while_attached_raises_and_detach_restores_manual_steps():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    r = rw.LossReweighter(warmup_steps=3)
    r.attach(opt)
    with pytest.raises(RuntimeError, match="already attached"):
        r.attach(opt)
    with pytest.raises(RuntimeError, match="already attached"):
        r.attach(torch.optim.SGD([p], lr=0.1))
    opt.step()
    with pytest.raises(RuntimeError, match=r"rw.step\(\) was called while rw.attach"):
        r.step()
    assert r.num_steps == 1  # one optimizer step, one count: warm-up ends on time
    r.detach()
    opt.step()
    r.step()
    assert r.num_steps == 2
    handle = r.attach(opt)  # attaching again after detach is fine
    opt.step()
    handle.remove()
    r.step()
    assert r.num_steps == 4
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        r.attach(object())


def _grads(model):
    return torch.cat([q.grad.reshape(-1) for q in model.parameters()])


def test_nonfinite_zero_gradient_equals_the_batch_without_the_sample():
    # A sequence with no labelled token gives a NaN per-sample loss (sequence_loss(empty="nan"));
    # under nonfinite="zero" it is left out of the weights, of the loss value and of the gradient:
    # the parameters' gradient is finite and equals that of the batch without it.
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x = torch.randn(4, 5, 3)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[2] = False
    r = rw.LossReweighter("linupper", nonfinite="zero")
    loss = r(rw.sequence_loss(model(x).squeeze(-1) ** 2, mask, empty="nan"))
    loss.backward()
    got = _grads(model)
    assert torch.isfinite(got).all() and float(r.stats.n_nonfinite) == 1
    model.zero_grad()
    keep = [0, 1, 3]
    want_loss = rw.LossReweighter("linupper")(rw.sequence_loss(model(x[keep]).squeeze(-1) ** 2))
    want_loss.backward()
    torch.testing.assert_close(got, _grads(model))
    torch.testing.assert_close(loss, want_loss)


def test_nan_upstream_of_the_loss_needs_masking_at_the_source():
    # The where-gradient trap: a NaN target makes d loss_i / d prediction_i NaN, and autograd forms
    # 0 * NaN = NaN however the loss is masked afterwards. The documented remedy: replace the bad
    # target by a finite placeholder before the loss and exclude the sample with mask=.
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(5, 3), torch.randn(5)
    y[1] = float("nan")
    r = rw.LossReweighter("linupper", nonfinite="zero")
    r((model(x).squeeze(1) - y) ** 2).backward()
    assert torch.isnan(_grads(model)).any()  # what masking the loss alone cannot prevent
    model.zero_grad()
    ok = torch.isfinite(y)
    r((model(x).squeeze(1) - torch.where(ok, y, torch.zeros_like(y))) ** 2, mask=ok).backward()
    got = _grads(model)
    model.zero_grad()
    keep = [0, 2, 3, 4]
    rw.LossReweighter("linupper")((model(x[keep]).squeeze(1) - y[keep]) ** 2).backward()
    torch.testing.assert_close(got, _grads(model))


def test_mask_excludes_samples_from_weights_loss_and_stats():
    losses = torch.tensor([1.0, float("nan"), 2.0, 7.0, 5.0], requires_grad=True)
    keep = torch.tensor([True, False, True, False, True])
    r = rw.LossReweighter("linupper")
    w = r.weights(losses, mask=keep)
    assert w[1] == 0 and w[3] == 0
    torch.testing.assert_close(w[keep], rw.LossReweighter("linupper").weights(losses[keep].detach()))
    assert float(r.stats.n_masked) == 2 and float(r.stats.n_dropped) == 2 and float(r.stats.n) == 3
    assert float(r.stats.n_nonfinite) == 0  # the NaN is masked: not counted as a non-finite loss
    loss = r(losses, mask=keep)
    loss.backward()
    assert torch.isfinite(losses.grad).all() and losses.grad[1] == 0 and losses.grad[3] == 0
    u = rw.LossReweighter("uniform")
    torch.testing.assert_close(u(losses, mask=keep), losses[keep].detach().mean())
    with pytest.raises(ValueError, match="no sample of per_sample_loss is left.* 3 excluded by mask, 0 non-finite"):
        r.weights(torch.ones(3), mask=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"NaN values at sample indices \[1\]"):
        r.weights(losses, mask=torch.ones(5, dtype=torch.bool))


@pytest.mark.parametrize("normalize", ["minmax", "quantile", "rank"])
@pytest.mark.parametrize("strategy", ["linupper", "quadratic", "extremes", "inverse"])
def test_reweighter_weights_are_the_core_composition(normalize, strategy):
    # The reweighter writes min-max and the softmax out for speed: they must stay the core's
    # normalize -> strategy_scores -> tilt, with and without excluded samples.
    keep = torch.tensor([True, True, False, True, True, False, True])
    # losses may be negative (e.g. a log-density): an excluded sample must not set either end
    for losses in (torch.tensor([0.3, 2.0, 1.1, 7.5, 0.9, 4.2, 3.3]),
                   torch.tensor([-3.0, -1.0, 9.0, -2.5, -1.7, -9.0, -2.2])):
        for mask in (None, keep):
            want = rw.tilt(strategy_scores(rw.normalize(losses, normalize, 0.7, mask=mask), strategy, 0.7), 0.3,
                           mask=mask)
            got = rw.LossReweighter(strategy, temperature=0.3, delta=0.7, normalize=normalize).weights(
                losses, mask=mask)
            torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-6)
