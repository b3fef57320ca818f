"""The published results: docs/results.json is the one source, README.md and docs/studies.md render it."""

import json
from pathlib import Path

import pytest

from reweighting.cli import main
from reweighting.studies import PartSpec, Protocol, Study, StudyOutcome, compare, register
from reweighting.studies.publish import (
    END,
    PUBLISHED_FILES,
    START,
    SUMMARY_FILE,
    publish,
    render_tables,
    replace_block,
    summarize_results,
)

ROOT = Path(__file__).resolve().parents[2]


def _block(text: str) -> str:
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n")


def test_the_committed_summary_is_what_the_readme_and_docs_show():
    summary_path = ROOT / SUMMARY_FILE
    assert summary_path.exists(), f"{SUMMARY_FILE} is missing: run 'reweighting report --out results --publish'"
    summary = json.loads(summary_path.read_text())
    checked = 0
    for name, with_parts in PUBLISHED_FILES.items():
        path = ROOT / name
        if path.exists():
            assert _block(path.read_text()) == render_tables(summary, with_parts), (
                f"{name} disagrees with {SUMMARY_FILE}: run 'reweighting report --out results --publish'")
            checked += 1
    assert checked >= 1
    # every study of the package is in it, each with its protocol's fingerprint and numbers for every part
    from reweighting.studies import all_studies

    published = {s["study"]: s for s in summary["studies"]}
    for name, study in all_studies().items():
        if study.run.__module__.startswith("reweighting.studies."):
            assert name in published, f"study {name} has no published result"
            entry = published[name]
            if study.protocol is not None:
                assert entry["fingerprint"] == study.protocol(entry["quick"]).fingerprint(), (
                    f"{name}: the published result was made under another protocol than the code declares")
            assert all(p["margin"] is not None for p in entry["parts"])


def _toy(ctx):
    a, b = [1.0 + 0.01 * s for s in ctx.seeds], [0.5 + 0.02 * s for s in ctx.seeds]
    part = compare("a > b", a, b, expected=0.1)
    return StudyOutcome(methods={"a": a, "b": b}, holds=part.verdict == "holds", config={}, parts=[part])


PROTO = Protocol(claim="a beats b", metric="m", parts=(PartSpec("a > b", "better", expected=0.1),), seeds=3)
TOY = Study(name="toy-publish", claim="a beats b", metric="m", lower_is_better=False, run=_toy,
            protocol=lambda quick: PROTO)


def test_publish_writes_the_summary_and_rewrites_only_the_block(tmp_path):
    register(TOY)
    out = tmp_path / "results"
    assert main(["reproduce", "toy-publish", "--out", str(out), "--no-progress", "--jobs", "1"]) == 0
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "README.md").write_text(f"# Title\n\nbefore\n{START}\nstale\n{END}\nafter\n")
    assert main(["report", "--out", str(out), "--publish", str(root)]) == 0
    summary = json.loads((root / SUMMARY_FILE).read_text())
    entry = summary["studies"][0]
    assert entry["study"] == "toy-publish" and entry["fingerprint"] == PROTO.fingerprint()
    assert entry["parts"][0]["verdict"] == "holds" and entry["parts"][0]["mde"] is not None
    readme = (root / "README.md").read_text()
    assert readme.startswith("# Title\n\nbefore\n") and readme.endswith(f"{END}\nafter\n")
    assert _block(readme) == render_tables(summary, parts=False) and "stale" not in readme
    assert "| toy-publish | **holds** | 1 of 1 |" in readme and "| toy-publish | a > b |" not in readme
    assert "1 study," in render_tables(summary)  # the job line, singular
    assert "| toy-publish | a > b | holds | +0.490 |" in render_tables(summary)
    # idempotent
    publish(out, root)
    assert (root / "README.md").read_text() == readme


