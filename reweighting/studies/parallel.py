"""Run several studies at once, each in its own process, within a number of cores.

``reweighting reproduce --jobs N`` hands every study to a child process (``python -m reweighting
reproduce STUDY``) and keeps at most ``N`` cores busy: a study occupies ``Study.cores`` of them
(its worker pool or its thread count). Among the studies that fit in the free cores, the one with
the largest ``Study.cost`` starts first (longest-first packing keeps the last lane from running
alone for long).

A study's numbers do not depend on this: each child runs ``run_study`` exactly as one process
would, with the study's own fixed thread count and seeds. Each child's output (its progress bars
included) goes to ``<out>/<study>/log.txt``; the parent prints, at least every ``report_every``
seconds, one line per running study with its elapsed time and its latest progress, so a long run is
never silent. A child that fails is reported with the end of its log; the others carry on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import Study

__all__ = ["StudyProcess", "run_parallel", "next_study", "last_progress", "available_cores", "LOG_FILE", "CORES_ENV",
           "CHILD_ENV"]

LOG_FILE = "log.txt"
# A study in a child process learns how many cores it was given from this variable (a worker pool
# sizes itself by it); unset, it uses every core it may run on.
CORES_ENV = "REWEIGHTING_CORES"
# Set in a child: the parent, not the child, writes the whole job's record (job.json) and the report,
# once every study has ended (a child reading its siblings' results mid-write saw half a file).
CHILD_ENV = "REWEIGHTING_REPRODUCE_CHILD"


@dataclass
class StudyProcess:
    """A study running in a child process."""

    study: Study
    cores: int
    process: subprocess.Popen
    log: Path
    started: float = field(default_factory=time.perf_counter)


def available_cores() -> int:
    """The cores given by ``reproduce --jobs`` to this study's process (``REWEIGHTING_CORES``), else
    every core this process may run on."""
    given = os.environ.get(CORES_ENV, "")
    if given.isdigit() and int(given) >= 1:
        return int(given)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def next_study(pending: Sequence[Study], free: int, cores: dict[str, int]) -> Study | None:
    """The pending study to start next in ``free`` cores (``cores[name]``: what each one takes):
    the costliest that fits, or None when none fits."""
    fitting = [s for s in pending if cores[s.name] <= free]
    return max(fitting, key=lambda s: s.cost, default=None)


def _tail(log: Path, tail_bytes: int) -> list[str]:
    """The non-empty lines of the end of a log (a progress bar's redraws, split at ``\\r``, count as
    lines), without control characters; reads at most ``tail_bytes``."""
    try:
        with open(log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - tail_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    lines = (s.strip() for s in text.replace("\r", "\n").split("\n"))
    return [s for s in ("".join(c for c in line if c.isprintable()) for line in lines) if s]


def last_progress(log: Path, tail_bytes: int = 4096) -> str:
    """The latest progress line of a child's log: the last non-empty segment between carriage
    returns and newlines (a progress bar redraws itself with ``\\r``)."""
    lines = _tail(log, tail_bytes)
    return lines[-1] if lines else ""


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def _stop(running: Sequence[StudyProcess], grace: float = 10.0) -> None:
    """End every child and its own children (a study's worker pool): each runs in its own process
    group. SIGTERM first; after ``grace`` seconds SIGKILL to every group, so that nothing that
    ignores SIGTERM, a grandchild included, is left. A second Ctrl-C does not cut this short."""
    def signal_groups(sig: int) -> None:
        for r in running:
            try:
                os.killpg(r.process.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    old_int = None
    if threading.current_thread() is threading.main_thread():
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        signal_groups(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for r in running:
            try:
                r.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        signal_groups(signal.SIGKILL)
        for r in running:
            r.process.wait()
    finally:
        if old_int is not None:
            signal.signal(signal.SIGINT, old_int)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    return f"exit status {code}"


def run_parallel(
    studies: Sequence[Study],
    jobs: int,
    command: Callable[[Study], list[str]],
    out_dir: Path,
    *,
    on_done: Callable[[Study, int], None],
    report_every: float = 30.0,
    poll: float = 0.5,
    echo: Callable[[str], None] = print,
) -> dict[str, int]:
    """Run ``command(study)`` for every study, at most ``jobs`` cores at once; returns each study's
    exit status. ``on_done(study, status)`` is called as each child ends."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    # A study that wants more cores than there are gets all of them (it would otherwise never start).
    fitted = {s.name: min(s.cores, jobs) for s in studies}
    pending = list(studies)
    running: list[StudyProcess] = []
    status: dict[str, int] = {}
    start = last_report = time.perf_counter()
    # The children run in their own sessions (so that their worker pools can be ended with them), out
    # of reach of the terminal's Ctrl-C and hang-up and of a SIGTERM sent to this process: all end them here.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, _terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        while pending or running:
            free = jobs - sum(r.cores for r in running)
            while pending:
                nxt = next_study(pending, free, fitted)
                if nxt is None:
                    break
                pending.remove(nxt)
                log = out_dir / nxt.name / LOG_FILE
                env = {**os.environ, CORES_ENV: str(fitted[nxt.name]), CHILD_ENV: "1",
                       # a progress bar in a log file: a redraw every few seconds is enough
                       "TQDM_MININTERVAL": os.environ.get("TQDM_MININTERVAL", "5")}
                try:
                    log.parent.mkdir(parents=True, exist_ok=True)
                    with open(log, "wb") as f:
                        process = subprocess.Popen(command(nxt), stdout=f, stderr=subprocess.STDOUT, env=env,
                                                   stdin=subprocess.DEVNULL, start_new_session=True)
                except OSError as err:  # this study's own failure: the others carry on
                    echo(f"[{nxt.name}] FAILED to start: {err}")
                    status[nxt.name] = 1
                    on_done(nxt, 1)
                    continue
                running.append(StudyProcess(nxt, fitted[nxt.name], process, log))
                free -= fitted[nxt.name]
                echo(f"[{nxt.name}] started on {fitted[nxt.name]} core(s) at {_clock(time.perf_counter() - start)}; "
                     f"log: {log}")
            time.sleep(poll)
            for r in [r for r in running if r.process.poll() is not None]:
                running.remove(r)
                code = r.process.returncode
                status[r.study.name] = code
                if code != 0:
                    tail = _tail(r.log, 64 * 1024)[-15:]
                    echo(f"[{r.study.name}] FAILED ({_describe_exit(code)}) after "
                         f"{_clock(time.perf_counter() - r.started)}; end of {r.log}:\n    " + "\n    ".join(tail))
                on_done(r.study, code)
            now = time.perf_counter()
            if running and now - last_report >= report_every:
                last_report = now
                for r in running:
                    echo(f"  {_clock(now - start)} [{r.study.name}] {_clock(now - r.started)}: "
                         f"{last_progress(r.log) or 'starting'}")
    except BaseException:
        _stop(running)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)
