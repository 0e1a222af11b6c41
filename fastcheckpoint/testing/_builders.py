"""Builders for the values a store is handed, with defaults that make tests short."""

from __future__ import annotations

import msgspec

from fastcheckpoint import _ids
from fastcheckpoint.stores._base import Item, RunRecord, StoredCheckpoint, header_of

__all__ = [
    "T0",
    "checkpoint_id_of",
    "header_of",
    "key_of",
    "make_checkpoint",
    "make_item",
    "make_run",
    "without_key",
]

T0 = 1_700_000_000.0
"""The epoch second every contract test starts at; tests move time by passing ``now``."""


def _released() -> memoryview:
    view = memoryview(b"released")
    view.release()
    return view


RELEASED = _released()
"""A ``memoryview`` no store can read (released): bad input for a bytes field."""


def make_run(
    run_id: str = "run",
    *,
    incarnation: str | None = None,
    status: str = "active",
    created_at: float = T0,
    expires_at: float | None = None,
    data: bytes = b"",
) -> RunRecord:
    """A run seed as the manager passes it to ``append``: no checkpoint counted yet.

    Give it the ``expires_at`` of the first checkpoint appended with it.
    """
    return RunRecord(
        run_id=run_id,
        incarnation=_ids.new_incarnation() if incarnation is None else incarnation,
        status=status,
        created_at=created_at,
        updated_at=created_at,
        latest_sequence=0,
        checkpoint_count=0,
        expires_at=expires_at,
        data=data,
    )


def key_of(run: RunRecord) -> str:
    """The run key the manager derives from ``run.run_id``."""
    return _ids.run_key(run.run_id)


def checkpoint_id_of(run: RunRecord, sequence: int) -> str:
    """The id of checkpoint ``sequence`` in this incarnation of ``run``."""
    return _ids.checkpoint_id(key_of(run), run.incarnation, sequence)


def make_checkpoint(
    run: RunRecord,
    sequence: int,
    *,
    created_at: float = T0,
    expires_at: float | None = None,
    header: bytes | None = None,
    payload: bytes | None = None,
) -> StoredCheckpoint:
    """Checkpoint ``sequence`` of ``run``; header and payload default to distinct bytes."""
    return StoredCheckpoint(
        sequence=sequence,
        checkpoint_id=checkpoint_id_of(run, sequence),
        created_at=created_at,
        expires_at=expires_at,
        header=f"header-{run.run_id}-{sequence}".encode() if header is None else header,
        payload=f"payload-{run.run_id}-{sequence}".encode() if payload is None else payload,
    )


def make_item(
    key: str,
    value: bytes | None = None,
    *,
    owner: int | None = None,
    expires_at: float | None = None,
) -> Item:
    """An item; its value defaults to ``b"value-" + key``."""
    return Item(
        key=key,
        value=f"value-{key}".encode() if value is None else value,
        owner=owner,
        expires_at=expires_at,
    )


def without_key(record: StoredCheckpoint) -> StoredCheckpoint:
    """``record`` with the store-filled ``key`` cleared, for comparing with what was appended."""
    return msgspec.structs.replace(record, key="")
