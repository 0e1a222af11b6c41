"""The store contract (:mod:`fastcheckpoint.testing`) run against FileStore."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from fastcheckpoint.stores import CheckpointStore
from fastcheckpoint.testing import (
    AppendNextContract,
    LabelsContract,
    NestedItemsContract,
    SequenceGuardContract,
    SharedItemsContract,
    StoreContract,
)


async def _close(store: CheckpointStore) -> None:
    with anyio.fail_after(10):
        await store.aclose()


class TestFileStore(
    StoreContract, AppendNextContract, LabelsContract, SharedItemsContract, NestedItemsContract,
    SequenceGuardContract,
):
    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[CheckpointStore]:
        from fastcheckpoint.stores.file import FileStore

        store = FileStore(tmp_path)
        yield store
        await _close(store)
