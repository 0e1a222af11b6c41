"""What every framework adapter does the same way: take a store or a store URL, check that the
store has the capabilities adapters need, and read a TTL argument."""

from __future__ import annotations

import time
from collections.abc import Sequence

import anyio

from fastcheckpoint._config import CheckpointConfig, RetryPolicy, ttl_setting
from fastcheckpoint._ids import plain_int
from fastcheckpoint.errors import CheckpointError, ConfigurationError
from fastcheckpoint.stores import (
    CheckpointStore,
    StoredCheckpoint,
    SupportsDefaultTTL,
    SupportsLabels,
    SupportsSharedItems,
    open_store,
)

__all__ = ["RACE_ATTEMPTS", "adapter_config", "adapter_ttl", "after_lost_race",
           "capable_store", "checked_keep_latest", "checked_ttl", "landed"]

RACE_ATTEMPTS = 64
"""How many times an adapter's change of one run (a log's, a checkpoint saved under the
framework's id) is tried while other writers of that run win the race."""
_FREE_ATTEMPTS = 3
_CONTENTION = RetryPolicy(base_delay=0.001, max_delay=0.05)


async def after_lost_race(attempt: int) -> None:
    """Wait before trying again a change that lost attempt ``attempt`` (from 0) to another
    writer: the first few go again at once, then with full jitter up to 50 ms, so writers
    in step spread out and each gets its turn."""
    if attempt >= _FREE_ATTEMPTS:
        await anyio.sleep(_CONTENTION.delay(attempt - _FREE_ATTEMPTS))


async def landed(
    store: CheckpointStore, run_key: str, record: StoredCheckpoint, now: float
) -> bool:
    """Whether ``record`` (its payload unique: a token, a revision) is stored: a change whose
    store call failed, its reply lost after the store applied it, landed all the same. One
    read. ``False`` also when that cannot be read now (the caller then raises the call's own
    error) or when another writer's change replaced it already."""
    try:
        found = await store.get(run_key, record.sequence, now=now)
    except CheckpointError:
        return False
    return found is not None and found[0].payload == record.payload


def adapter_config(config: object, default: CheckpointConfig | None = None) -> CheckpointConfig:
    """An adapter's ``config`` argument checked; ``None`` means ``default`` (else the
    defaults)."""
    if config is None:
        return CheckpointConfig() if default is None else default
    if not isinstance(config, CheckpointConfig):
        raise ConfigurationError(f"config must be a CheckpointConfig, got {type(config).__name__}")
    return config


def capable_store(
    store: object,
    retry: RetryPolicy,
    who: str,
    needs: Sequence[type] = (SupportsLabels, SupportsSharedItems),
) -> CheckpointStore:
    """``store`` itself, or the store its URL names (opened with ``retry``), once it is known
    to offer the capabilities ``needs`` lists; :class:`ConfigurationError` naming ``who`` (the
    adapter) otherwise."""
    built = open_store(store, retry=retry) if isinstance(store, str) else store
    if not isinstance(built, CheckpointStore):
        raise ConfigurationError(
            f"store must be a CheckpointStore or a store URL, got {type(store).__name__}")
    missing = [capability.__name__ for capability in needs
               if not isinstance(built, capability)]
    if missing:
        raise ConfigurationError(
            f"{who} needs a store with {' and '.join(missing)}; "
            f"{type(built).__name__} lacks {'them' if len(missing) > 1 else 'it'}")
    return built


def adapter_ttl(ttl_seconds: object, store: CheckpointStore) -> float | None:
    """An adapter's ``ttl_seconds`` argument checked; ``None`` means the store's default TTL
    (stores configured with one), else never."""
    if ttl_seconds is None:
        if isinstance(store, SupportsDefaultTTL):
            return store.default_ttl_seconds
        return None
    return checked_ttl(ttl_seconds)


def checked_ttl(ttl_seconds: object) -> float | None:
    """A ``ttl_seconds`` argument: ``None`` or a number of seconds the config would take as
    its ``default_ttl_seconds``, else :class:`ConfigurationError`."""
    if ttl_seconds is None:
        return None
    return ttl_setting(ttl_seconds, "ttl_seconds", time.time())  # saved, then never found


def checked_keep_latest(keep_latest: object) -> int | None:
    """A ``keep_latest`` argument: ``None`` or an integer >= 1, else
    :class:`ConfigurationError`."""
    if keep_latest is None:
        return None
    whole = plain_int(keep_latest)  # as a plain int: what the stores are handed
    if whole is None or whole < 1:
        raise ConfigurationError(
            f"keep_latest must be None or an integer >= 1, got {keep_latest!r:.40}")
    return whole
