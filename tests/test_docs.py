"""The documentation: the site builds with warnings as errors (a broken reference fails it), and every
command shown in the README and the docs uses flags and config keys that exist."""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from unmask.cli import build_parser
from unmask.config import config_keys

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PAGES = [p for p in PAGES if "_build" not in p.parts]


@pytest.mark.slow
def test_the_docs_build_cleanly_and_a_broken_reference_fails_the_build(tmp_path):
    """A copy of the docs with one extra page naming a function that does not exist: the nitpicky build
    with warnings as errors fails, and on that reference alone (every other page, generated reference
    included, builds without a warning)."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", repo / "docs", ignore=shutil.ignore_patterns("_build"))
    for name in ("README.md", "CHANGELOG.md"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "benchmarks" / "results", repo / "benchmarks" / "results",
                    ignore=lambda folder, names: [n for n in names if not n.endswith(".png")])  # the results' figures
    (repo / "docs" / "broken.md").write_text("---\norphan: true\n---\n# Broken\n\n{py:func}`unmask.no_such_function`\n")
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-n", "-q", str(repo / "docs"),
                           str(tmp_path / "html")], capture_output=True, text=True, timeout=600)
    problems = [line for line in proc.stderr.splitlines() if "WARNING" in line or "ERROR" in line]
    assert proc.returncode != 0 and len(problems) == 1 and "unmask.no_such_function" in problems[0], proc.stderr


def documented_commands() -> list[tuple[str, list[str]]]:
    """(page, argv after ``unmask``) of every ``unmask ...`` line in the pages' shell code blocks."""
    out = []
    for page in PAGES:
        for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                for command in re.split(r"&&|\|", line.split(" # ")[0]):
                    command = command.strip().lstrip("$ ")
                    if Path(command.split(" ")[0]).name != "unmask":
                        continue  # other programs, and lines inside a multi-line Python string
                    words = shlex.split(command, comments=True)
                    out.append((page.relative_to(ROOT).as_posix(), words[1:]))
    return out


def test_documented_commands_use_flags_and_keys_that_exist():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    keys = {k.key for k in config_keys()}
    sections = {k.split(".")[0] for k in keys}
    commands = documented_commands()
    assert len(commands) > 20  # the README's tour and the guides
    for page, argv in commands:
        assert argv and argv[0] in sub.choices, f"{page}: unknown command unmask {' '.join(argv)}"
        flags = {f for action in sub.choices[argv[0]]._actions for f in action.option_strings}
        for word in argv[1:]:
            if word.startswith("--"):
                assert word.split("=")[0] in flags, f"{page}: unmask {argv[0]} has no flag {word}"
            key = re.match(r"([a-z_][a-z0-9_.]*)=", word)
            if key and (key.group(1) in keys or key.group(1).split(".")[0] in sections):
                assert key.group(1) in keys, f"{page}: no config key {key.group(1)} (unmask {' '.join(argv)})"
