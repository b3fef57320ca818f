"""The limit watcher of one sandboxed run: a process of its own outside the sandbox (see
:mod:`reweighting.qprobe.sandbox`).

This file is not imported by the library: its text runs with ``python -I -S -B -c`` in a new
process beside ``bwrap``, so no thread of the evaluator or of the sandbox's trusted harness can
delay it, and no process of the sandbox can name, signal, ptrace or reschedule it (it is in none of
the sandbox's namespaces). Arguments: the descriptor of its socket to the evaluator, the descriptor
of its socket to the harness, ``max_files``, ``memory_bytes``, and the poll interval in seconds.

1. From the evaluator it receives a pidfd of the sandbox's first process (the harness, pid 1 of
   the sandbox's pid namespace: killing it ends every process of the sandbox).
2. From the harness, before the program's process exists, it receives descriptors of the run's
   writable file systems (tmpfs) and of the sandbox's own ``/proc``, then answers ``w``.
3. Every interval it counts the inodes in use on those file systems (``fstatvfs``) and sums the
   resident memory of every process of the sandbox (``statm`` under its ``/proc``, opened relative
   to that descriptor: procfs entries are the kernel's, no path the program could make) and the
   bytes queued in its TCP and UDP sockets. Past ``max_files`` or ``memory_bytes`` it kills the
   sandbox.
4. Once the harness has ended (or a limit was passed) it writes one JSON line to the evaluator:
   ``{"status", "detail", "peak_files", "peak_memory", "peak_fds", "polls"}`` (``status`` ``""`` when
   no limit was passed), and exits. Any error of its own is reported as ``"failed"``: a watcher that
   cannot look must not leave the limits unenforced.

``peak_fds`` is the largest number of open descriptors of the sandbox's processes together seen in
one poll (``-1`` where the evaluator may not read the processes' descriptor tables).
"""

# Only modules built into the interpreter (``_socket``, ``_signal``, no ``json``): the run's harness waits
# for this process to start, so its start-up time is on every run's path.
import _signal
import _socket
import array
import os
import select
import sys


def to_json(report):
    """``report`` (ints and ASCII strings) as one line of JSON."""
    def text(value):
        value = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "?" for c in str(value))
        return '"' + value + '"'

    items = (f"{text(k)}: {v if type(v) is int else text(v)}" for k, v in report.items())
    return "{" + ", ".join(items) + "}"


def receive_fds(sock, most):
    fds = array.array("i")
    data, ancillary, _, _ = sock.recvmsg(1, _socket.CMSG_SPACE(most * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


NET_TABLES = ("1/net/tcp", "1/net/tcp6", "1/net/udp", "1/net/udp6")


def socket_bytes(proc):
    """Bytes queued in the TCP and UDP sockets of the sandbox's network namespace (each line of
    ``/proc/net/{tcp,udp}{,6}`` has ``tx_queue:rx_queue`` in hex): kernel memory outside every
    process's resident memory."""
    total = 0
    for table in NET_TABLES:
        try:
            fd = os.open(table, os.O_RDONLY, dir_fd=proc)
        except FileNotFoundError:
            continue  # that protocol is not built into this kernel
        with open(fd, "rb") as f:
            lines = f.read().splitlines()[1:]
        for line in lines:
            tx, rx = line.split()[4].split(b":")
            total += int(tx, 16) + int(rx, 16)
    return total


def poll(mounts, proc, page, count_fds):
    files = 0
    for fd in mounts:
        info = os.fstatvfs(fd)
        files += info.f_files - info.f_ffree
    memory, descriptors = socket_bytes(proc), 0
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            with open(os.open(name + "/statm", os.O_RDONLY, dir_fd=proc), "rb") as f:
                memory += int(f.read().split()[1]) * page
        except (FileNotFoundError, ProcessLookupError):
            continue  # it has just ended
        if count_fds and descriptors >= 0:
            try:
                table = os.open(name + "/fd", os.O_RDONLY | os.O_DIRECTORY, dir_fd=proc)
                try:
                    descriptors += len(os.listdir(table))
                finally:
                    os.close(table)
            except (FileNotFoundError, ProcessLookupError):
                pass
            except PermissionError:
                descriptors = -1
    return files, memory, descriptors


def main():
    control = _socket.socket(fileno=int(sys.argv[1]))
    harness = _socket.socket(fileno=int(sys.argv[2]))
    max_files, max_memory, interval = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    report = {"status": "", "detail": "", "peak_files": 0, "peak_memory": 0, "peak_fds": 0, "polls": 0}
    pidfd = -1
    try:
        _, got = receive_fds(control, 1)
        if len(got) != 1:
            raise RuntimeError("no pidfd of the sandbox from the evaluator")
        pidfd = got[0]
        data, fds = receive_fds(harness, 8)
        if data != b"w" or len(fds) < 2:
            raise RuntimeError("the sandbox's harness did not hand over its file systems")
        mounts, proc = fds[:-1], fds[-1]
        harness.sendall(b"w")
        harness.close()
        page = os.sysconf("SC_PAGE_SIZE")
        ended = select.poll()
        ended.register(pidfd, select.POLLIN)  # readable once the harness has exited
        finished = False
        while True:
            # Descriptors are only measured (no limit but the kernel's): every tenth poll is enough.
            files, memory, descriptors = poll(mounts, proc, page, report["polls"] % 10 == 0)
            report["polls"] += 1
            report["peak_files"] = max(report["peak_files"], files)
            report["peak_memory"] = max(report["peak_memory"], memory)
            report["peak_fds"] = -1 if descriptors < 0 else max(report["peak_fds"], descriptors)
            if files > max_files:
                report.update(status="file_limit", detail=f"more than {max_files} files or directories")
            elif memory > max_memory:
                report.update(status="memory_limit",
                              detail=f"the sandbox's processes used more than {max_memory} bytes")
            # once the harness has ended, one more look: what a run left on its file systems counts
            # even when it was made between two polls
            if report["status"] or finished:
                break
            finished = bool(ended.poll(interval * 1000))
    except BaseException as exc:  # fail closed
        report.update(status="failed", detail=f"the limit watcher failed: {type(exc).__name__}: {exc}")
    if report["status"] and pidfd >= 0:
        try:
            _signal.pidfd_send_signal(pidfd, _signal.SIGKILL)
        except OSError:
            pass
    control.sendall(to_json(report).encode("ascii") + b"\n")
    os._exit(0)


if __name__ == "__main__":
    main()
