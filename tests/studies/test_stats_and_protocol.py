"""The statistics the studies decide with, their declared protocols, and the rounding perturbation."""

import math

import pytest
import torch

from reweighting.studies import (
    DOES_NOT_HOLD,
    HOLDS,
    INCONCLUSIVE,
    UNDERPOWERED,
    PartSpec,
    Protocol,
    Selection,
    Study,
    StudyOutcome,
    compare,
    decide,
    declared_compare,
    run_study,
    select_best,
    selection_seeds,
)
from reweighting.studies.protocol import PERTURB_ENV, perturb_initial_weights, perturbation
from reweighting.studies.stats import t_quantile


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 4, 9, 30, 31, 200):
        for p in (0.975, 0.80):
            exact = stats.t.ppf(p, df) if df <= 30 else stats.norm.ppf(p)
            assert t_quantile(p, df) == pytest.approx(exact, abs=2e-3)
    with pytest.raises(ValueError, match="df must be"):
        t_quantile(0.975, 0)
    with pytest.raises(ValueError, match="p must be"):
        t_quantile(0.9, 3)


def test_mde_is_the_paired_t_test_power_formula():
    # d = [1, 2, 3]: sd 1, n 3 -> mde = (t(0.975, 2) + t(0.8, 2)) / sqrt(3)
    part = compare("x", [2.0, 3.0, 4.0], [1.0, 1.0, 1.0])
    assert part.mde == pytest.approx((4.303 + 1.061) / math.sqrt(3), rel=1e-4)
    assert part.noise == pytest.approx(4.303 / math.sqrt(3), rel=1e-4)
    # mde > noise always: an effect at the noise's edge is found only half the time
    assert part.mde > part.noise
    # a simulated check of the 80% power: true effect = mde (with the sd known), t-test at n = 5
    g = torch.Generator().manual_seed(0)
    n, sd, trials, found = 5, 1.0, 4000, 0
    mde = (t_quantile(0.975, n - 1) + t_quantile(0.80, n - 1)) * sd / math.sqrt(n)
    for _ in range(trials):
        d = (mde + sd * torch.randn(n, generator=g)).tolist()
        found += compare("sim", d, [0.0] * n).verdict == HOLDS
    assert 0.72 < found / trials < 0.90  # about 0.8 (the sd is estimated, so not exactly)


def test_a_tie_is_never_decided():
    same = [1.0, 2.0, 3.0]
    tie = compare("tie", same, list(same))
    assert tie.margin == 0.0 and tie.noise == 0.0 and tie.verdict == INCONCLUSIVE
    one = compare("tie, one seed", [1.0], [1.0])
    assert one.verdict == INCONCLUSIVE
    # margin exactly at the noise is not beyond it
    edge = compare("edge", [1.0, 1.0], [0.0, 0.0])  # d = [1, 1]: margin 1, noise 0
    assert edge.verdict == HOLDS
    at = compare("at", [2.0, 0.0], [0.0, -1.0])  # d = [2, 1]: margin 1.5, noise 12.706 * 0.5 / sqrt 2
    assert at.verdict in (INCONCLUSIVE, UNDERPOWERED)


def test_margin_equal_to_noise_is_inconclusive(monkeypatch):
    from reweighting.studies import stats

    part = stats.ClaimPart("x", margin=0.5, noise=0.5, n=3)
    assert part.verdict == INCONCLUSIVE
    assert stats.ClaimPart("x", margin=-0.5, noise=0.5, n=3).verdict == INCONCLUSIVE
    assert stats.ClaimPart("x", margin=0.5000001, noise=0.5, n=3).verdict == HOLDS
    assert stats.ClaimPart("x", margin=-0.5000001, noise=0.5, n=3).verdict == DOES_NOT_HOLD


