"""FastAgentic's checkpoint documentation, run on fastcheckpoint with only its imports changed.

The examples come from fastagentic 1.2.2 (MIT, Neul Labs): every code block of its
"Distributed Checkpointing" page (``docs/checkpoint.md``) and the examples in the docstrings of
``fastagentic.checkpoint`` (``CheckpointManager``, ``RedisCheckpointStore``,
``S3CheckpointStore``), one test each, in the page's order. Each asserts what FastAgentic's docs
say, or, where they say nothing, what FastAgentic 1.2.2 does. The lines between the ``# --``
rulers are FastAgentic's, with these changes only:

- imports: ``fastagentic`` and ``fastagentic.checkpoint`` become ``fastcheckpoint``;
- the store an example builds is the ``store`` fixture: the same code runs on
  ``InMemoryCheckpointStore()``, on ``FileCheckpointStore`` in a scratch directory (not
  ``/var/lib/...``) and on ``RedisCheckpointStore`` on the test server, under a prefix of its own;
- placeholders (``...``, ``checkpoint_id``, ``Request``, ``process_step``) get concrete values.

What FastAgentic 1.2.2 does and fastcheckpoint does differently on purpose is listed in
docs/migrating-from-fastagentic.md; the assertions below marked "differs" check that list.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from fastcheckpoint import (
    Checkpoint,
    CheckpointConfig,
    CheckpointManager,
    CheckpointMetadata,
    CheckpointStatus,
    CheckpointStore,
    FileCheckpointStore,
    InMemoryCheckpointStore,
)
from tests.stores._moto import REGION, moto_endpoint, unique_name  # noqa: F401
from tests.stores._redis_support import delete_prefix, unique_prefix
from tests.stores.conftest import RedisTarget, redis_target  # noqa: F401

DEADLINE = 20.0
STORES = ["memory", "file", "redis"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # FastAgentic's documentation is asyncio code


@pytest.fixture
def redis_for_docs(request: pytest.FixtureRequest) -> Iterator[tuple[Any, str]]:
    """A redis.asyncio client on the test server and a key prefix this test alone uses."""
    import redis.asyncio as redis

    target: RedisTarget = request.getfixturevalue("redis_target")
    if target.kind == "fakeredis":
        pytest.skip("no redis-server here: FastAgentic's Redis examples need a real one")
    prefix = unique_prefix(target)
    yield redis.Redis.from_url(target.url), prefix
    anyio.run(_drop_keys, target.url, prefix)


async def _drop_keys(url: str, prefix: str) -> None:
    import redis.asyncio as redis

    with anyio.fail_after(DEADLINE):
        client = redis.Redis.from_url(url)
        await delete_prefix(client, prefix)
        await client.aclose()


def make_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> CheckpointStore:
    if kind == "memory":
        return InMemoryCheckpointStore()
    if kind == "file":
        return FileCheckpointStore(tmp_path / "checkpoints")
    from fastcheckpoint import RedisCheckpointStore

    client, prefix = request.getfixturevalue("redis_for_docs")
    return RedisCheckpointStore(client, prefix=prefix)


@pytest.fixture(params=STORES)
async def store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[CheckpointStore]:
    made = make_store(request.param, tmp_path, request)
    yield made
    with anyio.fail_after(DEADLINE):
        await made.aclose()
        client = getattr(made, "_client", None)
        if client is not None:
            await client.aclose()  # RedisCheckpointStore never closes the client it was given


# -- Quick Start --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_quick_start(store: CheckpointStore) -> None:
    with anyio.fail_after(DEADLINE):
        # --
        manager = CheckpointManager(
            store,
            config=CheckpointConfig(
                auto_checkpoint=True,
                max_checkpoints_per_run=10,
            ),
        )

        # Create a checkpoint
        checkpoint = await manager.create(
            run_id="run-123",
            state={"step": 1, "data": {"key": "value"}},
            messages=[
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi there!"},
            ],
            step_name="processing",
        )

        # Restore latest checkpoint
        checkpoint = await manager.restore("run-123")
        if checkpoint:
            state = checkpoint.state
            messages = checkpoint.messages
        # --
        checkpoint_id = checkpoint.checkpoint_id
        # --
        # Or restore specific checkpoint
        checkpoint = await manager.restore_from(checkpoint_id)
        # --

    assert state == {"step": 1, "data": {"key": "value"}}
    assert messages == [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there!"},
    ]
    assert checkpoint is not None
    assert checkpoint.checkpoint_id == checkpoint_id
    assert checkpoint.metadata.step_name == "processing"
    assert checkpoint.metadata.sequence == 0


@pytest.mark.anyio
async def test_checkpoint_manager_docstring(store: CheckpointStore) -> None:
    with anyio.fail_after(DEADLINE):
        # --
        manager = CheckpointManager(store)

        # Create checkpoint
        checkpoint = await manager.create(
            run_id="run-123",
            state={"step": "processing"},
            messages=[{"role": "user", "content": "Hello"}],
        )

        # Restore from checkpoint
        checkpoint = await manager.restore("run-123")
        if checkpoint:
            state = checkpoint.state
            messages = checkpoint.messages
        # --
        checkpoint_id = checkpoint.checkpoint_id
        # --

        # Or restore from specific checkpoint
        checkpoint = await manager.restore_from(checkpoint_id)
        # --

    assert (state, messages) == ({"step": "processing"}, [{"role": "user", "content": "Hello"}])
    assert checkpoint is not None
    assert checkpoint.state == {"step": "processing"}


# -- Checkpoint Structure -----------------------------------------------------------------------


def test_checkpoint_structure(capsys: pytest.CaptureFixture[str]) -> None:
    # FastAgentic's page uses CheckpointStatus without importing it (it lives in
    # fastagentic.checkpoint.base); fastcheckpoint exports it.
    # --
    # Checkpoint contains:
    checkpoint = Checkpoint(
        metadata=CheckpointMetadata(
            run_id="run-123",
            checkpoint_id="ckpt-abc123",
            sequence=5,
            status=CheckpointStatus.ACTIVE,
            step_name="processing",
            tags=["important"],
            ttl_seconds=3600,
        ),
        state={"step": 5, "progress": 0.5},
        messages=[{"role": "user", "content": "Hello"}],  # Conversation history
        tool_calls=[{"name": "search", "args": {"q": "x"}}],  # Tool calls made
        context={"user_id": "user-456"},  # Additional context
    )

    # Access properties
    print(checkpoint.checkpoint_id)
    print(checkpoint.run_id)
    print(checkpoint.metadata.sequence)
    print(checkpoint.metadata.is_expired)
    # --

    assert capsys.readouterr().out.splitlines() == ["ckpt-abc123", "run-123", "5", "False"]


def test_checkpoint_status_values() -> None:
    # The page shows the enum's definition; FastAgentic code compares and stores its values.
    assert CheckpointStatus.ACTIVE == "active"
    assert CheckpointStatus.COMPLETED == "completed"
    assert CheckpointStatus.FAILED == "failed"
    assert CheckpointStatus.EXPIRED == "expired"
    assert CheckpointStatus("completed") is CheckpointStatus.COMPLETED


# -- Checkpoint Manager: creating, restoring, managing ------------------------------------------


@pytest.mark.anyio
async def test_creating_checkpoints(store: CheckpointStore) -> None:
    with anyio.fail_after(DEADLINE):
        # --
        manager = CheckpointManager(store, config=CheckpointConfig(
            auto_checkpoint=True,
            checkpoint_interval=5.0,      # Min seconds between auto-checkpoints
            max_checkpoints_per_run=100,
            default_ttl_seconds=86400,    # 24 hours
        ))

        # Basic checkpoint
        checkpoint = await manager.create(
            run_id="run-123",
            state={"step": 1},
        )

        # Full checkpoint
        checkpoint = await manager.create(
            run_id="run-123",
            state={"step": 2, "data": {"rows": 3}},
            messages=[{"role": "user", "content": "Find sources"}],
            tool_calls=[{"name": "search", "args": {"q": "sources"}}],
            context={"user_id": "user-456"},
            step_name="analysis",
            tags=["retry", "important"],
            ttl_seconds=3600,
            force=True,  # Bypass interval check
        )

        # With parent (for branching)
        child = await manager.create(
            run_id="run-123",
            state={"branch": "A"},
            parent_id=checkpoint.checkpoint_id,
        )
        # --
        restored = await manager.restore("run-123")

    meta = checkpoint.metadata
    assert (meta.sequence, meta.step_name, meta.tags) == (1, "analysis", ["retry", "important"])
    assert meta.ttl_seconds == 3600  # the create's own TTL wins over default_ttl_seconds
    assert checkpoint.context == {"user_id": "user-456"}
    # Within checkpoint_interval (5 s) of the last create and without force: skipped, as in
    # FastAgentic, which returns None here too.
    assert child is None
    assert restored is not None
    assert restored.checkpoint_id == checkpoint.checkpoint_id


@pytest.mark.anyio
async def test_creating_checkpoints_default_ttl(store: CheckpointStore) -> None:
    """``default_ttl_seconds=86400`` applies to the "Basic checkpoint" (no ttl_seconds)."""
    with anyio.fail_after(DEADLINE):
        manager = CheckpointManager(store, config=CheckpointConfig(default_ttl_seconds=86400))
        checkpoint = await manager.create(run_id="run-123", state={"step": 1})
    assert checkpoint is not None
    assert checkpoint.metadata.ttl_seconds == 86400


@pytest.mark.anyio
async def test_branching_with_parent_id(store: CheckpointStore) -> None:
    """The "With parent (for branching)" call on its own (no interval): the child records it."""
    with anyio.fail_after(DEADLINE):
        manager = CheckpointManager(store)
        checkpoint = await manager.create(run_id="run-123", state={"step": 1})
        second = await manager.create(run_id="run-123", state={"step": 2})
        child = await manager.create(
            run_id="run-123",
            state={"branch": "A"},
            parent_id=checkpoint.checkpoint_id,
        )
    assert child is not None
    assert child.metadata.parent_id == checkpoint.checkpoint_id
    assert second is not None
    assert child.metadata.sequence == second.metadata.sequence + 1


@pytest.mark.anyio
async def test_restoring_checkpoints(
    store: CheckpointStore, capsys: pytest.CaptureFixture[str]
) -> None:
    with anyio.fail_after(DEADLINE):
        manager = CheckpointManager(store)
        for step in ("plan", "search"):
            await manager.create(run_id="run-123", state={"step": step}, step_name=step)
        # --
        # Restore latest for a run
        checkpoint = await manager.restore("run-123")

        # Restore specific checkpoint
        checkpoint_abc = await manager.restore_from("ckpt-abc123")

        # List all checkpoints for a run
        checkpoints = await manager.list_checkpoints("run-123", limit=50)
        for meta in checkpoints:
            print(f"{meta.sequence}: {meta.step_name} ({meta.status})")
        # --

    assert checkpoint is not None
    assert checkpoint.state == {"step": "search"}
    assert checkpoint_abc is None  # an id no store holds is not found
    assert capsys.readouterr().out.splitlines() == ["1: search (active)", "0: plan (active)"]


@pytest.mark.anyio
async def test_managing_checkpoints(store: CheckpointStore) -> None:
    with anyio.fail_after(DEADLINE):
        manager = CheckpointManager(store)
        first = await manager.create(run_id="run-123", state={"step": 1})
        await manager.create(run_id="run-123", state={"step": 2})
        checkpoint_id = first.checkpoint_id
        # --
        # Delete a checkpoint
        await manager.delete(checkpoint_id)

        # Delete all checkpoints for a run
        count = await manager.delete_run("run-123")

        # Mark run as completed
        await manager.mark_completed("run-123")

        # Mark run as failed
        await manager.mark_failed("run-123", error="Something went wrong")
        # --
        gone = await manager.restore_from(checkpoint_id)

    assert gone is None
    assert count == 1  # the run's other checkpoint
    # The run was deleted: both marks find nothing (FastAgentic: no-ops; here they return None).
    assert await manager.get_run("run-123") is None


@pytest.mark.anyio
async def test_mark_completed_and_mark_failed_on_a_live_run(store: CheckpointStore) -> None:
    """The two marks of "Managing Checkpoints", each on a run that exists."""
    with anyio.fail_after(DEADLINE):
        manager = CheckpointManager(store)
        await manager.create(run_id="run-ok", state={"step": 1})
        await manager.create(run_id="run-bad", state={"step": 1})
        await manager.mark_completed("run-ok")
        await manager.mark_failed("run-bad", error="Something went wrong")
        ok, bad = await manager.restore("run-ok"), await manager.restore("run-bad")
        bad_run = await manager.get_run("run-bad")

    assert ok is not None
    assert ok.metadata.status is CheckpointStatus.COMPLETED
    assert bad is not None
    assert bad.metadata.status is CheckpointStatus.FAILED
    # differs: FastAgentic writes the error into the latest checkpoint's context["error"];
    # here it is on the run.
    assert bad_run is not None
    assert bad_run.error == "Something went wrong"
    assert bad.context == {}


# -- Storage Backends ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_in_memory_store() -> None:
    with anyio.fail_after(DEADLINE):
        # --
        store = InMemoryCheckpointStore()
        manager = CheckpointManager(store)
        # --
        await manager.create(run_id="run-123", state={"step": 1})
        assert (await manager.restore("run-123")).state == {"step": 1}


@pytest.mark.anyio
async def test_file_store(tmp_path: Path) -> None:
    base_path = tmp_path / "var/lib/fastagentic/checkpoints"  # the page: "/var/lib/..."
    with anyio.fail_after(DEADLINE):
        # --
        store = FileCheckpointStore(base_path)
        manager = CheckpointManager(store)
        # --
        await manager.create(run_id="run-123", state={"step": 1})
        again = CheckpointManager(FileCheckpointStore(base_path))  # another process, say
        restored = await again.restore("run-123")
    assert restored is not None
    assert restored.state == {"step": 1}
    # differs: the layout is not run-123/ckpt-<id>.json (see the file store page).
    assert not (base_path / "run-123").exists()


def redis_host_port(target: RedisTarget) -> tuple[str, int]:
    if target.kind == "fakeredis":
        pytest.skip("no redis-server here: FastAgentic's Redis examples need a real one")
    host, port = target.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    return host, int(port)


async def checkpoint_pttl(client: Any, checkpoint: Checkpoint) -> int:
    """Milliseconds the checkpoint's key has left, under the page's prefix."""
    run_key, sequence = checkpoint.checkpoint_id.split("-")[1], checkpoint.metadata.sequence
    ttl: int = await client.pttl(f"fastagentic:checkpoint:{{{run_key}}}:c:{sequence}")
    return ttl


@pytest.mark.anyio
async def test_redis_store(redis_target: RedisTarget) -> None:  # noqa: F811
    host, port = redis_host_port(redis_target)
    run_id = f"run-{unique_prefix(redis_target)}"  # the page's prefix is shared: a run of our own
    with anyio.fail_after(DEADLINE):
        # --
        import redis.asyncio as redis

        from fastcheckpoint import RedisCheckpointStore

        client = redis.Redis(host=host, port=port)  # the page: host="localhost", port=6379
        store = RedisCheckpointStore(
            client,
            prefix="fastagentic:checkpoint:",
            ttl_seconds=86400,  # 24 hours
        )
        manager = CheckpointManager(store)
        # --
        try:
            created = await manager.create(run_id=run_id, state={"step": 1})
            restored = await manager.restore(run_id)
            ttl_ms = await checkpoint_pttl(client, created)
        finally:
            await manager.delete_run(run_id)
            await client.aclose()
    assert restored is not None
    assert restored.state == {"step": 1}
    # "ttl_seconds: Default TTL for Redis keys": a checkpoint created without a TTL expires.
    assert created.metadata.ttl_seconds == 86400
    assert 86000 * 1000 < ttl_ms <= 86400 * 1000


@pytest.mark.anyio
async def test_redis_store_docstring(redis_target: RedisTarget) -> None:  # noqa: F811
    host, port = redis_host_port(redis_target)
    run_id = f"run-{unique_prefix(redis_target)}"
    with anyio.fail_after(DEADLINE):
        # --
        import redis.asyncio as redis

        from fastcheckpoint import RedisCheckpointStore

        client = redis.Redis(host=host, port=port)  # the docstring: "localhost", 6379
        store = RedisCheckpointStore(client)
        # --
        try:
            created = await CheckpointManager(store).create(run_id=run_id, state={"step": 1})
            ttl_ms = await checkpoint_pttl(client, created)  # found under the default prefix
        finally:
            await CheckpointManager(store).delete_run(run_id)
            await client.aclose()
    assert ttl_ms == -1  # no ttl_seconds: the key never expires


@pytest.mark.anyio
async def test_s3_store(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The page's S3 example; aiobotocore's session stands in for ``aioboto3.Session()``: both
    give the same async S3 client, and aioboto3 is not a dependency of the tests."""
    from aiobotocore.session import get_session

    from fastcheckpoint import S3CheckpointStore

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    bucket = unique_name("fastagentic")
    with anyio.fail_after(DEADLINE):
        session = get_session()
        async with session.create_client("s3", region_name=REGION) as s3:
            await s3.create_bucket(Bucket=bucket)  # the page assumes the bucket exists
            # --
            store = S3CheckpointStore(
                s3,
                bucket=bucket,  # "my-checkpoints-bucket"
                prefix="checkpoints/",
            )
            manager = CheckpointManager(store)
            # --
            await manager.create(run_id="run-123", state={"step": 1})
            restored = await manager.restore("run-123")
            listed = await s3.list_objects_v2(Bucket=bucket)
    assert restored is not None
    assert restored.state == {"step": 1}
    assert all(item["Key"].startswith("checkpoints/") for item in listed["Contents"])


