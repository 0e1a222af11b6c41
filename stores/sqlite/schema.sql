-- The fastcheckpoint SQLite store's schema, version 2: what SQLiteStore creates in an
-- empty database on first use, and what `fastcheckpoint init sqlite:///...` creates.
-- A test checks that this file and the code create the same tables, indexes and trigger.
-- Apply it by hand only to an empty database: sqlite3 checkpoints.db < schema.sql

PRAGMA journal_mode = WAL;

BEGIN IMMEDIATE;

CREATE TABLE fc_schema_migrations (
    version INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at REAL NOT NULL
);

-- version 1: runs, checkpoints, items, item references and labels

CREATE TABLE fc_runs (
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
);

CREATE INDEX fc_runs_by_created ON fc_runs (created_at, run_key);

CREATE INDEX fc_runs_by_status ON fc_runs (status, created_at, run_key);

CREATE INDEX fc_runs_by_due ON fc_runs (due) WHERE due IS NOT NULL;

CREATE TABLE fc_checkpoints (
    run_key TEXT NOT NULL,
    sequence INTEGER NOT NULL CHECK (typeof(sequence) = 'integer' AND sequence >= 0),
    checkpoint_id TEXT NOT NULL CHECK (typeof(checkpoint_id) = 'text'),
    created_at REAL NOT NULL CHECK (typeof(created_at) = 'real'),
    expires_at REAL CHECK (expires_at IS NULL OR typeof(expires_at) = 'real'),
    refs TEXT CHECK (refs IS NULL OR typeof(refs) = 'text'),
    header BLOB NOT NULL CHECK (typeof(header) = 'blob'),
    payload BLOB NOT NULL CHECK (typeof(payload) = 'blob'),
    PRIMARY KEY (run_key, sequence)
);

CREATE INDEX fc_checkpoints_by_expiry ON fc_checkpoints (run_key, expires_at)
    WHERE expires_at IS NOT NULL;

CREATE TABLE fc_items (
    run_key TEXT NOT NULL,
    key TEXT NOT NULL CHECK (typeof(key) = 'text'),
    owner INTEGER CHECK (owner IS NULL OR typeof(owner) = 'integer'),
    expires_at REAL CHECK (expires_at IS NULL OR typeof(expires_at) = 'real'),
    value BLOB NOT NULL CHECK (typeof(value) = 'blob'),
    PRIMARY KEY (run_key, key)
);

CREATE INDEX fc_items_by_owner ON fc_items (run_key, owner) WHERE owner IS NOT NULL;

CREATE INDEX fc_items_by_expiry ON fc_items (expires_at) WHERE expires_at IS NOT NULL;

CREATE TRIGGER fc_checkpoints_take_owned_items AFTER DELETE ON fc_checkpoints
BEGIN
    DELETE FROM fc_items WHERE run_key = old.run_key AND owner = old.sequence;
END;

CREATE TABLE fc_item_refs (
    run_key TEXT NOT NULL,
    key TEXT NOT NULL,
    holders INTEGER NOT NULL CHECK (typeof(holders) = 'integer'),
    PRIMARY KEY (run_key, key)
) WITHOUT ROWID;

CREATE TABLE fc_labels (
    run_key TEXT NOT NULL,
    label TEXT NOT NULL,
    created_at REAL NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (run_key, label)
) WITHOUT ROWID;

CREATE INDEX fc_labels_by_label ON fc_labels (label, created_at, run_key);

INSERT INTO fc_schema_migrations (version, description, applied_at)
    VALUES (1, 'runs, checkpoints, items, item references and labels',
            (julianday('now') - 2440587.5) * 86400.0);

-- version 2: the store records its removals of items a checkpoint names

ALTER TABLE fc_item_refs ADD COLUMN removed INTEGER NOT NULL DEFAULT 0
    CHECK (typeof(removed) = 'integer' AND removed IN (0, 1));

UPDATE fc_item_refs SET removed = 1 WHERE NOT EXISTS (SELECT 1 FROM fc_items i
    WHERE i.run_key = fc_item_refs.run_key AND i.key = fc_item_refs.key);

DROP TRIGGER fc_checkpoints_take_owned_items;

CREATE TRIGGER fc_checkpoints_take_owned_items AFTER DELETE ON fc_checkpoints
BEGIN
    UPDATE fc_item_refs SET removed = 1 WHERE run_key = old.run_key AND key IN
        (SELECT key FROM fc_items WHERE run_key = old.run_key AND owner = old.sequence);
    DELETE FROM fc_items WHERE run_key = old.run_key AND owner = old.sequence;
END;

INSERT INTO fc_schema_migrations (version, description, applied_at)
    VALUES (2, 'the store records its removals of items a checkpoint names',
            (julianday('now') - 2440587.5) * 86400.0);

COMMIT;
