"""Helpers shared by the manager, codec, config, lifecycle and model-checking tests.

A movable clock (never sleep to wait for expiry), one way to build each bundled store, a
config with quick retries, and a store wrapper that forwards every call so a test can
override one method to inject a fault.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from fastcheckpoint import (
    CheckpointConfig,
    CheckpointStore,
    FileStore,
    MemoryStore,
    RetryPolicy,
)
from fastcheckpoint.stores import CheckpointHeader, Item, RunRecord, StoredCheckpoint

STORE_KINDS = ("memory", "file")

T0 = 1_700_000_000.0
"""Where every fake clock starts (epoch seconds, November 2023)."""

QUICK_RETRY = RetryPolicy(base_delay=0.001, max_delay=0.005, max_retries=5)
"""Backoff small enough that a lost race never eats a test's deadline."""


class FakeClock:
    """The manager's clock, moved by hand: ``clock.advance(10)`` is ten seconds later."""

    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def count_hops(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """A list that gets each worker-thread hop (``anyio.to_thread.run_sync``) from now on."""
    hops: list[object] = []
    real = anyio.to_thread.run_sync

    async def counting(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        hops.append(func)
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    return hops


def make_store(kind: str, path: Path, *, fsync: bool = True) -> CheckpointStore:
    """A fresh store of ``kind``; for ``file`` a store over ``path`` (created if missing)."""
    if kind == "memory":
        return MemoryStore()
    if kind == "file":
        return FileStore(path, fsync=fsync)
    raise AssertionError(f"unknown store kind {kind!r}")


def make_config(clock: FakeClock, **overrides: Any) -> CheckpointConfig:
    """A config on the fake clock with quick retries; ``overrides`` set any other field."""
    settings: dict[str, Any] = {"clock": clock, "retry": QUICK_RETRY}
    settings.update(overrides)
    return CheckpointConfig(**settings)


class ForwardingStore:
    """Forwards every protocol method to ``inner``; subclass and override one to inject faults."""

    def __init__(self, inner: CheckpointStore) -> None:
        self.inner = inner

    async def append(
        self,
        run_key: str,
        record: StoredCheckpoint,
        *,
        run: RunRecord,
        keep_latest: int | None,
        now: float,
    ) -> str:
        return await self.inner.append(run_key, record, run=run, keep_latest=keep_latest, now=now)

    async def get(
        self, run_key: str, sequence: int, *, now: float
    ) -> tuple[StoredCheckpoint, str] | None:
        return await self.inner.get(run_key, sequence, now=now)

    async def latest(self, run_key: str, *, now: float) -> tuple[StoredCheckpoint, str] | None:
        return await self.inner.latest(run_key, now=now)

    async def headers(
        self,
        run_key: str,
        *,
        before: int | None,
        limit: int,
        now: float,
        include_expired: bool = False,
    ) -> tuple[list[CheckpointHeader], str | None]:
        return await self.inner.headers(
            run_key, before=before, limit=limit, now=now, include_expired=include_expired
        )

    async def delete(self, run_key: str, sequence: int, *, checkpoint_id: str) -> bool:
        return await self.inner.delete(run_key, sequence, checkpoint_id=checkpoint_id)

    async def delete_run(self, run_key: str) -> int:
        return await self.inner.delete_run(run_key)

    async def get_run(self, run_key: str, *, now: float) -> RunRecord | None:
        return await self.inner.get_run(run_key, now=now)

    async def update_run(
        self,
        run_key: str,
        *,
        incarnation: str,
        version: int,
        status: str,
        data: bytes,
        now: float,
    ) -> RunRecord:
        return await self.inner.update_run(
            run_key, incarnation=incarnation, version=version, status=status, data=data, now=now
        )

    async def list_runs(
        self, *, status: str | None, limit: int, cursor: str | None, now: float
    ) -> tuple[list[RunRecord], str | None]:
        return await self.inner.list_runs(status=status, limit=limit, cursor=cursor, now=now)

    async def count_runs(self, *, status: str | None, now: float) -> int:
        return await self.inner.count_runs(status=status, now=now)

    async def put_items(
        self, run_key: str, items: Sequence[Item], *, create_only: bool = False, now: float
    ) -> None:
        await self.inner.put_items(run_key, items, create_only=create_only, now=now)

    async def get_items(self, run_key: str, keys: Sequence[str], *, now: float) -> dict[str, bytes]:
        return await self.inner.get_items(run_key, keys, now=now)

    async def scan_items(
        self,
        run_key: str,
        *,
        prefix: str = "",
        start_after: str | None = None,
        limit: int = 100,
        reverse: bool = False,
        now: float,
    ) -> list[tuple[str, bytes]]:
        return await self.inner.scan_items(
            run_key, prefix=prefix, start_after=start_after, limit=limit, reverse=reverse, now=now
        )

    async def delete_items(self, run_key: str, keys: Sequence[str]) -> int:
        return await self.inner.delete_items(run_key, keys)

    async def purge_expired(self, *, now: float, limit: int) -> tuple[int, bool]:
        return await self.inner.purge_expired(now=now, limit=limit)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def acks_until_killed(
    command: Sequence[str], env: Mapping[str, str], log: Path, delay: float
) -> list[int]:
    """Start a worker that prints each acknowledged sequence on a line of its own, SIGKILL it
    ``delay`` seconds after its first acknowledgement, and return what it acknowledged (its
    stderr goes to ``log``)."""
    output = bytearray()
    with log.open("wb") as stderr:
        process = await anyio.open_process(list(command), env=dict(env), stderr=stderr)
        async with process:
            assert process.stdout is not None

            async def pump() -> None:
                assert process.stdout is not None
                async for chunk in process.stdout:
                    output.extend(chunk)

            async with anyio.create_task_group() as group:
                group.start_soon(pump)
                while b"\n" not in output:
                    assert process.returncode is None, "worker died; see its stderr in " + str(log)
                    await anyio.sleep(0.01)
                await anyio.sleep(delay)
                process.kill()
                assert await process.wait() == -9
    complete = output[: output.rfind(b"\n") + 1]  # a line cut by the kill is no acknowledgement
    return [int(line) for line in complete.split()]


async def acks_of_workers(
    commands: Mapping[str, Sequence[str]], env: Mapping[str, str]
) -> dict[int, str]:
    """Run the workers together to their end; which worker acknowledged each sequence (each
    prints its sequences one per line). A sequence acknowledged twice fails the test."""
    outputs: dict[str, bytes] = {}

    async def run_worker(name: str) -> None:
        done = await anyio.run_process(list(commands[name]), env=dict(env))
        outputs[name] = done.stdout

    async with anyio.create_task_group() as group:
        for name in commands:
            group.start_soon(run_worker, name)
    acknowledged = {
        int(line): name for name, out in outputs.items() for line in out.decode().split()
    }
    assert sum(len(out.split()) for out in outputs.values()) == len(acknowledged)
    return acknowledged


async def cancelled_after(call: Awaitable[Any], turns: int) -> str:
    """Start ``call``, let the event loop turn ``turns`` times, cancel it (asyncio's own
    cancellation), and say how it ended: ``"returned"`` or ``"cancelled"``."""
    running = asyncio.ensure_future(call)
    for _ in range(turns):
        await asyncio.sleep(0)
    running.cancel()
    try:
        await running
    except asyncio.CancelledError:
        return "cancelled"
    return "returned"


def completed_at_once(call: Coroutine[Any, Any, Any], what: str = "the call") -> Any:
    """What ``call`` returns when its first step ends it (it never suspends); else it is
    closed and ``AssertionError`` names ``what``."""
    try:
        call.send(None)
    except StopIteration as done:
        return done.value
    call.close()
    raise AssertionError(f"{what} suspended")
