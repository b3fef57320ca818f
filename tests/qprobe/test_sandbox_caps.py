"""Every resource a run can grow is capped, and measured from outside the sandbox by its watcher
(``ExecutionResult.peaks``): files (inodes), memory, descriptors (pipes and sockets), and the
tests' process cannot be held up by what the program sends."""

import sys

import pytest

from reweighting.qprobe import _harness, _run
from reweighting.qprobe.sandbox import SandboxLimits, TestedProgram, isolation_available, run_program, run_programs

needs_sandbox = pytest.mark.skipif(not isolation_available()[0], reason=isolation_available()[1])

LIMITS = SandboxLimits(wall_seconds=8.0, cpu_seconds=4, memory_bytes=256 << 20, max_processes=16, max_files=2000)
# The documented bounds on how far a cap can be passed before the watcher ends the run (measured on 2
# busy cores with 8 processes: up to 1,786 files over during a whole test run, when the watcher's
# polls are delayed, and 2.6 MB over; see docs/code-reward.md).
FILES_OVER, MEMORY_OVER = 4000, 64 << 20
EIGHT = "import os\nfor _ in range(3):\n    os.fork()\n"  # eight processes
FILE_BOMB = EIGHT + ("os.makedirs(f'/tmp/{os.getpid()}')\ni = 0\nwhile True:\n"
                     "    open(f'/tmp/{os.getpid()}/{i}', 'w').close()\n    i += 1\n")
MEMORY_BOMB = EIGHT + "chunks = []\nwhile True:\n    chunks.append(b'x' * (8 << 20))\n"
DESCRIPTOR_BOMB = EIGHT + ("import socket, time\nkeep = []\ntry:\n    while True:\n        keep.append(os.pipe())\n"
                           "        keep.append(socket.socketpair())\nexcept OSError:\n    pass\ntime.sleep(1)\n")
# A set of integers that all hash alike (multiples of 2**61 - 1): building it is quadratic (36,000 of
# them held the tests' process for seconds); the program builds it once, cheaply at this size.
COLLIDING = "def f():\n    return set(i * (2 ** 61 - 1) for i in range(1, 3001))\n"


@needs_sandbox
def test_caps_hold_within_their_stated_bounds_measured_from_outside():
    results = run_programs([FILE_BOMB, MEMORY_BOMB, DESCRIPTOR_BOMB], LIMITS, workers=3)
    files, memory, descriptors = results
    assert files.status == "file_limit", files
    assert LIMITS.max_files < files.peaks["files"] <= LIMITS.max_files + FILES_OVER, files.peaks
    assert memory.status == "memory_limit", memory
    assert LIMITS.memory_bytes < memory.peaks["memory"] <= LIMITS.memory_bytes + MEMORY_OVER, memory.peaks
    # Pipes and sockets: as many as the descriptor limits allow, every process of the run together.
    assert descriptors.status == "completed", descriptors
    if descriptors.peaks["fds"] >= 0:  # -1: the evaluator may not read the descriptor tables
        assert 300 < descriptors.peaks["fds"] <= LIMITS.max_processes * LIMITS.max_open_files, descriptors.peaks


@needs_sandbox
def test_a_correct_answer_does_not_pass_while_a_background_process_breaks_a_limit():
    # The answers are right, but a process the program left behind passes max_files while the tests
    # still run: the watcher's verdict wins over the harness's "passed".
    source = ("import os, time\ndef f():\n    if os.fork() == 0:\n        for i in range(10 ** 6):\n"
              "            open(f'/tmp/{i}', 'w').close()\n        os._exit(0)\n    return 1\n")
    test = "import time\ndef check(c):\n    assert c() == 1\n    time.sleep(3)\n"
    result = run_program(TestedProgram(source, test, "f"), LIMITS)
    assert result.status == "file_limit", result


@needs_sandbox
def test_an_answer_that_is_slow_to_rebuild_is_refused_at_once_and_cannot_pause_the_watcher():
    # The program returns a set whose members all share a hash, while a second process of it allocates
    # memory: the tests' process refuses the set without building it, and the watcher, a process
    # outside, ends the memory bomb whatever the tests' process is doing.
    source = ("import os\nif os.fork() == 0:\n    import time\n    time.sleep(0.5)\n    chunks = []\n"
              "    while True:\n        chunks.append(b'x' * (8 << 20))\n" + COLLIDING)
    # The tests' process is busy meanwhile in one long call of C code (building such a set itself).
    test = ("def check(c):\n    try:\n        c()\n    except Exception:\n        pass\n"
            "    set(i * (2 ** 61 - 1) for i in range(1, 30001))\n")
    result = run_program(TestedProgram(source, test, "f"), LIMITS)
    assert result.status == "memory_limit", result
    assert result.peaks["memory"] <= LIMITS.memory_bytes + MEMORY_OVER
    alone = run_program(TestedProgram(COLLIDING, "def check(c):\n    c()\n", "f"), LIMITS)
    assert alone.status == "failed" and "share a hash value" in alone.detail, alone
    assert alone.seconds < LIMITS.wall_seconds


