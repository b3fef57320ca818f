"""Do two runs of the studies reach the same verdicts?

A verdict is evidence only if another machine, or the same one with its floating-point rounding
changed (``reproduce --perturb``), reaches it too. :func:`compare_runs` pairs the studies of two
results folders and, for each study and each of its parts, says whether the verdicts agree. Runs of
different protocols (another fingerprint) are not comparable and are refused; a study found in one
run only is reported, never silently dropped. Margins are expected to move (a new rounding is a new
trajectory); only the verdicts are compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .report import load_results

__all__ = ["PartAgreement", "RunAgreement", "compare_runs", "format_agreement"]


@dataclass(frozen=True)
class PartAgreement:
    """One study's verdict (``part`` empty) or one part's, in run A and run B."""

    study: str
    part: str
    verdict_a: str
    verdict_b: str
    margin_a: float | None = None
    noise_a: float | None = None
    margin_b: float | None = None
    noise_b: float | None = None

    @property
    def agrees(self) -> bool:
        return self.verdict_a == self.verdict_b


@dataclass(frozen=True)
class RunAgreement:
    """Every compared row, the studies present in one run only, and each run's perturbation."""

    rows: tuple[PartAgreement, ...]
    only_in_a: tuple[str, ...]
    only_in_b: tuple[str, ...]
    perturbation_a: tuple[str, ...]
    perturbation_b: tuple[str, ...]

    @property
    def agrees(self) -> bool:
        """Every verdict agrees and both runs hold the same studies."""
        return all(r.agrees for r in self.rows) and not self.only_in_a and not self.only_in_b


def _by_study(folder: str | Path) -> dict[str, dict[str, Any]]:
    results = load_results(folder)
    if not results:
        raise ValueError(f"{folder} holds no results (no <study>/results.json in it)")
    return {r["study"]: r for r in results}


def compare_runs(run_a: str | Path, run_b: str | Path) -> RunAgreement:
    """Pair the studies of two results folders and compare their verdicts, study by study and part by
    part. Raises ``ValueError`` when a study ran under two protocols (fingerprints differ), in two modes
    (quick and full), or with parts of other names."""
    a, b = _by_study(run_a), _by_study(run_b)
    rows: list[PartAgreement] = []
    for name in sorted(set(a) & set(b)):
        ra, rb = a[name], b[name]
        if ra.get("fingerprint") != rb.get("fingerprint"):
            raise ValueError(f"study {name!r}: the runs used different protocols (fingerprint "
                             f"{ra.get('fingerprint')} in {run_a}, {rb.get('fingerprint')} in {run_b}); "
                             "only runs of one protocol can be compared")
        if bool(ra.get("quick")) != bool(rb.get("quick")):
            raise ValueError(f"study {name!r}: one run is --quick and the other is not")
        parts_a = {p["name"]: p for p in ra.get("parts", [])}
        parts_b = {p["name"]: p for p in rb.get("parts", [])}
        if list(parts_a) != list(parts_b):
            raise ValueError(f"study {name!r}: the runs decided other parts ({list(parts_a)} against {list(parts_b)})")
        rows.append(PartAgreement(name, "", ra["verdict"], rb["verdict"]))
        for part, pa in parts_a.items():
            pb = parts_b[part]
            rows.append(PartAgreement(name, part, pa["verdict"], pb["verdict"], pa.get("margin"), pa.get("noise"),
                                      pb.get("margin"), pb.get("noise")))
    return RunAgreement(
        rows=tuple(rows),
        only_in_a=tuple(sorted(set(a) - set(b))),
        only_in_b=tuple(sorted(set(b) - set(a))),
        perturbation_a=tuple(sorted({str(r.get("perturbation") or "none") for r in a.values()})),
        perturbation_b=tuple(sorted({str(r.get("perturbation") or "none") for r in b.values()})),
    )


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:+.4f}"


def format_agreement(agreement: RunAgreement, name_a: str = "A", name_b: str = "B") -> str:
    """A markdown table of every verdict in both runs (margin / noise beside each part's) and a summary."""
    lines = [f"Run {name_a}: perturbation {', '.join(agreement.perturbation_a)}; run {name_b}: perturbation "
             f"{', '.join(agreement.perturbation_b)}.", "",
             f"| study | part | {name_a} | margin / noise | {name_b} | margin / noise | agree |",
             "|---|---|---|---|---|---|---|"]
    for r in agreement.rows:
        spread_a = f"{_number(r.margin_a)} / {r.noise_a:.4f}" if r.noise_a is not None else ""
        spread_b = f"{_number(r.margin_b)} / {r.noise_b:.4f}" if r.noise_b is not None else ""
        label = r.part or "**study verdict**"
        lines.append(f"| {r.study} | {label} | {r.verdict_a} | {spread_a} | {r.verdict_b} | {spread_b} | "
                     f"{'yes' if r.agrees else '**NO**'} |")
    for name, only in ((name_a, agreement.only_in_a), (name_b, agreement.only_in_b)):
        if only:
            lines += ["", f"In run {name} only (not compared): {', '.join(only)}."]
    parts = [r for r in agreement.rows if r.part]
    studies = [r for r in agreement.rows if not r.part]
    lines += ["", f"{sum(r.agrees for r in studies)} of {len(studies)} study verdicts and "
                  f"{sum(r.agrees for r in parts)} of {len(parts)} part verdicts agree."]
    return "\n".join(lines)
