"""Fixes from a review of the session adapters: a Pydantic AI write retried after a lost
reply, damaged Agent Framework checkpoints in listings, arguments of the wrong type given to
the ADK and OpenAI Agents adapters. Each test failed before its fix."""

from __future__ import annotations

from collections import Counter
from typing import Any

import anyio
import pytest

pytest.importorskip("pydantic_ai")

from pydantic_ai.conversation_store import (
    ConversationConflict,
    ConversationEntry,
    ConversationRecord,
)
from pydantic_ai.messages import ModelRequest, UserPromptPart

from fastcheckpoint.errors import CorruptCheckpointError, StoreError
from fastcheckpoint.integrations import _pydantic_ai_records as records
from fastcheckpoint.integrations.pydantic_ai import FastConversationStore
from fastcheckpoint.stores.memory import MemoryStore
from tests._helpers import FakeClock

pytestmark = pytest.mark.anyio

DEADLINE = 5


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


# -- Pydantic AI: a write whose reply was lost ------------------------------------------------


class LostReply(MemoryStore):
    """``lose_reply``: the next append is applied, then fails as if its reply were lost.
    ``reads_fail``: that many reads of one checkpoint (``get``) fail meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.lose_reply = False
        self.reads_fail = 0
        self.calls: Counter[str] = Counter()

    async def append(self, *args: Any, **kwargs: Any) -> Any:
        self.calls["append"] += 1
        status = await super().append(*args, **kwargs)
        if self.lose_reply:
            self.lose_reply = False
            raise StoreError("connection reset after the write")
        return status

    async def get(self, *args: Any, **kwargs: Any) -> Any:
        self.calls["get"] += 1
        if self.reads_fail:
            self.reads_fail -= 1
            raise StoreError("connection refused")
        return await super().get(*args, **kwargs)


def _entry(text: str, parent: ConversationEntry | None = None) -> ConversationEntry:
    return ConversationEntry(parent_id=None if parent is None else parent.id,
                             message=ModelRequest(parts=[UserPromptPart(content=text)]))


def _texts(entries: list[ConversationEntry] | None) -> list[str]:
    assert entries is not None
    return [str(part.content) for entry in entries for part in entry.message.parts
            if isinstance(part, UserPromptPart)]


async def _started(store: FastConversationStore) -> tuple[ConversationEntry, ConversationRecord]:
    first = _entry("hi")
    record = ConversationRecord(conversation_id="c", head_id=first.id)
    await store.write_record(record, new_entries=[first], expected_revision=None)
    return first, record


async def test_a_write_whose_reply_was_lost_is_recognised_by_one_read() -> None:
    backing = LostReply()
    with anyio.fail_after(DEADLINE):
        async with FastConversationStore(backing) as store:
            first, r0 = await _started(store)
            turn = _entry("two", first)
            r1 = ConversationRecord(conversation_id="c", head_id=turn.id)
            backing.lose_reply = True
            backing.calls.clear()
            await store.write_record(r1, new_entries=[turn], expected_revision=r0.revision)
            assert backing.calls == {"append": 1, "get": 1}
            assert _texts(await FastConversationStore(backing).load_entries("c")) == ["hi", "two"]


async def test_a_retried_write_whose_first_call_landed_succeeds_and_keeps_its_entries() -> None:
    backing = LostReply()
    with anyio.fail_after(DEADLINE):
        async with FastConversationStore(backing) as store:
            first, r0 = await _started(store)
            turn = _entry("two", first)
            r1 = ConversationRecord(conversation_id="c", head_id=turn.id)
            backing.lose_reply, backing.reads_fail = True, 1
            with pytest.raises(StoreError):
                await store.write_record(r1, new_entries=[turn], expected_revision=r0.revision)
            await store.write_record(r1, new_entries=[turn], expected_revision=r0.revision)
            fresh = FastConversationStore(backing)
            stored = await fresh.read_record("c")
            assert stored is not None
            assert stored.revision == r1.revision
            assert await fresh.read_entry(turn.id) == turn
            assert _texts(await fresh.load_entries("c")) == ["hi", "two"]


async def test_a_retried_new_conversation_keeps_its_entries_in_the_stored_family() -> None:
    """The retry registered a family of its own and wrote the entries into it: the family
    goes, the entries stay with the stored record's family (``cleanup_expired`` would
    otherwise release the retry's empty family and the entries with it)."""
    backing, clock = LostReply(), FakeClock()
    with anyio.fail_after(DEADLINE):
        async with FastConversationStore(backing, clock=clock) as store:
            first = _entry("hi")
            record = ConversationRecord(conversation_id="c", head_id=first.id)
            backing.lose_reply, backing.reads_fail = True, 1
            with pytest.raises(StoreError):
                await store.write_record(record, new_entries=[first], expected_revision=None)
            await store.write_record(record, new_entries=[first], expected_revision=None)
            families = await backing.scan_items(records.FAMILIES_KEY, limit=10, now=clock())
            assert len(families) == 1
            clock.advance(2 * 3600)
            assert await store.cleanup_expired() == 0
            fresh = FastConversationStore(backing, clock=clock)
            assert _texts(await fresh.load_entries("c")) == ["hi"]
            fork = ConversationRecord(conversation_id="f", head_id=first.id)
            await fresh.write_record(fork, expected_revision=None)  # joins the stored family
            stored = await fresh.read_record("c")
            assert stored is not None
            await fresh.delete_record("c", expected_revision=stored.revision)
            assert _texts(await fresh.load_entries("f")) == ["hi"]


