"""One sandboxed run: start ``bwrap`` and the run's limit watcher, hand the specification over, read
output, verdict and the watcher's report under caps, and return only once every process of the
sandbox is gone (see ``docs/code-reward.md`` for the design).

Nothing here follows a path the program could create or replace: the specification goes in through
an anonymous memory file, output, verdict and report come back through pipes and sockets, and the
sandbox is killed through a pidfd of its first process.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from . import _bwrap, _uids
from ._sandbox_types import ExecutionResult, SandboxLimits, TestedProgram

HARNESS = Path(__file__).with_name("_harness.py").read_text()
WATCHER = Path(__file__).with_name("_watcher.py").read_text()
POLL_SECONDS = 0.01  # the watcher's poll interval, and the evaluator's least time between two reads of output
STATUSES = ("passed", "completed", "failed", "cpu_limit", "file_limit", "memory_limit")
_REPORT_STATUSES = ("", "failed", "file_limit", "memory_limit")


def spec_of(program: str | TestedProgram, limits: SandboxLimits, isolation: str) -> tuple[dict, dict | None]:
    """What the program's process needs, and the tests (``None`` for a plain source): the harness
    reads the second only after the fork, so the program cannot find the tests in its memory."""
    limit_values = {k: int(v) for k, v in asdict(limits).items() if k != "wall_seconds"}
    public = {"watch_paths": list(_bwrap.WRITABLE) if isolation == "bwrap" else None, "limits": limit_values}
    if isinstance(program, TestedProgram):
        public.update(kind="tested", source=program.source, run_name="__candidate__")
        return public, {"prelude": program.prelude, "test": program.test, "entry_point": program.entry_point}
    if isinstance(program, str):
        public.update(kind="script", source=program, run_name="__main__")
        return public, None
    raise TypeError(f"program must be a TestedProgram or a str of Python source, got {type(program).__name__}")


def frames(*objects: dict | None) -> bytes:
    """Length-prefixed JSON frames (``None`` is left out)."""
    out = b""
    for obj in objects:
        if obj is not None:
            data = json.dumps(obj).encode("utf-8")
            out += struct.pack(">Q", len(data)) + data
    return out


def user_process_count() -> int:
    uid, count = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                count += entry.stat().st_uid == uid
            except OSError:
                pass
    return count


def bounded_text(data: bytes, cap: int) -> str:
    """``data`` decoded as UTF-8 (bad bytes replaced), cut so that the text's characters take at most
    ``cap`` bytes of memory: one character outside Latin-1 makes CPython store every character in 2
    or 4 bytes, which would make the decoded text up to 4 times the bytes read."""
    text = data.decode("utf-8", errors="replace")
    widest = max(text, default="\0")
    width = 1 if widest <= "\xff" else (2 if widest <= "\uffff" else 4)
    return text if len(text) * width <= cap else text[: cap // width]


def parse_verdict(raw: bytes, token: bytes) -> dict | None:
    """The harness's verdict if it is well formed and carries exactly this run's token, else ``None``."""
    try:
        verdict = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(verdict, dict) or not secrets.compare_digest(str(verdict.get("token", "")),
                                                                   token.decode("ascii")):
        return None
    status, detail, code = verdict.get("status"), verdict.get("detail"), verdict.get("returncode")
    if status not in STATUSES or not isinstance(detail, str) or not (code is None or type(code) is int):
        return None
    return {"status": status, "detail": detail, "returncode": code}


def parse_report(raw: bytes) -> dict | None:
    """The watcher's report (one JSON line), or ``None`` if it is missing or malformed."""
    if not raw.endswith(b"\n"):
        return None
    try:
        report = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("status") not in _REPORT_STATUSES or \
            not isinstance(report.get("detail"), str):
        return None
    return report


