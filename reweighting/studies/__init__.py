"""The study registry: reproductions of the papers' claims, run by ``reweighting reproduce``.

A study is a module in this package that defines ``STUDY = Study(...)``; it is found by name, so
adding a study never edits a central list. Its ``run`` function receives a :class:`StudyContext`
(quick mode, seeds, output folder, device, progress bars) and returns a :class:`StudyOutcome`
with the per-seed values of the metric for every method and ``holds`` computed from them.
Heavy imports belong inside ``run`` so that ``reweighting list`` stays fast.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import pkgutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from .protocol import PartSpec, Protocol, perturb_initial_weights, perturbation, selection_seeds
from .stats import (
    DOES_NOT_HOLD,
    HOLDS,
    INCONCLUSIVE,
    SMALLER_THAN_CLAIMED,
    UNDERPOWERED,
    Baseline,
    ClaimPart,
    Selection,
    check_baseline,
    compare,
    decide,
    select_best,
    summarize,
)

__all__ = ["Study", "StudyContext", "StudyOutcome", "Baseline", "ClaimPart", "check_baseline", "compare",
           "decide", "register", "all_studies", "get_study", "run_study", "summarize", "RESULTS_FILE",
           "HOLDS", "DOES_NOT_HOLD", "INCONCLUSIVE", "UNDERPOWERED", "SMALLER_THAN_CLAIMED", "STUDIES_ENV",
           "discoverable", "Protocol",
           "PartSpec", "Selection", "select_best", "selection_seeds", "perturb_initial_weights", "perturbation",
           "declared_compare"]

RESULTS_FILE = "results.json"
STUDIES_ENV = "REWEIGHTING_STUDIES"
T = TypeVar("T")


@dataclass
class StudyContext:
    """What a study's ``run`` gets: the mode, the seeds, where to write, where to compute."""

    quick: bool
    seeds: list[int]
    out_dir: Path
    device: torch.device
    show_progress: bool = True
    # Seeds for choosing hyper-parameters, disjoint from ``seeds`` (the evidence): see ``protocol``.
    selection_seeds: list[int] = field(default_factory=list)

    def progress(self, iterable: Iterable[T], desc: str, total: int | None = None, leave: bool = False) -> Iterable[T]:
        """A tqdm progress bar (silent when ``show_progress`` is off)."""
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=leave, disable=not self.show_progress, dynamic_ncols=True)


