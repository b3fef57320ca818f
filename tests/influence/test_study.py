"""Tests of the ``presence`` study: the real code path at a tiny configuration, and its pieces."""

import json
import math
from dataclasses import replace

import pytest
import torch

from reweighting.studies import StudyContext, get_study
from reweighting.studies import presence as P

CPU = torch.device("cpu")


def _ctx(tmp_path, seeds=(0,), selection=(1000,)):
    return StudyContext(quick=True, seeds=list(seeds), out_dir=tmp_path, device=CPU, show_progress=False,
                        selection_seeds=list(selection))


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
    with pytest.raises(ValueError, match="positives and negatives"):
        P.auroc(scores, torch.zeros(4, dtype=torch.bool))


def test_each_seed_draws_its_own_data_and_the_methods_of_a_seed_share_it():
    cfg = P.SMOKE
    a, b, again = P.load_data(cfg, 0), P.load_data(cfg, 1), P.load_data(cfg, 0)
    assert torch.equal(a.pool, again.pool) and torch.equal(a.corrupted, again.corrupted)
    assert not torch.equal(a.corrupted, b.corrupted) and not torch.equal(a.heldout, b.heldout)
    assert int(a.corrupted.sum()) == round(cfg.corrupt_share * cfg.train_sequences)
    with pytest.raises(ValueError, match="corrupt_share"):
        P.load_data(replace(cfg, corrupt_share=0.0), 0)
    with pytest.raises(ValueError, match="corruption must be one of"):
        P.load_data(replace(cfg, corruption="nope"), 0)


def test_study_runs_end_to_end_at_smoke_size(tmp_path):
    assert get_study("presence").name == "presence"
    outcome = P.run_with(_ctx(tmp_path), P.SMOKE)
    assert all(math.isfinite(v) and v > 0 for vs in outcome.methods.values() for v in vs)
    assert [p.name for p in outcome.parts] == P.part_names(P.SMOKE)
    own = outcome.details["settings"]["own setting"]
    assert len(own["auroc"]) == 1 and 0.0 <= own["auroc"][0] <= 1.0
    (table,) = outcome.details["assumption_auroc"]
    assert set(table) == set(P.ASSUMPTION_CORRUPTIONS)
    assert all(set(row) == set(P.ASSUMPTION_SCOPES) and all(0 <= a <= 1 for a in row.values())
               for row in table.values())
    # the selected setting is the best of the selection seed's table, never the own one
    chosen = outcome.details["selection"]["chosen"]
    c, s = chosen.split("|")
    assert chosen != "tokens|first-block"
    assert table[c][s] == max(v for cc, row in table.items() for ss, v in row.items()
                              if (cc, ss) != ("tokens", "first-block"))
    heldout = {m: outcome.methods[f"{m} [own setting]"][0] for m in P.OWN_METHODS}
    part = {p.name: p for p in outcome.parts}["own setting: presence < uniform"]
    assert part.margin == pytest.approx(heldout["uniform"] - heldout["presence"])
    # six steps learn nothing beyond byte frequencies: the baseline is unhealthy, the verdict inconclusive
    assert not outcome.baseline.healthy and outcome.holds is False
    # Before its switch PRESENCE is the direct method: same initialisation, batches and weights.
    share = own["corrupted_weight_share"]
    assert share["presence"][0]["first"] == share["direct"][0]["first"]
    assert len(outcome.plots) == 1 and all((tmp_path / name).exists() for name in outcome.plots)
    json.dumps(outcome.details)


def test_selection_seeds_must_exist_and_be_disjoint_from_the_evidence(tmp_path):
    with pytest.raises(ValueError, match="selection seeds"):
        P.run_with(_ctx(tmp_path, selection=()), P.SMOKE)
    with pytest.raises(ValueError, match="disjoint"):
        P.run_with(_ctx(tmp_path, seeds=(0, 1), selection=(1,)), P.SMOKE)


