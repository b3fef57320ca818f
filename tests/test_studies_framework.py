import json

import pytest

from reweighting import report
from reweighting.cli import main
from reweighting.studies import Study, StudyOutcome, all_studies, register, run_study, summarize


def _toy_run(ctx):
    # a metric that depends on the seed, so mean and std are real
    values = {"uniform": [1.0 + 0.1 * s for s in ctx.seeds], "tilted": [0.5 + 0.1 * s for s in ctx.seeds]}
    for _ in ctx.progress(range(3), desc="toy"):
        pass
    holds = sum(values["tilted"]) < sum(values["uniform"])
    return StudyOutcome(methods=values, holds=holds, config={"steps": 3 if ctx.quick else 30},
                        summary="toy summary")


TOY = Study(name="toy-framework", claim="tilted beats uniform", metric="loss", lower_is_better=True,
            run=_toy_run, seeds=3, quick_seeds=2, description="a study used by the tests")


@pytest.fixture(autouse=True)
def _register_toy():
    register(TOY)


def test_summarize():
    s = summarize([1.0, 2.0, 3.0])
    assert s == {"mean": 2.0, "std": 1.0, "n": 3}
    assert summarize([4.0])["std"] == 0.0
    with pytest.raises(ValueError):
        summarize([])


def test_run_study_writes_results_with_the_required_fields(tmp_path):
    r = run_study(TOY, quick=True, out_dir=tmp_path, show_progress=False)
    on_disk = json.loads((tmp_path / "toy-framework" / "results.json").read_text())
    assert on_disk == r
    for key in ("study", "claim", "metric", "lower_is_better", "methods", "holds", "quick", "seconds", "config"):
        assert key in r
    assert r["methods"]["uniform"]["n"] == 2 and r["quick"] is True and r["holds"] is True
    assert r["config"]["steps"] == 3


def test_cli_list_and_reproduce_and_report(tmp_path, capsys):
    assert "toy-framework" in all_studies()
    assert main(["list"]) == 0
    assert "toy-framework" in capsys.readouterr().out
    assert main(["reproduce", "toy-framework", "--quick", "--seeds", "3", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "claim holds" in out
    text = (tmp_path / "report.md").read_text()
    assert "## toy-framework" in text and "| tilted |" in text and "toy summary" in text
    assert (tmp_path / "toy-framework" / "methods.png").stat().st_size > 1000
    # --skip-existing does not rerun a study done in the same mode
    assert main(["reproduce", "toy-framework", "--quick", "--seeds", "3", "--out", str(tmp_path),
                 "--skip-existing"]) == 0
    assert "skipped" in capsys.readouterr().out


def test_report_keeps_other_studies(tmp_path):
    run_study(TOY, quick=True, out_dir=tmp_path, show_progress=False)
    other = Study(name="toy-other", claim="c", metric="m", lower_is_better=False,
                  run=lambda ctx: StudyOutcome(methods={"a": [1.0]}, holds=False, config={}))
    run_study(other, quick=True, out_dir=tmp_path, show_progress=False)
    text = report.build_report(tmp_path).read_text()
    assert "## toy-framework" in text and "## toy-other" in text and "| NO |" in text


def test_unknown_study_is_a_clear_error(capsys):
    assert main(["reproduce", "no-such-study"]) == 2
    assert "unknown study 'no-such-study'" in capsys.readouterr().err
