"""The statistics the studies decide with: paired comparisons over seeds, their power, and robust selection.

A *part* of a claim compares a method with a baseline on per-seed values paired by position (the
same seed's runs share data and initialisation). With ``d_i`` the signed per-seed differences
(positive supports the claim), ``n`` seeds, ``s`` their sample standard deviation:

- ``margin = mean(d)``;
- ``noise = t(0.975, n-1) * s / sqrt(n)``, the half-width of the paired two-sided 95% interval;
- ``mde = (t(0.975, n-1) + t(0.80, n-1)) * s / sqrt(n)``, the minimum detectable effect: the true
  mean difference that a paired t-test at level 0.05 finds with 80% power at this ``n`` and ``s``.

``kind="better"`` holds when the whole interval is above zero (``margin > noise``), does not hold
when it is below (``margin < -noise``), and is inconclusive otherwise: a tie (``margin = noise = 0``)
is inconclusive. ``kind="not worse"`` is a non-inferiority test with a declared ``tolerance``
``delta``: it holds when ``margin - noise > -delta`` (the interval excludes a loss of ``delta``),
does not hold when ``margin + noise < -delta``, and is inconclusive in between; so a noisy part
cannot "hold" for want of evidence. A part given the effect it should have (``expected``: the
paper's, scaled to the study's setting, or ``delta`` for non-inferiority) whose ``mde`` exceeds it
and that is not decided is *underpowered*, not inconclusive: the study could not have seen it.

A "better" part that is neither held nor refused but whose interval lies wholly below its expected
effect (``margin + noise < expected``) is *smaller than claimed*: the data cannot say whether the
method is better at all, but they exclude (at the one-sided 2.5% level) a gain as large as the
paper's. That is a decision about the claim as the paper states it, and it is one whatever the power.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["HOLDS", "DOES_NOT_HOLD", "INCONCLUSIVE", "UNDERPOWERED", "SMALLER_THAN_CLAIMED", "DECIDED",
           "Baseline", "check_baseline", "ClaimPart", "compare", "decide", "summarize", "t_quantile", "Selection",
           "select_best"]

HOLDS, DOES_NOT_HOLD, INCONCLUSIVE, UNDERPOWERED = "holds", "does not hold", "inconclusive", "underpowered"
SMALLER_THAN_CLAIMED = "smaller than claimed"
# The part verdicts that settle their question (the others say the seeds could not).
DECIDED = (HOLDS, DOES_NOT_HOLD, SMALLER_THAN_CLAIMED)
K = TypeVar("K", bound=Hashable)

# Quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal's).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
_T80 = (1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879, 0.876, 0.873, 0.870, 0.868,
        0.866, 0.865, 0.863, 0.862, 0.861, 0.860, 0.859, 0.858, 0.858, 0.857, 0.856, 0.856, 0.855, 0.855,
        0.854, 0.854)
_NORMAL = {0.975: 1.960, 0.80: 0.8416}


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile at ``p`` (0.975 or 0.80) for ``df >= 1`` degrees of freedom."""
    table = {0.975: _T975, 0.80: _T80}.get(p)
    if table is None:
        raise ValueError(f"t_quantile: p must be 0.975 or 0.80, got {p!r}")
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"t_quantile: df must be an integer >= 1, got {df!r}")
    return table[df - 1] if df <= len(table) else _NORMAL[p]


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """Mean, sample standard deviation (0 for one value) and count of per-seed values."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("no values to summarize")
    n = len(xs)
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


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
    """One comparison of a claim, decided by its margin against its noise (see the module docstring).

    ``noise`` and ``mde`` are None with a single seed (no estimate): a "better" part is then decided
    by the sign alone (a tie is inconclusive) and a "not worse" part by ``margin > -tolerance``.
    """

    name: str
    margin: float
    noise: float | None
    n: int
    kind: str = "better"
    note: str = ""
    mde: float | None = None
    expected: float | None = None
    tolerance: float | None = None

    @property
    def underpowered(self) -> bool:
        """Whether the effect this part should have is below what its seeds could detect."""
        target = self.tolerance if self.kind == "not worse" else self.expected
        return target is not None and self.mde is not None and self.mde > target

    @property
    def verdict(self) -> str:
        if not math.isfinite(self.margin) or (self.noise is not None and not math.isfinite(self.noise)):
            return INCONCLUSIVE
        noise = 0.0 if self.noise is None else self.noise
        if self.kind == "not worse":
            delta = float(self.tolerance or 0.0)
            if self.margin + noise < -delta:
                return DOES_NOT_HOLD
            if self.margin - noise > -delta:
                return HOLDS
        else:
            if self.margin < -noise:
                return DOES_NOT_HOLD
            if self.margin > noise:
                return HOLDS
            if self.expected is not None and self.noise is not None and self.margin + noise < self.expected:
                return SMALLER_THAN_CLAIMED
        return UNDERPOWERED if self.underpowered else INCONCLUSIVE

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "margin": self.margin, "noise": self.noise, "n": self.n, "kind": self.kind,
                "verdict": self.verdict, "note": self.note, "mde": self.mde, "expected": self.expected,
                "tolerance": self.tolerance, "underpowered": self.underpowered}


def _check_finite_positive(name: str, label: str, value: float | None) -> None:
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"compare({name!r}): {label} must be a finite number > 0, got {value!r}")


def compare(name: str, a: Sequence[float], b: Sequence[float], *, lower_is_better: bool = False,
            kind: str = "better", note: str = "", expected: float | None = None,
            tolerance: float | None = None) -> ClaimPart:
    """The claim part "``a`` is better than ``b``" (or "not worse" within ``tolerance``) from per-seed
    values paired by position; ``expected`` is the effect the claim predicts (for the power label)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"compare({name!r}): needs paired per-seed values of equal, non-zero length, "
                         f"got {len(a)} and {len(b)}")
    if kind not in ("better", "not worse"):
        raise ValueError(f"compare({name!r}): kind must be 'better' or 'not worse', got {kind!r}")
    if kind == "not worse" and tolerance is None:
        raise ValueError(f"compare({name!r}): a 'not worse' part needs its tolerance (the loss it may "
                         "have and still count as not worse), declared in the study's protocol")
    _check_finite_positive(name, "tolerance", tolerance)
    _check_finite_positive(name, "expected", expected)
    sign = -1.0 if lower_is_better else 1.0
    diffs = [sign * (float(x) - float(y)) for x, y in zip(a, b)]
    stats = summarize(diffs)
    n = int(stats["n"])
    scale = float(stats["std"]) / math.sqrt(n)
    noise = t_quantile(0.975, n - 1) * scale if n > 1 else None
    mde = (t_quantile(0.975, n - 1) + t_quantile(0.80, n - 1)) * scale if n > 1 else None
    return ClaimPart(name=name, margin=float(stats["mean"]), noise=noise, n=n, kind=kind, note=note, mde=mde,
                     expected=expected, tolerance=tolerance)


