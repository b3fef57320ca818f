"""Running untrusted generated code against its tests, in an operating-system sandbox, for a 0/1 reward.

The program is hostile: it may run any Python code and call any system call its process is allowed,
to make the evaluator report a pass it did not earn, to read or change anything outside its run, to
talk to the network or to other runs, to outlive its run or to exhaust the machine. The evaluator
and the problem's tests are trusted. ``docs/code-reward.md`` describes the design, every limit
with the bound measured on it, and what a correct program cannot do here.

In short: each run is a ``bwrap`` sandbox (fresh user, pid, network, ipc, uts, cgroup and mount
namespaces, a seccomp filter from :mod:`._seccomp`, resource limits, private tmpfs), as a user id of
its own when the evaluator is root (:mod:`._uids`), watched from outside by a process of its own
(:mod:`._watcher`). Inside, the harness (:mod:`._harness`) runs the tests in a process the program
cannot reach and calls the program's function in another, exchanging plain data only; the verdict
counts only with the run's random token. Modules: :mod:`._sandbox_types` (the values),
:mod:`._bwrap` (the command line), :mod:`._run` (one run).
"""

from __future__ import annotations

import ast
import builtins
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from . import _bwrap, _run, _uids
from ._bwrap import sandbox_python
from ._sandbox_types import ExecutionResult, SandboxLimits, SandboxUnavailable, TestedProgram

__all__ = ["SandboxLimits", "TestedProgram", "ExecutionResult", "SandboxUnavailable", "run_program",
           "run_programs", "code_reward", "humaneval_program", "mbpp_program", "prelude_of", "isolation_available",
           "sandbox_python"]

ISOLATIONS = ("bwrap", "none-unsafe")

_probe_lock = threading.Lock()
# key -> (reason the sandbox is unavailable or None, time.monotonic() of the check); a failure is
# checked again after _PROBE_RETRY seconds (it may have been a passing overload), a success is kept.
_probe_result: dict[tuple, tuple[str | None, float]] = {}
_PROBE_RETRY = 30.0
_SELF_TEST = TestedProgram("def f(x):\n    return [x, 2 ** 70]\n",
                           "def check(candidate):\n    assert candidate('a') == ['a', 2 ** 70]\n", "f")


def isolation_available() -> tuple[bool, str]:
    """Whether the bubblewrap sandbox works on this machine, and if not, why (with how to fix it).

    The check runs a known-good tested program through the whole sandbox, watcher and harness and
    requires ``"passed"``: a machine where anything they need is missing (user namespaces, ``ctypes``
    for ``prctl``, the interpreter, the seccomp filter's architecture) is refused here, rather than
    scoring every program 0. A success is kept for the life of the process; a failure is checked again
    after 30 seconds."""
    try:
        python = sandbox_python()
        key = (python, os.geteuid(), _uids.check_base() if os.geteuid() == 0 else None)
        with _probe_lock:
            cached = _probe_result.get(key)
            if cached is None or (cached[0] is not None and time.monotonic() - cached[1] > _PROBE_RETRY):
                try:
                    result = _run.run(_SELF_TEST, SandboxLimits(wall_seconds=60), "bwrap")
                    reason = None if result.passed else (
                        f"a known-good program ended with {result.status!r} ({result.detail}); "
                        f"stderr: {result.stderr.strip()[-1000:]!r}")
                except (OSError, subprocess.SubprocessError) as err:
                    reason = f"bwrap could not be started: {err}"
                _probe_result[key] = (reason, time.monotonic())
            reason = _probe_result[key][0]
    except SandboxUnavailable as err:
        return False, str(err)
    if reason is not None:
        return False, f"the operating-system sandbox does not start on this machine: {reason}; {_bwrap.INSTALL_HINT}"
    return True, ""


def run_program(program: str | TestedProgram, limits: SandboxLimits | None = None, *,
                isolation: str = "bwrap") -> ExecutionResult:
    """Run ``program`` in the sandbox and report how it ended. Never raises for anything the program
    does; raises :class:`SandboxUnavailable` when the sandbox cannot start.

    ``isolation="none-unsafe"`` runs the same harness with the limits but without any namespace,
    filter or watcher: the program can do whatever the caller's user can, forge a pass included. It
    exists for machines without user namespaces where the programs are trusted; never use it for
    generated code (:func:`code_reward` refuses it unless ``trust_programs=True``)."""
    limits = limits or SandboxLimits()
    if not isinstance(limits, SandboxLimits):
        raise TypeError(f"limits must be a SandboxLimits, got {type(limits).__name__}")
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    spec = _run.spec_of(program, limits, isolation)  # validates the program before anything starts
    if isolation == "bwrap":
        ok, reason = isolation_available()
        if not ok:
            raise SandboxUnavailable(reason)
    return _run.run(program, limits, isolation, spec)


def _checked(programs: Iterable, workers: int, isolation: str, kinds: tuple) -> list:
    programs = list(programs)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    for i, program in enumerate(programs):
        if not isinstance(program, kinds):
            raise TypeError(f"programs[{i}] must be a TestedProgram or a str, got {type(program).__name__}")
    if isolation == "bwrap" and programs:
        ok, reason = isolation_available()
        if not ok:
            raise SandboxUnavailable(reason)
    return programs


def _map(one: Callable, programs: list, workers: int, progress: bool) -> list:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(one, programs)
        if not progress:
            return list(results)
        from tqdm.auto import tqdm

        return list(tqdm(results, total=len(programs), desc="run programs", leave=False))


