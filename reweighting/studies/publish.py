"""One source of truth for the published results: ``docs/results.json`` and the tables made from it.

``reweighting report --out DIR --publish`` condenses every ``DIR/<study>/results.json`` into
``docs/results.json`` (the verdicts, each part's margin, noise and minimum detectable effect, the
baseline checks, the protocols' fingerprints, the job's time) and rewrites the text between the
marker lines ``<!-- results:start -->`` and ``<!-- results:end -->`` of ``README.md`` and
``docs/studies/index.md`` with :func:`render_tables` of it. A test renders the committed summary and
compares it with both files, so neither can disagree with the results.

With ``--rerun DIR2`` (a second run of the same protocols, e.g. ``reproduce --perturb ulp``), each
study also records that run's verdicts (:func:`~reweighting.studies.agreement.compare_runs`), and the
tables say per study and per part whether the rerun agrees.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import RESULTS_FILE
from .agreement import compare_runs
from .report import load_result, load_results
from .stats import DECIDED

__all__ = ["SUMMARY_FILE", "START", "END", "PUBLISHED_FILES", "summarize_results", "render_tables", "replace_block",
           "publish"]

SUMMARY_FILE = Path("docs") / "results.json"
START, END = "<!-- results:start -->", "<!-- results:end -->"
# each published file and whether its table lists every part (the README keeps to one row a study)
PUBLISHED_FILES = {Path("README.md"): False, Path("docs") / "studies" / "index.md": True}


def _part(p: dict[str, Any]) -> dict[str, Any]:
    keep = ("name", "kind", "verdict", "margin", "noise", "mde", "expected", "tolerance", "n")
    return {k: p.get(k) for k in keep}


def _reruns(out_dir: str | Path, rerun_dir: str | Path | None) -> dict[str, dict[str, Any]]:
    """Per study found in both runs: the rerun's perturbation, its study verdict and its part verdicts."""
    if rerun_dir is None:
        return {}
    agreement = compare_runs(out_dir, rerun_dir)
    found: dict[str, dict[str, Any]] = {}
    for row in agreement.rows:
        if not row.part:
            perturbation = str(load_result(Path(rerun_dir) / row.study).get("perturbation") or "none")
            found[row.study] = {"perturbation": perturbation, "verdict": row.verdict_b, "parts": {}}
        else:
            found[row.study]["parts"][row.part] = row.verdict_b
    return found


def summarize_results(out_dir: str | Path, rerun_dir: str | Path | None = None) -> dict[str, Any]:
    """The published summary of the results under ``out_dir`` (one entry per study, sorted by name), with
    the verdicts of a second run of the same protocols under ``rerun_dir`` where given."""
    reruns = _reruns(out_dir, rerun_dir)
    out = Path(out_dir)
    studies = []
    for r in load_results(out):  # verdicts decided by the current rules
        baseline = r.get("baseline") or {}
        studies.append({
            "study": r["study"], "claim": r["claim"], "metric": r["metric"], "verdict": r["verdict"],
            "quick": r["quick"], "seeds": r["config"].get("seeds"),
            "selection_seeds": (r.get("protocol") or {}).get("selection_seeds"),
            "fingerprint": r.get("fingerprint"), "perturbation": r.get("perturbation"),
            "baseline": {k: baseline.get(k) for k in ("measure", "value", "bar", "higher_is_better", "healthy")}
            if baseline else None,
            "parts": [_part(p) for p in r.get("parts", [])],
            "rerun": reruns.get(r["study"]),
            "seconds": round(float(r["seconds"]), 1), "cpu_seconds": round(float(r.get("cpu_seconds", 0.0)), 1),
        })
    if not studies:
        raise ValueError(f"no {RESULTS_FILE} under {out}/<study>/: run 'reweighting reproduce --out {out}' first")
    job_path = out / "job.json"
    job = json.loads(job_path.read_text()) if job_path.exists() else None
    return {"studies": studies, "job": job}


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _signed(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:+.{digits}f}"


