"""Checking a run against what its writers were told, and the figures the suite reports.

Every create of the suite writes a state derived from a unique token (:func:`state_for`), so
a checkpoint read back names the create that wrote it: a lost create, a create written twice
and a checkpoint nobody wrote are each visible, whatever sequence they ended up at.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastcheckpoint import CheckpointManager, CheckpointMetadata

SCALE_VARIABLE = "FC_RELIABILITY_SCALE"
"""Multiplies the suite's sizes (creates, kill rounds); 1 by default, 10 for a soak."""
SEED_VARIABLE = "FC_RELIABILITY_SEED"
"""Replays a run: the seed of every random choice (faults, kill instants, tampered bytes)."""
REPORT_VARIABLE = "FC_RELIABILITY_REPORT"
"""A file to append the measured figures to, one JSON object per line."""

_PAGE = 500


def scale() -> float:
    raw = os.environ.get(SCALE_VARIABLE, "1")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{SCALE_VARIABLE} must be a positive number, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{SCALE_VARIABLE} must be a positive number, got {raw!r}")
    return value


def scaled(size: int) -> int:
    """``size`` times the scale, at least 1."""
    return max(1, round(size * scale()))


def state_for(token: str) -> dict[str, Any]:
    """The state the create named ``token`` writes: the token and up to 2 KiB of filler, so a
    torn or foreign record cannot pass for it."""
    rng = random.Random(token)
    return {"token": token, "filler": rng.randbytes(rng.randrange(2048)).hex()}


@dataclass(frozen=True)
class Ack:
    """A create that returned a checkpoint."""

    token: str
    sequence: int
    checkpoint_id: str


@dataclass
class RunAudit:
    """What a run holds compared with what its creates were told."""

    acknowledged: int = 0
    listed: int = 0
    lost: list[str] = field(default_factory=list)
    """Acknowledged creates that cannot be restored as acknowledged (why, one line each)."""
    duplicated: list[str] = field(default_factory=list)
    """Extra copies of one create's state."""
    unacknowledged: list[str] = field(default_factory=list)
    """Checkpoints of creates that raised or were cut short: allowed, each at most once."""
    unexplained: list[str] = field(default_factory=list)
    """Checkpoints no create of the run wrote, or problems with sequences."""

    def problems(self) -> list[str]:
        return [*self.lost, *self.duplicated, *self.unexplained]


async def list_all(manager: CheckpointManager, run_id: str) -> list[CheckpointMetadata]:
    """Every live checkpoint of the run, newest first."""
    found: list[CheckpointMetadata] = []
    before: str | None = None
    while True:
        page = await manager.list_checkpoints(run_id, limit=_PAGE, before=before)
        found.extend(page)
        if len(page) < _PAGE:
            return found
        before = page[-1].checkpoint_id


async def audit_run(
    manager: CheckpointManager,
    run_id: str,
    acks: list[Ack],
    unconfirmed: set[str],
) -> RunAudit:
    """Check the run through ``manager`` (which must not inject faults).

    ``acks`` are the acknowledged creates; ``unconfirmed`` the tokens of creates that raised or
    whose writer died before reporting: their checkpoint may exist, once.
    """
    audit = RunAudit(acknowledged=len(acks))
    listed = await list_all(manager, run_id)
    audit.listed = len(listed)
    tokens = await _tokens_of(manager, listed, audit)
    for token, count in Counter(tokens.values()).items():
        if count > 1:
            audit.duplicated.extend([f"create {token} is held {count} times"] * (count - 1))
    acked = {ack.token: ack for ack in acks}
    for checkpoint_id, token in tokens.items():
        if token in acked:
            continue
        if token in unconfirmed:
            audit.unacknowledged.append(f"{checkpoint_id} holds unconfirmed create {token}")
        else:
            audit.unexplained.append(f"{checkpoint_id} holds {token}, which no create wrote")
    for ack in acks:
        why = await _why_lost(manager, ack, tokens)
        if why is not None:
            audit.lost.append(f"acknowledged create {ack.token} (sequence {ack.sequence}, "
                              f"{ack.checkpoint_id}): {why}")
    audit.unexplained.extend(_sequence_problems(listed, acks))
    return audit


