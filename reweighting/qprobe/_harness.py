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
import collections
import json
import os
import resource
import signal
import struct
import sys
import time

# Bounds on one encoded call or result (both directions). The byte bound is a quarter of the run's
# ``memory_bytes`` (set by ``set_limits``; the decoded value and its JSON form must fit beside it in
# the address space), never below 32 MiB; the depth is Python's own default recursion limit, beyond
# which the tests could not compare the value in one process either.
MAX_MESSAGE = 1 << 25
MAX_DEPTH = 1000
MAX_ELEMENTS = 1 << 24  # values (containers and scalars) in one message
TOKEN_BYTES = 64  # hex characters of the run's token


class ProtocolError(Exception):
    """The program's process sent something that is not a well-formed message."""


class HarnessCpuLimit(BaseException):
    """This process (the tests, and the decoding of the program's answers) passed ``cpu_seconds``."""


def on_cpu_limit(signum, frame):
    raise HarnessCpuLimit()


class ProgramError(Exception):
    """The program raised an exception that is not a built-in ``Exception`` subclass, or ended."""


# ---------------------------------------------------------------- plain-value encoding (both sides)
# The standard library's containers and numbers beside the built-in types, each rebuilt as its own
# type so that the tests compare what they would compare in one process (``OrderedDict`` equality is
# order-sensitive, a ``defaultdict`` keeps its default, a ``Fraction`` is not a float).
DICT_VIEWS = (type({}.keys()), type({}.values()), type({}.items()))
FACTORIES = {cls.__name__: cls for cls in (list, dict, set, frozenset, tuple, int, float, complex, str, bytes,
                                           bool)}


