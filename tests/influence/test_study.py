"""Smoke test of the ``presence`` study: the real code path at a tiny configuration."""

import json
import math

import torch

from reweighting.studies import StudyContext, get_study
from reweighting.studies import presence as P


def test_corruptions_keep_the_bytes_and_the_length():
    row = b"    def foo(self, x):\n        return x + 1  # a comment"
    g = torch.Generator().manual_seed(0)
    for corrupt in P.CORRUPTIONS.values():
        out = corrupt(row, g)
        assert sorted(out) == sorted(row) and out != row
    assert P.permute_words(row, g).count(b"\n        ") == 1  # whitespace stays in place


def test_auroc_matches_hand_computed_values():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
    positive = torch.tensor([False, False, True, True])
    assert P.auroc(scores, positive) == 0.75
    assert P.auroc(torch.ones(4), positive) == 0.5


def test_study_runs_end_to_end_at_smoke_size(tmp_path):
    assert get_study("presence").name == "presence"
    ctx = StudyContext(quick=True, seeds=[0], out_dir=tmp_path, device=torch.device("cpu"), show_progress=False)
    outcome = P.run_with(ctx, P.SMOKE)
    assert set(outcome.methods) == set(P.METHODS)
    assert all(math.isfinite(v) and v > 0 for vs in outcome.methods.values() for v in vs)
    aurocs = outcome.details["auroc"]
    assert len(aurocs) == 1 and 0.0 <= aurocs[0] <= 1.0
    heldout = {m: v[0] for m, v in outcome.methods.items()}
    want = (aurocs[0] > 0.5 + P.SMOKE.auroc_margin and heldout["presence"] < heldout["uniform"]
            and heldout["presence"] < heldout["direct"])
    assert outcome.holds == want
    # Before its switch PRESENCE is the direct method: same initialisation, batches and weights.
    share = outcome.details["corrupted_weight_share"]
    assert share["presence"][0]["first"] == share["direct"][0]["first"]
    assert len(outcome.plots) == 2 and all((tmp_path / name).exists() for name in outcome.plots)
    json.dumps(outcome.details)
