"""W7, a long conversation: what a run costs as its history grows, and what it leaves stored.

Each step appends about ``w7_message_bytes`` of chat messages (user and assistant turns,
tool calls and results, as :func:`~benchmarks.content.chat_messages` shapes them) to one
run's history and checkpoints it with a small state (``w7_state_bytes``), for ``w7_steps``
steps, retention off. Timed: creates at steps 1-10, 91-100 and the last ten (``create@10``,
``create@100``, ``create@<steps>``), then restores of the latest. The footprint pass runs the
same conversation untimed and reports the bytes the run leaves stored against the final
conversation's own msgpack size, and a bare msgpack decode of that conversation (the floor
of a restore).

Bytes stored are what a subject hands its backend as values: for ours the checkpoint records
(payload + header) and item values with their keys (counted as the manager hands them to the
store); for LangGraph's savers the serialized bytes they keep (as in G1); for FastAgentic's
file store the disk space its directory takes; FastAgentic's in-memory store keeps objects,
not bytes, and is not counted.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio.to_thread
import msgspec

from benchmarks.content import Content, _text, agent_state
from benchmarks.footprint import CountingStore
from benchmarks.graph import _their_bytes
from benchmarks.measure import Sample, time_one
from benchmarks.settings import Sizes
from benchmarks.subjects import StoreTarget, Subject, disk_usage, unique_run_id
from benchmarks.workloads import Outcome, Workload
from fastcheckpoint import CheckpointConfig, CheckpointManager

__all__ = ["LONGRUN_WORKLOADS", "LongConversation"]

_encoder = msgspec.msgpack.Encoder()


class _Conversation:
    """Deterministic messages, about ``step_bytes`` of msgpack per step."""

    def __init__(self, step_bytes: int, seed: int = 7) -> None:
        self._rng = random.Random(seed)
        self._step_bytes = step_bytes
        self.messages: list[dict[str, Any]] = [
            {"role": "system", "content": _text(self._rng, 40)}]

    def step(self, index: int) -> None:
        """Append one step's messages: a user turn and an answer, or a tool round trip."""
        words = max(1, self._step_bytes // 14)  # two messages of ~7 bytes per word each
        if index % 3 == 2:
            call = f"call_{index:05d}"
            self.messages.append({"role": "assistant", "content": None, "tool_calls": [{
                "id": call, "type": "function", "function": {
                    "name": "search", "arguments": f'{{"query": "{_text(self._rng, 6)}"}}'}}]})
            self.messages.append({"role": "tool", "tool_call_id": call,
                                  "content": _text(self._rng, 2 * words - 10)})
        else:
            self.messages.append({"role": "user", "content": _text(self._rng, words)})
            self.messages.append({"role": "assistant", "content": _text(self._rng, words)})


def _levels(sizes: Sizes) -> tuple[int, ...]:
    return tuple(sorted({level for level in (10, 100, sizes.w7_steps) if level <= sizes.w7_steps}))


class LongConversation(Workload):
    name = "W7"
    title = "long conversation: a history that grows each step, retention off"
    comparable = True

    def keep(self, sizes: Sizes) -> int | None:
        return None

    def content(self, sizes: Sizes) -> Content:
        return Content(agent_state(sizes.w7_state_bytes, seed=5), [])

    async def run_once(self, subject: Subject, sizes: Sizes, content: Content) -> Outcome:
        run_id = unique_run_id(self.name)
        conversation = _Conversation(sizes.w7_message_bytes)
        state = dict(content.state)
        step_content = Content(state, conversation.messages)
        levels = _levels(sizes)
        created: dict[int, list[int]] = {level: [] for level in levels}
        async with subject.session(None) as driver:
            for step in range(1, sizes.w7_steps + 1):
                conversation.step(step)
                state["step"] = step
                level = next((level for level in levels if level - 10 < step <= level), None)
                operation = driver.prepare_create(run_id, step_content)
                if level is None:
                    await operation()
                else:
                    await time_one(operation, created[level])
            restore = driver.prepare_restore(run_id)
            restored: list[int] = []
            latest = None
            for _ in range(sizes.w7_restores):
                latest = await time_one(restore, restored)
            held = await driver.held(run_id)
        samples = {f"create@{level}": Sample(times, sum(times))
                   for level, times in created.items()}
        samples["restore"] = Sample(restored, sum(restored))
        messages = _restored_messages(latest)
        checks: dict[str, Any] = {"held": held, "all_held": held == sizes.w7_steps}
        if messages is not None:
            checks["restored_exactly"] = messages == conversation.messages
        return Outcome(samples, checks)

    async def footprint(self, subject: Subject, sizes: Sizes, content: Content) -> dict[str, Any]:
        """Bytes the whole run leaves stored, against the final conversation's own size."""
        run_id = unique_run_id("w7-footprint")
        conversation = _Conversation(sizes.w7_message_bytes)
        state = dict(content.state)
        async with _bytes_session(subject) as (create, stored):
            for step in range(1, sizes.w7_steps + 1):
                conversation.step(step)
                state["step"] = step
                await create(run_id, Content(state, conversation.messages))
            total = await stored(run_id)
        encoded = _encoder.encode(conversation.messages)
        decoder = msgspec.msgpack.Decoder()
        decodes = []
        for _ in range(20):
            start = time.perf_counter_ns()
            decoder.decode(encoded)
            decodes.append(time.perf_counter_ns() - start)
        decodes.sort()
        result: dict[str, Any] = {
            "conversation_bytes": len(encoded),
            "state_bytes": len(_encoder.encode(state)),
            "bare_decode_us": decodes[len(decodes) // 2] / 1000,
            "stored_bytes": total,
            "stored_ratio": None if total is None else total / len(encoded),
        }
        return result


def _restored_messages(latest: Any) -> list[Any] | None:
    """The messages a restore returned, for the subjects whose restore we can read."""
    messages = getattr(latest, "messages", None)  # ours and FastAgentic's
    if messages is not None:
        return list(messages)
    checkpoint = getattr(latest, "checkpoint", None)  # a LangGraph CheckpointTuple
    if isinstance(checkpoint, dict):
        value = checkpoint.get("channel_values", {}).get("messages")
        return None if value is None else list(value)
    return None


@contextlib.asynccontextmanager
async def _bytes_session(subject: Subject) -> AsyncIterator[tuple[Any, Any]]:
    """``(create(run_id, content), stored(run_id))`` on a fresh session of ``subject``."""
    if isinstance(subject, StoreTarget):
        store = CountingStore.wrap(subject.open())
        manager = CheckpointManager(store, CheckpointConfig(max_checkpoints_per_run=None))

        async def create(run_id: str, content: Content) -> None:
            await manager.create(run_id, content.state, messages=content.messages)

        async def counted(run_id: str) -> int | None:
            return sum(store.appended) + store.item_bytes

        try:
            yield create, counted
        finally:
            for run in await manager.list_runs(limit=1000):
                await manager.delete_run(run.run_id)
            await manager.aclose()
        return
    async with subject.session(None) as driver:
        async def drive(run_id: str, content: Content) -> None:
            await driver.prepare_create(run_id, content)()

        async def theirs(run_id: str) -> int | None:
            saver = getattr(driver, "saver", None)
            if saver is not None:
                return (await _their_bytes(saver, run_id))[0]
            directory = getattr(getattr(driver, "store", None), "base_path", None)
            if directory is None:  # FastAgentic's in-memory store keeps objects, not bytes
                return None
            return (await anyio.to_thread.run_sync(disk_usage, str(directory)))[0]

        yield drive, theirs


LONGRUN_WORKLOADS: dict[str, Workload] = {"W7": LongConversation()}
