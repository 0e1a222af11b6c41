"""The repository explains itself: nothing cites the outside product specification."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUARDS = {"tests/test_repository.py", "tests/test_cli.py", "tests/test_docs_snippets.py"}
"""Tests that look for citations, and so name what they look for."""


def test_no_tracked_file_cites_the_specification() -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    cited = []
    for name in tracked:
        if name in GUARDS or not name.endswith((".py", ".md", ".toml", ".json", ".yml", ".acl",
                                                ".conf", "Makefile", "run")):
            continue
        text = (ROOT / name).read_text(encoding="utf-8", errors="replace")
        cited += [f"{name}: {line.strip()[:80]}" for line in text.splitlines()
                  if "§" in line or re.search(r"\bSPEC(\.md)?\b", line)]
    assert cited == []
