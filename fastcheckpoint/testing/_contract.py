"""What the contract suites share: :class:`ContractBase` and the helpers their tests call.

The suites test every clause of ``CheckpointStore``'s docstring, one concern per class
(``_append``, ``_read``, ``_delete``, ``_runs``, ``_items``, ``_purge``; ``_store`` combines
them), and the capabilities (``_adapter``, ``_repair``). The tests use only the public
protocol: no backend checks, no sleeps. Time moves by passing ``now``; expiry is checked at its
exact boundary (``expires_at == now`` is expired). Physical removal is checked by reading again
with an earlier ``now``, at which the record would be live.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, ClassVar

import anyio
import msgspec
import pytest

from fastcheckpoint.errors import ValidationError
from fastcheckpoint.stores._base import (
    CheckpointHeader,
    CheckpointStore,
    RunRecord,
    StoredCheckpoint,
)
from fastcheckpoint.testing._builders import T0, checkpoint_id_of, key_of, make_checkpoint

__all__ = ["ContractBase"]

_Snapshot = tuple[
    RunRecord | None,
    tuple[list[CheckpointHeader], str | None],
    tuple[StoredCheckpoint, str] | None,
    list[tuple[str, bytes]],
]


async def _append(
    store: CheckpointStore,
    run: RunRecord,
    sequence: int,
    *,
    now: float = T0,
    expires_at: float | None = None,
    keep_latest: int | None = None,
    header: bytes | None = None,
    payload: bytes | None = None,
) -> StoredCheckpoint:
    """Append checkpoint ``sequence`` of ``run`` created at ``now``; return what was appended."""
    record = make_checkpoint(
        run, sequence, created_at=now, expires_at=expires_at, header=header, payload=payload
    )
    # The seed of a new run carries its first checkpoint's expiry, as the manager's does.
    seed = msgspec.structs.replace(run, expires_at=expires_at)
    await store.append(key_of(run), record, run=seed, keep_latest=keep_latest, now=now)
    return record


async def _append_many(
    store: CheckpointStore,
    run: RunRecord,
    sequences: Sequence[int],
    *,
    now: float = T0,
    expires_at: float | None = None,
    keep_latest: int | None = None,
) -> list[StoredCheckpoint]:
    return [
        await _append(store, run, sequence, now=now, expires_at=expires_at, keep_latest=keep_latest)
        for sequence in sequences
    ]


async def _delete(store: CheckpointStore, run: RunRecord, sequence: int) -> bool:
    """Delete checkpoint ``sequence`` of ``run`` by its id, as the manager does."""
    return await store.delete(key_of(run), sequence, checkpoint_id=checkpoint_id_of(run, sequence))


async def _update(
    store: CheckpointStore,
    run: RunRecord,
    *,
    version: int,
    status: str,
    data: bytes = b"",
    now: float = T0,
) -> RunRecord:
    """Compare-and-set the status of ``run``'s incarnation, as the manager does."""
    return await store.update_run(
        key_of(run),
        incarnation=run.incarnation,
        version=version,
        status=status,
        data=data,
        now=now,
    )


async def _sequences(
    store: CheckpointStore, run: RunRecord, *, now: float, include_expired: bool = False
) -> list[int]:
    found, _ = await store.headers(
        key_of(run), before=None, limit=10_000, now=now, include_expired=include_expired
    )
    return [header.sequence for header in found]


async def _snapshot(store: CheckpointStore, run: RunRecord, *, now: float) -> _Snapshot:
    """Everything the protocol can see of one run at ``now``."""
    key = key_of(run)
    return (
        await store.get_run(key, now=now),
        await store.headers(key, before=None, limit=10_000, now=now, include_expired=True),
        await store.latest(key, now=now),
        await store.scan_items(key, limit=10_000, now=now),
    )


def _not_run_keys(key: str) -> list[Any]:
    """Values that are not run keys: a run id, keys with ``/``, empty, too long, other
    characters, values that are not ``str``; several are made from the live run's ``key``,
    so a store that built paths or prefixes from them would reach that run's records."""
    return [
        "run-abc123", "abc/c/0000", f"{key}/c/0000", f"{key}/", f"../{key}", "", "a" * 65,
        key.upper(), f"{key}\n", f" {key}", None, 42, key.encode(),
    ]


async def _refuses_not_run_keys(
    store: CheckpointStore,
    seed: RunRecord,
    call: Callable[[Any], Awaitable[object]],
    *,
    values: Sequence[Any] | None = None,
) -> None:
    """``await call(value)`` raises ``ValidationError`` for every value that is not a run key
    (:func:`_not_run_keys` of ``seed``'s key, unless ``values`` are given), and nothing
    changes: ``seed``'s run, the run listing and the count read as before."""
    async def everything() -> tuple[object, ...]:
        return (
            await _snapshot(store, seed, now=T0),
            await store.list_runs(status=None, limit=100, cursor=None, now=T0),
            await store.count_runs(status=None, now=T0),
        )

    values = _not_run_keys(key_of(seed)) if values is None else values
    before = await everything()
    refused: list[Any] = []
    for value in values:
        try:
            await call(value)
        except ValidationError:
            refused.append(value)
    assert refused == list(values)  # what is missing was taken as a run key
    assert await everything() == before


def _expected_run(
    seed: RunRecord,
    *,
    latest_sequence: int,
    checkpoint_count: int,
    updated_at: float,
    expires_at: float | None,
) -> RunRecord:
    return msgspec.structs.replace(
        seed,
        latest_sequence=latest_sequence,
        checkpoint_count=checkpoint_count,
        updated_at=updated_at,
        expires_at=expires_at,
    )


def _with_deadline(test: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    @functools.wraps(test)
    async def run_with_deadline(self: ContractBase, *args: Any, **kwargs: Any) -> None:
        with anyio.fail_after(self.deadline_seconds):
            await test(self, *args, **kwargs)

    run_with_deadline.__dict__["_contract_deadline"] = True
    return run_with_deadline


class ContractBase:
    """What every contract test class shares: the ``anyio`` mark, a deadline on every test,
    and the ``store`` fixture a subclass must provide."""

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.anyio]

    deadline_seconds: ClassVar[float] = 10.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in dir(cls):
            test = getattr(cls, name)
            if (
                name.startswith("test_")
                and inspect.iscoroutinefunction(test)
                and not test.__dict__.get("_contract_deadline", False)
            ):
                setattr(cls, name, _with_deadline(test))

    @pytest.fixture
    def store(self) -> AsyncIterator[CheckpointStore]:
        raise NotImplementedError(
            f"{type(self).__name__} must override the `store` fixture "
            "(an async generator yielding a fresh store and closing it)"
        )
