"""Bad input, concurrency and lifecycle edge cases found in review: each once broke something."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

from fastcheckpoint import (
    Checkpoint,
    CheckpointConfig,
    CheckpointManager,
    CheckpointMetadata,
    ConfigurationError,
    MemoryStore,
    SerializationError,
    ValidationError,
)
from fastcheckpoint._codec import Codec
from fastcheckpoint.testing import key_of, make_checkpoint, make_run
from tests._helpers import STORE_KINDS, T0, FakeClock, make_config, make_store

pytestmark = pytest.mark.anyio


@pytest.fixture(params=STORE_KINDS)
def manager(request: pytest.FixtureRequest, tmp_path: Path) -> CheckpointManager:
    return CheckpointManager(make_store(request.param, tmp_path), make_config(FakeClock()))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ttl_seconds": 10**400}, "ttl_seconds"),
        ({"ttl_seconds": 1e-12}, "ttl_seconds"),
        ({"ttl_seconds": math.inf}, "ttl_seconds"),
        ({"step_name": "\ud800"}, "step_name"),
        ({"tags": ["ok", "\ud800"]}, "tags"),
    ],
)
async def test_bad_create_arguments_raise_validation_error_and_write_nothing(
    manager: CheckpointManager, kwargs: dict[str, Any], field: str
) -> None:
    with anyio.fail_after(10):
        with pytest.raises(ValidationError, match=field.rstrip("s")):
            await manager.create("run", {"a": 1}, **kwargs)
        assert await manager.get_run("run") is None


@pytest.mark.parametrize(
    ("state", "path"),
    [
        ({"a": "\ud800"}, "state['a']"),
        ({"ok": [1, {"\ud800": 1}]}, "state['ok'][1] key '\\ud800'"),
    ],
)
async def test_lone_surrogates_in_state_name_their_path(
    manager: CheckpointManager, state: dict[str, Any], path: str
) -> None:
    with anyio.fail_after(10):
        with pytest.raises(SerializationError) as caught:
            await manager.create("run", state)
        assert caught.value.path == path
        assert await manager.get_run("run") is None


async def test_list_runs_rejects_a_cursor_that_is_not_a_string(manager: CheckpointManager) -> None:
    with anyio.fail_after(10):
        await manager.create("run", {})
        with pytest.raises(ValidationError, match="cursor"):
            await manager.list_runs(cursor=123)  # type: ignore[arg-type]


@pytest.mark.parametrize("store", ["memory://", None, object()])
def test_manager_rejects_something_that_is_not_a_store(store: object) -> None:
    with pytest.raises(ConfigurationError, match="CheckpointStore"):
        CheckpointManager(store)  # type: ignore[arg-type]


def test_manager_rejects_a_config_that_is_not_a_checkpoint_config() -> None:
    with pytest.raises(ConfigurationError, match="CheckpointConfig"):
        CheckpointManager(MemoryStore(), config={"max_checkpoints_per_run": 5})  # type: ignore[arg-type]


async def test_before_from_a_deleted_incarnation_lists_nothing(manager: CheckpointManager) -> None:
    with anyio.fail_after(10):
        old = [await manager.create("run", {"i": i}) for i in range(3)]
        await manager.delete_run("run")
        for i in range(5):
            await manager.create("run", {"i": i})
        assert old[2] is not None
        assert await manager.list_checkpoints("run", before=old[2].checkpoint_id) == []


async def test_a_limit_lowered_below_one_after_construction_keeps_everything(
    manager: CheckpointManager,
) -> None:
    with anyio.fail_after(10):
        manager.config.max_checkpoints_per_run = -1  # FastAgentic: <= 0 means unlimited
        for i in range(5):
            await manager.create("run", {"i": i})
        assert [m.sequence for m in await manager.list_checkpoints("run")] == [4, 3, 2, 1, 0]


async def test_memory_store_rejects_a_negative_keep_latest_before_changing_anything() -> None:
    store = MemoryStore()
    run = make_run("run")
    key = key_of(run)
    with anyio.fail_after(10):
        await store.append(key, make_checkpoint(run, 0), run=run, keep_latest=None, now=T0)
        before = await store.get_run(key, now=T0)
        with pytest.raises(ValidationError, match="keep_latest"):
            await store.append(key, make_checkpoint(run, 1), run=run, keep_latest=-1, now=T0)
        assert await store.get_run(key, now=T0) == before


def test_encoding_from_many_threads_at_once_never_reports_a_false_cycle() -> None:
    codec = Codec()
    shared = {"history": [("tool", i) for i in range(2_000)]}  # tuples take the slow path
    errors: list[BaseException] = []

    def encode() -> None:
        try:
            for _ in range(5):
                codec.encode_payload(shared, [], [], {})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=encode) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []


async def test_cleanup_loop_can_be_started_and_stopped_from_different_tasks() -> None:
    clock = FakeClock()
    manager = CheckpointManager(MemoryStore(), make_config(clock, cleanup_interval=0.01))
    with anyio.fail_after(10):
        await manager.create("run", {}, ttl_seconds=1)
        clock.advance(5)
        async with anyio.create_task_group() as group:
            group.start_soon(manager.start)  # this task ends; the loop keeps running
        while await manager.list_checkpoints("run", include_expired=True):  # noqa: ASYNC110
            await anyio.sleep(0.01)
        async with anyio.create_task_group() as group:
            group.start_soon(manager.stop)
        assert await manager.store.purge_expired(now=clock(), limit=10) == (0, True)


async def test_stop_waits_for_the_loop_even_inside_a_cancelled_scope() -> None:
    stopped = anyio.Event()

    class Store(MemoryStore):
        async def purge_expired(self, *, now: float, limit: int) -> tuple[int, bool]:
            try:
                await anyio.sleep_forever()
            finally:
                stopped.set()
            return 0, True  # pragma: no cover

    manager = CheckpointManager(Store(), CheckpointConfig(cleanup_interval=0.01))
    with anyio.fail_after(10):
        await manager.start()
        await anyio.sleep(0.05)
        with anyio.CancelScope() as scope:
            scope.cancel()
            await manager.stop()
        assert stopped.is_set()
        await manager.stop()  # a second stop is harmless


def test_metadata_from_dict_validates_types() -> None:
    with pytest.raises(ValidationError):
        CheckpointMetadata.from_dict({"run_id": "r", "ttl_seconds": "60"})
    with pytest.raises(ValidationError):
        CheckpointMetadata.from_dict({"run_id": "r", "status": "bogus"})
    with pytest.raises(ValidationError):
        Checkpoint.from_dict({"metadata": {"run_id": "r"}, "state": [1, 2]})
    metadata = CheckpointMetadata.from_dict({"run_id": "r", "created_at": 10, "ttl_seconds": 5})
    assert metadata.expires_at == 15.0
    assert metadata.is_expired_at(15.0)
    assert not metadata.is_expired_at(14.9)


def test_a_lone_surrogate_or_no_text_is_a_typed_error_from_the_model() -> None:
    """msgspec fails while quoting a lone surrogate in its own message, and refuses ``None``
    with ``TypeError``: both reach the caller as the library's errors."""
    with pytest.raises(ValidationError, match="unicode"):
        CheckpointMetadata.from_dict({"run_id": "r", "sequence": "\udcff"})
    with pytest.raises(ValidationError, match="unicode"):
        Checkpoint.from_dict({"metadata": {"run_id": "r", "status": "\udcff"}})
    with pytest.raises(SerializationError, match="unicode"):
        Checkpoint.from_json("\udcff")
    bad: Any = None
    with pytest.raises(SerializationError, match="NoneType"):
        Checkpoint.from_json(bad)
