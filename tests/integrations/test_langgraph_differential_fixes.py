"""Regressions the differential test (test_langgraph_differential.py) found: the LangGraph
saver where it observably differed from LangGraph's ``InMemorySaver`` without the docs saying
so. Each test is the shrunk sequence, made deterministic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from fastcheckpoint import FileStore, MemoryStore
from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
from tests._helpers import FakeClock, make_config
from tests.integrations._langgraph_support import config, put

pytestmark = pytest.mark.anyio

DEADLINE = 5


@pytest.fixture(params=["memory", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    return MemoryStore() if request.param == "memory" else FileStore(tmp_path, fsync=False)


def _saver(store: Any, **options: Any) -> FastCheckpointSaver:
    return FastCheckpointSaver(store, config=make_config(FakeClock(), **options))


async def _ids(saver: FastCheckpointSaver, thread_id: str) -> list[str]:
    return [found.checkpoint["id"] async for found in saver.alist(config(thread_id))]


async def test_delete_for_runs_deletes_the_runs_checkpoints_in_a_copy(store: Any) -> None:
    """``acopy_thread`` keeps each checkpoint's metadata, ``run_id`` included, so
    ``adelete_for_runs`` of that run deletes the copies too (in every thread). The copy was
    not indexed under the run: its checkpoints stayed."""
    async with _saver(store) as saver:
        with anyio.fail_after(DEADLINE):
            first = await put(saver, "src", values={"a": 1}, versions={"a": 1}, run_id="run-1")
            await put(saver, "src", parent=first, values={"a": 2}, versions={"a": 2},
                      run_id="run-2")
            await saver.acopy_thread("src", "dst")
            await saver.adelete_for_runs(["run-1"])
            assert len(await _ids(saver, "src")) == 1
            assert len(await _ids(saver, "dst")) == 1
            await saver.adelete_for_runs(["run-2"])
            assert await _ids(saver, "dst") == []
            assert await saver.aget_tuple(config("dst")) is None
