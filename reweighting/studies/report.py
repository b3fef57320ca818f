"""``report.md`` and plots from the ``results.json`` files of the studies that have run.

The report is rebuilt from whatever results are in the output folder, so re-running one study
and then the report does not redo the others.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import RESULTS_FILE
from .stats import HOLDS, Baseline, ClaimPart, decide

__all__ = ["JOB_FILE", "load_results", "load_result", "redecide", "build_report", "plot_methods", "new_figure",
           "save_figure"]

REPORT_FILE = "report.md"
# What the last `reproduce` ran, on how many cores, and its wall time (written by the command line).
JOB_FILE = "job.json"
METHODS_PLOT = "methods.png"


def load_results(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``<out_dir>/<study>/results.json``, sorted by study name, with its verdicts decided by
    the current rules (:func:`redecide`)."""
    return [load_result(path.parent) for path in sorted(Path(out_dir).glob(f"*/{RESULTS_FILE}"))]


def load_result(folder: str | Path) -> dict[str, Any]:
    """``folder/results.json`` (one study's), its verdicts decided by the current rules."""
    path = Path(folder) / RESULTS_FILE
    try:
        return redecide(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete it or re-run that study") from err


def redecide(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` (a ``results.json``) with each part's verdict and the study's decided again from the
    recorded numbers (margin, noise, MDE, expected effect, tolerance, baseline) by the rules of
    :mod:`.stats`. A verdict is a function of those numbers, so a run recorded under older rules reads
    the same as one run today; where a verdict changed, the recorded one is kept beside it
    (``verdict_recorded``)."""
    if not record.get("parts"):
        return record
    parts = []
    for stored in record["parts"]:
        missing = [k for k in ("name", "margin", "n") if k not in stored]
        if missing:
            raise ValueError(f"study {record.get('study')!r}: a recorded part lacks {missing}, so its verdict "
                             "cannot be decided again; re-run that study")
        part = ClaimPart(name=stored["name"], margin=stored["margin"], noise=stored.get("noise"), n=stored["n"],
                         kind=stored.get("kind", "better"), note=stored.get("note", ""), mde=stored.get("mde"),
                         expected=stored.get("expected"), tolerance=stored.get("tolerance"))
        new = part.as_dict()
        if new["verdict"] != stored.get("verdict"):
            new["verdict_recorded"] = stored.get("verdict")
        parts.append({**stored, **new})
    fields = record.get("baseline") or None
    baseline = Baseline(**{k: v for k, v in fields.items() if k != "healthy"}) if fields else None
    verdict = decide([ClaimPart(**{k: p[k] for k in ("name", "margin", "noise", "n", "kind", "mde", "expected",
                                                     "tolerance")}) for p in parts], baseline)
    out = {**record, "parts": parts, "verdict": verdict, "holds": verdict == HOLDS}
    if verdict != record.get("verdict"):
        out["verdict_recorded"] = record.get("verdict")
    return out


def new_figure(width: float = 6.0, height: float = 4.0):
    """A matplotlib figure and axes on the non-interactive backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def save_figure(fig, path: str | Path) -> str:
    """Save and close ``fig``; returns the file name."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path).name


def plot_methods(results: dict[str, Any], path: str | Path) -> str:
    """Bar chart of each method's mean metric with one standard deviation as error bars."""
    names = list(results["methods"])
    means = [results["methods"][n]["mean"] for n in names]
    stds = [results["methods"][n]["std"] for n in names]
    fig, ax = new_figure(max(4.0, 0.9 * len(names) + 2), 3.6)
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, color="#4C72B0")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    arrow = "lower is better" if results["lower_is_better"] else "higher is better"
    ax.set_ylabel(f"{results['metric']} ({arrow})")
    ax.set_title(f"{results['study']}: claim {_verdict(results)}")
    return save_figure(fig, path)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _verdict(r: dict[str, Any]) -> str:
    """The study's verdict; results written before verdicts existed carry only ``holds``."""
    return r.get("verdict") or ("holds" if r["holds"] else "does not hold")


def _baseline_cell(r: dict[str, Any]) -> str:
    b = r.get("baseline")
    if not b:
        return "not checked"
    sign = ">=" if b["higher_is_better"] else "<="
    return f"{'healthy' if b['healthy'] else 'UNHEALTHY'} ({_fmt(b['value'])}, bar {sign} {_fmt(b['bar'])})"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _parts_table(r: dict[str, Any]) -> list[str]:
    """One row per part of the claim: its verdict, margin (positive supports the claim), noise and MDE."""
    if not r.get("parts"):
        return []
    lines = ["| part of the claim | verdict | margin | noise (95% paired) | MDE (80% power) | expected | pairs |",
             "|---|---|---|---|---|---|---|"]
    for p in r["parts"]:
        target = p.get("tolerance") if p.get("kind") == "not worse" else p.get("expected")
        lines.append(f"| {p['name']} | {p['verdict']} | {p['margin']:+.3f} | {_num(p['noise'])} | "
                     f"{_num(p.get('mde'))} | {_num(target)} | {p['n']} |")
    return [*lines, ""]


def _protocol_lines(r: dict[str, Any]) -> list[str]:
    """The declared protocol: fingerprint, replicates, selection rules and deviations from the paper."""
    proto = r.get("protocol")
    if not proto:
        return []
    lines = [f"**Protocol** `{r.get('fingerprint')}` (declared before the run): {proto['seeds']} evidence seeds, "
             f"{proto['selection_seeds']} selection seeds (disjoint)."]
    if proto.get("replicates"):
        lines.append(f"- Replicates: {proto['replicates']}")
    lines += [f"- Selection: {rule}" for rule in proto.get("selection", [])]
    if proto.get("baseline"):
        lines.append(f"- Baseline check: {proto['baseline']}")
    lines += [f"- Deviation: {d['deviation']} (why: {d['reason']})" for d in proto.get("deviations", [])]
    lines += [f"- Note: {n}" for n in proto.get("notes", [])]
    return [*lines, ""]


def _redecided_lines(r: dict[str, Any]) -> list[str]:
    """A note where the current rules read the recorded numbers otherwise than the run did (the
    study's own summary below was written with the verdicts it recorded)."""
    changed = [p for p in r.get("parts", []) if "verdict_recorded" in p]
    if "verdict_recorded" not in r and not changed:
        return []
    parts = "; ".join(f"{p['name']}: {p['verdict_recorded']} -> {p['verdict']}" for p in changed)
    study = (f"the study {r['verdict_recorded']} -> {r['verdict']}" if "verdict_recorded" in r
             else "the study's verdict unchanged")
    return [f"**Decided again by the current rules** (the summary below keeps the run's own words): {study}"
            + (f"; {parts}" if parts else "") + ".", ""]


def _study_section(r: dict[str, Any]) -> str:
    arrow = "lower is better" if r["lower_is_better"] else "higher is better"
    lines = [
        f"## {r['study']}",
        "",
        f"**Claim:** {r['claim']}",
        "",
        f"**Verdict in this run:** {_verdict(r)}"
        f" ({'quick' if r['quick'] else 'full'} run, {r['config'].get('seeds', '?')} seed(s),"
        f" {r['seconds']:.0f} s wall, {r.get('cpu_seconds', float('nan')):.0f} s CPU on"
        f" {r['config'].get('device', '?')})",
        "",
        *_redecided_lines(r),
        f"**Baseline:** {_baseline_cell(r)}" + (f": {r['baseline']['measure']}" if r.get("baseline") else ""),
        "",
        *_parts_table(r),
        *_protocol_lines(r),
        *([f"**Perturbation:** {r['perturbation']} (floating-point rounding only)", ""] if r.get("perturbation")
          else []),
        *([f"**Left out:** {'; '.join(r['left_out'])}", ""] if r.get("left_out") else []),
        f"| method | {r['metric']} ({arrow}) | std | n |",
        "|---|---|---|---|",
    ]
    for name, m in r["methods"].items():
        lines.append(f"| {name} | {_fmt(m['mean'])} | {_fmt(m['std'])} | {m['n']} |")
    lines.append("")
    if r.get("summary"):
        lines += [r["summary"].strip(), ""]
    for plot in r.get("plots", []):
        lines += [f"![{plot}]({r['study']}/{plot})", ""]
    return "\n".join(lines)


def build_report(out_dir: str | Path, *, plots: bool = True) -> Path:
    """Write ``<out_dir>/report.md`` (and each study's ``methods.png``); returns the report's path."""
    out = Path(out_dir)
    results = load_results(out)
    if plots:
        for r in results:
            name = plot_methods(r, out / r["study"] / METHODS_PLOT)
            if name not in r.get("plots", []):
                r["plots"] = [name, *r.get("plots", [])]
    lines = ["# reweighting: reproduction report", ""]
    if not results:
        lines.append(f"No study results found under `{out}`: run `reweighting reproduce` first.")
    else:
        lines += ["Verdicts: a part *holds* when its paired 95% interval over seeds lies on the claim's side "
                  "(for a 'not worse' part: above minus its declared tolerance), *does not hold* when it lies on "
                  "the other side, is *smaller than claimed* when its interval includes zero but lies wholly below "
                  "the effect the paper reports (scaled to the setting), is *underpowered* when undecided and its "
                  "minimum detectable effect (MDE, 80% power) exceeds the effect it should have, and *inconclusive* "
                  "otherwise. A study holds when all its parts hold and its baseline check passes; it does not "
                  "hold when one does not; it is inconclusive when one is undecided; else a part smaller than "
                  "claimed makes it *smaller than claimed*.", "",
                  "| study | verdict | baseline | mode | seeds | wall s | CPU s |", "|---|---|---|---|---|---|---|"]
        for r in results:
            lines.append(
                f"| [{r['study']}](#{r['study']}) | {_verdict(r)} | {_baseline_cell(r)} | "
                f"{'quick' if r['quick'] else 'full'} | {r['config'].get('seeds', '?')} | {r['seconds']:.0f} | "
                f"{r.get('cpu_seconds', float('nan')):.0f} |"
            )
        lines.append("")
        job = out / JOB_FILE
        if job.exists():
            j = json.loads(job.read_text())
            count = len(j["studies"])
            lines += [f"The last `reweighting reproduce` here ran {count} {'study' if count == 1 else 'studies'} "
                      f"({'quick' if j['quick'] else 'full'} mode) with at most {j['jobs']} core(s) busy in "
                      f"{j['seconds']:.0f} s of wall time"
                      + (f"; these stopped with an error: {', '.join(j['failed'])}" if j.get("failed") else "")
                      + (f"; perturbation: {j['perturbation']}" if j.get("perturbation") else "")
                      + ".", ""]
        rows = [(r, p) for r in results for p in r.get("parts", [])]
        if rows:
            lines += ["| study | part of the claim | verdict | margin | noise | MDE | pairs |",
                      "|---|---|---|---|---|---|---|"]
            for r, p in rows:
                lines.append(f"| {r['study']} | {p['name']} | {p['verdict']} | {p['margin']:+.3f} | "
                             f"{_num(p['noise'])} | {_num(p.get('mde'))} | {p['n']} |")
            lines.append("")
        lines += [_study_section(r) for r in results]
    path = out / REPORT_FILE
    path.write_text("\n".join(lines) + "\n")
    return path
