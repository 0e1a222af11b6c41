"""Store protocol and ``open_store``. Backends are imported only when their scheme is used."""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import re
from typing import Any
from urllib.parse import urlsplit

from fastcheckpoint._config import RetryPolicy, check_setting_text
from fastcheckpoint._ids import plain_str
from fastcheckpoint._urls import without_password
from fastcheckpoint._validate import shown
from fastcheckpoint.errors import CheckpointError, ConfigurationError
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
    SupportsAppendNext,
    SupportsDefaultTTL,
    SupportsLabels,
    SupportsNestedItems,
    SupportsProvision,
    SupportsRepair,
    SupportsSequenceGuard,
    SupportsSharedItems,
    check_append,
    check_head,
    check_items,
    check_keep_latest,
    check_labels,
    check_options,
    check_run_key,
    check_sequence,
    check_shared_items,
    header_of,
    is_live,
    is_run_key,
    item_key_bytes,
    key_successor,
    latest_expiry,
    nested_prefix,
    nesting_under,
    never_suspends,
    offers_nested_items,
    offers_sequence_guard,
    prefix_end,
    prefix_range,
    purge_all,
    refs_to_find,
    renumbered,
    unheld_refs,
)
from fastcheckpoint.stores._loops import GivenClientLoop, PerLoop, require_asyncio

__all__ = [
    "EMPTY_RUN",
    "ENTRY_POINT_GROUP",
    "MAX_ITEM_KEY_BYTES",
    "MAX_LABELS",
    "MAX_LABEL_BYTES",
    "CheckpointHeader",
    "CheckpointStore",
    "ExpiryCleanup",
    "GivenClientLoop",
    "Item",
    "PerLoop",
    "RunDamage",
    "RunRecord",
    "StoredCheckpoint",
    "SupportsAppendNext",
    "SupportsDefaultTTL",
    "SupportsLabels",
    "SupportsNestedItems",
    "SupportsProvision",
    "SupportsRepair",
    "SupportsSequenceGuard",
    "SupportsSharedItems",
    "available_schemes",
    "check_append",
    "check_head",
    "check_items",
    "check_keep_latest",
    "check_labels",
    "check_options",
    "check_run_key",
    "check_sequence",
    "check_shared_items",
    "header_of",
    "is_live",
    "is_run_key",
    "item_key_bytes",
    "key_successor",
    "latest_expiry",
    "nested_prefix",
    "nesting_under",
    "never_suspends",
    "offers_nested_items",
    "offers_sequence_guard",
    "open_store",
    "prefix_end",
    "prefix_range",
    "purge_all",
    "refs_to_find",
    "register_store",
    "renumbered",
    "require_asyncio",
    "unheld_refs",
]


class _Backend:
    __slots__ = ("extra", "remote", "target")

    def __init__(self, target: str, extra: str | None, remote: bool) -> None:
        self.target = target
        self.extra = extra
        self.remote = remote

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Backend) and (self.target, self.extra, self.remote) == (
            other.target, other.extra, other.remote)

    def __hash__(self) -> int:
        return hash((self.target, self.extra, self.remote))


_REGISTRY: dict[str, _Backend] = {
    "memory": _Backend("fastcheckpoint.stores.memory:MemoryStore", None, remote=False),
    "file": _Backend("fastcheckpoint.stores.file:FileStore", None, remote=False),
    **{
        scheme: _Backend("fastcheckpoint.stores.redis:RedisStore", "redis", remote=True)
        for scheme in ("redis", "rediss", "redis+cluster", "rediss+cluster")
    },
    "s3": _Backend("fastcheckpoint.stores.s3:S3Store", "s3", remote=True),
    "dynamodb": _Backend("fastcheckpoint.stores.dynamodb:DynamoDBStore", "dynamodb", remote=True),
    **{
        scheme: _Backend("fastcheckpoint.stores.postgres:PostgresStore", "postgres", remote=True)
        for scheme in ("postgresql", "postgres")
    },
    "sqlite": _Backend("fastcheckpoint.stores.sqlite:SQLiteStore", None, remote=False),
}

