"""The harness that runs inside the sandbox (see :mod:`reweighting.qprobe.sandbox` for the design).

This file is not imported by the library: its text is handed to the sandbox's interpreter with
``python -I -S -B -c``. It must use the standard library only and run on any Python >= 3.8.

It becomes two processes. ``P``, the trusted one (pid 1 of the sandbox's pid namespace), reads the
program part of the run's specification, sets the limits and forks ``C``; only then does it read
the problem's trusted code (prelude and tests) and run it, so that no copy of the tests is in
``C``'s memory. ``C`` closes every descriptor but its two pipes to ``P`` and its standard output
and error, then runs the untrusted program. ``P`` calls the test's ``check`` with a stand-in for the
entry point that forwards each call to ``C`` and rebuilds the result from a plain-value encoding,
so no object of the program ever exists in ``P``. Only ``P`` holds the verdict descriptor, and it
reads the run's random token from standard input only after ``C`` exists (so no copy of it is in
``C``'s memory); it writes ``{"token", "status", ...}`` there once, at the end.
"""

import builtins
import json
import os
import resource
import signal
import struct
import sys

MAX_MESSAGE = 1 << 25  # bytes of one encoded call or result
MAX_DEPTH = 200  # nesting of one encoded value
TOKEN_BYTES = 64  # hex characters of the run's token


class ProtocolError(Exception):
    """The program's process sent something that is not a well-formed message."""


class ProgramError(Exception):
    """The program raised an exception that is not a built-in ``Exception`` subclass, or ended."""


# ---------------------------------------------------------------- plain-value encoding (both sides)
def builtin_base(value):
    """``value`` as an instance of the exact built-in type it subclasses (``namedtuple`` -> ``tuple``,
    ``Counter``/``OrderedDict``/``defaultdict`` -> ``dict``, ``IntEnum`` -> ``int``, a ``str`` or
    ``float`` subclass -> ``str``/``float``), read through the built-in type's own methods so that the
    subclass's overrides (``__eq__``, ``__str__``, ...) are left behind; ``value`` itself when it is no
    such subclass. Only the program's process uses it: what crosses to the tests is plain data."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, complex):
        return complex(complex.real.__get__(value), complex.imag.__get__(value))
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bytes):
        return bytes(memoryview(value))
    for base in (dict, list, tuple, frozenset, set):
        if isinstance(value, base):
            return base(value)
    return value


def encode(value, depth=0, loose=False):
    """A JSON-able tagged form of ``value``; exact built-in types only: subclasses are refused, or with
    ``loose`` (the program's results) first turned into their built-in base by :func:`builtin_base`."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    t = type(value)
    if loose and t not in EXACT:
        value = builtin_base(value)
        t = type(value)
    if value is None:
        return ["n"]
    if t is bool:
        return ["b", value]
    if t is int:
        return ["i", hex(value)]
    if t is float:
        return ["f", value.hex()]
    if t is complex:
        return ["c", value.real.hex(), value.imag.hex()]
    if t is str:
        return ["s", value]
    if t is bytes:
        return ["y", value.hex()]
    if t in (list, tuple, set, frozenset):
        tag = {list: "l", tuple: "t", set: "S", frozenset: "F"}[t]
        return [tag, [encode(v, depth + 1, loose) for v in value]]
    if t is dict:
        return ["d", [[encode(k, depth + 1, loose), encode(v, depth + 1, loose)] for k, v in value.items()]]
    raise TypeError(f"a value of type {t.__name__} cannot be passed between the tests and the program")


EXACT = (type(None), bool, int, float, complex, str, bytes, list, tuple, set, frozenset, dict)


def _hex_int(text):
    if type(text) is not str or not text or len(text) > MAX_MESSAGE:
        raise ProtocolError("bad integer")
    body = text[1:] if text[0] == "-" else text
    if not body.startswith("0x") or len(body) < 3 or any(c not in "0123456789abcdef" for c in body[2:]):
        raise ProtocolError("bad integer")
    return int(text, 16)


def _hex_float(text):
    if type(text) is not str:
        raise ProtocolError("bad float")
    try:
        return float.fromhex(text)
    except (ValueError, OverflowError):
        raise ProtocolError("bad float") from None


def decode(obj, depth=0):
    """The value encoded by :func:`encode`; anything else raises :class:`ProtocolError`. Every object it
    returns is a fresh instance of an exact built-in type."""
    if depth > MAX_DEPTH:
        raise ProtocolError("value nested too deeply")
    if type(obj) is not list or not obj or type(obj[0]) is not str:
        raise ProtocolError("malformed value")
    tag, n = obj[0], len(obj)
    if tag == "n" and n == 1:
        return None
    if tag == "b" and n == 2 and type(obj[1]) is bool:
        return True if obj[1] else False
    if tag == "i" and n == 2:
        return _hex_int(obj[1])
    if tag == "f" and n == 2:
        return _hex_float(obj[1])
    if tag == "c" and n == 3:
        return complex(_hex_float(obj[1]), _hex_float(obj[2]))
    if tag == "s" and n == 2 and type(obj[1]) is str:
        return str(obj[1])
    if tag == "y" and n == 2 and type(obj[1]) is str:
        try:
            return bytes.fromhex(obj[1])
        except ValueError:
            raise ProtocolError("bad bytes") from None
    if tag in ("l", "t", "S", "F") and n == 2 and type(obj[1]) is list:
        items = [decode(v, depth + 1) for v in obj[1]]
        try:
            return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](items)
        except TypeError:
            raise ProtocolError("unhashable set member") from None
    if tag == "d" and n == 2 and type(obj[1]) is list:
        out = {}
        for pair in obj[1]:
            if type(pair) is not list or len(pair) != 2:
                raise ProtocolError("malformed dict")
            key = decode(pair[0], depth + 1)
            try:
                out[key] = decode(pair[1], depth + 1)
            except TypeError:
                raise ProtocolError("unhashable dict key") from None
        return out
    raise ProtocolError("malformed value")


