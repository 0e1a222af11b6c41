"""Schema versions of the PostgreSQL store: what ``provision()`` (``fastcheckpoint init``)
applies, what a store checks before its first call, and the ops kit's ``schema.sql``.

The ``<prefix>migrations`` table holds one row per applied migration. Provisioning runs in one
transaction under an advisory transaction lock (no session state, so it works through
PgBouncer too): concurrent ``init`` runs on one schema take turns, whatever their table
prefixes, and a failed migration leaves nothing behind. A database migrated by a newer
fastcheckpoint is never downgraded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from fastcheckpoint.errors import ConfigurationError
from fastcheckpoint.stores._postgres_sql import FUNCTIONS, MIGRATIONS, PRIVILEGES, TABLES, Names

__all__ = [
    "SchemaState", "grants_script", "missing_objects", "provision", "schema_script",
    "schema_state",
]

LATEST = MIGRATIONS[-1].version

_MIGRATIONS_TABLE = """CREATE TABLE {migrations} (
    version integer PRIMARY KEY,
    description text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


@dataclass(frozen=True)
class SchemaState:
    version: int | None
    """The newest migration applied, ``None`` when there is no migrations table."""


def _lock_key(names: Names) -> int:
    """The advisory lock of provisioning in one schema: a signed 64-bit hash of its name.

    One lock per schema, not per store: stores with other table prefixes in a new schema all
    create the schema, and two ``CREATE SCHEMA`` at once fail one of them (a duplicate key in
    the catalog), ``IF NOT EXISTS`` or not."""
    digest = hashlib.blake2b(f"fastcheckpoint-schema:{names.schema}".encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def schema_state(connection: Any, names: Names) -> SchemaState:
    """The version a database is at (``connection``: an asyncpg connection or pool)."""
    table = await connection.fetchval("SELECT to_regclass($1)::text", names["migrations"])
    if table is None:
        return SchemaState(None)
    version = await connection.fetchval(f"SELECT max(version) FROM {names['migrations']}")
    return SchemaState(0 if version is None else int(version))


async def missing_objects(connection: Any, names: Names) -> list[str]:
    """The store's tables and functions that the database lacks (by name and signature)."""
    wanted = [names[table] for table in TABLES]
    found = await connection.fetch(
        "SELECT name FROM unnest($1::text[]) name WHERE to_regclass(name) IS NULL", wanted)
    missing = [row[0] for row in found]
    signatures = [f"{names[function]}({arguments})" for function, arguments in FUNCTIONS.items()]
    found = await connection.fetch(
        "SELECT name FROM unnest($1::text[]) name WHERE to_regprocedure(name) IS NULL",
        signatures)
    return missing + [row[0] for row in found]


async def provision(connection: Any, names: Names) -> list[str]:
    """Create or upgrade the store's schema on ``connection`` (an asyncpg connection)."""
    lines: list[str] = []
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(names))
        exists = await connection.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", names.schema)
        if not exists:
            await connection.execute(f"CREATE SCHEMA {names.quoted_schema}")
            lines.append(f"created schema {names.schema}")
        current = (await schema_state(connection, names)).version
        if current is None:
            await connection.execute(names.render(_MIGRATIONS_TABLE))
            lines.append(f"created table {names.schema}.{names.plain('migrations')}")
            current = 0
        _refuse_downgrade(current, names)
        for migration in MIGRATIONS[current:]:
            await connection.execute(names.render(migration.sql))
            await connection.execute(
                f"INSERT INTO {names['migrations']} (version, description) VALUES ($1, $2)",
                migration.version, migration.description)
            lines.append(f"applied migration {migration.version}: {migration.description}")
        missing = await missing_objects(connection, names)
        if missing:
            raise ConfigurationError(
                f"schema {names.schema} says it is at version {LATEST} but lacks "
                f"{', '.join(missing)}; someone dropped them: restore them from "
                "stores/postgres/schema.sql, or drop the store's tables and run init again")
    found = "found" if current == LATEST else "now"
    lines.append(f"{found} schema {names.schema} at version {LATEST} "
                 f"(table prefix {names.prefix!r})")
    return lines


def _refuse_downgrade(current: int, names: Names) -> None:
    if current > LATEST:
        raise ConfigurationError(
            f"schema {names.schema} (table prefix {names.prefix!r}) was migrated by a newer "
            f"fastcheckpoint to version {current}; this one knows versions up to {LATEST} and "
            "never downgrades: upgrade fastcheckpoint")


def schema_script(names: Names) -> str:
    """The whole schema as one SQL script (what provision() applies to an empty database):
    the ops kit's ``stores/postgres/schema.sql`` for the default schema and prefix."""
    header = "\n".join([
        f"-- fastcheckpoint PostgreSQL store: every table, index and function at schema "
        f"version {LATEST}.",
        "-- Generated from the code (a test keeps it equal); `fastcheckpoint init URL` "
        "applies the same.",
        "-- Run it as the role that will own the tables: psql -v ON_ERROR_STOP=1 -f schema.sql",
    ])
    parts = [header, "BEGIN;", f"CREATE SCHEMA IF NOT EXISTS {names.quoted_schema};",
             names.render(_MIGRATIONS_TABLE) + ";"]
    for migration in MIGRATIONS:
        parts.append(names.render(migration.sql) + ";")
        description = migration.description.replace("'", "''")
        parts.append(f"INSERT INTO {names['migrations']} (version, description) "
                     f"VALUES ({migration.version}, '{description}');")
    parts.append("COMMIT;")
    return "\n\n".join(parts) + "\n"


def grants_script(names: Names, role: str) -> str:
    """Least privilege for the role the application connects as: no DDL, only the rows of the
    store's tables and its functions. The ops kit's ``stores/postgres/grants.sql``."""
    lines = [
        f"-- Least privilege for {role}, the role the application connects as.",
        "-- Generated from the code (a test keeps it equal and runs the store as such a role).",
        "-- Run it as the owner of the tables, after `fastcheckpoint init URL` or schema.sql;",
        f"-- create the role first, e.g.: CREATE ROLE {role} LOGIN PASSWORD '...';",
        "-- It may not create, alter or drop anything: upgrades run `fastcheckpoint init` as "
        "the owner.",
        "",
        f"GRANT USAGE ON SCHEMA {names.quoted_schema} TO {role};",
    ]
    for table, privileges in PRIVILEGES.items():
        lines.append(f"GRANT {privileges} ON {names[table]} TO {role};")
    for function, arguments in FUNCTIONS.items():
        lines.append(f"GRANT EXECUTE ON FUNCTION {names[function]}({arguments}) TO {role};")
    return "\n".join(lines) + "\n"
