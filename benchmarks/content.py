"""Deterministic checkpoint content: an agent's nested state and its chat history.

The same seed gives the same bytes on every machine, so results compare across runs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import msgspec

__all__ = ["Content", "agent_state", "chat_messages", "make_content"]

_WORDS = (
    "agent", "plan", "tool", "call", "result", "search", "retrieve", "document", "summary",
    "answer", "question", "user", "assistant", "context", "memory", "step", "retry", "error",
    "timeout", "cache", "index", "vector", "embedding", "score", "invoice", "customer", "order",
    "refund", "policy", "contract", "clause", "review", "approve", "reject", "draft", "email",
    "report", "table", "chart", "metric", "latency", "budget", "token", "prompt", "model",
    "reasoning", "observation", "action", "checkpoint", "restore", "resume", "state", "message",
    "history", "branch", "fork", "lineage", "audit", "export",
)

_encoder = msgspec.msgpack.Encoder()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def _document(rng: random.Random, index: int) -> dict[str, Any]:
    return {
        "id": f"doc-{index:05d}",
        "title": _text(rng, 6).title(),
        "snippet": _text(rng, 40),
        "score": round(rng.random(), 6),
        "tags": [rng.choice(_WORDS) for _ in range(3)],
        "source": {"kind": "search", "rank": index, "url": f"https://example.com/d/{index}"},
    }


def agent_state(target_bytes: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """A nested agent state whose msgpack encoding is about ``target_bytes`` long.

    Task, plan, tool results, memory and metrics, grown with retrieved documents until big
    enough; about 3x compressible, like English text.
    """
    rng = random.Random(seed)
    state: dict[str, Any] = {
        "step": 0,
        "task": {"id": "task-0001", "goal": _text(rng, 30), "priority": 2, "deadline": None},
        "plan": [
            {"id": index, "title": _text(rng, 8), "status": rng.choice(["todo", "done"]),
             "depends_on": list(range(max(0, index - 2), index))}
            for index in range(8)
        ],
        "tool_results": [
            {"tool": rng.choice(["search", "sql", "http"]), "ok": True,
             "output": _text(rng, 25), "elapsed_ms": rng.randrange(5, 900)}
            for _ in range(4)
        ],
        "memory": {"facts": {f"fact_{index}": _text(rng, 10) for index in range(6)},
                   "preferences": {"language": "en", "tone": "formal", "max_tokens": 1024}},
        "metrics": {"tokens_in": 18_234, "tokens_out": 2_048, "cost_usd": 0.0123, "retries": 1},
        "documents": [],
    }
    documents: list[dict[str, Any]] = state["documents"]
    size = len(_encoder.encode(state))
    while size < target_bytes:
        document = _document(rng, len(documents))
        documents.append(document)
        size += len(_encoder.encode(document))  # + at most 4 bytes of array header: close enough
    return state


def chat_messages(count: int = 20, seed: int = 1) -> list[dict[str, Any]]:
    """OpenAI-style chat history: system, then user / assistant (some with tool calls) / tool."""
    rng = random.Random(seed)
    messages: list[dict[str, Any]] = [{"role": "system", "content": _text(rng, 40)}]
    while len(messages) < count:
        turn = len(messages) % 4
        if turn == 1:
            messages.append({"role": "user", "content": _text(rng, 30)})
        elif turn == 2:
            call_id = f"call_{len(messages):04d}"
            messages.append({
                "role": "assistant", "content": None,
                "tool_calls": [{"id": call_id, "type": "function", "function": {
                    "name": "search", "arguments": f'{{"query": "{_text(rng, 5)}"}}'}}],
            })
        elif turn == 3:
            messages.append({"role": "tool", "tool_call_id": f"call_{len(messages) - 1:04d}",
                             "content": _text(rng, 35)})
        else:
            messages.append({"role": "assistant", "content": _text(rng, 45)})
    return messages[:count]


@dataclass
class Content:
    """What one create stores. ``state["step"]`` is bumped before every create."""

    state: dict[str, Any]
    messages: list[dict[str, Any]]

    @property
    def encoded_bytes(self) -> int:
        """msgpack size of state + messages: the raw data size of one checkpoint."""
        return len(_encoder.encode({"state": self.state, "messages": self.messages}))


def make_content(state_bytes: int, messages: int, seed: int = 0) -> Content:
    return Content(agent_state(state_bytes, seed), chat_messages(messages, seed + 1))
