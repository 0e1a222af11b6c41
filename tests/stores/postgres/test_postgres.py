"""The store contract, the adapter capabilities and repair on PostgresStore (a real
PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from fastcheckpoint.stores import CheckpointStore
from fastcheckpoint.stores.postgres import PostgresStore
from fastcheckpoint.testing import (
    DamageRunRecord,
    LabelsContract,
    NestedItemsContract,
    RepairContract,
    SequenceGuardContract,
    SharedItemsContract,
    StoreContract,
)
from tests.stores._postgres_server import (
    RUN_ROW_DAMAGES,
    PostgresTarget,
    drop_schema,
    run_row_damage,
    unique_schema,
)


class TestPostgresStore(
    StoreContract, LabelsContract, SharedItemsContract, NestedItemsContract, RepairContract,
    SequenceGuardContract,
):
    """Every test in a schema of its own, provisioned by the store; repair against each damage
    a run row can take while its checkpoints stay (an older copy put back, a row of another
    incarnation, a run id that is not UTF-8)."""

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

    @pytest.fixture(params=sorted(RUN_ROW_DAMAGES))
    def damage_run_record(
        self, request: pytest.FixtureRequest, postgres: PostgresTarget
    ) -> DamageRunRecord:
        damage: DamageRunRecord = run_row_damage(postgres, request.param)
        return damage
