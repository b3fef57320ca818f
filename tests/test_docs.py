"""The documentation runs and holds together: every ```python block of docs/ runs as written in a
fresh interpreter (``<!-- fragment -->`` marks a sketch that needs the reader's own model or data),
the site builds with warnings as errors, every relative link of README.md and docs/ reaches a file
of the repository, and no page points at a file outside it."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_readme import python_blocks

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
BLOCKS = [(page.relative_to(ROOT).as_posix(), line, code, fragment)
          for page in PAGES for line, code, fragment in python_blocks(page.read_text())]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_every_method_has_a_page_with_runnable_code():
    methods = ["loss-based", "presence", "noisy-labels", "tiw-dsm", "qprobe"]
    for name in methods:
        page = f"docs/methods/{name}.md"
        assert any(b[0] == page and not b[3] for b in BLOCKS), f"{page} has no block that runs"
        text = (ROOT / page).read_text()
        for heading in ("## What it computes", "## When to use it", "## Using it", "## How it was checked",
                        "## What the study shows"):
            assert heading in text, f"{page} lacks the section {heading!r}"


@pytest.mark.parametrize("page, line, code, fragment", BLOCKS, ids=[f"{b[0]}:{b[1]}" for b in BLOCKS])
def test_docs_block_runs(page, line, code, fragment, tmp_path):
    if fragment:
        pytest.skip(f"{page} line {line} is a fragment")
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"{page} block at line {line} failed:\n{done.stderr[-3000:]}"


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)  # code is not a link
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("path", [ROOT / "README.md", *PAGES], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_reach_files_of_the_repository(path):
    for target in _links(path):
        file = target.split("#")[0]
        if not file:
            continue
        resolved = (path.parent / file).resolve()
        assert resolved.is_relative_to(ROOT), f"{path.name} links outside the repository: {target}"
        assert resolved.exists(), f"{path.relative_to(ROOT)} links to {target}, which does not exist"


def test_no_page_points_at_a_description_outside_the_repository():
    for path in [ROOT / "README.md", *PAGES]:
        assert "METHODS.md" not in path.read_text(), f"{path.relative_to(ROOT)} cites a file the repository lacks"


def test_readme_is_an_entrance():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for needed in ("make test", "make reproduce", "source .venv/bin/activate", "make docs"):
        assert needed in text, f"the README does not say {needed!r}"
    runnable = [b for b in python_blocks(text) if not b[2]]
    assert len(runnable) >= 3, "the README should hold three examples that run"


@pytest.mark.parametrize("path", ["README.md", "docs/studies/index.md"])
def test_results_table_sits_between_the_markers(path):
    lines = (ROOT / path).read_text().splitlines()
    start, end = lines.index("<!-- results:start -->"), lines.index("<!-- results:end -->")
    table = [line for line in lines[start + 1:end] if line.startswith("|")]
    assert start < end and len(table) >= 3  # a header, its rule and at least one row
    assert lines.count("<!-- results:start -->") == 1 and lines.count("<!-- results:end -->") == 1


@pytest.mark.skipif(shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None,
                    reason="mkdocs is not installed (pip install -e '.[docs]')")
def test_the_site_builds_with_warnings_as_errors(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    done = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stderr[-3000:]}"
    api = (tmp_path / "site" / "api" / "qprobe" / "index.html").read_text()
    assert 'id="reweighting.qprobe.fit_probe"' in api  # the reference is built from the docstrings


def _anchors(page: Path) -> set[str]:
    """The ids MkDocs gives the page's headings (its default slugs: lower case, words joined by '-')."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
        out.add(re.sub(r"[-\s]+", "-", slug))
    return out


def test_references_from_the_code_to_the_docs_resolve():
    cited = 0
    for source in sorted((ROOT / "reweighting").rglob("*.py")):
        for page, anchor in re.findall(r"\b(docs/[\w./-]+\.md)(?:#([\w-]+))?", source.read_text()):
            cited += 1
            target = ROOT / page
            assert target.is_file(), f"{source.relative_to(ROOT)} cites {page}, which does not exist"
            if anchor:
                assert anchor in _anchors(target), f"{source.relative_to(ROOT)} cites {page}#{anchor}: no such heading"
    assert cited >= 1


def test_the_anchor_rule_matches_the_built_site():
    assert {"what-it-computes", "training-objectives", "features-from-an-api"} <= _anchors(DOCS / "methods/qprobe.md")
    assert "the-layout-of-t" in _anchors(DOCS / "methods/noisy-labels.md")