def render_tables(summary: dict[str, Any], parts: bool = True) -> str:
    """The markdown between the markers: a verdict per study, then (``parts``) every part with its numbers."""
    studies = summary["studies"]
    modes = {"quick" if s["quick"] else "full" for s in studies}
    lines = [f"Generated from `docs/results.json` ({' and '.join(sorted(modes))} mode); do not edit by hand.", "",
             "| study | verdict | parts decided | baseline check | seeds (selection) | protocol | rerun agrees |",
             "|---|---|---|---|---|---|---|"]
    for s in studies:
        decided = sum(p["verdict"] in DECIDED for p in s["parts"])
        b = s["baseline"]
        base = "none" if not b else (f"{'passed' if b['healthy'] else 'FAILED'} ({_num(b['value'])} "
                                     f"{'>=' if b['higher_is_better'] else '<='} {_num(b['bar'])})")
        lines.append(f"| {s['study']} | **{s['verdict']}** | {decided} of {len(s['parts'])} | {base} | "
                     f"{s['seeds']} ({s['selection_seeds'] or 0}) | `{s['fingerprint'] or '-'}` | {_rerun_cell(s)} |")
    total = sum(len(s["parts"]) for s in studies)
    decided = sum(p["verdict"] in DECIDED for s in studies for p in s["parts"])
    if not parts:
        return "\n".join([*lines, "", f"{decided} of {total} parts decided; every part's margin, noise and "
                           "minimum detectable effect: [Studies](docs/studies/index.md#results)."])
    lines += ["", f"{decided} of {total} parts decided. Margin: mean paired difference over seeds, positive "
              "supports the claim; noise: half-width of its 95% interval; MDE: the effect 80% power would "
              "detect at this seed count (same units as the margin). Rerun: the part's verdict in a second "
              "run of the same protocol (its perturbation in the table above).", "",
              "| study | part | verdict | margin | noise | MDE | rerun |", "|---|---|---|---|---|---|---|"]
    for s in studies:
        rerun = (s.get("rerun") or {}).get("parts", {})
        for p in s["parts"]:
            lines.append(f"| {s['study']} | {p['name']} | {p['verdict']} | {_signed(p['margin'])} | "
                         f"{_num(p['noise'])} | {_num(p['mde'])} | {rerun.get(p['name'], 'not rerun')} |")
    job = summary.get("job")
    if job:
        lines += ["", f"The whole job: {len(job['studies'])} {'study' if len(job['studies']) == 1 else 'studies'}, "
                  f"{job['seconds'] / 60:.1f} min wall with at most {job['jobs']} "
                  f"{'core' if job['jobs'] == 1 else 'cores'} busy."]
    return "\n".join(lines)


def _rerun_cell(study: dict[str, Any]) -> str:
    """"yes (ulp)" when the rerun reached the same verdict on the study and on every part, else what differs."""
    rerun = study.get("rerun")
    if not rerun:
        return "not rerun"
    same = sum(rerun["parts"].get(p["name"]) == p["verdict"] for p in study["parts"])
    if rerun["verdict"] == study["verdict"] and same == len(study["parts"]):
        return f"yes ({rerun['perturbation']})"
    return f"**no** ({rerun['perturbation']}: {rerun['verdict']}, {same} of {len(study['parts'])} parts agree)"


def replace_block(text: str, block: str, where: str) -> str:
    """``text`` with the lines between the markers replaced by ``block`` (a clear error without them)."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"{where}: needs exactly one '{START}' line followed by one '{END}' line")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}\n{END}{tail}"


def publish(out_dir: str | Path, root: str | Path = ".", rerun_dir: str | Path | None = None) -> list[Path]:
    """Write ``root/docs/results.json`` from ``out_dir`` (and the rerun in ``rerun_dir``) and regenerate
    the tables in the published files that exist under ``root``; returns the paths written."""
    root = Path(root)
    summary = summarize_results(out_dir, rerun_dir)
    written = [root / SUMMARY_FILE]
    written[0].parent.mkdir(parents=True, exist_ok=True)
    written[0].write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    for name, with_parts in PUBLISHED_FILES.items():
        path = root / name
        if path.exists():
            path.write_text(replace_block(path.read_text(), render_tables(summary, with_parts), str(path)))
            written.append(path)
    return written
