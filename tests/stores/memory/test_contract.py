"""The store contract (:mod:`fastcheckpoint.testing`) run against MemoryStore."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from fastcheckpoint.stores import CheckpointStore
from fastcheckpoint.testing import (
    LabelsContract,
    NestedItemsContract,
    SharedItemsContract,
    StoreContract,
)


async def _close(store: CheckpointStore) -> None:
    with anyio.fail_after(10):
        await store.aclose()


class TestMemoryStore(StoreContract, LabelsContract, SharedItemsContract, NestedItemsContract):
    @pytest.fixture
    async def store(self) -> AsyncIterator[CheckpointStore]:
        from fastcheckpoint.stores.memory import MemoryStore

        store = MemoryStore()
        yield store
        await _close(store)
