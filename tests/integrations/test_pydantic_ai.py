"""The Pydantic AI conversation store: Pydantic AI's contract on every store, a real agent
continued in another process, compare-and-set races, store call counts, TTL and the CLI view."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import subprocess
import sys
import time as _time
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

pytest.importorskip("pydantic_ai")

from pydantic_ai import Agent
from pydantic_ai.conversation import Conversation
from pydantic_ai.conversation_store import (
    ConversationConflict,
    ConversationEntry,
    ConversationRecord,
    ConversationStore,
    InMemoryConversationStore,
)
from pydantic_ai.exceptions import UserError
from pydantic_ai.messages import (
    ModelMessage,
    ModelMessagesTypeAdapter,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models.test import TestModel
from pydantic_ai.ui.vercel_ai import VercelAIAdapter

from fastcheckpoint import CheckpointManager, _ids
from fastcheckpoint.errors import (
    ConfigurationError,
    CorruptCheckpointError,
    SerializationError,
    ValidationError,
)
from fastcheckpoint.integrations import _pydantic_ai_records as records
from fastcheckpoint.integrations.pydantic_ai import FastConversationStore
from fastcheckpoint.stores import CheckpointStore, Item
from fastcheckpoint.stores.memory import MemoryStore
from tests._helpers import FakeClock
from tests.integrations._langgraph_support import CountingStore
from tests.integrations.conftest import FreshStore

pytestmark = pytest.mark.anyio

WORKER = Path(__file__).resolve().parent / "pydantic_ai_worker.py"
PROCESS_SECONDS = 60


def _request(text: str) -> ModelRequest:
    return ModelRequest(parts=[UserPromptPart(content=text)])


def _response(text: str) -> ModelResponse:
    return ModelResponse(parts=[TextPart(content=text)])


def _turns(*texts: str) -> list[ModelMessage]:
    messages: list[ModelMessage] = []
    for text in texts:
        messages += [_request(text), _response(f"re: {text}")]
    return messages


def _texts(conversation: Conversation | None) -> list[str]:
    assert conversation is not None
    found: list[str] = []
    for message in conversation.messages:
        part = message.parts[0]
        assert isinstance(part, (UserPromptPart, TextPart))
        found.append(str(part.content))
    return found


# -- Pydantic AI's contract, checked on the reference store and on ours ---------------------


async def _behaves_like_a_conversation_store(store: ConversationStore) -> None:
    """Save, load, list, branch, fork, delete and conflicts, as Pydantic AI documents them."""
    first = Conversation(conversation_id="chat", messages=_turns("one", "two"))
    saved = await store.save(first, scope="alice")
    assert len(saved) == 4
    assert first.revision is not None
    assert [entry.parent_id for entry in saved[1:]] == [entry.id for entry in saved[:-1]]
    loaded = await store.load("chat")
    assert _texts(loaded) == ["one", "re: one", "two", "re: two"]
    assert loaded is not None
    assert loaded.revision == first.revision
    assert loaded.messages == first.messages
    assert await store.load("chat", scope="bob") is None
    assert _texts(await store.load("chat", limit=1)) == ["re: two"]

    loaded.messages += _turns("three")
    assert len(await store.save(loaded)) == 2  # only what is new
    assert len(await store.save(loaded)) == 0
    with pytest.raises(ConversationConflict):
        await store.save(first)  # stale revision
    with pytest.raises(ConversationConflict):
        await store.save(Conversation(conversation_id="chat", messages=_turns("x")))

    await store.save(Conversation(conversation_id="other", messages=_turns("o")), scope="bob")
    assert [r.conversation_id for r in await store.list_conversations()] == ["other", "chat"]
    assert [r.conversation_id for r in await store.list_conversations(limit=1)] == ["other"]
    assert [r.conversation_id for r in await store.list_conversations(scope="alice")] == ["chat"]

    current = await store.load("chat")
    assert current is not None
    branched = await store.branch("chat", at=2, expected_revision=current.revision)
    assert _texts(branched) == ["one", "re: one"]
    record = await store.read_record("chat")
    assert record is not None
    assert len(record.branches) == 1
    with pytest.raises(ConversationConflict):
        await store.branch("chat", at=1, expected_revision=current.revision)
    back = await store.branch("chat", from_entry=record.branches[0],
                              expected_revision=branched.revision)
    assert len(back.messages) == 6

    entries = await store.load_entries("chat")
    assert entries is not None
    fork = await store.fork("chat", from_entry=entries[1].id, new_conversation_id="fork")
    assert _texts(fork) == ["one", "re: one"]
    fork.messages += _turns("forked")
    await store.save(fork)
    with pytest.raises(ConversationConflict):
        await store.fork("chat", new_conversation_id="fork")
    fork_record = await store.read_record("fork")
    assert fork_record is not None
    assert (fork_record.forked_from, fork_record.forked_at) == ("chat", entries[1].id)
    assert fork_record.scope == "alice"

    await store.delete("chat", scope="bob")  # another owner's: left alone
    assert await store.load("chat") is not None
    await store.delete("chat")
    assert await store.load("chat") is None
    assert _texts(await store.load("fork")) == ["one", "re: one", "forked", "re: forked"]
    fork_entries = await store.load_entries("fork")
    assert fork_entries is not None
    assert fork_entries[0].id == entries[0].id
    await store.delete("fork")
    assert await store.load("fork") is None
    assert [r.conversation_id for r in await store.list_conversations()] == ["other"]
    for entry in [*entries, *fork_entries]:  # the family's last conversation took them along
        with pytest.raises(LookupError):
            await store.read_entry(entry.id)
    await store.delete("other")
    assert await store.list_conversations() == []


async def _primitives_hold(store: ConversationStore) -> None:
    """The storage primitives' own contract: expected revisions, dangling heads, lookups."""
    entry = ConversationEntry(parent_id=None, message=_request("p"))
    record = ConversationRecord(conversation_id="p", head_id=entry.id)
    await store.write_record(record, new_entries=[entry], expected_revision=None)
    with pytest.raises(ConversationConflict):
        await store.write_record(record, expected_revision=None)
    with pytest.raises(ConversationConflict):
        await store.write_record(record, expected_revision="not the revision")
    newer = dataclasses.replace(record, revision="second")
    await store.write_record(newer, expected_revision=record.revision)
    stored = await store.read_record("p")
    assert stored is not None
    assert stored.revision == "second"
    assert stored.head_id == entry.id
    assert await store.read_entry(entry.id) == entry
    with pytest.raises(LookupError):
        await store.read_entry("no such entry")
    for impossible in ("", "x" * 5000, "\ud800"):  # ids no entry can have: not there
        with pytest.raises(LookupError):
            await store.read_entry(impossible)
    dangling = ConversationRecord(conversation_id="q", head_id="no such entry")
    with pytest.raises(ConversationConflict):
        await store.write_record(dangling, expected_revision=None)
    assert await store.read_record("q") is None
    with pytest.raises(ConversationConflict):
        await store.delete_record("p", expected_revision=record.revision)
    await store.delete_record("p", expected_revision="second")
    assert await store.read_record("p") is None
    with pytest.raises(ConversationConflict):
        await store.delete_record("p", expected_revision="second")
    again = ConversationRecord(conversation_id="p", head_id=None)
    await store.write_record(again, expected_revision=None)  # the id can be used again
    assert (await store.read_record("p")) == again
    assert await store.read_records(limit=0) == []


