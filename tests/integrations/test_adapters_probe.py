"""Findings of an adversarial probe of the session adapters (Google ADK, OpenAI Agents,
Pydantic AI, Agent Framework), each checked against the framework's own reference service or
with an injected fault, on several stores. Each test failed before its fix."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest

pytest.importorskip("google.adk")

from google.adk.events.event import Event
from google.adk.platform import time as platform_time
from google.adk.sessions import BaseSessionService, InMemorySessionService
from google.adk.sessions.base_session_service import GetSessionConfig

from fastcheckpoint.integrations.google_adk import FastSessionService
from tests._helpers import FakeClock
from tests.integrations.conftest import FreshStore

pytestmark = pytest.mark.anyio

DEADLINE = 30
PROBED_KINDS = ("memory", "file", "sqlite", "redis")


@pytest.fixture(params=PROBED_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
def adk_clock(clock: FakeClock) -> Iterator[FakeClock]:
    """ADK's own clock on ``clock`` (the in-memory service's times)."""
    platform_time.set_time_provider(clock)
    yield clock
    platform_time.reset_time_provider()


# -- Google ADK: get_session's GetSessionConfig --------------------------------------------------

# Events stored out of timestamp order (parallel agents' branches append as they finish):
# stamps given per event, relative to the clock.
STAMPS = (5.0, 1.0, 6.0, 2.0)
CONFIGS = (
    GetSessionConfig(after_timestamp=3.0),
    GetSessionConfig(after_timestamp=1.5),
    GetSessionConfig(num_recent_events=2, after_timestamp=3.0),
    GetSessionConfig(num_recent_events=1, after_timestamp=3.0),
    GetSessionConfig(num_recent_events=3),
    GetSessionConfig(num_recent_events=0, after_timestamp=0.0),
)


async def _selected_ids(service: BaseSessionService, base: float) -> list[list[str]]:
    session = await service.create_session(app_name="app", user_id="u", session_id="s")
    for index, stamp in enumerate(STAMPS):
        await service.append_event(session, Event(
            id=f"e{index}", author="agent", invocation_id="inv", timestamp=base + stamp))
    selected: list[list[str]] = []
    for config in CONFIGS:
        after = config.after_timestamp
        moved = config.model_copy(
            update={"after_timestamp": None if after is None else base + after})
        found = await service.get_session(app_name="app", user_id="u", session_id="s",
                                          config=moved)
        assert found is not None
        selected.append([event.id for event in found.events])
    return selected


async def test_adk_get_session_config_selects_as_adk_does_with_events_out_of_order(
    fresh_store: FreshStore, adk_clock: FakeClock
) -> None:
    """``after_timestamp`` keeps every event at or after it, then ``num_recent_events`` the
    newest of those, as ADK's in-memory (and database) services do; before, only the newest
    unbroken run at or after it was kept, after ``num_recent_events`` had cut: an event
    appended after an older-stamped one was lost from the agent's context."""
    with anyio.fail_after(DEADLINE):
        expected = await _selected_ids(InMemorySessionService(), adk_clock.now)
        assert expected[0] == ["e0", "e2"]  # the reference keeps e0 across e1's gap
        async with fresh_store() as store:
            service = FastSessionService(store, clock=adk_clock)
            assert await _selected_ids(service, adk_clock.now) == expected
