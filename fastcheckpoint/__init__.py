"""fastcheckpoint: async checkpoints for AI agent runs on pluggable stores.

Everything public is importable from here; backends with extra dependencies (Redis, S3,
DynamoDB) are imported only when used.
"""

from __future__ import annotations

from fastcheckpoint._config import CheckpointConfig, RetryPolicy
from fastcheckpoint._manager import CheckpointManager, RunPage
from fastcheckpoint._model import (
    Checkpoint,
    CheckpointMetadata,
    CheckpointStatus,
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
    StoreError,
    StoreUnavailableError,
    ValidationError,
)
from fastcheckpoint.stores import CheckpointStore, open_store
from fastcheckpoint.stores.file import FileCheckpointStore, FileStore
from fastcheckpoint.stores.memory import InMemoryCheckpointStore, MemoryStore

__version__ = "0.1.0"

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
    "FileCheckpointStore",
    "FileStore",
    "InMemoryCheckpointStore",
    "MemoryStore",
    "RetryPolicy",
    "RunInfo",
    "RunPage",
    "SequenceConflict",
    "SerializationError",
    "StatusChange",
    "StoreError",
    "StoreUnavailableError",
    "ValidationError",
    "__version__",
    "open_store",
]

