"""How a ``WorkflowCheckpoint`` becomes fastcheckpoint bytes, without pickle.

Agent Framework's own storages pickle every value that is not JSON. Here the checkpoint's
fields go through fastcheckpoint's codec (plain data, datetime, UUID, tuple, set, Decimal...
stored exactly), and the framework's objects go through hooks that store their fields:

* ``WorkflowMessage``: its ``to_dict()``, rebuilt with ``WorkflowMessage.from_dict``;
* ``WorkflowEvent``: type, data and the event's fields (a request-info event also its
  ``to_dict()``: request id, source executor, request and response type names), rebuilt with
  ``WorkflowEvent.from_dict`` or the constructor; type names resolve with the framework's
  ``deserialize_type``, which never imports a module;
* classes of ``agent_framework`` modules: ``SerializationMixin`` objects (messages, contents,
  responses) by their ``to_dict()``/``from_dict``, dataclasses by their fields, Enums by value;
* the application's own types named in ``checkpoint_types``: dataclasses by their fields,
  pydantic models by ``model_dump()``/``model_validate``, Enums by value;
* the standard library's ``OrderedDict`` and ``Counter`` (by their items, in order) and
  ``deque`` (its items and ``maxlen``), which the framework's storages keep too.

Anything else is refused with :class:`SerializationError` naming where it is. Loading only
builds those types, resolved from modules already imported (never by importing a name found
in the store), so a record planted in a store cannot run code.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import sys
from collections.abc import Callable, Iterable
from typing import Any, cast

import pydantic
from agent_framework import WorkflowCheckpoint, WorkflowEvent
from agent_framework._serialization import SerializationMixin
from agent_framework._workflows._events import WorkflowEventSource, WorkflowRunState
from agent_framework._workflows._runner_context import WorkflowMessage
from agent_framework._workflows._typing_utils import deserialize_type

from fastcheckpoint._codec import Codec
from fastcheckpoint._validate import shown
from fastcheckpoint.errors import ConfigurationError, CorruptCheckpointError

__all__ = ["CheckpointCodec"]

_FRAMEWORK_MODULES = ("agent_framework.", "agent_framework_")
_CHECKPOINT_FIELDS = frozenset(field.name for field in dataclasses.fields(WorkflowCheckpoint))
_EVENT_FIELDS = ("executor_id", "iteration")
_TEXT_FIELDS = ("checkpoint_id", "workflow_name", "timestamp")
"""The fields a save requires to be str: a stored checkpoint without them is damaged."""


class _Damaged(CorruptCheckpointError):
    """A stored value a hook cannot rebuild; the codec raises it as it is, and
    :meth:`CheckpointCodec.decode` names the record it came from."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, key="a stored value")
        self.reason = reason


_CONTAINERS: dict[type[Any], tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    collections.OrderedDict: (dict, collections.OrderedDict),
    collections.Counter: (dict, collections.Counter),
    collections.deque: (lambda items: [list(items), items.maxlen],
                        lambda stored: collections.deque(*stored)),
}
"""Standard containers a workflow's state may hold: how each is stored (as plain data, whose
contents the codec encodes in turn) and rebuilt, exactly, not as a subclass."""
_CONTAINER_NAMES = {f"{cls.__module__}.{cls.__qualname__}": cls for cls in _CONTAINERS}


