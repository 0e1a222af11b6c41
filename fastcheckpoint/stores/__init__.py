"""Store protocol and ``open_store``. Backends are imported only when their scheme is used."""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import urlsplit

from fastcheckpoint.errors import ConfigurationError
from fastcheckpoint.stores._base import (
    EMPTY_RUN,
    CheckpointHeader,
    CheckpointStore,
    Item,
    RunRecord,
    StoredCheckpoint,
    header_of,
    is_live,
    latest_expiry,
)

__all__ = [
    "EMPTY_RUN",
    "CheckpointHeader",
    "CheckpointStore",
    "Item",
    "RunRecord",
    "StoredCheckpoint",
    "header_of",
    "is_live",
    "latest_expiry",
    "open_store",
    "register_store",
]

# scheme -> (dotted "module:Class", extra to install or None)
_REGISTRY: dict[str, tuple[str, str | None]] = {
    "memory": ("fastcheckpoint.stores.memory:MemoryStore", None),
    "file": ("fastcheckpoint.stores.file:FileStore", None),
}


def register_store(scheme: str, target: str, extra: str | None = None) -> None:
    """Map a URL scheme to ``"package.module:Class"``; the class needs ``from_url(url, **kw)``."""
    _REGISTRY[scheme.lower()] = (target, extra)


def open_store(url: str, **options: Any) -> CheckpointStore:
    """Build a store from a URL (``memory://``, ``file:///path`` or a plain path, ...).

    Raises :class:`ConfigurationError` for an unknown scheme, a malformed URL, or a backend
    whose optional dependencies are not installed (naming the ``pip install`` to run).
    """
    if not isinstance(url, str) or not url:
        raise ConfigurationError(f"store URL must be a non-empty string, got {url!r}")
    scheme = urlsplit(url).scheme.lower() if "://" in url else "file"
    if scheme not in _REGISTRY:
        known = ", ".join(f"{name}://" for name in sorted(_REGISTRY))
        raise ConfigurationError(f"unknown store URL scheme {scheme!r} in {url!r}; known: {known}")
    target, extra = _REGISTRY[scheme]
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = f"pip install 'fastcheckpoint[{extra}]'" if extra else "a complete installation"
        raise ConfigurationError(
            f"the {scheme}:// store needs packages that are not installed ({exc.name}); "
            f"run: {hint}"
        ) from exc
    store_class = getattr(module, class_name)
    store: CheckpointStore = store_class.from_url(url, **options)
    return store