def test_choose_setting_takes_the_best_mean_and_leaves_out_the_own():
    def table(tokens_units, near_all):
        t = {c: {s: 0.5 for s in P.ASSUMPTION_SCOPES} for c in P.ASSUMPTION_CORRUPTIONS}
        t["tokens"]["first-block"] = 0.99  # the own setting: never a candidate
        t["tokens"]["units-of-4"] = tokens_units
        t["near-duplicate"]["all"] = near_all
        return t

    sel = P.choose_setting(P.FULL, [table(0.7, 0.6), table(0.7, 0.75)])
    assert sel.chosen == "tokens|units-of-4" and sel.scores["tokens|units-of-4"] == pytest.approx(0.7)
    assert "tokens|first-block" not in sel.scores
    sel = P.choose_setting(P.FULL, [table(0.7, 0.8), table(0.7, 0.75)])
    assert sel.chosen == "near-duplicate|all" and sel.stability == 1.0


def test_self_influence_loop_matches_the_library_per_window():
    """The AUROC's autograd loop and the library's SelfInfluence agree on K = first block."""
    from reweighting.influence import score_dataset
    from reweighting.studies.lm import GPTConfig, TinyGPT

    cfg = P.SMOKE
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(context=cfg.seq_len, dim=cfg.dim, layers=cfg.layers, heads=cfg.heads))
    rows = P.load_data(cfg, 0).pool[:6]
    ours = P.self_influence_loop(model, rows, "first-block")
    lib = score_dataset(model, rows, lambda m, r: P.sequence_losses(m, r), batch_size=3,
                        modules=P.scope_modules(model, cfg), broadcast=["pos"], progress=False)
    assert torch.allclose(ours, lib, rtol=1e-4)
    # a unit's score is the squared norm of the unit's mean gradient, not the mean of the squares
    units = P.self_influence_loop(model, rows, "first-block", unit=2)
    assert units.shape == (3,) and not torch.allclose(units, (ours[0::2] + ours[1::2]) / 4)


