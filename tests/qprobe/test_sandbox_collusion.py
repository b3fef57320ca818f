"""Copies of one program scored at the same time must not be able to work together.

The test hides two booleans. Each copy of the colluding program claims a distinct index among the
copies alive at the same time, through a lock on a file that every run sees (``/usr``), with
``flock``, POSIX ``lockf`` or an open-file-description lock, and answers the index's pair of
booleans: among four concurrent copies with distinct indices, one answers right. A copy that gets no
index answers the first pair, which is wrong. Unsandboxed (the control), copies collude and one
passes; sandboxed, none may.
"""

import pytest

from reweighting.qprobe.sandbox import SandboxLimits, TestedProgram, code_reward, isolation_available, run_programs

pytestmark = pytest.mark.skipif(not isolation_available()[0], reason=isolation_available()[1])

LIMITS = SandboxLimits(wall_seconds=8.0, cpu_seconds=2, memory_bytes=256 << 20, max_processes=8)
TEST = "def check(candidate):\n    assert candidate(0) is True\n    assert candidate(1) is False\n"
COLLUDE = r'''
import fcntl, os, time
CANDIDATES = sorted(os.path.join("/usr/bin", n) for n in os.listdir("/usr/bin"))[:4]
index, held, channel = 0, None, "none"
for way in ("flock", "lockf", "ofd"):
    for i, path in enumerate(CANDIDATES):
        try:
            fd = os.open(path, os.O_RDONLY)
            if way == "flock":
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            elif way == "lockf":
                fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            else:
                import struct
                fcntl.fcntl(fd, 37, struct.pack("hhqqi", fcntl.F_RDLCK, 0, 0, 0, 0))
        except OSError as err:
            print(way, i, "refused:", err, flush=True)
            if err.errno not in (11, 13):  # EAGAIN/EACCES: taken by another copy; anything else: no channel
                break
            continue
        index, held, channel = i, fd, way
        break
    if held is not None:
        break
print("index", index, "through", channel, flush=True)
time.sleep(1.0)  # stay alive, holding the index, while the other copies choose theirs
ANSWER = [(False, False), (False, True), (True, False), (True, True)][index]

def f(i):
    return ANSWER[i]
'''


def _copies(n: int) -> list[TestedProgram]:
    return [TestedProgram(COLLUDE, TEST, "f") for _ in range(n)]


def test_colluding_copies_pass_without_the_sandbox():
    # The control: without the sandbox's filter, the copies do share an index through the locks, and
    # one of them passes. So the sandboxed test below would see collusion if it were possible.
    rewards = code_reward(_copies(4), LIMITS, workers=4, isolation="none-unsafe", trust_programs=True)
    assert sum(rewards) >= 1, rewards


def test_colluding_copies_scored_concurrently_never_pass():
    results = run_programs(_copies(16), LIMITS, workers=4)
    assert [r.status for r in results if r.passed] == []
    for r in results:
        assert r.status == "failed" and "AssertionError" in r.detail, r
        assert "index 0 through none" in r.stdout, r.stdout
        # Every lock was refused by the filter (ENOLCK for fcntl's locks, EPERM for flock), not taken.
        assert "Errno 37" in r.stdout and "Errno 1]" in r.stdout, r.stdout
