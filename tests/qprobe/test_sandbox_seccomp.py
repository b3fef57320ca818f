"""Each rule of the sandbox's seccomp filter, probed from inside a sandbox.

The filter under test is the production one with one change: a refused call fails with an error
that no kernel path returns for these calls (``ERR_DENY``, ``ERR_LOCK``), so a refusal by the
filter cannot be mistaken for the kernel's own (many of these calls fail with ``EPERM`` anyway for
a process without capabilities). Each call is made with arguments that are harmless if it went
through.
"""

import json
import platform

import pytest

from reweighting.qprobe import _bwrap, _seccomp
from reweighting.qprobe.sandbox import SandboxLimits, isolation_available, run_program

pytestmark = pytest.mark.skipif(not isolation_available()[0], reason=isolation_available()[1])

ERR_DENY, ERR_LOCK = 133, 134  # EHWPOISON and one past it: no system call here returns them
ARCH = _seccomp.machine_arch(platform.machine()) if platform.machine().lower() in (
    "x86_64", "amd64", "aarch64", "arm64") else None
# What must be refused, written out here rather than read from the module, so that a name dropped from
# the filter's list fails its test instead of losing it.
MUST_DENY = (
    "shmget", "shmat", "shmctl", "msgget", "msgsnd", "msgrcv", "msgctl", "semget", "semop", "semctl",
    "semtimedop", "memfd_create", "memfd_secret", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "userfaultfd", "add_key", "request_key", "keyctl", "perf_event_open", "bpf", "ptrace",
    "process_vm_readv", "process_vm_writev", "pidfd_getfd", "unshare", "setns", "mount", "umount2",
    "pivot_root", "chroot", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
    "mount_setattr", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "name_to_handle_at", "open_by_handle_at", "flock", "inotify_init1", "inotify_add_watch", "fanotify_init",
    "fanotify_mark", "inotify_init",
)
MUST_DENY_FCNTL = ("F_GETLK", "F_SETLK", "F_SETLKW", "F_OFD_GETLK", "F_OFD_SETLK", "F_OFD_SETLKW", "F_SETLEASE",
                   "F_GETLEASE", "F_NOTIFY")
LIMITS = SandboxLimits(wall_seconds=20.0, cpu_seconds=5, memory_bytes=512 << 20, max_processes=8)

