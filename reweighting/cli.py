"""The ``reweighting`` command line: ``list``, ``reproduce``, ``report`` (and ``qprobe`` when present)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from . import __version__
from .report import build_report
from .studies import RESULTS_FILE, all_studies, get_study, run_study

# Subcommands that live with their method; each module provides ``add_parser(subparsers)``.
_EXTRA_COMMANDS = ("reweighting.qprobe.cli",)


def _cmd_list(args: argparse.Namespace) -> int:
    studies = all_studies()
    if not studies:
        print("no studies are registered")
        return 0
    width = max(len(n) for n in studies)
    for name, study in studies.items():
        print(f"{name:<{width}}  {study.description or study.claim}")
    return 0


def _already_done(folder: Path, quick: bool, seeds: int | None) -> bool:
    path = folder / RESULTS_FILE
    if not path.exists():
        return False
    previous = json.loads(path.read_text())
    return previous.get("quick") == quick and (seeds is None or previous["config"].get("seeds") == seeds)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    try:
        studies = [get_study(n) for n in args.studies] if args.studies else list(all_studies().values())
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for study in studies:
        if args.skip_existing and _already_done(out / study.name, args.quick, args.seeds):
            print(f"[{study.name}] results exist, skipped (--skip-existing)")
            continue
        print(f"[{study.name}] {study.claim}")
        result = run_study(study, quick=args.quick, num_seeds=args.seeds, out_dir=out, device=args.device,
                           show_progress=not args.no_progress)
        print(f"[{study.name}] claim: {result['verdict']} ({result['seconds']:.0f} s wall, "
              f"{result['cpu_seconds']:.0f} s CPU)")
        if not result["holds"]:
            failed.append(study.name)
    report = build_report(out)
    print(f"report: {report}")
    if failed:
        print(f"claims that did not hold in this run: {', '.join(failed)} (see the report)")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    print(build_report(Path(args.out)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reweighting", description="Per-sample reweighting and resampling.")
    parser.add_argument("--version", action="version", version=f"reweighting {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list the studies, one line each")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("reproduce", help="run studies and write the report")
    p.add_argument("studies", nargs="*", metavar="STUDY", help="studies to run (default: all)")
    p.add_argument("--quick", action="store_true", help="short runs (what the tests use), not the full study")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the study's own)")
    p.add_argument("--out", default="results", help="output folder (default: results)")
    p.add_argument("--device", default="auto", help="auto (a GPU when present), cpu or cuda")
    p.add_argument("--skip-existing", action="store_true",
                   help="skip studies whose results.json exists for the same mode and seeds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_reproduce)

    p = sub.add_parser("report", help="rebuild report.md from the results in --out")
    p.add_argument("--out", default="results", help="folder holding <study>/results.json")
    p.set_defaults(func=_cmd_report)

    for module_name in _EXTRA_COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and module_name.startswith(err.name):
                continue  # that part of the package is not there
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
