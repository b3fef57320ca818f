"""The loss-reweighting studies end to end at their smallest configuration (the real code path)."""

import json

import pytest
import torch

from reweighting.studies import StudyContext, all_studies, run_study
from reweighting.studies import lm_training as L
from reweighting.studies import loss_reweighting as S
from reweighting.studies import loss_reweighting_packed as P
from reweighting.studies.lm import ngram_log_loss, python_version


def test_study_runs_and_reports(tmp_path, monkeypatch):
    study = all_studies()["loss-reweighting"]
    # run_study at the SMOKE size: the registry's run, the results file and the plot are the real ones
    monkeypatch.setattr(S, "QUICK", S.SMOKE)
    monkeypatch.setattr(S, "QUICK_PROTOCOL", S.SMOKE_PROTOCOL)
    results = run_study(study, quick=True, out_dir=tmp_path, show_progress=False)
    on_disk = json.loads((tmp_path / "loss-reweighting" / "results.json").read_text())
    assert on_disk == results and results["fingerprint"] == S.SMOKE_PROTOCOL.fingerprint()
    assert results["config"]["python"] == python_version()  # the corpus depends on it
    assert set(results["methods"]) == {f"{m} ({s})" for m in S.METHODS for s in S.SETTINGS}
    for summary in results["methods"].values():
        assert summary["n"] == 2 and 0 < summary["mean"] < 6  # nats per byte: below log(256) = 5.55
    parts = {p["name"]: p for p in results["parts"]}
    assert list(parts) == [p.name for p in S.SMOKE_PROTOCOL.parts]
    per_seed = results["per_seed"]
    diffs = [u - q for u, q in zip(per_seed["uniform (redundant)"], per_seed["quadratic (redundant)"])]
    assert parts["quadratic < uniform (redundant)"]["margin"] == pytest.approx(sum(diffs) / 2)
    assert parts["quadratic < uniform (redundant)"]["noise"] == pytest.approx(12.706 * abs(diffs[0] - diffs[1]) / 2)
    assert parts["linupper not worse than uniform (clean)"]["tolerance"] == S.CLEAN_TOLERANCE
    # twelve steps teach the model no more than an n-gram: the baseline fails, so the verdict is
    # inconclusive rather than a failure of the method
    assert results["baseline_healthy"] is False and results["verdict"] == "inconclusive"
    assert results["baseline"]["bar"] == -S.NGRAM_MARGIN
    # the lr of every selected method was chosen on the selection seed, which no evidence run used
    selection = results["details"]["selection"]
    for setting in S.SETTINGS:
        for m in S.SELECTED:
            sel = selection[setting][m]
            assert sel["selection_seeds"] == 1 and sel["chosen"] == results["config"]["chosen_lr"][setting][m]
    shares = results["details"]["duplicate_weight_share"]
    assert all(v == pytest.approx(0.25) for v in shares["uniform"])  # uniform puts exactly the batch share there
    assert (tmp_path / "loss-reweighting" / "loss_curves.png").stat().st_size > 1000


def test_lr_choice_keeps_uniforms_lr_within_the_tolerance():
    cfg = S.SMOKE
    lrs = cfg.lrs
    validation = {}
    for s in S.SETTINGS:
        validation[(s, "uniform", lrs[0])], validation[(s, "uniform", lrs[1])] = [2.0, 2.1], [2.3, 2.2]
        # linupper is a hair better at the other lr: it keeps uniform's
        validation[(s, "linupper", lrs[0])], validation[(s, "linupper", lrs[1])] = [2.0, 2.0], [1.995, 1.995]
        # quadratic is clearly better at the other lr: it moves
        validation[(s, "quadratic", lrs[0])], validation[(s, "quadratic", lrs[1])] = [2.0, 2.0], [1.9, 1.9]
    chosen = S.choose_lrs(cfg, validation)
    for s in S.SETTINGS:
        assert chosen[s]["uniform"].chosen == lrs[0] and chosen[s]["linupper"].chosen == lrs[0]
        assert chosen[s]["quadratic"].chosen == lrs[1]


