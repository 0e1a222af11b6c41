"""The store contract (:mod:`fastcheckpoint.testing`) run against MemoryStore."""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import anyio
import pytest

from fastcheckpoint.stores import CheckpointStore, never_suspends
from fastcheckpoint.stores.memory import MemoryStore
from fastcheckpoint.testing import (
    LabelsContract,
    NestedItemsContract,
    SequenceGuardContract,
    SharedItemsContract,
    StoreContract,
)
from tests._helpers import completed_at_once


async def _close(store: CheckpointStore) -> None:
    with anyio.fail_after(10):
        await store.aclose()


class TestMemoryStore(
    StoreContract, LabelsContract, SharedItemsContract, NestedItemsContract, SequenceGuardContract
):
    @pytest.fixture
    async def store(self) -> AsyncIterator[CheckpointStore]:
        store = MemoryStore()
        yield store
        await _close(store)


def _at_once(method: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
    @functools.wraps(method)
    async def call(*args: Any, **kwargs: Any) -> Any:
        return completed_at_once(method(*args, **kwargs), f"MemoryStore.{method.__name__}")

    return call


class _AtOnce(MemoryStore):
    """Fails any call that suspends: what ``never_suspends`` promises (claimed again: a
    subclass does not inherit it)."""

    never_suspends = True
    sequence_guard = True  # its update_run is MemoryStore's, wrapped


for _name, _method in inspect.getmembers(MemoryStore, inspect.iscoroutinefunction):
    setattr(_AtOnce, _name, _at_once(_method))


class TestMemoryStoreCallsNeverSuspend(TestMemoryStore):
    """The whole contract again, every call completing without suspending (callers then
    make a change of several calls without a task to shield it)."""

    @pytest.fixture
    async def store(self) -> AsyncIterator[CheckpointStore]:
        store = _AtOnce()
        assert never_suspends(store)
        yield store
        await _close(store)