async def _titles_and_metadata_are_kept(store: ConversationStore) -> None:
    """``update`` as Pydantic AI documents it: a title set only where there is none
    (``expected_title=None``), metadata replaced and cleared, the revision unchanged, and
    neither undone by a save, also one that read the record before the update."""
    chat = Conversation(conversation_id="titled", messages=_turns("hi"))
    await store.save(chat)
    before = await store.load("titled")  # read before the update: saved after it
    assert before is not None
    titled = await store.update("titled", title="Greeting", expected_title=None)
    assert (titled.title, titled.revision) == ("Greeting", chat.revision)
    with pytest.raises(ConversationConflict):
        await store.update("titled", title="Another", expected_title=None)
    tagged = await store.update("titled", metadata={"tags": ["a"], "n": 1})
    assert (tagged.title, tagged.metadata) == ("Greeting", {"tags": ["a"], "n": 1})
    before.messages += _turns("more")
    await store.save(before)
    after = await store.read_record("titled")
    assert after is not None
    assert (after.title, after.metadata, after.revision) == (
        "Greeting", {"tags": ["a"], "n": 1}, before.revision)
    assert _texts(await store.load("titled")) == ["hi", "re: hi", "more", "re: more"]
    cleared = await store.update("titled", title=None, metadata=None, expected_title="Greeting")
    assert (cleared.title, cleared.metadata) == (None, None)
    assert await store.update("titled") == cleared  # nothing to change: the record as it is
    with pytest.raises(UserError):
        await store.update("nobody", title="x")
    with pytest.raises(UserError):
        await store.update("titled", title="x", scope="elsewhere")
    # Listings go by the last save: an update does not bring a conversation forward.
    await store.save(Conversation(conversation_id="saved-last", messages=_turns("new")))
    await store.update("titled", title="Updated after")
    assert [record.conversation_id for record in await store.list_conversations(limit=1)] == [
        "saved-last"]
    assert [record.conversation_id for record in await store.list_conversations()][:2] == [
        "saved-last", "titled"]
    await store.delete("titled")
    await store.delete("saved-last")


