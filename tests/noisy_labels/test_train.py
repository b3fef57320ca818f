import pytest
import torch

from reweighting.noisy_labels import check_transition, symmetric_noise, train_with_transition

C = 3


def blobs(seed=0, n=300):
    g = torch.Generator().manual_seed(seed)
    clean = torch.arange(C).repeat_interleave(n // C)
    centres = 3 * torch.stack([torch.cos(clean * 2.1), torch.sin(clean * 2.1)], 1)
    x = torch.randn(clean.shape[0], 2, generator=g) * 0.6 + centres
    noisy, T = symmetric_noise(clean, 0.3, C, generator=g)
    return x, clean, noisy, T


def loader(x, y, seed):
    g = torch.Generator().manual_seed(seed)

    class Loader:
        def __iter__(self):
            order = torch.randperm(x.shape[0], generator=g)
            for start in range(0, x.shape[0], 50):
                idx = order[start : start + 50]
                yield x[idx], y[idx]

    return Loader()


def run(transition, loss="rent", seed=0):
    x, clean, noisy, T = blobs()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, C))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    evaluate = lambda m: {"clean_accuracy": float((m(x).argmax(1) == clean).float().mean())}  # noqa: E731
    result = train_with_transition(model, loader(x, noisy, seed), opt, loss=loss,
                                   transition=T if transition == "true" else transition, warmup_epochs=3, epochs=3,
                                   generator=torch.Generator().manual_seed(seed), evaluate=evaluate,
                                   show_progress=False)
    return result, T


@pytest.mark.parametrize("transition,loss", [("anchor", "rent"), ("dualt", "dws"), ("learned", "rent"),
                                             ("true", "reweight")])
def test_warmup_estimate_continue(transition, loss):
    result, T = run(transition, loss)
    check_transition(result.transition, C)
    assert [row["phase"] for row in result.history] == ["warm-up"] * 3 + ["train"] * 3
    assert result.history[-1]["clean_accuracy"] > 0.8
    assert (result.learned is not None) == (transition == "learned")
    if transition == "true":
        torch.testing.assert_close(result.transition, T)


def test_seeded_runs_are_reproducible():
    a, _ = run("anchor", "rent", seed=3)
    b, _ = run("anchor", "rent", seed=3)
    assert a.history == b.history
    torch.testing.assert_close(a.transition, b.transition)


def test_bad_transition_argument():
    with pytest.raises(ValueError, match="transition must be"):
        run("cleanlab")