def test_batches_hold_the_configured_near_duplicate_share():
    cfg = S.SMOKE
    data = L.load_data(cfg)
    width = cfg.seq_len + 1
    for setting, share in (("redundant", cfg.duplicate_share), ("clean", 0.0)):
        stream = list(L.batches(data, cfg, setting, seed=0))
        assert len(stream) == cfg.steps
        for rows, is_dup in stream:
            assert rows.shape == (cfg.batch, width) and float(is_dup.float().mean()) == share
            # a near-duplicate differs from its closest template in about mutation_share of its bytes
            # (at most that many), and a clean row is far from every template
            distance = (rows[:, None, :] != data.boilerplate[None]).sum(-1).min(1).values
            limit = max(1, round(cfg.mutation_share * width))
            assert bool((distance[is_dup] <= limit).all()) and bool((distance[~is_dup] > limit).all())
        again = next(iter(L.batches(data, cfg, setting, seed=0)))
        assert torch.equal(again[0], stream[0][0])  # the same seed gives the same stream (paired methods)
        other = next(iter(L.batches(data, cfg, setting, seed=1)))
        assert not torch.equal(other[0], stream[0][0])  # another seed redraws it


def test_near_duplicates_are_fresh_copies():
    g = torch.Generator().manual_seed(0)
    templates = torch.arange(2 * 40).view(2, 40) % 256
    rows = L.near_duplicates(templates, 50, 0.1, g)
    differ = (rows[:, None, :] != templates[None]).sum(-1).min(1).values
    assert bool((differ <= 4).all()) and bool((differ >= 1).all())  # each copy really differs
    assert len({tuple(r.tolist()) for r in rows}) > 25  # not a handful of exact copies


def test_each_seed_draws_its_own_test_windows():
    cfg = S.SMOKE
    data = L.load_data(cfg)
    a, b = L.test_rows(data, cfg, 0), L.test_rows(data, cfg, 1)
    assert a.shape == (cfg.eval_sequences, cfg.seq_len + 1) and not torch.equal(a, b)
    assert torch.equal(a, L.test_rows(data, cfg, 0))
    # the validation windows (selection only) come from other files than any test window
    overlap = (data.validation[:, None, :] == data.test_pool[None]).all(-1).any()
    assert not bool(overlap)


def test_ngram_log_loss_matches_a_direct_count():
    # bigram on a tiny corpus, counted by hand
    train = torch.tensor([[1, 2, 1, 2, 3]])
    rows = torch.tensor([[1, 2, 3]])
    alpha = 0.5
    # targets 2 | 1 (c=2, c(1)=2) and 3 | 2 (c=1, c(2)=2)
    p1 = (2 + alpha) / (2 + 256 * alpha)
    p2 = (1 + alpha) / (2 + 256 * alpha)
    expected = -(torch.tensor(p1).log() + torch.tensor(p2).log()) / 2
    assert ngram_log_loss(train, rows, 2, alpha) == pytest.approx(float(expected))
    # a trigram uses one byte of context at the first target, two after it
    t3 = ngram_log_loss(train, rows, 3, alpha)
    q1 = (2 + alpha) / (2 + 256 * alpha)  # 2 | 1
    q2 = (1 + alpha) / (1 + 256 * alpha)  # 3 | 1 2: (1,2)->3 once, (1,2) twice -> c(ctx)=2
    q2 = (1 + alpha) / (2 + 256 * alpha)
    assert t3 == pytest.approx(float(-(torch.tensor(q1).log() + torch.tensor(q2).log()) / 2))
    with pytest.raises(ValueError):
        ngram_log_loss(train, rows, 0, alpha)


def test_health_check_fails_a_model_no_better_than_the_ngram():
    assert not L.baseline_health([0.0, -0.01], 0.05).healthy  # level with the n-gram
    assert not L.baseline_health([-0.2, 0.15], 0.05).healthy  # better on one seed only, not on average
    assert L.baseline_health([-0.08, -0.1], 0.05).healthy
    # an untrained network is far worse than the tuned n-gram on real windows
    from reweighting.studies.lm import GPTConfig, TinyGPT

    cfg = S.SMOKE
    data = L.load_data(cfg)
    torch.manual_seed(0)
    untrained = TinyGPT(GPTConfig(context=cfg.seq_len, dim=cfg.dim, layers=cfg.layers, heads=cfg.heads))
    rows = L.test_rows(data, cfg, 0)
    ngram = L.ngram_reference(data, cfg)
    gap = L.evaluate(untrained, rows, torch.device("cpu")) - ngram_log_loss(data.clean, rows, ngram["order"],
                                                                              ngram["alpha"])
    assert gap > 1.0 and not L.baseline_health([gap], S.NGRAM_MARGIN).healthy