async def _a_save_after_another_process_changed_the_title_keeps_it(
    store: CheckpointStore,
) -> None:
    """A process that saved a conversation saves it again after another process changed its
    title (its record moved on, at the same revision): the save lands and keeps the title."""
    async with FastConversationStore(store) as first, FastConversationStore(store) as second:
        chat = Conversation(conversation_id="two-titles", messages=_turns("hi"))
        await first.save(chat)
        await second.update("two-titles", title="From the other process")
        chat.messages += _turns("again")
        await first.save(chat)
        record = await second.read_record("two-titles")
        assert record is not None
        assert (record.title, record.revision) == ("From the other process", chat.revision)
        assert _texts(await second.load("two-titles")) == ["hi", "re: hi", "again", "re: again"]
        await second.delete("two-titles")


async def test_the_contract_checks_hold_for_pydantic_ai_own_store() -> None:
    with anyio.fail_after(10):
        await _behaves_like_a_conversation_store(InMemoryConversationStore())
        await _primitives_hold(InMemoryConversationStore())
        await _titles_and_metadata_are_kept(InMemoryConversationStore())


async def test_conversations_behave_as_pydantic_ai_documents_on_every_store(
    fresh_store: FreshStore,
) -> None:
    """One store per kind for every cross-store check (a DynamoDB table or a PostgreSQL
    schema is slow to make)."""
    async with fresh_store() as store, FastConversationStore(store) as conversations:
        with anyio.fail_after(60):
            await _behaves_like_a_conversation_store(conversations)
            await _primitives_hold(conversations)
            await _titles_and_metadata_are_kept(conversations)
            await _a_save_after_another_process_changed_the_title_keeps_it(store)
            await _two_writers_expecting_one_revision_one_wins(store)
            await _a_fork_landing_during_a_release_withdraws(store)
            await _conversations_show_in_the_cli_views(conversations)


async def _two_writers_expecting_one_revision_one_wins(store: CheckpointStore) -> None:
    """Each appends a turn to the same revision: one record and its entries are stored, the
    other writer gets a conflict and its entries are removed."""
    first, second = FastConversationStore(store), FastConversationStore(store)
    await first.save(Conversation(conversation_id="race", messages=_turns("a")))
    read = [await first.read_record("race"), await second.read_record("race")]
    outcomes: list[str] = []
    written: dict[str, ConversationEntry] = {}

    async def write(writer: FastConversationStore, record: ConversationRecord | None,
                    tag: str) -> None:
        assert record is not None
        entry = written[tag] = ConversationEntry(parent_id=record.head_id, message=_request(tag))
        changed = dataclasses.replace(record, head_id=entry.id,
                                      revision=f"{record.revision}+{tag}")
        try:
            await writer.write_record(changed, new_entries=[entry],
                                      expected_revision=record.revision)
        except ConversationConflict:
            outcomes.append("conflict")
        else:
            outcomes.append(tag)

    async with anyio.create_task_group() as group:
        group.start_soon(write, first, read[0], "first")
        group.start_soon(write, second, read[1], "second")
    assert sorted(outcomes) in (["conflict", "first"], ["conflict", "second"])
    winner = next(outcome for outcome in outcomes if outcome != "conflict")
    loser = "first" if winner == "second" else "second"
    fresh = FastConversationStore(store)  # nothing remembered: every answer is the store's
    stored = await fresh.read_record("race")
    assert stored is not None
    assert stored.revision.endswith("+" + winner)
    assert _texts(await fresh.load("race")) == ["a", "re: a", winner]
    with pytest.raises(LookupError):
        await fresh.read_entry(written[loser].id)


