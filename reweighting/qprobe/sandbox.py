"""Running untrusted generated code against its tests, in an operating-system sandbox, for a 0/1 reward.

Threat model
------------
The program is hostile: it may run any Python code, call any system call its process is allowed,
and try to make the evaluator report a pass it did not earn, to read or change anything outside its
run, to talk to the network, to outlive its run or to exhaust the machine. The evaluator (this
module, often running as root in a container) and the problem's tests are trusted.

Isolation (the operating system, not Python)
--------------------------------------------
Each run is one bubblewrap (``bwrap``) sandbox: fresh user, pid, network, ipc, uts and cgroup
namespaces (``--unshare-all --unshare-user``), no capabilities, no nested user namespaces
(``--disable-userns``), a new session, no environment (``--clearenv``). Its file system is built
from nothing: ``/usr`` (and the ``/bin``, ``/lib``, ``/lib64``, ``/sbin`` links into it), the
interpreter's installation, ``/etc/ld.so.cache``, all read-only; a new ``/proc`` of its own pid
namespace and a ``/dev`` with only ``null``, ``zero``, ``full``, ``random``, ``urandom`` and the
``fd``/``stdin``/``stdout``/``stderr`` links (no pseudo-terminals, no ``/dev/shm``), read-only; a
private working directory and a private ``/tmp``, each a tmpfs of at most ``max_disk_bytes``; the
root itself read-only. Nothing of the host's ``/etc``, ``/home``, ``/root``, ``/tmp``, ``/run`` or
working tree is visible; nothing is written on the host's disk, so nothing needs removing
afterwards. The network namespace has only its own loopback. Its processes cannot see or signal
any process outside (pid namespace); when its first process ends the kernel ends all of them. At
the wall-clock limit (or any other end of the run) the evaluator kills that process and ``bwrap``
and waits until the process has exited, so a run returns only once all its processes are gone
(the harness's process may stay a zombie, holding nothing but its process id, until the system's
init reaps it).

A seccomp filter (``bwrap --seccomp``, built by :mod:`._seccomp` for x86_64 or aarch64; on any
other machine the sandbox refuses to start rather than run without it) narrows the kernel interface
of every process in the sandbox, the harness included: sockets only of the ``AF_UNIX``,
``AF_INET`` and ``AF_INET6`` families (``AF_VSOCK``, which network namespaces do not confine and
which reaches the hypervisor and the guest's vsock services in a virtual machine, and
``AF_NETLINK`` are refused with ``EAFNOSUPPORT``); no System V shared memory, message queues or
semaphores (memory no process owns, outside every limit) and no ``memfd_create`` (memory outside
the resident-memory poll); no io_uring, userfaultfd, key rings, ``perf_event_open``, ``bpf``,
``ptrace``, ``process_vm_*``, ``pidfd_getfd``, namespaces, mounts, module or kexec loading, or
file handles (``EPERM``); ``prlimit`` only on the calling process itself, so no process can change
the harness's limits; a system call of another ABI (32-bit x86) kills the process.

As root, the evaluator first drops to a dedicated unprivileged user and group id (``UID_BASE``)
before starting ``bwrap``, so that inside the sandbox nobody is root outside it: ownership bits of
root's files do not apply, and ``RLIMIT_NPROC`` (which root ignores) bounds a fork bomb. With user
namespaces that limit counts the processes of one sandbox only, so concurrent runs share the id
without counting each other. That user cannot traverse a private directory such as ``/root``, so
the interpreter in the sandbox is this one when every directory to it is world-searchable, else a
system ``python3`` (``/usr/bin/python3``, ``/usr/local/bin/python3``), or
``REWEIGHTING_SANDBOX_PYTHON``. The harness uses only the standard library. Without root, ``bwrap``
runs as the caller, whose user id the sandbox's processes then have outside it.

Nothing the evaluator does follows a path the program could create or replace: the run's
specification goes in through an anonymous memory file, output and verdict come back through
pipes (read with caps), no lock file or working directory is made on the host, and the processes
all end with the sandbox's pid namespace, so there is nothing to clean up.

Limits set before any program code runs, which the program cannot raise: CPU seconds per process
(``RLIMIT_CPU``), address space per process (``RLIMIT_AS``), tasks (``RLIMIT_NPROC``: processes and
threads of the sandbox, the harness's process and watcher thread and the program's first process
included), size of one file (``RLIMIT_FSIZE``), open files per process, no core dumps; bytes
written in all (two tmpfs of ``max_disk_bytes``); inodes on them (``max_files``: files,
directories, symbolic and hard links; the harness's watcher thread polls the two file systems'
inode counts every 10 ms and ends the run beyond it); the resident memory of all the sandbox's
processes together (``memory_bytes`` again, polled the same way); standard output and error (read
through pipes and capped at ``max_output_bytes`` each: more ends the run); the wall clock. The
watcher fails closed: if its own limits change or it cannot read what it polls, the run fails.

The verdict
-----------
A structured :class:`TestedProgram` (what :func:`humaneval_program` returns) runs as two
processes inside the sandbox (``_harness.py``). ``P``, the trusted harness, is pid 1 of the pid
namespace, so signals from the program are ignored, and is not dumpable, so the program cannot
ptrace it or open its ``/proc`` files. ``P`` forks ``C``, which closes every descriptor but two
pipes to ``P`` (and its output) and runs the program; only after the fork does ``P`` read the
problem's own code (the prompt, then the tests) and run it, so the tests are nowhere in ``C``'s
memory. ``P`` then calls ``check`` with a stand-in for the entry point: each call's
arguments go to ``C`` and the result comes back as plain data (exact ``None``, ``bool``, ``int``,
``float``, ``complex``, ``str``, ``bytes``, ``list``, ``tuple``, ``set``, ``frozenset``,
``dict``; anything else is a failure), rebuilt by ``P``. So an object with a forged ``__eq__``
never reaches the tests, and monkeypatching builtins, exceptions or modules in ``C`` cannot touch
``P``. Only ``P`` holds the verdict descriptor; it reads the run's random token from the evaluator
only after ``C`` exists, and writes it with the verdict once the tests have returned. The evaluator
counts a pass only for the exact token and ``"passed"``: an early exit (``os._exit``,
``sys.exit``, ``atexit``), a signal, a crash of either process, a timeout or any limit is a 0.

The program's results are turned into plain data in its own process: an instance of a subclass of
one of those types becomes its built-in base, read through the base type's own methods
(``namedtuple`` -> ``tuple``; ``Counter``, ``OrderedDict``, ``defaultdict`` -> ``dict``; ``IntEnum``
-> ``int``; a ``str``, ``float``, ``list``, ... subclass -> the built-in value), so its overrides
(``__eq__``, ``__str__``) stay behind; ``bool`` stays ``bool``. Other objects, ``Fraction`` and
``Decimal`` included, are refused (the test fails, ``detail`` says which type): comparing them as
floats would change what equality means. An exception the program raises reaches the tests as the
first built-in ``Exception`` class among its bases (a ``class E(ValueError)`` as ``ValueError``),
with its arguments when they are plain data (else its text), so ``except ValueError`` and
``e.args`` work as in one process; ``BaseException``-only ones (``SystemExit``, ...) fail the run.

Differences from running the tests in the program's process (the reference HumanEval harness),
none of which any of HumanEval's 164 tests meets: arguments are copies, so a test that looks at an
argument the function changed in place sees it unchanged; arguments that are not plain data
(functions, generators, ``range``) cannot be sent and fail the test; a ``nan`` comes back as a new
object, so tests relying on its identity (``[x] == [x]``) fail; as root the sandbox's interpreter
is a system ``python3`` run with ``-I -S``, so third-party packages (numpy, ...) are not importable;
a correct program that prints more than ``max_output_bytes`` fails with ``"output_limit"``.

A plain source string is still accepted by :func:`run_program`; it runs in the same sandbox, and
its best status is ``"completed"``: it ran to the end without raising. That verdict comes from the
program's own process and a hostile program can forge it, so :func:`code_reward` refuses plain
strings.

Limits of this design, honestly
-------------------------------
- It relies on the Linux kernel and bubblewrap: a kernel bug reachable through the system calls the
  filter allows (file systems, sockets of the three families, pipes, signals, ...) from an
  unprivileged user namespace is an escape. The filter is a deny list, not an allow list.
- There is no cgroup. Memory is bounded per process by ``RLIMIT_AS`` (a hard fence) and for the
  whole sandbox by polling: every 10 ms the harness sums the resident memory of the sandbox's
  processes (shared pages once per process) and ends the run beyond ``memory_bytes``, so a fast
  allocator can overshoot that sum briefly. The hard bound is ``max_processes * memory_bytes`` plus
  the two tmpfs (``2 * max_disk_bytes``) plus kernel memory that belongs to no process's address
  space: buffers of pipes and of unix and loopback sockets, at most the kernel's per-pipe and
  per-socket maxima (``fs.pipe-max-size``, ``net.core.rmem_max``/``wmem_max``,
  ``net.ipv4.tcp_rmem``/``tcp_wmem``) for each of up to ``max_processes * max_open_files``
  descriptors, and machine-wide at most ``fs.pipe-user-pages-soft`` per user and
  ``net.ipv4.tcp_mem``; page tables and the inodes of up to ``max_files`` files. System V IPC and
  memfd, which held gigabytes outside every limit, are refused by the filter. The file count is
  polled the same way, so a program overshoots ``max_files`` by what it creates in 10 ms (a few
  thousand).
- CPU is limited per process, not per sandbox: ``max_processes`` busy processes use that many times
  ``cpu_seconds`` within ``wall_seconds``. Concurrent runs share the CPUs: where the kernel does not
  group each session's processes (``kernel.sched_autogroup_enabled``), a run's busy processes can
  slow a neighbour's correct program past its ``wall_seconds``.
- The program sees the read-only ``/usr`` (world-readable system files) and can read what it is
  sent: the arguments the tests call it with. It cannot see the tests' source or expected values.
  Its ``/proc`` shows the host's ``meminfo``, ``stat``, ``loadavg`` and ``cmdline``: a side channel
  on the machine's load, not a way to reach anything.
- Without root, the sandbox's processes have the caller's user id outside the sandbox (bubblewrap
  maps it), and the machine-wide per-user budgets (pipe pages, ...) are the caller's.
- ``isolation="none-unsafe"`` runs the same two-process harness with the limits but without any
  namespace or filter: the program can read, write and signal whatever the caller's user can,
  including the harness's memory and verdict descriptor, so it can forge a pass, and as root it
  runs as root. It exists for machines without user namespaces where the programs are trusted;
  :func:`code_reward` refuses it unless called with ``trust_programs=True``. Never use it for
  generated code.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import selectors
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from . import _seccomp

__all__ = ["SandboxLimits", "TestedProgram", "ExecutionResult", "SandboxUnavailable", "run_program",
           "run_programs", "code_reward", "humaneval_program", "isolation_available"]

# The dedicated user and group id of sandboxed runs when the evaluator is root; override if in use.
# Checked when a run starts (see _identity), so that a bad value is a clear error, not an import failure.
UID_BASE: int | str = os.environ.get("REWEIGHTING_SANDBOX_UID_BASE", "61000")
UID_BASE = int(UID_BASE) if UID_BASE.strip().isdigit() else UID_BASE
UID_SLOTS = 1  # one id serves every run: each sandbox has its own user namespace and process count
ISOLATIONS = ("bwrap", "none-unsafe")
_HARNESS = (Path(__file__).with_name("_harness.py")).read_text()
_INSIDE_UID = 65534
_WORKDIR = "/sandbox"
_INSTALL_HINT = ("install bubblewrap 0.8 or later (Debian/Ubuntu: `apt-get install bubblewrap`; Fedora: `dnf install "
                 "bubblewrap`) and allow unprivileged user namespaces (sysctl user.max_user_namespaces > 0, "
                 "kernel.unprivileged_userns_clone = 1 where it exists, and on Ubuntu 24.04+ "
                 "kernel.apparmor_restrict_unprivileged_userns = 0 or an AppArmor profile for bwrap); or pass "
                 "isolation='none-unsafe' only for programs you trust")


class SandboxUnavailable(RuntimeError):
    """The operating-system sandbox cannot be started on this machine."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one run (see the module docstring). ``max_disk_bytes`` bounds the private
    working directory and the private ``/tmp`` each, and any one file; ``max_files`` the inodes on both
    together (files, directories, symbolic links; a hard link takes one too on tmpfs).
    ``max_processes`` counts every task of the sandbox, threads included, and the harness's three (its
    process, its limit watcher thread and the program's first process): the program may start
    ``max_processes - 3`` more. Every field is an ``int`` (the kernel's units), but ``wall_seconds``,
    which may be any finite number."""

    wall_seconds: float = 10.0
    cpu_seconds: int = 5
    memory_bytes: int = 1 << 30
    max_processes: int = 16
    max_output_bytes: int = 1 << 20
    max_open_files: int = 64
    max_disk_bytes: int = 16 << 20
    max_files: int = 10_000

    def __post_init__(self):
        wall = self.wall_seconds
        if isinstance(wall, bool) or not isinstance(wall, (int, float)) or not 0 < wall < math.inf:
            raise ValueError(f"SandboxLimits.wall_seconds must be a finite number > 0, got {wall!r}")
        for name in ("cpu_seconds", "memory_bytes", "max_processes", "max_output_bytes", "max_open_files",
                     "max_disk_bytes", "max_files"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be an int > 0 (the kernel's limits are integers), "
                                 f"got {value!r}")
        if self.max_processes < 4:
            raise ValueError(f"SandboxLimits.max_processes must be >= 4 (the harness's process and watcher "
                             f"thread, and the program), got {self.max_processes!r}")
        if self.max_open_files < 16:
            raise ValueError(f"SandboxLimits.max_open_files must be >= 16 (the harness needs a few), "
                             f"got {self.max_open_files!r}")


@dataclass(frozen=True)
class TestedProgram:
    """A program and its tests. ``source`` is untrusted (prompt + completion); ``prelude`` and ``test``
    are trusted, run by the harness itself: the prelude first (HumanEval: the prompt, which defines the
    helpers the tests use, such as ``poly``), then ``test``, which must define ``check(candidate)``.
    The harness calls ``check`` with a stand-in for the program's ``entry_point``; the same stand-in
    replaces that name for the tests."""

    __test__ = False  # not a pytest test class despite its name

    source: str
    test: str
    entry_point: str
    prelude: str = ""

    def __post_init__(self):
        for name in ("source", "test", "entry_point", "prelude"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"TestedProgram.{name} must be a str, got {type(getattr(self, name)).__name__}")
        if not self.entry_point.isidentifier():
            raise ValueError(f"TestedProgram.entry_point must be a Python identifier, got {self.entry_point!r}")


@dataclass
class ExecutionResult:
    """How a run ended. ``status``: ``"passed"`` (the harness ran ``check`` and it returned: the only
    status that counts as a pass), ``"completed"`` (a plain source ran to its end without raising; the
    program's own claim, forgeable), ``"failed"`` (a test failed, the program raised or ended early, or
    the sandbox ended without a verdict; ``detail`` says which), ``"timeout"`` (wall clock),
    ``"cpu_limit"``, ``"output_limit"``, ``"file_limit"`` (``max_files``) or ``"memory_limit"`` (the
    sandbox's processes together passed ``memory_bytes``). ``returncode`` is the
    program process's exit code (minus the signal number) when known. ``stdout`` and ``stderr`` hold at
    most ``max_output_bytes`` each."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# ---------------------------------------------------------------------------------------- set-up
def _reachable_by_anyone(path: str) -> bool:
    """Whether an unprivileged user may run ``path``: world-executable, every directory world-searchable."""
    real = Path(os.path.realpath(path))
    try:
        if not real.is_file() or not real.stat().st_mode & stat.S_IXOTH:
            return False
        return all(p.stat().st_mode & stat.S_IXOTH for p in real.parents)
    except OSError:
        return False


def sandbox_python(as_root: bool | None = None) -> str:
    """The interpreter for sandboxed runs: this one, or (as root, when this one sits in a private
    directory such as ``/root``) a system ``python3`` that an unprivileged user can run."""
    override = os.environ.get("REWEIGHTING_SANDBOX_PYTHON")
    if override:
        if not os.path.isabs(override) or not os.path.isfile(override) or not os.access(override, os.X_OK):
            raise SandboxUnavailable(f"REWEIGHTING_SANDBOX_PYTHON must be the absolute path of an executable "
                                     f"Python interpreter, got {override!r}")
        return override
    as_root = os.geteuid() == 0 if as_root is None else as_root
    own = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    if not as_root or _reachable_by_anyone(own):
        return own
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3") or ""):
        if candidate and _reachable_by_anyone(candidate):
            return os.path.realpath(candidate)
    raise SandboxUnavailable(
        f"running as root, and no Python interpreter that an unprivileged user can run was found "
        f"({own} is in a private directory); set REWEIGHTING_SANDBOX_PYTHON to one (standard library only)")


def _python_root(python: str) -> str | None:
    """The installation directory to bind for ``python`` (``<prefix>`` of ``<prefix>/bin/pythonX``), or
    ``None`` when it lives under ``/usr``, which is bound anyway."""
    real = Path(os.path.realpath(python))
    if real.is_relative_to("/usr"):
        return None
    root = real.parent.parent
    # Bound read-only into the sandbox whole: an interpreter directly under a top-level folder
    # (``/opt/python3``, ``/bin/python3`` outside /usr) would expose ``/`` or all of ``/opt``.
    if len(root.parts) < 3:
        raise SandboxUnavailable(f"the sandbox's interpreter {real} must sit in <prefix>/bin/ with a prefix at least "
                                 f"two folders deep (its whole prefix {root} is made visible to the program); "
                                 f"set REWEIGHTING_SANDBOX_PYTHON to such an interpreter")
    return str(root)


def _bwrap() -> str:
    found = shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin:/usr/sbin:/sbin")
    if found is None:
        raise SandboxUnavailable(f"the sandbox needs bubblewrap (`bwrap`), which is not installed: {_INSTALL_HINT}")
    return found


_DEVICES = ("null", "zero", "full", "random", "urandom")


def _seccomp_program() -> bytes:
    """The seccomp filter for this machine (see :mod:`._seccomp`); refused on an unknown architecture."""
    try:
        return _seccomp.seccomp_filter()
    except ValueError as err:
        raise SandboxUnavailable(str(err)) from None


def _bwrap_args(python: str, limits: SandboxLimits) -> list[str]:
    """The ``bwrap`` command line up to the program, but for the descriptors of one run (``--seccomp``,
    ``--info-fd``, which :func:`_run` adds)."""
    args = [_bwrap(), "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
            "--as-pid-1", "--cap-drop", "ALL", "--uid", str(_INSIDE_UID), "--gid", str(_INSIDE_UID), "--clearenv",
            "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", _WORKDIR, "--setenv", "TMPDIR", "/tmp",
            "--setenv", "LANG", "C.UTF-8", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/lib", "/lib64", "/lib32", "/libx32", "/sbin"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    root = _python_root(python)
    if root is not None:
        args += ["--ro-bind", root, root]
    size = str(int(limits.max_disk_bytes))
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache", "--proc", "/proc"]
    # /dev by hand rather than ``--dev``, which would add a devpts (/dev/ptmx: pseudo-terminals are a
    # machine-wide budget) and a shared-memory directory; the harness needs /dev/null only.
    args += ["--perms", "0755", "--tmpfs", "/dev"]
    for name in _DEVICES:
        args += ["--dev-bind", f"/dev/{name}", f"/dev/{name}"]
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        args += ["--symlink", target, f"/dev/{name}"]
    args += ["--remount-ro", "/dev",
             "--size", size, "--perms", "0700", "--tmpfs", "/tmp",
             "--size", size, "--perms", "0700", "--tmpfs", _WORKDIR,
             "--remount-ro", "/", "--chdir", _WORKDIR]
    return args


def _identity() -> dict:
    """``subprocess.Popen`` arguments that drop root to the sandbox's own user and group (none otherwise)."""
    if os.geteuid() != 0:
        return {}
    uid = UID_BASE
    # Below 1000 are root and the system's accounts; 65534 is "nobody", which other services use.
    if isinstance(uid, bool) or not isinstance(uid, int) or not 1000 <= uid < 2 ** 31 - 1 or uid == 65534:
        raise SandboxUnavailable(f"REWEIGHTING_SANDBOX_UID_BASE must be a user id from 1000 to 2**31 - 2 other "
                                 f"than 65534 (pick one that no account uses), got {uid!r}")
    return {"user": uid, "group": uid, "extra_groups": []}


_probe_lock = threading.Lock()
# key -> (reason the sandbox is unavailable or None, time.monotonic() of the check); a failure is
# checked again after _PROBE_RETRY seconds (it may have been a passing overload), a success is kept.
_probe_result: dict[tuple, tuple[str | None, float]] = {}
_PROBE_RETRY = 30.0


_SELF_TEST = None  # set below, once TestedProgram exists


def isolation_available() -> tuple[bool, str]:
    """Whether the bubblewrap sandbox works on this machine, and if not, why (with how to fix it).

    The check runs a known-good tested program through the whole sandbox and harness and requires
    ``"passed"``: a machine where anything the harness needs is missing (user namespaces, ``ctypes``
    for ``prctl``, the interpreter, the seccomp filter's architecture) is refused here, rather than
    scoring every program 0. A success is kept for the life of the process; a failure is checked again
    after 30 seconds."""
    try:
        python = sandbox_python()
        key = (python, os.geteuid(), UID_BASE)
        with _probe_lock:
            cached = _probe_result.get(key)
            if cached is None or (cached[0] is not None and time.monotonic() - cached[1] > _PROBE_RETRY):
                try:
                    result = _run(_SELF_TEST, SandboxLimits(wall_seconds=60), "bwrap")
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
        return False, f"the operating-system sandbox does not start on this machine: {reason}; {_INSTALL_HINT}"
    return True, ""


# ---------------------------------------------------------------------------------------- one run
def _spec(program: str | TestedProgram, limits: SandboxLimits, isolation: str) -> tuple[dict, dict | None]:
    """What the program's process needs, and the tests (``None`` for a plain source): the harness
    reads the second only after the fork, so the program cannot find the tests in its memory."""
    limit_values = {k: int(v) for k, v in asdict(limits).items() if k != "wall_seconds"}
    public = {"watch_paths": [_WORKDIR, "/tmp"] if isolation == "bwrap" else None, "limits": limit_values}
    if isinstance(program, TestedProgram):
        public.update(kind="tested", source=program.source, run_name="__candidate__")
        return public, {"prelude": program.prelude, "test": program.test, "entry_point": program.entry_point}
    if isinstance(program, str):
        public.update(kind="script", source=program, run_name="__main__")
        return public, None
    raise TypeError(f"program must be a TestedProgram or a str of Python source, got {type(program).__name__}")


def _frames(*objects: dict | None) -> bytes:
    """Length-prefixed JSON frames (``None`` is left out)."""
    out = b""
    for obj in objects:
        if obj is not None:
            data = json.dumps(obj).encode("utf-8")
            out += struct.pack(">Q", len(data)) + data
    return out


def _user_process_count() -> int:
    uid, count = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                count += entry.stat().st_uid == uid
            except OSError:
                pass
    return count


def _drain(proc: subprocess.Popen, verdict_r: int, deadline: float, cap: int,
           info: tuple[int, bytearray] | None = None) -> tuple[bytes, bytes, bytes, str]:
    """Read the sandbox's output and verdict through pipes until they close, the wall clock runs out or
    the output passes ``cap``; ``how`` is ``""``, ``"timeout"`` or ``"output_limit"``. ``info``: bwrap's
    information descriptor and the buffer to fill from it."""
    out, err, verdict = bytearray(), bytearray(), bytearray()
    targets = {proc.stdout.fileno(): (out, cap), proc.stderr.fileno(): (err, cap), verdict_r: (verdict, 1 << 16)}
    if info is not None:
        targets[info[0]] = (info[1], 1 << 12)
    how = ""
    with selectors.DefaultSelector() as sel:
        for fd in targets:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map() and not how:
            left = deadline - time.monotonic()
            if left <= 0:
                how = "timeout"
                break
            for key, _ in sel.select(left):
                data = os.read(key.fd, 1 << 16)
                if not data:
                    sel.unregister(key.fd)
                    continue
                buf, limit = targets[key.fd]
                buf += data[: max(0, limit - len(buf))]
                if len(buf) >= limit and key.fd in (proc.stdout.fileno(), proc.stderr.fileno()):
                    how = "output_limit"
    return bytes(out), bytes(err), bytes(verdict), how


def _sandbox_pid(proc: subprocess.Popen, info: bytes) -> int | None:
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


def _kill(proc: subprocess.Popen, info: bytes = b"") -> None:
    """End the sandbox and return once every process of it is gone. Killing ``bwrap`` alone would let
    its child (the harness, pid 1 of the sandbox) die a little later (``--die-with-parent``); so the
    harness is killed too and waited for: the kernel ends every process of a pid namespace before its
    pid 1 has exited."""
    if proc.poll() is None:
        pidfd = _sandbox_pid(proc, info)
        try:
            if pidfd is not None:
                try:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                except OSError:
                    pass
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
        finally:
            if pidfd is not None:
                os.close(pidfd)
    proc.wait()


def run_program(program: str | TestedProgram, limits: SandboxLimits | None = None, *,
                isolation: str = "bwrap") -> ExecutionResult:
    """Run ``program`` in the sandbox and report how it ended. Never raises for anything the program
    does; raises :class:`SandboxUnavailable` when the sandbox cannot start (unless
    ``isolation="none-unsafe"``, see the module docstring)."""
    limits = limits or SandboxLimits()
    if not isinstance(limits, SandboxLimits):
        raise TypeError(f"limits must be a SandboxLimits, got {type(limits).__name__}")
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    spec = _spec(program, limits, isolation)  # validates the program before anything starts
    if isolation == "bwrap":
        ok, reason = isolation_available()
        if not ok:
            raise SandboxUnavailable(reason)
    return _run(program, limits, isolation, spec)


def _run(program: str | TestedProgram, limits: SandboxLimits, isolation: str,
         spec: tuple[dict, dict | None] | None = None) -> ExecutionResult:
    spec, tests = spec or _spec(program, limits, isolation)
    if isolation == "bwrap":
        python = sandbox_python()
        prefix, identity, cwd = _bwrap_args(python, limits), _identity(), "/"
        seccomp = _seccomp_program()
    else:
        python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
        prefix, identity = [], {}
        cwd = tempfile.mkdtemp(prefix="reweighting-unsafe-")
        if os.geteuid() != 0:
            # Without a user namespace RLIMIT_NPROC counts every process of the user: leave room for those.
            spec["limits"]["max_processes"] += _user_process_count()
    token = secrets.token_hex(32).encode("ascii")
    spec_fd = os.memfd_create("reweighting-sandbox-spec")
    verdict_r, verdict_w = os.pipe()
    info_r, info_w = os.pipe() if isolation == "bwrap" else (-1, -1)
    seccomp_fd = os.memfd_create("reweighting-sandbox-seccomp") if isolation == "bwrap" else -1
    info = bytearray()
    try:
        data = _frames(spec, tests)
        while data:
            data = data[os.write(spec_fd, data):]
        os.lseek(spec_fd, 0, os.SEEK_SET)
        passed_fds = [verdict_w, spec_fd]
        if isolation == "bwrap":
            os.write(seccomp_fd, seccomp)
            os.lseek(seccomp_fd, 0, os.SEEK_SET)
            prefix = prefix + ["--seccomp", str(seccomp_fd), "--info-fd", str(info_w)]
            passed_fds += [seccomp_fd, info_w]
        args = prefix + [python, "-I", "-S", "-B", "-c", _HARNESS, str(verdict_w), str(spec_fd)]
        start = time.perf_counter()
        deadline = time.monotonic() + limits.wall_seconds
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=passed_fds, cwd=cwd, env={"LANG": "C.UTF-8"},
                                start_new_session=True, **identity)
        os.close(verdict_w)
        verdict_w = -1
        if info_w >= 0:
            os.close(info_w)
            info_w = -1
        try:
            try:
                proc.stdin.write(token)
                proc.stdin.close()
            except OSError:
                pass
            out, err, raw, how = _drain(proc, verdict_r, deadline, limits.max_output_bytes,
                                        (info_r, info) if info_r >= 0 else None)
        finally:
            _kill(proc, bytes(info))
            proc.stdout.close()
            proc.stderr.close()
        seconds = time.perf_counter() - start
    finally:
        for fd in (spec_fd, verdict_r, verdict_w, info_r, info_w, seccomp_fd):
            if fd >= 0:
                os.close(fd)
        if isolation != "bwrap":
            shutil.rmtree(cwd, ignore_errors=True)  # fd-based and symlink-safe on Linux
    stdout = out.decode("utf-8", errors="replace")
    stderr = err.decode("utf-8", errors="replace")
    verdict = _parse_verdict(raw, token)
    returncode = verdict.get("returncode") if verdict else None
    if how:
        return ExecutionResult(how, returncode, stdout, stderr, seconds,
                               "wall-clock limit" if how == "timeout" else "output limit")
    if verdict is None:
        return ExecutionResult("failed", None, stdout, stderr, seconds,
                               f"the sandbox ended without a valid verdict (exit {proc.returncode})")
    return ExecutionResult(verdict["status"], returncode, stdout, stderr, seconds, verdict["detail"])


_STATUSES = ("passed", "completed", "failed", "cpu_limit", "file_limit", "memory_limit")


def _parse_verdict(raw: bytes, token: bytes) -> dict | None:
    """The harness's verdict if it is well formed and carries exactly this run's token, else ``None``."""
    try:
        verdict = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(verdict, dict) or not secrets.compare_digest(str(verdict.get("token", "")),
                                                                   token.decode("ascii")):
        return None
    status, detail, code = verdict.get("status"), verdict.get("detail"), verdict.get("returncode")
    if status not in _STATUSES or not isinstance(detail, str) or not (code is None or type(code) is int):
        return None
    return {"status": status, "detail": detail, "returncode": code}


def run_programs(programs: Iterable[str | TestedProgram], limits: SandboxLimits | None = None, *,
                 workers: int = 4, progress: bool = False, isolation: str = "bwrap") -> list[ExecutionResult]:
    """:func:`run_program` on many programs, ``workers`` at a time (each run is its own sandbox)."""
    programs = list(programs)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    for i, program in enumerate(programs):
        if not isinstance(program, (str, TestedProgram)):
            raise TypeError(f"programs[{i}] must be a TestedProgram or a str, got {type(program).__name__}")
    if isolation == "bwrap" and programs:
        ok, reason = isolation_available()
        if not ok:
            raise SandboxUnavailable(reason)

    def one(program):
        return run_program(program, limits, isolation=isolation)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(one, programs)
        if not progress:
            return list(results)
        from tqdm.auto import tqdm

        return list(tqdm(results, total=len(programs), desc="run programs", leave=False))


_SELF_TEST = TestedProgram("def f(x):\n    return [x, 2 ** 70]\n",
                           "def check(candidate):\n    assert candidate('a') == ['a', 2 ** 70]\n", "f")


def humaneval_program(problem: dict, completion: str) -> TestedProgram:
    """The tested program of one HumanEval-style completion: the untrusted source is prompt + completion;
    the prompt (trusted helpers such as ``poly``) and ``test`` run in the harness, which calls
    ``check(<entry_point>)``."""
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
                         entry_point=problem["entry_point"], prelude=problem["prompt"])


def code_reward(programs: Sequence[TestedProgram], limits: SandboxLimits | None = None, *, workers: int = 4,
                isolation: str = "bwrap", trust_programs: bool = False) -> list[float]:
    """1.0 for each program whose tests the harness ran and saw pass (status ``"passed"``), else 0.0.

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
                f"code_reward: programs[{i}] must be a TestedProgram (from humaneval_program or "
                f"TestedProgram(source, test, entry_point)), got {type(program).__name__}; a plain source "
                f"string cannot be rewarded because its only verdict is its own exit, which it can forge")
    return [1.0 if r.passed else 0.0 for r in run_programs(programs, limits, workers=workers, isolation=isolation)]
