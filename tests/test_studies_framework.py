import json

import pytest
import torch

from reweighting.cli import main
from reweighting.studies import (
    DOES_NOT_HOLD,
    HOLDS,
    INCONCLUSIVE,
    UNDERPOWERED,
    Study,
    StudyOutcome,
    all_studies,
    check_baseline,
    compare,
    decide,
    register,
    report,
    run_study,
    summarize,
)


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
    assert "holds" in out
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
    assert "## toy-framework" in text and "## toy-other" in text and "| does not hold |" in text


def test_unknown_study_is_a_clear_error(capsys):
    assert main(["reproduce", "no-such-study"]) == 2
    assert "unknown study 'no-such-study'" in capsys.readouterr().err


def test_compare_margin_and_paired_noise():
    # a - b = [2, 2.2, 1.8]: mean 2, sd 0.2, n 3 -> noise t(0.975, 2) * 0.2 / sqrt(3)
    part = compare("a beats b", [3.0, 4.2, 4.8], [1.0, 2.0, 3.0])
    assert part.margin == pytest.approx(2.0) and part.noise == pytest.approx(4.303 * 0.2 / 3 ** 0.5, rel=1e-4)
    assert part.verdict == HOLDS
    # lower is better flips the sign: a's larger values are worse
    assert compare("x", [3.0, 4.2, 4.8], [1.0, 2.0, 3.0], lower_is_better=True).verdict == DOES_NOT_HOLD
    # within the noise: neither way
    assert compare("x", [1.0, 3.0, 2.1], [2.0, 2.0, 2.0]).verdict == INCONCLUSIVE
    # "not worse" is non-inferiority within a tolerance: a wide interval no longer "holds" for want of evidence
    assert compare("x", [1.0, 3.0, 2.1], [2.0, 2.0, 2.0], kind="not worse", tolerance=0.1).verdict == UNDERPOWERED
    assert compare("x", [1.95, 2.0, 2.02], [2.0, 2.0, 2.0], kind="not worse", tolerance=0.5).verdict == HOLDS
    assert compare("x", [1.0, 1.1, 0.9], [2.0, 2.0, 2.0], kind="not worse", tolerance=0.1).verdict == DOES_NOT_HOLD
    # one seed: no noise estimate, decided by the sign
    one = compare("x", [1.0], [0.5])
    assert one.noise is None and one.verdict == HOLDS
    with pytest.raises(ValueError, match="equal, non-zero length"):
        compare("x", [1.0, 2.0], [1.0])


def test_decide_and_baseline():
    good, bad = compare("g", [2.0, 3.0, 4.0], [1.0, 1.9, 3.1]), compare("b", [1.0, 1.0, 1.1], [2.0, 2.0, 2.0])
    within = compare("w", [1.0, 3.0, 2.1], [2.0, 2.0, 2.0])
    healthy, broken = check_baseline("acc", 0.9, 0.5), check_baseline("acc", 0.3, 0.5)
    assert healthy.healthy and not broken.healthy
    assert not check_baseline("loss", 2.0, 1.0, higher_is_better=False).healthy
    assert not check_baseline("acc", float("nan"), 0.5).healthy
    assert decide([good], healthy) == HOLDS
    assert decide([good, bad], healthy) == DOES_NOT_HOLD
    assert decide([good, within], healthy) == INCONCLUSIVE
    # a broken baseline makes even a failing comparison inconclusive, never "does not hold"
    assert decide([good, bad], broken) == INCONCLUSIVE


def _parts_run(ctx):
    parts = [compare("a beats b", [2.0, 3.0, 4.0], [1.0, 1.9, 3.1])]
    return StudyOutcome(methods={"a": [2.0, 3.0, 4.0], "b": [1.0, 1.9, 3.1]}, holds=True, config={},
                        parts=parts, baseline=check_baseline("base accuracy", 0.2, 0.5), left_out=["peer: missing"])


def test_unhealthy_baseline_is_inconclusive_in_results_and_report(tmp_path):
    study = Study(name="toy-parts", claim="a beats b", metric="m", lower_is_better=False, run=_parts_run)
    with pytest.raises(ValueError, match="disagrees"):
        run_study(study, out_dir=tmp_path, show_progress=False)  # holds=True, but the baseline is broken
    ok = Study(name="toy-parts", claim="a beats b", metric="m", lower_is_better=False,
               run=lambda ctx: StudyOutcome(**{**_parts_run(ctx).__dict__, "holds": False}))
    r = run_study(ok, out_dir=tmp_path, show_progress=False)
    assert r["verdict"] == INCONCLUSIVE and r["baseline_healthy"] is False and r["holds"] is False
    assert r["baseline"]["value"] == 0.2 and r["baseline"]["bar"] == 0.5
    assert r["parts"][0]["verdict"] == HOLDS and r["left_out"] == ["peer: missing"]
    text = report.build_report(tmp_path, plots=False).read_text()
    assert "| a beats b | holds | +" in text and "UNHEALTHY (0.2, bar >= 0.5)" in text
    assert "| [toy-parts](#toy-parts) | inconclusive |" in text and "peer: missing" in text


def test_run_study_fixes_threads_and_restores_them(tmp_path):
    seen = {}

    def run(ctx):
        seen["threads"] = torch.get_num_threads()
        seen["draw"] = torch.rand(1).item()
        return StudyOutcome(methods={"a": [1.0]}, holds=True, config={})

    before = torch.get_num_threads()
    torch.manual_seed(123)
    study = Study(name="toy-threads", claim="c", metric="m", lower_is_better=False, run=run, threads=1)
    run_study(study, out_dir=tmp_path, show_progress=False)
    first = seen["draw"]
    torch.rand(5)
    run_study(study, out_dir=tmp_path, show_progress=False)
    assert seen["threads"] == 1 and seen["draw"] == first  # the global generator is seeded per study
    assert torch.get_num_threads() == before and not torch.are_deterministic_algorithms_enabled()


def test_cpu_seconds_count_worker_processes(tmp_path):
    import subprocess
    import sys

    def run(ctx):
        # the work happens in a child process, as in a study's worker pool
        subprocess.run([sys.executable, "-c", "sum(range(20_000_000))"], check=True)
        return StudyOutcome(methods={"a": [1.0]}, holds=True, config={})

    r = run_study(Study(name="toy-cpu", claim="c", metric="m", lower_is_better=False, run=run), out_dir=tmp_path,
                  show_progress=False)
    assert r["cpu_seconds"] > 0.1
