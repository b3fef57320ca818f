"""Comparing two runs' verdicts (``reweighting agree``), the ``--full`` split of ``reproduce`` and the
evidence seeds a protocol declares."""

import json

import pytest

import reweighting.studies as studies_module
from reweighting.cli import main
from reweighting.studies import Study, StudyOutcome, run_study
from reweighting.studies.agreement import compare_runs, format_agreement
from reweighting.studies.protocol import SELECTION_SEED_BASE, PartSpec, Protocol


def _write(folder, study, verdict, parts, fingerprint="f1", quick=False, perturbation=None):
    path = folder / study
    path.mkdir(parents=True, exist_ok=True)
    record = {"study": study, "verdict": verdict, "fingerprint": fingerprint, "quick": quick,
              "perturbation": perturbation,
              "parts": [{"name": n, "verdict": v, "margin": m, "noise": 0.01, "n": 5, "kind": "better", "mde": 0.014}
                        for n, v, m in parts]}
    (path / "results.json").write_text(json.dumps(record))


def test_agreeing_runs_agree_and_margins_may_move(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, "s", "holds", [("p1", "holds", 0.05), ("p2", "holds", 0.03)])
    _write(b, "s", "holds", [("p1", "holds", 0.07), ("p2", "holds", 0.02)], perturbation="ulp")
    agreement = compare_runs(a, b)
    assert agreement.agrees
    assert [r.part for r in agreement.rows] == ["", "p1", "p2"]
    assert agreement.perturbation_b == ("ulp",)
    text = format_agreement(agreement, "A", "B")
    assert "1 of 1 study verdicts and 2 of 2 part verdicts agree" in text and "+0.0700 / 0.0100" in text
    assert main(["agree", str(a), str(b)]) == 0


def test_one_part_that_turns_is_a_disagreement(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, "s", "holds", [("p1", "holds", 0.05), ("p2", "holds", 0.03)])
    _write(b, "s", "holds", [("p1", "holds", 0.05), ("p2", "inconclusive", 0.003)])
    agreement = compare_runs(a, b)
    assert not agreement.agrees
    # the part turns, and with it the study's verdict (decided again from the recorded numbers)
    assert [r.agrees for r in agreement.rows] == [False, True, False]
    assert agreement.rows[0].verdict_b == "inconclusive"
    assert main(["agree", str(a), str(b)]) == 1
    assert "**NO**" in capsys.readouterr().out


def test_a_study_in_one_run_only_is_named_and_fails(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, "s", "holds", [("p1", "holds", 0.05)])
    _write(a, "t", "holds", [("p1", "holds", 0.05)])
    _write(b, "s", "holds", [("p1", "holds", 0.05)])
    agreement = compare_runs(a, b)
    assert agreement.only_in_a == ("t",) and not agreement.agrees
    assert main(["agree", str(a), str(b)]) == 1
    assert "only (not compared): t" in capsys.readouterr().out


@pytest.mark.parametrize("change, message", [
    ({"fingerprint": "f2"}, "different protocols"),
    ({"quick": True}, "--quick"),
])
def test_runs_of_other_protocols_or_modes_are_refused(tmp_path, capsys, change, message):
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, "s", "holds", [("p1", "holds", 0.05)])
    _write(b, "s", "holds", [("p1", "holds", 0.05)], **change)
    with pytest.raises(ValueError, match=message):
        compare_runs(a, b)
    assert main(["agree", str(a), str(b)]) == 2
    assert message in capsys.readouterr().err


def test_other_parts_are_refused_and_empty_or_missing_folders_named(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, "s", "holds", [("p1", "holds", 0.05)])
    _write(b, "s", "holds", [("p9", "holds", 0.05)])
    with pytest.raises(ValueError, match="other parts"):
        compare_runs(a, b)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no results"):
        compare_runs(a, tmp_path / "empty")
    assert main(["agree", str(a), str(tmp_path / "nowhere")]) == 2
    assert "nowhere is not a folder" in capsys.readouterr().err


def _seeds_run(ctx):
    return StudyOutcome(methods={"m": [float(s) for s in ctx.seeds]}, holds=True, config={})


def _protocol(first_seed):
    return Protocol(claim="c", metric="m", parts=(PartSpec("p"),), seeds=3, first_seed=first_seed)


def test_evidence_seeds_start_where_the_protocol_says(tmp_path):
    study = Study(name="toy-seeds", claim="c", metric="m", lower_is_better=False, run=_seeds_run,
                  protocol=lambda quick: Protocol(claim="c", metric="m", parts=(), seeds=3, first_seed=100))
    r = run_study(study, out_dir=tmp_path, show_progress=False)
    assert r["per_seed"]["m"] == [100.0, 101.0, 102.0] and r["config"]["evidence_seeds"] == [100, 101, 102]
    r = run_study(study, out_dir=tmp_path, show_progress=False, num_seeds=2)
    assert r["config"]["evidence_seeds"] == [100, 101]
    assert _protocol(100).evidence_seeds() == [100, 101, 102]
    assert _protocol(0).evidence_seeds(4) == [0, 1, 2, 3]


def test_evidence_seeds_stay_below_the_selection_seeds():
    last_start = SELECTION_SEED_BASE - 3
    assert _protocol(last_start).evidence_seeds()[-1] == SELECTION_SEED_BASE - 1
    with pytest.raises(ValueError, match="below the selection seeds"):
        _protocol(last_start + 1)
    with pytest.raises(ValueError, match="below the selection seeds"):
        _protocol(-1)
    with pytest.raises(ValueError, match="below the selection seeds"):
        _protocol(last_start).evidence_seeds(4)
    with pytest.raises(ValueError, match="number of evidence seeds"):
        _protocol(0).evidence_seeds(0)


def test_a_protocol_from_seed_0_keeps_its_fingerprint_and_another_start_changes_it():
    # protocols published before first_seed existed must keep their fingerprints
    assert "first_seed" not in _protocol(0).as_dict()
    assert _protocol(0).fingerprint() != _protocol(100).fingerprint()
    assert _protocol(100).as_dict()["first_seed"] == 100


def test_the_default_run_leaves_out_the_long_studies_unless_full(tmp_path, capsys, monkeypatch):
    short = Study(name="toy-short", claim="c", metric="m", lower_is_better=False, run=_seeds_run)
    long = Study(name="toy-long", claim="c", metric="m", lower_is_better=False, run=_seeds_run, full_only=True,
                 cost=600)
    monkeypatch.setattr(studies_module, "all_studies", lambda: {"toy-short": short, "toy-long": long})
    assert main(["reproduce", "--out", str(tmp_path / "a"), "--no-progress", "--jobs", "1"]) == 0
    assert "left out of the default run (add --full, or name them): toy-long (about 10 more CPU-minutes)" \
        in capsys.readouterr().out
    assert (tmp_path / "a" / "toy-short").is_dir() and not (tmp_path / "a" / "toy-long").exists()
    assert main(["reproduce", "--full", "--out", str(tmp_path / "b"), "--no-progress", "--jobs", "1"]) == 0
    assert (tmp_path / "b" / "toy-long" / "results.json").exists()
    assert main(["reproduce", "toy-long", "--out", str(tmp_path / "c"), "--no-progress", "--jobs", "1"]) == 0
    assert (tmp_path / "c" / "toy-long" / "results.json").exists()
    # --quick is short by definition: it keeps every study
    assert main(["reproduce", "--quick", "--out", str(tmp_path / "d"), "--no-progress", "--jobs", "1"]) == 0
    assert (tmp_path / "d" / "toy-long" / "results.json").exists()