_PROBE = r'''
import ctypes, json, os, socket
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(nr, *args):
    ctypes.set_errno(0)
    args = [ctypes.c_long(a) for a in args] + [ctypes.c_long(0)] * (6 - len(args))
    result = libc.syscall(ctypes.c_long(nr), *args)
    return ctypes.get_errno() if result == -1 else 0
out = {}
for name, nr in NUMBERS.items():
    out[name] = call(nr)
fd = os.open("/usr/bin/env", os.O_RDONLY)
lock = ctypes.create_string_buffer(64)  # a struct flock, zeroed: F_RDLCK of the whole file
for name, cmd in FCNTL.items():
    out["fcntl " + name] = call(NUMBERS_ALL["fcntl"], fd, cmd, ctypes.addressof(lock))
out["fcntl F_GETFD"] = call(NUMBERS_ALL["fcntl"], fd, 1)
r, w = os.pipe()
out["fcntl F_SETPIPE_SZ"] = call(NUMBERS_ALL["fcntl"], w, 1031, 1 << 20)
out["fcntl F_GETPIPE_SZ"] = call(NUMBERS_ALL["fcntl"], w, 1032)
size = ctypes.c_int(1 << 22)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
for option in (7, 8, 32, 33):
    out["setsockopt %d" % option] = call(NUMBERS_ALL["setsockopt"], s.fileno(), 1, option, ctypes.addressof(size), 4)
out["setsockopt SO_KEEPALIVE"] = call(NUMBERS_ALL["setsockopt"], s.fileno(), 1, 9, ctypes.addressof(size), 4)
out["setsockopt at another level"] = call(NUMBERS_ALL["setsockopt"], s.fileno(), 0, 7, ctypes.addressof(size), 4)
out["flock on /usr"] = call(NUMBERS_ALL["flock"], fd, 2 | 4)  # LOCK_EX | LOCK_NB
for family, kind in ((16, socket.SOCK_RAW), (40, socket.SOCK_STREAM), (17, socket.SOCK_RAW)):
    out["socket family %d" % family] = call(NUMBERS_ALL["socket"], family, kind, 0)
out["socket AF_UNIX"] = call(NUMBERS_ALL["socket"], 1, socket.SOCK_STREAM, 0)
limits = ctypes.create_string_buffer(16)
out["prlimit on the harness"] = call(NUMBERS_ALL["prlimit64"], 1, 7, 0, ctypes.addressof(limits))
out["prlimit on itself"] = call(NUMBERS_ALL["prlimit64"], 0, 7, 0, ctypes.addressof(limits))
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def probed():
    if ARCH is None:
        pytest.skip(f"no seccomp filter for {platform.machine()}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_bwrap, "seccomp_program",
                      lambda: _seccomp.seccomp_filter(deny_errno=ERR_DENY, lock_errno=ERR_LOCK))
        numbers = _seccomp.SYSCALLS[ARCH]
        known = numbers | _seccomp.EXTRA_SYSCALLS[ARCH]
        denied = {name: known[name] for name in MUST_DENY if name in known}
        commands = {"F_GETLK": 5, "F_SETLK": 6, "F_SETLKW": 7, "F_OFD_GETLK": 36, "F_OFD_SETLK": 37,
                    "F_OFD_SETLKW": 38, "F_SETLEASE": 1024, "F_GETLEASE": 1025, "F_NOTIFY": 1026}
        source = f"NUMBERS = {denied!r}\nNUMBERS_ALL = {numbers!r}\nFCNTL = {commands!r}\n" + _PROBE
        result = run_program(source, LIMITS)
    assert result.status == "completed", result
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", MUST_DENY)
def test_a_denied_call_is_refused_by_the_filter(probed, name):
    if name not in probed:
        pytest.skip(f"{name} does not exist on {ARCH}")
    assert probed[name] == ERR_DENY, (name, probed[name])


@pytest.mark.parametrize("command", MUST_DENY_FCNTL)
def test_a_denied_fcntl_command_is_refused_by_the_filter(probed, command):
    assert probed["fcntl " + command] == ERR_LOCK, (command, probed["fcntl " + command])


@pytest.mark.parametrize("option", [7, 8, 32, 33])  # SO_SNDBUF, SO_RCVBUF, SO_SNDBUFFORCE, SO_RCVBUFFORCE
def test_socket_buffers_cannot_grow(probed, option):
    assert probed[f"setsockopt {option}"] == ERR_DENY


def test_pipe_buffers_cannot_grow(probed):
    assert probed["fcntl F_SETPIPE_SZ"] == ERR_DENY


def test_the_rest_of_the_kernel_interface_still_works(probed):
    assert probed["fcntl F_GETFD"] == 0 and probed["fcntl F_GETPIPE_SZ"] == 0
    assert probed["setsockopt SO_KEEPALIVE"] == 0
    assert probed["setsockopt at another level"] != ERR_DENY  # (level 0 is IPPROTO_IP: not a unix socket's)
    assert probed["socket AF_UNIX"] == 0
    assert probed["prlimit on itself"] == 0


def test_flock_on_a_file_every_run_shares_is_refused(probed):
    assert probed["flock on /usr"] == ERR_DENY


@pytest.mark.parametrize("family", [16, 40, 17])  # AF_NETLINK, AF_VSOCK, AF_PACKET
def test_socket_families_outside_the_three_are_refused(probed, family):
    assert probed[f"socket family {family}"] == 97  # EAFNOSUPPORT, from the filter


def test_no_process_changes_another_ones_limits(probed):
    assert probed["prlimit on the harness"] == ERR_DENY


def test_the_filter_refuses_bad_errnos():
    for bad in (0, 4096, True, 1.0):
        with pytest.raises(ValueError, match="errno"):
            _seccomp.seccomp_filter("x86_64", deny_errno=bad)


def test_the_filter_lists_are_the_ones_tested():
    assert set(_seccomp.DENIED) | set(_seccomp.DENIED_X86_64) == set(MUST_DENY)
    assert set(_seccomp.FCNTL_DENIED) == set(MUST_DENY_FCNTL) and set(_seccomp.FCNTL_EPERM) == {"F_SETPIPE_SZ"}
    assert _seccomp.SOCKOPT_DENIED == {"SO_SNDBUF": 7, "SO_RCVBUF": 8, "SO_SNDBUFFORCE": 32, "SO_RCVBUFFORCE": 33}