# -- Configuration, TTL and cleanup, serialization ----------------------------------------------


def test_configuration() -> None:
    # --
    config = CheckpointConfig(
        auto_checkpoint=True,           # Auto-checkpoint after each step
        checkpoint_interval=0.0,        # Min seconds between checkpoints
        max_checkpoints_per_run=100,    # Prune old checkpoints
        default_ttl_seconds=None,       # Default TTL (None = no expiry)
        cleanup_interval=300.0,         # Cleanup expired every 5 minutes
    )
    # --
    defaults = CheckpointConfig()
    for name in ("auto_checkpoint", "checkpoint_interval", "max_checkpoints_per_run",
                 "default_ttl_seconds", "cleanup_interval"):
        assert getattr(config, name) == getattr(defaults, name), name


@pytest.mark.anyio
async def test_ttl_and_cleanup(store: CheckpointStore, capsys: pytest.CaptureFixture[str]) -> None:
    with anyio.fail_after(DEADLINE):
        # Two hours ago, by the manager's clock: that checkpoint's one-hour TTL has run out.
        past = CheckpointManager(store, config=CheckpointConfig(clock=lambda: time.time() - 7200))
        await past.create(run_id="run-old", state={"step": 0}, ttl_seconds=3600)
        manager = CheckpointManager(store)
        # --
        # Create checkpoint with TTL
        checkpoint = await manager.create(
            run_id="run-123",
            state={"step": 1},
            ttl_seconds=3600,  # Expires in 1 hour
        )

        # Check if expired
        if checkpoint.metadata.is_expired:
            print("Checkpoint has expired")

        # Manual cleanup
        count = await store.cleanup_expired()
        print(f"Cleaned up {count} expired checkpoints")

        # Automatic cleanup (when manager started)
        await manager.start()  # Starts cleanup loop
        # ... run application ...
        await manager.stop()
        # --
        old = await manager.list_checkpoints("run-old", include_expired=True)
        fresh = await manager.restore("run-123")

    assert capsys.readouterr().out.splitlines() == ["Cleaned up 1 expired checkpoints"]
    assert old == []
    assert fresh is not None
    assert fresh.checkpoint_id == checkpoint.checkpoint_id


