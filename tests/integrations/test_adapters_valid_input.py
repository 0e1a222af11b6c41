"""Values the frameworks' own storages take are taken by the adapters too, and come back as
they went in (the counterpart of the adapters' surface fuzz, which checks refusals)."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import anyio
import pytest
from agent_framework import InMemoryCheckpointStorage, WorkflowCheckpoint

from fastcheckpoint.errors import CorruptCheckpointError
from fastcheckpoint.integrations._agent_framework_codec import CheckpointCodec
from fastcheckpoint.integrations.agent_framework import FastCheckpointStorage
from fastcheckpoint.stores.file import FileStore
from fastcheckpoint.stores.memory import MemoryStore


def _state() -> dict[str, Any]:
    return {
        "ordered": collections.OrderedDict([("z", 1), ("a", collections.Counter("abca"))]),
        "window": collections.deque([1, ("two", 2)], maxlen=3),
        "open": collections.deque(["x"]),
        "counts": collections.Counter({"🎉": 2}),
    }


def _shape(value: Any) -> Any:
    """Types and order all the way down: an ``OrderedDict`` equal to a ``dict`` is not it."""
    if isinstance(value, dict):
        return type(value), [(key, _shape(item)) for key, item in value.items()]
    if isinstance(value, (list, tuple, collections.deque)):
        return type(value), getattr(value, "maxlen", None), [_shape(item) for item in value]
    return type(value), value


@pytest.mark.parametrize("kind", ["memory", "file"])
@pytest.mark.anyio
async def test_agent_framework_standard_containers_round_trip(kind: str, tmp_path: Path) -> None:
    """A workflow's state holding an ``OrderedDict``, a ``Counter`` or a ``deque``: the
    framework's storages keep them; this one refused them with a hint (name the class in
    ``checkpoint_types``) that the constructor then refused too."""
    store = MemoryStore() if kind == "memory" else FileStore(tmp_path)
    ours = FastCheckpointStorage(store)
    theirs = InMemoryCheckpointStorage()
    with anyio.fail_after(10):
        for storage in (theirs, ours):
            checkpoint = WorkflowCheckpoint(workflow_name="流程", graph_signature_hash="h",
                                            state=_state())
            await storage.save(checkpoint)
            loaded = await storage.load(checkpoint.checkpoint_id)
            assert loaded.state == _state()
            assert _shape(loaded.state) == _shape(_state())
        await ours.aclose()


def test_agent_framework_damaged_container_is_corrupt() -> None:
    """A stored deque that does not rebuild one (planted or damaged) is damage, named."""
    codec = CheckpointCodec((), compress_min_bytes=None)
    for stored in ([[1], "not a size"], "abc", [[1], -1]):
        with pytest.raises(CorruptCheckpointError, match="deque"):
            codec._decode_value("collections.deque", stored)
