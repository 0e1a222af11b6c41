"""The lines a test session ends with (which Redis and PostgreSQL the tests ran against,
the reliability figures), also when pytest-xdist spreads the session over workers.

Each process notes its lines here; a worker hands them to the controller when it finishes
(xdist's ``workeroutput``), and the process with the terminal prints them all once.
"""

from __future__ import annotations

from collections.abc import Iterable

from tests.reliability._audit import FIGURES

WORKER_OUTPUT_KEY = "fastcheckpoint-summary"
_lines: list[str] = []


def note(line: str) -> None:
    """Print ``line`` at the end of the session (once, however many workers note it)."""
    if line not in _lines:
        _lines.append(line)


def export() -> dict[str, object]:
    """What a worker hands to the controller: plain values (xdist sends them over a pipe)."""
    return {"lines": list(_lines), "figures": FIGURES.rows()}


def merge(exported: object) -> None:
    """Take in what a worker exported."""
    if not isinstance(exported, dict):
        return
    for line in exported.get("lines", ()):
        note(line)
    FIGURES.merge(exported.get("figures", ()))


def lines() -> Iterable[str]:
    return tuple(_lines)
