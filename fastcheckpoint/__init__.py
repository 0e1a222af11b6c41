"""fastcheckpoint: async checkpoints for AI agent runs on pluggable stores.

Everything public is importable from here; backends with extra dependencies (Redis, S3,
DynamoDB) are imported only when used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fastcheckpoint._config import CheckpointConfig, RetryPolicy
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

if TYPE_CHECKING:
    from fastcheckpoint.stores.dynamodb import DynamoDBStore
    from fastcheckpoint.stores.redis import RedisCheckpointStore, RedisStore
    from fastcheckpoint.stores.s3 import S3CheckpointStore, S3Store

__version__ = "0.1.0"

# Stores whose drivers are optional extras: imported on first access, so ``import
# fastcheckpoint`` never needs redis or aiobotocore. name -> (module, extra)
_LAZY = {
    "DynamoDBStore": ("fastcheckpoint.stores.dynamodb", "dynamodb"),
    "RedisStore": ("fastcheckpoint.stores.redis", "redis"),
    "RedisCheckpointStore": ("fastcheckpoint.stores.redis", "redis"),
    "S3Store": ("fastcheckpoint.stores.s3", "s3"),
    "S3CheckpointStore": ("fastcheckpoint.stores.s3", "s3"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'fastcheckpoint' has no attribute {name!r}")
    module_name, extra = _LAZY[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"fastcheckpoint.{name} needs packages that are not installed ({exc.name}); "
            f"run: pip install 'fastcheckpoint[{extra}]'"
        ) from exc
    return getattr(module, name)

__all__ = [
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
    "DynamoDBStore",
    "FileCheckpointStore",
    "FileStore",
    "InMemoryCheckpointStore",
    "MemoryStore",
    "RedisCheckpointStore",
    "RedisStore",
    "RepairReport",
    "RetryPolicy",
    "RunInfo",
    "RunPage",
    "S3CheckpointStore",
    "S3Store",
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