async def _a_fork_landing_during_a_release_withdraws(store: CheckpointStore) -> None:
    """A fork that finds its family's release under way removes its record and conflicts,
    so a release that saw no fork never leaves one pointing at deleted entries."""
    conversations = FastConversationStore(store)
    await conversations.save(Conversation(conversation_id="source", messages=_turns("s")))
    run = await store.get_run(_ids.key_of(records.run_id_of("source")), now=_time.time())
    assert run is not None
    family = next(label for label in run.labels if label.startswith("pydantic-ai family "))
    family_key = records.family_key(family.removeprefix("pydantic-ai family "))
    await store.put_items(family_key, [Item(key=records.CLOSING_PREFIX + "test", value=b"",
                                            expires_at=_time.time() + 60)], now=_time.time())
    with pytest.raises(ConversationConflict):
        await conversations.fork("source", new_conversation_id="late")
    assert await FastConversationStore(store).read_record("late") is None
    await store.delete_items(family_key, [records.CLOSING_PREFIX + "test"])
    fork = await conversations.fork("source", new_conversation_id="late")  # retried: fine
    assert _texts(fork) == ["s", "re: s"]
    await conversations.delete("source")
    await conversations.delete("late")


async def _conversations_show_in_the_cli_views(conversations: FastConversationStore) -> None:
    await conversations.save(Conversation(conversation_id="seen", messages=_turns("hi")),
                             scope="team")
    manager = CheckpointManager(conversations.store)
    run = await manager.get_run(records.run_id_of("seen"))
    assert run is not None
    assert run.metadata == {"framework": "pydantic-ai", "conversation_id": "seen",
                            "scope": "team"}
    page = await manager.list_runs()
    assert "pydantic-ai:seen" in [listed.run_id for listed in page]
    shown = await manager.restore("pydantic-ai:seen")
    assert shown is not None
    assert shown.state["record"]["conversation_id"] == "seen"


# -- a real agent, continued in another process -------------------------------------------------


def _url(kind: str, tmp_path: Path) -> str:
    return f"file://{tmp_path / 'store'}" if kind == "file" else f"sqlite:///{tmp_path / 's.db'}"


@pytest.mark.parametrize("store_kind", ["file", "sqlite"])
async def test_an_agent_conversation_continues_in_a_new_process(
    store_kind: str, tmp_path: Path,
) -> None:
    """Turn 1 here (``agent.run`` and ``save``), turn 2 in a new process, turn 3 here
    through Pydantic AI's UI adapter, which loads and saves with the store itself."""
    url = _url(store_kind, tmp_path)
    agent = Agent(TestModel(custom_output_text="first answer"))
    with anyio.fail_after(PROCESS_SECONDS):
        async with FastConversationStore(url) as store:
            conversation = await store.load("agent") or Conversation(conversation_id="agent")
            result = await agent.run("hello", conversation=conversation)
            await store.save(result, scope="user-1")
            first_run = result.all_messages()
        worker = await anyio.run_process(
            [sys.executable, str(WORKER), "continue", url, "agent"], check=False)
        assert worker.returncode == 0, worker.stderr.decode()
        assert ModelMessagesTypeAdapter.validate_json(worker.stdout) == first_run
        async with FastConversationStore(url) as store:
            continued = await store.load("agent", scope="user-1")
            await _ui_turn(store, Agent(TestModel(custom_output_text="third answer")),
                           "agent", "one more", scope="user-1")
            third = await store.load("agent")
    assert continued is not None
    assert continued.messages[:len(first_run)] == first_run
    assert len(continued.messages) == len(first_run) + 2
    last = continued.messages[-1]
    assert isinstance(last, ModelResponse)
    assert last.parts == [TextPart(content="second answer")]
    assert continued.usage.requests == 2
    assert third is not None
    assert third.messages[:len(continued.messages)] == continued.messages
    assert _texts(third)[-2:] == ["one more", "third answer"]
    assert third.usage.requests == 3