def test_publish_refuses_missing_or_doubled_markers_and_empty_results(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        replace_block("no markers", "x", "README.md")
    with pytest.raises(ValueError, match="exactly one"):
        replace_block(f"{START}\n{END}\n{START}\n{END}\n", "x", "README.md")
    with pytest.raises(ValueError, match="exactly one"):
        replace_block(f"{END}\n{START}\n", "x", "README.md")
    with pytest.raises(ValueError, match="no results.json"):
        summarize_results(tmp_path)
    assert main(["report", "--out", str(tmp_path), "--publish", str(tmp_path / "nowhere")]) == 2


def test_render_counts_decided_parts_and_marks_failed_baselines():
    summary = {"job": None, "studies": [{
        "study": "s", "verdict": "inconclusive", "quick": False, "seeds": 5, "selection_seeds": 2, "fingerprint": "f",
        "baseline": {"measure": "m", "value": 0.3, "bar": 0.5, "higher_is_better": True, "healthy": False},
        "parts": [{"name": "p1", "verdict": "holds", "margin": 0.1, "noise": 0.05, "mde": 0.07},
                  {"name": "p2", "verdict": "underpowered", "margin": 0.01, "noise": 0.05, "mde": 0.07},
                  {"name": "p3", "verdict": "does not hold", "margin": -0.2, "noise": 0.05, "mde": 0.07}]}]}
    text = render_tables(summary)
    assert "| s | **inconclusive** | 2 of 3 | FAILED (0.300 >= 0.500) | 5 (2) | `f` |" in text
    assert "2 of 3 parts decided" in text and "| s | p2 | underpowered | +0.010 | 0.050 | 0.070 |" in text


def test_a_part_smaller_than_claimed_counts_as_decided():
    summary = {"job": None, "studies": [{
        "study": "s", "verdict": "smaller than claimed", "quick": False, "seeds": 5, "selection_seeds": 0,
        "fingerprint": "f", "baseline": None,
        "parts": [{"name": "p1", "verdict": "holds", "margin": 0.1, "noise": 0.05, "mde": 0.07},
                  {"name": "p2", "verdict": "smaller than claimed", "margin": 0.0, "noise": 0.01, "mde": 0.014}]}]}
    text = render_tables(summary)
    assert "| s | **smaller than claimed** | 2 of 2 |" in text and "2 of 2 parts decided" in text


def test_publish_sets_a_reruns_verdicts_beside_and_says_where_they_differ(tmp_path, monkeypatch, capsys):
    register(TOY)
    out, rerun = tmp_path / "results", tmp_path / "rerun"
    assert main(["reproduce", "toy-publish", "--out", str(out), "--no-progress", "--jobs", "1"]) == 0
    assert main(["reproduce", "toy-publish", "--out", str(rerun), "--no-progress", "--jobs", "1",
                 "--perturb", "ulp"]) == 0
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "README.md").write_text(f"{START}\n{END}\n")
    assert main(["report", "--out", str(out), "--publish", str(root), "--rerun", str(rerun)]) == 0
    entry = json.loads((root / SUMMARY_FILE).read_text())["studies"][0]
    assert entry["rerun"] == {"perturbation": "ulp", "verdict": "holds", "parts": {"a > b": "holds"}}
    assert "| `" + PROTO.fingerprint() + "` | yes (ulp) |" in (root / "README.md").read_text()
    assert "| toy-publish | a > b | holds | +0.490 | " in render_tables(json.loads((root / SUMMARY_FILE).read_text()))
    # a rerun whose part turned: the study row says so, and the part's row shows the rerun's verdict
    path = rerun / "toy-publish" / "results.json"
    record = json.loads(path.read_text())
    record["parts"][0]["margin"] = -1.0
    path.write_text(json.dumps(record))
    summary = summarize_results(out, rerun)
    assert summary["studies"][0]["rerun"]["verdict"] == "does not hold"
    text = render_tables(summary)
    assert "**no** (ulp: does not hold, 0 of 1 parts agree)" in text
    row = next(line for line in text.splitlines() if line.startswith("| toy-publish | a > b |"))
    assert row.startswith("| toy-publish | a > b | holds |") and row.endswith("| does not hold |")
    # without a rerun the tables say so; --rerun alone, or a rerun of another protocol, is refused
    assert "not rerun" in render_tables(summarize_results(out))
    assert main(["report", "--out", str(out), "--rerun", str(rerun)]) == 2
    assert "--rerun goes with --publish" in capsys.readouterr().err
    record["fingerprint"] = "0" * 16
    path.write_text(json.dumps(record))
    assert main(["report", "--out", str(out), "--publish", str(root), "--rerun", str(rerun)]) == 2
    assert "different protocols" in capsys.readouterr().err
