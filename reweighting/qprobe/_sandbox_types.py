"""The values of the code-reward sandbox's interface: its limits, a tested program, how a run ended
(see :mod:`reweighting.qprobe.sandbox` and ``docs/code-reward.md``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


class SandboxUnavailable(RuntimeError):
    """The operating-system sandbox cannot be started on this machine."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one run (``docs/code-reward.md`` lists how each is enforced and by how much
    it can be passed). ``max_disk_bytes`` bounds each of the private working directory, ``/tmp`` and
    ``/dev/shm``, and any one file; ``max_files`` the inodes on the three together (files,
    directories, symbolic links; a hard link takes one too on tmpfs). ``max_processes`` counts every
    task of the sandbox, threads included, and the harness's two (its process and the program's
    first): the program may start ``max_processes - 2`` more processes or threads. Every field is an
    ``int`` (the kernel's units), but ``wall_seconds``, which may be any finite number."""

    wall_seconds: float = 10.0
    cpu_seconds: int = 5
    memory_bytes: int = 1 << 30
    max_processes: int = 32
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
        if self.max_processes < 3:
            raise ValueError(f"SandboxLimits.max_processes must be >= 3 (the harness's process, the program's "
                             f"and one more), got {self.max_processes!r}")
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
    #: What the limit watcher saw, from outside the sandbox, at its peak: ``files`` (inodes on the
    #: run's file systems), ``memory`` (resident bytes of its processes together), ``fds`` (their open
    #: descriptors together; -1 where the evaluator may not read them), ``polls``. Empty without it.
    peaks: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"