ENTRY_POINT_GROUP = "fastcheckpoint.stores"
"""Third-party stores register here: ``[project.entry-points."fastcheckpoint.stores"]`` with
``myscheme = "my_package.store:MyStore"``. A class whose ``remote`` attribute is true gets the
retry policy, as with ``register_store(..., remote=True)``."""

def register_store(
    scheme: str,
    target: str,
    extra: str | None = None,
    *,
    remote: bool = False,
    replace: bool = False,
) -> None:
    """Map a URL scheme to ``"package.module:Class"``; the class needs ``from_url(url, **kw)``.

    ``remote`` stores talk to a server and retry transient failures: ``open_store`` hands
    them the ``retry`` policy, and their ``from_url`` must accept ``retry=``. ``extra`` names
    the ``fastcheckpoint[extra]`` to install when the import fails. A scheme that is already
    registered to something else is a :class:`ConfigurationError` unless ``replace=True``:
    nobody silently takes over ``redis://``. Registering the same thing twice is harmless.
    """
    if not isinstance(scheme, str) or not _SCHEME_NAME.fullmatch(plain_str(scheme)):
        raise ConfigurationError(
            "a store scheme is a URL scheme like 'mystore' (a letter, then letters, digits, "
            f"'+', '-' or '.'), got {shown(scheme)}")
    if not isinstance(target, str) or not _is_target(plain_str(target)):
        raise ConfigurationError(
            f"a store target is 'package.module:Class', got {shown(target)}")
    if extra is not None and (not isinstance(extra, str)
                              or not _EXTRA_NAME.fullmatch(plain_str(extra))):
        raise ConfigurationError(
            f"a store's extra is the name of a fastcheckpoint extra like 'redis' (letters, "
            f"digits, '-', '_' and '.'), or None, got {shown(extra)}")
    for name, flag in (("remote", remote), ("replace", replace)):
        if not isinstance(flag, bool):
            raise ConfigurationError(f"{name} must be True or False, got {shown(flag)}")
    _discover()
    key = plain_str(scheme).lower()
    backend = _Backend(plain_str(target), None if extra is None else plain_str(extra), remote)
    current = _REGISTRY.get(key)
    if current is not None and current != backend and not replace:
        raise ConfigurationError(
            f"the {key}:// scheme is registered to {current.target} already; pass "
            "replace=True to replace it")
    _REGISTRY[key] = backend


def names_a_network_store(url: str) -> bool:
    """Whether ``url``'s scheme is one of a network store registered as such (its URL is
    text: names, host, options), not of a store whose URL names a path."""
    if "://" not in url:
        return False
    backend = _REGISTRY.get(url.partition("://")[0].lower())
    return backend is not None and backend.remote


def available_schemes() -> list[str]:
    """URL schemes ``open_store`` knows (entry points included), whether or not their
    extras are installed."""
    _discover()
    return sorted(_REGISTRY)


@functools.cache
def _discover() -> None:
    """Add the stores installed packages declare in the entry-point group, once; bundled and
    already registered schemes win (a package cannot take over ``redis://`` by installing)."""
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        key = entry.name.lower()
        if key in _REGISTRY or not _SCHEME_NAME.fullmatch(key):
            continue  # taken, or no URL scheme (no URL could name it)
        _REGISTRY[key] = _Backend(entry.value, None, remote=False)
        _ENTRY_POINTS.add(key)


_ENTRY_POINTS: set[str] = set()
"""Schemes found through entry points: whether they are remote is read from their class."""


_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_SCHEME_NAME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_EXTRA_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")


def _is_target(target: str) -> bool:
    """Whether ``target`` reads ``package.module:Class`` (Python identifiers)."""
    module, colon, name = target.partition(":")
    return bool(colon) and name.isidentifier() and all(
        part.isidentifier() for part in module.split("."))


