import pytest
import torch

from reweighting.noisy_labels import (
    check_transition,
    estimate_transition,
    pair_transition,
    symmetric_transition,
    transition_error,
)

C = 4


def asymmetric_T():
    """Pair noise 0 -> 1 -> 2 -> 3 -> 0 at 30%: T differs clearly from its transpose."""
    return pair_transition(C, 0.3)


def exact_posteriors(T, per_class=200, anchor_share=0.2, seed=0):
    """Noisy posteriors T @ f for clean posteriors f that are mixtures, with a share of exact anchors."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.arange(C).repeat_interleave(per_class)
    f = torch.softmax(torch.randn(clean.shape[0], C, generator=g) + 2.0 * torch.nn.functional.one_hot(clean, C), 1)
    anchors = torch.rand(clean.shape[0], generator=g) < anchor_share
    f[anchors] = torch.nn.functional.one_hot(clean[anchors], C).float()
    noisy_posterior = f.double() @ T.double().t()
    noisy_labels = torch.multinomial(noisy_posterior, 1, generator=g).squeeze(1)
    return noisy_posterior.float(), noisy_labels


def test_known_matrices_have_our_layout():
    T = pair_transition(C, 0.3)
    assert T[1, 0] == pytest.approx(0.3) and T[0, 1] == 0 and T[0, 0] == pytest.approx(0.7)
    torch.testing.assert_close(T.sum(0), torch.ones(C))
    S = symmetric_transition(C, 0.6)
    torch.testing.assert_close(S.sum(0), torch.ones(C))
    assert S[0, 0] == pytest.approx(0.4) and S[1, 0] == pytest.approx(0.2)
    mapped = pair_transition(3, 0.25, mapping=[1, 1, 0])  # class 1 is never corrupted
    assert mapped[1, 1] == 1.0 and mapped[0, 2] == pytest.approx(0.25)


def test_invalid_matrices_raise_clear_errors():
    T = asymmetric_T()
    assert check_transition(T, C).dtype == torch.float32
    with pytest.raises(ValueError, match="transposed"):
        check_transition(_row_stochastic())
    with pytest.raises(ValueError, match="negative entries in columns.*\\[1\\]"):
        bad = T.clone()
        bad[0, 1], bad[1, 1] = -0.1, 1.1
        check_transition(bad)
    with pytest.raises(ValueError, match="columns \\(clean classes\\) \\[2\\] sum to"):
        bad = T.clone()
        bad[2, 2] += 0.01
        check_transition(bad)
    with pytest.raises(ValueError, match="3 classes"):
        check_transition(T, 3)
    with pytest.raises(ValueError, match="square"):
        check_transition(torch.ones(2, 3) / 2)
    with pytest.raises(ValueError, match="NaN"):
        check_transition(torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match="singular"):
        check_transition(torch.full((3, 3), 1 / 3), invertible=True)
    check_transition(T, invertible=True)
    with pytest.raises(ValueError, match="rate"):
        symmetric_transition(C, 1.0)
    with pytest.raises(ValueError, match="mapping"):
        pair_transition(3, 0.2, mapping=[0, 5, 1])


def _row_stochastic():
    # rows sum to 1, columns do not: the layout of the authors' learned estimators
    return torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.6, 0.4], [0.5, 0.0, 0.5]])


@pytest.mark.parametrize("with_labels", [True, False])
def test_anchor_estimator_recovers_a_known_asymmetric_T(with_labels):
    T = asymmetric_T()
    probs, noisy = exact_posteriors(T)
    estimate = estimate_transition(probs, noisy if with_labels else None, "anchor", quantile=0.97)
    torch.testing.assert_close(estimate, T, atol=1e-5, rtol=0)
    assert transition_error(estimate, T) < 1e-5
    assert transition_error(estimate, T.t()) > 0.5  # a transposed answer would be caught


def test_dualt_reduces_to_anchor_when_predictions_agree_with_labels():
    T = asymmetric_T()
    probs, _ = exact_posteriors(T)
    labels = probs.argmax(1)  # T_spade is then the identity
    dualt = estimate_transition(probs, labels, "dualt")
    torch.testing.assert_close(dualt, estimate_transition(probs, labels, "anchor"))
    noisy = exact_posteriors(T)[1]
    est = estimate_transition(probs, noisy, "dualt")
    torch.testing.assert_close(est.sum(0), torch.ones(C))


def test_estimator_input_errors_name_the_samples():
    probs, noisy = exact_posteriors(asymmetric_T(), per_class=5)
    bad = probs.clone()
    bad[3] = 0.5
    with pytest.raises(ValueError, match="samples \\[3\\]"):
        estimate_transition(bad, noisy)
    labels = noisy.clone()
    labels[7] = C
    with pytest.raises(ValueError, match="noisy_labels outside .* \\[7\\]"):
        estimate_transition(probs, labels)
    with pytest.raises(ValueError, match="noisy_labels has .* samples but probs has"):
        estimate_transition(probs, noisy[:-1])
    with pytest.raises(ValueError, match="no sample has noisy label 3"):
        estimate_transition(probs, torch.zeros_like(noisy) + (noisy % 3))
    with pytest.raises(ValueError, match="method"):
        estimate_transition(probs, noisy, "volmin")
    with pytest.raises(ValueError, match="dualt.*noisy_labels"):
        estimate_transition(probs, None, "dualt")


def test_cleanlab_noise_matrix_agrees_with_our_layout():
    """The peer library, given the same exact posteriors, estimates T in the same orientation."""
    count = pytest.importorskip("cleanlab.count")
    T = asymmetric_T()
    probs, noisy = exact_posteriors(T, per_class=400, anchor_share=0.5)
    _, noise_matrix, _, _ = count.estimate_py_and_noise_matrices_from_probabilities(noisy.numpy(),
                                                                                    probs.double().numpy())
    theirs = torch.tensor(noise_matrix, dtype=torch.float32)
    ours = estimate_transition(probs, noisy)
    assert transition_error(theirs, T) < 0.15
    assert transition_error(theirs, ours) < 0.15
    assert transition_error(theirs, T.t()) > 0.5
