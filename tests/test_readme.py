"""Documentation that runs: every ```python block of README.md runs as written, in a fresh
interpreter, unless the line before it is ``<!-- fragment -->`` (a sketch that needs the reader's
own model or data), which is skipped and counted."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FRAGMENT = "<!-- fragment -->"


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """``(line number, code, is_fragment)`` for each ```python block."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            i += 1
            body = []
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            blocks.append((start + 1, "\n".join(body) + "\n", previous == FRAGMENT))
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text())


def test_the_readme_has_blocks_and_the_parser_finds_fragments():
    sample = "text\n\n<!-- fragment -->\n```python\nx = 1\n```\n\n```python\nprint(2)\n```\n"
    assert python_blocks(sample) == [(4, "x = 1\n", True), (8, "print(2)\n", False)]
    runnable = [b for b in BLOCKS if not b[2]]
    assert len(runnable) >= 3, "the README's three examples must run"
    print(f"README: {len(BLOCKS)} python blocks, {len(runnable)} run, {len(BLOCKS) - len(runnable)} fragments")


@pytest.mark.parametrize("line, code, fragment", BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_block_runs(line, code, fragment, tmp_path):
    if fragment:
        pytest.skip(f"README.md line {line} is marked {FRAGMENT}")
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONPATH=str(README.parent))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"README.md block at line {line} failed:\n{done.stderr[-3000:]}"
    assert not re.search(r"^Traceback", done.stderr, re.MULTILINE)
