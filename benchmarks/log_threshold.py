"""What ``history_min_entries`` trades in the LangGraph saver.

``python -m benchmarks.log_threshold``:

G1's graph (one message of ``graph_message_bytes`` characters per step, a 4 KB ``context``
set once) runs one thread of each of ``--steps`` steps on ``FastCheckpointSaver`` over a
memory store, for each ``--threshold`` (the saver's ``history_min_entries``: a ``messages``
list of at least that many entries is a log, shorter ones are stored whole at every
version). For each: the bytes the thread handed the store (checkpoint payloads and headers,
item keys and values), what it still stores at the end (merged log parts removed), and how
many items a read of its latest checkpoint returns (the anchor and parts of the log, the
other channel values, the pending writes): on S3 each is a GET, on the other stores part of
one store call. Counts, not times: they do not depend on the machine.
"""

from __future__ import annotations

import argparse
import uuid

import anyio

from benchmarks.content import make_content
from benchmarks.footprint import CountingStore
from benchmarks.graph import _build_graph, _config, _inputs
from benchmarks.settings import Sizes
from fastcheckpoint import CheckpointConfig, _ids
from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
from fastcheckpoint.stores.memory import MemoryStore

_THRESHOLDS = (2, 4, 8, 16, 32)
_STEPS = (10, 20, 50)


async def _thread(threshold: int, steps: int) -> tuple[int, int]:
    """Bytes handed to the store, and items a read of the latest checkpoint returns."""
    sizes = Sizes(graph_steps=steps)
    store = CountingStore.wrap(MemoryStore())
    saver = FastCheckpointSaver(store,  # type: ignore[arg-type]
                                config=CheckpointConfig(history_min_entries=threshold))
    graph = _build_graph(sizes, []).compile(checkpointer=saver)
    thread = uuid.uuid4().hex
    await graph.ainvoke(_inputs(make_content(sizes.graph_context_bytes, 0, seed=3)),
                        _config(thread, sizes), durability="sync")
    handed = sum(store.appended) + store.item_bytes_written
    found = await store.inner.read_with_items(_ids.key_of(thread), sequence=None,
                                              now=saver.manager.config.clock())
    assert found is not None
    await saver.aclose()
    return handed, len(found[2])


async def _main(thresholds: list[int], steps: list[int]) -> None:
    print("| history_min_entries | steps | bytes handed to the store | items read with the "
          "latest checkpoint |")
    print("| ---: | ---: | ---: | ---: |")
    for threshold in thresholds:
        for count in steps:
            handed, items = await _thread(threshold, count)
            print(f"| {threshold} | {count} | {handed:,} | {items} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.log_threshold",
                                     description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--threshold", type=int, action="append",
                        help=f"history_min_entries (repeatable; default {list(_THRESHOLDS)})")
    parser.add_argument("--steps", type=int, action="append",
                        help=f"steps per thread (repeatable; default {list(_STEPS)})")
    args = parser.parse_args(argv)
    anyio.run(_main, args.threshold or list(_THRESHOLDS), args.steps or list(_STEPS))


if __name__ == "__main__":
    main()
