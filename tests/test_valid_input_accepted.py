"""Valid input in the forms callers and frameworks hand it over is accepted, and means what
its plain form means.

The public-surface fuzz checks that bad input is refused; these tests check the opposite:
an ``IntEnum`` or a numpy integer as a count, a ``str`` enum as a run id or a status, tags as
a tuple or a deque, an approval request built by ``model_dump()`` (which keeps enums), an
``OrderedDict``, unicode outside the BMP. Each is taken for its plain value, and what is
stored, listed and restored equals what the plain form gives. A ``bool`` is still no count
or number, and a flag is still only ``True`` or ``False``.

The property at the end runs 25 examples per store; ``VALID_INPUT_EXAMPLES=2000`` runs more.
"""

from __future__ import annotations

import collections
import enum
import os
import types
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastcheckpoint import (
    Checkpoint,
    CheckpointConfig,
    CheckpointManager,
    CheckpointMetadata,
    CheckpointStatus,
    RetryPolicy,
    ValidationError,
)
from fastcheckpoint.stores._base import check_int, check_keep_latest, check_limit
from fastcheckpoint.stores.file import FileStore
from fastcheckpoint.stores.memory import MemoryStore


class Runs(enum.StrEnum):
    SUPPORT = "support-ticket-🎫-42"


class Steps(enum.StrEnum):
    PLAN = "plan"


class Sizes(enum.IntEnum):
    TWO = 2
    SIXTY = 60


class Risk(enum.StrEnum):
    HIGH = "high"


class Level(enum.IntEnum):
    THREE = 3


@pytest.fixture
async def manager() -> AsyncIterator[CheckpointManager]:
    manager = CheckpointManager(MemoryStore())
    yield manager
    await manager.aclose()


async def _made(manager: CheckpointManager, run_id: str, count: int) -> list[Checkpoint]:
    made = []
    for step in range(count):
        checkpoint = await manager.create(run_id, {"step": step}, force=True)
        assert checkpoint is not None
        made.append(checkpoint)
    return made


# -- counts and sequences: IntEnum members and numpy integers ---------------------------------

@pytest.mark.parametrize("limit", [np.int64(2), np.int32(2), np.uint8(2), Sizes.TWO],
                         ids=["int64", "int32", "uint8", "IntEnum"])
@pytest.mark.anyio
async def test_counts_of_numpy_and_enum_integers_mean_their_value(
    manager: CheckpointManager, limit: Any
) -> None:
    with anyio.fail_after(10):
        made = await _made(manager, "r", 4)
        listed = await manager.list_checkpoints("r", limit)
        assert [m.checkpoint_id for m in listed] == [c.checkpoint_id for c in made[:1:-1]]
        page = await manager.list_runs(limit=limit)
        assert [run.run_id for run in page] == ["r"]
        chunks = [chunk async for chunk in manager.export_run("r", page_size=limit)]
        assert all(c.checkpoint_id in "".join(chunks) for c in made)
        assert await manager.prune("r", limit) == 2
        assert [m.sequence for m in await manager.list_checkpoints("r")] == [3, 2]


@pytest.mark.anyio
async def test_sequences_of_numpy_integers_mean_their_value(manager: CheckpointManager) -> None:
    with anyio.fail_after(10):
        first = await manager.create("r", {}, expected_sequence=np.int64(0))
        assert first is not None
        assert first.metadata.sequence == 0
        second = await manager.create("r", {}, expected_sequence=np.int64(1), force=True)
        assert second is not None
        assert type(second.metadata.sequence) is int
        run = await manager.pause("r", {"ask": "ok?"}, latest_sequence=np.int64(1))
        assert run.status is CheckpointStatus.PAUSED


@pytest.mark.parametrize("ttl", [np.int64(60), np.float32(60.0), Sizes.SIXTY, 60],
                         ids=["int64", "float32", "IntEnum", "int"])
