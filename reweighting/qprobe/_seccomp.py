"""The seccomp filter of the code-reward sandbox: a classic BPF program that ``bwrap --seccomp FD``
loads before the harness starts (see :mod:`reweighting.qprobe.sandbox`).

It narrows the kernel interface of every process in the sandbox (the harness included):

- a system call of another architecture ABI (x86's 32-bit ``int 0x80`` entry on x86_64, whose
  numbers differ) kills the process; the x32 ABI (numbers with bit 30 set) fails with ``EPERM``;
- ``socket``/``socketpair`` only for ``AF_UNIX``, ``AF_INET`` and ``AF_INET6`` (the network
  namespace has no interface but its own loopback); any other family, in particular ``AF_VSOCK``
  (not confined by network namespaces) and ``AF_NETLINK``, fails with ``EAFNOSUPPORT``;
- ``prlimit64`` only on the calling process itself (pid argument 0): no process may change another
  one's limits, such as the harness's;
- ``fcntl`` refuses the commands in :data:`FCNTL_DENIED` with ``ENOLCK``: POSIX and open-file-
  description byte-range locks, leases and directory notification (``F_NOTIFY``). Locks on the
  read-only files every run shares (``/usr``) are a channel between concurrent runs (one run takes
  the lock, another sees it taken) and kernel memory that no limit counts; growing a pipe's buffer
  (:data:`FCNTL_EPERM`: ``F_SETPIPE_SZ``) fails with ``EPERM``;
- ``setsockopt`` refuses :data:`SOCKOPT_DENIED` (``SO_SNDBUF``, ``SO_RCVBUF`` and their ``FORCE``
  forms) with ``EPERM``: a socket's buffers stay at the kernel's defaults, which bounds the kernel
  memory one descriptor can hold (``docs/code-reward.md``);
- :data:`DENIED` fails with ``EPERM``: System V IPC (memory outside every limit), ``memfd_create``
  (memory outside the resident-memory poll), io_uring, userfaultfd, the key rings,
  ``perf_event_open``, ``bpf``, ``ptrace`` and ``process_vm_*``, namespaces and mounts, module and
  kexec loading, file handles and ``pidfd_getfd``; ``flock`` (a channel between runs, as above);
  inotify and fanotify (they would show what other runs and the host open and run in the shared
  ``/usr``, and inotify instances are a per-user budget).

Only x86_64 and aarch64 are known; :func:`seccomp_filter` raises ``ValueError`` on any other
machine, so that the sandbox refuses to start rather than run without the filter.
"""

from __future__ import annotations

import platform
import struct