def decide(parts: Sequence[ClaimPart], baseline: Baseline | None = None) -> str:
    """The verdict on a whole claim: inconclusive on an unhealthy baseline; else does not hold when
    any part does not, inconclusive when any part is undecided (inconclusive or underpowered), holds
    when all parts hold."""
    if baseline is not None and not baseline.healthy:
        return INCONCLUSIVE
    verdicts = [p.verdict for p in parts]
    if not verdicts:
        return INCONCLUSIVE
    if DOES_NOT_HOLD in verdicts:
        return DOES_NOT_HOLD
    if INCONCLUSIVE in verdicts or UNDERPOWERED in verdicts:
        return INCONCLUSIVE
    if SMALLER_THAN_CLAIMED in verdicts:
        return SMALLER_THAN_CLAIMED
    return HOLDS


@dataclass(frozen=True)
class Selection:
    """A value chosen on selection seeds, with how stable that choice is.

    ``stability`` is the share of ``resamples`` bootstrap draws of the selection seeds (with
    replacement) whose mean score picks the same value: 1.0 means no resampling of those seeds
    changes the choice; near ``1 / len(candidates)`` means the choice is a coin toss. With one
    selection seed it is None: every resample is that seed, so a share of 1.0 would say nothing.
    """

    chosen: Any
    scores: dict[str, float]
    stability: float | None
    seeds: int
    resamples: int

    def as_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "mean_scores": self.scores, "stability": self.stability,
                "selection_seeds": self.seeds, "resamples": self.resamples}

    @classmethod
    def fixed(cls, value: Any) -> Selection:
        """A value declared in the protocol, not chosen: no scores, no selection seeds, no stability."""
        return cls(chosen=value, scores={}, stability=None, seeds=0, resamples=0)

    def describe_stability(self) -> str:
        """``"0.93"``, or why there is no figure (a fixed value, or one selection seed)."""
        if self.stability is not None:
            return f"{self.stability:.2f}"
        return "n/a (fixed, not chosen)" if self.seeds == 0 else "n/a (one selection seed)"


def _argbest(means: Mapping[K, float], order: Sequence[K], lower_is_better: bool) -> K:
    # ties go to the candidate listed first, so the choice never rests on dictionary order
    sign = 1.0 if lower_is_better else -1.0
    return min(order, key=lambda c: (sign * means[c], order.index(c)))


def select_best(scores: Mapping[K, Sequence[float]], *, lower_is_better: bool = True, prefer: K | None = None,
                tolerance: float = 0.0, resamples: int = 1000, seed: int = 0) -> Selection:
    """The candidate with the best mean score over selection seeds (``scores[c][i]``: candidate ``c``
    on selection seed ``i``; every candidate on the same seeds), and the bootstrap stability of it.

    With ``prefer`` (a declared default, e.g. the paper's value) that candidate is kept unless
    another's mean beats it by more than ``tolerance``: a near-tie then never moves the choice.
    """
    order = list(scores)
    if prefer is not None and prefer not in scores:
        raise ValueError(f"select_best: prefer={prefer!r} is not a candidate ({order})")
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"select_best: tolerance must be a finite number >= 0, got {tolerance!r}")
    if not order:
        raise ValueError("select_best: no candidates")
    lengths = {len(v) for v in scores.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"select_best: every candidate needs a score on each of the same selection seeds, "
                         f"got lengths {sorted(lengths)}")
    for c, values in scores.items():
        if not all(math.isfinite(float(v)) for v in values):
            raise ValueError(f"select_best: candidate {c!r} has a non-finite score {list(values)}")
    n = lengths.pop()
    def pick(means: Mapping[K, float]) -> K:
        best = _argbest(means, order, lower_is_better)
        if prefer is not None and abs(means[best] - means[prefer]) <= tolerance:
            return prefer
        return best

    means = {c: sum(map(float, v)) / n for c, v in scores.items()}
    chosen = pick(means)
    if n == 1:
        return Selection(chosen=chosen, scores={str(c): m for c, m in means.items()}, stability=None, seeds=1,
                         resamples=0)
    rng = random.Random(seed)
    same = 0
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        boot = {c: sum(float(scores[c][i]) for i in idx) / n for c in order}
        same += pick(boot) == chosen
    return Selection(chosen=chosen, scores={str(c): m for c, m in means.items()}, stability=same / resamples,
                     seeds=n, resamples=resamples)
