"""``offers_sequence_guard`` through the store wrappers the package has: a wrapper that passes
attributes through (the command line's progress counting) neither claims the guard for a
store whose ``update_run`` does not take ``latest_sequence=`` nor hides it from one that
does, and the manager over it refuses a guarded pause with a ``ConfigurationError``, not a
``TypeError`` from the store."""

from __future__ import annotations

import anyio
import pytest

from fastcheckpoint import CheckpointConfig, CheckpointManager, CheckpointStatus
from fastcheckpoint.cli import _Watched, _watched_manager
from fastcheckpoint.errors import ConfigurationError
from fastcheckpoint.stores import offers_sequence_guard
from fastcheckpoint.stores.memory import MemoryStore
from tests.test_manager import _OlderUpdateRun

pytestmark = pytest.mark.anyio


def test_a_wrapper_passing_attributes_through_offers_what_the_store_offers() -> None:
    assert offers_sequence_guard(_Watched(MemoryStore()))
    assert offers_sequence_guard(_Watched(_Watched(MemoryStore())))
    assert not offers_sequence_guard(_OlderUpdateRun())
    assert not offers_sequence_guard(_Watched(_OlderUpdateRun()))


async def test_a_guarded_pause_through_such_a_wrapper_is_a_configuration_error() -> None:
    inner = _OlderUpdateRun()
    manager = _watched_manager(CheckpointManager(inner, config=CheckpointConfig()),
                               _Watched(inner))
    with anyio.fail_after(10):
        created = await manager.create("wrapped", {"n": 0})
        assert created is not None
        with pytest.raises(ConfigurationError, match="SupportsSequenceGuard"):
            await manager.pause("wrapped", {"n": 0}, latest_sequence=created.metadata.sequence)
        paused = await manager.pause("wrapped", {"n": 0})

    assert paused.status is CheckpointStatus.PAUSED