__all__ = ["DENIED", "DENIED_X86_64", "FCNTL_DENIED", "FCNTL_EPERM", "SOCKOPT_DENIED", "seccomp_filter", "SYSCALLS"]

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6] (little-endian
# on both architectures, so an argument's low 32 bits are at its own offset).
_NR, _ARCH, _ARG0, _ARG1, _ARG2 = 0, 4, 16, 24, 32
# Classic BPF opcodes: BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_JMP|BPF_JGE|BPF_K, BPF_RET|BPF_K.
_LD, _JEQ, _JGE, _RET = 0x20, 0x15, 0x35, 0x06
_ALLOW, _ERRNO, _KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
_EPERM, _ENOLCK, _EAFNOSUPPORT = 1, 37, 97
_X32_BIT = 0x40000000
_ALLOWED_FAMILIES = (1, 2, 10)  # AF_UNIX, AF_INET, AF_INET6

DENIED = (
    "shmget", "shmat", "shmctl", "msgget", "msgsnd", "msgrcv", "msgctl", "semget", "semop", "semctl",
    "semtimedop", "memfd_create", "memfd_secret", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "userfaultfd", "add_key", "request_key", "keyctl", "perf_event_open", "bpf", "ptrace",
    "process_vm_readv", "process_vm_writev", "pidfd_getfd", "unshare", "setns", "mount", "umount2",
    "pivot_root", "chroot", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
    "mount_setattr", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "name_to_handle_at", "open_by_handle_at", "flock", "inotify_init1", "inotify_add_watch", "fanotify_init",
    "fanotify_mark",
)
# x86_64 only (aarch64 has only inotify_init1).
DENIED_X86_64 = ("inotify_init",)
# fcntl commands (include/uapi/asm-generic/fcntl.h, linux/fcntl.h; the same on both architectures).
FCNTL_DENIED = {"F_GETLK": 5, "F_SETLK": 6, "F_SETLKW": 7, "F_OFD_GETLK": 36, "F_OFD_SETLK": 37,
                "F_OFD_SETLKW": 38, "F_SETLEASE": 1024, "F_GETLEASE": 1025, "F_NOTIFY": 1026}
FCNTL_EPERM = {"F_SETPIPE_SZ": 1031}  # refused with EPERM: a pipe's buffer stays at the default
# setsockopt(SOL_SOCKET, ...) options that would grow a socket's kernel buffers past the defaults.
SOL_SOCKET = 1
SOCKOPT_DENIED = {"SO_SNDBUF": 7, "SO_RCVBUF": 8, "SO_SNDBUFFORCE": 32, "SO_RCVBUFFORCE": 33}

# System call numbers (x86_64: asm/unistd_64.h; aarch64: asm-generic/unistd.h), and the AUDIT_ARCH
# value the kernel reports for each ABI.
SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {
        "socket": 41, "socketpair": 53, "prlimit64": 302, "shmget": 29, "shmat": 30, "shmctl": 31,
        "msgget": 68, "msgsnd": 69, "msgrcv": 70, "msgctl": 71, "semget": 64, "semop": 65, "semctl": 66,
        "semtimedop": 220, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "userfaultfd": 323, "add_key": 248, "request_key": 249, "keyctl": 250, "perf_event_open": 298,
        "bpf": 321, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "unshare": 272,
        "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "open_tree": 428,
        "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
        "mount_setattr": 442, "kexec_load": 246, "kexec_file_load": 320, "init_module": 175,
        "finit_module": 313, "delete_module": 176, "memfd_create": 319, "memfd_secret": 447,
        "pidfd_getfd": 438, "name_to_handle_at": 303, "open_by_handle_at": 304, "flock": 73, "fcntl": 72,
        "setsockopt": 54, "inotify_init1": 294, "inotify_add_watch": 254, "fanotify_init": 300, "fanotify_mark": 301,
    },
    "aarch64": {
        "socket": 198, "socketpair": 199, "prlimit64": 261, "shmget": 194, "shmat": 196, "shmctl": 195,
        "msgget": 186, "msgsnd": 189, "msgrcv": 188, "msgctl": 187, "semget": 190, "semop": 193,
        "semctl": 191, "semtimedop": 192, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "userfaultfd": 282, "add_key": 217, "request_key": 218, "keyctl": 219,
        "perf_event_open": 241, "bpf": 280, "ptrace": 117, "process_vm_readv": 270,
        "process_vm_writev": 271, "unshare": 97, "setns": 268, "mount": 40, "umount2": 39,
        "pivot_root": 41, "chroot": 51, "open_tree": 428, "move_mount": 429, "fsopen": 430,
        "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442, "kexec_load": 104,
        "kexec_file_load": 294, "init_module": 105, "finit_module": 273, "delete_module": 106,
        "memfd_create": 279, "memfd_secret": 447, "pidfd_getfd": 438, "name_to_handle_at": 264,
        "open_by_handle_at": 265, "flock": 32, "fcntl": 25, "setsockopt": 208, "inotify_init1": 26,
        "inotify_add_watch": 27, "fanotify_init": 262, "fanotify_mark": 263,
    },
}
EXTRA_SYSCALLS = {"x86_64": {"inotify_init": 253}, "aarch64": {}}
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_MACHINE_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}