def test_training_unit_auroc_scores_mixed_units_of_a_training_batch():
    """Each window gets its unit's within-batch z-score; units are random mixes, as in training."""

    class Flagger(torch.nn.Module):
        """A stand-in model whose self-influence is the number of corrupted windows in the unit."""

    cfg = replace(P.SMOKE, batch=8, scored_batches=50)
    data = P.load_data(cfg, 0)
    seen = []

    def fake_loop(model, rows, scope, unit=1):
        bad = torch.stack([(data.pool == r).all(1).logical_and(data.corrupted).any() for r in rows]).double()
        seen.append(bad.reshape(-1, unit).sum(1))
        return bad.reshape(-1, unit).sum(1)

    import reweighting.studies.presence_train as T

    original = T.self_influence_loop
    T.self_influence_loop = fake_loop
    try:
        per_window = T.training_unit_auroc(Flagger(), data, cfg, "first-block", 1, 0, CPU)
        units = T.training_unit_auroc(Flagger(), data, cfg, "first-block", 4, 0, CPU)
    finally:
        T.self_influence_loop = original
    assert per_window == 1.0  # a perfect per-window flag (an all-clean batch's z-scores are 0)
    # with units of 4 the clean windows that share a unit with a corrupted one score as high: the AUROC drops
    assert 0.6 < units < 0.95
    counts = torch.cat(seen[len(seen) // 2:])
    assert bool(((counts > 0) & (counts < 4)).any())  # mixed units occur
    with pytest.raises(ValueError, match="multiple of the unit"):
        T.training_unit_auroc(Flagger(), data, cfg, "first-block", 3, 0, CPU)


def test_health_check_on_a_broken_and_a_healthy_model():
    from reweighting.studies.lm import GPTConfig, TinyGPT

    cfg = P.SMOKE
    data = P.load_data(cfg, 0)
    unigram = P.unigram_entropy(data.heldout)
    torch.manual_seed(0)
    untrained = TinyGPT(GPTConfig(context=cfg.seq_len, dim=cfg.dim, layers=cfg.layers, heads=cfg.heads))
    assert not P.baseline_health([P.evaluate(untrained, data.heldout, CPU)], [unigram]).healthy
    # a byte-frequency model scores the unigram entropy: it learned no context and fails
    assert not P.baseline_health([unigram], [unigram]).healthy
    # a byte-bigram counted on plenty of clean text knows one byte of context and passes
    big = P.load_data(replace(P.FULL, corrupt_share=0.01), 0)
    clean = big.pool[~big.corrupted]
    bigram = P.bigram_loss(clean, big.heldout)
    assert P.baseline_health([bigram], [P.unigram_entropy(big.heldout)]).healthy
    assert P.baseline_health([unigram - 0.5], [unigram]).healthy  # the bar itself passes
    assert not P.baseline_health([unigram - 0.49], [unigram]).healthy


def test_bigram_loss_matches_a_hand_count():
    train = torch.tensor([[1, 2, 1, 2]])
    ev = torch.tensor([[1, 2, 1]])
    # counts with add-0.1: row 1 has 2 + 25.6 mass ... P(2|1) = 2.1 / (2 + 25.6), P(1|2) = 1.1 / (1 + 25.6)
    want = -(math.log(2.1 / 27.6) + math.log(1.1 / 26.6)) / 2
    assert P.bigram_loss(train, ev) == pytest.approx(want)


def test_uniform_runs_are_shared_only_where_nothing_they_depend_on_differs():
    cfg = P.SMOKE
    data = P.load_data(cfg, 0)
    cache: dict = {}
    first = P.train_uniform_cached(data, cfg, 0, CPU, None, cache)
    # K and micro-batch units change how self-influence is computed, never a uniform run
    again = P.train_uniform_cached(data, replace(cfg, scope="all", microbatches=2), 0, CPU, None, cache)
    assert again["model"] is first["model"] and len(cache) == 1
    fresh = P.train(data, cfg, "uniform", 0, CPU)
    assert again["heldout"] == fresh["heldout"]
    # another seed, corruption or step count is another run
    P.train_uniform_cached(data, cfg, 1, CPU, None, cache)
    P.train_uniform_cached(data, replace(cfg, steps=cfg.steps + 1), 0, CPU, None, cache)
    P.train_uniform_cached(P.load_data(replace(cfg, corruption="random-bytes"), 0),
                           replace(cfg, corruption="random-bytes"), 0, CPU, None, cache)
    assert len(cache) == 4


def test_micro_batch_training_needs_equal_units():
    cfg = replace(P.SMOKE, microbatches=3)
    with pytest.raises(ValueError, match="equal micro-batches"):
        P.train(P.load_data(cfg, 0), cfg, "presence", 0, CPU)


def test_setting_parts_compare_the_right_methods_and_units_of_four():
    run = {"auroc": [0.7, 0.75, 0.72], "heldout": {"uniform": [2.6, 2.5, 2.7], "direct": [2.9, 2.95, 2.9],
                                                    "presence": [2.55, 2.52, 2.6]}}
    parts = P.setting_parts(P.PROTOCOL, "own setting", run, P.FULL)
    assert [p.name for p in parts] == P.part_names(P.FULL)[:3]
    assert parts[0].margin == pytest.approx(0.7233333 - 0.6, abs=1e-6) and parts[0].verdict == "holds"
    assert parts[1].margin == pytest.approx((0.05 - 0.02 + 0.1) / 3)
    assert parts[2].margin == pytest.approx((0.35 + 0.43 + 0.3) / 3) and parts[2].verdict == "holds"
    units = P.setting_config(P.FULL, "tokens", "units-of-4")
    assert units.microbatches == P.FULL.batch // 4 and P.unit_size(units) == 4 and units.scope == "first-block"
    assert P.unit_size(P.setting_config(P.FULL, "near-duplicate", "all")) == 1
    with pytest.raises(ValueError, match="scope must be one of"):
        P.setting_config(P.FULL, "tokens", "last-block")
