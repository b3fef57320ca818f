"""Running untrusted generated code against its tests, contained, for a 0/1 reward.

Each program runs in a fresh Python process with:

- a fresh temporary working directory (also ``HOME`` and ``TMPDIR``), removed afterwards;
- a clean environment (no inherited variables, so no secrets), ``python -I -S -B``;
- limits set before any of the program's code runs and which it cannot raise: CPU seconds
  (``RLIMIT_CPU``), address space (``RLIMIT_AS``), number of processes (``RLIMIT_NPROC``), size of
  any file written, standard output and error included (``RLIMIT_FSIZE``), open files, no core
  dumps; and a wall-clock limit enforced by the parent;
- when this process runs as root: a dedicated unprivileged user id per concurrent run (root is
  exempt from ``RLIMIT_NPROC``, so a fork bomb would otherwise not be bounded). Files outside the
  working directory are then protected by ordinary permissions, and when the run ends every
  process of that user id is killed at once (``kill(-1)`` from that user), so nothing survives;
- Python audit hooks that refuse writes, deletions and renames outside the working directory,
  starting other programs, loading C libraries through ``ctypes`` and opening sockets. They are a
  second fence (audit hooks cannot be removed from Python code), behind the operating system's.

Without root, the program runs as the calling user: the limits and audit hooks still apply and
the process group is killed at the end, but a program that leaves its process group could outlive
the run. A program that needs a network, other programs or third-party packages is out of scope.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SandboxLimits", "ExecutionResult", "run_program", "run_programs", "code_reward", "humaneval_program"]

# Dedicated user ids for sandboxed runs when started as root; override if these are in use.
UID_BASE = int(os.environ.get("REWEIGHTING_SANDBOX_UID_BASE", "61000"))
UID_SLOTS = 64
_LOCK_DIR = Path(tempfile.gettempdir())


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one run (see the module docstring)."""

    wall_seconds: float = 10.0
    cpu_seconds: int = 5
    memory_bytes: int = 1 << 30
    max_processes: int = 16
    max_output_bytes: int = 1 << 20
    max_open_files: int = 64

    def __post_init__(self):
        for name in ("wall_seconds", "cpu_seconds", "memory_bytes", "max_processes", "max_output_bytes",
                     "max_open_files"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")


@dataclass
class ExecutionResult:
    """How a run ended. ``status``: ``"passed"`` (exit code 0), ``"failed"`` (a non-zero exit or
    an uncaught exception: a failed assertion, a ``MemoryError``, a refused operation),
    ``"timeout"`` (wall clock), ``"cpu_limit"``, ``"output_limit"`` or ``"killed"`` (another signal).
    ``stdout`` and ``stderr`` hold at most ``max_output_bytes`` each."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# Runs before the program, inside the sandboxed interpreter: limits first, then the audit hook.
_BOOT = r"""
import os, resource, sys
cpu, memory, nproc, fsize, nofile = (int(v) for v in sys.argv[1:6])
# The CPU hard limit is one second above the soft one, so the soft limit ends the run with SIGXCPU.
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
for which, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_FSIZE, fsize),
                     (resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(which, (value, value))
ROOT = os.path.realpath(os.getcwd())
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1, "os.truncate": 1,
               "os.utime": 1, "os.rename": 2, "os.link": 2, "os.symlink": 2, "shutil.rmtree": 1,
               "os.setxattr": 1, "os.removexattr": 1, "shutil.copyfile": 2, "shutil.move": 2}
REFUSED = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen", "os.startfile",
           "ctypes.dlopen", "ctypes.dlsym", "socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo")

def inside(path, realpath=os.path.realpath, fspath=os.fspath, prefix=ROOT + os.sep, root=ROOT):
    if isinstance(path, int):
        return True
    try:
        resolved = realpath(fspath(path))
    except Exception:
        return False
    if isinstance(resolved, bytes):
        resolved = resolved.decode("utf-8", "surrogateescape")
    return resolved == root or resolved.startswith(prefix)

def hook(event, args, inside=inside, WRITE_FLAGS=WRITE_FLAGS, PATH_EVENTS=PATH_EVENTS, REFUSED=REFUSED):
    if event == "open":
        path, mode, flags = args
        writes = (mode is not None and any(c in str(mode) for c in "wax+")) or (flags & WRITE_FLAGS)
        if writes and not inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the working directory is not allowed")
    elif event in PATH_EVENTS:
        for path in args[:PATH_EVENTS[event]]:
            if not inside(path):
                raise PermissionError(f"sandbox: {event} on {path!r} outside the working directory is not allowed")
    elif event.startswith(REFUSED):
        raise PermissionError(f"sandbox: {event} is not allowed")