def checked_store_url(url: str) -> str:
    """The URL ``open_store`` opens for ``url``: a plain path (anything without ``://``) with
    a leading ``~`` expanded as the shell would. A known scheme followed by ``:`` but not
    ``//`` (``sqlite:runs.db``, ``file:checkpoints``) is a :class:`ConfigurationError`
    suggesting the URL meant, rather than a directory of that name."""
    if not isinstance(url, str) or not str.__len__(url):
        raise ConfigurationError(f"store URL must be a non-empty string, got {shown(url)}")
    url = plain_str(url)  # a subclass's own methods never run on it
    _discover()
    typed = _SCHEME.match(url)
    scheme = typed.group(1).lower() if typed else ""
    if typed and scheme in _REGISTRY and not url[typed.end():].startswith("//"):
        meant = _meant_url(scheme, url[typed.end():])
        raise ConfigurationError(without_password(
            f"{url!r} is not a store URL: did you mean {meant!r}? (for a directory of that "
            f"name, write ./{url})", meant))
    return url if "://" in url else _home_expanded(url)


def _meant_url(scheme: str, rest: str) -> str:
    if scheme == "sqlite":  # sqlite:///relative.db, sqlite:////absolute.db
        return f"sqlite:///{rest}"
    if scheme == "file":  # a file:// URL names an absolute path
        return f"file://{os.path.abspath(os.path.expanduser(rest))}"
    return f"{scheme}://{rest.lstrip('/')}"


def _home_expanded(path: str) -> str:
    """``~/x`` and ``~user/x`` as the shell expands them: a path from an environment variable
    or a quoted argument would otherwise make a directory named ``~``."""
    if not path.startswith("~"):
        return path
    expanded = os.path.expanduser(path)
    if expanded.startswith("~"):
        home = path.split("/", 1)[0]
        raise ConfigurationError(
            f"cannot expand {home!r} in the store path {path!r}: no such user, or HOME unset")
    return expanded


def open_store(url: str, *, retry: RetryPolicy | None = None, **options: Any) -> CheckpointStore:
    """Build a store from a URL (``memory://``, ``file:///path`` or a plain path, ...).

    A plain path (no ``://``) is a file store; a leading ``~`` is expanded
    (:func:`checked_store_url`). ``retry`` (default :class:`RetryPolicy()`) configures the
    driver's own retries of a remote store (Redis, S3, DynamoDB); local stores have no
    transient failures and ignore it. Raises :class:`ConfigurationError` for an unknown
    scheme, a malformed URL, a known scheme without its ``//`` (``sqlite:runs.db``), or a
    backend whose optional dependencies are not installed (naming the ``pip install`` to run).
    """
    url = checked_store_url(url)
    try:
        scheme = urlsplit(url).scheme.lower() if "://" in url else "file"
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket: redis://[::1
        raise ConfigurationError(f"malformed store URL {url!r}: {exc}") from exc
    if scheme not in _REGISTRY:
        known = ", ".join(f"{name}://" for name in sorted(_REGISTRY))
        raise ConfigurationError(f"unknown store URL scheme {scheme!r} in {url!r}; known: {known}")
    backend = _REGISTRY[scheme]
    store_class = _store_class(scheme, backend)
    remote = backend.remote or (scheme in _ENTRY_POINTS and getattr(store_class, "remote", False))
    if remote:
        # A path may hold any bytes the system gave (lone surrogates); a network store's
        # names, host and options are text its driver sends as UTF-8.
        check_setting_text("store URL", url)
        options["retry"] = retry if retry is not None else RetryPolicy()
    try:
        store: CheckpointStore = store_class.from_url(url, **options)
    except CheckpointError:
        raise
    except Exception as exc:  # a third-party store's own error: typed here
        raise ConfigurationError(without_password(
            f"the {scheme}:// store {backend.target} could not open {url!r}: "
            f"{type(exc).__name__}: {exc}", url)) from exc
    return store


def _store_class(scheme: str, backend: _Backend) -> Any:
    """The class ``backend`` names, imported; :class:`ConfigurationError` naming the
    ``pip install`` to run when its packages are missing, or what else went wrong."""
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
    except Exception as exc:  # an entry point naming no module, a module failing to import
        raise ConfigurationError(
            f"the {scheme}:// store {backend.target} could not be imported: "
            f"{type(exc).__name__}: {exc}") from exc
    store_class = getattr(module, class_name, None) if class_name.isidentifier() else None
    if store_class is None or not callable(getattr(store_class, "from_url", None)):
        raise ConfigurationError(
            f"the {scheme}:// store {backend.target} does not exist or has no from_url(url)")
    return store_class
