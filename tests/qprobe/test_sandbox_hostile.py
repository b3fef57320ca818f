"""Hostile programs, run only through the sandbox under test (``code_reward`` on HumanEval-shaped
problems). Each must score 0 and leave nothing behind: no file written outside its sandbox, no
connection received, no evaluator file touched, no secret in its output, no process left.

Several programs are written to score 1 exactly when their attack works (they return the right
sum only if they read the secret, reached the server, ...), so a hole in the sandbox shows up as
a 1 even when no other check would see it.
"""

import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from reweighting.qprobe import _bwrap, _uids, sandbox
from reweighting.qprobe.sandbox import (
    SandboxLimits,
    code_reward,
    humaneval_program,
    isolation_available,
    run_programs,
)

pytestmark = pytest.mark.skipif(not isolation_available()[0], reason=isolation_available()[1])

TIGHT = SandboxLimits(wall_seconds=5.0, cpu_seconds=2, memory_bytes=256 << 20, max_processes=8,
                      max_output_bytes=1 << 16, max_disk_bytes=4 << 20, max_files=2000)
ADD = {"prompt": 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n',
       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
               "    assert candidate(10**30, 1) == 10**30 + 1\n",
       "entry_point": "add"}
WRONG = "    return a - b\n"  # a wrong body: programs that attack at load time would score 0 anyway if contained
RIGHT = "    return a + b\n"


class LoopbackServer:
    """A TCP and a UDP server on 127.0.0.1 that record whatever reaches them."""

    def __init__(self):
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.tcp.settimeout(0.2)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.settimeout(0.2)
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.abstract = f"\0reweighting-test-{uuid.uuid4().hex}"
        self.unix.bind(self.abstract)
        self.unix.listen()
        self.unix.settimeout(0.2)
        self.port, self.udp_port = self.tcp.getsockname()[1], self.udp.getsockname()[1]
        self.received: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            for sock in (self.tcp, self.udp, self.unix):
                try:
                    if sock is not self.udp:
                        conn, addr = sock.accept()
                        self.received.append(("stream", addr))
                        conn.close()
                    else:
                        self.received.append(("udp", sock.recvfrom(4096)))
                except (TimeoutError, OSError):
                    pass

    def close(self):
        self._stop.set()
        self._thread.join()
        for sock in (self.tcp, self.udp, self.unix):
            sock.close()