def sandbox_pidfd(proc: subprocess.Popen, info: bytes) -> int | None:
    """A descriptor (pidfd) of the sandbox's first process, the harness, from ``bwrap --info-fd``'s
    ``child-pid``; ``None`` if unknown or already gone. Opened only while ``bwrap``, its parent, still
    runs, and checked to be ``bwrap``'s child, so the number cannot name a reused process id."""
    try:
        pid = json.loads(info.decode("utf-8"))["child-pid"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
    if type(pid) is not int or pid <= 0 or proc.poll() is not None or not hasattr(os, "pidfd_open"):
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            parent = int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        parent = None
    if parent != proc.pid:
        os.close(pidfd)
        return None
    return pidfd


def kill(proc: subprocess.Popen, pidfd: int | None) -> None:
    """End the sandbox and return once every process of it is gone. Killing ``bwrap`` alone would let
    its child (the harness, pid 1 of the sandbox) die a little later (``--die-with-parent``); so the
    harness is killed too and waited for: the kernel ends every process of a pid namespace before its
    pid 1 has exited."""
    if pidfd is not None:
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except OSError:
            pass
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            try:
                proc.kill()
            except OSError:
                pass
    proc.wait()
    if pidfd is not None:
        with selectors.DefaultSelector() as sel:
            sel.register(pidfd, selectors.EVENT_READ)  # readable once the process has exited
            sel.select(10.0)


class _Streams:
    """The evaluator's side of a running sandbox: its output, verdict, ``bwrap``'s information and the
    watcher's report, read through a selector with a cap on each."""

    def __init__(self, proc, verdict_r, info_r, control, cap):
        self.proc, self.control, self.cap = proc, control, cap
        self.out, self.err, self.verdict, self.info, self.report = (bytearray() for _ in range(5))
        self.outputs = (proc.stdout.fileno(), proc.stderr.fileno())
        self.targets = {self.outputs[0]: (self.out, cap), self.outputs[1]: (self.err, cap),
                        verdict_r: (self.verdict, 1 << 16)}
        if info_r >= 0:
            self.targets[info_r] = (self.info, 1 << 12)
        if control is not None:
            self.targets[control.fileno()] = (self.report, 1 << 12)
        self.info_r, self.verdict_r, self.pidfd = info_r, verdict_r, None

    def drain(self, deadline: float) -> str:
        """Read until the sandbox's pipes close; ``""``, or why reading stopped first: ``"timeout"``,
        ``"output_limit"``, ``"watcher"`` (the watcher reported, or ended without a report)."""
        waited = {*self.outputs, self.verdict_r}
        with selectors.DefaultSelector() as sel:
            for fd in self.targets:
                sel.register(fd, selectors.EVENT_READ)
            while waited:
                left = deadline - time.monotonic()
                if left <= 0:
                    return "timeout"
                trickle = False
                for key, _ in sel.select(left):
                    data = os.read(key.fd, 1 << 16)
                    buf, limit = self.targets[key.fd]
                    buf += data[: max(0, limit - len(buf))]
                    if key.fd in self.outputs:
                        if len(buf) >= limit:
                            return "output_limit"
                        trickle |= 0 < len(data) < 1 << 12
                    if data:
                        continue
                    sel.unregister(key.fd)
                    waited.discard(key.fd)
                    if key.fd == self.info_r:
                        self._start_watching()
                    elif self.control is not None and key.fd == self.control.fileno():
                        report = parse_report(bytes(self.report))
                        if report is None or report["status"]:
                            return "watcher"  # it saw a limit passed, failed, or died
                # Output sent in small pieces costs the evaluator a wake-up each: read at most every
                # POLL_SECONDS then, so a program trickling bytes cannot make it spend CPU per byte.
                if trickle:
                    time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        return ""

    def _start_watching(self):
        """``bwrap`` has written the harness's process id: hand the watcher a pidfd of it."""
        self.pidfd = sandbox_pidfd(self.proc, bytes(self.info))
        if self.pidfd is not None and self.control is not None:
            try:
                self.control.sendmsg([b"p"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", self.pidfd))])
            except OSError:
                pass  # the watcher is gone: its missing report fails the run

    def finish_report(self, timeout: float = 5.0) -> dict | None:
        """The watcher's report, once the sandbox has ended (it notices within a poll)."""
        if self.control is None:
            return None
        try:
            self.control.shutdown(socket.SHUT_WR)  # a watcher still waiting for a pidfd gives up
        except OSError:
            pass
        end = time.monotonic() + timeout
        self.control.setblocking(False)
        with selectors.DefaultSelector() as sel:
            sel.register(self.control.fileno(), selectors.EVENT_READ)
            while not self.report.endswith(b"\n") and len(self.report) < 1 << 12:
                left = end - time.monotonic()
                if left <= 0 or not sel.select(left):
                    break
                try:
                    data = self.control.recv(1 << 12)
                except BlockingIOError:
                    continue
                if not data:
                    break
                self.report += data
        return parse_report(bytes(self.report))


def run(program: str | TestedProgram, limits: SandboxLimits, isolation: str,
        spec: tuple[dict, dict | None] | None = None) -> ExecutionResult:
    """One run of ``program`` (see :func:`reweighting.qprobe.sandbox.run_program`)."""
    if isolation == "bwrap":
        with _uids.lease() as uid:
            return _run(program, limits, isolation, spec, uid)
    return _run(program, limits, isolation, spec, None)


def _run(program, limits, isolation, spec, uid) -> ExecutionResult:
    public, tests = spec or spec_of(program, limits, isolation)
    sandboxed = isolation == "bwrap"
    if sandboxed:
        python = _bwrap.sandbox_python()
        seccomp = _bwrap.seccomp_program()
        cwd = "/"
    else:
        python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
        cwd = tempfile.mkdtemp(prefix="reweighting-unsafe-")
        if os.geteuid() != 0:
            # Without a user namespace RLIMIT_NPROC counts every process of the user: leave room for those.
            public["limits"]["max_processes"] += user_process_count()
    token = secrets.token_hex(32).encode("ascii")
    owned: list[int] = []  # descriptors to close at the end

    def memfd(name: str, data: bytes) -> int:
        fd = os.memfd_create(name)
        owned.append(fd)
        while data:
            data = data[os.write(fd, data):]
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    sockets: list[socket.socket] = []
    watcher = proc = streams = None
    try:
        spec_fd = memfd("reweighting-sandbox-spec", frames(public, tests))
        verdict_r, verdict_w = os.pipe()
        owned += [verdict_r, verdict_w]
        passed = [verdict_w, spec_fd]
        prefix, watch_fd, info_r, control = [], -1, -1, None
        if sandboxed:
            info_r, info_w = os.pipe()
            owned += [info_r, info_w]
            etc_fds = {path: memfd("reweighting-sandbox-etc", text.encode()) for path, text in _bwrap.ETC_FILES.items()}
            seccomp_fd = memfd("reweighting-sandbox-seccomp", seccomp)
            prefix = _bwrap.bwrap_args(python, limits, etc_fds) + ["--seccomp", str(seccomp_fd),
                                                                    "--info-fd", str(info_w)]
            control, control_w = socket.socketpair()
            harness_end, watcher_end = socket.socketpair()
            sockets += [control, control_w, harness_end, watcher_end]
            watch_fd = harness_end.fileno()
            passed += [info_w, seccomp_fd, watch_fd, *etc_fds.values()]
            host_python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
            watcher = subprocess.Popen(
                [host_python, "-I", "-S", "-B", "-c", WATCHER, str(control_w.fileno()), str(watcher_end.fileno()),
                 str(limits.max_files), str(limits.memory_bytes), str(POLL_SECONDS)],
                pass_fds=[control_w.fileno(), watcher_end.fileno()], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/", env={})
        args = prefix + [python, "-I", "-S", "-B", "-c", HARNESS, str(verdict_w), str(spec_fd), str(watch_fd)]
        start = time.perf_counter()
        deadline = time.monotonic() + limits.wall_seconds
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=passed, cwd=cwd, env={"LANG": "C.UTF-8"}, start_new_session=True,
                                **_bwrap.identity(uid))
        # Only the children hold these ends now: a pipe or socket reads as closed once they are gone.
        for fd in passed:
            if fd != spec_fd and fd not in (s.fileno() for s in sockets):
                os.close(fd)
                owned.remove(fd)
        for end in sockets[1:]:
            end.close()
        streams = _Streams(proc, verdict_r, info_r, control, limits.max_output_bytes)
        try:
            try:
                proc.stdin.write(token)
                proc.stdin.close()
            except OSError:
                pass
            how = streams.drain(deadline)
        finally:
            kill(proc, streams.pidfd)
            proc.stdout.close()
            proc.stderr.close()
        report = streams.finish_report() if sandboxed else None
        seconds = time.perf_counter() - start
    finally:
        if watcher is not None:
            try:
                watcher.wait(timeout=5)
            except subprocess.TimeoutExpired:
                watcher.kill()
                watcher.wait()
        if streams is not None and streams.pidfd is not None:
            os.close(streams.pidfd)
        for fd in owned:
            os.close(fd)
        for sock in sockets:
            sock.close()
        if not sandboxed:
            shutil.rmtree(cwd, ignore_errors=True)  # fd-based and symlink-safe on Linux
    cap = limits.max_output_bytes
    stdout, stderr = bounded_text(bytes(streams.out), cap), bounded_text(bytes(streams.err), cap)
    verdict = parse_verdict(bytes(streams.verdict), token)
    returncode = verdict.get("returncode") if verdict else None
    peaks = {}
    if report is not None:
        peaks = {k[len("peak_"):]: report[k] for k in ("peak_files", "peak_memory", "peak_fds")
                 if type(report.get(k)) is int}
        peaks["polls"] = report.get("polls") if type(report.get("polls")) is int else 0

    def result(status, detail, code=returncode):
        return ExecutionResult(status, code, stdout, stderr, seconds, detail, peaks)

    # A limit the watcher saw wins over everything, a passing verdict included: a background process
    # of the program may break a limit while its answers pass.
    if sandboxed and report is None:
        return result("failed", "the limit watcher ended without a report")
    if report is not None and report["status"]:
        return result(report["status"], report["detail"])
    if how in ("timeout", "output_limit"):
        return result(how, "wall-clock limit" if how == "timeout" else "output limit")
    if verdict is None:
        return result("failed", f"the sandbox ended without a valid verdict (exit {proc.returncode})", None)
    return result(verdict["status"], verdict["detail"])
