"""Exhaustive sweeps run a rotating part of their points by default, every point with
``FC_HUNT=1``.

A sweep over n points (a ``kill -9`` before each file-system change of an operation, say)
runs, by default, every ``stride``-th of them from an offset the session's seed picks, plus
the points it always needs (its ends, where an assertion needs one point of each outcome). The
seed is ``FC_RELIABILITY_SEED``: chosen anew each session, so ``stride`` sessions with
consecutive seeds run every point between them; it is printed in the header and in the
failure of a sweep, and setting it replays a session's choice.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Collection, Sequence

from tests.reliability._audit import FIGURES, SEED_VARIABLE

HUNT = os.environ.get("FC_HUNT") == "1"
"""Every point of every sweep."""


def chosen(name: str, points: Sequence[int], stride: int,
           always: Collection[int] = ()) -> list[int]:
    """The points of sweep ``name`` this session runs: every ``stride``-th from the seed's
    offset and those ``always`` names (all of them with ``FC_HUNT``)."""
    if HUNT or stride <= 1:
        return list(points)
    offset = (FIGURES.seed + zlib.crc32(name.encode())) % stride
    return [point for index, point in enumerate(points)
            if index % stride == offset or point in always]


def replay(name: str, ran: Sequence[int], points: Sequence[int]) -> str:
    """A failure's note: which points ran and how to run them again, or all of them."""
    return (f"sweep {name}: ran points {list(ran)} of {points[0]}..{points[-1]}; replay "
            f"with {SEED_VARIABLE}={FIGURES.seed}, FC_HUNT=1 runs every point")


def header() -> str:
    if HUNT:
        return "sweeps: every point (FC_HUNT=1)"
    return (f"sweeps: a rotating part of each, from seed {FIGURES.seed} (replay with "
            f"{SEED_VARIABLE}; FC_HUNT=1 runs every point)")
