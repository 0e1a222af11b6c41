"""Public data model: checkpoints, their metadata, runs and statuses."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import Any

import msgspec

from fastcheckpoint import _ids
from fastcheckpoint.errors import SerializationError, ValidationError

__all__ = [
    "Checkpoint",
    "CheckpointMetadata",
    "CheckpointStatus",
    "RepairReport",
    "RunInfo",
    "StatusChange",
]


class CheckpointStatus(str, Enum):
    """Status of a run, reported on every checkpoint read in ``metadata.status``."""

    ACTIVE = "active"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"

    def __str__(self) -> str:
        return self.value


class CheckpointMetadata(msgspec.Struct, frozen=True):
    """Everything about a checkpoint except its payload; what listings return.

    ``created_at`` and ``expires_at`` are epoch seconds. ``status`` is the run's status when
    the checkpoint was read (``EXPIRED`` for an expired one listed with ``include_expired``).
    """

    run_id: str
    checkpoint_id: str = ""
    sequence: int = 0
    created_at: float = msgspec.field(default_factory=time.time)
    status: CheckpointStatus = CheckpointStatus.ACTIVE
    step_name: str = ""
    parent_id: str | None = None
    tags: list[str] = msgspec.field(default_factory=list)
    ttl_seconds: float | None = None
    expires_at: float | None = None

    def __post_init__(self) -> None:
        # Built by hand as well as read: a field of the wrong type is refused here, not
        # when to_dict, to_json or is_expired trip over it later.
        # A value of another form that means the same (a str enum, an IntEnum, a numpy
        # number, tags as a tuple) is kept as its plain value, which is what to_dict, to_json
        # and the stores take.
        for name in ("run_id", "checkpoint_id", "step_name"):
            _check_field(name, getattr(self, name), str)
            self._plain(name, _ids.plain_str(getattr(self, name)))
        _check_field("parent_id", self.parent_id, str, optional=True)
        if self.parent_id is not None:
            self._plain("parent_id", _ids.plain_str(self.parent_id))
        self._plain("sequence", _plain_number("sequence", self.sequence, _ids.plain_int))
        self._plain("created_at", _plain_number("created_at", self.created_at, _ids.plain_float))
        for name in ("ttl_seconds", "expires_at"):
            if getattr(self, name) is not None:
                self._plain(name, _plain_number(name, getattr(self, name), _ids.plain_float))
        self._plain("tags", _plain_tags(self.tags))
        given: object = self.status
        if isinstance(given, str) and not isinstance(given, CheckpointStatus):
            given = str.__str__(given)  # looked up by hash: a subclass's own must not run
        if not isinstance(given, CheckpointStatus):
            try:
                status = CheckpointStatus(given)
            except (ValueError, TypeError) as exc:
                raise ValidationError(
                    f"metadata status must be a CheckpointStatus, got {_kind(given)}"
                ) from exc
            msgspec.structs.force_setattr(self, "status", status)

    def _plain(self, name: str, value: object) -> None:
        if value is not getattr(self, name):
            msgspec.structs.force_setattr(self, name, value)

    @property
    def is_expired(self) -> bool:
        """Whether ``expires_at`` has passed by the wall clock (``time.time()``)."""
        return self.is_expired_at(time.time())

    def is_expired_at(self, now: float) -> bool:
        expires_at = self.expires_at
        if expires_at is None and self.ttl_seconds is not None:
            expires_at = self.created_at + self.ttl_seconds  # metadata built FastAgentic's way
        return expires_at is not None and now >= expires_at

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "checkpoint_id": self.checkpoint_id,
            "sequence": self.sequence,
            "created_at": self.created_at,
            "status": self.status.value,
            "step_name": self.step_name,
            "parent_id": self.parent_id,
            "tags": list(self.tags),
            "ttl_seconds": self.ttl_seconds,
            "expires_at": self.expires_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CheckpointMetadata:
        """Accepts what :meth:`to_dict` returns, and FastAgentic's metadata dicts."""
        if not isinstance(data, Mapping):
            raise ValidationError(f"metadata must be a dict, got {type(data).__name__}")
        fields = dict(data)
        fields.setdefault("created_at", time.time())
        for name, plain in _NUMBER_FIELDS.items():
            value = fields.get(name)
            if value is not None and type(value) not in (int, float):
                # msgspec takes exact numbers: a numpy one (a DataFrame row's) is its value
                number = plain(value)
                fields[name] = value if number is None else number
        try:
            metadata = msgspec.convert(fields, cls)
        except msgspec.ValidationError as exc:
            raise ValidationError(f"invalid checkpoint metadata: {exc}") from exc
        except UnicodeEncodeError as exc:  # msgspec quoting a lone surrogate in its message
            raise ValidationError(
                "invalid checkpoint metadata: a value is not valid unicode (it has a lone "
                "surrogate)") from exc
        if metadata.expires_at is None and metadata.ttl_seconds is not None:
            expires_at = metadata.created_at + metadata.ttl_seconds
            metadata = msgspec.structs.replace(metadata, expires_at=expires_at)
        return metadata


