"""One depth limit on every path: what create accepts restores from an ordinary call depth
(in a worker thread too), and a planted record nested deeper is corrupt, never a RecursionError."""

from __future__ import annotations

import sys
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import anyio
import msgspec
import pytest

from fastcheckpoint import CheckpointManager, CorruptCheckpointError, SerializationError
from fastcheckpoint._codec import (
    MAX_DEPTH,
    Codec,
    Header,
    Payload,
    RunData,
    from_json_text,
    to_json_text,
)
from tests._helpers import STORE_KINDS, FakeClock, make_config, make_store

KEY = "runs/abc/c/00000000000000000007"

CALLER_FRAMES = 300
"""Frames a caller may already have on the stack (framework, event loop, agent code) on top of
pytest's own: restore of anything create accepted must still work."""


class Wrapped:
    """A type the codec only stores through enc_hook/dec_hook."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner


def wrap_hooks() -> dict[str, Any]:
    def enc_hook(obj: Any) -> Any:
        if isinstance(obj, Wrapped):
            return [obj.inner]
        raise NotImplementedError

    def dec_hook(type_name: str, value: Any) -> Any:
        return Wrapped(value[0])

    return {"enc_hook": enc_hook, "dec_hook": dec_hook}


NESTERS: dict[str, Callable[[Any], Any]] = {
    "list": lambda inner: [inner],
    "dict": lambda inner: {"k": inner},
    "tuple": lambda inner: (inner,),
    "frozenset": lambda inner: frozenset([inner]),
    "tuple-key": lambda inner: {("key", ("nested",)): inner},
    "enc_hook": Wrapped,
}
SUBSCRIPT = {"list": "[0]", "dict": "['k']", "tuple": "[0]", "frozenset": "[0]",
             "tuple-key": "[('key', ('nested',))]"}


def nest(kind: str, levels: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(levels):
        value = NESTERS[kind](value)
    return value


def encode(codec: Codec, state: dict[Any, Any], **parts: Any) -> bytes:
    return codec.encode_payload(
        state, parts.get("messages", []), parts.get("tool_calls", []), parts.get("context", {}))


def deepest_accepted(codec: Codec, kind: str) -> tuple[dict[str, Any], int]:
    """The most deeply nested ``state['a']`` of this kind that create accepts."""
    for levels in range(MAX_DEPTH + 5, 0, -1):
        state = {"a": nest(kind, levels)}
        try:
            encode(codec, state)
        except SerializationError:
            continue
        return state, levels
    raise AssertionError("nothing accepted")


def stack_depth() -> int:
    frame: FrameType | None = sys._getframe()
    depth = 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    return depth


def at_depth(frames: int, call: Callable[[], Any]) -> Any:
    """``call()`` with ``frames`` more Python frames on the stack."""
    if frames <= 0:
        return call()
    return at_depth(frames - 1, call)


def reframe(body: bytes) -> bytes:
    """A frame with a correct checksum around ``body``, as a tampering writer would make."""
    return b"FC\x01m\x00" + zlib.crc32(body).to_bytes(4, "big") + body


def planted_payload(state_body: bytes) -> bytes:
    """A payload record whose state is ``{"a": <state_body>}`` (raw msgpack)."""
    return reframe(b"\x94\x81\xa1a" + state_body + b"\x90\x90\x80")


def nested_arrays(levels: int) -> bytes:
    return b"\x91" * levels + b"\x01"


# -- create ---------------------------------------------------------------------------------


def fast_and_slow() -> list[Any]:
    # A tuple anywhere sends the whole payload through the Python walk.
    return [pytest.param({}, id="fast-path"), pytest.param({"tool_calls": [()]}, id="slow-path")]


@pytest.mark.parametrize("parts", fast_and_slow())
@pytest.mark.parametrize("kind", ["list", "dict"])
def test_the_limit_is_exact_on_both_paths(kind: str, parts: dict[str, Any]) -> None:
    codec = Codec()
    # state['a'] is one level down: MAX_DEPTH - 1 more containers put the leaf at MAX_DEPTH.
    encode(codec, {"a": nest(kind, MAX_DEPTH - 1)}, **parts)

    with pytest.raises(SerializationError) as caught:
        encode(codec, {"a": nest(kind, MAX_DEPTH)}, **parts)

    assert caught.value.path == "state['a']" + SUBSCRIPT[kind] * MAX_DEPTH
    assert f"more than {MAX_DEPTH} levels" in str(caught.value)


@pytest.mark.parametrize("parts", fast_and_slow())
@pytest.mark.parametrize("kind", ["list", "dict", "tuple", "frozenset"])
def test_a_value_nested_900_levels_deep_is_refused_naming_where_it_crosses_the_limit(
    kind: str, parts: dict[str, Any]
) -> None:
    with pytest.raises(SerializationError) as caught:
        encode(Codec(), {"a": nest(kind, 900)}, **parts)

    assert caught.value.path == "state['a']" + SUBSCRIPT[kind] * MAX_DEPTH


def test_the_limit_counts_from_each_part() -> None:
    codec = Codec()
    for part in ("messages", "tool_calls"):
        encode(codec, {}, **{part: [nest("list", MAX_DEPTH - 1)]})
        with pytest.raises(SerializationError) as caught:
            encode(codec, {}, **{part: [nest("list", MAX_DEPTH)]})
        assert caught.value.path == f"{part}[0]" + "[0]" * MAX_DEPTH
    with pytest.raises(SerializationError) as caught:
        encode(codec, {}, context={"c": nest("dict", MAX_DEPTH)})
    assert caught.value.path == "context['c']" + "['k']" * MAX_DEPTH


def test_values_an_enc_hook_returns_count_toward_the_limit() -> None:
    codec = Codec(**wrap_hooks())

    _, levels = deepest_accepted(codec, "enc_hook")
    with pytest.raises(SerializationError) as caught:
        encode(codec, {"a": nest("enc_hook", 900)})

    assert MAX_DEPTH // 2 - 1 <= levels < MAX_DEPTH  # each object costs its value's level too
    assert caught.value.path is not None
    assert caught.value.path.startswith("state['a'][0]")


def test_create_near_the_recursion_limit_raises_serialization_error_not_recursion_error() -> None:
    # The slow path recurses in Python; a caller already near the limit gets a typed error.
    state = {"a": nest("tuple", MAX_DEPTH - 1)}
    headroom = sys.getrecursionlimit() - stack_depth() - 60

    with pytest.raises(SerializationError, match="call stack"):
        at_depth(headroom, lambda: encode(Codec(), state))


# -- restore of what create accepted --------------------------------------------------------


def codec_for(kind: str) -> Codec:
    return Codec(**wrap_hooks()) if kind == "enc_hook" else Codec()


def decode_deepest(kind: str) -> Callable[[], None]:
    """A call that decodes the deepest value of ``kind`` create accepts and checks it."""
    codec = codec_for(kind)
    state, levels = deepest_accepted(codec, kind)
    blob = encode(codec, state)

    def decode() -> None:
        restored = codec.decode_payload(blob, KEY).state["a"]
        for _ in range(levels):  # the whole depth came back, with its types
            assert type(restored) is type(NESTERS[kind](None))
            restored = restored.inner if kind == "enc_hook" else next(iter(
                restored.values() if isinstance(restored, dict) else restored))
        assert restored == 1

    return decode


KINDS = list(NESTERS)


@pytest.mark.parametrize("kind", KINDS)
def test_the_deepest_accepted_value_decodes_from_a_deep_call_stack(kind: str) -> None:
    at_depth(CALLER_FRAMES, decode_deepest(kind))


@pytest.mark.anyio
@pytest.mark.parametrize("kind", KINDS)
async def test_the_deepest_accepted_value_decodes_in_a_worker_thread(kind: str) -> None:
    decode = decode_deepest(kind)
    with anyio.fail_after(30):
        await anyio.to_thread.run_sync(lambda: at_depth(CALLER_FRAMES, decode))


@pytest.mark.parametrize("kind", KINDS)
def test_the_deepest_accepted_value_decodes_in_a_thread_with_a_small_stack(kind: str) -> None:
    # 512 KiB: the default for secondary threads on some platforms (Python's own is larger).
    decode = decode_deepest(kind)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            at_depth(CALLER_FRAMES, decode)
        except BaseException as exc:
            errors.append(exc)

    previous = threading.stack_size(512 * 1024)
    try:
        thread = threading.Thread(target=run)
        thread.start()
    finally:
        threading.stack_size(previous)
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert errors == []


@pytest.mark.anyio
@pytest.mark.parametrize("store_kind", STORE_KINDS)
async def test_manager_refuses_a_900_level_state_and_restores_the_deepest_accepted_one(
    store_kind: str, tmp_path: Path
) -> None:
    manager = CheckpointManager(make_store(store_kind, tmp_path), make_config(FakeClock()))
    deepest = {"a": nest("list", MAX_DEPTH - 1)}

    async def restore_from_deep_stack(frames: int) -> Any:
        if frames:
            return await restore_from_deep_stack(frames - 1)
        return await manager.restore("run")

    with anyio.fail_after(30):
        with pytest.raises(SerializationError) as caught:
            await manager.create("run", {"a": nest("list", 900)})
        assert caught.value.path == "state['a']" + "[0]" * MAX_DEPTH
        assert await manager.restore("run") is None  # nothing was written
        await manager.create("run", deepest)
        restored = await restore_from_deep_stack(CALLER_FRAMES)

    assert restored is not None
    assert restored.state == deepest


# -- planted records --------------------------------------------------------------------------


def test_a_planted_payload_just_inside_the_limit_decodes() -> None:
    # The control for the tests below: the planted frame itself is well formed.
    payload = Codec().decode_payload(planted_payload(nested_arrays(MAX_DEPTH - 1)), KEY)

    assert payload.state["a"] == nest("list", MAX_DEPTH - 1)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(nested_arrays(MAX_DEPTH), id="one-level-too-deep"),
        pytest.param(nested_arrays(100_000), id="100k-levels"),
        pytest.param(b"\x81\xa1k" * MAX_DEPTH + b"\x01", id="maps-one-level-too-deep"),
    ],
)
def test_a_planted_deeply_nested_payload_is_corrupt_not_a_recursion_error(body: bytes) -> None:
    with pytest.raises(CorruptCheckpointError) as caught:
        Codec().decode_payload(planted_payload(body), KEY)

    assert caught.value.key == KEY
    assert "deep" in str(caught.value)


def test_planted_arrays_claiming_a_million_items_each_are_corrupt_not_a_memory_error() -> None:
    body = b"\xdd\x00\x10\x00\x00" * 5_000  # 5,000 levels, each "1,048,576 items long"

    with pytest.raises(CorruptCheckpointError) as caught:
        Codec().decode_payload(planted_payload(body), KEY)

    assert caught.value.key == KEY


def nested_extensions(code: int, levels: int) -> bytes:
    """msgpack for ``levels`` extensions of ``code`` each holding a one-item list."""
    inner = msgspec.msgpack.encode(1)
    for _ in range(levels):
        inner = msgspec.msgpack.encode(msgspec.msgpack.Ext(code, b"\x91" + inner))
    return inner


def nested_user_extensions(levels: int) -> bytes:
    inner = msgspec.msgpack.encode(1)
    for _ in range(levels):
        pair = b"\x92" + msgspec.msgpack.encode("tests.Wrapped") + b"\x91" + inner
        inner = msgspec.msgpack.encode(msgspec.msgpack.Ext(2, pair))
    return inner


@pytest.mark.parametrize(
    ("body", "hooks"),
    [
        pytest.param(nested_extensions(3, MAX_DEPTH), {}, id="tuples-one-level-too-deep"),
        pytest.param(nested_extensions(3, 3_000), {}, id="3000-tuples"),
        pytest.param(nested_extensions(5, MAX_DEPTH), {}, id="frozensets-one-level-too-deep"),
        pytest.param(nested_extensions(5, 3_000), {}, id="3000-frozensets"),
        pytest.param(nested_user_extensions(MAX_DEPTH), {}, id="user-values-one-level-too-deep"),
        pytest.param(nested_user_extensions(3_000), {}, id="3000-user-values"),
        # What dec_hook builds is opaque to the depth check: the recursion guard applies.
        pytest.param(nested_user_extensions(3_000), wrap_hooks(), id="3000-with-dec-hook"),
    ],
)
def test_planted_nested_extensions_are_corrupt_not_a_recursion_error(
    body: bytes, hooks: dict[str, Any]
) -> None:
    with pytest.raises(CorruptCheckpointError) as caught:
        Codec(**hooks).decode_payload(planted_payload(body), KEY)

    assert caught.value.key == KEY


class Chain:
    """Stored as its length; ``dec_hook`` rebuilds it as nested lists, deeper than stored."""

    def __init__(self, length: int) -> None:
        self.length = length


def chain_hooks() -> dict[str, Any]:
    def enc_hook(obj: Any) -> Any:
        if isinstance(obj, Chain):
            return obj.length
        raise NotImplementedError

    def dec_hook(type_name: str, value: Any) -> Any:
        return nest("list", value) if type_name.endswith("Chain") else value

    return {"enc_hook": enc_hook, "dec_hook": dec_hook}


def test_what_dec_hook_builds_may_nest_deeper_than_the_limit() -> None:
    # Only what is stored counts: create accepted it, so restore must return it.
    codec = Codec(**chain_hooks())

    payload = codec.decode_payload(encode(codec, {"chain": Chain(3 * MAX_DEPTH)}), KEY)

    assert payload.state["chain"] == nest("list", 3 * MAX_DEPTH)


def test_a_planted_deep_value_is_corrupt_before_dec_hook_sees_it() -> None:
    seen: list[str] = []

    def dec_hook(type_name: str, value: Any) -> Any:
        seen.append(type_name)
        return value

    pair = b"\x92" + msgspec.msgpack.encode("tests.Chain") + nested_arrays(MAX_DEPTH + 1)
    body = msgspec.msgpack.encode(msgspec.msgpack.Ext(2, pair))

    with pytest.raises(CorruptCheckpointError):
        Codec(dec_hook=dec_hook).decode_payload(planted_payload(body), KEY)
    assert seen == []


def test_a_planted_header_nested_deeply_is_corrupt() -> None:
    body = b"\x95\xa3run\xa0\xc0" + nested_arrays(100_000) + b"\xc0"

    with pytest.raises(CorruptCheckpointError) as caught:
        Codec().decode_header(reframe(body), KEY)

    assert caught.value.key == KEY


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 100_000])
def test_planted_run_details_nested_deeply_are_corrupt(levels: int) -> None:
    codec = Codec()
    request = msgspec.msgpack.decode(nested_arrays(MAX_DEPTH - 1))
    written = codec.encode_run_data(RunData(approval={"request": {"items": request}}))
    assert codec.decode_run_data(written, KEY).approval == {"request": {"items": request}}
    body = b"\x94\xc0\x81\xa7request" + nested_arrays(levels) + b"\x80\x90"

    with pytest.raises(CorruptCheckpointError) as caught:
        codec.decode_run_data(reframe(body), KEY)

    assert caught.value.key == KEY


def test_deeply_nested_json_text_raises_serialization_error() -> None:
    with pytest.raises(SerializationError):
        from_json_text("[" * 100_000 + "]" * 100_000)


def test_json_text_of_a_deeply_nested_value_raises_serialization_error() -> None:
    value: list[Any] = []
    for _ in range(100_000):
        value = [value]

    with pytest.raises(SerializationError):
        to_json_text(value)


def test_header_and_payload_round_trip_unchanged_by_the_depth_checks() -> None:
    codec = Codec()
    header = Header("run", "step", None, ["t"], None)
    payload = Payload({"a": [1]}, [], [], {})

    assert codec.decode_header(codec.encode_header(header), KEY) == header
    assert codec.decode_payload(encode(codec, payload.state), KEY) == payload
