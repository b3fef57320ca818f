"""``reproduce --jobs``: studies side by side in child processes, within the cores, same numbers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from reweighting.cli import main
from reweighting.studies import STUDIES_ENV, Study, StudyOutcome
from reweighting.studies.parallel import CHILD_ENV, CORES_ENV, available_cores, last_progress, next_study, run_parallel


def _study(name: str, cores: int = 1, cost: float = 0.0) -> Study:
    return Study(name=name, claim="c", metric="m", lower_is_better=True,
                 run=lambda ctx: StudyOutcome(methods={"a": [1.0]}, holds=True, config={}), cores=cores, cost=cost)


def test_next_study_starts_the_costliest_that_fits():
    big, two, small = _study("big", cost=900), _study("two", cores=2, cost=1000), _study("small", cost=100)
    cores = {"big": 1, "two": 2, "small": 1}
    assert next_study([big, two, small], 2, cores) is two
    assert next_study([big, two, small], 1, cores) is big  # the two-core study does not fit in one
    assert next_study([two], 1, cores) is None
    assert next_study([], 2, cores) is None


def test_last_progress_reads_the_latest_redraw_of_a_progress_bar(tmp_path):
    log = tmp_path / "log.txt"
    log.write_bytes(b"[x] claim\nseeds:  10%|#  | 1/10\rseeds:  20%|## | 2/10\r")
    assert last_progress(log) == "seeds:  20%|## | 2/10"
    log.write_bytes(b"x" * 10_000 + b"\nthe end\n\n")
    assert last_progress(log) == "the end"
    assert last_progress(tmp_path / "missing.txt") == ""


def test_available_cores_follows_what_reproduce_gave(monkeypatch):
    monkeypatch.setenv(CORES_ENV, "3")
    assert available_cores() == 3
    monkeypatch.setenv(CORES_ENV, "0")  # not a core count: falls back to the machine's
    assert available_cores() >= 1
    monkeypatch.delenv(CORES_ENV)
    assert available_cores() >= 1


# A child writes when it started and ended, so the test can count how many ran at once.
CHILD = """
import os, sys, time
start = time.time(); time.sleep(float(sys.argv[2])); end = time.time()
open(sys.argv[1], "w").write(f"{start} {end} {os.environ['REWEIGHTING_CORES']}")
sys.exit(int(sys.argv[3]))
"""


def test_run_parallel_keeps_within_the_cores_and_survives_a_failure(tmp_path):
    studies = [_study("bad", cost=0), _study("c", cores=2, cost=1), _study("b", cost=2), _study("a", cost=3)]
    times = {s.name: tmp_path / f"{s.name}.times" for s in studies}

    def command(study):
        return [sys.executable, "-c", CHILD, str(times[study.name]), "0.6", "1" if study.name == "bad" else "0"]

    done, lines = [], []
    status = run_parallel(studies, 2, command, tmp_path, on_done=lambda s, code: done.append((s.name, code)),
                          report_every=0.2, poll=0.05, echo=lines.append)
    assert status == {"a": 0, "b": 0, "c": 0, "bad": 1}
    assert sorted(done) == sorted(status.items())
    spans = {n: tuple(map(float, p.read_text().split()[:2])) for n, p in times.items()}
    cores = {"a": 1, "b": 1, "c": 2, "bad": 1}
    for n, (start, _) in spans.items():  # at each start, the cores busy (the starter included) fit in 2
        busy = sum(cores[m] for m, (s, e) in spans.items() if s <= start < e)
        assert busy <= 2, (n, spans)
    assert times["c"].read_text().split()[2] == "2"  # the two-core study was told it has two
    assert max(spans["a"][0], spans["b"][0]) < min(spans["c"][0], spans["bad"][0])  # costliest first
    assert any("[bad] FAILED (exit status 1)" in line for line in lines)
    assert any("[a]" in line and "starting" in line or "[a] 0m" in line for line in lines)  # progress lines


def test_run_parallel_stops_its_children_when_interrupted(tmp_path):
    pid_file = tmp_path / "pid"
    script = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"

    def echo(line):
        if pid_file.exists():
            raise KeyboardInterrupt

    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        run_parallel([_study("sleeper")], 1, lambda s: [sys.executable, "-c", script], tmp_path,
                     on_done=lambda s, c: None, report_every=0.05, poll=0.05, echo=echo)
    assert time.perf_counter() - start < 30
    assert not _alive(int(pid_file.read_text()))


TOY_MODULE = """
from reweighting.studies import Study, StudyOutcome, register


