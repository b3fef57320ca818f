"""Smoke test of the ``presence`` study: the real code path at a tiny configuration."""

import json
import math

import pytest
import torch

from reweighting.studies import StudyContext, get_study
from reweighting.studies import presence as P


def test_corruptions_keep_the_length_and_permutations_the_bytes():
    row = b"    def foo(self, x):\n        return x + 1  # a comment"
    donor = b"import os, sys\nfrom pathlib import Path  # another window...."
    g = torch.Generator().manual_seed(0)
    for name, corrupt in P.CORRUPTIONS.items():
        out = corrupt(row, g)
        assert len(out) == len(row) and out != row
        if name != "random-bytes":
            assert sorted(out) == sorted(row)
    half = len(row) // 2
    assert P.shuffled_continuation(row, g, donor) == row[:half] + donor[half:]
    near = P.near_duplicate(row, g, donor)
    assert len(near) == len(donor) and sum(a != b for a, b in zip(near, donor)) <= 2
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
    assert set(P.METHODS) <= set(outcome.methods)
    assert all(math.isfinite(v) and v > 0 for vs in outcome.methods.values() for v in vs)
    aurocs = outcome.details["auroc"]
    assert len(aurocs) == 1 and 0.0 <= aurocs[0] <= 1.0
    table = outcome.details["assumption_auroc"]
    assert set(table) == set(P.ASSUMPTION_CORRUPTIONS)
    assert all(0.0 <= a <= 1.0 for row in table.values() for a in row.values())
    heldout = {m: outcome.methods[m][0] for m in P.METHODS}
    own = {p.name: p for p in outcome.parts if p.name.startswith("tokens, K = first-block:")}
    assert own["tokens, K = first-block: presence < uniform"].margin == pytest.approx(
        heldout["uniform"] - heldout["presence"])
    # six steps learn nothing beyond byte frequencies: the baseline is unhealthy, the verdict inconclusive
    assert not outcome.baseline.healthy and outcome.holds is False
    # Before its switch PRESENCE is the direct method: same initialisation, batches and weights.
    share = outcome.details["corrupted_weight_share"]
    assert share["presence"][0]["first"] == share["direct"][0]["first"]
    assert len(outcome.plots) == 2 and all((tmp_path / name).exists() for name in outcome.plots)
    json.dumps(outcome.details)


def test_self_influence_loop_matches_the_library_per_window():
    """The AUROC table's autograd loop and the library's SelfInfluence agree on K = first block."""
    from reweighting.influence import score_dataset
    from reweighting.studies.lm import GPTConfig, TinyGPT

    cfg = P.SMOKE
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(context=cfg.seq_len, dim=cfg.dim, layers=cfg.layers, heads=cfg.heads))
    rows = P.load_data(cfg).pool[:6]
    ours = P.self_influence_loop(model, rows, "first-block")
    lib = score_dataset(model, rows, lambda m, r: P.sequence_losses(m, r), batch_size=3,
                        modules=P.scope_modules(model, cfg), broadcast=["pos"], progress=False)
    assert torch.allclose(ours, lib, rtol=1e-4)
    # a unit's score is the squared norm of the unit's mean gradient, not the mean of the squares
    units = P.self_influence_loop(model, rows, "first-block", unit=2)
    assert units.shape == (3,) and not torch.allclose(units, (ours[0::2] + ours[1::2]) / 4)


def test_health_check_on_a_broken_and_a_healthy_model():
    from reweighting.studies.lm import GPTConfig, TinyGPT

    cfg = P.SMOKE
    data = P.load_data(cfg)
    bar = P.unigram_entropy(data.heldout)
    torch.manual_seed(0)
    untrained = TinyGPT(GPTConfig(context=cfg.seq_len, dim=cfg.dim, layers=cfg.layers, heads=cfg.heads))
    assert not P.baseline_health([P.evaluate(untrained, data.heldout, torch.device("cpu"))], bar).healthy
    # a byte-bigram model (fitted on the clean windows, lightly smoothed) knows one byte of context
    clean = torch.cat([data.pool[~data.corrupted], data.heldout])
    counts = torch.full((256, 256), 0.01)
    counts.index_put_((clean[:, :-1].flatten(), clean[:, 1:].flatten()), torch.ones(clean[:, 1:].numel()),
                      accumulate=True)
    log_p = (counts / counts.sum(1, keepdim=True)).log()
    bigram = float(-log_p[data.heldout[:, :-1], data.heldout[:, 1:]].mean())
    assert P.baseline_health([bigram], bar).healthy


def test_micro_batch_setting_scores_units(tmp_path):
    from dataclasses import replace

    ctx = StudyContext(quick=True, seeds=[0], out_dir=tmp_path, device=torch.device("cpu"), show_progress=False)
    cfg = replace(P.SMOKE, microbatches=2, steps=3)  # 2 units of 4 windows per batch
    run = P._compare_methods(ctx, cfg, "units")
    # the AUROC is over units of 4 windows of one kind, as in the assumption table
    n_bad = int(P.load_data(cfg).corrupted[: cfg.scored_sequences].sum())
    assert len(run["si_bad"][0]) == len(run["si_clean"][0]) == min(n_bad, cfg.scored_sequences - n_bad) // 4
    assert 0.0 <= run["aurocs"][0] <= 1.0


def test_uniform_runs_are_shared_only_where_nothing_they_depend_on_differs():
    from dataclasses import replace

    cfg, device = P.SMOKE, torch.device("cpu")
    data = P.load_data(cfg)
    cache: dict = {}
    first = P.train_uniform_cached(data, cfg, 0, device, None, cache)
    # K and micro-batch units change how self-influence is computed, never a uniform run
    again = P.train_uniform_cached(data, replace(cfg, scope="all", microbatches=2), 0, device, None, cache)
    assert again["model"] is first["model"] and len(cache) == 1
    fresh = P.train(data, cfg, "uniform", 0, device)
    assert again["heldout"] == fresh["heldout"]
    # another seed, corruption or step count is another run
    P.train_uniform_cached(data, cfg, 1, device, None, cache)
    P.train_uniform_cached(data, replace(cfg, steps=cfg.steps + 1), 0, device, None, cache)
    P.train_uniform_cached(P.load_data(replace(cfg, corruption="random-bytes")),
                           replace(cfg, corruption="random-bytes"), 0, device, None, cache)
    assert len(cache) == 4
