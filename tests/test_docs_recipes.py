"""The recipes of the Get-started and How-to pages run as written, at their tiny sizes.

A recipe is a ``bash`` code block right after a ``<!-- recipe -->`` line; the ``text`` block that follows
it, if any, is its expected standard output, compared as doctest compares (``...`` matches anything,
runs of whitespace are equal). A page's recipes run in order, in one fresh folder, so later ones use the
run folders of earlier ones; ``../shared`` beside that folder is the repository's own, where it exists.
"""

from __future__ import annotations

import doctest
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RECIPE = re.compile(r"<!-- recipe -->\n```bash\n(.*?)```\n(?:\n```text\n(.*?)```\n)?", re.S)
PAGES = sorted(p for section in ("get-started", "guides") for p in (ROOT / "docs" / section).glob("*.md")
               if "<!-- recipe -->" in p.read_text(encoding="utf-8"))
CHECKER = doctest.OutputChecker()
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def recipes(page: Path) -> list[tuple[str, str | None]]:
    """(script, expected output or None) of each recipe of a page, in order."""
    text = page.read_text(encoding="utf-8")
    found = RECIPE.findall(text)
    assert len(found) == text.count("<!-- recipe -->"), f"{page.name}: a recipe marker not followed by a bash block"
    return [(script, want or None) for script, want in found]


def test_every_how_to_page_has_a_recipe():
    guides = sorted((ROOT / "docs" / "guides").glob("*.md"))
    assert guides and [p for p in guides if p not in PAGES] == []


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_recipe_runs_and_prints_what_the_page_shows(page, tmp_path):
    found = recipes(page)
    if any("../shared" in script for script, _ in found) and not SHARED.is_dir():
        pytest.skip(f"{page.name}'s recipe reads ../shared, which is absent here")
    work = tmp_path / "work"
    work.mkdir()
    if SHARED.is_dir():
        (tmp_path / "shared").symlink_to(SHARED)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONUNBUFFERED": "1"}
    for script, want in found:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, f"{page.name}: recipe failed\n{script}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        if want is not None:
            assert CHECKER.check_output(want, proc.stdout, FLAGS), (
                f"{page.name}: output differs\n{script}\n--- shown\n{want}\n--- printed\n{proc.stdout}")