def _sandbox_uid_processes() -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if _uids.UID_BASE <= entry.stat().st_uid < _uids.UID_BASE + _uids.UID_SLOTS:
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _hostile_programs(env: dict) -> dict[str, tuple[str, str]]:
    """name -> (completion of ``add``, why it must score 0)."""
    host_tmp, owned, keep, secret_file = (repr(str(env[k])) for k in ("host_tmp", "owned", "keep", "secret_file"))
    port, udp_port, sentinel = env["port"], env["udp_port"], env["sentinel"]
    env.setdefault("abstract", "\0x")
    return {
        # ---- early exits: the tests never ran, so nothing was passed
        "os._exit(0) before the tests": (WRONG + "import os\nos._exit(0)\n", "exit code 0 is not a verdict"),
        "sys.exit(0) before the tests": (WRONG + "import sys\nsys.exit(0)\n", "SystemExit is not a verdict"),
        "raise SystemExit(0)": (WRONG + "raise SystemExit(0)\n", "SystemExit is not a verdict"),
        "atexit handler exits 0": (WRONG + "import atexit, os\natexit.register(os._exit, 0)\n",
                                   "the harness never runs atexit handlers and the tests still fail"),
        "os._exit(0) during the tests": ("    import os\n    os._exit(0)\n",
                                         "the program's process ended before check() returned"),
        "SIGKILL itself before the tests": (WRONG + "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
                                            "a killed program has no verdict"),
        "exit 0 from a thread": (WRONG + "import os, threading\nthreading.Thread(target=os._exit, args=(0,)).start()\n",
                                 "a thread's exit is still an exit"),
        # ---- tampering with the harness: the tests run in another process the program cannot reach
        "monkeypatch AssertionError": (
            WRONG + "import builtins\nclass Never(Exception):\n    pass\nbuiltins.AssertionError = Never\n",
            "the tests' AssertionError lives in the harness process"),
        "monkeypatch builtins": (
            WRONG + "import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.len = lambda x: 0\n"
            "builtins.isinstance = lambda *a: True\nbuiltins.print = lambda *a, **k: None\n",
            "the harness's builtins are its own"),
        "define its own check()": (
            WRONG + "def check(candidate):\n    pass\nimport builtins\nbuiltins.check = check\n",
            "the harness takes check() from the problem's tests, not from the program"),
        "excepthook turns the failed test into exit 0": (
            WRONG + "import os, sys, threading\nsys.excepthook = lambda *a: os._exit(0)\n"
            "threading.excepthook = lambda *a: os._exit(0)\n",
            "a failed assertion in the harness is a failure whatever the program installs"),
        "replace sys.modules entries": (
            WRONG + "import sys, types\nfake = types.ModuleType('fake')\n"
            "for name in ('builtins', 'json', 'os', 'struct', '__main__'):\n    sys.modules[name] = fake\n",
            "the harness's modules are in its own process"),
        "patch the harness's functions through gc": (
            WRONG + "import gc\nfor o in gc.get_objects():\n"
            "    if callable(o) and getattr(o, '__name__', '') in ('encode', 'send', 'receive', 'check', 'main'):\n"
            "        try:\n            o.__code__ = (lambda *a, **k: None).__code__\n        except Exception:\n"
            "            pass\n",
            "patching the program's own copy of the harness cannot change the harness process"),
        # The needle is split in two so that the program's own source does not contain it.
        "read the tests from its own memory": (
            "    return a + b if SEEN else a - b\n"
            "import gc, sys\nSEEN = False\nf = sys._getframe()\n"
            "spaces = [o for o in gc.get_objects() if isinstance(o, dict)]\n"
            "while f is not None:\n    spaces += [f.f_locals, f.f_globals]\n    f = f.f_back\n"
            "for space in spaces:\n    for v in list(space.values()):\n"
            "        if isinstance(v, str) and ('candidate(2, 3) ' + '== 5') in v or callable(v) and "
            "getattr(v, '__name__', '') == 'check':\n            SEEN = True\n",
            "the tests are loaded by the harness only after the fork: scores 1 only if it finds them"),
        "AlwaysEqual result": (
            "    class AlwaysEqual:\n        def __eq__(self, other):\n            return True\n"
            "        __hash__ = object.__hash__\n    return AlwaysEqual()\n",
            "only plain values cross to the tests; an object with a forged __eq__ is a failure"),
        "int subclass with forged __eq__": (
            "    class E(int):\n        def __eq__(self, other):\n            return True\n    return E(0)\n",
            "subclasses of plain types are refused"),
        "list subclass with forged __eq__": (
            "    class L(list):\n        def __eq__(self, other):\n            return True\n    return L()\n",
            "subclasses of plain types are refused"),
        "forge the verdict on every descriptor and on stdout": (
            WRONG + "import os\n"
            "fake = b'{\"token\": \"\", \"status\": \"passed\", \"detail\": \"\", \"returncode\": 0}'\n"
            "for fd in range(0, 64):\n    try:\n        os.write(fd, fake)\n    except OSError:\n        pass\n"
            "print(fake.decode())\n",
            "the verdict descriptor is closed in the program's process and needs the run's token"),
        "send a malformed reply to the harness": (
            "    import os, struct\n    for fd in range(3, 32):\n        try:\n"
            "            os.write(fd, struct.pack('>Q', 2**40) + b'x')\n        except OSError:\n            pass\n"
            "    return a + b\n",
            "a malformed or oversized message is a protocol failure"),
        "steal the token from the harness": (
            "    import os, re\n    seen = b''\n"
            "    for path in ('/proc/1/environ', '/proc/1/cmdline', '/proc/1/mem', '/proc/1/fd/0', '/proc/1/fd/3',"
            " '/dev/stdin'):\n"
            "        try:\n            with open(path, 'rb') as f:\n                seen += f.read(1 << 16)\n"
            "        except OSError:\n            pass\n"
            "    return a + b if re.search(rb'[0-9a-f]{64}', seen) else a - b\n",
            "the token is read by the harness after the fork, which is undumpable: scores 1 only if stolen"),
        "ptrace the harness": (
            "    import ctypes, os\n    libc = ctypes.CDLL(None, use_errno=True)\n"
            "    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]\n"
            "    attached = libc.ptrace(0x4206, 1, None, None) == 0\n"  # PTRACE_SEIZE pid 1 (does not stop it)
            "    try:\n        attached = attached or bool(os.listdir('/proc/1/fd'))\n    except OSError:\n"
            "        pass\n"
            "    return a + b if attached else a - b\n",
            "the harness is undumpable: scores 1 only if the attach works"),
        "signal the harness": (
            "    import os, signal\n"
            "    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGSTOP, signal.SIGKILL, signal.SIGUSR1):\n"
            "        try:\n            os.kill(1, s)\n        except OSError:\n            pass\n    return a - b\n",
            "the harness is pid 1 of the sandbox: signals from inside are ignored, and the answer is wrong"),
        # ---- escaping the file system, network and process fences
        "disable the audit hook, then write outside": (
            WRONG + "import gc, os, sys\n"
            "for o in gc.get_objects():\n    if callable(o) and getattr(o, '__name__', '') == 'hook':\n"
            "        try:\n            o.__code__ = (lambda *a: None).__code__\n        except Exception:\n"
            "            pass\n"
            f"for p in ({host_tmp}, {owned}):\n    try:\n        os.makedirs(os.path.dirname(p), exist_ok=True)\n"
            "        open(p, 'w').write('pwned')\n    except OSError:\n        pass\n"
            f"fd = os.open('/', os.O_RDONLY)\ntry:\n"
            f"    os.close(os.open({host_tmp}.lstrip('/') + '.dirfd', os.O_CREAT | os.O_WRONLY, dir_fd=fd))\n"
            "except OSError:\n    pass\n",
            "its /tmp and file system are private: the host paths must not exist afterwards"),
        "poison the standard library and /etc": (
            WRONG + "import os, json\nfor p in (json.__file__, os.__file__, '/etc/passwd', '/usr/bin/python3'):\n"
            "    try:\n        open(p, 'a').write('pwned')\n    except OSError:\n        pass\n",
            "the system is mounted read-only"),
        "connect to a loopback server": (
            "    import socket\n    try:\n"
            f"        socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'pwned')\n"
            "    except OSError:\n        return a - b\n    return a + b\n",
            "no network namespace is shared: scores 1 only if it connects"),
        "connect to an abstract unix socket": (
            "    import socket\n    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n    try:\n"
            f"        s.connect({env['abstract']!r})\n    except OSError:\n        return a - b\n    return a + b\n",
            "abstract unix sockets belong to the network namespace: scores 1 only if it connects"),
        "send UDP to a loopback server": (
            "    import socket\n    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n    try:\n"
            f"        s.sendto(b'pwned', ('127.0.0.1', {udp_port}))\n"
            f"        s.sendmsg([b'pwned'], [], 0, ('127.0.0.1', {udp_port}))\n"
            "    except OSError:\n        pass\n    return a - b\n",
            "the datagram reaches only the sandbox's own loopback"),
        "reach the outside network": (
            "    import socket\n    try:\n        socket.create_connection(('1.1.1.1', 53), timeout=1)\n"
            "        return a + b\n    except OSError:\n        pass\n    try:\n"
            "        socket.getaddrinfo('example.com', 80)\n        return a + b\n    except OSError:\n"
            "        return a - b\n",
            "no interfaces but loopback: scores 1 only if it reaches out"),
        "start programs": (
            WRONG + f"import os, subprocess\nsubprocess.run(['sh', '-c', 'echo pwned > ' + {host_tmp} + '.sh'])\n"
            f"os.system('touch ' + {owned} + '.system')\n"
            f"os.posix_spawn('/bin/sh', ['sh', '-c', 'echo pwned > ' + {host_tmp} + '.spawn'], {{}})\n",
            "programs it starts are inside the same sandbox: the host paths must not exist afterwards"),
        "_posixsubprocess.fork_exec": (
            WRONG + "import os, _posixsubprocess\n"
            f"args = [b'/bin/sh', b'-c', ('echo pwned > ' + {host_tmp} + '.fe').encode()]\n"
            "r, w = os.pipe()\n"
            "head = [args, [args[0]], True, (w,), None, None, -1, -1, -1, -1, -1, -1, r, w, False, False]\n"
            "for tail in ([-1, None, None, None, -1, None, False], [None, None, None, -1, None, False]):\n"
            "    try:\n        os.waitpid(_posixsubprocess.fork_exec(*head, *tail), 0)\n        break\n"
            "    except TypeError:\n        pass\n",  # the signature differs between Python versions
            "the raw spawning primitive is no way out of the sandbox either"),
        "nested user namespace": (
            "    return a + b if NESTED else a - b\nimport ctypes\n"
            "NESTED = ctypes.CDLL(None).unshare(0x10000000) == 0\n",  # CLONE_NEWUSER: capabilities in a new one
            "--disable-userns: scores 1 only if it gets a user namespace with capabilities"),
        "plant symlinks where the old evaluator read and wrote": (
            WRONG + "import os\n"
            f"for name in ('.stdout', '.stderr', 'main.py', 'verdict'):\n    os.symlink({secret_file}, name)\n"
            f"for uid in range(61000, 61064):\n    os.symlink({keep}, f'/tmp/reweighting-sandbox-{{uid}}.lock')\n",
            "the evaluator reads only pipes and writes nothing in shared directories: keep.txt stays intact"),
        "kill the evaluator and every process": (
            WRONG + "import os, signal\n"
            f"for pid in (os.getppid(), 1, {sentinel}, {os.getpid()}):\n"
            "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
            "try:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass\n",
            "its pid namespace holds only its own processes: the evaluator and a sentinel of the same uid live"),
        "read the evaluator's environment": (
            "    import os\n    found = ''\n    for pid in os.listdir('/proc'):\n        try:\n"
            "            found += open(f'/proc/{pid}/environ').read()\n        except OSError:\n            pass\n"
            "    found += repr(dict(os.environ))\n    print(found)\n"
            f"    return a + b if {env['secret']!r} in found else a - b\n",
            "the evaluator is not in its pid namespace and its environment is cleared: scores 1 only if found"),
        "read a root-only file": (
            "    import os\n    text = ''\n"
            f"    for p in ({secret_file}, '/proc/1/root' + {secret_file}, '/etc/shadow'):\n"
            "        try:\n            text += open(p).read()\n        except OSError:\n            pass\n"
            f"    print(text)\n    return a + b if {env['root_secret']!r} in text else a - b\n",
            "the host's files are not mounted: scores 1 only if it reads the 0600 file"),
        # ---- exhausting resources
        "raise its own limits": (
            "    return a + b if BIG else a - b\nimport resource\n"
            "for which in (resource.RLIMIT_AS, resource.RLIMIT_NPROC, resource.RLIMIT_CPU, resource.RLIMIT_FSIZE):\n"
            "    try:\n        resource.setrlimit(which, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n"
            "    except (ValueError, OSError):\n        pass\n"
            "try:\n    BIG = len(bytearray(400 * 2**20)) > 0\nexcept MemoryError:\n    BIG = False\n",
            "hard limits cannot be raised without privileges: scores 1 only if 400 MB fit under 256 MB"),
        "fork bomb": (
            WRONG + "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
            "RLIMIT_NPROC in its own user namespace, then the wall clock"),
        "memory bomb": (WRONG + "x = []\nwhile True:\n    x.append(bytearray(50 * 2**20))\n",
                        "RLIMIT_AS: MemoryError before the tests"),
        "memory spread over many processes": (
            RIGHT + "import os, time\nr, w = os.pipe()\nfor _ in range(4):\n    if os.fork() == 0:\n"
            "        hog = bytearray(100 * 2**20)\n        os.write(w, b'x')\n        time.sleep(60)\n"
            "for _ in range(4):\n    os.read(r, 1)\n",  # 400 MB in all, 100 MB each
            "the sandbox's processes together pass memory_bytes: a correct answer that scores 1 only if not stopped"),
        "output bomb": (WRONG + "while True:\n    print('x' * 10000)\n", "output beyond max_output_bytes ends the run"),
        "disk bomb: one big file": (
            WRONG + "import os\nfor path in ('big', '/tmp/big', '/dev/shm/big', '/big'):\n    try:\n"
            "        with open(path, 'wb') as f:\n            while True:\n                f.write(b'x' * 2**16)\n"
            "    except OSError:\n        pass\n"
            "    print(path, os.path.getsize(path) if os.path.exists(path) else 0)\n",
            "each tmpfs is max_disk_bytes; the rest of the file system is read-only"),
        "disk bomb: many small files": (
            WRONG + "import os\ni = 0\nwhile True:\n    open(f'f{i}', 'w').close()\n    i += 1\n",
            "max_files ends it; the files vanish with the sandbox's tmpfs"),
        "infinite loop in the function": ("    while True:\n        pass\n", "RLIMIT_CPU"),
        # ---- the kernel interface beyond the namespaces (the seccomp filter)
        "AF_VSOCK socket": (
            "    return a + b if OPENED else a - b\nimport socket\nOPENED = []\n"
            "for family, kind in ((40, socket.SOCK_STREAM), (16, socket.SOCK_RAW)):\n"  # AF_VSOCK, AF_NETLINK
            "    try:\n        socket.socket(family, kind).close()\n        OPENED.append(family)\n"
            "    except OSError:\n        pass\nprint('opened', OPENED)\n",
            "vsock is not confined by the network namespace: scores 1 only if such a socket opens"),
        "System V shared memory, queues and semaphores": (
            "    return a + b if MADE else a - b\nimport ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "MADE = [name for name, ident in (('shm', libc.shmget(0, 1 << 20, 0o1600)),\n"
            "    ('msg', libc.msgget(0, 0o1600)), ('sem', libc.semget(0, 1, 0o1600))) if ident >= 0]\n"
            "print('made', MADE)\n",
            "SysV memory is in no process and outside every limit: scores 1 only if a segment is made"),
        "kernel attack surface: io_uring, userfaultfd, keys, memfd, ptys": (
            "    return a + b if OPENED else a - b\nimport ctypes, os, platform\n"
            "libc = ctypes.CDLL(None, use_errno=True)\nlibc.syscall.restype = ctypes.c_long\n"
            "nr = {'x86_64': {'uffd': 323, 'add_key': 248, 'perf': 298, 'bpf': 321},\n"
            "      'aarch64': {'uffd': 282, 'add_key': 217, 'perf': 241, 'bpf': 280}}.get(platform.machine(), {})\n"
            "params = ctypes.create_string_buffer(120)\nOPENED = []\n"
            "calls = [('io_uring', lambda: libc.syscall(425, 4, params))]\n"
            "if nr:\n    calls += [('userfaultfd', lambda: libc.syscall(nr['uffd'], 1)),\n"  # UFFD_USER_MODE_ONLY
            "              ('add_key', lambda: libc.syscall(nr['add_key'], b'user', b'k', b'v', 1, -2)),\n"
            "              ('bpf', lambda: libc.syscall(nr['bpf'], 0, params, 72))]\n"
            "for name, call in calls:\n    if call() >= 0:\n        OPENED.append(name)\n"
            "for name, opener in (('memfd', lambda: os.memfd_create('m')),\n"
            "                     ('ptmx', lambda: os.open('/dev/ptmx', os.O_RDWR))):\n"
            "    try:\n        opener()\n        OPENED.append(name)\n    except OSError:\n        pass\n"
            "print('opened', OPENED)\n",
            "these are denied by the seccomp filter or absent from /dev: scores 1 only if one works"),
        "lower the harness's limits to stop its watcher, then a file bomb": (
            RIGHT + "import resource, time\ntry:\n    resource.prlimit(1, resource.RLIMIT_NOFILE, (0, 0))\n"
            "except OSError as err:\n    print('prlimit refused', err, flush=True)\ntime.sleep(0.1)\n"
            "for i in range(3000):\n    open(f'/tmp/f{i}', 'w').close()\n",
            "no process may change the harness's limits, whose watcher fails closed: a correct answer that scores 1 "
            "only if the file limit is not enforced"),
        "sleep forever": ("    import time\n    time.sleep(10**6)\n", "the wall clock"),
    }


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    # A uid of this test process's own, so that sandboxes of other test processes running at the same
    # time (pytest -n) are not counted as leftovers of these runs.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_uids, "UID_BASE", 100_000 + 16 * (os.getpid() % 4096))
        patch.setattr(_uids, "UID_SLOTS", 16)
        yield from _hostile_run(tmp_path_factory)


def _hostile_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    token = uuid.uuid4().hex
    env = {"host_tmp": Path(tempfile.gettempdir()) / f"reweighting-escape-{token}", "owned": base / "owned.txt",
           "keep": base / "keep.txt", "secret_file": base / "root-secret.txt",
           "secret": f"ENV-SECRET-{token}", "root_secret": f"ROOT-SECRET-{token}"}
    env["keep"].write_text("keep")
    env["secret_file"].write_text(env["root_secret"])
    env["secret_file"].chmod(0o600)
    os.environ["REWEIGHTING_TEST_SECRET"] = env["secret"]
    server = LoopbackServer()
    env["port"], env["udp_port"], env["abstract"] = server.port, server.udp_port, server.abstract
    # A process of the sandbox's own uid outside any sandbox: kill(-1) from inside must not reach it.
    identity = ["setpriv", f"--reuid={_uids.UID_BASE}", f"--regid={_uids.UID_BASE}", "--clear-groups"] \
        if os.geteuid() == 0 and shutil.which("setpriv") else []
    sentinel = subprocess.Popen([*identity, "sleep", "300"])
    env["sentinel"] = sentinel.pid
    # What the previous evaluator left in the shared temporary directory: lock files and work directories.
    before_tmp = {p.name for p in Path(tempfile.gettempdir()).iterdir() if p.name.startswith("reweighting-sandbox")}
    programs = _hostile_programs(env)
    problems = [humaneval_program(ADD, completion) for completion, _ in programs.values()]
    start = time.perf_counter()
    try:
        results = run_programs(problems, TIGHT, workers=4)
        rewards = code_reward(problems[:3], TIGHT)  # the reward function itself on a few
        seconds = time.perf_counter() - start
        time.sleep(0.5)  # let late connections arrive
        sentinel_alive = sentinel.poll() is None
    finally:
        sentinel.kill()
        sentinel.wait()
        server.close()
        del os.environ["REWEIGHTING_TEST_SECRET"]
    after_tmp = {p.name for p in Path(tempfile.gettempdir()).iterdir() if p.name.startswith("reweighting-sandbox")}
    print(f"{len(programs)} hostile programs in {seconds:.1f} s")
    yield {"env": env, "results": dict(zip(programs, results)), "rewards": rewards, "received": server.received,
           "sentinel_alive": sentinel_alive, "new_tmp": after_tmp - before_tmp}
    shutil.rmtree(base, ignore_errors=True)


NAMES = list(_hostile_programs({k: "/x" for k in ("host_tmp", "owned", "keep", "secret_file", "secret",
                                                  "root_secret")} | {"port": 1, "udp_port": 1, "sentinel": 1}))


def test_there_are_at_least_25_hostile_programs():
    assert len(NAMES) >= 25


@pytest.mark.parametrize("name", NAMES)
def test_hostile_program_scores_zero(hostile_run, name):
    result = hostile_run["results"][name]
    assert not result.passed, (name, result)
    env = hostile_run["env"]
    for leaked in (env["secret"], env["root_secret"]):
        assert leaked not in result.stdout and leaked not in result.stderr and leaked not in result.detail


def test_reward_of_hostile_programs_is_zero(hostile_run):
    assert hostile_run["rewards"] == [0.0, 0.0, 0.0]


def test_limits_name_how_runs_ended(hostile_run):
    results = hostile_run["results"]
    assert results["infinite loop in the function"].status in ("cpu_limit", "timeout")
    assert results["sleep forever"].status == "timeout"
    assert results["disk bomb: many small files"].status == "file_limit"
    assert results["memory spread over many processes"].status == "memory_limit"
    assert results["lower the harness's limits to stop its watcher, then a file bomb"].status == "file_limit"
    assert "prlimit refused" in results["lower the harness's limits to stop its watcher, then a file bomb"].stdout
    assert results["output bomb"].status == "output_limit"
    assert len(results["output bomb"].stdout) <= TIGHT.max_output_bytes
    assert "MemoryError" in results["memory bomb"].detail
    assert results["os._exit(0) before the tests"].detail == "the program's process ended"
    assert "protocol" in results["send a malformed reply to the harness"].detail.lower() or \
        "message too large" in results["send a malformed reply to the harness"].detail
    assert "plain data" in results["AlwaysEqual result"].detail
    written = dict(line.split() for line in results["disk bomb: one big file"].stdout.splitlines())
    assert set(written) == {"big", "/tmp/big", "/dev/shm/big", "/big"}
    assert 0 < int(written["big"]) <= TIGHT.max_disk_bytes and 0 < int(written["/tmp/big"]) <= TIGHT.max_disk_bytes
    assert 0 < int(written["/dev/shm/big"]) <= TIGHT.max_disk_bytes and int(written["/big"]) == 0


def test_nothing_escaped(hostile_run):
    env = hostile_run["env"]
    host_tmp = str(env["host_tmp"])
    leftovers = [p for p in (host_tmp, host_tmp + ".sh", host_tmp + ".spawn", host_tmp + ".fe", host_tmp + ".dirfd",
                             str(env["owned"]), str(env["owned"]) + ".system") if os.path.lexists(p)]
    assert leftovers == []
    assert env["keep"].read_text() == "keep" and not env["keep"].is_symlink()
    assert stat.S_IMODE(env["secret_file"].stat().st_mode) == 0o600
    assert hostile_run["received"] == []
    assert hostile_run["sentinel_alive"]
    assert hostile_run["new_tmp"] == set()  # nothing created in the shared temporary directory


def test_no_process_remains_and_a_correct_program_still_scores_one(hostile_run):
    assert code_reward([humaneval_program(ADD, RIGHT)], TIGHT) == [1.0]
    if os.geteuid() != 0:
        pytest.skip("processes of the sandbox are identified by its dedicated uid only when running as root")
    deadline = time.monotonic() + 10
    while _sandbox_uid_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _sandbox_uid_processes() == []


_UNPRIVILEGED_SCRIPT = r'''
import json, os, sys
sys.path.insert(0, sys.argv[1])
from sandbox_copy import sandbox
prompt = 'def add(a, b):\n    """Return a + b."""\n'
test = "def check(candidate):\n    assert candidate(2, 3) == 5\n"
owned, port, secret = sys.argv[2], int(sys.argv[3]), os.environ["REWEIGHTING_TEST_SECRET"]
programs = {
    "exit": "    return 0\nimport os\nos._exit(0)\n",
    "kill parent": "    return 0\nimport os\nfor p in (os.getppid(), 1, %d):\n    try:\n        os.kill(p, 9)\n"
                   "    except OSError:\n        pass\ntry:\n    os.kill(-1, 9)\nexcept OSError:\n    pass\n"
                   % os.getpid(),
    "environ": "    import os\n    found = ''\n    for pid in os.listdir('/proc'):\n        try:\n"
               "            found += open(f'/proc/{pid}/environ').read()\n        except OSError:\n            pass\n"
               "    print(found)\n    return a + b if %r in found else a - b\n" % secret,
    "write outside": "    return 0\nopen(%r, 'w').write('pwned')\n" % owned,
    "connect": "    import socket\n    try:\n        socket.create_connection(('127.0.0.1', %d), timeout=1)\n"
               "    except OSError:\n        return 0\n    return a + b\n" % port,
    "fork bomb": "    return 0\nimport os\nwhile True:\n    try:\n        os.fork()\n"
                 "    except OSError:\n        pass\n",
    "correct": "    return a + b\n",
}
limits = sandbox.SandboxLimits(wall_seconds=5.0, cpu_seconds=2, memory_bytes=256 << 20, max_processes=8)
problem = {"prompt": prompt, "test": test, "entry_point": "add"}
results = sandbox.run_programs([sandbox.humaneval_program(problem, c) for c in programs.values()], limits)
print(json.dumps({name: [r.status, r.stdout + r.stderr + r.detail] for name, r in zip(programs, results)}))
'''


def test_hostile_programs_from_an_unprivileged_evaluator(tmp_path):
    """The same fences when the evaluator itself is an ordinary user (the test switches to uid 65534)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to another user; the rest of this file already runs unprivileged")
    python = shutil.which("python3", path="/usr/bin:/usr/local/bin")
    if shutil.which("setpriv") is None or python is None or not _bwrap._reachable_by_anyone(python):
        pytest.skip("needs setpriv and a python3 that an unprivileged user can run")
    shared = Path(tempfile.mkdtemp(prefix="reweighting-unpriv-test-"))
    try:
        shared.chmod(0o755)
        (shared / "sandbox_copy").mkdir(mode=0o755)
        (shared / "sandbox_copy" / "__init__.py").write_text("")
        for module in Path(sandbox.__file__).parent.glob("*.py"):
            if module.name != "__init__.py" and (module.name.startswith("_") or module.name == "sandbox.py"):
                shutil.copy(module, shared / "sandbox_copy" / module.name)
        (shared / "run.py").write_text(_UNPRIVILEGED_SCRIPT)
        writable = shared / "writable"
        writable.mkdir()
        os.chown(writable, 65534, 65534)
        owned = writable / "owned.txt"
        server = LoopbackServer()
        secret = f"ENV-SECRET-{uuid.uuid4().hex}"
        try:
            done = subprocess.run(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-I", str(shared / "run.py"),
                 str(shared), str(owned), str(server.port)],
                capture_output=True, text=True, timeout=120, cwd=shared,
                env={"PATH": "/usr/bin:/bin", "REWEIGHTING_TEST_SECRET": secret, "LANG": "C.UTF-8"})
            time.sleep(0.3)
        finally:
            server.close()
        if done.returncode != 0 and "SandboxUnavailable" in done.stderr:
            pytest.skip(f"bwrap does not start for an unprivileged user here: {done.stderr[-500:]}")
        # The evaluator survived (it was not killed) and reported every run.
        assert done.returncode == 0, done.stderr
        results = json.loads(done.stdout.strip().splitlines()[-1])
        assert results.pop("correct")[0] == "passed"
        for name, (status, text) in results.items():
            assert status != "passed", (name, status, text)
            assert secret not in text, name
        assert not owned.exists()
        assert server.received == []
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_the_evaluator_is_not_in_the_sandbox_process_tree():
    # bwrap is the evaluator's only child during a run, and it is gone when the run returns.
    before = {int(p) for p in os.listdir("/proc") if p.isdigit()}
    code_reward([humaneval_program(ADD, RIGHT)], TIGHT)
    time.sleep(0.2)
    children = []
    for p in {int(p) for p in os.listdir("/proc") if p.isdigit()} - before:
        try:
            stat_line = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        if int(stat_line.rsplit(")", 1)[1].split()[1]) == os.getpid():
            children.append(p)
    assert children == []
