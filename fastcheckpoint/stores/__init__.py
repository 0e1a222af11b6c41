"""Store protocol and ``open_store``. Backends are imported only when their scheme is used."""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import urlsplit

from fastcheckpoint._config import RetryPolicy
from fastcheckpoint.errors import ConfigurationError
from fastcheckpoint.stores._base import (
    EMPTY_RUN,
    MAX_ITEM_KEY_BYTES,
    MAX_LABEL_BYTES,
    MAX_LABELS,
    CheckpointHeader,
    CheckpointStore,
    ExpiryCleanup,
    Item,
    RunDamage,
    RunRecord,
    StoredCheckpoint,
    SupportsDefaultTTL,
    SupportsLabels,
    SupportsProvision,
    SupportsRepair,
    SupportsSharedItems,
    check_labels,
    check_options,
    check_shared_items,
    header_of,
    is_live,
    latest_expiry,
    purge_all,
)

__all__ = [
    "EMPTY_RUN",
    "MAX_ITEM_KEY_BYTES",
    "MAX_LABELS",
    "MAX_LABEL_BYTES",
    "CheckpointHeader",
    "CheckpointStore",
    "ExpiryCleanup",
    "Item",
    "RunDamage",
    "RunRecord",
    "StoredCheckpoint",
    "SupportsDefaultTTL",
    "SupportsLabels",
    "SupportsProvision",
    "SupportsRepair",
    "SupportsSharedItems",
    "available_schemes",
    "check_labels",
    "check_options",
    "check_shared_items",
    "header_of",
    "is_live",
    "latest_expiry",
    "open_store",
    "purge_all",
    "register_store",
]


class _Backend:
    __slots__ = ("extra", "remote", "target")

    def __init__(self, target: str, extra: str | None, remote: bool) -> None:
        self.target = target
        self.extra = extra
        self.remote = remote


_REGISTRY: dict[str, _Backend] = {
    "memory": _Backend("fastcheckpoint.stores.memory:MemoryStore", None, remote=False),
    "file": _Backend("fastcheckpoint.stores.file:FileStore", None, remote=False),
    **{
        scheme: _Backend("fastcheckpoint.stores.redis:RedisStore", "redis", remote=True)
        for scheme in ("redis", "rediss", "redis+cluster", "rediss+cluster")
    },
    "s3": _Backend("fastcheckpoint.stores.s3:S3Store", "s3", remote=True),
    "dynamodb": _Backend("fastcheckpoint.stores.dynamodb:DynamoDBStore", "dynamodb", remote=True),
}


def register_store(
    scheme: str, target: str, extra: str | None = None, *, remote: bool = False
) -> None:
    """Map a URL scheme to ``"package.module:Class"``; the class needs ``from_url(url, **kw)``.

    ``remote`` stores talk to a server and retry transient failures: ``open_store`` hands
    them the ``retry`` policy, and their ``from_url`` must accept ``retry=``.
    """
    _REGISTRY[scheme.lower()] = _Backend(target, extra, remote)


def available_schemes() -> list[str]:
    """URL schemes ``open_store`` knows, whether or not their extras are installed."""
    return sorted(_REGISTRY)


def open_store(url: str, *, retry: RetryPolicy | None = None, **options: Any) -> CheckpointStore:
    """Build a store from a URL (``memory://``, ``file:///path`` or a plain path, ...).

    ``retry`` (default :class:`RetryPolicy()`) configures the driver's own retries of a
    remote store (Redis, S3, DynamoDB); local stores have no transient failures and ignore it.
    Raises :class:`ConfigurationError` for an unknown scheme, a malformed URL, or a backend
    whose optional dependencies are not installed (naming the ``pip install`` to run).
    """
    if not isinstance(url, str) or not url:
        raise ConfigurationError(f"store URL must be a non-empty string, got {url!r}")
    try:
        scheme = urlsplit(url).scheme.lower() if "://" in url else "file"
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket: redis://[::1
        raise ConfigurationError(f"malformed store URL {url!r}: {exc}") from exc
    if scheme not in _REGISTRY:
        known = ", ".join(f"{name}://" for name in sorted(_REGISTRY))
        raise ConfigurationError(f"unknown store URL scheme {scheme!r} in {url!r}; known: {known}")
    backend = _REGISTRY[scheme]
    module_name, _, class_name = backend.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = backend.extra
        hint = f"pip install 'fastcheckpoint[{extra}]'" if extra else f"pip install {exc.name}"
        raise ConfigurationError(
            f"the {scheme}:// store needs packages that are not installed ({exc.name}); "
            f"run: {hint}"
        ) from exc
    store_class = getattr(module, class_name)
    if backend.remote:
        options["retry"] = retry if retry is not None else RetryPolicy()
    store: CheckpointStore = store_class.from_url(url, **options)
    return store