def _name(cls: type[Any]) -> str:
    """The name the codec stores a value's type under (``module.QualName``)."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_framework(cls: type[Any]) -> bool:
    return cls.__module__ == "agent_framework" or cls.__module__.startswith(_FRAMEWORK_MODULES)


class CheckpointCodec:
    """Encodes and decodes whole checkpoints; ``types`` are the application's own classes."""

    def __init__(self, types: Iterable[type[Any]], *, compress_min_bytes: int | None) -> None:
        given = cast(object, types)
        if isinstance(given, (str, bytes)) or not isinstance(given, Iterable):
            raise ConfigurationError(
                f"checkpoint_types takes an iterable of classes, got {type(given).__name__}")
        checked = [_checked_type(cls) for cls in types]
        self._types = {_name(cls): cls for cls in checked}
        self._codec = Codec(enc_hook=self._encode_value, dec_hook=self._decode_value,
                            compress_min_bytes=compress_min_bytes)

    @property
    def codec(self) -> Codec:
        """The codec also used for the run's header and details."""
        return self._codec

    def encode(self, checkpoint: WorkflowCheckpoint) -> bytes:
        """The checkpoint's fields as a payload (its ``state`` part), or
        :class:`SerializationError` naming the first value it cannot store."""
        return self._codec.encode_payload(checkpoint.to_dict(), [], [], {})

    def decode(self, payload: bytes, place: str) -> WorkflowCheckpoint:
        """The checkpoint; :class:`CorruptCheckpointError` if the payload is not one (or a
        value in it cannot be rebuilt from what is stored), :class:`SerializationError` for a
        value of a type this process does not restore."""
        try:
            fields = self._codec.decode_payload(payload, place).state
        except _Damaged as exc:
            raise CorruptCheckpointError(exc.reason, key=place) from exc
        if set(fields) != _CHECKPOINT_FIELDS:
            raise CorruptCheckpointError("not an Agent Framework checkpoint payload", key=place)
        for name in _TEXT_FIELDS:
            if not isinstance(fields[name], str):
                raise CorruptCheckpointError(
                    f"the checkpoint's {name} is a {type(fields[name]).__name__}, not a str",
                    key=place)
        return WorkflowCheckpoint(**fields)

    # -- the hooks ------------------------------------------------------------------------

    def _encode_value(self, value: Any) -> Any:
        cls = type(value)
        if cls is WorkflowMessage:
            return value.to_dict()
        if cls is WorkflowEvent:
            fields = _event_fields(value)
            if value.type == "request_info":
                self._check_request_types(value, fields)
            return fields
        if self._types.get(_name(cls)) is cls or _is_framework(cls):
            return _fields_of(value)
        if cls in _CONTAINERS:
            return _CONTAINERS[cls][0](value)
        raise TypeError(
            f"{_name(cls)} is not stored by this checkpoint storage (it stores no pickles); "
            "pass the class in FastCheckpointStorage(checkpoint_types=[...]) if it is a "
            "dataclass, a pydantic model or an Enum, or keep plain data in workflow state")

    def _check_request_types(self, event: WorkflowEvent[Any], fields: dict[str, Any]) -> None:
        """Refuse a request or response type its stored name does not give back: a generic
        (``list[str]`` loads as ``list``) or ``typing.Optional[int]`` (names no type: the
        checkpoint would not load). The framework's file storage refuses them too."""
        for name in ("request_type", "response_type"):
            given = getattr(event, f"_{name}", None)
            if given is None:
                continue
            try:
                found = deserialize_type(fields[name], allowed_types=self._types)
            except (ImportError, AttributeError, TypeError, ValueError):
                found = None
            if found is not given:
                raise TypeError(
                    f"the request's {name} {given!r:.80} is stored by its name, "
                    f"{fields[name]!r:.80}, which does not give it back: use a class (not a "
                    "generic or an Optional) or name the class in checkpoint_types")

    def _decode_value(self, name: str, value: Any) -> Any:
        container = _CONTAINER_NAMES.get(name)
        if container is not None:
            try:
                return _CONTAINERS[container][1](value)
            except (TypeError, ValueError) as exc:
                raise _Damaged(f"a stored {name} cannot be rebuilt: {type(exc).__name__}: "
                               f"{str(exc)[:200]}") from exc
        cls = self._types.get(name) or _framework_class(name)
        if cls is None:
            raise TypeError(
                f"{name} is not a type this storage restores: name it in checkpoint_types "
                "(and import its module before loading)")
        try:
            if cls is WorkflowMessage:
                return WorkflowMessage.from_dict(value)
            if cls is WorkflowEvent:
                return self._event(value)
            return _built(cls, value)
        except (KeyError, TypeError, ValueError) as exc:
            # What is stored does not build one (a field missing or of another type): damage,
            # or a class changed since. A module not imported (ImportError, AttributeError
            # from the framework's type lookup) stays a SerializationError, as above.
            raise _Damaged(f"a stored {name} cannot be rebuilt: {type(exc).__name__}: "
                           f"{str(exc)[:200]}") from exc

    def _event(self, fields: dict[str, Any]) -> WorkflowEvent[Any]:
        if fields["type"] == "request_info":
            event = WorkflowEvent.from_dict(fields, allowed_types=self._types)
        else:
            event = WorkflowEvent(fields["type"], fields["data"])
        origin, state = fields.get("origin"), fields.get("state")
        event.origin = None if origin is None else WorkflowEventSource(origin)  # type: ignore[assignment]
        event.state = None if state is None else WorkflowRunState(state)
        event.details = fields.get("details")
        for name in _EVENT_FIELDS:
            setattr(event, name, fields.get(name))
        return event


def _event_fields(event: WorkflowEvent[Any]) -> dict[str, Any]:
    fields = event.to_dict() if event.type == "request_info" else {
        "type": event.type, "data": event.data}
    origin = getattr(event, "origin", None)
    fields["origin"] = None if origin is None else WorkflowEventSource(origin).value
    fields["state"] = None if event.state is None else event.state.value
    fields["details"] = event.details
    for name in _EVENT_FIELDS:
        fields[name] = getattr(event, name)
    return fields


def _fields_of(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, SerializationMixin):
        return value.to_dict()
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    raise TypeError(f"{_name(type(value))} is neither a dataclass, a pydantic model, an Enum "
                    "nor an Agent Framework serializable object")


def _built(cls: type[Any], value: Any) -> Any:
    if issubclass(cls, enum.Enum):
        return cls(value)
    if issubclass(cls, SerializationMixin):
        return cls.from_dict(value)
    if issubclass(cls, pydantic.BaseModel):
        return cls.model_validate(value)
    if dataclasses.is_dataclass(cls) and isinstance(value, dict):
        init = {field.name for field in dataclasses.fields(cls) if field.init}
        built = cls(**{name: item for name, item in value.items() if name in init})
        for name, item in value.items():
            if name not in init:
                object.__setattr__(built, name, item)
        return built
    raise TypeError(f"cannot rebuild a {_name(cls)} from a {type(value).__name__}")


def _framework_class(name: str) -> type[Any] | None:
    """An Agent Framework class by its stored name, looked up in modules already imported."""
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:split]))
        if module is None:
            continue
        found: Any = module
        for part in parts[split:]:
            found = vars(found).get(part) if hasattr(found, "__dict__") else None
        if isinstance(found, type) and _is_framework(found) and _name(found) == name:
            return found
        return None
    return None


def _checked_type(cls: object) -> type[Any]:
    if not isinstance(cls, type):
        raise ConfigurationError(f"checkpoint_types takes classes, got {shown(cls)}")
    storable = (issubclass(cls, (enum.Enum, pydantic.BaseModel))
                or dataclasses.is_dataclass(cls))
    if not storable:
        raise ConfigurationError(
            f"{_name(cls)} in checkpoint_types is not a dataclass, a pydantic model or an Enum: "
            "the storage would not know how to store its objects without pickle")
    return cls
