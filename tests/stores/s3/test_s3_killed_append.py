"""S3 store: a writer killed part way through an append with owned items (its process
dies: no request of the append is sent after that point, nothing is taken back). The
append was not acknowledged, so it may be found or not, but never half: another process
reads the checkpoint with every item it owns, or does not find it; so does the cleanup
loop leave it; and the run goes on (the next append is acknowledged and whole)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from fastcheckpoint.stores import _s3_io
from fastcheckpoint.stores.s3 import CREATION_GRACE_SECONDS, S3Store
from fastcheckpoint.testing import T0, key_of, make_item, make_run
from fastcheckpoint.testing._adapter import _append_items
from tests.stores._moto import moto_endpoint
from tests.stores.s3.test_s3 import DEADLINE
from tests.stores.s3.test_s3_sequence_guard import stores

__all__ = ["moto_endpoint", "stores"]

pytestmark = pytest.mark.anyio

_OWNED = ("o/a", "o/b")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


class _Killed(Exception):
    """The writer's process died: what it had not sent yet is never sent."""


def _kill_after(monkeypatch: pytest.MonkeyPatch, client: Any, writes: int) -> None:
    """Requests through ``client`` (the writer's): the first ``writes`` PUTs are sent, and
    every request after them raises :class:`_Killed` instead."""
    sent = [0]

    def wrap(name: str) -> None:
        original = getattr(_s3_io.Bucket, name)

        async def send(bucket: Any, *args: Any, **kwargs: Any) -> Any:
            if bucket.client is not client:
                return await original(bucket, *args, **kwargs)
            if sent[0] >= writes:
                raise _Killed
            sent[0] += name == "put"
            return await original(bucket, *args, **kwargs)

        monkeypatch.setattr(_s3_io.Bucket, name, send)

    for name in ("put", "get", "get_if_changed", "delete_if", "delete_listed", "list", "scan"):
        wrap(name)


async def _read(store: S3Store, run: Any, now: float) -> tuple[int, list[str]] | None:
    found = await store.read_with_items(key_of(run), sequence=None, now=now)
    return None if found is None else (found[0].sequence, sorted(found[2]))


@pytest.mark.parametrize("writes", [1, 2, 3, 4, 5])
async def test_a_writer_killed_during_an_append_leaves_it_whole_or_absent(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch, writes: int,
) -> None:
    writer, other = stores
    run = make_run("killed")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _append_items(writer, run, 0, refs=[], items=[make_item("o/0", owner=0)])
        _kill_after(monkeypatch, await writer.client(), writes)
        try:
            with pytest.raises(_Killed):
                await _append_items(writer, run, 1, refs=[],
                                    items=[make_item(name, owner=1) for name in _OWNED])
        finally:
            monkeypatch.undo()

        whole = (1, sorted(_OWNED))
        before = (0, ["o/0"])
        assert await _read(other, run, T0) in (whole, before)
        await other.purge_expired(now=T0 + 1 + CREATION_GRACE_SECONDS, limit=100)
        after_cleanup = await _read(other, run, T0 + 2 * CREATION_GRACE_SECONDS)
        assert after_cleanup in (whole, before)

        found = await other.get_run(key, now=T0 + 2 * CREATION_GRACE_SECONDS)
        assert found is not None
        sequence = found.latest_sequence + 1
        await _append_items(other, run, sequence, refs=[], items=[make_item("o/n", owner=sequence)])
        assert await _read(other, run, T0 + 2 * CREATION_GRACE_SECONDS) == (sequence, ["o/n"])


async def test_a_read_while_the_owned_items_are_written_finds_the_checkpoint_before(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another process reading between the owned items and the marker of an append (the
    create has not returned): the checkpoint before, never this one without its items."""
    writer, other = stores
    run = make_run("in-flight")
    seen: list[tuple[int, list[str]] | None] = []
    with anyio.fail_after(DEADLINE):
        await _append_items(writer, run, 0, refs=[], items=[make_item("o/0", owner=0)])
        put_owned = writer._put_owned

        async def read_meanwhile(*args: Any, **kwargs: Any) -> Any:
            seen.append(await _read(other, run, T0))
            written = await put_owned(*args, **kwargs)
            seen.append(await _read(other, run, T0))
            return written

        monkeypatch.setattr(writer, "_put_owned", read_meanwhile)
        await _append_items(writer, run, 1, refs=[],
                            items=[make_item(name, owner=1) for name in _OWNED])
        monkeypatch.undo()
        seen.append(await _read(other, run, T0))
        headers, _ = await other.headers(key_of(run), before=None, limit=10, now=T0)

    assert seen == [(0, ["o/0"]), (0, ["o/0"]), (1, sorted(_OWNED))]
    assert [header.sequence for header in headers] == [1, 0]