def test_non_inferiority_needs_and_uses_its_tolerance():
    with pytest.raises(ValueError, match="needs its tolerance"):
        compare("x", [1.0, 2.0], [1.0, 2.0], kind="not worse")
    with pytest.raises(ValueError, match="tolerance must be"):
        compare("x", [1.0, 2.0], [1.0, 2.0], kind="not worse", tolerance=0.0)
    # interval [margin - noise, margin + noise] against -tolerance
    p = compare("x", [1.0, 1.0, 1.0], [1.05, 1.05, 1.05], lower_is_better=False, kind="not worse", tolerance=0.1)
    assert p.margin == pytest.approx(-0.05) and p.noise == pytest.approx(0.0) and p.verdict == HOLDS
    p = compare("x", [1.0, 1.0, 1.0], [1.15, 1.15, 1.15], kind="not worse", tolerance=0.1)
    assert p.verdict == DOES_NOT_HOLD
    p = compare("x", [1.0, 1.0, 1.0], [1.1, 1.1, 1.1], kind="not worse", tolerance=0.1)
    assert p.verdict != HOLDS  # exactly at the tolerance is not inside it
    # undecided and the MDE above the tolerance: the seeds could not have shown it
    wide = compare("x", [1.0, 1.3, 0.8], [1.0, 1.0, 1.0], kind="not worse", tolerance=0.05)
    assert wide.underpowered and wide.verdict == UNDERPOWERED
    # undecided with the MDE below it: inconclusive, not underpowered
    from reweighting.studies.stats import ClaimPart

    narrow = ClaimPart("x", margin=-0.015, noise=0.01, n=5, kind="not worse", mde=0.0134, tolerance=0.02)
    assert not narrow.underpowered and narrow.verdict == INCONCLUSIVE


def test_non_inferiority_boundaries_are_undecided():
    from reweighting.studies.stats import ClaimPart

    # lower end of the interval exactly at -tolerance: not inside it, so not "holds"
    assert ClaimPart("x", margin=-0.25, noise=0.25, n=3, kind="not worse", tolerance=0.5).verdict == INCONCLUSIVE
    assert ClaimPart("x", margin=-0.24, noise=0.25, n=3, kind="not worse", tolerance=0.5).verdict == HOLDS
    # upper end exactly at -tolerance: not beyond it, so not "does not hold"
    assert ClaimPart("x", margin=-0.75, noise=0.25, n=3, kind="not worse", tolerance=0.5).verdict == INCONCLUSIVE
    assert ClaimPart("x", margin=-0.76, noise=0.25, n=3, kind="not worse", tolerance=0.5).verdict == DOES_NOT_HOLD


def test_underpowered_better_part():
    p = compare("x", [1.0, 1.5, 0.7], [1.0, 1.0, 1.0], expected=0.1)
    assert p.verdict == UNDERPOWERED and p.as_dict()["underpowered"] is True
    assert compare("x", [1.0, 1.5, 0.7], [1.0, 1.0, 1.0]).verdict == INCONCLUSIVE  # no expected effect given
    # a decided part is decided, whatever its power
    assert compare("x", [3.0, 3.1, 2.9], [1.0, 1.0, 1.0], expected=0.001).verdict == HOLDS
    assert decide([compare("x", [1.0, 1.5, 0.7], [1.0, 1.0, 1.0], expected=0.1)]) == INCONCLUSIVE
    with pytest.raises(ValueError, match="expected must be"):
        compare("x", [1.0], [1.0], expected=-1.0)


def test_select_best_mean_stability_and_preference():
    scores = {"a": [1.0, 1.1, 0.9], "b": [2.0, 2.1, 1.9], "c": [1.5, 1.4, 1.6]}
    s = select_best(scores)
    assert s.chosen == "a" and s.stability == 1.0 and s.seeds == 3
    assert select_best(scores, lower_is_better=False).chosen == "b"
    # a near-tie: the bootstrap shows the choice is a coin toss
    close = {"a": [1.0, 1.2, 0.9, 1.1], "b": [1.1, 0.9, 1.2, 1.0]}
    s = select_best(close)
    assert 0.2 < s.stability < 0.8
    # the declared default survives a near-tie within the tolerance, not a clear loss
    assert select_best(close, prefer="b", tolerance=0.05).chosen == "b"
    assert select_best(scores, prefer="c", tolerance=0.05).chosen == "a"

    assert select_best(scores, prefer="c", tolerance=0.6).chosen == "c"
    # a lead of exactly the tolerance does not move the choice; a hair more does
    assert select_best({"a": [1.0], "b": [1.5]}, prefer="b", tolerance=0.5).chosen == "b"
    assert select_best({"a": [1.0], "b": [1.5]}, prefer="b", tolerance=0.4999).chosen == "a"
    # ties go to the first listed candidate, whatever the dict's order of insertion says later
    assert select_best({"x": [1.0], "y": [1.0]}).chosen == "x"
    for bad, match in (({}, "no candidates"), ({"a": [1.0], "b": [1.0, 2.0]}, "same selection seeds"),
                       ({"a": [float("nan")]}, "non-finite")):
        with pytest.raises(ValueError, match=match):
            select_best(bad)
    with pytest.raises(ValueError, match="not a candidate"):
        select_best(scores, prefer="z")
    with pytest.raises(ValueError, match="tolerance"):
        select_best(scores, tolerance=-1.0)


