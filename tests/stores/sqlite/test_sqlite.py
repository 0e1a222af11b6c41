"""The store contract, the adapter capabilities and repair, run against SQLiteStore on asyncio
and trio (backend-specific tests are in test_sqlite_specific.py)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import pytest

from fastcheckpoint.stores import CheckpointStore
from fastcheckpoint.stores.sqlite import SQLiteStore
from fastcheckpoint.testing import (
    AppendNextContract,
    DamageRunRecord,
    LabelsContract,
    NestedItemsContract,
    RepairContract,
    SequenceGuardContract,
    SharedItemsContract,
    StoreContract,
)


def _delete_run_row(store: CheckpointStore, run_key: str) -> None:
    """What an operator's ``DELETE FROM fc_runs`` does: the checkpoints stay behind."""
    assert isinstance(store, SQLiteStore)
    with contextlib.closing(sqlite3.connect(store.path)) as db, db:
        assert db.execute("DELETE FROM fc_runs WHERE run_key = ?", (run_key,)).rowcount == 1


def _delete_run_row_and_labels(store: CheckpointStore, run_key: str) -> None:
    assert isinstance(store, SQLiteStore)
    _delete_run_row(store, run_key)
    with contextlib.closing(sqlite3.connect(store.path)) as db, db:
        db.execute("DELETE FROM fc_labels WHERE run_key = ?", (run_key,))


class TestSQLiteStore(
    StoreContract, AppendNextContract, LabelsContract, SharedItemsContract, NestedItemsContract,
    RepairContract, SequenceGuardContract,
):
    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[CheckpointStore]:
        store = SQLiteStore(tmp_path / "checkpoints.db")
        yield store
        with anyio.fail_after(10):
            await store.aclose()

    @pytest.fixture(params=[_delete_run_row, _delete_run_row_and_labels],
                    ids=["row-deleted", "row-and-labels-deleted"])
    def damage_run_record(self, request: pytest.FixtureRequest) -> DamageRunRecord:
        damage: Callable[[CheckpointStore, str], None] = request.param

        async def damaged(store: CheckpointStore, run_key: str) -> None:
            await anyio.to_thread.run_sync(damage, store, run_key)

        return damaged

