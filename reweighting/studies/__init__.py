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

__all__ = ["Study", "StudyContext", "StudyOutcome", "Baseline", "ClaimPart", "check_baseline", "compare",
           "decide", "register", "all_studies", "get_study", "run_study", "summarize", "RESULTS_FILE",
           "HOLDS", "DOES_NOT_HOLD", "INCONCLUSIVE", "STUDIES_ENV", "discoverable"]

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

    def progress(self, iterable: Iterable[T], desc: str, total: int | None = None, leave: bool = False) -> Iterable[T]:
        """A tqdm progress bar (silent when ``show_progress`` is off)."""
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=leave, disable=not self.show_progress, dynamic_ncols=True)


HOLDS, DOES_NOT_HOLD, INCONCLUSIVE = "holds", "does not hold", "inconclusive"

# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal's 1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def _t975(df: int) -> float:
    return _T975[df - 1] if df <= len(_T975) else 1.96


@dataclass(frozen=True)
class Baseline:
    """Whether the base model learned the task: ``value`` of ``measure`` against the ``bar``.

    A comparison built on an unhealthy baseline says nothing about the method, so the study's
    verdict is then ``inconclusive`` whatever its parts show.
    """

    measure: str
    value: float
    bar: float
    higher_is_better: bool = True

    @property
    def healthy(self) -> bool:
        if not math.isfinite(self.value):
            return False
        return self.value >= self.bar if self.higher_is_better else self.value <= self.bar

    def describe(self) -> str:
        sign = ">=" if self.higher_is_better else "<="
        state = "healthy" if self.healthy else "UNHEALTHY"
        return f"{state}: {self.measure} = {self.value:.4g} (bar {sign} {self.bar:.4g})"


def check_baseline(measure: str, value: float, bar: float, higher_is_better: bool = True) -> Baseline:
    """A :class:`Baseline` record (``healthy`` follows from ``value`` and ``bar``)."""
    return Baseline(measure=measure, value=float(value), bar=float(bar), higher_is_better=higher_is_better)


@dataclass(frozen=True)
class ClaimPart:
    """One comparison of a claim, decided by its margin against its noise.

    ``margin`` is the mean over seeds of the paired differences, signed so that positive supports
    the claim; ``noise`` is the half-width of the paired two-sided 95% t-interval of that mean
    (``t(0.975, n-1) * sd / sqrt(n)``), None with a single seed (no estimate: decided by the sign).
    ``kind`` ``"better"``: holds when ``margin > noise``, does not hold when ``margin < -noise``,
    inconclusive in between. ``"not worse"``: holds unless ``margin < -noise``.
    """

    name: str
    margin: float
    noise: float | None
    n: int
    kind: str = "better"
    note: str = ""

    @property
    def verdict(self) -> str:
        noise = 0.0 if self.noise is None else self.noise
        if not math.isfinite(self.margin):
            return INCONCLUSIVE
        if self.margin < -noise or (self.noise is None and self.margin == 0 and self.kind == "better"):
            return DOES_NOT_HOLD
        if self.kind == "not worse" or self.margin > noise:
            return HOLDS
        return INCONCLUSIVE

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "margin": self.margin, "noise": self.noise, "n": self.n, "kind": self.kind,
                "verdict": self.verdict, "note": self.note}


def compare(name: str, a: Sequence[float], b: Sequence[float], *, lower_is_better: bool = False,
            kind: str = "better", note: str = "") -> ClaimPart:
    """The claim part "``a`` is better than ``b``" (or "not worse", ``kind``) from per-seed values
    paired by position (the same seed's runs share data and initialisation)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"compare({name!r}): needs paired per-seed values of equal, non-zero length, "
                         f"got {len(a)} and {len(b)}")
    if kind not in ("better", "not worse"):
        raise ValueError(f"compare({name!r}): kind must be 'better' or 'not worse', got {kind!r}")
    sign = -1.0 if lower_is_better else 1.0
    diffs = [sign * (float(x) - float(y)) for x, y in zip(a, b)]
    stats = summarize(diffs)
    n = int(stats["n"])
    noise = _t975(n - 1) * float(stats["std"]) / math.sqrt(n) if n > 1 else None
    return ClaimPart(name=name, margin=float(stats["mean"]), noise=noise, n=n, kind=kind, note=note)


def decide(parts: Sequence[ClaimPart], baseline: Baseline | None = None) -> str:
    """The verdict on a whole claim: inconclusive on an unhealthy baseline; else does not hold when
    any part does not, inconclusive when any part is, holds when all parts hold."""
    if baseline is not None and not baseline.healthy:
        return INCONCLUSIVE
    verdicts = [p.verdict for p in parts]
    if not verdicts:
        return INCONCLUSIVE
    if DOES_NOT_HOLD in verdicts:
        return DOES_NOT_HOLD
    if INCONCLUSIVE in verdicts:
        return INCONCLUSIVE
    return HOLDS


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
    _DISCOVERED = True
    modules = _import_study_modules()
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
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    with deterministic(study.threads):
        outcome = study.run(context)
    seconds, cpu_seconds = time.perf_counter() - start, _cpu_seconds() - cpu_start
    if not isinstance(outcome, StudyOutcome):
        raise TypeError(f"study {study.name!r} returned {type(outcome).__name__}, expected StudyOutcome")
    if not outcome.methods:
        raise ValueError(f"study {study.name!r} reported no methods")
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
        "config": {"seeds": n, "device": str(device), "threads": study.threads, **outcome.config},
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