@dataclass
class StudyOutcome:
    """What a study's ``run`` returns.

    ``methods`` maps a method name to its metric, one value per seed (summarised into mean, std, n).
    ``holds`` must be computed from these numbers. ``parts`` are the claim's comparisons and
    ``baseline`` the base model's health check; when ``parts`` are given the verdict is
    :func:`decide` of them (and ``holds`` must agree with it being ``holds``). ``left_out`` names
    rows that could not be run here and why (a peer library that is not installed). ``summary`` is
    markdown for the report (say why the claim held or not), ``details`` any further tables
    (JSON-serialisable), ``plots`` the file names of figures written into ``out_dir``.
    """

    methods: dict[str, list[float]]
    holds: bool
    config: dict[str, Any]
    summary: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)
    parts: list[ClaimPart] = field(default_factory=list)
    baseline: Baseline | None = None
    left_out: list[str] = field(default_factory=list)


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
    # Intra-op threads while the study runs: fixed, because float reductions (and so every number
    # downstream) depend on the thread count; the same command then gives the same numbers whatever
    # ran before it in the process and however many cores the machine has.
    threads: int = 1
    # For ``reproduce --jobs``: the cores the study keeps busy (its worker pool or its threads), and
    # its rough cost in CPU-seconds for a full run on a 2-core machine; the costliest studies start
    # first. Neither changes a number the study computes.
    cores: int = 1
    cost: float = 0.0
    # The protocol, declared before the study runs: ``protocol(quick)`` (see ``studies.protocol``).
    protocol: Callable[[bool], Protocol] | None = None
    # A study too long for the default ``reproduce``: it runs when named or with ``--full``.
    full_only: bool = False

    def __post_init__(self) -> None:
        for name in ("threads", "cores", "seeds", "quick_seeds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Study {self.name!r}: {name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.cost, (int, float)) and math.isfinite(self.cost) and self.cost >= 0):
            raise ValueError(f"Study {self.name!r}: cost must be a finite number >= 0, got {self.cost!r}")


_REGISTRY: dict[str, Study] = {}
_DISCOVERED = False
# What discovery found, by name: the studies a fresh process (reproduce's children) finds the same.
_FROM_MODULES: dict[str, Study] = {}


def register(study: Study) -> Study:
    """Add a study to the registry (a study of the same name is replaced)."""
    _REGISTRY[study.name] = study
    return study


def discoverable(study: Study) -> bool:
    """Whether a fresh process finds this very study by name (it comes from a study module, and
    nothing replaced it since), so that it can run in a child process."""
    _discover()
    return _FROM_MODULES.get(study.name) is study


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    modules = _import_study_modules()  # a failure here is raised again on the next call, not hidden
    _DISCOVERED = True
    # a study module may register() several studies on import; each whose code lives in one of
    # these modules is found again by a fresh process
    _FROM_MODULES.update({n: s for n, s in _REGISTRY.items() if getattr(s.run, "__module__", None) in modules})


def _import_study_modules() -> set[str]:
    """Import the package's study modules and those named in REWEIGHTING_STUDIES; their names."""
    modules = set()
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        modules.add(module.__name__)
        study = getattr(module, "STUDY", None)
        if isinstance(study, Study):
            register(study)
    # Studies of one's own: modules named in REWEIGHTING_STUDIES (comma-separated), importable from
    # sys.path, each defining STUDY or calling register(). They reach reproduce's child processes too.
    for name in filter(None, (n.strip() for n in os.environ.get(STUDIES_ENV, "").split(","))):
        try:
            module = importlib.import_module(name)
        except Exception as err:  # any failure on import: one line naming the module, not a traceback
            raise ValueError(f"{STUDIES_ENV}: cannot import study module {name!r} "
                             f"({type(err).__name__}: {err})") from err
        modules.add(module.__name__)
        study = getattr(module, "STUDY", None)
        if isinstance(study, Study):
            register(study)
    return modules


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


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished child processes (a study's worker pool), user + system."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@contextlib.contextmanager
def deterministic(threads: int):
    """Fixed intra-op thread count, seeded global generators and deterministic torch kernels for the
    duration; the previous settings are restored afterwards."""
    import random

    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    torch.set_num_threads(threads)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's requirement for deterministic GEMMs
    # warn_only: an op without a deterministic kernel warns rather than failing a long run.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(0)
    random.seed(0)
    try:
        import numpy

        numpy.random.seed(0)
    except ImportError:  # numpy is a core dependency; tolerate its absence in stripped environments
        pass
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        if old_cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = old_cublas


def _check_declared(name: str, protocol: Protocol, parts: Sequence[ClaimPart]) -> None:
    """The outcome's parts must be the protocol's, with the declared kind, effect and tolerance."""
    got = [p.name for p in parts]
    declared = [p.name for p in protocol.parts]
    if got != declared:
        raise ValueError(f"study {name!r}: its parts {got} are not the ones its protocol declares {declared}")
    for part, spec in zip(parts, protocol.parts):
        if (part.kind, part.expected, part.tolerance) != (spec.kind, spec.expected, spec.tolerance):
            raise ValueError(f"study {name!r}: part {part.name!r} was decided as ({part.kind}, expected "
                             f"{part.expected}, tolerance {part.tolerance}) but declared as ({spec.kind}, "
                             f"expected {spec.expected}, tolerance {spec.tolerance})")


def declared_compare(protocol: Protocol, name: str, a: Sequence[float], b: Sequence[float], *,
                     lower_is_better: bool = False, note: str = "") -> ClaimPart:
    """:func:`compare` with the kind, expected effect and tolerance the protocol declares for ``name``."""
    spec = protocol.part(name)
    return compare(name, a, b, lower_is_better=lower_is_better, kind=spec.kind, note=note, expected=spec.expected,
                   tolerance=spec.tolerance)


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
    protocol = study.protocol(quick) if study.protocol is not None else None
    default_seeds = protocol.seeds if protocol is not None else (study.quick_seeds if quick else study.seeds)
    n = num_seeds if num_seeds is not None else default_seeds
    if n < 1:
        raise ValueError(f"the number of seeds must be >= 1, got {n}")
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    perturb = perturbation()
    folder = Path(out_dir) / study.name
    folder.mkdir(parents=True, exist_ok=True)
    seeds = protocol.evidence_seeds(n) if protocol is not None else list(range(n))
    context = StudyContext(quick=quick, seeds=seeds, out_dir=folder, device=torch.device(device),
                           show_progress=show_progress,
                           selection_seeds=selection_seeds(protocol.selection_seeds if protocol else 0))
    # another intra-op thread count changes only the order of float reductions
    threads = study.threads + 1 if perturb == "threads" else study.threads
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    with deterministic(threads):
        outcome = study.run(context)
    seconds, cpu_seconds = time.perf_counter() - start, _cpu_seconds() - cpu_start
    if not isinstance(outcome, StudyOutcome):
        raise TypeError(f"study {study.name!r} returned {type(outcome).__name__}, expected StudyOutcome")
    if not outcome.methods:
        raise ValueError(f"study {study.name!r} reported no methods")
    if protocol is not None:
        _check_declared(study.name, protocol, outcome.parts)
    if outcome.parts:
        verdict = decide(outcome.parts, outcome.baseline)
        if (verdict == HOLDS) != bool(outcome.holds):
            raise ValueError(f"study {study.name!r}: holds={outcome.holds} disagrees with its parts' verdict "
                             f"{verdict!r}")
    elif outcome.baseline is not None and not outcome.baseline.healthy:
        verdict = INCONCLUSIVE
    else:
        verdict = HOLDS if outcome.holds else DOES_NOT_HOLD
    baseline = outcome.baseline
    results = {
        "study": study.name,
        "claim": study.claim,
        "metric": study.metric,
        "lower_is_better": study.lower_is_better,
        "methods": {name: summarize(values) for name, values in outcome.methods.items()},
        "per_seed": {name: [float(v) for v in values] for name, values in outcome.methods.items()},
        "holds": verdict == HOLDS,
        "verdict": verdict,
        "parts": [p.as_dict() for p in outcome.parts],
        "baseline_healthy": None if baseline is None else baseline.healthy,
        "baseline": None if baseline is None else {**asdict(baseline), "healthy": baseline.healthy},
        "left_out": list(outcome.left_out),
        "quick": quick,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "config": {"seeds": n, "evidence_seeds": seeds, "device": str(device), "threads": threads, **outcome.config},
        "protocol": protocol.as_dict() if protocol is not None else None,
        "fingerprint": protocol.fingerprint() if protocol is not None else None,
        "perturbation": perturb,
        "summary": outcome.summary,
        "details": outcome.details,
        "plots": list(outcome.plots),
    }
    results = _jsonable(results)
    # written whole or not at all: a reader (the report, another process) never sees half a file
    partial = folder / (RESULTS_FILE + ".partial")
    partial.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(partial, folder / RESULTS_FILE)
    return results
