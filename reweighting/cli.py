"""The ``reweighting`` command line: ``list``, ``reproduce``, ``report``, ``agree`` (and ``qprobe`` when present).

User errors (a bad option value, a missing or malformed file, a device that is not there) print one
line, ``reweighting: error: ...``, without a traceback and exit with status 2, as argparse does for
its own errors; arguments and files are checked before anything slow starts. Set
``REWEIGHTING_TRACEBACK=1`` to see the traceback of such an error.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import __version__

__all__ = ["UsageError", "HelpFormatter", "Parser", "build_parser", "main", "check_device", "positive_int",
           "nonnegative_int", "positive_float", "nonnegative_float", "probability", "run_command"]

# Subcommands that live with their method; each module provides ``add_parser(subparsers)``.
_EXTRA_COMMANDS = ("reweighting.qprobe.cli",)


class UsageError(Exception):
    """A user error on the command line: reported as one line without a traceback, exit status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default after its help, except for required options, flags and ``None``
    defaults (whose meaning the help text itself states)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or isinstance(action.default, bool) \
                or action.default is argparse.SUPPRESS or action.default == []:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are two lines: the error, and where to find the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(see '{self.prog} --help')\n")


def _number(kind: Callable[[str], float | int], test: Callable[[float], bool], expected: str):
    name = "integer" if kind is int else "number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an' if kind is int else 'a'} {name} {expected}, "
                                             f"got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"expected {'an' if kind is int else 'a'} {name} {expected}, "
                                             f"got {text}")
        return value

    parse.__name__ = f"{name} {expected}"
    return parse


positive_int = _number(int, lambda v: v >= 1, ">= 1")
nonnegative_int = _number(int, lambda v: v >= 0, ">= 0")
positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "> 0 (finite)")
nonnegative_float = _number(float, lambda v: math.isfinite(v) and v >= 0, ">= 0 (finite)")
probability = _number(float, lambda v: 0 < v <= 1, "in (0, 1]")


