"""fastcheckpoint: async checkpoints for AI agent runs on pluggable stores.

Everything public is importable from here. The stores other than memory and file are imported
on first use, so ``import fastcheckpoint`` needs none of their drivers; ``from fastcheckpoint
import *`` brings those whose drivers are installed.
"""

from __future__ import annotations

import dis
import importlib
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

from fastcheckpoint._config import MAX_TTL_SECONDS, CheckpointConfig, RetryPolicy
from fastcheckpoint._manager import CheckpointManager, RunPage
from fastcheckpoint._model import (
    Checkpoint,
    CheckpointMetadata,
    CheckpointStatus,
    RepairReport,
    RunInfo,
    StatusChange,
)
from fastcheckpoint.errors import (
    CheckpointError,
    CheckpointNotFound,
    ConfigurationError,
    ConflictError,
    CorruptCheckpointError,
    SequenceConflict,
    SerializationError,
    SharedItemGone,
    StoreError,
    StoreUnavailableError,
    ValidationError,
)
from fastcheckpoint.stores import CheckpointStore, open_store
from fastcheckpoint.stores.file import FileCheckpointStore, FileStore
from fastcheckpoint.stores.memory import InMemoryCheckpointStore, MemoryStore

if TYPE_CHECKING:  # "X as X": exported to type checkers, which do not run the __all__ below
    from fastcheckpoint.stores.dynamodb import DynamoDBStore as DynamoDBStore
    from fastcheckpoint.stores.postgres import PostgresStore as PostgresStore
    from fastcheckpoint.stores.redis import RedisCheckpointStore as RedisCheckpointStore
    from fastcheckpoint.stores.redis import RedisStore as RedisStore
    from fastcheckpoint.stores.s3 import S3CheckpointStore as S3CheckpointStore
    from fastcheckpoint.stores.s3 import S3Store as S3Store
    from fastcheckpoint.stores.sqlite import SQLiteStore as SQLiteStore

__version__ = "0.1.0"

# Stores whose drivers are optional: imported on first access, so ``import fastcheckpoint``
# never needs redis or aiobotocore (nor pays for sqlite3). name -> (module, extra, the driver's
# top-level module, which tells whether the store can be imported without importing it).
_LAZY = {
    "DynamoDBStore": ("fastcheckpoint.stores.dynamodb", "dynamodb", "aiobotocore"),
    "PostgresStore": ("fastcheckpoint.stores.postgres", "postgres", "asyncpg"),
    "RedisStore": ("fastcheckpoint.stores.redis", "redis", "redis"),
    "RedisCheckpointStore": ("fastcheckpoint.stores.redis", "redis", "redis"),
    "S3Store": ("fastcheckpoint.stores.s3", "s3", "aiobotocore"),
    "S3CheckpointStore": ("fastcheckpoint.stores.s3", "s3", "aiobotocore"),
    # The standard library's, but some Pythons are built without it: _sqlite3 is its C part.
    "SQLiteStore": ("fastcheckpoint.stores.sqlite", None, "_sqlite3"),
}


class _MissingExtra(ConfigurationError, AttributeError):
    """A lazily imported store whose driver is missing: a :class:`ConfigurationError` naming
    the install command, and an ``AttributeError`` so that ``hasattr`` and ``getattr(...,
    default)`` see a name that is not there."""


_IMPORT_FROM = dis.opmap["IMPORT_FROM"]


def _importing_by_name() -> bool:
    """Whether our caller runs ``from fastcheckpoint import NAME``. Python turns an
    ``AttributeError`` there into a bare ``ImportError`` ("cannot import name"), which would
    drop the install command: that statement gets a plain :class:`ConfigurationError`."""
    try:
        frame = sys._getframe(2)  # 0: here, 1: __getattr__, 2: the code asking
        return frame.f_code.co_code[frame.f_lasti] == _IMPORT_FROM
    except (AttributeError, IndexError, ValueError):  # a Python without these frame details
        return False


def _installed(name: str) -> bool:
    """Whether the driver of lazy store ``name`` is installed, found without importing it."""
    try:
        return importlib.util.find_spec(_LAZY[name][2]) is not None
    except (ImportError, ValueError):  # a broken or half-installed package
        return False


def _not_installed(name: str, exc: ImportError) -> str:
    extra = _LAZY[name][1]
    hint = (f"run: pip install 'fastcheckpoint[{extra}]'" if extra
            else "this Python was built without it")
    return f"fastcheckpoint.{name} needs packages that are not installed ({exc.name}); {hint}"


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'fastcheckpoint' has no attribute {name!r}")
    try:
        module = importlib.import_module(_LAZY[name][0])
    except ImportError as exc:
        error = ConfigurationError if _importing_by_name() else _MissingExtra
        raise error(_not_installed(name, exc)) from exc
    return getattr(module, name)


def __dir__() -> list[str]:
    # The lazy stores that an attribute access would give, and no others.
    return sorted({*globals(), *filter(_installed, _LAZY)})


__all__ = [
    "MAX_TTL_SECONDS",
    "Checkpoint",
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointMetadata",
    "CheckpointNotFound",
    "CheckpointStatus",
    "CheckpointStore",
    "ConfigurationError",
    "ConflictError",
    "CorruptCheckpointError",
    "FileCheckpointStore",
    "FileStore",
    "InMemoryCheckpointStore",
    "MemoryStore",
    "RepairReport",
    "RetryPolicy",
    "RunInfo",
    "RunPage",
    "SequenceConflict",
    "SerializationError",
    "SharedItemGone",
    "StatusChange",
    "StoreError",
    "StoreUnavailableError",
    "ValidationError",
    "__version__",
    "open_store",
]
# ``import *`` fetches every name listed: only the stores whose drivers are installed.
__all__ += [name for name in _LAZY if _installed(name)]