def builtin_base(value):
    """``value`` as an instance of the exact type among those :func:`encode` knows that it derives from
    (``namedtuple`` -> ``tuple``, a ``Counter`` subclass -> ``Counter``, ``IntEnum`` -> ``int``, a ``str``
    or ``float`` subclass -> ``str``/``float``), read through that type's own methods so that the
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
    if isinstance(value, bytearray):
        return bytearray(memoryview(value))
    if isinstance(value, bytes):
        return bytes(memoryview(value))
    if isinstance(value, collections.Counter):
        return collections.Counter(dict(dict.items(value)))
    if isinstance(value, collections.OrderedDict):
        return collections.OrderedDict(list(collections.OrderedDict.items(value)))
    if isinstance(value, collections.defaultdict):
        out = collections.defaultdict(value.default_factory)
        out.update(dict.items(value))
        return out
    fractions, decimal = sys.modules.get("fractions"), sys.modules.get("decimal")
    if fractions is not None and isinstance(value, fractions.Fraction):
        return fractions.Fraction(int(value.numerator), int(value.denominator))
    if decimal is not None and isinstance(value, decimal.Decimal):
        return decimal.Decimal(decimal.Decimal.__str__(value))
    for base in (dict, list, tuple, frozenset, set, collections.deque):
        if isinstance(value, base):
            return base(value) if base is not collections.deque else collections.deque(value, value.maxlen)
    return value


def encode(value, depth=0, loose=False):
    """A JSON-able tagged form of ``value``; exact known types only (:data:`EXACT`): subclasses are
    refused, or with ``loose`` (the program's results) first turned into their known base by
    :func:`builtin_base`."""
    if depth > MAX_DEPTH:
        raise ValueError(f"value nested more than {MAX_DEPTH} deep")
    t = type(value)
    if loose and t not in EXACT and not _numbers(t):
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
    if t is bytearray:
        return ["Y", value.hex()]
    number = _numbers(t)
    if number == "Q":
        return ["Q", hex(value.numerator), hex(value.denominator)]
    if number == "D":
        return ["D", str(value)]
    if t is range:
        return ["r", hex(value.start), hex(value.stop), hex(value.step)]
    if t in SEQUENCES:
        return [SEQUENCES[t], [encode(v, depth + 1, loose) for v in value]]
    if t is collections.deque:
        return ["q", None if value.maxlen is None else hex(value.maxlen), [encode(v, depth + 1, loose) for v in value]]
    if t in MAPPINGS:
        pairs = [[encode(k, depth + 1, loose), encode(v, depth + 1, loose)] for k, v in value.items()]
        if t is collections.defaultdict:
            factory = value.default_factory
            # Only a built-in type can be rebuilt; any other factory (a lambda) travels as "?" and the
            # tests' copy has no default (equality, which ignores the factory, is unchanged).
            name = None if factory is None else (factory.__name__ if FACTORIES.get(
                getattr(factory, "__name__", None)) is factory else "?")
            return ["dd", name, pairs]
        return [MAPPINGS[t], pairs]
    if t is DICT_VIEWS[2]:
        return ["vi", [[encode(k, depth + 1, loose), encode(v, depth + 1, loose)] for k, v in value]]
    if t in DICT_VIEWS[:2]:
        return ["vk" if t is DICT_VIEWS[0] else "vv", [encode(v, depth + 1, loose) for v in value]]
    raise TypeError(f"a value of type {t.__name__} cannot be passed between the tests and the program")


SEQUENCES = {list: "l", tuple: "t", set: "S", frozenset: "F"}
MAPPINGS = {dict: "d", collections.OrderedDict: "od", collections.Counter: "C", collections.defaultdict: "dd"}
EXACT = (type(None), bool, int, float, complex, str, bytes, bytearray, range, list, tuple, set, frozenset, dict,
         collections.OrderedDict, collections.Counter, collections.defaultdict, collections.deque) + DICT_VIEWS


def _numbers(t):
    """``"Q"`` for ``fractions.Fraction``, ``"D"`` for ``decimal.Decimal``, else ``None``. Those modules are
    imported only where a value needs them (no value can be of a type whose module is not loaded), so
    that the harness starts without them."""
    fractions, decimal = sys.modules.get("fractions"), sys.modules.get("decimal")
    if fractions is not None and t is fractions.Fraction:
        return "Q"
    if decimal is not None and t is decimal.Decimal:
        return "D"
    return None


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


class Budget:
    """What one message may cost to decode: at most :data:`MAX_ELEMENTS` values and ``seconds`` of this
    process's CPU time, checked at every value, so that no input (such as a set of integers that all
    hash alike, whose building is quadratic) holds the harness longer than one value's insertion."""

    def __init__(self, seconds):
        self.elements, self.deadline = 0, time.process_time() + seconds

    def spend(self):
        self.elements += 1
        if self.elements > MAX_ELEMENTS:
            raise ProtocolError(f"a value has more than {MAX_ELEMENTS} elements")
        self.tick()

    def tick(self):
        if time.process_time() > self.deadline:
            raise ProtocolError("decoding a value took more than the run's cpu_seconds")


MAX_SHARED_HASH = 64  # members of one set (keys of one mapping) that may share a hash value


def _hashed(add, items, budget, key=lambda item: item):
    """Call ``add`` on each item (filling a set or a mapping), the budget checked at each. Members that
    share a hash value make each insertion compare with all of them; more than :data:`MAX_SHARED_HASH`
    are refused, which bounds the cost of building (and of copying) to that many probes per member."""
    shared = {}
    for item in items:
        budget.tick()
        try:
            h = hash(key(item))
        except TypeError:
            raise ProtocolError("unhashable set member or dict key") from None
        shared[h] = shared.get(h, 0) + 1
        if shared[h] > MAX_SHARED_HASH:
            raise ProtocolError(f"more than {MAX_SHARED_HASH} members of one set or keys of one dict share a "
                                f"hash value")
        add(item)