sys.addaudithook(hook)
import runpy
sys.argv = ["main.py"]
runpy.run_path("main.py", run_name="__main__")
"""


def _world_executable(path: str) -> bool:
    """Whether any user may run ``path``: every directory on the way is world-searchable."""
    real = Path(os.path.realpath(path))
    if not real.is_file() or not real.stat().st_mode & stat.S_IXOTH:
        return False
    return all(p.stat().st_mode & stat.S_IXOTH for p in real.parents)


def sandbox_python() -> str:
    """The interpreter for sandboxed runs: this one, or (as root, when this one sits in a private
    directory such as ``/root``) a system ``python3`` that an unprivileged user can run."""
    override = os.environ.get("REWEIGHTING_SANDBOX_PYTHON")
    if override:
        return override
    if os.geteuid() != 0 or _world_executable(sys.executable):
        return sys.executable
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3") or ""):
        if candidate and _world_executable(candidate):
            return candidate
    raise RuntimeError(
        f"running as root, and no Python interpreter reachable by an unprivileged user was found "
        f"({sys.executable} is in a private directory); set REWEIGHTING_SANDBOX_PYTHON to one"
    )


class _UidSlot:
    """An unprivileged user id reserved for one run, exclusive across threads and processes (a file lock)."""

    _local_lock = threading.Lock()

    def __init__(self):
        self.uid: int | None = None
        self._file = None

    def __enter__(self) -> _UidSlot:
        deadline = time.monotonic() + 60
        while True:
            with self._local_lock:
                for uid in range(UID_BASE, UID_BASE + UID_SLOTS):
                    f = open(_LOCK_DIR / f"reweighting-sandbox-{uid}.lock", "w")  # noqa: SIM115
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError:
                        f.close()
                        continue
                    self.uid, self._file = uid, f
                    return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"all {UID_SLOTS} sandbox user ids are busy")
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()  # releases the lock


def _nogroup() -> int:
    try:
        return pwd.getpwnam("nobody").pw_gid
    except KeyError:
        return 65534


def _kill_user(uid: int, gid: int) -> None:
    """Kill every process of ``uid``: a child takes that identity and signals all its processes at once."""
    pid = os.fork()
    if pid == 0:  # only async-signal-safe calls here: the parent may have threads
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _user_process_count() -> int:
    uid = os.getuid()
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += 1
            except OSError:
                pass
    return count


def _read_capped(path: Path, cap: int) -> str:
    with open(path, "rb") as f:
        return f.read(cap).decode("utf-8", errors="replace")


def run_program(source: str, limits: SandboxLimits | None = None) -> ExecutionResult:
    """Run the Python program ``source`` in the sandbox and report how it ended (never raises for
    anything the program does)."""
    limits = limits or SandboxLimits()
    as_root = os.geteuid() == 0
    workdir = Path(tempfile.mkdtemp(prefix="reweighting-sandbox-"))
    slot = _UidSlot() if as_root else None
    try:
        (workdir / "main.py").write_text(source)
        kwargs: dict = {}
        if slot is not None:
            slot.__enter__()
            gid = _nogroup()
            os.chown(workdir, slot.uid, gid)
            os.chown(workdir / "main.py", slot.uid, gid)
            kwargs = {"user": slot.uid, "group": gid, "extra_groups": []}
            nproc = limits.max_processes
        else:
            # RLIMIT_NPROC counts every process of the user, so leave room for those already running.
            nproc = _user_process_count() + limits.max_processes
        os.chmod(workdir, 0o700)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir),
               "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
        args = [sandbox_python(), "-I", "-S", "-B", "-c", _BOOT, str(int(limits.cpu_seconds)),
                str(int(limits.memory_bytes)), str(int(nproc)), str(int(limits.max_output_bytes)),
                str(int(limits.max_open_files))]
        out_path, err_path = workdir / ".stdout", workdir / ".stderr"
        start = time.perf_counter()
        timed_out = False
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(args, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True, **kwargs)
            try:
                proc.wait(timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                if slot is not None:
                    _kill_user(slot.uid, gid)
                proc.wait()
        seconds = time.perf_counter() - start
        code = proc.returncode
        if timed_out:
            status = "timeout"
        elif code == 0:
            status = "passed"
        elif code == -signal.SIGXCPU:
            status = "cpu_limit"
        elif code == -signal.SIGXFSZ or max(
                out_path.stat().st_size, err_path.stat().st_size) >= limits.max_output_bytes:
            status = "output_limit"  # Python ignores SIGXFSZ: the write fails and the program exits
        elif code is not None and code < 0:
            status = "killed"
        else:
            status = "failed"
        return ExecutionResult(status, None if timed_out else code, _read_capped(out_path, limits.max_output_bytes),
                               _read_capped(err_path, limits.max_output_bytes), seconds)
    finally:
        if slot is not None:
            slot.__exit__(None, None, None)
        shutil.rmtree(workdir, ignore_errors=True)


def run_programs(sources: Iterable[str], limits: SandboxLimits | None = None, *, workers: int = 4,
                 progress: bool = False) -> list[ExecutionResult]:
    """:func:`run_program` on many programs, ``workers`` at a time (each run is its own process)."""
    sources = list(sources)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda s: run_program(s, limits), sources)
        return list(tqdm(results, total=len(sources), desc="run programs", disable=not progress, leave=False))


def humaneval_program(problem: dict, completion: str) -> str:
    """The program that checks one HumanEval-style completion: prompt, completion, tests, ``check(entry)``."""
    for key in ("prompt", "test", "entry_point"):
        if key not in problem:
            raise ValueError(f"problem is missing the field {key!r}")
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def code_reward(programs: Sequence[str], limits: SandboxLimits | None = None, *, workers: int = 4) -> list[float]:
    """1.0 for each program that runs to completion (its tests pass) in the sandbox, else 0.0."""
    return [1.0 if r.passed else 0.0 for r in run_programs(programs, limits, workers=workers)]
