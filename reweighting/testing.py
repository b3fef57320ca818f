"""Run a function on several CPU processes with ``torch.distributed`` (gloo) initialised.

Used by the test suite to check that distributed results equal single-process ones, and handy for
users who want the same check for their own code. ``fn`` must be importable by name (a module-level
function) because the workers are started with the ``spawn`` method.
"""

from __future__ import annotations

import io
import os
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["launch"]


def _worker(rank: int, world: int, init_file: str, fn: Callable, args: tuple, queue) -> None:
    try:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        try:
            # Serialise to bytes here: tensors put on a queue as they are travel as shared-memory
            # handles that die with this process, so a fast-exiting worker could lose its result.
            buffer = io.BytesIO()
            torch.save(fn(rank, world, *args), buffer)
            queue.put((rank, "ok", buffer.getvalue()))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report any failure to the parent rather than hanging it
        queue.put((rank, "error", traceback.format_exc()))


def launch(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` processes; return results in rank order.

    Results must be serialisable by ``torch.save`` (tensors, numbers, lists and dicts of them).
    A failure on any rank raises ``RuntimeError`` with
    that rank's traceback; a run longer than ``timeout`` seconds is killed and raises ``TimeoutError``.
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
        results: dict[int, Any] = {}
        try:
            for _ in range(world_size):
                rank, status, value = queue.get(timeout=timeout)
                if status == "error":
                    raise RuntimeError(f"rank {rank} failed:\n{value}")
                results[rank] = torch.load(io.BytesIO(value), weights_only=False)
        except Exception as err:
            for p in procs:
                p.kill()
            if type(err).__name__ == "Empty":
                raise TimeoutError(f"distributed run did not finish within {timeout} s") from None
            raise
        finally:
            for p in procs:
                p.join(timeout=10)
    return [results[r] for r in range(world_size)]
