"""Fixtures every PostgreSQL test module uses: the server, and a provisioned schema of a
test's own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest

from fastcheckpoint.stores.postgres import PostgresStore
from tests.stores._postgres_server import (
    PostgresTarget,
    drop_schema,
    session_target,
    unique_schema,
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # asyncpg runs on asyncio only


@pytest.fixture(scope="session")
def postgres(pytestconfig: pytest.Config) -> PostgresTarget:
    return session_target(pytestconfig)


@pytest.fixture
def schema(postgres: PostgresTarget) -> Iterator[str]:
    """A provisioned schema of this test's own, dropped afterwards (sync, for sync tests too:
    it runs its own event loop outside the test's)."""
    name = unique_schema()

    async def provision() -> None:
        store = PostgresStore.from_url(f"{postgres.url()}?schema={name}")
        with anyio.fail_after(30):
            await store.provision()
            await store.aclose()

    asyncio.run(provision())
    yield name
    asyncio.run(drop_schema(postgres, name))


@pytest.fixture
async def store(postgres: PostgresTarget, schema: str) -> AsyncIterator[PostgresStore]:
    """A store on this test's schema, closed afterwards."""
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    yield store
    with anyio.fail_after(20):
        await store.aclose()
