"""PostgreSQL from the command line and the environment: ``fastcheckpoint init`` creates,
upgrades and never downgrades a schema; ``fastcheckpoint doctor`` checks a provisioned one
and says what to run otherwise; ``CheckpointManager.from_env`` opens the store from
``FASTCHECKPOINT_URL``."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator

import anyio
import asyncpg
import pytest

from fastcheckpoint import CheckpointManager
from fastcheckpoint.cli import main
from fastcheckpoint.stores._postgres_sql import MIGRATIONS, Names
from fastcheckpoint.stores.postgres import PostgresStore
from tests.stores._postgres_server import (
    PostgresTarget,
    drop_schema,
    free_port,
    unique_schema,
)

LATEST = MIGRATIONS[-1].version
APPLIED = [f"  applied migration {migration.version}: {migration.description}"
           for migration in MIGRATIONS]


@pytest.fixture
def schema(postgres: PostgresTarget) -> Iterator[str]:
    """A schema name of this test's own (not created), dropped afterwards."""
    name = unique_schema()
    yield name
    asyncio.run(drop_schema(postgres, name))


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands read their retry policy from the environment: short backoff, so an
    unreachable server fails in milliseconds."""
    for name, value in (("BASE_DELAY", "0.001"), ("MAX_DELAY", "0.01"), ("MAX_RETRIES", "2")):
        monkeypatch.setenv(f"FASTCHECKPOINT_RETRY_{name}", value)
    monkeypatch.delenv("FASTCHECKPOINT_URL", raising=False)


def _sql(postgres: PostgresTarget, statement: str) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        connection = await asyncpg.connect(postgres.url(), timeout=10)
        try:
            if statement.startswith("SELECT"):
                rows: list[asyncpg.Record] = await connection.fetch(statement)
                return rows
            await connection.execute(statement)
            return []
        finally:
            await connection.close()

    return asyncio.run(run())


def test_init_creates_then_finds_and_doctor_passes(
    postgres: PostgresTarget, schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"{postgres.url()}?schema={schema}&table_prefix=cli_"

    assert main(["init", url]) == 0
    created = capsys.readouterr().out
    assert main(["init", "--json", url]) == 0
    again = json.loads(capsys.readouterr().out)
    assert main(["doctor", url]) == 0
    doctor = capsys.readouterr().out

    assert created.splitlines() == [
        f"{url}: provisioned",
        f"  created schema {schema}",
        f"  created table {schema}.cli_migrations",
        *APPLIED,
        f"  now schema {schema} at version {LATEST} (table prefix 'cli_')",
    ]
    assert again == {"store": url, "provisioned": True, "actions": [
        f"found schema {schema} at version {LATEST} (table prefix 'cli_')"]}
    results = [re.split(r"\s{2,}", line)[:2] for line in doctor.splitlines()[2:]]
    assert results == [[check, "ok"] for check in (
        "write", "read latest", "read by id", "list", "update run", "delete run")], doctor
    tables = _sql(postgres, f"SELECT tablename FROM pg_tables WHERE schemaname = '{schema}' "
                            "ORDER BY 1")
    assert [row[0] for row in tables] == [
        "cli_checkpoints", "cli_items", "cli_labels", "cli_migrations", "cli_ops", "cli_refs",
        "cli_runs"]
    # The doctor's probe run is gone.
    assert _sql(postgres, f'SELECT count(*) FROM "{schema}".cli_runs')[0][0] == 0


def test_init_upgrades_an_older_schema(
    postgres: PostgresTarget, schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A migrations table with nothing applied stands for a schema older than this code."""
    names = Names(schema, "fc_")
    _sql(postgres, f'CREATE SCHEMA "{schema}"; CREATE TABLE {names["migrations"]} '
                   "(version integer PRIMARY KEY, description text NOT NULL, "
                   "applied_at timestamptz NOT NULL DEFAULT now())")
    url = f"{postgres.url()}?schema={schema}"

    assert main(["doctor", url]) == 1
    before = capsys.readouterr().out
    assert main(["init", url]) == 0
    upgraded = capsys.readouterr().out

    assert "schema version 0" in before
    assert "fastcheckpoint init URL" in before
    assert upgraded.splitlines()[1:] == [
        *APPLIED,
        f"  now schema {schema} at version {LATEST} (table prefix 'fc_')",
    ]
    versions = _sql(postgres, f"SELECT version FROM {names['migrations']} ORDER BY 1")
    assert [row[0] for row in versions] == [*range(1, LATEST + 1)]


def test_init_refuses_to_downgrade(
    postgres: PostgresTarget, schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    names = Names(schema, "fc_")
    url = f"{postgres.url()}?schema={schema}"
    assert main(["init", url]) == 0
    capsys.readouterr()
    _sql(postgres, f"INSERT INTO {names['migrations']} (version, description) "
                   f"VALUES ({LATEST + 1}, 'from a newer fastcheckpoint')")

    code = main(["init", url])
    refused = capsys.readouterr()
    doctor_code = main(["doctor", url])
    doctor = capsys.readouterr().out

    assert code == 2  # a configuration to fix, not a store failure
    assert "never downgrades: upgrade fastcheckpoint" in refused.err
    assert refused.out == ""
    assert doctor_code == 1
    assert "migrated by a newer fastcheckpoint" in doctor
    versions = _sql(postgres, f"SELECT version FROM {names['migrations']} ORDER BY 1")
    assert [row[0] for row in versions] == [*range(1, LATEST + 2)]


def test_doctor_before_init_says_to_run_init(
    postgres: PostgresTarget, schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["doctor", f"{postgres.url()}?schema={schema}"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out
    assert "holds no fastcheckpoint tables; create them with: fastcheckpoint init URL" in out
    assert not _sql(postgres, f"SELECT 1 FROM pg_namespace WHERE nspname = '{schema}'")


def test_an_unreachable_server_fails_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"postgresql://app:s3cret@127.0.0.1:{free_port()}/agents"

    init_code = main(["init", url])
    init = capsys.readouterr()
    doctor_code = main(["doctor", url])
    doctor = capsys.readouterr()

    assert init_code == 1
    assert "StoreUnavailableError" not in init.err  # the message, not a traceback
    assert "is unavailable during provision after 2 retries" in init.err
    assert doctor_code == 1
    assert "StoreUnavailableError: PostgreSQL at 127.0.0.1" in doctor.out
    for text in (init.out, init.err, doctor.out, doctor.err):
        assert "s3cret" not in text
        assert "Traceback" not in text


def test_from_env_opens_the_postgres_store(
    postgres: PostgresTarget, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"{postgres.url()}?schema={schema}"
    assert main(["init", url]) == 0
    monkeypatch.setenv("FASTCHECKPOINT_URL", url.replace("postgresql://", "postgres://"))
    monkeypatch.setenv("FASTCHECKPOINT_MAX_CHECKPOINTS_PER_RUN", "2")

    async def use() -> tuple[object, list[int], dict[str, int] | None]:
        with anyio.fail_after(30):
            async with CheckpointManager.from_env() as manager:
                for step in range(3):
                    await manager.create("env-run", {"step": step}, force=True)
                listed = await manager.list_checkpoints("env-run")
                restored = await manager.restore("env-run")
        return manager.store, [m.sequence for m in listed], \
            None if restored is None else restored.state

    store, sequences, state = asyncio.run(use())

    assert isinstance(store, PostgresStore)
    assert sequences == [2, 1]
    assert state == {"step": 2}
