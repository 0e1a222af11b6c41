"""LangGraph's own checkpointer conformance suite, on the saver over every store.

``report.conformance_level()`` says FULL when the extended capabilities are merely missing,
so each of them must also be detected and passed. Every capability gets a fresh saver on a
fresh store (its tests share it, and would see each other's threads otherwise).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
from langgraph.checkpoint.conformance import checkpointer_test, validate

from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
from tests.integrations.conftest import FreshStore

pytestmark = pytest.mark.anyio

EXTENDED = ("delete_for_runs", "copy_thread", "prune")
DEADLINE = {"memory": 30, "file": 60, "sqlite": 60, "redis": 60, "s3": 240, "dynamodb": 240,
            "postgres": 120}


async def test_the_saver_passes_langgraph_conformance(kind: str, fresh_store: FreshStore) -> None:
    @checkpointer_test(name=f"FastCheckpointSaver on {kind}")
    async def saver() -> AsyncIterator[FastCheckpointSaver]:
        async with fresh_store() as store, FastCheckpointSaver(store) as fresh:
            yield fresh

    with anyio.fail_after(DEADLINE[kind]):
        report = await validate(saver)

    failures = {name: result.failures for name, result in report.results.items()
                if result.failures}
    assert report.passed_all_base(), failures
    for capability in EXTENDED:
        result = report.results[capability]
        assert result.detected, f"{capability} not detected"
        assert result.passed is True, (capability, result.failures)
        assert result.tests_passed > 0
    assert sum(result.tests_passed for result in report.results.values()) == 81