def decode(obj, depth=0, budget=None):
    """The value encoded by :func:`encode`; anything else raises :class:`ProtocolError`. Every object it
    returns is a fresh instance of an exact type of :data:`EXACT`."""
    budget = budget if budget is not None else Budget(DECODE_SECONDS)
    budget.spend()
    if depth > MAX_DEPTH:
        raise ProtocolError(f"value nested more than {MAX_DEPTH} deep")
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
    if tag in ("y", "Y") and n == 2 and type(obj[1]) is str:
        try:
            return (bytes if tag == "y" else bytearray).fromhex(obj[1])
        except ValueError:
            raise ProtocolError("bad bytes") from None
    if tag == "Q" and n == 3:
        import fractions

        numerator, denominator = _hex_int(obj[1]), _hex_int(obj[2])
        if denominator <= 0:
            raise ProtocolError("bad fraction")
        return fractions.Fraction(numerator, denominator)
    if tag == "D" and n == 2 and type(obj[1]) is str and len(obj[1]) < 1 << 20:
        import decimal

        try:
            return decimal.Decimal(obj[1])
        except decimal.InvalidOperation:
            raise ProtocolError("bad decimal") from None
    if tag == "r" and n == 4:
        try:
            return range(_hex_int(obj[1]), _hex_int(obj[2]), _hex_int(obj[3]))
        except ValueError:
            raise ProtocolError("bad range") from None
    if tag in ("l", "t", "S", "F", "vk", "vv", "q") and n == (3 if tag == "q" else 2) and type(obj[-1]) is list:
        items = [decode(v, depth + 1, budget) for v in obj[-1]]
        if tag in ("l", "t", "vv"):
            return tuple(items) if tag == "t" else (items if tag == "l" else dict(enumerate(items)).values())
        if tag == "q":
            return collections.deque(items, None if obj[1] is None else _hex_int(obj[1]))
        if tag == "vk":
            keys = {}
            _hashed(lambda key: keys.__setitem__(key, None), items, budget)
            return keys.keys()
        out = set()
        _hashed(out.add, items, budget)
        return frozenset(out) if tag == "F" else out
    if tag in ("d", "od", "C", "vi", "dd") and n == (3 if tag == "dd" else 2) and type(obj[-1]) is list:
        if tag == "dd":
            factory = obj[1]
            if not (factory is None or factory == "?" or factory in FACTORIES):
                raise ProtocolError("bad defaultdict factory")
            out = collections.defaultdict(FACTORIES.get(factory))
        else:
            out = {"d": dict, "od": collections.OrderedDict, "C": collections.Counter, "vi": dict}[tag]()
        pairs = []
        for pair in obj[-1]:
            if type(pair) is not list or len(pair) != 2:
                raise ProtocolError("malformed dict")
            pairs.append((decode(pair[0], depth + 1, budget), decode(pair[1], depth + 1, budget)))

        def put(pair):
            out[pair[0]] = pair[1]

        _hashed(put, pairs, budget, key=lambda pair: pair[0])
        return out.items() if tag == "vi" else out
    raise ProtocolError("malformed value")


DECODE_SECONDS = 5.0  # set from the run's cpu_seconds by set_limits


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
        signal.signal(signal.SIGXCPU, signal.SIG_DFL)  # the program's own CPU limit ends it
        devnull = os.open("/dev/null", os.O_RDONLY)
        os.dup2(devnull, 0)
        close_all_but({0, 1, 2, req_r, res_w})
        # The program runs as a module of its own, registered under its name, so that pickling its
        # functions by reference works (multiprocessing sends them to its workers that way).
        import types

        module = types.ModuleType(spec["run_name"])
        module.__builtins__ = builtins
        sys.modules[spec["run_name"]] = module
        namespace = module.__dict__
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


