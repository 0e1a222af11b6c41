"""The SQLite store's schema: versioned, created on first use, upgraded by ``fastcheckpoint init``.

``fc_schema_migrations`` lists the schema versions applied to a database, one row each. A
store opens a database only at :data:`SCHEMA_VERSION`: it creates the schema in an empty
database, and refuses an older one (``fastcheckpoint init`` upgrades it) and a newer one (made
by a later release; never downgraded). ``stores/sqlite/schema.sql`` is this schema as SQL,
checked against it by a test.

Every column is typed by a ``CHECK`` (SQLite's column types are only affinities), so a row
edited by hand with the wrong type is refused by SQLite itself instead of read back wrong; a
trigger removes a checkpoint's owned items with it, also when it is deleted by hand, and
records the removal on the reference count of each such item a checkpoint names.
"""

from __future__ import annotations

import sqlite3
import time

from fastcheckpoint.errors import ConfigurationError

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "provision", "schema_version", "tables"]

_V1 = (
    """CREATE TABLE fc_runs (
    run_key TEXT NOT NULL PRIMARY KEY CHECK (typeof(run_key) = 'text'),
    run_id TEXT NOT NULL CHECK (typeof(run_id) = 'text'),
    incarnation TEXT NOT NULL CHECK (typeof(incarnation) = 'text'),
    status TEXT NOT NULL CHECK (typeof(status) = 'text' AND status <> ''),
    created_at REAL NOT NULL CHECK (typeof(created_at) = 'real'),
    updated_at REAL NOT NULL CHECK (typeof(updated_at) = 'real'),
    latest_sequence INTEGER NOT NULL CHECK (typeof(latest_sequence) = 'integer'),
    checkpoint_count INTEGER NOT NULL
        CHECK (typeof(checkpoint_count) = 'integer' AND checkpoint_count >= 0),
    immortal INTEGER NOT NULL CHECK (typeof(immortal) = 'integer' AND immortal >= 0),
    expires_at REAL CHECK (expires_at IS NULL OR typeof(expires_at) = 'real'),
    due REAL CHECK (due IS NULL OR typeof(due) = 'real'),
    version INTEGER NOT NULL CHECK (typeof(version) = 'integer'),
    labels TEXT CHECK (labels IS NULL OR typeof(labels) = 'text'),
    data BLOB NOT NULL CHECK (typeof(data) = 'blob')
)""",
    "CREATE INDEX fc_runs_by_created ON fc_runs (created_at, run_key)",
    "CREATE INDEX fc_runs_by_status ON fc_runs (status, created_at, run_key)",
    "CREATE INDEX fc_runs_by_due ON fc_runs (due) WHERE due IS NOT NULL",
    """CREATE TABLE fc_checkpoints (
    run_key TEXT NOT NULL,
    sequence INTEGER NOT NULL CHECK (typeof(sequence) = 'integer' AND sequence >= 0),
    checkpoint_id TEXT NOT NULL CHECK (typeof(checkpoint_id) = 'text'),
    created_at REAL NOT NULL CHECK (typeof(created_at) = 'real'),
    expires_at REAL CHECK (expires_at IS NULL OR typeof(expires_at) = 'real'),
    refs TEXT CHECK (refs IS NULL OR typeof(refs) = 'text'),
    header BLOB NOT NULL CHECK (typeof(header) = 'blob'),
    payload BLOB NOT NULL CHECK (typeof(payload) = 'blob'),
    PRIMARY KEY (run_key, sequence)
)""",
    """CREATE INDEX fc_checkpoints_by_expiry ON fc_checkpoints (run_key, expires_at)
    WHERE expires_at IS NOT NULL""",
    """CREATE TABLE fc_items (
    run_key TEXT NOT NULL,
    key TEXT NOT NULL CHECK (typeof(key) = 'text'),
    owner INTEGER CHECK (owner IS NULL OR typeof(owner) = 'integer'),
    expires_at REAL CHECK (expires_at IS NULL OR typeof(expires_at) = 'real'),
    value BLOB NOT NULL CHECK (typeof(value) = 'blob'),
    PRIMARY KEY (run_key, key)
)""",
    "CREATE INDEX fc_items_by_owner ON fc_items (run_key, owner) WHERE owner IS NOT NULL",
    "CREATE INDEX fc_items_by_expiry ON fc_items (expires_at) WHERE expires_at IS NOT NULL",
    """CREATE TRIGGER fc_checkpoints_take_owned_items AFTER DELETE ON fc_checkpoints
BEGIN
    DELETE FROM fc_items WHERE run_key = old.run_key AND owner = old.sequence;
END""",
    """CREATE TABLE fc_item_refs (
    run_key TEXT NOT NULL,
    key TEXT NOT NULL,
    holders INTEGER NOT NULL CHECK (typeof(holders) = 'integer'),
    PRIMARY KEY (run_key, key)
) WITHOUT ROWID""",
    """CREATE TABLE fc_labels (
    run_key TEXT NOT NULL,
    label TEXT NOT NULL,
    created_at REAL NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (run_key, label)
) WITHOUT ROWID""",
    "CREATE INDEX fc_labels_by_label ON fc_labels (label, created_at, run_key)",
)