async def _ui_turn(store: FastConversationStore, agent: Agent[None, str], conversation_id: str,
                   text: str, *, scope: str) -> None:
    """One chat turn as a Vercel AI frontend sends it: only the new message; the adapter
    loads the history from the store and saves the run to it."""
    body = {"trigger": "submit-message", "id": conversation_id, "messages": [
        {"id": "m-" + text, "role": "user", "parts": [{"type": "text", "text": text}]}]}
    adapter = VercelAIAdapter(agent=agent, run_input=VercelAIAdapter.build_run_input(
        json.dumps(body).encode()), conversation_store=store, conversation_scope=scope)
    events = [event async for event in adapter.run_stream()]
    assert type(events[-1]).__name__ == "DoneChunk"


@pytest.mark.parametrize("store_kind", ["sqlite"])
async def test_two_processes_racing_one_revision_one_wins(
    store_kind: str, tmp_path: Path,
) -> None:
    url = _url(store_kind, tmp_path)
    with anyio.fail_after(PROCESS_SECONDS):
        async with FastConversationStore(url) as store:
            await store.save(Conversation(conversation_id="race", messages=_turns("a")))
        outcomes = await anyio.to_thread.run_sync(_race_in_processes, url)
        async with FastConversationStore(url) as store:
            stored = await store.read_record("race")
    assert sorted(outcomes) == ["conflict", "won"]
    assert stored is not None
    winner = ["one", "two"][outcomes.index("won")]
    assert stored.revision.endswith("+" + winner)