def machine_arch(machine: str | None = None) -> str:
    """The filter's name for ``machine`` (default: this one), or ``ValueError`` if it has no filter."""
    raw = platform.machine() if machine is None else machine
    arch = _MACHINE_ALIASES.get(raw.lower(), raw.lower())
    if arch not in SYSCALLS:
        raise ValueError(f"the sandbox's seccomp filter knows x86_64 and aarch64 only, this machine is {raw!r}: "
                         f"it refuses to run programs without the filter")
    return arch


def seccomp_filter(machine: str | None = None, *, deny_errno: int = _EPERM, lock_errno: int = _ENOLCK) -> bytes:
    """The filter as ``struct sock_filter`` records (what ``bwrap --seccomp`` reads) for ``machine``.
    ``deny_errno`` and ``lock_errno``: the error of a refused call and of a refused ``fcntl`` command
    (tests pass errors no kernel path returns, to tell the filter's refusals from the kernel's)."""
    for value in (deny_errno, lock_errno):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 4096:
            raise ValueError(f"an errno must be an int from 1 to 4095, got {value!r}")
    arch = machine_arch(machine)
    numbers = SYSCALLS[arch]
    # Instructions as (code, jump-true label, jump-false label, k); a label is an index into ``labels``,
    # resolved to a forward offset at the end (classic BPF jumps forward only, by at most 255).
    program: list[tuple[int, str | None, str | None, int]] = [
        (_LD, None, None, _ARCH),
        (_JEQ, None, "kill", _AUDIT_ARCH[arch]),
        (_LD, None, None, _NR),
    ]
    if arch == "x86_64":
        program.append((_JGE, "eperm", None, _X32_BIT))
    extra = EXTRA_SYSCALLS[arch]
    for number in [numbers[name] for name in DENIED] + [extra[name] for name in DENIED_X86_64 if name in extra]:
        program.append((_JEQ, "eperm", None, number))
    program += [
        (_JEQ, "socket", None, numbers["socket"]),
        (_JEQ, "socket", None, numbers["socketpair"]),
        (_JEQ, "prlimit", None, numbers["prlimit64"]),
        (_JEQ, "fcntl", None, numbers["fcntl"]),
        (_JEQ, "setsockopt", None, numbers["setsockopt"]),
        (_RET, None, None, _ALLOW),
    ]
    # fcntl's command is an unsigned int: the kernel reads the low 32 bits of the argument, as here.
    labels = {"fcntl": len(program)}
    program.append((_LD, None, None, _ARG1))
    for command in FCNTL_DENIED.values():
        program.append((_JEQ, "enolck", None, command))
    for command in FCNTL_EPERM.values():
        program.append((_JEQ, "eperm", None, command))
    program.append((_RET, None, None, _ALLOW))
    labels["setsockopt"] = len(program)
    program += [(_LD, None, None, _ARG1), (_JEQ, None, "allow", SOL_SOCKET), (_LD, None, None, _ARG2)]
    for option in SOCKOPT_DENIED.values():
        program.append((_JEQ, "eperm", None, option))
    program.append((_RET, None, None, _ALLOW))
    labels["socket"] = len(program)
    program.append((_LD, None, None, _ARG0))
    for family in _ALLOWED_FAMILIES:
        program.append((_JEQ, "allow", None, family))
    program.append((_RET, None, None, _ERRNO | _EAFNOSUPPORT))
    labels["prlimit"] = len(program)
    program += [(_LD, None, None, _ARG0), (_JEQ, "allow", None, 0), (_RET, None, None, _ERRNO | deny_errno)]
    for name, action in (("allow", _ALLOW), ("eperm", _ERRNO | deny_errno), ("enolck", _ERRNO | lock_errno),
                         ("kill", _KILL_PROCESS)):
        labels[name] = len(program)
        program.append((_RET, None, None, action))
    out = []
    for index, (code, true, false, k) in enumerate(program):
        jt = 0 if true is None else labels[true] - index - 1
        jf = 0 if false is None else labels[false] - index - 1
        if not (0 <= jt <= 255 and 0 <= jf <= 255):
            raise AssertionError("seccomp filter jump out of range")
        out.append(struct.pack("=HBBI", code, jt, jf, k))
    return b"".join(out)