# Version 2: the store records its own removals of items a held checkpoint names (an owned
# item gone with its owner, ``delete_items``) on the key's reference count, so a read can tell
# them from an item row deleted behind its back. The record lives on the count row: it goes
# when no held checkpoint names the key any more, or with the run. A named key whose item row
# is already missing in a database of version 1 is taken for one the store removed (earlier
# releases kept no record): it reads as absent, as it did. The column is typed by a CHECK like
# the others (SQLite checks it against the rows in place when it adds the column: the default
# passes, so no table is rebuilt).
_V2 = (
    """ALTER TABLE fc_item_refs ADD COLUMN removed INTEGER NOT NULL DEFAULT 0
    CHECK (typeof(removed) = 'integer' AND removed IN (0, 1))""",
    """UPDATE fc_item_refs SET removed = 1 WHERE NOT EXISTS (SELECT 1 FROM fc_items i
    WHERE i.run_key = fc_item_refs.run_key AND i.key = fc_item_refs.key)""",
    "DROP TRIGGER fc_checkpoints_take_owned_items",
    """CREATE TRIGGER fc_checkpoints_take_owned_items AFTER DELETE ON fc_checkpoints
BEGIN
    UPDATE fc_item_refs SET removed = 1 WHERE run_key = old.run_key AND key IN
        (SELECT key FROM fc_items WHERE run_key = old.run_key AND owner = old.sequence);
    DELETE FROM fc_items WHERE run_key = old.run_key AND owner = old.sequence;
END""",
)

MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (1, "runs, checkpoints, items, item references and labels", _V1),
    (2, "the store records its removals of items a checkpoint names", _V2),
)
"""``(version, description, statements)`` in order: each brings the schema to ``version``."""

SCHEMA_VERSION = MIGRATIONS[-1][0]
"""The schema version this release reads and writes."""

_MIGRATIONS_TABLE = """CREATE TABLE fc_schema_migrations (
    version INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at REAL NOT NULL
)"""


def tables(connection: sqlite3.Connection) -> list[tuple[str, str, str]]:
    """``(type, name, sql)`` of every table and index of the schema, by name."""
    rows = connection.execute(
        "SELECT type, name, sql FROM sqlite_master WHERE name LIKE 'fc\\_%' ESCAPE '\\' "
        "AND sql IS NOT NULL ORDER BY name"
    ).fetchall()
    return [(str(kind), str(name), str(sql)) for kind, name, sql in rows]


def schema_version(connection: sqlite3.Connection) -> int | None:
    """The database's schema version; ``None`` when it has no schema yet."""
    found = connection.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'fc_schema_migrations'"
    ).fetchone()
    if found is None:
        return None
    version = connection.execute("SELECT max(version) FROM fc_schema_migrations").fetchone()[0]
    return int(version) if version is not None else 0


def check_version(version: int | None, where: str) -> None:
    """Refuse a database whose schema this release cannot use as it is."""
    if version is None or version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise ConfigurationError(
            f"the SQLite database {where} has schema version {version}, newer than this "
            f"release of fastcheckpoint reads ({SCHEMA_VERSION}); upgrade fastcheckpoint "
            "(a schema is never downgraded)"
        )
    raise ConfigurationError(
        f"the SQLite database {where} has schema version {version}, older than this release "
        f"of fastcheckpoint uses ({SCHEMA_VERSION}); upgrade it with: fastcheckpoint init "
        f"sqlite:///{where}"
    )


def provision(connection: sqlite3.Connection, where: str, *, upgrade: bool) -> list[str]:
    """Create the schema in an empty database, or (with ``upgrade``) bring an older one up to
    date, in one transaction; refuse a newer one. Returns what it did, one line each.

    ``connection`` is in autocommit mode (``isolation_level=None``) and outside a transaction.
    """
    connection.execute("BEGIN IMMEDIATE")
    try:
        done = _migrate(connection, where, upgrade=upgrade)
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")
    return done


def _migrate(connection: sqlite3.Connection, where: str, *, upgrade: bool) -> list[str]:
    version = schema_version(connection)
    if version is not None and version > SCHEMA_VERSION:
        check_version(version, where)
    if version == SCHEMA_VERSION:
        return [f"found schema version {version} in {where}: up to date"]
    if version is not None and not upgrade:
        check_version(version, where)
    if version is None:
        connection.execute(_MIGRATIONS_TABLE)
    done: list[str] = []
    for number, description, statements in MIGRATIONS:
        if number <= (version or 0):
            continue
        for statement in statements:
            connection.execute(statement)
        connection.execute(
            "INSERT INTO fc_schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
            (number, description, time.time()),
        )
        done.append(f"applied schema version {number} ({description}) to {where}")
    if version is None:
        return [f"created schema version {SCHEMA_VERSION} in {where}"]
    return [f"upgraded schema of {where} from version {version} to {SCHEMA_VERSION}", *done]
