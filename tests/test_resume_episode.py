"""A create resumes the FAILED episode its append saw, never a later one.

A create on a FAILED run writes its checkpoint, then makes the run ACTIVE again. Should other
workers have resumed the run and failed it again in between (another create, then
``mark_failed``), that newer failure is not the one this create saw: the run stays FAILED with
the newer error, and the create reports FAILED. A create that nobody overtakes still resumes
the run, at the cost it always had (its append, one run read, one status change).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from fastcheckpoint import CheckpointManager, CheckpointStatus, StoreError, _ids
from fastcheckpoint._codec import Codec, RunData, _unframe
from fastcheckpoint._manager import resumed_note
from fastcheckpoint.stores import CheckpointStore, StoredCheckpoint
from fastcheckpoint.stores.sqlite import SQLiteStore
from tests._helpers import T0, FakeClock, ForwardingStore, make_config, make_store

pytestmark = pytest.mark.anyio

RUN = "resume-episode"
ACTIVE, FAILED = CheckpointStatus.ACTIVE, CheckpointStatus.FAILED


@pytest.fixture(params=["memory", "file", "sqlite"])
async def inner(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[CheckpointStore]:
    store: CheckpointStore
    if request.param == "sqlite":
        store = SQLiteStore(tmp_path / "runs.sqlite")
    else:
        store = make_store(request.param, tmp_path / "store", fsync=False)
    yield store
    await store.aclose()


class _Interleaved(ForwardingStore):
    """Runs ``between`` once, right after the append (or right before the status change) of the
    create under test, as another worker would; counts the requests made."""

    def __init__(self, inner: CheckpointStore, when: str, between: Any) -> None:
        super().__init__(inner)
        self.when, self.between = when, between
        self.calls: Counter[str] = Counter()

    async def _interleave(self, at: str) -> None:
        if self.when == at and self.between is not None:
            between, self.between = self.between, None
            await between()

    async def append(self, run_key: str, record: StoredCheckpoint, **options: Any) -> str:
        self.calls["append"] += 1
        status = await self.inner.append(run_key, record, **options)
        await self._interleave("after the append")
        return status

    async def get_run(self, run_key: str, **options: Any) -> Any:
        self.calls["get_run"] += 1
        return await self.inner.get_run(run_key, **options)

    async def update_run(self, run_key: str, **options: Any) -> Any:
        self.calls["update_run"] += 1
        await self._interleave("before the status change")
        return await self.inner.update_run(run_key, **options)


class _NoStatusChange(ForwardingStore):
    """A worker whose store refuses status changes: its creates append and leave a FAILED run
    FAILED (the resume is given up and logged)."""

    async def update_run(self, run_key: str, **options: Any) -> Any:
        raise StoreError("status changes are down")


@pytest.mark.parametrize("when", ["after the append", "before the status change"])
async def test_a_late_resume_leaves_a_failure_it_never_saw(
    inner: CheckpointStore, when: str
) -> None:
    config = make_config(FakeClock())
    other = CheckpointManager(inner, config=config)  # workers B and C
    by_b: list[str] = []

    async def resume_and_fail_again() -> None:
        resumed = await other.create(RUN, {"by": "B"})
        assert resumed is not None
        assert resumed.metadata.status is ACTIVE
        by_b.append(resumed.checkpoint_id)
        await other.mark_failed(RUN, "E2")

    store = _Interleaved(inner, when, resume_and_fail_again)
    with anyio.fail_after(10):
        await other.create(RUN, {"step": 0})
        await other.mark_failed(RUN, "E1")
        late = await CheckpointManager(store, config=config).create(RUN, {"by": "A"})
        run = await other.get_run(RUN)

    assert len(by_b) == 1  # the other workers did act in between
    assert late is not None
    assert late.metadata.status is FAILED  # the run's status as it is now
    assert run is not None
    assert run.status is FAILED
    assert run.error == "E2"
    assert [change.status for change in run.history] == [FAILED, ACTIVE, FAILED]
    assert [change.note for change in run.history] == [
        "E1", resumed_note(by_b[0]), "E2"]
    assert all(late.checkpoint_id not in change.note for change in run.history)


async def test_a_create_nobody_overtakes_resumes_at_its_usual_cost(
    inner: CheckpointStore,
) -> None:
    store = _Interleaved(inner, "never", None)
    manager = CheckpointManager(store, config=make_config(FakeClock()))
    with anyio.fail_after(10):
        await manager.create(RUN, {"step": 0})
        await manager.mark_failed(RUN, "E1")
        store.calls.clear()
        resumed = await manager.create(RUN, {"step": 1})
        calls = dict(store.calls)
        run = await manager.get_run(RUN)

    assert resumed is not None
    assert resumed.metadata.status is ACTIVE
    assert run is not None
    assert run.status is ACTIVE
    assert run.error is None
    assert [change.note for change in run.history] == [
        "E1", resumed_note(resumed.checkpoint_id)]
    assert calls == {"append": 1, "get_run": 1, "update_run": 1}


async def test_a_run_failed_again_before_the_append_is_resumed(inner: CheckpointStore) -> None:
    """The episode a create saw is the newest one: runs that failed, resumed and failed
    again before it are resumed as the first failure was."""
    config = make_config(FakeClock())
    other = CheckpointManager(inner, config=config)
    with anyio.fail_after(10):
        await other.create(RUN, {"step": 0})
        await other.mark_failed(RUN, "E1")
        await other.create(RUN, {"step": 1})
        await other.mark_failed(RUN, "E2")
        resumed = await CheckpointManager(inner, config=config).create(RUN, {"step": 2})
        run = await other.get_run(RUN)

    assert resumed is not None
    assert resumed.metadata.status is ACTIVE
    assert run is not None
    assert run.status is ACTIVE
    assert [change.status for change in run.history] == [FAILED, ACTIVE, FAILED, ACTIVE]
    assert run.history[-1].note == resumed_note(resumed.checkpoint_id)


async def test_checkpoints_appended_meanwhile_do_not_stop_the_resume(
    inner: CheckpointStore,
) -> None:
    """Another create appending (without resuming) after this create's append leaves the
    FAILED episode as it was: this create still resumes it."""
    config = make_config(FakeClock())
    other = CheckpointManager(inner, config=config)
    appender = CheckpointManager(_NoStatusChange(inner), config=config)

    async def append_only() -> None:
        created = await appender.create(RUN, {"by": "B"})
        assert created is not None
        assert created.metadata.status is FAILED

    store = _Interleaved(inner, "after the append", append_only)
    with anyio.fail_after(10):
        await other.create(RUN, {"step": 0})
        await other.mark_failed(RUN, "E1")
        resumed = await CheckpointManager(store, config=config).create(RUN, {"by": "A"})
        run = await other.get_run(RUN)

    assert store.between is None
    assert resumed is not None
    assert resumed.metadata.status is ACTIVE
    assert run is not None
    assert run.status is ACTIVE
    assert run.latest_sequence == 2
    assert [change.note for change in run.history] == [
        "E1", resumed_note(resumed.checkpoint_id)]


class _UnmarkedRunData(msgspec.Struct, array_like=True):
    """Run details as written and read without ``failed_after``."""

    error: str | None = None
    approval: dict[str, Any] | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    history: list[tuple[str, float, str | None, str]] = msgspec.field(default_factory=list)


async def test_a_failure_recorded_without_its_mark_is_resumed(inner: CheckpointStore) -> None:
    """Details of a FAILED run without the episode's mark (as ``repair`` rebuilds them, or as
    written before the mark was kept) resume the run as before."""
    manager = CheckpointManager(inner, config=make_config(FakeClock()))
    key = _ids.key_of(RUN)
    unmarked = _UnmarkedRunData(error="E1", history=[(FAILED.value, T0, None, "E1")])
    with anyio.fail_after(10):
        await manager.create(RUN, {"step": 0})
        run = await inner.get_run(key, now=T0)
        assert run is not None
        await inner.update_run(
            key, incarnation=run.incarnation, version=run.version, status=FAILED.value,
            data=Codec().encode_run_data(unmarked), now=T0)  # type: ignore[arg-type]
        resumed = await manager.create(RUN, {"step": 1})
        after = await manager.get_run(RUN)

    assert resumed is not None
    assert resumed.metadata.status is ACTIVE
    assert after is not None
    assert after.status is ACTIVE
    assert [change.note for change in after.history] == [
        "E1", resumed_note(resumed.checkpoint_id)]


def test_readers_without_the_mark_read_the_details_of_a_failed_run() -> None:
    codec = Codec()
    written = codec.encode_run_data(
        RunData(error="E1", history=[(FAILED.value, T0, None, "E1")], failed_after=3))

    read = msgspec.msgpack.decode(_unframe(written, "run"), type=_UnmarkedRunData)

    assert codec.decode_run_data(written, "run").failed_after == 3
    assert read == _UnmarkedRunData(error="E1", history=[(FAILED.value, T0, None, "E1")])