def run(ctx):
    import torch
    g = torch.Generator().manual_seed(7)
    values = {{"uniform": [float(torch.rand(1, generator=g)) + s for s in ctx.seeds],
              "tilted": [float(torch.randn(3).sum()) + s for s in ctx.seeds]}}
    for _ in ctx.progress(range(3), desc="toy"):
        pass
    if {fail}:
        raise RuntimeError("this toy study breaks")
    if ctx.out_dir.name == "toy-par-noresult":
        import os
        os._exit(0)  # ends "successfully" without writing results.json
    return StudyOutcome(methods=values, holds=True, config={{}})


for name in {names}:
    register(Study(name=name, claim="toy", metric="m", lower_is_better=True, run=run, seeds=2, quick_seeds=2))
"""


@pytest.fixture
def toy_studies(tmp_path, monkeypatch):
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "toy_parallel_ok.py").write_text(textwrap.dedent(TOY_MODULE.format(
        fail=False, names=["toy-par-a", "toy-par-b", "toy-par-noresult"])))
    (tmp_path / "mods" / "toy_parallel_bad.py").write_text(textwrap.dedent(TOY_MODULE.format(
        fail=True, names=["toy-par-bad"])))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "mods"))
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    monkeypatch.setenv(STUDIES_ENV, "toy_parallel_ok, toy_parallel_bad")
    import reweighting.studies as studies

    monkeypatch.setattr(studies, "_DISCOVERED", False)
    monkeypatch.setattr(studies, "_REGISTRY", dict(studies._REGISTRY))  # the toys leave with the test
    monkeypatch.setattr(studies, "_FROM_MODULES", dict(studies._FROM_MODULES))
    for module in ("toy_parallel_ok", "toy_parallel_bad"):  # imported afresh, so they register again
        monkeypatch.delitem(sys.modules, module, raising=False)
    return tmp_path


def _numbers(out, name):
    r = json.loads((out / name / "results.json").read_text())
    return r["per_seed"], r["verdict"]


def test_reproduce_with_jobs_gives_the_numbers_of_one_process_and_reports_a_crash(toy_studies, capsys):
    serial, parallel = toy_studies / "serial", toy_studies / "parallel"
    assert main(["reproduce", "toy-par-a", "toy-par-b", "--jobs", "1", "--out", str(serial), "--no-progress"]) == 0
    # a study that crashes is reported (exit status 1) and the others still finish
    assert main(["reproduce", "toy-par-a", "toy-par-b", "toy-par-bad", "--jobs", "2", "--out", str(parallel)]) == 1
    for name in ("toy-par-a", "toy-par-b"):
        assert _numbers(serial, name) == _numbers(parallel, name)
        assert (parallel / name / "log.txt").exists()
    assert not (parallel / "toy-par-bad" / "results.json").exists()
    job = json.loads((parallel / "job.json").read_text())
    assert job["jobs"] == 2 and job["failed"] == ["toy-par-bad"] and job["seconds"] > 0
    assert job["studies"] == ["toy-par-a", "toy-par-b", "toy-par-bad"]
    assert "with at most 2 core(s) busy" in (parallel / "report.md").read_text()
    captured = capsys.readouterr()
    assert "[toy-par-a] claim: holds" in captured.out and "report:" in captured.out
    assert "toy-par-bad" in captured.err and "RuntimeError: this toy study breaks" in captured.out


def test_an_unimportable_study_module_is_a_clear_error(monkeypatch, capsys):
    import reweighting.studies as studies

    monkeypatch.setattr(studies, "_DISCOVERED", False)
    monkeypatch.setattr(studies, "_REGISTRY", dict(studies._REGISTRY))
    monkeypatch.setenv(STUDIES_ENV, "no_such_module_here")
    assert main(["list"]) == 2
    assert "REWEIGHTING_STUDIES: cannot import study module 'no_such_module_here'" in capsys.readouterr().err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_terminated_reproduce_ends_its_studies(tmp_path, sig):
    """SIGTERM (a job scheduler's kill) or SIGHUP (a closed terminal) to the parent must not leave
    studies, or their own children, running on their own."""
    pid_file = tmp_path / "pid"
    parent = f"""
import sys
from reweighting.studies import Study, StudyOutcome
from reweighting.studies.parallel import run_parallel
study = Study(name="s", claim="c", metric="m", lower_is_better=True, run=None)
script = ("import os, signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
          "g = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
          "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)']); "
          "open({str(pid_file)!r}, 'w').write(str(os.getpid()) + ' ' + str(g.pid)); time.sleep(60)")
import reweighting.studies.parallel as P
stop = P._stop
P._stop = lambda running: stop(running, grace=1.0)
run_parallel([study], 1, lambda s: [sys.executable, "-c", script], __import__("pathlib").Path({str(tmp_path)!r}),
             on_done=lambda s, c: None, poll=0.05)
"""
    process = subprocess.Popen([sys.executable, "-c", parent])
    deadline = time.time() + 60
    while not pid_file.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    process.send_signal(sig)
    assert process.wait(timeout=30) == 128 + sig
    # the child and its grandchild ignore SIGTERM: both are gone all the same
    for pid in map(int, pid_file.read_text().split()):
        assert not _alive(pid), pid


def _alive(pid: int, wait: float = 5.0) -> bool:
    """Whether a process still runs (a zombie waiting for its reaper does not count)."""
    deadline = time.time() + wait
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return False
        except (ProcessLookupError, FileNotFoundError):
            return False
        time.sleep(0.1)
    return True


def test_a_child_leaves_the_job_record_to_its_parent(toy_studies, monkeypatch):
    monkeypatch.setenv(CHILD_ENV, "1")
    out = toy_studies / "child"
    assert main(["reproduce", "toy-par-a", "--jobs", "1", "--out", str(out), "--no-progress"]) == 0
    assert (out / "toy-par-a" / "results.json").exists() and not (out / "job.json").exists()


def test_on_a_gpu_studies_run_one_at_a_time_unless_asked(toy_studies, monkeypatch):
    import torch

    import reweighting.cli as cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli._default_jobs("auto") == 1 and cli._default_jobs("cuda:0") == 1
    assert cli._default_jobs("cpu") == available_cores()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli._default_jobs("auto") == available_cores()


def test_reproduce_with_jobs_survives_odd_inputs(toy_studies, monkeypatch, capsys):
    """A name given twice runs once; an --out that looks like an option reaches the children; a
    study that ends without results fails alone; an earlier verdict does not stand in for a crash."""
    monkeypatch.chdir(toy_studies)
    out = toy_studies / "-res"
    (out / "toy-par-noresult").mkdir(parents=True)
    (out / "toy-par-noresult" / "results.json").write_text('{"stale": true}')
    code = main(["reproduce", "toy-par-a", "toy-par-a", "toy-par-noresult", "--jobs", "2", "--out=-res",
                 "--no-progress"])
    assert code == 1
    captured = capsys.readouterr()
    assert "toy-par-noresult" in captured.err and "could not be read" in captured.out
    assert json.loads((out / "job.json").read_text())["studies"] == ["toy-par-a", "toy-par-noresult"]
    assert (out / "toy-par-a" / "results.json").exists()
    assert not (out / "toy-par-noresult" / "results.json").exists()  # moved aside, not reported as this run's
    assert json.loads((out / "toy-par-noresult" / "results.previous.json").read_text()) == {"stale": True}


def test_a_broken_results_file_of_another_study_fails_only_the_report(toy_studies, capsys):
    out = toy_studies / "res"
    (out / "old").mkdir(parents=True)
    (out / "old" / "results.json").write_text('{"study": "old", tru')
    assert main(["reproduce", "toy-par-a", "toy-par-b", "--jobs", "2", "--out", str(out), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "FAILED" not in captured.out and "old/results.json is not valid JSON" in captured.err
    assert (out / "toy-par-a" / "results.json").exists() and (out / "toy-par-b" / "results.json").exists()


def test_a_study_registered_only_here_runs_here(toy_studies, capsys):
    from reweighting.studies import discoverable, get_study, register

    here = register(_study("toy-par-here"))
    assert not discoverable(here) and discoverable(get_study("toy-par-a"))
    out = toy_studies / "res"
    assert main(["reproduce", "toy-par-here", "toy-par-a", "--jobs", "2", "--out", str(out), "--no-progress"]) == 0
    assert "running one study at a time in this process: toy-par-here" in capsys.readouterr().out
    assert CORES_ENV not in os.environ  # --jobs bounds the command's own worker pools, and only while it runs
    assert not (out / "toy-par-a" / "log.txt").exists()  # no child process


@pytest.mark.parametrize("field, value", [("cores", 0), ("cores", -1), ("threads", 0), ("cost", float("nan")),
                                          ("cost", -1.0), ("seeds", 0)])
def test_a_study_with_a_bad_setting_is_refused(field, value):
    with pytest.raises(ValueError, match=field):
        Study(name="bad", claim="c", metric="m", lower_is_better=True, run=lambda ctx: None, **{field: value})