def test_decoding_is_bounded_per_element(monkeypatch):
    h = _harness
    # Elements: MAX_ELEMENTS values decode (the list itself is one), one more does not.
    with monkeypatch.context() as patch:
        patch.setattr(h, "MAX_ELEMENTS", 100)
        assert h.decode(["l", [["n"]] * 99]) == [None] * 99
        with pytest.raises(h.ProtocolError, match="more than 100 elements"):
            h.decode(["l", [["n"]] * 100])
    # Time: a budget already spent refuses the next element.
    budget = h.Budget(0.0)
    budget.deadline -= 1
    with pytest.raises(h.ProtocolError, match="cpu_seconds"):
        h.decode(["n"], budget=budget)
    # Shared hashes: MAX_SHARED_HASH members may share one, one more may not.
    same = [["i", hex(i * (2 ** 61 - 1))] for i in range(1, h.MAX_SHARED_HASH + 1)]
    assert len(h.decode(["S", same])) == h.MAX_SHARED_HASH
    with pytest.raises(h.ProtocolError, match="share a hash"):
        h.decode(["S", same + [["i", hex(0)]]])
    with pytest.raises(h.ProtocolError, match="share a hash"):
        h.decode(["d", [[k, ["n"]] for k in same + [["i", hex(0)]]]])
    # Depth: MAX_DEPTH levels decode, one more does not.
    deep = ["n"]
    for _ in range(h.MAX_DEPTH):
        deep = ["l", [deep]]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(4 * h.MAX_DEPTH)  # as the harness sets it
    try:
        h.decode(deep)
        with pytest.raises(h.ProtocolError, match="nested"):
            h.decode(["l", [deep]])
    finally:
        sys.setrecursionlimit(limit)


def test_decoded_output_takes_at_most_the_byte_cap():
    cap = 1 << 16
    wide = ("\U0001F600" * (cap // 4)).encode()  # 4 bytes of UTF-8 each, 4 bytes each in a str
    assert len(_run.bounded_text(wide, cap)) * 4 <= cap
    latin = ("é" * (cap // 2)).encode()  # 2 bytes of UTF-8, 1 byte each in a str: all of it fits
    assert _run.bounded_text(latin, cap) == "é" * (cap // 2)
    mixed = b"a" * (cap - 4) + "\u20ac".encode()  # one 2-byte-wide character makes every character 2 bytes
    text = _run.bounded_text(mixed, cap)
    assert len(text) * 2 <= cap and text == ("a" * (cap - 4) + "\u20ac")[: cap // 2]


@needs_sandbox
def test_bytes_queued_in_loopback_sockets_count_as_memory():
    # Loopback TCP connections whose data is never read hold kernel memory (4 MB each) that is in no
    # process's resident memory; the watcher adds the queues of the run's TCP and UDP sockets.
    program = ("import socket, time\nl = socket.create_server(('127.0.0.1', 0), backlog=64)\nkeep = []\n"
               "for i in range(25):\n    c = socket.create_connection(l.getsockname())\n    s, _ = l.accept()\n"
               "    c.setblocking(False)\n    keep.append((c, s))\n    for _ in range(20):\n        try:\n"
               "            while True:\n                c.send(b'x' * 65536)\n        except BlockingIOError:\n"
               "            time.sleep(0.01)\ntime.sleep(2)\n")
    result = run_program(program, SandboxLimits(wall_seconds=15.0, memory_bytes=64 << 20))
    assert result.status == "memory_limit", result


@needs_sandbox
def test_the_watcher_itself_ends_a_run_past_a_limit(monkeypatch):
    # The evaluator also ends the run when the watcher's report arrives; made deaf to it here (it
    # reads the report only once the sandbox has ended), only the watcher's own kill can end the file
    # bomb before the wall clock.
    real_drain = _run._Streams.drain

    def deaf(self, deadline):
        self.targets.pop(self.control.fileno(), None)
        return real_drain(self, deadline)

    monkeypatch.setattr(_run._Streams, "drain", deaf)
    result = run_program(FILE_BOMB, LIMITS)
    assert result.status == "file_limit", result
    assert result.seconds < LIMITS.wall_seconds / 2, result


@needs_sandbox
def test_the_program_starts_only_once_the_watcher_watches(monkeypatch):
    # A watcher slow to start (1.5 s here) delays the program; it never leaves it unwatched.
    monkeypatch.setattr(_run, "WATCHER", "import time\ntime.sleep(1.5)\n" + _run.WATCHER)
    result = run_program(FILE_BOMB, LIMITS)
    assert result.status == "file_limit", result
    assert result.peaks["files"] <= LIMITS.max_files + FILES_OVER, result.peaks
