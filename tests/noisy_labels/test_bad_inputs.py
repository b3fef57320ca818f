"""Sweep of plausible bad inputs to the noisy-label API: a clear error naming the argument, or the right answer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reweighting.noisy_labels import (
    LearnedTransition,
    backward_loss,
    corrupt_labels,
    dws_loss,
    estimate_transition,
    forward_loss,
    importance_weights,
    noisy_label_loss,
    pair_transition,
    predict_probs,
    rent_loss,
    reweight_loss,
    symmetric_transition,
    train_epochs,
    train_with_transition,
)

C, B = 4, 10


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(B, C, generator=g), torch.randint(0, C, (B,), generator=g)


def _probs():
    logits, labels = _batch()
    return torch.softmax(logits, 1), labels


T = symmetric_transition(C, 0.3)
GEN = {"generator": None}


# ------------------------------------------------------------------ losses: one case per bad input
LOSS_CASES = {
    # probabilities passed where logits are expected: a silent wrong objective otherwise
    "rent on probabilities": (lambda: rent_loss(*_probs(), T), ValueError, "logits look like probabilities"),
    "dws on probabilities": (lambda: dws_loss(*_probs(), T), ValueError, "logits look like probabilities"),
    "reweight on probabilities": (lambda: reweight_loss(*_probs(), T), ValueError, "logits look like probabilities"),
    "forward on probabilities": (lambda: forward_loss(*_probs(), T), ValueError, "logits look like probabilities"),
    "backward on probabilities": (lambda: backward_loss(*_probs(), T), ValueError, "logits look like probabilities"),
    "weights on probabilities": (lambda: importance_weights(*_probs(), T), ValueError, "logits look like prob"),
    "ce on probabilities": (lambda: noisy_label_loss("ce", *_probs(), None), ValueError, "logits look like prob"),
    # unknown options are rejected, naming them and the valid ones
    "dws typo option": (lambda: noisy_label_loss("dws", *_batch(), T, alhpa=3.0), TypeError, r"\['alhpa'\].*'alpha'"),
    "forward given alpha": (lambda: noisy_label_loss("forward", *_batch(), T, alpha=3.0), TypeError,
                            r"'forward' does not take .*\['alpha'\]"),
    "rent given num_draws": (lambda: noisy_label_loss("rent", *_batch(), T, num_draws=3), TypeError,
                             r"\['num_draws'\].*'num_samples'"),
    "unknown loss name": (lambda: noisy_label_loss("rnet", *_batch(), T), ValueError, "loss must be one of"),
    "no T for rent": (lambda: noisy_label_loss("rent", *_batch(), None), ValueError, "needs a transition matrix T"),
    # types and shapes
    "float labels": (lambda: rent_loss(_batch()[0], _batch()[1].float() + 0.7, T), TypeError, "labels must be integer"),
    "bool labels": (lambda: forward_loss(_batch()[0], _batch()[1] > 1, T), TypeError, "labels must be integer"),
    "integer logits": (lambda: dws_loss(_batch()[0].long(), _batch()[1], T), TypeError, "logits must be a floating"),
    "list logits": (lambda: reweight_loss(_batch()[0].tolist(), _batch()[1], T), TypeError, "logits must be a torch"),
    "1-d logits": (lambda: rent_loss(_batch()[0][:, 0], _batch()[1], T), ValueError, r"logits must be \[batch, cl"),
    "labels too short": (lambda: rent_loss(_batch()[0], _batch()[1][:-1], T), ValueError, r"labels must be \[batch\]"),
    "label out of range": (lambda: rent_loss(_batch()[0], torch.full((B,), C), T), ValueError,
                           r"labels outside \[0, 4\)"),
    "ce label out of range": (lambda: noisy_label_loss("ce", _batch()[0], torch.full((B,), -1), None), ValueError,
                              r"labels outside \[0, 4\)"),
    "NaN logits": (lambda: rent_loss(_batch()[0].index_fill(0, torch.tensor([3]), float("nan")), _batch()[1], T),
                   ValueError, r"logits have NaN .* \[3\]"),
    "T wrong size": (lambda: rent_loss(*_batch(), symmetric_transition(C + 1, 0.3)), ValueError, "T has shape"),
    "T transposed": (lambda: rent_loss(*_batch(), pair_transition(C, 0.3).t() * torch.tensor([1, 1, 1, 0.5])),
                     ValueError, "T must have columns summing to 1"),
    "T a list": (lambda: rent_loss(*_batch(), T.tolist()), TypeError, "T must be a torch.Tensor"),
    "T singular for backward": (lambda: backward_loss(*_batch(), torch.full((C, C), 1 / C)), ValueError,
                                "T is singular"),
    "one class": (lambda: rent_loss(torch.zeros(B, 1), torch.zeros(B, dtype=torch.long), torch.ones(1, 1)),
                  ValueError, "at least 2 classes"),
    # options of the individual losses
    "dws alpha 0": (lambda: dws_loss(*_batch(), T, alpha=0.0), ValueError, "alpha must be a finite number > 0"),
    "dws num_draws 0": (lambda: dws_loss(*_batch(), T, num_draws=0), ValueError, "num_draws must be an integer >= 1"),
    "rent num_samples 0": (lambda: rent_loss(*_batch(), T, num_samples=0), ValueError, "num_samples must be"),
    "rent num_samples 2.5": (lambda: rent_loss(*_batch(), T, num_samples=2.5), ValueError, "num_samples must be"),
    "reduction typo": (lambda: forward_loss(*_batch(), T, reduction="avg"), ValueError, "reduction must be"),
    # noise, transition matrices, estimators
    "corrupt float labels": (lambda: corrupt_labels(torch.tensor([0.0, 1.9]), T), TypeError, "labels must be integer"),
    "corrupt label out of range": (lambda: corrupt_labels(torch.tensor([0, 9]), T), ValueError, "labels outside"),
    "symmetric 2.5 classes": (lambda: symmetric_transition(2.5, 0.1), ValueError, "num_classes must be a whole"),
    "symmetric rate NaN": (lambda: symmetric_transition(4, float("nan")), ValueError, r"rate must be in \[0, 1\)"),
    "symmetric rate string": (lambda: symmetric_transition(4, "0.2"), TypeError, "rate must be a number"),
    "pair mapping out of range": (lambda: pair_transition(3, 0.2, [1, 2, 3]), ValueError, "mapping must give"),
    "estimate on logits": (lambda: estimate_transition(_batch()[0], _batch()[1]), ValueError,
                           "probs rows must be probability vectors"),
    "estimate quantile NaN": (lambda: estimate_transition(*_probs(), quantile=float("nan")), ValueError,
                              "quantile must be"),
    "estimate method typo": (lambda: estimate_transition(*_probs(), method="anchors"), ValueError,
                             "method must be one of"),
    "estimate float labels": (lambda: estimate_transition(_probs()[0], _probs()[1].float()), TypeError,
                              "noisy_labels must be integer"),
    "learned one class": (lambda: LearnedTransition(1), ValueError, "num_classes must be >= 2"),
}


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_loss_bad_input(case):
    fn, error, pattern = LOSS_CASES[case]
    with pytest.raises(error, match=pattern):
        fn()


def test_probability_check_opt_out_and_log_probabilities():
    probs, labels = _probs()
    # rows that are probabilities can be accepted deliberately, and give the loss of those numbers as logits
    got = forward_loss(probs, labels, T, probability_check=False)
    want = -torch.log(torch.softmax(probs, 1) @ T.t()).gather(1, labels[:, None]).mean()
    torch.testing.assert_close(got, want)
    assert torch.isfinite(noisy_label_loss("rent", probs, labels, T, probability_check=False))
    # log-probabilities are valid logits (same softmax), so they pass and equal the logits' answer
    logits, labels = _batch()
    torch.testing.assert_close(forward_loss(torch.log_softmax(logits, 1), labels, T), forward_loss(logits, labels, T))


def _overflowing_case():
    """A valid T with T[0, 0] = 0, and a model sure of class 0 observed as 0: w_0 ~ e^120 > float32 max."""
    T = torch.tensor([[0.0, 0.5], [1.0, 0.5]])
    logits = torch.tensor([[60.0, -60.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 2.0]], requires_grad=True)
    labels = torch.tensor([0, 1, 1, 0])
    return logits, labels, T


def test_weight_overflow_is_consistent_and_correct():
    logits, labels, T = _overflowing_case()
    with pytest.raises(ValueError, match=r"importance weights overflow float32 at sample indices \[0\]"):
        importance_weights(logits, labels, T)
    # the losses normalise in log space: mu is a softmax of log w (computed here in float64)
    log_f = torch.log_softmax(logits.detach().double(), 1)
    Td = T.double()
    log_w = log_f.gather(1, labels[:, None]).squeeze(1) - torch.log((log_f.exp() @ Td.t()).gather(1, labels[:, None])
                                                                       .squeeze(1).clamp(min=1e-300))
    mu = torch.softmax(log_w, 0)
    ce = F.cross_entropy(logits.double(), labels, reduction="none")
    value = reweight_loss(logits, labels, T)
    assert torch.isfinite(value)
    torch.testing.assert_close(value.double(), (mu * ce).sum(), rtol=1e-5, atol=1e-6)
    value.backward()
    assert bool(torch.isfinite(logits.grad).all())
    g = torch.Generator().manual_seed(0)
    assert torch.isfinite(dws_loss(logits, labels, T, generator=g))
    assert torch.isfinite(rent_loss(logits, labels, T, generator=g))


# ------------------------------------------------------------------ the training loop

def _model(outputs=C):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, outputs))


def _loader(n_batches=3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, generator=g), torch.randint(0, C, (6,), generator=g)) for _ in range(n_batches)]


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _train(loader=None, model=None, **kw):
    model = model if model is not None else _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw.setdefault("warmup_epochs", 1)
    kw.setdefault("epochs", 1)
    return train_with_transition(model, _loader() if loader is None else loader, opt, show_progress=False, **kw)


TRAIN_CASES = {
    "dict batches": (lambda: _train([{"x": x, "y": y} for x, y in _loader()], transition=T), TypeError,
                     r"loader gave a dict batch \(keys \['x', 'y'\]\)"),
    "generator loader": (lambda: _train((b for b in _loader()), transition=T), TypeError,
                         "loader is a one-shot iterator"),
    "iterator loader": (lambda: _train(iter(_loader()), transition=T), TypeError, "loader is a one-shot iterator"),
    "triples": (lambda: _train([(x, y, y) for x, y in _loader()], transition=T), TypeError,
                "loader batches must be .* pairs, got a tuple of length 3"),
    "empty loader": (lambda: _train([], transition=T), ValueError, "loader gave no batches"),
    "model too few outputs, given T": (lambda: _train(model=_model(C - 1), transition=T), ValueError,
                                       r"model returns 3 classes per sample but the transition matrix is 4x4"),
    "model too few outputs, estimated T": (lambda: _train(model=_model(2), transition="anchor"), ValueError,
                                           r"labels outside \[0, 2\)"),
    "T wrong layout": (lambda: _train(transition=torch.full((C, C), 0.5)), ValueError, "columns summing to 1"),
    "unknown transition": (lambda: _train(transition="anchr"), ValueError, "transition must be a matrix"),
    "unknown loss": (lambda: _train(loss="rnt", transition=T), ValueError, "loss must be one of"),
    "bad loss option": (lambda: _train(loss="rent", transition=T, loss_options={"alpha": 1.0}), TypeError,
                        r"loss_options \['alpha'\] are not options of loss 'rent'"),
    "negative epochs": (lambda: _train(transition=T, epochs=-1), ValueError, "epochs must be an integer >= 0"),
    "fractional warmup": (lambda: _train(transition=T, warmup_epochs=1.5), ValueError, "warmup_epochs must be a whole"),
    "quantile 97": (lambda: _train(transition="anchor", quantile=97), ValueError, "quantile must be in"),
    "model not a module": (lambda: train_epochs(lambda x: x, _loader(), None, 1), TypeError,
                           "model must be a torch.nn.Module"),
    "predict on a generator": (lambda: predict_probs(_model(), (b for b in _loader())), TypeError,
                               "loader is a one-shot iterator"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_training_bad_input(case):
    fn, error, pattern = TRAIN_CASES[case]
    with pytest.raises(error, match=pattern):
        fn()


def test_wrong_size_T_is_reported_before_any_training():
    model = _model(C - 1)
    before = _params(model)
    with pytest.raises(ValueError, match="transition matrix is 4x4"):
        _train(model=model, transition=T, warmup_epochs=5)
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)  # no optimizer step was taken


def test_counts():
    """The sweep's size, for the closing note: every case above is a clear error or a checked correct result."""
    assert len(LOSS_CASES) + len(TRAIN_CASES) >= 50
