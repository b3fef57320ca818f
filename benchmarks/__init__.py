"""Speed and memory benchmarks, each measured as a ratio against a baseline in the same run.

Run one with ``python -m benchmarks.<name>`` or all with ``python -m benchmarks``. These machines
are shared and noisy, so every benchmark interleaves the variants it compares, repeats them, and
reports medians and the median ratio; results are also written to ``bench-results/<name>.json``.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["time_interleaved", "median_ratio", "write_results", "print_table", "status_bytes", "reset_peak_rss",
           "peak_rss_growth_mib", "peak_mib_in_subprocess"]


def time_interleaved(
    variants: dict[str, Callable[[], Any]], *, repeats: int = 20, warmup: int = 3, inner: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each variant, alternating between variants on every repeat.

    Alternating spreads the machine's slow and fast moments evenly over the variants, so that
    their ratio is meaningful even when absolute times drift.
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            gc.collect()
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner)
    return times


def median_ratio(times: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median over repeats of the per-repeat ratio ``name / baseline`` (paired, so drift cancels)."""
    return statistics.median(a / b for a, b in zip(times[name], times[baseline]))


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write ``bench-results/<name>.json``."""
    folder = Path("bench-results")
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Print rows as a markdown table with the given columns."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        print("| " + " | ".join(cells) + " |")


def status_bytes(field: str) -> int:
    """A size field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...) in bytes (Linux only)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def reset_peak_rss() -> None:
    """Reset the peak resident size (``VmHWM``) to the current one (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_growth_mib(fn: Callable[[], Any]) -> float:
    """How far the peak resident size rises above the current one while ``fn()`` runs, in MiB.

    Torch's CPU allocations are invisible to ``tracemalloc``; the kernel's high-water mark sees them.
    Run it in a fresh process per case, so that memory freed by an earlier case does not hide a peak.
    """
    before = status_bytes("VmRSS")
    reset_peak_rss()
    fn()
    return (status_bytes("VmHWM") - before) / 2**20


def peak_mib_in_subprocess(code: str) -> float:
    """Run ``code`` in a fresh interpreter; it must print ``{"peak_mib": ...}`` as its last line
    (e.g. from :func:`peak_rss_growth_mib`). A fresh process per case keeps earlier cases' freed
    memory from hiding a peak."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
