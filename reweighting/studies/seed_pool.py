"""Independent runs of a study (its seeds, its settings) in a pool of worker processes.

Each task is a pure function of its arguments (a run draws everything random from its own seed), so
its result does not depend on which worker ran it or on what ran before in that worker: every
worker runs with one intra-op thread and deterministic kernels, as ``run_study`` runs a study, and
inherits the environment (the ``--perturb`` setting included). With one worker, or one task, the
tasks run in this process.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

import torch

__all__ = ["pool_map", "pool_size"]

T = TypeVar("T")


def _init_worker() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)


def pool_size(tasks: int) -> int:
    """Workers for ``tasks`` independent tasks: at most the cores this study was given (see
    :func:`~reweighting.studies.parallel.available_cores`)."""
    from .parallel import available_cores

    return max(1, min(tasks, available_cores()))


def pool_map(fn: Callable[..., T], args: Sequence[tuple[Any, ...]], workers: int | None = None,
             progress: Callable[..., Iterable[Any]] | None = None, desc: str = "tasks") -> list[T]:
    """``[fn(*a) for a in args]``, in ``workers`` processes (default :func:`pool_size`), in order.

    ``fn`` must be a module-level function and its arguments and results picklable. ``progress``
    (e.g. ``StudyContext.progress``), called as ``progress(tasks, desc, total=len(args))``, wraps the
    tasks as they finish.
    """
    def show(items: Iterable[Any]) -> Iterable[Any]:
        return items if progress is None else progress(items, desc, total=len(args))

    workers = pool_size(len(args)) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    if workers == 1 or len(args) <= 1:
        return [fn(*a) for a in show(args)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker) as pool:
        futures = [pool.submit(fn, *a) for a in args]
        for _ in show(as_completed(futures)):  # results are read in order below
            pass
        return [f.result() for f in futures]


