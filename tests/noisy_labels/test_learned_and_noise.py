import pytest
import torch

from reweighting.noisy_labels import (
    LearnedTransition,
    check_transition,
    corrupt_labels,
    pair_noise,
    pair_transition,
    symmetric_noise,
    transition_error,
)

C = 4


def test_learned_transition_starts_near_identity_in_our_layout():
    module = LearnedTransition(C)
    T = module.matrix()
    check_transition(T, C)
    assert bool((T.diagonal() > 0.7).all())
    assert module.penalty().requires_grad


def test_learned_transition_learns_an_asymmetric_T_not_its_transpose():
    """Exact clean posteriors (one-hot) and labels corrupted by a known pair T: the forward loss
    is minimised by the true T in our layout; the authors' code would return the transpose."""
    T = pair_transition(C, 0.3)
    clean = torch.arange(C).repeat_interleave(300)
    noisy = corrupt_labels(clean, T, generator=torch.Generator().manual_seed(0))
    logits = 30.0 * torch.nn.functional.one_hot(clean, C).float()
    module = LearnedTransition(C)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.2)
    for _ in range(120):
        optimizer.zero_grad()
        module.loss(logits, noisy, penalty_weight=1e-4).backward()
        optimizer.step()
    learned = module.matrix()
    check_transition(learned, C)
    assert transition_error(learned, T) < 0.08
    assert transition_error(learned, T.t()) > 0.5
    copy = LearnedTransition(C)
    copy.load_state_dict(module.state_dict())
    torch.testing.assert_close(copy.matrix(), learned)


def test_noise_is_seeded_and_follows_T():
    clean = torch.arange(C).repeat_interleave(5000)
    a, T = pair_noise(clean, 0.4, C, generator=torch.Generator().manual_seed(1))
    b, _ = pair_noise(clean, 0.4, C, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    counts = torch.zeros(C, C)
    counts.index_put_((a, clean), torch.ones(clean.shape[0]), accumulate=True)
    torch.testing.assert_close(counts / counts.sum(0, keepdim=True), T, atol=0.02, rtol=0)
    s, S = symmetric_noise(clean, 0.5, C, generator=torch.Generator().manual_seed(2))
    assert abs(float((s != clean).float().mean()) - 0.5) < 0.02 and S[0, 1] == pytest.approx(0.5 / 3)
    with pytest.raises(ValueError, match="labels outside .*\\[1\\]"):
        corrupt_labels(torch.tensor([0, 7]), T)
