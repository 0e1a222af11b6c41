"""``FastFlowPersistence``'s every public method, fuzzed as the other adapters' are in
``tests/integrations/test_adapters_surface_fuzz.py`` (its engine, hostile values and rules):
each call returns or raises a ``CheckpointError``, and one that raises leaves the store as
it was. CrewAI runs here, in its own lane. ``ADFUZZ_EXAMPLES=N`` hunts (random examples)."""

from __future__ import annotations

import uuid
from datetime import datetime
from pathlib import Path

import pytest
from crewai.flow.async_feedback.types import PendingFeedbackContext
from pydantic import BaseModel

from fastcheckpoint import ConfigurationError, MemoryStore
from fastcheckpoint.integrations.crewai import FastFlowPersistence
from tests._helpers import make_config
from tests.integrations.test_adapters_surface_fuzz import (
    KINDS,
    MEMORY_ENV,
    Context,
    Surface,
    _fresh,
    fuzz,
)

FLOW = str(uuid.UUID(int=1))


def _context(flow: str = FLOW) -> PendingFeedbackContext:
    return PendingFeedbackContext(
        flow_id=flow, flow_class="tests.ReviewFlow", method_name="review",
        method_output={"draft": "refund A-17"}, message="Send it?",
        emit=["approved", "rejected"], default_outcome="rejected", metadata={"ticket": 7},
        requested_at=datetime(2026, 12, 3, 9, 0), execution_uuid="exec-1")


async def _build(context: Context) -> None:
    persistence = FastFlowPersistence(context.store, config=make_config(context.clock))
    context.objects["FastFlowPersistence"] = persistence
    persistence.save_state(FLOW, "start", {"n": 1, "nested": {"a": [1.5, None]}})


def crewai_surface() -> Surface:
    return Surface(
        classes=(FastFlowPersistence,),
        build=_build,
        valid={
            "flow_uuid": _fresh(FLOW, str(uuid.UUID(int=2))),
            "method_name": _fresh("start", "review"),
            "state_data": _fresh({"n": 2}, {}),
            "context": [lambda _: _context()],
            "environ": _fresh(MEMORY_ENV),
        },
        excluded={},
        excluded_bases={BaseModel: "pydantic's model API (model_dump, model_copy, ...): the "
                        "persistence's fields, no code of ours"},
        blocking=frozenset({"close", "init_db", "save_state", "load_state",
                            "save_pending_feedback", "load_pending_feedback",
                            "clear_pending_feedback", "feedback", "from_env"}),
    )


@pytest.mark.parametrize("kind", KINDS)
def test_crewai_surface(kind: str, tmp_path: Path) -> None:
    fuzz(crewai_surface(), kind, tmp_path)


# -- what the fuzz found ------------------------------------------------------------------------


class _Text(str):
    """A ``str`` subclass, as an application's own id type may be."""


@pytest.mark.parametrize("environ", [1.5, [("a", "b")], {1: "memory://"}],
                         ids=["float", "list", "int key"])
def test_from_env_refuses_an_environ_that_is_not_a_mapping_of_str(environ: object) -> None:
    """Was AttributeError or TypeError from the config's reader."""
    with pytest.raises(ConfigurationError, match="environ must "):
        FastFlowPersistence.from_env(environ)  # type: ignore[arg-type]


def test_a_flow_id_or_method_name_that_is_a_str_subclass_is_stored_as_its_text() -> None:
    """The run's header encoder takes only plain ``str``: a subclass was a TypeError."""
    persistence = FastFlowPersistence(MemoryStore())
    try:
        persistence.save_state(_Text(FLOW), _Text("start"), {"n": 1})
        assert persistence.load_state(FLOW) == {"n": 1}
        persistence.save_pending_feedback(_Text(FLOW), _context(), {"n": 2})
        assert persistence.feedback(FLOW) is None
    finally:
        persistence.close()