async def _tokens_of(
    manager: CheckpointManager, listed: list[CheckpointMetadata], audit: RunAudit
) -> dict[str, str]:
    """``checkpoint_id -> token`` of every listed checkpoint, read back in full."""
    tokens: dict[str, str] = {}
    for metadata in listed:
        restored = await manager.restore_from(metadata.checkpoint_id)
        if restored is None:
            audit.unexplained.append(f"listed {metadata.checkpoint_id} cannot be restored")
            continue
        token = str(restored.state.get("token"))
        if restored.state != state_for(token):
            audit.unexplained.append(f"{metadata.checkpoint_id} holds a damaged state")
        tokens[metadata.checkpoint_id] = token
    return tokens


async def _why_lost(manager: CheckpointManager, ack: Ack, tokens: dict[str, str]) -> str | None:
    if tokens.get(ack.checkpoint_id) != ack.token:
        return "not in the run's listing"
    restored = await manager.restore_from(ack.checkpoint_id)
    if restored is None:
        return "restore_from returns None"
    if restored.state != state_for(ack.token):
        return "restore_from returns other content"
    if restored.metadata.sequence != ack.sequence:
        return f"restored at sequence {restored.metadata.sequence}"
    return None


def _sequence_problems(listed: list[CheckpointMetadata], acks: list[Ack]) -> list[str]:
    problems = []
    sequences = sorted(metadata.sequence for metadata in listed)
    if sequences != list(range(len(sequences))):
        missing = sorted(set(range(len(sequences))) - set(sequences))[:10]
        repeated = sorted(s for s, n in Counter(sequences).items() if n > 1)[:10]
        problems.append(f"listed sequences are not 0..{len(sequences) - 1}: missing {missing}, "
                        f"repeated {repeated}, highest {sequences[-1]}")
    repeated_acks = sorted(s for s, n in Counter(a.sequence for a in acks).items() if n > 1)
    if repeated_acks:
        problems.append(f"sequences acknowledged twice: {repeated_acks[:10]}")
    return problems


class Figures:
    """Counts the suite measured, summed per (scenario, store): printed at the end of the
    session and appended to ``$FC_RELIABILITY_REPORT`` when set."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._rows: dict[tuple[str, str], Counter[str]] = {}
        self._lock = threading.Lock()

    @property
    def replay(self) -> str:
        """How to run the session's random choices again."""
        return f"replay with {SEED_VARIABLE}={self.seed}"

    def add(self, scenario: str, store: str, **counts: int) -> None:
        with self._lock:
            self._rows.setdefault((scenario, store), Counter()).update(counts)
        path = os.environ.get(REPORT_VARIABLE)
        if path:
            line = {"scenario": scenario, "store": store, "seed": self.seed,
                    "scale": scale(), **counts}
            with open(path, "a", encoding="utf-8") as out:
                out.write(json.dumps(line) + "\n")

    def rows(self) -> list[list[object]]:
        """The counts as plain values, for :meth:`merge` in another process."""
        with self._lock:
            return [[scenario, store, dict(counts)]
                    for (scenario, store), counts in sorted(self._rows.items())]

    def merge(self, rows: Iterable[Sequence[Any]]) -> None:
        """Add counts another process measured (its :meth:`rows`); nothing is reported."""
        with self._lock:
            for scenario, store, counts in rows:
                self._rows.setdefault((scenario, store), Counter()).update(counts)

    def lines(self) -> list[str]:
        with self._lock:
            rows = sorted(self._rows.items())
        return [f"{scenario:<14} {store:<9} " + ", ".join(f"{k} {v}" for k, v in counts.items())
                for (scenario, store), counts in rows]


FIGURES = Figures(int(os.environ.get(SEED_VARIABLE) or secrets.randbits(32)))
"""This session's figures. Its seed is chosen once: the process that starts the session
exports it in ``$FC_RELIABILITY_SEED`` before any xdist worker starts, so all share it."""
