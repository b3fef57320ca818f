import pytest
import torch

from reweighting.noisy_labels import cleanlab_estimate as ce
from reweighting.noisy_labels import corrupt_labels, pair_transition, transition_error

pytest.importorskip("cleanlab")


def _synthetic(T: torch.Tensor, n: int = 6000, seed: int = 0):
    """Noisy labels drawn through ``T`` and posteriors close to the true noisy posteriors ``T[:, clean]``."""
    g = torch.Generator().manual_seed(seed)
    c = T.shape[0]
    clean = torch.randint(c, (n,), generator=g)
    noisy = corrupt_labels(clean, T, generator=g)
    jitter = torch.distributions.Dirichlet(torch.ones(c)).sample((n,))
    probs = 0.9 * T[:, clean].T + 0.1 * jitter
    return probs, noisy, clean


def test_recovers_an_asymmetric_transition_in_our_layout():
    T = pair_transition(5, 0.3)  # asymmetric: T and T.T differ, so a transposed estimate is caught
    probs, noisy, clean = _synthetic(T)
    est = ce.cleanlab_transition(probs, noisy)
    assert est.shape == (5, 5) and torch.allclose(est.sum(0), torch.ones(5), atol=1e-5)
    # the empirical T of this draw: count(noisy = i, clean = j) / count(clean = j)
    counts = torch.zeros(5, 5)
    counts.index_put_((noisy, clean), torch.ones(len(noisy)), accumulate=True)
    empirical = counts / counts.sum(0, keepdim=True)
    assert transition_error(est, empirical) < 0.08
    # read the other way round the estimate would be far off (sum|T_hat - T| / sum|T|)
    assert float((est.T - empirical).abs().sum() / empirical.abs().sum()) > 0.3


def test_clear_errors():
    T = pair_transition(3, 0.2)
    probs, noisy, _ = _synthetic(T, n=300)
    with pytest.raises(ValueError, match="one label per row"):
        ce.cleanlab_transition(probs, noisy[:-1])
    with pytest.raises(ValueError, match="integer class indices"):
        ce.cleanlab_transition(probs, noisy.float())
    with pytest.raises(ValueError, match="lie in 0..2"):
        ce.cleanlab_transition(probs, noisy + 1)
    with pytest.raises(ValueError, match="never occur"):
        ce.cleanlab_transition(probs, torch.zeros_like(noisy))
    bad = probs.clone()
    bad[7] = 2.0
    with pytest.raises(ValueError, match="row 7"):
        ce.cleanlab_transition(bad, noisy)


def test_missing_cleanlab_is_a_clear_import_error(monkeypatch):
    monkeypatch.setattr(ce, "cleanlab_available", lambda: False)
    with pytest.raises(ImportError, match="pip install 'cleanlab"):
        ce.cleanlab_transition(torch.full((4, 2), 0.5), torch.tensor([0, 1, 0, 1]))
