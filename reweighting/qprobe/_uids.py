"""A user id of its own for each concurrent sandboxed run, when the evaluator is root.

The kernel keeps several budgets per user id, not per process or per namespace: descriptors in
flight in unix sockets, inotify instances and watches, pipe buffer pages (``fs.pipe-user-pages-*``),
and more. Runs that shared one id would share those budgets (one run exhausting them makes a
neighbour's correct program fail) and could tell each other apart through them. So each run that
is alive at the same time as another gets a different id from the pool ``UID_BASE`` ..
``UID_BASE + UID_SLOTS - 1``.

A slot is claimed by binding a unix socket to the abstract name ``reweighting-sandbox-uid-<id>`` in
the evaluator's network namespace: the kernel makes the claim atomic across every process of that
namespace (several evaluators on one machine included), and releases it when the socket is closed
or its process dies, so no lock file exists and a crashed evaluator leaves no stale claim. The
sandboxes themselves have network namespaces of their own, where these names do not exist.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
from collections.abc import Iterator

from ._sandbox_types import SandboxUnavailable

# The first user and group id of sandboxed runs when the evaluator is root; override if in use.
# Checked when a run starts (see check_base), so that a bad value is a clear error, not an import failure.
UID_BASE: int | str = os.environ.get("REWEIGHTING_SANDBOX_UID_BASE", "61000")
UID_BASE = int(UID_BASE) if UID_BASE.strip().isdigit() else UID_BASE
UID_SLOTS = 4096  # the most runs alive at once on one machine (as root)


def check_base(base: int | str = None, slots: int = None) -> int:
    """``UID_BASE``, checked: the whole pool must lie in 1000 .. 2**31 - 2 (below 1000 are root and the
    system's accounts) and avoid 65534 ("nobody", which other services use)."""
    base = UID_BASE if base is None else base
    slots = UID_SLOTS if slots is None else slots
    if isinstance(base, bool) or not isinstance(base, int) or not 1000 <= base <= 2 ** 31 - 1 - slots or \
            base <= 65534 < base + slots:
        raise SandboxUnavailable(f"REWEIGHTING_SANDBOX_UID_BASE must be a user id from 1000 to 2**31 - 2 - "
                                 f"{slots} such that none of the {slots} ids from it is 65534 (pick a range that "
                                 f"no account uses), got {base!r}")
    return base


def _claim(uid: int) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(f"\0reweighting-sandbox-uid-{uid}")
    except OSError:
        sock.close()
        return None
    return sock


@contextlib.contextmanager
def lease() -> Iterator[int | None]:
    """A user id no other run holds, for as long as the ``with`` block lasts; ``None`` when the evaluator
    is not root (then every run has the caller's id, see ``docs/code-reward.md``)."""
    if os.geteuid() != 0:
        yield None
        return
    base = check_base()
    start = secrets.randbelow(UID_SLOTS)  # spread claims, so that ids are not reused back to back
    for i in range(UID_SLOTS):
        uid = base + (start + i) % UID_SLOTS
        sock = _claim(uid)
        if sock is not None:
            break
    else:
        raise SandboxUnavailable(f"all {UID_SLOTS} sandbox user ids from {base} are in use by runs on this machine")
    try:
        yield uid
    finally:
        sock.close()
