"""Regressions found by test_crewai_differential.py: a feedback context comes back from
FastFlowPersistence as it does from CrewAI's SQLiteFlowPersistence, or is refused."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from crewai.flow.async_feedback.types import PendingFeedbackContext
from crewai.flow.persistence.sqlite import SQLiteFlowPersistence
from pydantic import BaseModel

from fastcheckpoint import MemoryStore, SerializationError
from fastcheckpoint.integrations.crewai import FastFlowPersistence

FLOW = "6846bfbf-2445-47be-88e6-7dc37372cb76"


@pytest.fixture
def persistence() -> Iterator[FastFlowPersistence]:
    opened = FastFlowPersistence(MemoryStore())
    yield opened
    opened.close()


def context(**fields: object) -> PendingFeedbackContext:
    return PendingFeedbackContext(
        flow_id=FLOW, flow_class="tests.ReviewFlow", method_name="review", message="Send it?",
        requested_at=datetime(2026, 12, 3, 9, 0), **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_float_that_is_not_finite_in_a_feedback_context_is_refused_not_made_null(
    persistence: FastFlowPersistence, value: float
) -> None:
    """It came back as ``None`` (the JSON encoder wrote ``null``): the reviewer and the
    resumed flow saw a value the flow never produced."""
    with pytest.raises(SerializationError, match="feedback context"):
        persistence.save_pending_feedback(
            FLOW, context(method_output={"score": value}), {"id": FLOW})

    assert persistence.load_state(FLOW) is None  # checked before the state is checkpointed
    assert persistence.load_pending_feedback(FLOW) is None


def test_a_feedback_context_comes_back_as_from_crewais_sqlite_backend(
    persistence: FastFlowPersistence, tmp_path: Path
) -> None:
    """Keys ``True`` and ``None`` came back as ``"True"`` and ``"None"`` (JSON: ``"true"``,
    ``"null"``), and values JSON has no type for in ``llm`` (which CrewAI does not make
    JSON-safe) in another text than CrewAI's: a UTC datetime ending in ``Z``, a timedelta
    as ``P1D``, bytes as base64."""
    sqlite = SQLiteFlowPersistence(str(tmp_path / "flows.db"))
    asked = context(
        method_output={True: "yes", None: "none", 2: "two"},
        llm={"model": "gpt", "at": datetime(2026, 1, 1, tzinfo=timezone.utc),
             "timeout": timedelta(days=1), "raw": b"\x00", "stops": {"END"}})
    for backend in (persistence, sqlite):
        backend.save_pending_feedback(FLOW, asked, {"id": FLOW})

    ours, theirs = persistence.load_pending_feedback(FLOW), sqlite.load_pending_feedback(FLOW)
    assert ours is not None
    assert theirs is not None
    assert ours[1] == theirs[1]
    assert ours[1].method_output == {"true": "yes", "null": "none", "2": "two"}
    assert ours[1].llm == {"model": "gpt", "at": "2026-01-01T00:00:00+00:00",
                           "timeout": "1 day, 0:00:00", "raw": "b'\\x00'", "stops": ["END"]}


class Upload(BaseModel):
    id: str = ""
    blob: bytes = b""


def test_a_model_state_whose_json_dump_fails_is_stored_as_its_python_dump(
    persistence: FastFlowPersistence,
) -> None:
    """Bytes that are not UTF-8 make ``model_dump(mode="json")`` raise ``UnicodeDecodeError``
    (not pydantic's serialization error): the state was refused, where CrewAI's SQLite
    backend, as for any failed JSON dump, stores the Python dump."""
    persistence.save_state(FLOW, "upload", Upload(id=FLOW, blob=b"\x80"))

    assert persistence.load_state(FLOW) == {"id": FLOW, "blob": b"\x80"}
