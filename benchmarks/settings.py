"""Workload sizes: the full suite, a quick one (``make bench``), a tiny one (tests)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

__all__ = ["DEFAULT_KEEP", "Sizes"]

DEFAULT_KEEP = 100
"""``CheckpointConfig().max_checkpoints_per_run``, and FastAgentic's default too."""


@dataclass(frozen=True)
class Sizes:
    """How much work each workload does; every timed number is a median over ``repetitions``."""

    repetitions: int = 3
    state_bytes: int = 10_000
    """msgpack size of the nested agent state of W1, W2, W4, W5 and W6."""
    messages: int = 20
    w1_creates: int = 1_000
    w1_restores: int = 1_000
    w1_lists: int = 100
    w2_runs: int = 100
    w2_creates: int = 20
    w3_checkpoints: int = 50
    w3_state_bytes: int = 1_000_000
    w4_creates: int = 500
    w4_keep: int = 10
    w5_levels: tuple[int, ...] = (10, 1_000, 10_000)
    w5_ops: int = 100
    """Restores, then creates, timed at each level."""
    w6_processes: int = 4
    w6_creates: int = 100
    """Creates per process."""
    floor_iterations: int = 1_000
    graph_steps: int = 50
    """G1: supersteps of the LangGraph loop; each adds one message."""
    graph_threads: int = 3
    """G1: threads run one after another per repetition (each a fresh thread id)."""
    graph_message_bytes: int = 500
    """G1: length of the message text each step appends."""
    graph_context_bytes: int = 4_000
    """G1: msgpack size of a context channel set once by the input and never changed."""
    w7_steps: int = 1_000
    """W7: steps of the conversation, each checkpointed (retention off)."""
    w7_message_bytes: int = 1_000
    """W7: about how many bytes of messages each step adds."""
    w7_state_bytes: int = 2_000
    """W7: msgpack size of the state checkpointed with the messages."""
    w7_restores: int = 20

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            values = value if isinstance(value, tuple) else (value,)
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"Sizes.{item.name} must be positive integers, got {value!r}")
        if list(self.w5_levels) != sorted(set(self.w5_levels)):
            raise ValueError(f"Sizes.w5_levels must be ascending, got {self.w5_levels!r}")

    @classmethod
    def full(cls) -> Sizes:
        return cls()

    @classmethod
    def quick(cls) -> Sizes:
        """A couple of minutes on two cores: same shapes, fewer operations."""
        return cls(
            w1_creates=200, w1_restores=200, w1_lists=20,
            w2_runs=20, w2_creates=10,
            w3_checkpoints=10,
            w4_creates=200,
            w5_levels=(10, 100, 1_000), w5_ops=50,
            w6_creates=25,
            floor_iterations=300,
            graph_threads=1,
            w7_restores=10,
        )

    @classmethod
    def tiny(cls) -> Sizes:
        """Seconds for the whole suite on the memory store: for the smoke test."""
        return cls(
            repetitions=1, state_bytes=2_000, messages=4,
            w1_creates=5, w1_restores=5, w1_lists=2,
            w2_runs=3, w2_creates=2,
            w3_checkpoints=2, w3_state_bytes=20_000,
            w4_creates=6, w4_keep=2,
            w5_levels=(2, 5), w5_ops=2,
            w6_processes=2, w6_creates=3,
            floor_iterations=5,
            graph_steps=3, graph_threads=1, graph_message_bytes=50, graph_context_bytes=200,
            w7_steps=40, w7_message_bytes=100, w7_state_bytes=300, w7_restores=2,
        )

    def with_repetitions(self, repetitions: int | None) -> Sizes:
        return self if repetitions is None else replace(self, repetitions=repetitions)

    def with_w5_levels(self, levels: tuple[int, ...] | None) -> Sizes:
        """W5's levels replaced (``--w5-levels``), e.g. up to 100,000 checkpoints in a run."""
        return self if levels is None else replace(self, w5_levels=tuple(levels))