def set_limits(limits):
    """The run's resource limits on this process (inherited by the program's), and the message bounds
    that derive from them."""
    global MAX_MESSAGE, DECODE_SECONDS
    cpu = int(limits["cpu_seconds"])
    # The hard CPU limit is one second above the soft one, so the soft limit ends a process with SIGXCPU.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    for which, key in ((resource.RLIMIT_AS, "memory_bytes"), (resource.RLIMIT_NPROC, "max_processes"),
                       (resource.RLIMIT_FSIZE, "max_disk_bytes"), (resource.RLIMIT_NOFILE, "max_open_files")):
        resource.setrlimit(which, (int(limits[key]), int(limits[key])))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    MAX_MESSAGE = max(1 << 25, int(limits["memory_bytes"]) // 4)
    DECODE_SECONDS = float(cpu)


def make_undumpable():
    """No other process of this user may ptrace this one or open its ``/proc/<pid>/{mem,fd,environ}``."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE = 4
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")
    if libc.prctl(3, 0, 0, 0, 0) != 0:  # PR_GET_DUMPABLE = 3
        raise OSError("the harness is still dumpable")


def hand_over(sock_fd, paths):
    """Give the evaluator's limit watcher, outside the sandbox, what it polls: a descriptor of each of
    the run's writable file systems (``paths``) and of this sandbox's ``/proc``, and wait until it
    says it is watching. Done before the program's process exists, so the descriptors are the real
    mounts. Any failure ends the run before the program starts."""
    import _socket  # not ``socket``, whose imports would delay every run

    fds = [os.open(path, os.O_RDONLY | os.O_DIRECTORY) for path in list(paths) + ["/proc"]]
    sock = _socket.socket(fileno=sock_fd)
    try:
        sock.sendmsg([b"w"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
        if sock.recv(1) != b"w":
            raise ProtocolError("the limit watcher did not start")
    finally:
        sock.close()
    for fd in fds:
        os.close(fd)


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
    verdict_fd, spec_fd, watch_fd = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    # Values nested MAX_DEPTH deep take about three JSON levels each, and the tests compare them.
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 4 * MAX_DEPTH + 1000))
    # Imports after the fork (those of the tests) must come from the read-only installation only, never
    # from the working directory or /tmp, where the program can write (``-I`` already leaves them out).
    sys.path[:] = [p for p in sys.path if os.path.isabs(p) and not p.startswith(("/sandbox", "/tmp"))]
    # As pid 1 of its namespace, a signal with the default action is ignored when it comes from
    # inside: the program's process cannot interrupt or kill this one.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    make_undumpable()
    close_all_but({0, 1, 2, verdict_fd, spec_fd, watch_fd})
    # The specification comes in two frames: what the program's process needs, read before the fork,
    # and the tests, read after it, so that no copy of them is in the program's memory.
    spec = read_frame(spec_fd)
    set_limits(spec["limits"])
    verdict = {"status": "failed", "detail": "", "returncode": None}
    if watch_fd >= 0:
        hand_over(watch_fd, spec["watch_paths"])
    # Past its soft CPU limit this process gets SIGXCPU (pid 1 of a namespace only with a handler):
    # the tests stop there, and the verdict says so; the hard limit, one second on, kills it.
    signal.signal(signal.SIGXCPU, on_cpu_limit)
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
    except HarnessCpuLimit:
        verdict["status"] = "cpu_limit"
        verdict["detail"] = ("the tests' process (the tests, and the decoding of the program's answers) used "
                             "more than cpu_seconds")
    except ProgramError as exc:
        verdict["detail"] = str(exc)
        if str(exc) == "the program's process ended":
            verdict["status"], verdict["returncode"] = ended_status(pid)
    except BaseException as exc:
        verdict["detail"] = "{}: {}".format(*tuple(describe(exc)))
    if verdict["returncode"] is None:
        verdict["returncode"] = status_of(pid)
    # The kernel raises a process's soft CPU limit each time it passes it (SIGXCPU, which pid 1 of a
    # namespace does not receive): then this process, the tests and the decoding of the program's
    # answers, used more than cpu_seconds, and the run has passed its CPU limit.
    if resource.getrlimit(resource.RLIMIT_CPU)[0] != int(spec["limits"]["cpu_seconds"]):
        verdict["status"] = "cpu_limit"
        verdict["detail"] = ("the tests' process (the tests, and the decoding of the program's answers) used "
                             "more than cpu_seconds")
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
