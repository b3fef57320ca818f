"""The bubblewrap command line of one sandboxed run: which interpreter, what the program sees, as whom
(see ``docs/code-reward.md`` for the design)."""

from __future__ import annotations

import os
import shutil
import stat
import sys
from pathlib import Path

from . import _seccomp
from ._sandbox_types import SandboxLimits, SandboxUnavailable

INSIDE_UID = 65534
WORKDIR = "/sandbox"
#: The run's writable file systems, each a tmpfs of ``max_disk_bytes``; the watcher counts their inodes.
WRITABLE = (WORKDIR, "/tmp", "/dev/shm")
INSTALL_HINT = ("install bubblewrap 0.8 or later (Debian/Ubuntu: `apt-get install bubblewrap`; Fedora: `dnf install "
                "bubblewrap`) and allow unprivileged user namespaces (sysctl user.max_user_namespaces > 0, "
                "kernel.unprivileged_userns_clone = 1 where it exists, and on Ubuntu 24.04+ "
                "kernel.apparmor_restrict_unprivileged_userns = 0 or an AppArmor profile for bwrap); or pass "
                "isolation='none-unsafe' only for programs you trust")
#: Files of the sandbox's ``/etc``, written by the evaluator (never the host's): the user the program
#: runs as (``getpass.getuser()``, ``pwd``), and ``localhost`` for name resolution.
ETC_FILES = {
    "/etc/passwd": f"sandbox:x:{INSIDE_UID}:{INSIDE_UID}:sandbox:{WORKDIR}:/usr/sbin/nologin\n",
    "/etc/group": f"sandbox:x:{INSIDE_UID}:\n",
    "/etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    "/etc/nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
}


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


def python_root(python: str) -> str | None:
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


def bwrap_path() -> str:
    found = shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin:/usr/sbin:/sbin")
    if found is None:
        raise SandboxUnavailable(f"the sandbox needs bubblewrap (`bwrap`), which is not installed: {INSTALL_HINT}")
    return found


_DEVICES = ("null", "zero", "full", "random", "urandom")


def seccomp_program() -> bytes:
    """The seccomp filter for this machine (see :mod:`._seccomp`); refused on an unknown architecture."""
    try:
        return _seccomp.seccomp_filter()
    except ValueError as err:
        raise SandboxUnavailable(str(err)) from None


def bwrap_args(python: str, limits: SandboxLimits, etc_fds: dict[str, int]) -> list[str]:
    """The ``bwrap`` command line up to the program, but for the descriptors of one run's seccomp filter
    and information, which the caller adds. ``etc_fds``: for each of :data:`ETC_FILES`, a descriptor
    of its content (``bwrap --ro-bind-data``)."""
    args = [bwrap_path(), "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
            "--as-pid-1", "--cap-drop", "ALL", "--uid", str(INSIDE_UID), "--gid", str(INSIDE_UID), "--clearenv",
            "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", WORKDIR, "--setenv", "TMPDIR", "/tmp",
            "--setenv", "LANG", "C.UTF-8", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/lib", "/lib64", "/lib32", "/libx32", "/sbin"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    root = python_root(python)
    if root is not None:
        args += ["--ro-bind", root, root]
    size = str(int(limits.max_disk_bytes))
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache", "--proc", "/proc"]
    for path in ETC_FILES:
        args += ["--ro-bind-data", str(etc_fds[path]), path]
    # /dev by hand rather than ``--dev``, which would add a devpts (/dev/ptmx: pseudo-terminals are a
    # machine-wide budget) and the host's /dev/shm; /dev/shm here is a private tmpfs like /tmp (POSIX
    # semaphores and shared memory, which multiprocessing needs, are files there: capped and counted).
    args += ["--perms", "0755", "--tmpfs", "/dev"]
    for name in _DEVICES:
        args += ["--dev-bind", f"/dev/{name}", f"/dev/{name}"]
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        args += ["--symlink", target, f"/dev/{name}"]
    args += ["--dir", "/dev/shm", "--remount-ro", "/dev", "--size", size, "--perms", "0700", "--tmpfs", "/dev/shm",
             "--size", size, "--perms", "0700", "--tmpfs", "/tmp",
             "--size", size, "--perms", "0700", "--tmpfs", WORKDIR,
             "--remount-ro", "/", "--chdir", WORKDIR]
    return args


def identity(uid: int | None) -> dict:
    """``subprocess.Popen`` arguments that drop root to the run's own user and group ``uid`` (from
    :func:`._uids.lease`; ``None``, when the evaluator is not root, leaves the caller's)."""
    return {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