@pytest.mark.anyio
async def test_ttl_of_any_real_number_type(manager: CheckpointManager, ttl: Any) -> None:
    with anyio.fail_after(10):
        checkpoint = await manager.create("r", {}, ttl_seconds=ttl)
        assert checkpoint is not None
        assert checkpoint.metadata.ttl_seconds == 60.0
        assert type(checkpoint.metadata.ttl_seconds) is float
        listed = await manager.list_checkpoints("r")
        assert listed[0].ttl_seconds == 60.0
        assert listed[0].expires_at == checkpoint.metadata.expires_at
        forked = await manager.fork(checkpoint.checkpoint_id, "f", ttl_seconds=ttl)
        assert forked.metadata.ttl_seconds == 60.0


@pytest.mark.anyio
async def test_bool_is_still_no_count_and_int_no_flag(manager: CheckpointManager) -> None:
    with anyio.fail_after(10):
        await _made(manager, "r", 1)
        for call in (lambda: manager.list_checkpoints("r", True),
                     lambda: manager.list_runs(limit=True),
                     lambda: manager.prune("r", True),
                     lambda: manager.create("r", {}, ttl_seconds=True),
                     lambda: manager.create("r", {}, expected_sequence=False),
                     lambda: manager.list_checkpoints("r", include_expired=1),  # type: ignore[arg-type]
                     lambda: manager.create("r", {}, force=1)):  # type: ignore[arg-type]
            with pytest.raises(ValidationError):
                await call()
        with pytest.raises(ValidationError):
            manager.export_run("r", page_size=True)


# -- tags ----------------------------------------------------------------------------------

@pytest.mark.parametrize("tags", [
    ("a", "b"), collections.deque(["a", "b"]), collections.UserList(["a", "b"]),
    [Steps.PLAN, "b"],
], ids=["tuple", "deque", "UserList", "StrEnum"])
@pytest.mark.anyio
async def test_tags_in_any_sequence(manager: CheckpointManager, tags: Any) -> None:
    plain = [str.__str__(tag) for tag in tags]
    with anyio.fail_after(10):
        checkpoint = await manager.create("r", {}, tags=tags)
        assert checkpoint is not None
        assert checkpoint.metadata.tags == plain
        assert [type(tag) for tag in checkpoint.metadata.tags] == [str, str]
        listed = await manager.list_checkpoints("r", tags=tags)
        assert [m.tags for m in listed] == [plain]


# -- approval requests -----------------------------------------------------------------------

@pytest.mark.anyio
async def test_request_values_that_json_writes_as_plain_values(
    manager: CheckpointManager,
) -> None:
    """A request from ``model_dump()`` keeps enum members; an ``OrderedDict`` or a numpy
    integer is what JSON writes as an object or a number: each is the plain JSON value."""
    request = {
        "risk": Risk.HIGH,
        "level": Level.THREE,
        "tools": collections.OrderedDict(search={"calls": np.int64(3)}),
        "score": np.float64(0.5),
        Risk.HIGH: ["a", Risk.HIGH],
    }
    plain = {"risk": "high", "level": 3, "tools": {"search": {"calls": 3}}, "score": 0.5,
             "high": ["a", "high"]}
    with anyio.fail_after(10):
        await _made(manager, "r", 1)
        run = await manager.pause("r", types.MappingProxyType(request))
        assert run.approval is not None
        assert run.approval["request"] == plain
        assert _types(run.approval["request"]) == _types(plain)
        again = await manager.get_run("r")
        assert again is not None
        assert again.approval == run.approval