@pytest.mark.anyio
async def test_serialization(store: CheckpointStore) -> None:
    with anyio.fail_after(DEADLINE):
        manager = CheckpointManager(store)
        checkpoint = await manager.create(
            run_id="run-123", state={"step": 1}, messages=[{"role": "user", "content": "Hi"}],
            tags=["a"], ttl_seconds=60,
        )
    original = checkpoint
    # --
    # To JSON
    json_str = checkpoint.to_json()

    # From JSON
    checkpoint = Checkpoint.from_json(json_str)

    # To dict
    data = checkpoint.to_dict()

    # From dict
    checkpoint = Checkpoint.from_dict(data)
    # --
    assert checkpoint == original
    assert json.loads(json_str)["metadata"]["checkpoint_id"] == original.checkpoint_id


# -- Integration with Agent Runs ----------------------------------------------------------------


class StepFailed(Exception):
    pass


def agent_module(store: CheckpointStore, fail_at: set[int]) -> SimpleNamespace:
    """The page's module: a module-level manager and the endpoint's function.

    ``fastagentic.App`` and ``agent_endpoint`` serve it over HTTP; here it is called directly.
    ``process_step`` fails once at each step in ``fail_at``, like a flaky tool call.
    """
    calls: list[int] = []

    async def process_step(step: int, state: dict[str, Any]) -> Any:
        calls.append(step)
        if step in fail_at:
            fail_at.discard(step)
            raise StepFailed(f"tool call failed at step {step}")
        return SimpleNamespace(message={"role": "assistant", "content": f"step {step} done"})

    # --
    checkpoints = CheckpointManager(store)

    async def run_agent(request: Any) -> Any:
        run_id = request.run_id

        # Try to resume from checkpoint
        checkpoint = await checkpoints.restore(run_id)
        if checkpoint:
            state = checkpoint.state
            messages = checkpoint.messages
            start_step = state.get("step", 0)
        else:
            state = {}
            messages = []
            start_step = 0

        try:
            for step in range(start_step, 10):
                # Do work
                result = await process_step(step, state)
                state["step"] = step + 1
                messages.append(result.message)

                # Checkpoint progress
                await checkpoints.create(
                    run_id=run_id,
                    state=state,
                    messages=messages,
                    step_name=f"step_{step}",
                )

            # Mark complete
            await checkpoints.mark_completed(run_id)
            return {"status": "complete", "state": state}

        except Exception as e:
            await checkpoints.mark_failed(run_id, error=str(e))
            raise
    # --

    return SimpleNamespace(checkpoints=checkpoints, run_agent=run_agent, calls=calls)