def _race_in_processes(url: str) -> list[str]:
    workers = [subprocess.Popen([sys.executable, str(WORKER), "race", url, "race", tag],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for tag in ("one", "two")]
    try:
        for worker in workers:  # both have read the same revision before either writes
            assert worker.stdout is not None
            assert worker.stdout.readline().strip() == "ready"
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        outcomes = []
        for worker in workers:
            out, _ = worker.communicate(timeout=PROCESS_SECONDS)
            assert worker.returncode == 0
            outcomes.append(out.strip())
        return outcomes
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()


# -- costs, TTL, construction -----------------------------------------------------------------


def _counted(store: CountingStore) -> dict[str, int]:
    return store.take()


def _entry_runs(entries: list[ConversationEntry]) -> int:
    """How many entries runs hold these (ids minted in one millisecond share one)."""
    return len({records.entries_run_key(entry.id) for entry in entries})


async def test_metadata_json_cannot_hold_is_refused_before_anything_is_written() -> None:
    with anyio.fail_after(10):
        conversations = FastConversationStore(MemoryStore())
        await conversations.save(Conversation(conversation_id="c", messages=_turns("hi")))
        deep: dict[str, Any] = {"x": 1}
        for _ in range(200):  # deeper than the record's JSON is read back
            deep = {"x": deep}
        for value in (b"\xff", object(), "\ud800", deep):
            with pytest.raises(SerializationError):
                await conversations.update("c", metadata={"x": value})
        record = await conversations.read_record("c")
        assert record is not None
        assert record.metadata is None


async def test_an_update_of_the_wrong_type_is_refused_and_changes_nothing() -> None:
    """A title that is not a str, metadata that is not a dict: ValidationError and nothing
    written, so the conversation still loads, lists, saves and deletes."""
    store = MemoryStore()
    conversations = FastConversationStore(store)
    key = _ids.key_of(records.run_id_of("c"))
    wrong: list[dict[str, Any]] = [{"title": 42}, {"title": ["a"]}, {"metadata": ["a", "b"]},
                                   {"metadata": "text"}]
    with anyio.fail_after(10):
        await conversations.save(Conversation(conversation_id="c", messages=_turns("hi")))
        before = await store.latest(key, now=_time.time())
        for details in wrong:
            with pytest.raises(ValidationError, match="conversation 'c'"):
                await conversations.update("c", **details)
        assert await store.latest(key, now=_time.time()) == before
        loaded = await conversations.load("c")
        assert loaded is not None
        assert [record.conversation_id for record in
                await conversations.list_conversations()] == ["c"]
        loaded.messages += _turns("more")
        await conversations.save(loaded)
        assert _texts(await conversations.load("c")) == ["hi", "re: hi", "more", "re: more"]
        await conversations.delete("c")
        assert await conversations.load("c") is None


async def test_a_record_of_the_wrong_type_is_refused_before_anything_is_written() -> None:
    """``write_record`` checks the record as ``update`` does: before its family or entries."""
    counting = CountingStore(MemoryStore())
    inner: Any = counting
    conversations = FastConversationStore(inner)
    entry = ConversationEntry(parent_id=None, message=_request("hi"))
    title: Any = 42
    record = ConversationRecord(conversation_id="c", head_id=entry.id, title=title)
    with anyio.fail_after(10):
        with pytest.raises(ValidationError, match="title"):
            await conversations.write_record(record, new_entries=[entry], expected_revision=None)
        assert _counted(counting) == {}
        assert await counting.inner.scan_items(records.FAMILIES_KEY, now=0) == []


async def test_a_conversation_id_or_scope_that_is_not_a_str_is_refused_before_writing() -> None:
    counting = CountingStore(MemoryStore())
    inner: Any = counting
    conversations = FastConversationStore(inner)
    with anyio.fail_after(10):
        for conversation_id in (5, None):
            wrong: Any = conversation_id
            with pytest.raises(ValidationError, match="conversation_id must be a str"):
                await conversations.load(wrong)
            with pytest.raises(ValidationError, match="conversation_id must be a str"):
                await conversations.save(Conversation(conversation_id=wrong, messages=_turns("a")))
            with pytest.raises(ValidationError, match="conversation_id must be a str"):
                await conversations.delete(wrong)
        assert _counted(counting) == {}
        scope: Any = 5
        with pytest.raises(ValidationError, match="scope must be a str"):
            await conversations.save(Conversation(conversation_id="s", messages=_turns("a")),
                                     scope=scope)
        assert _counted(counting) == {"latest": 1}  # the save's read of the record only
        with pytest.raises(ValidationError, match="scope must be a str"):
            await conversations.list_conversations(scope=scope)
        assert _counted(counting) == {}
        assert await conversations.load("s") is None
        assert await counting.inner.scan_items(records.FAMILIES_KEY, now=0) == []


class _Damaged(MemoryStore):
    """Returns damaged bytes for the records of the runs in ``damaged``."""

    def __init__(self) -> None:
        super().__init__()
        self.damaged: set[str] = set()

    async def latest(self, run_key: str, **options: Any) -> Any:
        found = await super().latest(run_key, **options)
        if found is None or run_key not in self.damaged:
            return found
        checkpoint, *rest = found
        return (msgspec.structs.replace(checkpoint, payload=b"damaged"), *rest)


async def test_a_damaged_record_is_left_out_of_listings_with_a_warning(
    caplog: pytest.LogCaptureFixture, clock: FakeClock,
) -> None:
    """One record that cannot be read never makes every listing fail: it is left out, the
    others list; its own load still says it is damaged."""
    store = _Damaged()
    conversations = FastConversationStore(store, clock=clock)
    with anyio.fail_after(10):
        for conversation_id in ("old", "bad", "new"):
            await conversations.save(Conversation(conversation_id=conversation_id,
                                                  messages=_turns(conversation_id)),
                                     scope="alice")
            clock.advance(1)
        store.damaged.add(_ids.key_of(records.run_id_of("bad")))
        with caplog.at_level(logging.WARNING, logger="fastcheckpoint.pydantic_ai"):
            listed = await conversations.list_conversations()
        assert [record.conversation_id for record in listed] == ["new", "old"]
        assert "'bad'" in caplog.text
        assert [record.conversation_id for record in await conversations.list_conversations(
            scope="alice", limit=2)] == ["new", "old"]
        with pytest.raises(CorruptCheckpointError):
            await conversations.load("bad")
        # the way out: delete its run, then its entries go with its family
        await CheckpointManager(store).delete_run(records.run_id_of("bad"))
        assert await conversations.load("bad") is None
        clock.advance(3600)
        assert await conversations.cleanup_expired() == 2
        assert len(await conversations.list_conversations()) == 2


class _ForkOvertaken(MemoryStore):
    """A fork of ``orig`` whose record lands just after a delete of ``orig`` made its last
    check for other members of the family, the fork's caller cancelled right then."""

    def __init__(self) -> None:
        super().__init__()
        self.fork_key = _ids.key_of(records.run_id_of("fork"))
        self.checks = 0
        self.fork_waiting = asyncio.Event()
        self.fork_go = asyncio.Event()
        self.delete_go = asyncio.Event()
        self.fork_task: asyncio.Future[Any] | None = None

    async def runs_with_label(self, label: str, **options: Any) -> Any:
        found = await super().runs_with_label(label, **options)
        if self.fork_task is not None and label.startswith(records.family_label("")):
            self.checks += 1
            if self.checks == 2:  # the delete's last check: no other member yet
                self.fork_go.set()
                await self.delete_go.wait()
        return found

    async def append(self, run_key: str, record: Any, **options: Any) -> Any:
        if run_key == self.fork_key:
            self.fork_waiting.set()
            await self.fork_go.wait()
        found = await super().append(run_key, record, **options)
        if run_key == self.fork_key and self.fork_task is not None:
            self.fork_task.cancel()
            self.delete_go.set()
            await asyncio.sleep(0)
        return found


async def test_a_fork_cancelled_as_a_delete_overtakes_it_leaves_no_fork_without_history(
) -> None:
    """The fork's record landed after the delete's last look at the family: the fork takes
    itself back even when its caller is cancelled right after the record landed, so no
    conversation stays listed whose history the delete removed."""
    store = _ForkOvertaken()
    with anyio.fail_after(10):
        await FastConversationStore(store).save(
            Conversation(conversation_id="orig", messages=_turns("one", "two")))
        forking = asyncio.ensure_future(FastConversationStore(store).fork(
            "orig", new_conversation_id="fork"))
        store.fork_task = forking
        await store.fork_waiting.wait()  # the fork read the original, about to append
        await FastConversationStore(store).delete("orig")
        with pytest.raises(asyncio.CancelledError):
            await forking
        fresh = FastConversationStore(store)
        assert [record.conversation_id for record in await fresh.read_records()] == []
        assert await fresh.load("fork") is None


async def test_a_message_json_cannot_hold_is_refused_before_anything_is_written() -> None:
    """Nested deeper than Pydantic's serializer goes: SerializationError, and neither the
    conversation, its entries nor a family for it is stored."""
    deep: dict[str, Any] = {"x": 1}
    for _ in range(5000):
        deep = {"x": deep}
    message = ModelRequest(parts=[ToolReturnPart(tool_name="t", content=deep, tool_call_id="c")])
    store = MemoryStore()
    conversations = FastConversationStore(store)
    with anyio.fail_after(10):
        with pytest.raises(SerializationError, match="cannot be stored"):
            await conversations.save(Conversation(conversation_id="c", messages=[message]))
        assert await conversations.load("c") is None
        assert await store.scan_items(records.FAMILIES_KEY, now=0) == []
        await conversations.save(Conversation(conversation_id="c", messages=_turns("hi")))
        assert _texts(await conversations.load("c")) == ["hi", "re: hi"]


async def test_store_calls_per_primitive() -> None:
    counting = CountingStore(MemoryStore())
    inner: Any = counting
    conversations = FastConversationStore(inner)
    with anyio.fail_after(10):
        conversation = Conversation(conversation_id="c", messages=_turns("one"))
        saved = await conversations.save(conversation)
        # read_record (1); a new family (1), its index (1), the entries (1 per entries run:
        # usually 1), the record (1)
        assert _counted(counting) == {"latest": 1, "put_items": 2 + _entry_runs(saved),
                                      "append": 1}
        conversation.messages += _turns("two")
        saved_again = await conversations.save(conversation)
        assert _counted(counting) == {"latest": 1, "put_items": 1 + _entry_runs(saved_again),
                                      "append": 1}
        entry_runs = {records.entries_run_key(entry.id) for entry in [*saved, *saved_again]}
        record = await conversations.read_record("c")
        assert _counted(counting) == {"latest": 1}
        assert record is not None
        assert record.head_id is not None
        await conversations.read_entry(record.head_id)  # written here: known
        assert _counted(counting) == {}
        cold = FastConversationStore(inner)
        await cold.read_entry(record.head_id)
        assert _counted(counting) == {"get_items": 1}
        loaded = await cold.load("c")
        assert loaded is not None
        assert len(loaded.messages) == 4
        assert _counted(counting) == {"latest": 1, "get_items": 3}  # one entry was known
        changed = dataclasses.replace(record, revision="next")
        await cold.write_record(changed, expected_revision=record.revision)  # a branch-like write
        assert _counted(counting) == {"append": 1}
        stale = FastConversationStore(inner)
        await stale.write_record(dataclasses.replace(changed, revision="after"),
                                 expected_revision="next")  # not seen here: read first
        assert _counted(counting) == {"latest": 1, "append": 1}
        await stale.update("c", title="titled")
        # Pydantic AI's read of the record, write_details' own (it stores the whole record
        # anew), then the compare-and-set append
        assert _counted(counting) == {"latest": 2, "append": 1}
        await stale.fork("c", new_conversation_id="f")
        # fork: read_record and history (4 entries), the anchor, the record, the release check
        assert _counted(counting) == {"latest": 1, "get_items": 5, "append": 1, "scan_items": 1}
        await stale.delete("f")
        # read_record; the record; the family's members ("c" is one: nothing to release)
        assert _counted(counting) == {"latest": 1, "delete": 1, "runs_with_label": 1}
        await stale.delete("c")
        # the family's last: a release marker, the members again, the 4 entries (one scan,
        # a delete per entries run and one of the index), the family's registration
        assert _counted(counting) == {
            "latest": 1, "delete": 1, "runs_with_label": 2, "put_items": 1, "scan_items": 2,
            "delete_items": len(entry_runs) + 2}


async def test_conversations_expire_and_their_entries_are_cleaned_up(clock: FakeClock) -> None:
    memory = MemoryStore()
    async with FastConversationStore(memory, ttl_seconds=60, clock=clock) as conversations:
        with anyio.fail_after(10):
            saved = await conversations.save(
                Conversation(conversation_id="brief", messages=_turns("x")))
            clock.advance(50)
            loaded = await conversations.load("brief")
            assert loaded is not None
            loaded.messages += _turns("y")
            await conversations.save(loaded)  # a save extends the conversation's life
            clock.advance(50)
            assert _texts(await conversations.load("brief")) == ["x", "re: x", "y", "re: y"]
            clock.advance(60)
            assert await conversations.load("brief") is None
            assert await conversations.list_conversations() == []
            assert await conversations.cleanup_expired() == 0  # the family is too young yet
            clock.advance(3600)
            assert await conversations.cleanup_expired() == 4
            fresh = FastConversationStore(memory, clock=clock)
            with pytest.raises(LookupError):
                await fresh.read_entry(saved[0].id)


async def test_a_store_url_is_opened_and_closed_by_the_adapter(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    with anyio.fail_after(10):
        async with FastConversationStore(url) as conversations:
            await conversations.save(Conversation(conversation_id="u", messages=_turns("a")))
        environ = {"FASTCHECKPOINT_URL": url, "FASTCHECKPOINT_DEFAULT_TTL_SECONDS": "120"}
        async with FastConversationStore.from_env(environ) as conversations:
            assert conversations.ttl_seconds == 120
            assert _texts(await conversations.load("u")) == ["a", "re: a"]
        given = MemoryStore()
        async with FastConversationStore(given) as conversations:
            await conversations.save(Conversation(conversation_id="g"))
        assert await FastConversationStore(given).read_record("g") is not None  # left open


async def test_a_run_that_is_not_a_conversation_is_reported_as_corrupt() -> None:
    store = MemoryStore()
    with anyio.fail_after(10):
        await CheckpointManager(store).create("pydantic-ai:plain", {"step": 1})
        with pytest.raises(CorruptCheckpointError):
            await FastConversationStore(store).read_record("plain")


def test_bad_arguments_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError):
        FastConversationStore(MemoryStore(), ttl_seconds=0)
    with pytest.raises(ConfigurationError):
        FastConversationStore(object())  # type: ignore[arg-type]
    with pytest.raises(UserError):
        anyio.run(_negative_limit)


async def _negative_limit() -> None:
    store: CheckpointStore = MemoryStore()
    await FastConversationStore(store).list_conversations(limit=-1)