def check_device(device: str, option: str = "--device", *, allow_auto: bool = False) -> str:
    """A device torch knows and this machine has (``cuda`` needs CUDA); ``auto`` when allowed."""
    if allow_auto and device == "auto":
        return device
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"{option} {device!r} is not a device (expected cpu, cuda, cuda:N"
                         f"{', auto' if allow_auto else ''})") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{option} {device}: CUDA is not available on this machine (torch "
                             f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UsageError(f"{option} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UsageError(f"{option} {device}: MPS is not available on this machine")
    elif parsed.type != "cpu":
        raise UsageError(f"{option} {device!r}: expected cpu, cuda or cuda:N")
    return device


def run_command(args: argparse.Namespace, prog: str = "reweighting") -> int:
    """Run ``args.func(args)``; user errors become one line on stderr and exit status 2."""
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, OSError) as err:
        if os.environ.get("REWEIGHTING_TRACEBACK"):
            raise
        message = str(err) or type(err).__name__
        if isinstance(err, OSError) and err.filename and str(err.filename) not in message:
            message = f"{err.filename}: {message}"
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


def _cmd_list(args: argparse.Namespace) -> int:
    from .studies import all_studies

    studies = all_studies()
    if not studies:
        print("no studies are registered")
        return 0
    width = max(len(n) for n in studies)
    for name, study in studies.items():
        print(f"{name:<{width}}  {study.description or study.claim}")
    return 0


def _already_done(folder: Path, quick: bool, seeds: int | None) -> bool:
    from .studies import RESULTS_FILE

    path = folder / RESULTS_FILE
    if not path.exists():
        return False
    try:
        previous = json.loads(path.read_text())
    except ValueError as err:
        raise UsageError(f"--skip-existing: {path} is not valid JSON ({err}); delete it or re-run without "
                         "--skip-existing") from None
    return previous.get("quick") == quick and (seeds is None or (previous.get("config") or {}).get("seeds") == seeds)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from .studies.protocol import PERTURB_ENV

    # the children of --jobs inherit the perturbation with the environment
    with _environment(PERTURB_ENV, args.perturb):
        return _reproduce(args)


def _reproduce(args: argparse.Namespace) -> int:
    from .studies import all_studies, discoverable, get_study, run_study
    from .studies.parallel import CHILD_ENV, CORES_ENV, run_parallel
    from .studies.report import JOB_FILE, build_report

    names = list(dict.fromkeys(args.studies))  # a name given twice runs once
    if names:
        studies = [get_study(n) for n in names]
    else:  # the long studies run only when asked for: by name, or with --full
        everything = list(all_studies().values())
        studies = [s for s in everything if args.full or args.quick or not s.full_only]
        left = [s for s in everything if s not in studies]
        if left:
            print(f"left out of the default run (add --full, or name them): {', '.join(s.name for s in left)} "
                  f"(about {sum(s.cost for s in left) / 60:.0f} more CPU-minutes)")
    check_device(args.device, allow_auto=True)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {out}: cannot create the folder ({err.strerror or err})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: the folder is not writable")
    todo = []
    for study in studies:
        if args.skip_existing and _already_done(out / study.name, args.quick, args.seeds):
            print(f"[{study.name}] results exist, skipped (--skip-existing)")
        else:
            todo.append(study)
    jobs = args.jobs if args.jobs is not None else _default_jobs(args.device)
    child = bool(os.environ.get(CHILD_ENV))
    # A child finds studies again by importing their modules: one registered only in this process
    # (or replaced here after discovery) would be missing there, or silently be another study.
    in_process = [s.name for s in todo if not discoverable(s)]
    if jobs > 1 and len(todo) > 1 and in_process:
        print(f"running one study at a time in this process: {', '.join(in_process)} "
              f"registered here, not in a module a child process imports (see REWEIGHTING_STUDIES)")
        jobs = 1
    start = time.perf_counter()
    failed, crashed = [], []

    def done(name: str, result: dict) -> None:
        print(f"[{name}] claim: {result['verdict']} ({result['seconds']:.0f} s wall, "
              f"{result['cpu_seconds']:.0f} s CPU)")
        if not result["holds"]:
            failed.append(f"{name} ({result['verdict']})")

    if jobs > 1 and len(todo) > 1:
        from .studies import RESULTS_FILE

        def finished(study, code: int) -> None:
            path = out / study.name / RESULTS_FILE
            if code == 0:
                try:
                    done(study.name, json.loads(path.read_text()))
                    return
                except (OSError, ValueError, KeyError) as err:
                    print(f"[{study.name}] FAILED: its process ended without error but {path} could not be read "
                          f"({err})")
            crashed.append(study.name)

        for study in todo:  # this run's results only: a study that fails leaves no earlier verdict behind
            previous = out / study.name / RESULTS_FILE
            if previous.exists():
                previous.replace(previous.with_name("results.previous.json"))
        print(f"running {len(todo)} studies in child processes, at most {jobs} cores busy")
        run_parallel(todo, jobs, lambda study: _child_command(study.name, args), out, on_done=finished)
    else:
        # in this process too, a study's worker pool keeps to --jobs (a child's cores come from its parent)
        with _environment(CORES_ENV, str(args.jobs) if args.jobs is not None and not child else None):
            for study in todo:
                print(f"[{study.name}] {study.claim}")
                done(study.name, run_study(study, quick=args.quick, num_seeds=args.seeds, out_dir=out,
                                           device=args.device, show_progress=not args.no_progress))
    if child:  # the parent writes the job's record and the report, once every study has ended
        return 0
    if todo:  # the whole job's time, stated beside the per-study times
        (out / JOB_FILE).write_text(json.dumps({"studies": [s.name for s in todo], "jobs": jobs, "quick": args.quick,
                                                "seconds": time.perf_counter() - start, "failed": crashed,
                                                "perturbation": args.perturb}) + "\n")
    report = build_report(out)
    print(f"report: {report} ({time.perf_counter() - start:.0f} s wall in all)")
    if failed:
        print(f"claims that did not hold in this run, or could not be decided: {', '.join(failed)} (see the report)")
    if crashed:
        print(f"studies that stopped with an error (see their log.txt): {', '.join(crashed)}", file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def _environment(name: str, value: str | None):
    """``os.environ[name] = value`` for the duration (nothing when ``value`` is None)."""
    if value is None:
        yield
        return
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def _default_jobs(device: str) -> int:
    """Every core on a CPU; one study at a time on a GPU (studies side by side would share it)."""
    import torch

    from .studies.parallel import available_cores

    if device != "cpu" and torch.cuda.is_available():
        return 1
    return available_cores()


def _child_command(study: str, args: argparse.Namespace) -> list[str]:
    """``reproduce`` of one study in a child process, with this command's options."""
    command = [sys.executable, "-m", "reweighting", "reproduce", study, f"--out={args.out}",
               f"--device={args.device}", "--jobs", "1"]
    if args.quick:
        command.append("--quick")
    if args.seeds is not None:
        command += ["--seeds", str(args.seeds)]
    if args.no_progress:
        command.append("--no-progress")
    return command


def _cmd_report(args: argparse.Namespace) -> int:
    from .studies.report import build_report

    if not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is not a folder (run 'reweighting reproduce --out {args.out}' first)")
    if not any(Path(args.out).glob("*/results.json")):
        raise UsageError(f"--out {args.out} holds no results (no <study>/results.json in it); run "
                         f"'reweighting reproduce --out {args.out}' first")
    if args.rerun is not None and args.publish is None:
        raise UsageError("--rerun goes with --publish (it sets a second run's verdicts beside the published ones)")
    print(build_report(Path(args.out)))
    if args.publish is not None:
        from .studies.publish import publish

        if not Path(args.publish).is_dir():
            raise UsageError(f"--publish {args.publish} is not a folder (the repository root to publish into)")
        if args.rerun is not None and not Path(args.rerun).is_dir():
            raise UsageError(f"--rerun {args.rerun} is not a folder (the --out of a second 'reweighting reproduce')")
        try:
            written = publish(args.out, args.publish, args.rerun)
        except ValueError as err:
            raise UsageError(str(err)) from None
        for path in written:
            print(f"published: {path}")
    return 0


def _cmd_agree(args: argparse.Namespace) -> int:
    from .studies.agreement import compare_runs, format_agreement

    for folder in (args.run_a, args.run_b):
        if not Path(folder).is_dir():
            raise UsageError(f"{folder} is not a folder (a --out of 'reweighting reproduce')")
    try:
        agreement = compare_runs(args.run_a, args.run_b)
    except ValueError as err:
        raise UsageError(str(err)) from None
    print(format_agreement(agreement, args.run_a, args.run_b))
    return 0 if agreement.agrees else 1


def _studies_epilog() -> str:
    """The studies ``reproduce`` knows, for its ``--help``."""
    try:
        from .studies import all_studies

        names = ", ".join(all_studies())
    except Exception as err:  # a broken study module must not take the whole command line down
        names = f"(could not be listed: {type(err).__name__}: {err})"
    return f"studies: {names}. 'reweighting list' gives each one's claim."


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="reweighting", description="Per-sample reweighting and resampling.",
                    formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"reweighting {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list the studies, one line each", formatter_class=HelpFormatter)
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("reproduce", help="run studies and write the report", formatter_class=HelpFormatter,
                       description="Run studies and write <out>/report.md, <out>/<study>/results.json and plots.",
                       epilog=_studies_epilog())
    p.add_argument("studies", nargs="*", metavar="STUDY",
                   help="studies to run (default: all; 'reweighting list' shows each one's claim)")
    p.add_argument("--quick", action="store_true", help="short runs (what the tests use), not the full study")
    p.add_argument("--full", action="store_true",
                   help="with no STUDY named: every study, the long ones too (the language-model studies); "
                        "without it they are left out, and the run says so")
    p.add_argument("--seeds", type=positive_int, default=None, help="number of seeds (default: the study's own)")
    p.add_argument("--out", default="results", help="output folder")
    p.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda or cuda:N")
    p.add_argument("--skip-existing", action="store_true",
                   help="skip studies whose results.json exists for the same mode and seeds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--jobs", type=positive_int, default=None,
                   help="cores to keep busy: with more than one, studies run side by side in child processes "
                        "(each writes <out>/<study>/log.txt; the numbers are the same). By default every core "
                        "this process may use, or 1 when the studies run on a GPU")
    p.add_argument("--perturb", choices=("ulp", "threads"), default=None,
                   help="change only floating-point rounding, to check that no verdict rests on it: 'ulp' moves "
                        "every initial weight by one unit in the last place, 'threads' adds an intra-op thread "
                        "(default: none)")
    p.set_defaults(func=_cmd_reproduce)

    p = sub.add_parser("report", help="rebuild report.md from the results in --out", formatter_class=HelpFormatter)
    p.add_argument("--out", default="results", help="folder holding <study>/results.json")
    p.add_argument("--publish", nargs="?", const=".", default=None, metavar="ROOT",
                   help="also write ROOT/docs/results.json and regenerate the results tables of ROOT/README.md "
                        "and ROOT/docs/studies/index.md from it (ROOT: the repository, '.' when given without a value; "
                        "default: not published)")
    p.add_argument("--rerun", default=None, metavar="DIR",
                   help="with --publish: a second run of the same protocols (e.g. with --perturb ulp) whose verdicts "
                        "the published tables set beside these (default: none)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("agree", help="compare the verdicts of two runs, study by study and part by part",
                       formatter_class=HelpFormatter,
                       description="Compare the verdicts of two results folders (e.g. a plain run and one with "
                                   "--perturb ulp). Prints a table; exit status 1 when a verdict differs or a "
                                   "study ran in one folder only, 2 when the runs used different protocols.")
    p.add_argument("run_a", metavar="RUN_A", help="a results folder (the --out of 'reweighting reproduce')")
    p.add_argument("run_b", metavar="RUN_B", help="another results folder")
    p.set_defaults(func=_cmd_agree)

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
    return run_command(args)


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: the subcommands raise the imported
    # module's UsageError, which a __main__-level handler would not recognise.
    from reweighting.cli import main as _main

    sys.exit(_main())
