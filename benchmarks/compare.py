"""Side-by-side subjects for ``--compare``: FastAgentic's stores and LangGraph's savers.

Each runs with its library's default configuration (FastAgentic's manager prunes to 100 per
run like ours) in the same process run as the fastcheckpoint stores, so ratios are fair.
Install them with ``pip install -e '.[compare]'``; a missing one is reported and skipped.

Mapping to LangGraph: every top-level state key is a channel, plus ``messages``, and every
channel gets a new version on every step, so each ``aput`` stores the full state like a
fastcheckpoint create does. The checkpoint dict (id, timestamp, versions) is built before the
timer starts, as Pregel builds it before calling the saver: only ``aput`` is timed.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from benchmarks.content import Content
from benchmarks.subjects import FastcheckpointDriver, Operation

__all__ = ["FastAgenticSubject", "LangGraphSubject", "comparison_subjects"]

INSTALL_HINT = "pip install -e '.[compare]'"


class _FastAgenticDriver(FastcheckpointDriver):
    """FastAgentic's manager has our API (we are its drop-in), so only ``held`` differs."""

    def __init__(self, manager: Any, store: Any) -> None:
        super().__init__(manager)
        self.store = store

    async def held(self, run_id: str) -> int:
        return len(await self.store.list_checkpoints(run_id, limit=1 << 30))


@dataclass
class FastAgenticSubject:
    kind: str
    """``memory`` (InMemoryCheckpointStore) or ``file`` (FileCheckpointStore)."""
    scratch: str
    system: str = "fastagentic"
    label: str = ""

    def __post_init__(self) -> None:
        names = {"memory": "InMemoryCheckpointStore", "file": "FileCheckpointStore"}
        self.label = f"FastAgentic {names[self.kind]}"

    @contextlib.asynccontextmanager
    async def session(self, keep: int | None) -> AsyncIterator[_FastAgenticDriver]:
        from fastagentic.checkpoint import (
            CheckpointConfig,
            CheckpointManager,
            FileCheckpointStore,
            InMemoryCheckpointStore,
        )

        directory = os.path.join(self.scratch, f"fastagentic-{secrets.token_hex(4)}")
        store = InMemoryCheckpointStore() if self.kind == "memory" else FileCheckpointStore(
            directory)
        config = CheckpointConfig(max_checkpoints_per_run=keep or 0)  # 0: FastAgentic keeps all
        try:
            yield _FastAgenticDriver(CheckpointManager(store, config), store)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


class _LangGraphDriver:
    def __init__(self, saver: Any) -> None:
        from langgraph.checkpoint.base import empty_checkpoint

        self.saver = saver
        self._empty_checkpoint = empty_checkpoint
        self._head: dict[str, tuple[str, str, int]] = {}  # thread -> (checkpoint id, version, step)

    @staticmethod
    def _config(run_id: str, checkpoint_id: str | None = None) -> dict[str, Any]:
        configurable: dict[str, Any] = {"thread_id": run_id, "checkpoint_ns": ""}
        if checkpoint_id is not None:
            configurable["checkpoint_id"] = checkpoint_id
        return {"configurable": configurable}

    def prepare_create(self, run_id: str, content: Content) -> Operation:
        parent, version, step = self._head.get(run_id, (None, None, -1))
        version = self.saver.get_next_version(version, None)
        values = {**content.state, "messages": content.messages}
        checkpoint = self._empty_checkpoint()
        checkpoint["channel_values"] = values
        checkpoint["channel_versions"] = dict.fromkeys(values, version)
        checkpoint["updated_channels"] = list(values)
        metadata = {"source": "loop", "step": step + 1, "parents": {}}
        self._head[run_id] = (checkpoint["id"], version, step + 1)
        return functools.partial(
            self.saver.aput, self._config(run_id, parent), checkpoint, metadata,
            dict(checkpoint["channel_versions"]),
        )

    def prepare_restore(self, run_id: str) -> Operation:
        return functools.partial(self.saver.aget_tuple, self._config(run_id))

    def prepare_list(self, run_id: str) -> Operation:
        config = self._config(run_id)

        async def listing() -> list[Any]:
            return [item async for item in self.saver.alist(config, limit=100)]

        return listing

    async def held(self, run_id: str) -> int:
        return len([item async for item in self.saver.alist(self._config(run_id))])


@dataclass
class LangGraphSubject:
    kind: str
    """``memory`` (InMemorySaver) or ``sqlite`` (AsyncSqliteSaver on a file, WAL mode)."""
    scratch: str
    system: str = "langgraph"
    label: str = ""

    def __post_init__(self) -> None:
        names = {"memory": "InMemorySaver", "sqlite": "AsyncSqliteSaver"}
        self.label = f"LangGraph {names[self.kind]}"

    @contextlib.asynccontextmanager
    async def session(self, keep: int | None) -> AsyncIterator[_LangGraphDriver]:
        if self.kind == "memory":
            from langgraph.checkpoint.memory import InMemorySaver

            yield _LangGraphDriver(InMemorySaver())
            return
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

        path = os.path.join(self.scratch, f"langgraph-{secrets.token_hex(4)}.sqlite")
        try:
            async with AsyncSqliteSaver.from_conn_string(path) as saver:
                await saver.setup()
                yield _LangGraphDriver(saver)
        finally:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path + suffix)


def comparison_subjects(scratch: str) -> tuple[list[Any], list[str]]:
    """The comparison subjects whose packages import, and a note for each that does not."""
    subjects: list[Any] = []
    notes: list[str] = []
    try:
        import fastagentic.checkpoint  # noqa: F401
    except ImportError as exc:
        notes.append(f"FastAgentic skipped: cannot import it ({exc}); run: {INSTALL_HINT}")
    else:
        subjects += [FastAgenticSubject("memory", scratch), FastAgenticSubject("file", scratch)]
    try:
        import langgraph.checkpoint.memory
    except ImportError as exc:
        notes.append(f"LangGraph InMemorySaver skipped: cannot import it ({exc}); "
                     f"run: {INSTALL_HINT}")
    else:
        subjects.append(LangGraphSubject("memory", scratch))
    try:
        import aiosqlite  # noqa: F401
        import langgraph.checkpoint.sqlite.aio  # noqa: F401
    except ImportError as exc:
        notes.append(f"LangGraph AsyncSqliteSaver skipped: cannot import it ({exc}); "
                     f"run: {INSTALL_HINT}")
    else:
        subjects.append(LangGraphSubject("sqlite", scratch))
    return subjects, notes