def run_programs(programs: Iterable[str | TestedProgram], limits: SandboxLimits | None = None, *,
                 workers: int = 4, progress: bool = False, isolation: str = "bwrap") -> list[ExecutionResult]:
    """:func:`run_program` on many programs, ``workers`` at a time (each run is its own sandbox, with a
    user id of its own when the evaluator is root, so concurrent runs share no per-user budget)."""
    programs = _checked(programs, workers, isolation, (str, TestedProgram))
    return _map(lambda program: run_program(program, limits, isolation=isolation), programs, workers, progress)


def code_reward(programs: Sequence[TestedProgram], limits: SandboxLimits | None = None, *, workers: int = 4,
                isolation: str = "bwrap", trust_programs: bool = False, progress: bool = False) -> list[float]:
    """1.0 for each program whose tests the harness ran and saw pass (status ``"passed"``), else 0.0.
    Only the reward of each run is kept, not its output.

    ``isolation="none-unsafe"`` is refused unless ``trust_programs=True``: without the sandbox a
    program can forge a pass (and do anything its user can), so the reward means nothing for
    programs that are not trusted."""
    if isolation == "none-unsafe" and trust_programs is not True:
        raise ValueError("code_reward: isolation='none-unsafe' runs programs without any isolation, where a "
                         "program can forge a pass; pass trust_programs=True only for programs you trust, or use "
                         "isolation='bwrap'")
    programs = list(programs)
    for i, program in enumerate(programs):
        if not isinstance(program, TestedProgram):
            raise TypeError(
                f"code_reward: programs[{i}] must be a TestedProgram (from humaneval_program, mbpp_program or "
                f"TestedProgram(source, test, entry_point)), got {type(program).__name__}; a plain source "
                f"string cannot be rewarded because its only verdict is its own exit, which it can forge")
    programs = _checked(programs, workers, isolation, (TestedProgram,))
    return _map(lambda program: 1.0 if run_program(program, limits, isolation=isolation).passed else 0.0,
                programs, workers, progress)


# ---------------------------------------------------------------------------------------- problems
def _compiles(source: str) -> bool:
    try:
        compile(source, "<prelude>", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def prelude_of(prompt: str, entry_point: str) -> str:
    """The trusted part of a prompt that the tests run before themselves (HumanEval's ``poly``, the
    imports): the prompt itself when it compiles alone; otherwise (a bare signature ``def add(a, b):``,
    a body of comments only) the prompt up to the entry point's own ``def``, or else its top-level
    import lines, whichever compiles first; else nothing."""
    candidates = [prompt]
    found = re.search(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(entry_point)}[ \t]*\(", prompt, re.M)
    if found:
        candidates.append(prompt[: found.start()])
    candidates.append("".join(line for line in prompt.splitlines(keepends=True)
                              if re.match(r"(?:import|from)[ \t]", line)))
    return next((c for c in candidates if _compiles(c)), "")


def humaneval_program(problem: dict, completion: str) -> TestedProgram:
    """The tested program of one HumanEval-style completion: the untrusted source is prompt + completion;
    the prompt's trusted part (:func:`prelude_of`: helpers such as ``poly``) and ``test`` run in the
    harness, which calls ``check(<entry_point>)``."""
    if not isinstance(problem, dict):
        raise TypeError(f"problem must be a dict, got {type(problem).__name__}")
    for key in ("prompt", "test", "entry_point"):
        if key not in problem:
            raise ValueError(f"problem is missing the field {key!r}")
        if not isinstance(problem[key], str):
            raise TypeError(f"problem[{key!r}] must be a str, got {type(problem[key]).__name__}")
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    return TestedProgram(source=f"{problem['prompt']}{completion}\n", test=problem["test"],
                         entry_point=problem["entry_point"], prelude=prelude_of(problem["prompt"],
                                                                                problem["entry_point"]))


def _called_function(assertion: str, where: str) -> str:
    """The first function the assertion calls by a plain name that is not a built-in."""
    try:
        tree = ast.parse(assertion)
    except SyntaxError as err:
        raise ValueError(f"{where} is not valid Python: {err}") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not hasattr(builtins, node.func.id):
            return node.func.id
    raise ValueError(f"{where} calls no function of the program: {assertion!r}")


def mbpp_program(problem: dict, completion: str) -> TestedProgram:
    """The tested program of one MBPP-style completion. ``problem`` has ``test_list`` (assert statements
    that call the program's function by name, ``assert add(1, 2) == 3``) and optionally
    ``test_setup_code``; the completion is the whole program. The function under test is the first
    non-built-in function the first assertion calls; the assertions become ``check``, in which that
    name is the harness's stand-in for the program's function."""
    if not isinstance(problem, dict):
        raise TypeError(f"problem must be a dict, got {type(problem).__name__}")
    tests = problem.get("test_list")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise ValueError(f"problem['test_list'] must be a non-empty list of assert statements (str), got {tests!r}")
    setup = problem.get("test_setup_code", "") or ""
    if not isinstance(setup, str):
        raise TypeError(f"problem['test_setup_code'] must be a str, got {type(setup).__name__}")
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    entry_point = _called_function(tests[0], "problem['test_list'][0]")
    for i, test in enumerate(tests):
        _called_function(test, f"problem['test_list'][{i}]")
    body = "".join(f"    {line}\n" for test in tests for line in test.strip().splitlines())
    return TestedProgram(source=f"{completion}\n", test=f"{setup}\n\ndef check(candidate):\n{body}",
                         entry_point=entry_point)