def test_select_best_on_one_seed_has_no_stability_figure():
    # every bootstrap resample of one seed is that seed: a share of 1.0 would claim a stability never tested
    s = select_best({"a": [1.0], "b": [2.0]})
    assert s.chosen == "a" and s.stability is None and s.seeds == 1 and s.resamples == 0
    assert s.describe_stability() == "n/a (one selection seed)"
    assert select_best({"a": [1.0, 1.1], "b": [2.0, 2.1]}).describe_stability() == "1.00"
    fixed = Selection.fixed(0.012)
    assert fixed.chosen == 0.012 and fixed.scores == {} and fixed.seeds == 0 and fixed.stability is None
    assert fixed.describe_stability() == "n/a (fixed, not chosen)"


def test_selection_seeds_are_disjoint_from_evidence_seeds():
    sel = selection_seeds(4)
    assert len(set(sel)) == 4 and not set(sel) & set(range(1000))


def _protocol():
    return Protocol(claim="a beats b", metric="m", parts=(PartSpec("a > b", "better", expected=0.5),), seeds=3,
                    selection_seeds=2, selection=("none",), deviations=(("toy", "a test"),))


def test_protocol_fingerprint_is_stable_and_sensitive():
    p = _protocol()
    assert p.fingerprint() == _protocol().fingerprint() and len(p.fingerprint()) == 16
    changed = Protocol(claim="a beats b", metric="m", parts=(PartSpec("a > b", "better", expected=0.4),), seeds=3,
                       selection_seeds=2, selection=("none",), deviations=(("toy", "a test"),))
    assert changed.fingerprint() != p.fingerprint()
    with pytest.raises(ValueError, match="distinct"):
        Protocol(claim="", metric="", parts=(PartSpec("x"), PartSpec("x")), seeds=1)
    with pytest.raises(ValueError, match="needs its tolerance"):
        PartSpec("x", "not worse")
    with pytest.raises(ValueError, match="not declared"):
        p.part("other")


def test_run_study_records_the_protocol_and_enforces_its_parts(tmp_path):
    proto = _protocol()

    def run(ctx, name="a > b", expected=0.5):
        assert ctx.seeds == [0, 1, 2] and ctx.selection_seeds == [1000, 1001]
        a, b = [2.0, 3.0, 4.0], [1.0, 2.1, 2.9]
        part = compare(name, a, b, expected=expected)
        return StudyOutcome(methods={"a": a, "b": b}, holds=part.verdict == HOLDS, config={}, parts=[part])

    ok = Study(name="toy-protocol", claim="a beats b", metric="m", lower_is_better=False, run=run,
               protocol=lambda quick: proto)
    r = run_study(ok, out_dir=tmp_path, show_progress=False)
    assert r["fingerprint"] == proto.fingerprint() and r["protocol"]["seeds"] == 3
    assert r["protocol"]["deviations"] == [{"deviation": "toy", "reason": "a test"}]
    assert r["config"]["seeds"] == 3 and r["parts"][0]["mde"] is not None
    renamed = Study(name="toy-protocol", claim="", metric="m", lower_is_better=False, protocol=lambda quick: proto,
                    run=lambda ctx: run(ctx, name="a >= b"))
    with pytest.raises(ValueError, match="not the ones its protocol declares"):
        run_study(renamed, out_dir=tmp_path, show_progress=False)
    moved = Study(name="toy-protocol", claim="", metric="m", lower_is_better=False, protocol=lambda quick: proto,
                  run=lambda ctx: run(ctx, expected=0.1))
    with pytest.raises(ValueError, match="declared as"):
        run_study(moved, out_dir=tmp_path, show_progress=False)
    assert declared_compare(proto, "a > b", [1.0, 2.0], [0.0, 0.5]).expected == 0.5


