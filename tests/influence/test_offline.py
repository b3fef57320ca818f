"""Offline scoring of a data set and PRESENCE-Sequential filtering."""

import pytest
import torch

from reweighting.influence import drop_highest, load_scores, per_sample_sq_norms, score_dataset

from . import models as M


@pytest.mark.parametrize("suffix", [".pt", ".npy"])
def test_scores_match_the_reference_in_dataset_order_and_are_written(tmp_path, suffix):
    model = M.SeqModel()
    tokens, mask = M.seq_batch(b=5)
    dataset = torch.utils.data.TensorDataset(tokens, mask)
    path = tmp_path / f"scores{suffix}"
    scores = score_dataset(model, dataset, M.seq_loss, batch_size=2, broadcast=["pos"], out=path, progress=False)
    want = per_sample_sq_norms(model, M.seq_loss, tokens, mask)
    torch.testing.assert_close(scores, want, rtol=1e-4, atol=0)
    torch.testing.assert_close(load_scores(path), scores)
    assert model.training  # the mode is restored


def test_drop_highest_drops_the_top_fraction_deterministically():
    scores = torch.tensor([0.5, 3.0, 1.0, 3.0, 0.1])
    assert drop_highest(scores, 0.4).tolist() == [0, 2, 4]
    assert drop_highest(scores, 0.2).tolist() == [0, 1, 2, 4]  # tie: the later sample goes first
    assert drop_highest(scores, 0.0).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="fraction"):
        drop_highest(scores, 1.0)
    with pytest.raises(ValueError, match=r"scores has NaN values at sample indices \[1\]"):
        drop_highest(torch.tensor([1.0, float("nan")]), 0.5)