async def first_attempt(module: SimpleNamespace, run_id: str) -> Any:
    """A request that fails part way; returns the run as the page's except branch left it."""
    with anyio.fail_after(DEADLINE):
        with pytest.raises(StepFailed):
            await module.run_agent(SimpleNamespace(run_id=run_id))
        return await module.checkpoints.get_run(run_id)


async def retry(module: SimpleNamespace, run_id: str) -> tuple[Any, Any, Any]:
    """The same request again: the result, then the run and its latest checkpoint."""
    with anyio.fail_after(DEADLINE):
        result = await module.run_agent(SimpleNamespace(run_id=run_id))
        run, latest = await module.checkpoints.get_run(run_id), await module.checkpoints.restore(
            run_id)
        return result, run, latest


async def close(manager: CheckpointManager) -> None:
    with anyio.fail_after(DEADLINE):
        await manager.aclose()
        client = getattr(manager.store, "_client", None)
        if client is not None:
            await client.aclose()


async def in_one_loop(module: SimpleNamespace, run_id: str) -> tuple[Any, Any, Any, Any]:
    failed = await first_attempt(module, run_id)
    result, run, latest = await retry(module, run_id)
    await close(module.checkpoints)
    return failed, result, run, latest


@pytest.mark.parametrize("kind", STORES)
def test_integration_with_agent_runs_retry_after_a_failure(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first attempt fails at step 4 and marks the run failed; the retry resumes at step 4,
    finishes and marks the run completed. With the memory and file stores each request runs in
    its own ``asyncio.run`` with the same module-level manager; a Redis client passed in
    belongs to one event loop (a server's), in FastAgentic as here."""
    monkeypatch.chdir(tmp_path)  # the page's FileCheckpointStore("./checkpoints")
    module = agent_module(make_store(kind, tmp_path, request), fail_at={4})

    if kind == "redis":
        failed, result, run, latest = asyncio.run(in_one_loop(module, "run-42"))
    else:
        failed = asyncio.run(first_attempt(module, "run-42"))
        result, run, latest = asyncio.run(retry(module, "run-42"))
        asyncio.run(close(module.checkpoints))

    assert failed.status is CheckpointStatus.FAILED
    assert failed.error == "tool call failed at step 4"
    assert result["status"] == "complete"
    assert result["state"] == {"step": 10}
    assert module.calls == [0, 1, 2, 3, 4, 4, 5, 6, 7, 8, 9]  # only the failed step runs twice
    assert run.status is CheckpointStatus.COMPLETED
    assert latest.metadata.sequence == 9
    assert len(latest.messages) == 10