def test_ulp_perturbation_moves_each_weight_by_one_ulp(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    before = [p.detach().clone() for p in model.parameters()]
    monkeypatch.delenv(PERTURB_ENV, raising=False)
    perturb_initial_weights(model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    monkeypatch.setenv(PERTURB_ENV, "ulp")
    perturb_initial_weights(model)
    for a, b in zip(before, model.parameters()):
        up, down = torch.nextafter(a, torch.tensor(float("inf"))), torch.nextafter(a, torch.tensor(float("-inf")))
        assert bool(((b == up) | (b == down)).all()) and not torch.equal(a, b)
        assert 0.2 < float((b == up).float().mean()) < 0.8  # both directions occur
    monkeypatch.setenv(PERTURB_ENV, "bits")
    with pytest.raises(ValueError, match="expected one of"):
        perturbation()


def test_threads_perturbation_adds_a_thread(tmp_path, monkeypatch):
    seen = []

    def run(ctx):
        seen.append(torch.get_num_threads())
        return StudyOutcome(methods={"a": [1.0]}, holds=True, config={})

    study = Study(name="toy-threads", claim="", metric="m", lower_is_better=False, run=run, threads=1)
    monkeypatch.setenv(PERTURB_ENV, "threads")
    r = run_study(study, out_dir=tmp_path, show_progress=False)
    monkeypatch.delenv(PERTURB_ENV)
    run_study(study, out_dir=tmp_path, show_progress=False)
    assert seen == [2, 1] and r["perturbation"] == "threads" and r["config"]["threads"] == 2


def test_a_gain_excluded_at_the_papers_size_is_smaller_than_claimed():
    from reweighting.studies import SMALLER_THAN_CLAIMED, ClaimPart

    near_zero = compare("x", [1.01, 0.99, 1.005, 0.995], [1.0, 1.0, 1.0, 1.0], expected=0.5)
    assert near_zero.margin + near_zero.noise < 0.5 and near_zero.verdict == SMALLER_THAN_CLAIMED
    # the interval reaches the expected effect: not excluded (a strict bound, like every other)
    assert ClaimPart("x", margin=0.0, noise=0.1, n=5, mde=0.2, expected=0.1).verdict == UNDERPOWERED
    assert ClaimPart("x", margin=0.0, noise=0.1, n=5, mde=0.2, expected=0.1000001).verdict == SMALLER_THAN_CLAIMED
    # below zero on both sides still refuses the claim outright; a held part stays held
    assert ClaimPart("x", margin=-0.05, noise=0.06, n=5, mde=0.08, expected=0.02).verdict == SMALLER_THAN_CLAIMED
    assert ClaimPart("x", margin=-0.07, noise=0.06, n=5, mde=0.08, expected=0.02).verdict == DOES_NOT_HOLD
    assert ClaimPart("x", margin=0.07, noise=0.06, n=5, mde=0.08, expected=0.5).verdict == HOLDS
    # no interval (one seed), no expected effect, or a non-inferiority part: the rule does not apply
    assert ClaimPart("x", margin=0.0, noise=None, n=1, expected=0.5).verdict == INCONCLUSIVE
    assert ClaimPart("x", margin=0.0, noise=0.01, n=5, mde=0.014).verdict == INCONCLUSIVE
    assert ClaimPart("x", margin=0.0, noise=0.1, n=5, mde=0.2, kind="not worse", tolerance=0.05,
                     expected=1.0).verdict == UNDERPOWERED


def test_a_study_is_smaller_than_claimed_only_when_nothing_else_decides_it():
    from reweighting.studies import SMALLER_THAN_CLAIMED, ClaimPart

    held = ClaimPart("a", margin=0.2, noise=0.05, n=5, mde=0.07)
    smaller = ClaimPart("b", margin=0.0, noise=0.01, n=5, mde=0.014, expected=0.3)
    undecided = ClaimPart("c", margin=0.0, noise=0.1, n=5, mde=0.14)
    refused = ClaimPart("d", margin=-0.2, noise=0.05, n=5, mde=0.07)
    assert decide([held, smaller]) == SMALLER_THAN_CLAIMED
    assert decide([held, smaller, undecided]) == INCONCLUSIVE
    assert decide([held, smaller, refused]) == DOES_NOT_HOLD
    assert decide([held]) == HOLDS


def test_recorded_verdicts_are_decided_again_by_the_current_rules(tmp_path):
    import json

    from reweighting.studies.report import load_results, redecide

    part = {"name": "p", "margin": 0.0, "noise": 0.01, "n": 8, "kind": "better", "mde": 0.014, "expected": 0.3,
            "tolerance": None, "verdict": "inconclusive", "note": ""}
    record = {"study": "s", "verdict": "inconclusive", "holds": False, "parts": [part], "baseline": None}
    again = redecide(record)
    assert again["verdict"] == "smaller than claimed" and again["verdict_recorded"] == "inconclusive"
    assert again["parts"][0]["verdict"] == "smaller than claimed"
    assert again["parts"][0]["verdict_recorded"] == "inconclusive" and again["holds"] is False
    # a failed baseline check still makes the study inconclusive
    sick = {**record, "baseline": {"measure": "m", "value": 0.1, "bar": 0.5, "higher_is_better": True,
                                   "healthy": False}}
    assert redecide(sick)["verdict"] == "inconclusive" and "verdict_recorded" not in redecide(sick)
    # an unchanged verdict carries no note, and a study without parts is left as recorded
    held = {**part, "margin": 0.5, "verdict": "holds"}
    same = redecide({**record, "parts": [held], "verdict": "holds", "holds": True})
    assert same["verdict"] == "holds" and same["holds"] is True and "verdict_recorded" not in same
    assert "verdict_recorded" not in same["parts"][0]
    bare = {"study": "t", "verdict": "holds", "holds": True, "parts": []}
    assert redecide(bare) == bare
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "results.json").write_text(json.dumps(record))
    assert load_results(tmp_path)[0]["verdict"] == "smaller than claimed"


def test_a_recorded_hold_the_numbers_do_not_support_is_no_longer_a_hold(tmp_path):
    import json

    from reweighting.studies.publish import summarize_results
    from reweighting.studies.report import redecide

    part = {"name": "p", "margin": 0.001, "noise": 0.05, "n": 5, "kind": "better", "mde": 0.07, "expected": None,
            "tolerance": None, "verdict": "holds", "note": ""}
    record = {"study": "s", "claim": "c", "metric": "m", "verdict": "holds", "holds": True, "quick": False,
              "config": {"seeds": 5}, "parts": [part], "baseline": None, "seconds": 1.0}
    again = redecide(record)
    assert again["holds"] is False and again["verdict"] == "inconclusive" and again["verdict_recorded"] == "holds"
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "results.json").write_text(json.dumps(record))
    published = summarize_results(tmp_path)["studies"][0]
    assert published["verdict"] == "inconclusive" and published["parts"][0]["verdict"] == "inconclusive"


