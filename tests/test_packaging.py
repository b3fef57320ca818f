"""The package as users of a PyPI library expect it: a licence file, a changelog, type information
(``py.typed``, and the public API type-checks under mypy --strict from a user's program), and a
wheel that builds and passes ``twine check`` with its licence, marker and command inside."""

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "tests" / "typecheck" / "public_api_client.py"
BIN = Path(sys.executable).parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_file_is_the_declared_licence():
    text = (ROOT / "LICENSE").read_text()
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]


def test_changelog_has_the_current_version_and_an_unreleased_section():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in text
    assert f"## [{PYPROJECT['project']['version']}]" in text


def test_version_is_the_same_in_the_package_and_its_metadata():
    import reweighting

    assert reweighting.__version__ == PYPROJECT["project"]["version"]


def test_the_public_api_client_runs():
    done = subprocess.run([sys.executable, str(CLIENT)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(not (BIN / "mypy").exists(), reason="mypy is not installed (pip install -e '.[dev]')")
def test_the_public_api_type_checks_from_a_users_program():
    # follow-imports=silent: the package's own bodies are not this check's subject, its signatures are
    done = subprocess.run([str(BIN / "mypy"), "--strict", "--follow-imports=silent", "--ignore-missing-imports",
                           "--cache-dir", str(ROOT / ".mypy_cache"), str(CLIENT)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


@pytest.mark.skipif(not (BIN / "twine").exists(), reason="twine is not installed (pip install -e '.[dev]')")
def test_the_wheel_builds_and_passes_twine_check(tmp_path):
    source = tmp_path / "src"  # a copy, so that the build leaves nothing in the working tree
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "reweighting", source / "reweighting", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist),
                            str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert "deprecated" not in built.stdout + built.stderr
    (wheel,) = dist.glob("reweighting-*.whl")
    checked = subprocess.run([str(BIN / "twine"), "check", "--strict", str(wheel)], capture_output=True, text=True,
                             timeout=300)
    assert checked.returncode == 0 and "PASSED" in checked.stdout, checked.stdout + checked.stderr
    names = zipfile.ZipFile(wheel).namelist()
    assert "reweighting/py.typed" in names
    assert any(re.search(r"\.dist-info/licenses/LICENSE$", n) for n in names)
    assert not any(n.startswith(("tests/", "docs/", "examples/")) for n in names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in meta and "Description-Content-Type: text/markdown" in meta
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "reweighting = reweighting.cli:main" in entry