async def test_a_retry_that_loses_after_an_uncertain_call_leaves_the_entries() -> None:
    """The first call landed, unseen; another writer then saved over it. The retry loses,
    and the entries it wrote are the stored record's history: they stay."""
    backing = LostReply()
    with anyio.fail_after(DEADLINE):
        async with FastConversationStore(backing) as store:
            first, r0 = await _started(store)
            turn = _entry("two", first)
            r1 = ConversationRecord(conversation_id="c", head_id=turn.id)
            backing.lose_reply, backing.reads_fail = True, 1
            with pytest.raises(StoreError):
                await store.write_record(r1, new_entries=[turn], expected_revision=r0.revision)
            other = FastConversationStore(backing)
            later = _entry("three", turn)
            r2 = ConversationRecord(conversation_id="c", head_id=later.id)
            await other.write_record(r2, new_entries=[later], expected_revision=r1.revision)
            with pytest.raises(ConversationConflict):
                await store.write_record(r1, new_entries=[turn], expected_revision=r0.revision)
            fresh = FastConversationStore(backing)
            assert _texts(await fresh.load_entries("c")) == ["hi", "two", "three"]


async def test_a_stored_record_written_again_is_a_conflict_that_keeps_its_entries() -> None:
    """Pydantic AI's contract: writing a stored record again, with no earlier call of it
    that failed, is a conflict. Its entries are the stored record's: they stay, in its
    family (not in the family the repeated write registered, which goes)."""
    backing, clock = LostReply(), FakeClock()
    with anyio.fail_after(DEADLINE):
        async with FastConversationStore(backing, clock=clock) as store:
            first, r0 = await _started(store)
            with pytest.raises(ConversationConflict):
                await store.write_record(r0, new_entries=[first], expected_revision=None)
            with pytest.raises(ConversationConflict):
                await store.write_record(r0, new_entries=[first], expected_revision="other")
            families = await backing.scan_items(records.FAMILIES_KEY, limit=10, now=clock())
            assert len(families) == 1
            clock.advance(2 * 3600)
            assert await store.cleanup_expired() == 0
            assert _texts(await FastConversationStore(backing).load_entries("c")) == ["hi"]


async def test_a_write_that_loses_a_race_still_removes_its_entries() -> None:
    backing = LostReply()
    with anyio.fail_after(DEADLINE):
        async with FastConversationStore(backing) as store:
            first, r0 = await _started(store)
            winner, loser = _entry("win", first), _entry("lose", first)
            await FastConversationStore(backing).write_record(
                ConversationRecord(conversation_id="c", head_id=winner.id),
                new_entries=[winner], expected_revision=r0.revision)
            with pytest.raises(ConversationConflict):
                await store.write_record(
                    ConversationRecord(conversation_id="c", head_id=loser.id),
                    new_entries=[loser], expected_revision=r0.revision)
            with pytest.raises(LookupError):
                await FastConversationStore(backing).read_entry(loser.id)


async def test_a_record_whose_history_is_gone_is_a_corrupt_checkpoint() -> None:
    backing = LostReply()
    with anyio.fail_after(DEADLINE):
        async with FastConversationStore(backing) as store:
            first, _ = await _started(store)
            await backing.delete_items(records.entries_run_key(first.id),
                                       [records.entry_key(first.id)])
            fresh = FastConversationStore(backing)
            with pytest.raises(CorruptCheckpointError):
                await fresh.load("c")
            with pytest.raises(CorruptCheckpointError):
                await fresh.load_entries("c")
            with pytest.raises(CorruptCheckpointError):
                await fresh.fork("c", at=1, new_conversation_id="f")
            assert await fresh.read_record("f") is None
