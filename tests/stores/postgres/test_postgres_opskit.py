"""The ops kit in stores/postgres/ against the code: schema.sql is what provision() creates,
grants.sql is enough for the store and no more."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import asyncpg
import pytest

from fastcheckpoint import CheckpointConfig, CheckpointManager
from fastcheckpoint.stores import CheckpointStore
from fastcheckpoint.stores._postgres_schema import grants_script, schema_script
from fastcheckpoint.stores._postgres_sql import FUNCTIONS, MIGRATIONS, PRIVILEGES, TABLES, Names
from fastcheckpoint.stores.postgres import PostgresStore
from fastcheckpoint.testing import (
    T0,
    DamageRunRecord,
    LabelsContract,
    NestedItemsContract,
    RepairContract,
    SequenceGuardContract,
    SharedItemsContract,
    StoreContract,
    checkpoint_id_of,
    key_of,
    make_item,
    make_run,
)
from tests.stores._postgres_server import (
    RUN_ROW_DAMAGES,
    PostgresTarget,
    drop_schema,
    run_row_damage,
    unique_schema,
)
from tests.stores._postgres_server import append_checkpoint as _append

KIT = Path(__file__).resolve().parents[3] / "stores" / "postgres"
DEFAULT = Names("public", "fc_")

pytestmark = pytest.mark.anyio


def test_schema_sql_is_what_provision_creates() -> None:
    assert (KIT / "schema.sql").read_text() == schema_script(DEFAULT)


def test_grants_sql_is_generated_from_the_code() -> None:
    text = (KIT / "grants.sql").read_text()
    assert text == grants_script(DEFAULT, "fastcheckpoint_app")
    for table in (*TABLES, "migrations"):
        assert f'ON "public"."fc_{table}" TO' in text
    for function in FUNCTIONS:
        assert f'FUNCTION "public"."fc_{function}"(' in text
    assert set(PRIVILEGES) == {*TABLES, "migrations"}
    for forbidden in ("ALL", "CREATE", "TRUNCATE", "REFERENCES", "TRIGGER"):
        assert forbidden not in text.replace("CREATE ROLE", "")


@pytest.fixture
async def kit_database(postgres: PostgresTarget) -> AsyncIterator[tuple[str, str]]:
    """A fresh database set up from schema.sql, and a role with grants.sql only."""
    suffix = uuid.uuid4().hex[:10]
    database, role = f"{postgres.database}_kit_{suffix}", f"fc_app_{suffix}"
    admin = await asyncpg.connect(postgres.admin_url)
    await admin.execute(f"CREATE DATABASE {database}")
    await admin.execute(f"CREATE ROLE {role} LOGIN")
    owner = await asyncpg.connect(postgres.url(database))
    try:
        await owner.execute((KIT / "schema.sql").read_text())
        await owner.execute((KIT / "grants.sql").read_text().replace("fastcheckpoint_app", role))
        await owner.execute(f"REVOKE ALL ON SCHEMA public FROM PUBLIC; "
                            f"REVOKE CREATE ON DATABASE {database} FROM PUBLIC")
    finally:
        await owner.close()
    yield database, role
    await admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    await admin.execute(f"DROP ROLE IF EXISTS {role}")
    await admin.close()


async def test_the_store_runs_on_the_kits_schema_as_the_granted_role(
    postgres: PostgresTarget, kit_database: tuple[str, str]
) -> None:
    database, role = kit_database
    store = PostgresStore.from_url(postgres.url(database, user=role))
    run = make_run("kit")
    key = key_of(run)
    try:
        with anyio.fail_after(60):
            assert await store.provision() == [
                f"found schema public at version {MIGRATIONS[-1].version} (table prefix 'fc_')"]
            await _append(store, run, 0, expires_at=T0 + 10, refs=["b/a"],
                          items=[make_item("b/a"), make_item("w/0", owner=0)], labels=("l",))
            await _append(store, run, 1, keep_latest=1, refs=["b/b"], items=[make_item("b/b")])
            assert await store.put_owned_items(
                key, [make_item("w/1", owner=1)], owner=1, checkpoint_id=checkpoint_id_of(run, 1),
                if_absent=True, now=T0)
            assert await store.read_with_items(key, sequence=None, now=T0) is not None
            assert await store.get(key, 1, now=T0) is not None
            assert await store.latest(key, now=T0) is not None
            assert (await store.headers(key, before=None, limit=5, now=T0))[1] == "active"
            assert len((await store.runs_with_label("l", limit=5, cursor=None, now=T0))[0]) == 1
            await store.update_run(key, incarnation=run.incarnation, version=0,
                                   status="paused", data=b"", now=T0)
            assert await store.count_runs(status="paused", now=T0) == 1
            assert len((await store.list_runs(status=None, limit=5, cursor=None, now=T0))[0]) == 1
            await store.put_items(key, [make_item("x", expires_at=T0 + 1)], create_only=True,
                                  now=T0)
            assert await store.get_items(key, ["x"], now=T0) == {"x": b"value-x"}
            assert await store.scan_items(key, now=T0)
            assert await store.delete_items(key, ["x"]) == 1
            assert await store.delete(key, 1, checkpoint_id=checkpoint_id_of(run, 1))
            assert await store.purge_expired(now=T0 + 100, limit=100) == (0, True)
            manager = CheckpointManager(store, config=CheckpointConfig(clock=time.time))
            await manager.create("managed", {"a": 1})
            assert await manager.delete_run("managed") == 1
            assert await store.cleanup_expired() == 0
    finally:
        await store.aclose()


async def test_the_granted_role_cannot_change_the_schema(
    postgres: PostgresTarget, kit_database: tuple[str, str]
) -> None:
    database, role = kit_database
    connection = await asyncpg.connect(postgres.url(database, user=role))
    try:
        for statement in ("DROP TABLE public.fc_runs", "TRUNCATE public.fc_checkpoints",
                          "CREATE TABLE public.intruder (x int)",
                          "ALTER TABLE public.fc_items ADD COLUMN y int",
                          "UPDATE public.fc_checkpoints SET payload = ''",
                          "DELETE FROM public.fc_migrations"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def granted_role(postgres: PostgresTarget) -> Iterator[str]:
    """A login role of this session with no privileges of its own."""
    role = f"fc_app_{uuid.uuid4().hex[:10]}"

    async def admin(statement: str, database: str | None = None) -> None:
        connection = await asyncpg.connect(postgres.url(database), timeout=10)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(admin(f"CREATE ROLE {role} LOGIN"))
    yield role
    asyncio.run(admin(f"DROP OWNED BY {role}"))  # the grants in the session's database
    asyncio.run(admin(f"DROP ROLE {role}", "postgres"))


class TestPostgresStoreAsTheGrantedRoleWithoutStatementCache(
    StoreContract, LabelsContract, SharedItemsContract, NestedItemsContract, RepairContract,
    SequenceGuardContract,
):
    """The whole contract as production runs it: the owner provisions, grants.sql (generated
    for this schema) is all the application's role holds, and the store sends unnamed
    statements only (``statement_cache_size=0``, as behind PgBouncer in transaction mode).
    Repair too: ``fastcheckpoint doctor --repair`` runs as that role."""

    deadline_seconds = 30.0

    @pytest.fixture(params=sorted(RUN_ROW_DAMAGES))
    def damage_run_record(
        self, request: pytest.FixtureRequest, postgres: PostgresTarget
    ) -> DamageRunRecord:
        damage: DamageRunRecord = run_row_damage(postgres, request.param)
        return damage

    @pytest.fixture
    async def store(
        self, postgres: PostgresTarget, granted_role: str
    ) -> AsyncIterator[CheckpointStore]:
        schema = unique_schema()
        owner = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
        with anyio.fail_after(30):
            await owner.provision()
            await owner.aclose()
            connection = await asyncpg.connect(postgres.url())
            try:
                await connection.execute(grants_script(Names(schema, "fc_"), granted_role))
            finally:
                await connection.close()
        store = PostgresStore.from_url(
            f"{postgres.url(user=granted_role)}?schema={schema}&max_size=4"
            "&statement_cache_size=0")
        yield store
        with anyio.fail_after(30):
            await store.aclose()
            await drop_schema(postgres, schema)