# ---------------------------------------------------------------- framing
def read_exact(fd, n):
    chunks, got = [], 0
    while got < n:
        data = os.read(fd, min(n - got, 1 << 20))
        if not data:
            return None
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def send(fd, message):
    data = json.dumps(message).encode("ascii")
    if len(data) > MAX_MESSAGE:
        raise ValueError("message too large")
    data = struct.pack(">Q", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def receive(fd):
    """The next message, or ``None`` at end of file. Raises :class:`ProtocolError` on a malformed one."""
    head = read_exact(fd, 8)
    if head is None:
        return None
    (size,) = struct.unpack(">Q", head)
    if size > MAX_MESSAGE:
        raise ProtocolError("message too large")
    body = read_exact(fd, size)
    if body is None:
        return None
    try:
        message = json.loads(body.decode("ascii"))
    except (ValueError, RecursionError):
        raise ProtocolError("message is not JSON") from None
    if type(message) is not list or not message or type(message[0]) is not str:
        raise ProtocolError("malformed message")
    return message


def describe(exc):
    name = type(exc).__name__
    try:
        text = str(exc)
    except BaseException:
        text = "?"
    return [name if type(name) is str else "?", text[:2000] if type(text) is str else "?"]


def describe_raised(exc):
    """``describe(exc)`` plus what the tests' side needs to raise the same built-in exception: the name
    of the first built-in ``Exception`` class among the exception's bases (``ValueError`` for a
    ``class E(ValueError)``), and its arguments as plain data (``None`` if they are not)."""
    base, args = None, None
    try:
        for cls in type(exc).__mro__:
            if cls.__module__ == "builtins" and issubclass(cls, Exception) and getattr(builtins, cls.__name__,
                                                                                       None) is cls:
                base = cls.__name__
                break
        args = encode(tuple(exc.args), loose=True)
        if len(json.dumps(args)) > 1 << 16:
            args = None
    except BaseException:
        args = None
    return describe(exc) + [base if type(base) is str else None, args]


# ---------------------------------------------------------------- the program's process (untrusted)
def read_frame(fd):
    """One length-prefixed JSON object from the specification descriptor."""
    head = read_exact(fd, 8)
    body = read_exact(fd, struct.unpack(">Q", head)[0]) if head else None
    if body is None:
        raise ProtocolError("truncated specification")
    return json.loads(body.decode("utf-8"))


def close_all_but(keep):
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def flush():
    """Flush the program's output before ``P`` may end the run (it kills ``C`` once it has a verdict)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


def report_exception():
    try:
        import traceback

        traceback.print_exc()
    except BaseException:
        pass
    flush()


def child(spec, req_r, res_w):
    """``C``: runs the program; answers ``["call", name, args, kwargs]`` requests; never returns."""
    code = 1
    try:
        devnull = os.open("/dev/null", os.O_RDONLY)
        os.dup2(devnull, 0)
        close_all_but({0, 1, 2, req_r, res_w})
        namespace = {"__name__": spec["run_name"], "__builtins__": builtins}
        try:
            exec(compile(spec["source"], "<program>", "exec"), namespace)
        except BaseException as exc:  # SystemExit included: the program did not get to the tests
            report_exception()
            send(res_w, ["raised"] + describe(exc))
            return
        flush()
        if spec["kind"] == "script":
            send(res_w, ["completed"])
            code = 0
            return
        send(res_w, ["ready"])
        while True:
            request = receive(req_r)
            if request is None:
                code = 0
                return
            _, name, args, kwargs = request
            args = decode(args)
            kwargs = decode(kwargs)
            try:
                result = namespace[name](*args, **kwargs)
            except BaseException as exc:
                reply = ["raised"] + describe_raised(exc)
            else:
                try:
                    reply = ["ok", encode(result, loose=True)]
                except BaseException as exc:  # the program's own conversions may raise anything
                    reply = ["unsendable", "{}: {}".format(*describe(exc))]
            flush()
            send(res_w, reply)
    finally:
        flush()
        os._exit(code)


# ---------------------------------------------------------------- the trusted process
def rebuilt_exception(message):
    """The exception to raise in the tests for ``["raised", name, text, base, args]`` from ``C``: the
    built-in ``Exception`` class ``base`` with the plain-data ``args`` (or the text), so that tests
    expecting one still work (``except ValueError`` catches a program's ``ValueError`` subclass);
    :class:`ProgramError` for anything else. Never an object of the program."""
    _, name, text, base, args = message
    cls = getattr(builtins, base, None) if type(base) is str else None
    if isinstance(cls, type) and issubclass(cls, Exception) and cls.__module__ == "builtins":
        try:
            values = decode(args) if args is not None else (text,)
            if type(values) is not tuple:
                raise ProtocolError("exception arguments are not a tuple")
            return cls(*values)
        except Exception:
            try:
                return cls(text)
            except Exception:
                pass
    return ProgramError(f"{name}: {text}")


class Remote:
    """Stands for a function of the program: each call is sent to ``C`` and answered with plain values."""

    def __init__(self, name, link):
        self.name, self.link = name, link
        self.__name__ = name

    def __call__(self, *args, **kwargs):
        return self.link.call(self.name, args, kwargs)


class Link:
    def __init__(self, pid, req_w, res_r):
        self.pid, self.req_w, self.res_r = pid, req_w, res_r

    def reply(self):
        message = receive(self.res_r)
        if message is None:
            raise ProgramError("the program's process ended")
        return message

    def call(self, name, args, kwargs):
        send(self.req_w, ["call", name, encode(tuple(args)), encode(dict(kwargs))])
        message = self.reply()
        if message[0] == "ok" and len(message) == 2:
            return decode(message[1])
        if message[0] == "raised" and len(message) == 5 and type(message[1]) is str and type(message[2]) is str:
            raise rebuilt_exception(message)
        if message[0] == "unsendable" and len(message) == 2:
            raise ProgramError(f"the program returned a value that is not plain data: {message[1]}")
        raise ProtocolError("unexpected reply")


LIMITS = (resource.RLIMIT_CPU, resource.RLIMIT_AS, resource.RLIMIT_NPROC, resource.RLIMIT_FSIZE,
          resource.RLIMIT_NOFILE, resource.RLIMIT_CORE)


def set_limits(limits):
    cpu = int(limits["cpu_seconds"])
    # The hard CPU limit is one second above the soft one, so the soft limit ends a process with SIGXCPU.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    for which, key in ((resource.RLIMIT_AS, "memory_bytes"), (resource.RLIMIT_NPROC, "max_processes"),
                       (resource.RLIMIT_FSIZE, "max_disk_bytes"), (resource.RLIMIT_NOFILE, "max_open_files")):
        resource.setrlimit(which, (int(limits[key]), int(limits[key])))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def make_undumpable():
    """No other process of this user may ptrace this one or open its ``/proc/<pid>/{mem,fd,environ}``."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE = 4
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")
    if libc.prctl(3, 0, 0, 0, 0) != 0:  # PR_GET_DUMPABLE = 3
        raise OSError("the harness is still dumpable")


def watch(limits, paths, state):
    """Every 10 ms, end every other process of the sandbox (``kill(-1)`` from pid 1) once

    - more than ``max_files`` inodes (files, directories, links) exist on the tmpfs ``paths``: their
      size is capped by the mount, their number is not;
    - the resident memory of all the sandbox's processes together passes ``memory_bytes``: the
      address-space limit is per process, so without this a fork bomb of big processes could use
      ``max_processes`` times as much. Pages shared after a fork count once per process.

    Only inside a pid namespace, where ``/proc`` lists the sandbox's processes alone. The program
    may overshoot by what it makes in 10 ms."""
    import threading
    import time

    max_files, max_memory = int(limits["max_files"]), int(limits["memory_bytes"])
    page = os.sysconf("SC_PAGE_SIZE")

    own_limits = {which: resource.getrlimit(which) for which in LIMITS}

    def used_inodes():
        used = 0
        for path in paths:
            info = os.statvfs(path)  # an error here fails the run (below): never an unchecked limit
            used += info.f_files - info.f_ffree
        return used

    def resident_bytes():
        total = 0
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open("/proc/" + name + "/statm", "rb") as f:
                        total += int(f.read().split()[1]) * page
                except (FileNotFoundError, ProcessLookupError):
                    pass  # the process has just ended; any other error fails the run
        return total

    def run():
        try:
            while True:
                if any(resource.getrlimit(which) != value for which, value in own_limits.items()):
                    state["limit"] = ("failed", "the harness's own limits were changed")
                elif used_inodes() > max_files:
                    state["limit"] = ("file_limit", f"more than {max_files} files or directories")
                elif resident_bytes() > max_memory:
                    state["limit"] = ("memory_limit", f"the sandbox's processes used more than {max_memory} bytes")
                if state["limit"]:
                    break
                time.sleep(0.01)
        except BaseException as exc:
            # Fail closed: a watcher that cannot look any more must not leave the limits unenforced.
            state["limit"] = ("failed", "the limit watcher failed: {}: {}".format(*describe(exc)))
        try:
            os.kill(-1, signal.SIGKILL)  # from pid 1: every process of the namespace but this one
        except OSError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def status_of(pid):
    """How ``C`` ended: its exit code, or minus the signal number; ``None`` if it is still running."""
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    if got == 0:
        return None
    return os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else (
        -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


def ended_status(pid):
    """``C`` has closed its pipe: wait for it and name how it ended."""
    import time

    code = None
    for _ in range(200):
        code = status_of(pid)
        if code is not None:
            break
        time.sleep(0.01)
    if code == -signal.SIGXCPU:
        return "cpu_limit", code
    return "failed", code


def main():
    verdict_fd, spec_fd = int(sys.argv[1]), int(sys.argv[2])
    # Imports after the fork (those of the tests) must come from the read-only installation only, never
    # from the working directory or /tmp, where the program can write (``-I`` already leaves them out).
    sys.path[:] = [p for p in sys.path if os.path.isabs(p) and not p.startswith(("/sandbox", "/tmp"))]
    # As pid 1 of its namespace, a signal with the default action is ignored when it comes from
    # inside: the program's process cannot interrupt or kill this one.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    make_undumpable()
    close_all_but({0, 1, 2, verdict_fd, spec_fd})
    # The specification comes in two frames: what the program's process needs, read before the fork,
    # and the tests, read after it, so that no copy of them is in the program's memory.
    spec = read_frame(spec_fd)
    set_limits(spec["limits"])
    verdict = {"status": "failed", "detail": "", "returncode": None}
    state = {"limit": None}
    watcher = None
    if spec.get("watch_paths"):
        # Started before the fork, so that a fork bomb cannot use up RLIMIT_NPROC first.
        watcher = watch(spec["limits"], spec["watch_paths"], state)
    req_r, req_w = os.pipe()
    res_r, res_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(verdict_fd)
        os.close(spec_fd)
        os.close(req_w)
        os.close(res_r)
        child(spec, req_r, res_w)
    os.close(req_r)
    os.close(res_w)
    check = None
    namespace = {"__name__": "__tests__", "__builtins__": builtins}
    if spec["kind"] == "tested":
        trusted = read_frame(spec_fd)
        try:
            exec(compile(trusted["prelude"], "<prelude>", "exec"), namespace)
            exec(compile(trusted["test"], "<test>", "exec"), namespace)
            check = namespace["check"]
        except BaseException as exc:
            verdict["detail"] = "the tests themselves failed to load: {}: {}".format(*describe(exc))
            check = None
    os.close(spec_fd)
    token = read_exact(0, TOKEN_BYTES)
    os.close(0)
    try:
        link = Link(pid, req_w, res_r)
        first = link.reply()
        if first[0] == "raised" and len(first) == 3:
            verdict["detail"] = f"the program raised {first[1]}: {first[2]}"
        elif spec["kind"] == "script":
            if first == ["completed"]:
                verdict["status"] = "completed"
            else:
                raise ProtocolError("unexpected message")
        elif first != ["ready"]:
            raise ProtocolError("unexpected message")
        elif check is not None:
            remote = Remote(trusted["entry_point"], link)
            namespace[trusted["entry_point"]] = remote
            check(remote)
            verdict["status"] = "passed"
    except ProgramError as exc:
        verdict["detail"] = str(exc)
        if str(exc) == "the program's process ended":
            verdict["status"], verdict["returncode"] = ended_status(pid)
    except BaseException as exc:
        verdict["detail"] = "{}: {}".format(*tuple(describe(exc)))
    if verdict["returncode"] is None:
        verdict["returncode"] = status_of(pid)
    if watcher is not None and not watcher.is_alive() and not state["limit"]:
        state["limit"] = ("failed", "the limit watcher stopped")
    if state["limit"]:
        verdict["status"], verdict["detail"] = state["limit"]
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
    verdict["token"] = token.decode("ascii") if token else ""
    data = json.dumps(verdict).encode("utf-8")
    while data:
        data = data[os.write(verdict_fd, data):]
    os.close(verdict_fd)
    os._exit(0)


if __name__ == "__main__":
    main()
