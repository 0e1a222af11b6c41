"""The store contract and the adapter capabilities on PostgresStore (a real PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from fastcheckpoint.stores import CheckpointStore
from fastcheckpoint.stores.postgres import PostgresStore
from fastcheckpoint.testing import LabelsContract, SharedItemsContract, StoreContract
from tests.stores._postgres_server import (
    PostgresTarget,
    drop_schema,
    session_target,
    unique_schema,
)


@pytest.fixture
def anyio_backend() -> str:
    # asyncpg runs on asyncio only.
    return "asyncio"


@pytest.fixture(scope="session")
def postgres(pytestconfig: pytest.Config) -> PostgresTarget:
    return session_target(pytestconfig)


class TestPostgresStore(StoreContract, LabelsContract, SharedItemsContract):
    """Every test in a schema of its own, provisioned by the store."""

    deadline_seconds = 30.0

    @pytest.fixture
    async def store(self, postgres: PostgresTarget) -> AsyncIterator[CheckpointStore]:
        schema = unique_schema()
        store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}&max_size=4")
        with anyio.fail_after(30):
            await store.provision()
        yield store
        with anyio.fail_after(30):
            await store.aclose()
            await drop_schema(postgres, schema)