class Checkpoint(msgspec.Struct):
    """A checkpoint: metadata plus the payload an agent needs to resume.

    What is stored is encoded bytes: mutating a restored checkpoint, or the objects passed to
    ``create`` (which the checkpoint ``create`` returns holds as they are), never changes it.
    """

    metadata: CheckpointMetadata
    state: dict[str, Any] = msgspec.field(default_factory=dict)
    messages: list[Any] = msgspec.field(default_factory=list)
    tool_calls: list[Any] = msgspec.field(default_factory=list)
    context: dict[str, Any] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_field("metadata", self.metadata, CheckpointMetadata)
        for name, kind in (("state", dict), ("messages", list), ("tool_calls", list),
                           ("context", dict)):
            _check_field(name, getattr(self, name), kind)

    @property
    def checkpoint_id(self) -> str:
        return self.metadata.checkpoint_id

    @property
    def run_id(self) -> str:
        return self.metadata.run_id

    def to_dict(self) -> dict[str, Any]:
        return {
            "metadata": self.metadata.to_dict(),
            "state": self.state,
            "messages": self.messages,
            "tool_calls": self.tool_calls,
            "context": self.context,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Checkpoint:
        if not isinstance(data, Mapping) or "metadata" not in data:
            raise ValidationError("a checkpoint dict needs a 'metadata' entry")
        # A payload missing or null (FastAgentic wrote null for one created as None) is empty;
        # any other value of the wrong type, empty or not, is refused as the checkpoint is made.
        def given(name: str, empty: dict[str, Any] | list[Any]) -> Any:
            value = data.get(name)
            return empty if value is None else value

        return cls(  # whose fields are checked as it is made
            metadata=CheckpointMetadata.from_dict(data["metadata"]),
            state=given("state", {}),
            messages=given("messages", []),
            tool_calls=given("tool_calls", []),
            context=given("context", {}),
        )

    def to_json(self) -> str:
        """JSON text (``bytes`` as base64, ``datetime`` as RFC 3339, UUID as text).

        NaN and infinite floats are written ``NaN``, ``Infinity`` and ``-Infinity``, as
        Python's ``json`` module (and FastAgentic) writes them, so :meth:`from_json` gives them
        back; strict JSON parsers refuse those tokens.
        """
        from fastcheckpoint._codec import to_json_text

        try:
            data = _mark_non_finite(self.to_dict())
        except RecursionError as exc:
            raise SerializationError("cannot encode checkpoint as JSON: nested too deep") from exc
        text = to_json_text(data)
        if _NON_FINITE_MARK in text:
            for token in _NON_FINITE_TOKENS:
                text = text.replace(f'"{_NON_FINITE_MARK}{token}"', token)
        return text

    @classmethod
    def from_json(cls, data: str | bytes) -> Checkpoint:
        """Reads what :meth:`to_json` writes, and FastAgentic's checkpoint JSON (which writes
        NaN and infinite floats as ``NaN``/``Infinity`` tokens too)."""
        from fastcheckpoint._codec import from_json_text

        try:
            decoded = from_json_text(data)
        except SerializationError:
            decoded = _with_non_finite_tokens(data)
            if decoded is _NOT_DECODED:
                raise
        return cls.from_dict(decoded)


def _kind(value: object) -> str:
    return type(value).__name__


_NUMBER_FIELDS: dict[str, Callable[[object], int | float | None]] = {
    "sequence": _ids.plain_int,
    "created_at": _ids.plain_float,
    "ttl_seconds": _ids.plain_float,
    "expires_at": _ids.plain_float,
}


def _plain_tags(tags: object) -> object:
    """Tags as a list of plain ``str``: ``tags`` itself when it is one already."""
    if type(tags) is list and all(type(tag) is str for tag in tags):
        return tags
    if isinstance(tags, (str, bytes, bytearray)) or not isinstance(
            tags, (Sequence, set, frozenset)):
        raise ValidationError(f"metadata tags must be a list of str, got {_kind(tags)}")
    try:
        given = list(tags)
    except Exception as exc:  # a sequence type of the caller's that cannot be iterated
        raise ValidationError(f"metadata tags cannot be read: {_kind(tags)}") from exc
    if not all(isinstance(tag, str) for tag in given):
        raise ValidationError(f"metadata tags must be a list of str, got {_kind(tags)}")
    return [_ids.plain_str(tag) for tag in given]


def _plain_number(
    name: str, value: object, plain: Callable[[object], int | float | None]
) -> int | float:
    """A number field: an exact ``int`` or ``float`` as it is, another number (an
    ``IntEnum``, a numpy number) as ``plain`` makes it, else :class:`ValidationError`."""
    if type(value) is int or (type(value) is float and plain is _ids.plain_float):
        return value
    number = plain(value)
    if number is None:
        kind = "an int" if plain is _ids.plain_int else "an int or a float"
        raise ValidationError(f"checkpoint {name} must be {kind}, got {_kind(value)}")
    return number


def _check_field(
    name: str, value: object, kind: type | tuple[type, ...], *, optional: bool = False
) -> None:
    """:class:`ValidationError` unless ``value`` is of ``kind`` (``None`` too when
    ``optional``); a ``bool`` is no number."""
    if value is None and optional:
        return
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ValidationError(f"checkpoint {name} must be {_names(kind)}, got {_kind(value)}")


def _names(kind: type | tuple[type, ...]) -> str:
    """``kind`` in words: "a dict", "an int or a float"."""
    return " or ".join(("an " if k.__name__[0] in "aeiouAEIOU" else "a ") + k.__name__
                       for k in (kind if isinstance(kind, tuple) else (kind,)))


# JSON has no NaN or infinity: to_json writes the tokens Python's json module writes. Such floats
# are first replaced by this marker (random, so no caller's string can equal it) plus the token.
_NON_FINITE_MARK = f"fastcheckpoint-non-finite-{uuid.uuid4().hex}:"
_NON_FINITE_TOKENS = ("NaN", "Infinity", "-Infinity")


def _mark_non_finite(value: Any) -> Any:
    """``value`` with NaN and infinite floats replaced by marker strings; containers without
    any are returned as they are (no copy)."""
    if isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        token = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        return _NON_FINITE_MARK + token
    if isinstance(value, dict):
        changed = False
        items = {}
        for key, item in value.items():
            items[key] = marked = _mark_non_finite(item)
            changed = changed or marked is not item
        return items if changed else value
    if isinstance(value, (list, tuple, set, frozenset)):
        changed = False
        entries = []
        for entry in value:
            entries.append(marked := _mark_non_finite(entry))
            changed = changed or marked is not entry
        return entries if changed else value
    return value


_NOT_DECODED = object()


def _with_non_finite_tokens(data: object) -> Any:
    """JSON text the strict decoder refused, decoded when ``NaN``/``Infinity``/``-Infinity``
    tokens were the reason; :data:`_NOT_DECODED` when it is malformed for another reason."""
    tokens: list[str] = []

    def constant(token: str) -> float:
        tokens.append(token)
        return float(token)

    if isinstance(data, memoryview):
        data = data.tobytes()
    if not isinstance(data, (str, bytes, bytearray)):
        return _NOT_DECODED
    try:
        if isinstance(data, str):
            data.encode("utf-8")  # refused like the strict decoder does: a lone surrogate
        decoded = json.loads(data, parse_constant=constant)
    except (ValueError, RecursionError):
        return _NOT_DECODED
    return decoded if tokens else _NOT_DECODED


class StatusChange(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of a run's status history."""

    status: CheckpointStatus
    at: float
    actor: str | None = None
    note: str = ""


class RunInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A run as recorded by the store: status, times, counters and its history."""

    run_id: str
    status: CheckpointStatus
    created_at: float
    updated_at: float
    latest_sequence: int
    checkpoint_count: int
    """Checkpoints the store holds for the run (expired ones count until purged)."""
    expires_at: float | None = None
    error: str | None = None
    approval: dict[str, Any] | None = None
    """The latest human-in-the-loop request: ``request`` and ``requested_at`` from ``pause``;
    ``decision`` (``"approved"``/``"rejected"``), ``decided_by``, ``decided_at`` and
    ``comment``/``reason`` once decided. Every decision is also in ``history``."""
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    history: list[StatusChange] = msgspec.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = msgspec.to_builtins(self)
        return result


class RepairReport(msgspec.Struct, frozen=True, kw_only=True):
    """One damaged run record found by :meth:`CheckpointManager.repair`, and what was done."""

    run_id: str | None
    """The run, as named by its newest intact checkpoint (``None`` when none is left)."""
    key: str
    """Where the damaged record lives in the store."""
    problem: str
    """Why the record could not be used."""
    outcome: str
    """``"rebuilt"`` (a new run record was derived from the checkpoint log), ``"not damaged"``
    (the record was readable again by the time of the rebuild: another process repaired or
    rewrote it) or ``"unrecoverable"`` (nothing left to rebuild from; see ``detail``)."""
    checkpoints: int
    """Intact checkpoints the run still holds (all restorable after a repair)."""
    lost: list[str] = msgspec.field(default_factory=list)
    """What the rebuilt record could not recover (it lived only in the damaged record)."""
    detail: str = ""
    """Why nothing was rebuilt, unless the outcome is ``"rebuilt"``."""

    @property
    def repaired(self) -> bool:
        """Whether the run is usable now (rebuilt here, or found repaired)."""
        return self.outcome != "unrecoverable"

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = msgspec.to_builtins(self)
        return result
