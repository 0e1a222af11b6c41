"""Fixtures of the CrewAI tests, which run only where CrewAI is installed.

CrewAI pins versions of openai, mcp and pydantic that the project's dev environment cannot
share with the other frameworks, so these tests run in a virtualenv of their own that
``tests/integrations/test_crewai_lane.py`` builds; the normal suite skips this directory.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

collect_ignore_glob = [] if importlib.util.find_spec("crewai") else ["test_*.py"]

KINDS = ("memory", "file", "sqlite", "redis")
REDIS_URL = os.environ.get("FASTCHECKPOINT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
QUIET_CREWAI = {
    "CREWAI_DISABLE_TELEMETRY": "true",
    "CREWAI_TRACING_ENABLED": "false",
    "OTEL_SDK_DISABLED": "true",
}


@pytest.fixture(scope="session", autouse=True)
def quiet_crewai(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """No telemetry or tracing, and CrewAI's own files (memory, default databases) in a
    temporary directory instead of the user's data directory."""
    settings = {**QUIET_CREWAI, "XDG_DATA_HOME": str(tmp_path_factory.mktemp("crewai-data"))}
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    yield settings
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(params=KINDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A store URL of each kind, empty; Redis under a prefix of its own, removed after."""
    kind: str = request.param
    if kind == "memory":
        yield "memory://"
    elif kind == "file":
        yield f"file://{tmp_path / 'store'}?fsync=false"
    elif kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}?synchronous=normal"
    else:
        yield from _redis_url()


def _redis_url() -> Iterator[str]:
    if importlib.util.find_spec("redis") is None:
        pytest.skip("the redis extra is not installed in this environment")
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        pytest.skip(f"no Redis server at {REDIS_URL}: {exc}")
    prefix = f"fc-crewai-test-{secrets.token_hex(4)}"
    try:
        yield f"{REDIS_URL}?prefix={prefix}"
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)
        client.close()

