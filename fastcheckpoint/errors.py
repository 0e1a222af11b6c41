"""The error hierarchy. Every error the library raises is a :class:`CheckpointError`."""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointNotFound",
    "ConfigurationError",
    "ConflictError",
    "CorruptCheckpointError",
    "SequenceConflict",
    "SerializationError",
    "SharedItemGone",
    "StoreError",
    "StoreUnavailableError",
    "ValidationError",
]


class CheckpointError(Exception):
    """Base class of every error raised by fastcheckpoint."""


class ConfigurationError(CheckpointError):
    """A setting, URL or environment variable is missing or malformed."""


class ValidationError(CheckpointError, ValueError):
    """An id or argument is not acceptable; nothing was written."""


class SerializationError(CheckpointError):
    """A value cannot be encoded or decoded; ``path`` names where, e.g. ``state['a'][3]``."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class CheckpointNotFound(CheckpointError, LookupError):
    """A checkpoint or run the caller named as existing (``parent_id``, ``fork``,
    ``export_run``) does not exist."""


class ConflictError(CheckpointError):
    """A compare-and-set lost: the record changed, or the state does not allow the change."""


class SharedItemGone(ConflictError):
    """A store refused ``append_with_items`` because the checkpoint names shared items (in its
    ``refs``, without their values) that a removal took away meanwhile; nothing was written.

    Append it again with those items' values. ``keys`` lists the items when the store knows
    them (empty when it only knows that some were removed).
    """

    def __init__(self, message: str, *, keys: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.keys = keys


class SequenceConflict(ConflictError):
    """A store refused an append because the proposed sequence is not the run's next one.

    Raised by stores to the manager, which re-reads and retries. ``latest_sequence`` and
    ``incarnation`` describe the live run the store holds (``None`` when it holds none);
    ``latest_sequence`` is -1 when the run exists but its first checkpoint is not written yet
    (a store whose run creation takes more than one request): :attr:`joining` names that
    case.
    """

    def __init__(
        self,
        message: str = "sequence already taken",
        *,
        latest_sequence: int | None = None,
        incarnation: str | None = None,
    ) -> None:
        super().__init__(message)
        self.latest_sequence = latest_sequence
        self.incarnation = incarnation

    @property
    def joining(self) -> str | None:
        """The incarnation of a run that exists but holds no checkpoint yet, else ``None``.

        Such a run is being created, or its creator died before the first checkpoint. A caller
        that was starting the run proposes sequence 0 again with this incarnation in its
        seed: it joins the run, and the store's create-only write of sequence 0 decides
        between it and a creator still alive. ``None`` means an ordinary conflict: re-read the
        run and propose its next sequence (or, starting a run, it exists already).
        """
        return self.incarnation if self.latest_sequence == -1 else None


class CorruptCheckpointError(CheckpointError):
    """A stored record fails its checksum or cannot be parsed; ``key`` names where it lives."""

    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(f"{message} (store key: {key})")
        self.key = key


class StoreError(CheckpointError):
    """The backend failed; the driver's exception is chained as ``__cause__``."""


class StoreUnavailableError(StoreError):
    """The backend could not be reached (after the retry policy was exhausted)."""
