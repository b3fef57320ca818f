"""The study registry: reproductions of the papers' claims, run by ``reweighting reproduce``.

A study is a module in this package that defines ``STUDY = Study(...)``; it is found by name, so
adding a study never edits a central list. Its ``run`` function receives a :class:`StudyContext`
(quick mode, seeds, output folder, device, progress bars) and returns a :class:`StudyOutcome`
with the per-seed values of the metric for every method and ``holds`` computed from them.
Heavy imports belong inside ``run`` so that ``reweighting list`` stays fast.
"""

from __future__ import annotations

import importlib
import json
import math
import pkgutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

__all__ = ["Study", "StudyContext", "StudyOutcome", "register", "all_studies", "get_study", "run_study",
           "summarize", "RESULTS_FILE"]

RESULTS_FILE = "results.json"
T = TypeVar("T")


@dataclass
class StudyContext:
    """What a study's ``run`` gets: the mode, the seeds, where to write, where to compute."""

    quick: bool
    seeds: list[int]
    out_dir: Path
    device: torch.device
    show_progress: bool = True

    def progress(self, iterable: Iterable[T], desc: str, total: int | None = None, leave: bool = False) -> Iterable[T]:
        """A tqdm progress bar (silent when ``show_progress`` is off)."""
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=leave, disable=not self.show_progress, dynamic_ncols=True)


@dataclass
class StudyOutcome:
    """What a study's ``run`` returns.

    ``methods`` maps a method name to its metric, one value per seed (summarised into mean, std, n).
    ``holds`` must be computed from these numbers. ``summary`` is markdown for the report (say why
    the claim held or not), ``details`` any further tables (JSON-serialisable), ``plots`` the file
    names of figures written into ``out_dir``.
    """

    methods: dict[str, list[float]]
    holds: bool
    config: dict[str, Any]
    summary: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Study:
    """A registered reproduction: its claim, its metric, and the function that runs it."""

    name: str
    claim: str
    metric: str
    lower_is_better: bool
    run: Callable[[StudyContext], StudyOutcome]
    seeds: int = 3
    quick_seeds: int = 1
    description: str = ""


_REGISTRY: dict[str, Study] = {}
_DISCOVERED = False


def register(study: Study) -> Study:
    """Add a study to the registry (a study of the same name is replaced)."""
    _REGISTRY[study.name] = study
    return study


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        study = getattr(module, "STUDY", None)
        if isinstance(study, Study):
            register(study)


def all_studies() -> dict[str, Study]:
    """Every registered study by name, sorted."""
    _discover()
    return dict(sorted(_REGISTRY.items()))


def get_study(name: str) -> Study:
    """The study called ``name``; a clear error lists the known ones otherwise."""
    studies = all_studies()
    if name not in studies:
        known = ", ".join(studies) or "(none)"
        raise ValueError(f"unknown study {name!r}; known studies: {known}")
    return studies[name]


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """Mean, sample standard deviation (0 for one value) and count of per-seed values."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("no values to summarize")
    n = len(xs)
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else (1e308 if obj > 0 else -1e308)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def run_study(
    study: Study,
    *,
    quick: bool = False,
    num_seeds: int | None = None,
    out_dir: str | Path = "results",
    device: str | torch.device | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run one study and write ``out_dir/<study>/results.json`` (plus the study's plots).

    Returns the results dictionary (the fields DESIGN.md lists, and ``summary``, ``details``, ``plots``).
    """
    n = num_seeds if num_seeds is not None else (study.quick_seeds if quick else study.seeds)
    if n < 1:
        raise ValueError(f"the number of seeds must be >= 1, got {n}")
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = Path(out_dir) / study.name
    folder.mkdir(parents=True, exist_ok=True)
    context = StudyContext(quick=quick, seeds=list(range(n)), out_dir=folder, device=torch.device(device),
                           show_progress=show_progress)
    start = time.perf_counter()
    outcome = study.run(context)
    seconds = time.perf_counter() - start
    if not isinstance(outcome, StudyOutcome):
        raise TypeError(f"study {study.name!r} returned {type(outcome).__name__}, expected StudyOutcome")
    if not outcome.methods:
        raise ValueError(f"study {study.name!r} reported no methods")
    results = {
        "study": study.name,
        "claim": study.claim,
        "metric": study.metric,
        "lower_is_better": study.lower_is_better,
        "methods": {name: summarize(values) for name, values in outcome.methods.items()},
        "per_seed": {name: [float(v) for v in values] for name, values in outcome.methods.items()},
        "holds": bool(outcome.holds),
        "quick": quick,
        "seconds": seconds,
        "config": {"seeds": n, "device": str(device), **outcome.config},
        "summary": outcome.summary,
        "details": outcome.details,
        "plots": list(outcome.plots),
    }
    results = _jsonable(results)
    (folder / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    return results