def test_packed_batches_hold_several_documents_per_row_with_flags():
    cfg = S.SMOKE
    data = L.load_data(cfg)
    rows, ids, is_dup = next(iter(L.packed_batches(data, cfg, seed=0)))
    assert rows.shape == ids.shape == (cfg.batch, cfg.seq_len + 1)
    n_docs = ids.max(1).values + 1
    assert bool((n_docs >= 2).all())  # several documents per row
    for b in range(cfg.batch):
        for d in range(int(n_docs[b])):
            doc = rows[b][ids[b] == d]
            assert doc.numel() >= 2
            if is_dup[b, d]:  # a flagged document is a near-copy of a boilerplate window's opening
                distance = min(int((doc != w[: doc.numel()]).sum()) for w in data.boilerplate)
                assert distance <= max(1, round(cfg.mutation_share * (cfg.seq_len + 1)))
        assert not is_dup[b, int(n_docs[b]):].any()
    again = next(iter(L.packed_batches(data, cfg, seed=0)))
    assert torch.equal(again[0], rows) and torch.equal(again[1], ids)


def test_packed_study_weights_documents(tmp_path):
    from reweighting.studies import get_study

    assert get_study("loss-reweighting-packed") is P.STUDY
    proto = P.protocol(S.SMOKE, seeds=2, selection=1)
    ctx = StudyContext(quick=True, seeds=[0, 1], out_dir=tmp_path, device=torch.device("cpu"), show_progress=False,
                       selection_seeds=[1000])
    outcome = P.run_packed(ctx, S.SMOKE, proto)
    assert set(outcome.methods) == set(P.PACKED_METHODS) and all(len(v) == 2 for v in outcome.methods.values())
    chosen = outcome.config["chosen_lr"]
    for m in P.REPORTED:
        assert chosen[m] == chosen["uniform"]
    share = {m: v[0] for m, v in outcome.details["duplicate_weight_share"].items()}
    assert 0 < share["uniform"] < 1 and outcome.details["documents_per_row"] >= 2
    assert [p.name for p in outcome.parts] == [p.name for p in proto.parts]


def test_full_protocols_fix_one_lr_from_the_pilots_and_start_past_their_seeds():
    # the pilots' lr choice flipped under a 1-ulp rerun: the full runs declare one rate and no selection seeds
    for proto, lrs in ((S.PROTOCOL, S.FULL.lrs), (P.PROTOCOL, S.FULL.packed_lrs)):
        assert len(lrs) == 1 and proto.selection_seeds == 0
        assert proto.selection[0].startswith(f"one learning rate for every method and setting, {lrs[0]:g}, fixed")
        assert min(proto.evidence_seeds()) >= 5  # the pilots ran evidence seeds 0-4
    # with several candidates the rule is the selection, on selection seeds
    assert S.SMOKE_PROTOCOL.selection[0].startswith("uniform's lr per setting from")
    assert S.lr_rule((1e-3, 2e-3), "the rule") == "the rule"
    assert "fixed" in S.lr_rule((1e-3,), "the rule")


def test_one_fixed_lr_runs_without_selection(tmp_path):
    from dataclasses import replace

    cfg = replace(S.SMOKE, lrs=(6e-3,), steps=4, eval_sequences=8)
    proto = S.protocol(cfg, seeds=2, selection=0, first_seed=100)
    ctx = StudyContext(quick=True, seeds=proto.evidence_seeds(), out_dir=tmp_path, device=torch.device("cpu"),
                       show_progress=False)
    out = S.run_with(ctx, cfg, proto)
    assert out.config["chosen_lr"] == {s: {m: 6e-3 for m in S.SELECTED} for s in S.SETTINGS}
    assert "on 2 evidence seeds (100-101); one learning rate, 0.006, fixed before the run" in out.summary
    # nothing was chosen: no selection seed, no score, no stability is recorded for the fixed lr
    assert all(v["selection_seeds"] == 0 and v["mean_scores"] == {} and v["stability"] is None
               for s in S.SETTINGS for v in out.details["selection"][s].values())
    assert "| redundant | uniform | 0.006 | - |" in out.summary


def test_packed_study_at_one_fixed_lr_chooses_nothing(tmp_path):
    from dataclasses import replace

    cfg = replace(S.SMOKE, packed_lrs=(6e-3,), steps=4, eval_sequences=8)
    proto = P.protocol(cfg, seeds=2, selection=0, first_seed=100)
    ctx = StudyContext(quick=True, seeds=proto.evidence_seeds(), out_dir=tmp_path, device=torch.device("cpu"),
                       show_progress=False)
    out = P.run_packed(ctx, cfg, proto)
    assert out.config["chosen_lr"] == {m: 6e-3 for m in P.PACKED_METHODS}
    assert all(v["selection_seeds"] == 0 and v["mean_scores"] == {} for v in out.details["selection"].values())
