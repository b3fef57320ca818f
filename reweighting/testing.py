"""Run a function on several CPU processes with ``torch.distributed`` (gloo) initialised.

Used by the test suite to check that distributed results equal single-process ones, and handy for
users who want the same check for their own code. ``fn`` must be importable by name (a module-level
function) because the workers are started with the ``spawn`` method.
"""

from __future__ import annotations

import io
import os
import queue as queue_module
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["launch"]


def _worker(rank: int, world: int, init_file: str, fn: Callable, args: tuple, queue) -> None:
    # Exactly one message per rank, "ready" aside: an error after a result was sent (say in
    # destroy_process_group) must not arrive as a second message and be taken for another rank's.
    try:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        try:
            # A rank can leave init_process_group before its peers have finished connecting to it
            # (gloo's connectFullMesh); were it then to run fn, finish and exit at once (fn need not
            # communicate), a slower peer would fail in init with "Connection closed by peer".
            dist.barrier()
            queue.put((rank, "ready", None))
            result = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        # Serialise to bytes here: tensors put on a queue as they are travel as shared-memory
        # handles that die with this process, so a fast-exiting worker could lose its result.
        buffer = io.BytesIO()
        torch.save(result, buffer)
        message = (rank, "ok", buffer.getvalue())
    except BaseException:  # report any failure to the parent rather than hanging it
        message = (rank, "error", traceback.format_exc())
    queue.put(message)


def launch(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0,
           start_timeout: float = 600.0) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` processes; return results in rank order.

    Results must be serialisable by ``torch.save`` (tensors, numbers, lists and dicts of them).
    A failure on any rank raises ``RuntimeError`` with that rank's traceback, and a worker that
    dies without a word (killed, crashed) raises ``RuntimeError`` with its exit code at once.
    ``timeout`` bounds the run of ``fn`` (from the moment every rank has joined the process
    group); starting the processes (a fresh interpreter importing torch on each rank, slow on a
    loaded machine) is bounded separately by ``start_timeout``. Either exceeded: the workers are
    killed and ``TimeoutError`` is raised.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, init_file, fn, args, queue)) for r in range(world_size)
        ]
        for p in procs:
            p.start()
        ready: set[int] = set()
        results: dict[int, Any] = {}
        deadline = time.monotonic() + start_timeout
        try:
            while len(results) < world_size:
                try:
                    rank, status, value = queue.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
                except queue_module.Empty:
                    for r, p in enumerate(procs):
                        # A worker's last message may still be in the pipe after it has exited.
                        if r not in results and p.exitcode is not None and queue.empty():
                            raise RuntimeError(f"rank {r} exited with code {p.exitcode} without a result") from None
                    if time.monotonic() >= deadline:
                        what = (f"did not start within start_timeout={start_timeout} s" if len(ready) < world_size
                                else f"did not finish within timeout={timeout} s")
                        raise TimeoutError(f"distributed run {what}") from None
                    continue
                if status == "error":
                    raise RuntimeError(f"rank {rank} failed:\n{value}")
                if status == "ready":
                    ready.add(rank)
                    if len(ready) == world_size:
                        deadline = time.monotonic() + timeout
                    continue
                results[rank] = torch.load(io.BytesIO(value), weights_only=False)
        except BaseException:
            for p in procs:
                p.kill()
            raise
        finally:
            for p in procs:
                p.join(timeout=10)
    return [results[r] for r in range(world_size)]