def _types(value: object) -> object:
    if isinstance(value, dict):
        return {key: _types(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_types(item) for item in value]
    return type(value)


class EveryKeyEqual(str):
    __hash__ = str.__hash__

    def __eq__(self, other: object) -> bool:
        return True


@pytest.mark.anyio
async def test_request_values_that_change_meaning_are_still_refused(
    manager: CheckpointManager,
) -> None:
    looped: dict[str, Any] = {}
    looped["a"] = looped
    looped["b"] = looped
    with anyio.fail_after(10):
        await _made(manager, "r", 1)
        for request in ({"a": (1, 2)}, {"a": Risk.HIGH, "b": (1,)}, {"a": {1: "x"}},
                        {"a": float("nan")}, {"a": Risk.HIGH, "b": looped}):
            with pytest.raises(ValidationError, match="JSON values only"):
                await manager.pause("r", request)
        run = await manager.get_run("r")
        assert run is not None
        assert run.status is CheckpointStatus.ACTIVE


@pytest.mark.parametrize("shown", [int, np.float64, float], ids=["int", "float64", "float"])
@pytest.mark.anyio
async def test_requested_at_of_any_real_number_type(
    manager: CheckpointManager, shown: Callable[[float], Any]
) -> None:
    clock = iter(float(second) for second in range(1000, 2000))
    manager.config.clock = lambda: next(clock)
    with anyio.fail_after(10):
        await _made(manager, "r", 1)
        paused = await manager.pause("r", {"ask": "ok?"})
        assert paused.approval is not None
        at = shown(paused.approval["requested_at"])
        run = await manager.approve("r", approver="ana", requested_at=at)
        assert run.status is CheckpointStatus.ACTIVE
        assert run.approval is not None
        assert run.approval["decided_by"] == "ana"


# -- the model built by hand -----------------------------------------------------------------

def test_metadata_of_equivalent_forms_is_its_plain_form() -> None:
    given = CheckpointMetadata(
        run_id=Runs.SUPPORT, checkpoint_id="ck", sequence=np.int64(3), created_at=np.float32(2.5),
        status="paused", step_name=Steps.PLAN, tags=("a", Steps.PLAN),  # type: ignore[arg-type]
        ttl_seconds=Sizes.SIXTY, expires_at=np.float64(62.5))
    plain = CheckpointMetadata(
        run_id=Runs.SUPPORT.value, checkpoint_id="ck", sequence=3, created_at=2.5,
        status=CheckpointStatus.PAUSED, step_name="plan", tags=["a", "plan"], ttl_seconds=60.0,
        expires_at=62.5)
    assert given == plain
    assert _types(given.to_dict()) == _types(plain.to_dict())
    assert Checkpoint(given).to_json() == Checkpoint(plain).to_json()


def test_metadata_from_a_row_of_numpy_numbers() -> None:
    """``from_dict`` of a row read from a table (a DataFrame's ``to_dict`` gives numpy
    numbers) is the metadata of the plain row."""
    row = {"run_id": "r", "sequence": np.int64(3), "created_at": np.float64(2.5),
           "ttl_seconds": np.int32(60), "status": CheckpointStatus.PAUSED}
    plain = {"run_id": "r", "sequence": 3, "created_at": 2.5, "ttl_seconds": 60.0,
             "status": "paused"}
    given = CheckpointMetadata.from_dict(row)
    assert given == CheckpointMetadata.from_dict(plain)
    assert _types(given.to_dict()) == _types(CheckpointMetadata.from_dict(plain).to_dict())
    assert given.expires_at == 62.5


def test_metadata_refusals_stand() -> None:
    for fields in ({"sequence": True}, {"created_at": "1"}, {"tags": "ab"}, {"tags": [1]},
                   {"ttl_seconds": False}, {"sequence": 1.0}):
        with pytest.raises(ValidationError):
            CheckpointMetadata(run_id="r", **fields)
        with pytest.raises(ValidationError):
            CheckpointMetadata.from_dict({"run_id": "r", **fields})


# -- configuration ---------------------------------------------------------------------------

@pytest.mark.anyio
async def test_config_numbers_of_numpy_and_enum_types() -> None:
    """Settings read from a table or a settings model arrive as numpy or enum numbers; the
    manager hands the stores plain ones (a store refuses a numpy ``keep_latest``)."""
    config = CheckpointConfig(
        max_checkpoints_per_run=np.int64(2), default_ttl_seconds=np.int64(60),
        cleanup_interval=np.float32(5.0), compress_min_bytes=Sizes.SIXTY,
        retry=RetryPolicy(base_delay=np.float32(0.5), max_delay=1, max_retries=np.int8(2)))
    assert type(config.max_checkpoints_per_run) is int
    assert type(config.default_ttl_seconds) is float
    assert type(config.compress_min_bytes) is int
    assert type(config.retry.max_retries) is int
    assert config.retry == RetryPolicy(base_delay=0.5, max_delay=1, max_retries=2)
    manager = CheckpointManager(MemoryStore(), config)
    with anyio.fail_after(10):
        await _made(manager, "r", 3)
        listed = await manager.list_checkpoints("r")
        assert [m.sequence for m in listed] == [2, 1]
        assert listed[0].ttl_seconds == 60.0
        await manager.aclose()
    for bad in ({"max_checkpoints_per_run": True}, {"cleanup_interval": np.bool_(True)}):
        with pytest.raises(Exception, match="must be"):
            CheckpointConfig(**bad)  # type: ignore[arg-type]


class Kept(int, enum.Enum):
    TWO = 2


@pytest.mark.anyio
async def test_config_numbers_assigned_after_construction() -> None:
    """The manager reads its config at every create (as FastAgentic does): a limit or TTL
    assigned later as a numpy or enum number is its value, handed to the store as a plain
    number (an int-mixin enum's text is no number to a Redis script)."""
    config = CheckpointConfig()
    manager = CheckpointManager(MemoryStore(), config)
    config.max_checkpoints_per_run = np.int64(2)  # type: ignore[assignment]
    config.default_ttl_seconds = np.int64(60)  # type: ignore[assignment]
    with anyio.fail_after(10):
        await _made(manager, "r", 4)
        listed = await manager.list_checkpoints("r")
        assert [m.sequence for m in listed] == [3, 2]
        assert listed[0].ttl_seconds == 60.0
        await manager.aclose()
    config.max_checkpoints_per_run = Kept.TWO
    assert config.keep_latest == 2
    assert type(config.keep_latest) is int


def test_store_checks_hand_back_plain_ints() -> None:
    """What a store's argument checks return is what it hands its driver: a plain ``int``,
    never an ``int`` subclass whose text is no number (``str(Kept.TWO)`` is
    ``'Kept.TWO'``)."""
    for returned in (check_keep_latest(Kept.TWO), check_int("sequence", Kept.TWO),
                     check_limit("limit", Kept.TWO)):
        assert returned == 2
        assert type(returned) is int
    assert check_keep_latest(None) is None


def test_from_env_takes_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTCHECKPOINT_URL", "memory://")
    monkeypatch.setenv("FASTCHECKPOINT_MAX_CHECKPOINTS_PER_RUN", " 7 ")
    manager = CheckpointManager.from_env(os.environ)
    assert manager.config.max_checkpoints_per_run == 7
    assert CheckpointConfig.from_env(os.environ).max_checkpoints_per_run == 7


# -- the property: alternative forms store what their plain forms store ------------------------

EXAMPLES = int(os.environ.get("VALID_INPUT_EXAMPLES", "25"))

_text = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)