def test_the_report_says_where_a_verdict_was_decided_again(tmp_path):
    import json

    from reweighting.studies.report import build_report

    part = {"name": "p", "margin": 0.0, "noise": 0.01, "n": 8, "kind": "better", "mde": 0.014, "expected": 0.3,
            "tolerance": None, "verdict": "inconclusive", "note": ""}
    record = {"study": "s", "claim": "c", "metric": "m", "lower_is_better": False, "verdict": "inconclusive",
              "holds": False, "quick": False, "parts": [part], "baseline": None, "seconds": 1.0, "cpu_seconds": 1.0,
              "config": {"seeds": 8}, "methods": {"a": {"mean": 1.0, "std": 0.0, "n": 8}}, "summary": "inconclusive"}
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "results.json").write_text(json.dumps(record))
    text = build_report(tmp_path, plots=False).read_text()
    assert ("**Decided again by the current rules** (the summary below keeps the run's own words): the study "
            "inconclusive -> smaller than claimed; p: inconclusive -> smaller than claimed.") in text
    (tmp_path / "s" / "results.json").write_text(json.dumps({**record, "parts": [{**part, "expected": None}]}))
    assert "Decided again" not in build_report(tmp_path, plots=False).read_text()


def test_a_recorded_part_without_its_numbers_is_a_clear_error():
    from reweighting.studies.report import redecide

    record = {"study": "s", "verdict": "holds", "parts": [{"name": "p", "margin": 0.1, "verdict": "holds"}]}
    with pytest.raises(ValueError, match=r"study 's': a recorded part lacks \['n'\]"):
        redecide(record)