def _str_forms(text: str) -> st.SearchStrategy[str]:
    """``text`` as it is, or as a member of a str enum, or of a str subclass."""
    member = enum.StrEnum("Named", {"MEMBER": text})  # type: ignore[misc]
    return st.sampled_from([text, member.MEMBER, type("Text", (str,), {})(text)])


def _int_forms(value: int) -> st.SearchStrategy[Any]:
    member = enum.IntEnum("Counted", {"MEMBER": value})  # type: ignore[misc]
    return st.sampled_from([value, member.MEMBER, np.int64(value), np.uint32(value)])


def _tags_forms(tags: list[str]) -> st.SearchStrategy[Any]:
    return st.sampled_from([tags, tuple(tags), collections.deque(tags),
                            collections.UserList(tags)])


def _mapping_forms(state: dict[str, Any]) -> st.SearchStrategy[Any]:
    return st.sampled_from([state, types.MappingProxyType(state),
                            collections.UserDict(state)])


@st.composite
def _calls(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """Arguments of a create and a listing, in plain form and in the drawn other forms."""
    run_id = draw(_text)
    step = draw(_text)
    tags = draw(st.lists(_text, max_size=3, unique=True))
    state = {draw(_text): draw(st.integers(-(2**63), 2**63 - 1))}
    ttl = draw(st.integers(1, 10**6))
    limit = draw(st.integers(1, 5))
    asked, level = draw(_text), draw(st.integers(0, 2**31))
    approver, comment = draw(_text), draw(_text)
    plain = {"run_id": run_id, "step_name": step, "tags": tags, "state": state,
             "ttl_seconds": ttl, "limit": limit, "request": {"ask": asked, "level": level},
             "approver": approver, "comment": comment, "status": "active"}
    forms = {"run_id": draw(_str_forms(run_id)), "step_name": draw(_str_forms(step)),
             "tags": draw(_tags_forms(tags)), "state": draw(_mapping_forms(state)),
             "ttl_seconds": draw(_int_forms(ttl)), "limit": draw(_int_forms(limit)),
             "request": draw(_mapping_forms({"ask": draw(_str_forms(asked)),
                                             "level": draw(_int_forms(level))})),
             "approver": draw(_str_forms(approver)), "comment": draw(_str_forms(comment)),
             "status": draw(st.sampled_from(["active", CheckpointStatus.ACTIVE]))}
    return plain, forms


async def _stored(manager: CheckpointManager, call: dict[str, Any]) -> tuple[Any, ...]:
    made = await manager.create(call["run_id"], call["state"], step_name=call["step_name"],
                                tags=call["tags"], ttl_seconds=call["ttl_seconds"])
    assert made is not None
    restored = await manager.restore(call["run_id"])
    listed = await manager.list_checkpoints(call["run_id"], call["limit"], tags=call["tags"],
                                            step_name=call["step_name"])
    paused = await manager.pause(call["run_id"], call["request"])
    assert paused.approval is not None
    run = await manager.approve(call["run_id"], approver=call["approver"],
                                comment=call["comment"],
                                requested_at=paused.approval["requested_at"])
    listed_runs = [info.run_id for info in await manager.list_runs(call["status"])]
    assert restored is not None
    await manager.delete_run(call["run_id"])
    approval = {key: value for key, value in (run.approval or {}).items()
                if key not in ("requested_at", "decided_at")}

    def shape(metadata: CheckpointMetadata) -> tuple[Any, ...]:
        fields = metadata.to_dict()
        for varying in ("checkpoint_id", "created_at", "expires_at"):
            fields.pop(varying)
        return tuple(sorted(fields.items())), _types(fields)

    return (shape(made.metadata), shape(restored.metadata), [shape(m) for m in listed],
            restored.state, _types(restored.state), run.run_id, type(run.run_id), approval,
            _types(approval), [(change.status, change.actor, change.note)
                               for change in run.history], listed_runs)


def _file_store(tmp: Path) -> FileStore:
    return FileStore(tmp / "store")


@pytest.mark.parametrize("make_store", [lambda _: MemoryStore(), _file_store],
                         ids=["memory", "file"])
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=_calls())
def test_other_forms_store_what_plain_forms_store(
    make_store: Callable[[Path], Any], tmp_path: Path,
    calls: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    plain, forms = calls

    async def both() -> None:
        manager = CheckpointManager(make_store(tmp_path))
        try:
            with anyio.fail_after(20):
                assert await _stored(manager, forms) == await _stored(manager, plain)
        finally:
            await manager.aclose()

    anyio.run(both)
