"""The SQL of :mod:`fastcheckpoint.stores.postgres`: migrations (tables, indexes, functions) and
the statements the store sends, rendered for one schema and table prefix.

Layout (``<p>`` is the table prefix)::

    <p>migrations   version, description, applied_at: what provision() applied
    <p>runs         one row per run: the record, counters, labels, the last update's token
    <p>checkpoints  (run_key, sequence) primary key: the log; header, payload, refs, token
    <p>items        (run_key, key) primary key: side records, optionally owned by a checkpoint;
                    kept: the cleanup found the key named by a count (migration 14)
    <p>refs         (run_key, key) -> how many held checkpoints name the item in their refs,
                    and whether the store removed the item while they did (migration 13)
    <p>labels       (label, created_at, run_key): runs by label, newest first
    <p>ops          token -> result of an append, delete, items delete or create-only items
                    write whose reply may have been lost (5 minutes)

Locks. Every function that changes a run's checkpoints takes the run row first (the append's
compare-and-set ``UPDATE``, or the row lock of a delete or purge), then its checkpoints, then
items: one order everywhere, so concurrent writers never deadlock. Sequencing needs no locking
read: the ``UPDATE`` that moves ``latest_sequence`` from ``s - 1`` to ``s`` is the
compare-and-set, and the primary key ``(run_key, sequence)`` keeps every write create-only.

Damage. Only something outside the store makes a run row disagree with its checkpoints (a row
put back from an older copy, edited by hand, a run id that is not UTF-8). ``<p>damage`` judges
a row against the newest checkpoint in place (one primary-key probe); every function that uses
a row asks it, in the same snapshot as the row (after taking the row's lock, for writers):
reads report the status ``NULL`` (the store says ``active``), writes raise FC003, listings and
counts leave the run out, cleanup never takes the row for the run's expiry.
``<p>damaged_runs`` also compares counts and expiry with the whole log, and
``<p>rebuild_run`` derives a new row from the log.

Strings a user chooses (run ids, item keys, labels) are stored as UTF-8 ``bytea``: any Python
string the library accepts (NUL included) round-trips, and ``bytea`` order is UTF-8 byte order,
which is code point order. So the items nested under a shared item ``K`` (keys starting with
``K/``) are one primary-key range, ``K/`` up to ``K0``: ``read_with_items`` scans it for each
ref, and every removal of ``K``'s item deletes it (migration 3).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["MIGRATIONS", "Migration", "Names", "Statements"]

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*")

UTF8_HEX = (
    "^([0-7][0-9a-f]|c[2-9a-f][89ab][0-9a-f]|d[0-9a-f][89ab][0-9a-f]"
    "|e0[ab][0-9a-f][89ab][0-9a-f]|e[1-9a-cef][89ab][0-9a-f][89ab][0-9a-f]"
    "|ed[89][0-9a-f][89ab][0-9a-f]|f0[9ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]"
    "|f[1-3][89ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f48[0-9a-f][89ab][0-9a-f][89ab][0-9a-f])*$"
)
"""Well-formed UTF-8 (no overlong forms, no surrogates: what Python decodes), as a regular
expression over ``encode(value, 'hex')``; ``convert_from`` would also refuse NUL, which run
ids may hold."""


@dataclass(frozen=True)
class Names:
    """Qualified, quoted names of every object of one store (``schema``, ``prefix``)."""

    schema: str
    prefix: str

    def __post_init__(self) -> None:
        for what, value in (("schema", self.schema), ("table_prefix", self.prefix)):
            if value and not _IDENTIFIER.fullmatch(value):
                raise ValueError(f"{what} must be lowercase letters, digits and _, got {value!r}")

    def plain(self, name: str) -> str:
        """The unqualified object name, e.g. ``fc_runs``."""
        return f"{self.prefix}{name}"

    def __getitem__(self, name: str) -> str:
        """``"schema"."<prefix><name>"``."""
        return f'"{self.schema}"."{self.prefix}{name}"'

    @property
    def quoted_schema(self) -> str:
        return f'"{self.schema}"'

    def render(self, text: str) -> str:
        """``text`` with ``{runs}``-style placeholders replaced by qualified names and
        ``{p}`` by the bare prefix (for index names)."""
        names = {name: self[name] for name in _OBJECTS}
        return text.format(p=self.prefix, schema=self.quoted_schema, **names)


_OBJECTS = (
    "migrations", "runs", "checkpoints", "items", "refs", "labels", "ops",
    "append", "remove", "delete", "delete_run", "update_run", "put_items", "put_owned_items",
    "purge", "get", "latest", "read_with_items", "headers", "get_run", "list_runs",
    "count_runs", "runs_with_label", "get_items", "scan_items", "delete_items", "damage",
    "damaged_runs", "rebuild_run",
)

TABLES = ("runs", "checkpoints", "items", "refs", "labels", "ops")
"""Tables the store reads and writes (the migrations table is provision()'s)."""

PRIVILEGES = {
    "migrations": "SELECT",
    "runs": "SELECT, INSERT, UPDATE, DELETE",
    # A row lock (FOR KEY SHARE, by put_owned_items) needs UPDATE on one column; the store
    # never updates a checkpoint.
    "checkpoints": "SELECT, INSERT, DELETE, UPDATE (token)",
    "items": "SELECT, INSERT, UPDATE, DELETE",
    "refs": "SELECT, INSERT, UPDATE, DELETE",
    "labels": "SELECT, INSERT, DELETE",
    "ops": "SELECT, INSERT, DELETE",
}
"""What the store's role needs on each table (its functions run with the caller's rights)."""

FUNCTIONS = {
    "append": "text, bigint, text, double precision, double precision, bytea, bytea, bytea[], "
              "text, bytea, text, text, double precision, bigint, bytea, bytea[], bigint, "
              "double precision, bytea[], bytea[], bigint[], double precision[]",
    "damage": "text, bytea, text, bigint, bigint, double precision",
    "remove": "text, bigint[], boolean",
    "delete": "text, bigint, text, text",
    "delete_run": "text, text",
    "update_run": "text, text, bigint, text, bytea, double precision, text, bigint",
    "put_items": "text, bytea[], bytea[], bigint[], double precision[], boolean, double precision, "
                 "text",
    "put_owned_items": "text, bigint, text, bytea[], bytea[], boolean, double precision, text",
    "purge": "double precision, integer",
    "get": "text, bigint, double precision",
    "latest": "text, double precision",
    "read_with_items": "text, bigint, double precision, boolean",
    "headers": "text, bigint, integer, double precision, boolean",
    "get_run": "text, double precision",
    "list_runs": "text, integer, double precision, text, double precision",
    "count_runs": "text, double precision",
    "runs_with_label": "bytea, integer, double precision, text, double precision",
    "get_items": "text, bytea[], double precision",
    "scan_items": "text, bytea, bytea, integer, boolean, double precision",
    "delete_items": "text, bytea[], text",
    "damaged_runs": "text, text, integer",
    "rebuild_run": "text, bytea, text, bytea, bytea[], double precision",
}
"""The store's server-side functions and their argument types (for grants and checks)."""


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    sql: str
    """Statements separated by blank-line-free ``;\\n\\n`` boundaries, rendered by Names."""


_TABLES_V1 = r"""
CREATE TABLE {runs} (
    run_key text COLLATE "C" PRIMARY KEY,
    run_id bytea NOT NULL,
    incarnation text NOT NULL CHECK (incarnation ~ '^[a-z2-7]+$'),
    status text NOT NULL,
    created_at double precision NOT NULL,
    updated_at double precision NOT NULL,
    latest_sequence bigint NOT NULL CHECK (latest_sequence >= 0),
    checkpoint_count bigint NOT NULL CHECK (checkpoint_count >= 0),
    forever_count bigint NOT NULL CHECK (forever_count BETWEEN 0 AND checkpoint_count),
    expires_at double precision,
    purge_at double precision,
    version bigint NOT NULL CHECK (version >= 0),
    data bytea NOT NULL,
    labels bytea[] NOT NULL,
    update_token text
) WITH (fillfactor = 70);

COMMENT ON TABLE {runs} IS 'fastcheckpoint runs. expires_at: latest expiry of the checkpoints '
    'held (NULL: one never expires; 0: none held). purge_at: set when none is held.';

CREATE INDEX {p}runs_created ON {runs} (created_at, run_key);

CREATE INDEX {p}runs_status ON {runs} (status, created_at, run_key);

CREATE INDEX {p}runs_purge ON {runs} (purge_at) WHERE purge_at IS NOT NULL;

CREATE TABLE {checkpoints} (
    run_key text COLLATE "C" NOT NULL REFERENCES {runs} (run_key) ON DELETE CASCADE,
    sequence bigint NOT NULL CHECK (sequence >= 0),
    checkpoint_id text NOT NULL,
    created_at double precision NOT NULL,
    expires_at double precision,
    header bytea NOT NULL,
    payload bytea NOT NULL,
    refs bytea[],
    token text,
    PRIMARY KEY (run_key, sequence)
);

CREATE INDEX {p}checkpoints_run_expiry ON {checkpoints} (run_key, expires_at)
    WHERE expires_at IS NOT NULL;

CREATE INDEX {p}checkpoints_expiry ON {checkpoints} (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE {items} (
    run_key text COLLATE "C" NOT NULL,
    key bytea NOT NULL,
    value bytea NOT NULL,
    owner bigint,
    expires_at double precision,
    PRIMARY KEY (run_key, key)
);

CREATE INDEX {p}items_owner ON {items} (run_key, owner) WHERE owner IS NOT NULL;

CREATE INDEX {p}items_expiry ON {items} (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE {refs} (
    run_key text COLLATE "C" NOT NULL,
    key bytea NOT NULL,
    holders bigint NOT NULL,
    PRIMARY KEY (run_key, key)
);

CREATE TABLE {labels} (
    label bytea NOT NULL,
    created_at double precision NOT NULL,
    run_key text COLLATE "C" NOT NULL REFERENCES {runs} (run_key) ON DELETE CASCADE,
    PRIMARY KEY (label, created_at, run_key)
);

CREATE INDEX {p}labels_run ON {labels} (run_key);

CREATE TABLE {ops} (
    token text PRIMARY KEY,
    result bigint NOT NULL,
    expires_at double precision NOT NULL
);

CREATE INDEX {p}ops_expiry ON {ops} (expires_at);

-- lz4 where the server has it (PostgreSQL 14+ built with lz4): several times faster than the
-- default pglz for the payloads of agent states.
DO $lz4$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_settings
                WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        ALTER TABLE {checkpoints} ALTER COLUMN payload SET COMPRESSION lz4,
                                  ALTER COLUMN header SET COMPRESSION lz4;
        ALTER TABLE {items} ALTER COLUMN value SET COMPRESSION lz4;
    END IF;
END
$lz4$
"""

# Why a run row cannot be used, NULL when it can: a run id that is not UTF-8, or a row that
# the newest checkpoint in place contradicts (one primary-key probe): it knows fewer
# sequences, another incarnation, no checkpoint, or an earlier expiry. Only something outside
# the store (a row put back from an older copy, edited by hand) makes a row disagree with its
# log: every write changes both in one transaction.
_DAMAGE_V1 = r"""
CREATE FUNCTION {damage}(p_run_key text, p_run_id bytea, p_incarnation text, p_latest bigint,
                         p_held bigint, p_expires_at double precision)
RETURNS text LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
DECLARE
    v_sequence bigint;
    v_id text;
    v_expires_at double precision;
BEGIN
    IF encode(p_run_id, 'hex') !~ '<utf8>' THEN
        RETURN 'holds a run id that is not UTF-8 text';
    END IF;
    SELECT n.sequence, n.checkpoint_id, n.expires_at INTO v_sequence, v_id, v_expires_at
      FROM {checkpoints} n WHERE n.run_key = p_run_key ORDER BY n.sequence DESC LIMIT 1;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF v_sequence > p_latest THEN
        RETURN format('knows sequences up to %s, but checkpoint %s is in place (an older '
                      'copy of the row was put back)', p_latest, v_sequence);
    END IF;
    IF v_id ~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$'
       AND split_part(v_id, '-', 3) <> p_incarnation THEN
        RETURN format('is of incarnation %s, but the newest checkpoint in place is of '
                      'incarnation %s (a row of another incarnation was put back)',
                      p_incarnation, split_part(v_id, '-', 3));
    END IF;
    IF p_held = 0 THEN
        RETURN format('says the run holds no checkpoint, but checkpoint %s is in place',
                      v_sequence);
    END IF;
    IF p_expires_at IS NOT NULL AND (v_expires_at IS NULL OR v_expires_at > p_expires_at) THEN
        RETURN format('says the run expires at %s, before checkpoint %s in place does',
                      p_expires_at, v_sequence);
    END IF;
    RETURN NULL;
END
$fn$
""".replace("<utf8>", UTF8_HEX)

# Removes checkpoints of one run (whose row the caller has locked) with their owned items,
# releases the shared items they named (once per checkpoint), and, with p_count_run, brings
# the run's counters and expiry along (not for a damaged row: repair recounts it). Returns
# how many it removed.
_REMOVE_V1 = r"""
CREATE FUNCTION {remove}(p_run_key text, p_sequences bigint[], p_count_run boolean)
RETURNS bigint LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_gone bigint[];
    v_forever bigint;
    v_refs bytea[];
    v_zeroed bytea[];
BEGIN
    IF p_sequences IS NULL OR cardinality(p_sequences) = 0 THEN
        RETURN 0;
    END IF;
    WITH gone AS (
        DELETE FROM {checkpoints}
         WHERE run_key = p_run_key AND sequence = ANY (p_sequences)
        RETURNING sequence, expires_at, refs
    )
    SELECT array_agg(sequence), count(*) FILTER (WHERE expires_at IS NULL),
           (SELECT array_agg(ref ORDER BY ref)
              FROM gone g, LATERAL (SELECT DISTINCT unnest(g.refs)) named(ref))
      INTO v_gone, v_forever, v_refs
      FROM gone;
    IF v_gone IS NULL THEN
        RETURN 0;
    END IF;
    DELETE FROM {items} WHERE run_key = p_run_key AND owner = ANY (v_gone);
    IF v_refs IS NOT NULL THEN
        WITH released AS (
            SELECT ref, count(*) AS times FROM unnest(v_refs) ref GROUP BY ref
        ), counted AS (
            UPDATE {refs} r SET holders = r.holders - released.times
              FROM released
             WHERE r.run_key = p_run_key AND r.key = released.ref
            RETURNING r.key, r.holders
        )
        SELECT array_agg(key) FILTER (WHERE holders <= 0) INTO v_zeroed FROM counted;
        IF v_zeroed IS NOT NULL THEN
            DELETE FROM {refs} WHERE run_key = p_run_key AND key = ANY (v_zeroed);
            DELETE FROM {items}
             WHERE run_key = p_run_key AND key = ANY (v_zeroed) AND owner IS NULL;
        END IF;
    END IF;
    IF NOT p_count_run THEN
        RETURN cardinality(v_gone);
    END IF;
    UPDATE {runs} r
       SET checkpoint_count = r.checkpoint_count - cardinality(v_gone),
           forever_count = r.forever_count - v_forever,
           expires_at = CASE
               WHEN r.checkpoint_count = cardinality(v_gone) THEN 0
               WHEN r.forever_count > v_forever THEN NULL
               ELSE (SELECT max(c.expires_at) FROM {checkpoints} c
                      WHERE c.run_key = p_run_key AND c.expires_at IS NOT NULL)
           END,
           purge_at = CASE WHEN r.checkpoint_count = cardinality(v_gone) THEN 0 END
     WHERE r.run_key = p_run_key;
    RETURN cardinality(v_gone);
END
$fn$
"""

# append / append_with_items. Outcome 'ok' (status), 'conflict' (latest, incarnation or NULLs),
# or an exception: FC003 when the run row is damaged (see {damage}), FC001 when the log
# contradicts the row in a way the probe did not show (a checkpoint already at the sequence
# the row says is next).
_APPEND_V1 = r"""
CREATE FUNCTION {append}(
    p_run_key text, p_sequence bigint, p_checkpoint_id text, p_created_at double precision,
    p_expires_at double precision, p_header bytea, p_payload bytea, p_refs bytea[],
    p_token text, p_run_id bytea, p_incarnation text, p_status text,
    p_run_created_at double precision, p_version bigint, p_data bytea, p_labels bytea[],
    p_keep_latest bigint, p_now double precision,
    p_item_keys bytea[], p_item_values bytea[], p_item_owners bigint[],
    p_item_expiries double precision[],
    OUT outcome text, OUT status text, OUT latest_sequence bigint, OUT incarnation text)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    r {runs}%ROWTYPE;
    v_drop bigint[];
    v_live bigint;
    v_next boolean;
    v_found boolean;
    v_problem text;
BEGIN
    -- The compare-and-set: only the next sequence of the live run of this incarnation.
    UPDATE {runs} AS x
       SET latest_sequence = p_sequence,
           checkpoint_count = x.checkpoint_count + 1,
           forever_count = x.forever_count + (p_expires_at IS NULL)::int,
           updated_at = p_now,
           expires_at = CASE WHEN x.expires_at IS NULL OR p_expires_at IS NULL THEN NULL
                             ELSE greatest(x.expires_at, p_expires_at) END
     WHERE x.run_key = p_run_key AND x.incarnation = p_incarnation
       AND x.latest_sequence = p_sequence - 1
       AND (x.expires_at IS NULL OR x.expires_at > p_now)
    RETURNING x.* INTO r;
    v_next := FOUND;
    IF v_next THEN
        -- Never write after a row that the log contradicts (the exception undoes the update).
        -- The row is locked now: no other writer changes the run's log until this commits.
        v_problem := {damage}(p_run_key, r.run_id, r.incarnation, p_sequence - 1,
                              r.checkpoint_count - 1, r.expires_at);
    ELSE
        SELECT * INTO r FROM {runs} x WHERE x.run_key = p_run_key;
        v_found := FOUND;
        IF v_found THEN
            -- Judged in one statement: the row and the log of one snapshot (another writer
            -- may have committed since the row above was read).
            SELECT {damage}(x.run_key, x.run_id, x.incarnation, x.latest_sequence,
                            x.checkpoint_count, x.expires_at)
              INTO v_problem FROM {runs} x WHERE x.run_key = p_run_key;
        END IF;
        IF v_found AND (r.expires_at IS NULL OR r.expires_at > p_now
                        OR v_problem IS NOT NULL) THEN
            -- A live run: this call may be the retry of one whose reply was lost.
            PERFORM 1 FROM {checkpoints} c
             WHERE c.run_key = p_run_key AND c.sequence = p_sequence AND c.token = p_token;
            IF FOUND THEN
                outcome := 'ok'; status := r.status;
                RETURN;
            END IF;
            IF v_problem IS NULL THEN
                outcome := 'conflict'; latest_sequence := r.latest_sequence;
                incarnation := r.incarnation;
                RETURN;
            END IF;
        END IF;
    END IF;
    IF v_problem IS NOT NULL THEN
        -- A damaged row (run id not UTF-8, contradicted by the log): refused, nothing written,
        -- nothing of an expired run dropped that its row does not know.
        RAISE EXCEPTION USING ERRCODE = 'FC003', DETAIL = p_run_key,
            MESSAGE = format('the run row of run key %s %s', p_run_key,
                             v_problem);
    END IF;
    IF NOT v_next THEN
        IF p_sequence <> 0 THEN
            outcome := 'conflict';
            RETURN;
        END IF;
        IF v_found THEN
            -- Start over on an expired (or emptied) run: replace its row if nobody did.
            UPDATE {runs} AS x
               SET run_id = p_run_id, incarnation = p_incarnation, status = p_status,
                   created_at = p_run_created_at, updated_at = p_now, latest_sequence = 0,
                   checkpoint_count = 1, forever_count = (p_expires_at IS NULL)::int,
                   expires_at = p_expires_at, purge_at = NULL, version = p_version,
                   data = p_data, labels = p_labels, update_token = NULL
             WHERE x.run_key = p_run_key AND x.incarnation = r.incarnation
               AND x.version = r.version AND x.latest_sequence = r.latest_sequence
               AND x.expires_at IS NOT DISTINCT FROM r.expires_at
            RETURNING x.* INTO r;
            IF NOT FOUND THEN
                SELECT * INTO r FROM {runs} x WHERE x.run_key = p_run_key;
                outcome := 'conflict';
                IF FOUND AND (r.expires_at IS NULL OR r.expires_at > p_now) THEN
                    latest_sequence := r.latest_sequence; incarnation := r.incarnation;
                END IF;
                RETURN;
            END IF;
            -- Leftovers of the old run: checkpoints with their owned items, the shared
            -- items they named, its labels. Unowned items stay.
            WITH gone AS (
                DELETE FROM {checkpoints} c WHERE c.run_key = p_run_key RETURNING c.sequence
            )
            DELETE FROM {items} i
             WHERE i.run_key = p_run_key AND i.owner IN (SELECT sequence FROM gone);
            WITH released AS (DELETE FROM {refs} f WHERE f.run_key = p_run_key RETURNING f.key)
            DELETE FROM {items} i
             WHERE i.run_key = p_run_key AND i.owner IS NULL
               AND i.key IN (SELECT key FROM released);
            DELETE FROM {labels} l WHERE l.run_key = p_run_key;
        ELSE
            INSERT INTO {runs} AS x (run_key, run_id, incarnation, status, created_at,
                                     updated_at, latest_sequence, checkpoint_count,
                                     forever_count, expires_at, version, data, labels)
            VALUES (p_run_key, p_run_id, p_incarnation, p_status, p_run_created_at, p_now, 0,
                    1, (p_expires_at IS NULL)::int, p_expires_at, p_version, p_data, p_labels)
            ON CONFLICT (run_key) DO NOTHING
            RETURNING x.* INTO r;
            IF NOT FOUND THEN
                -- Another writer created the run first (its transaction has committed).
                SELECT * INTO r FROM {runs} x WHERE x.run_key = p_run_key;
                outcome := 'conflict';
                IF FOUND AND (r.expires_at IS NULL OR r.expires_at > p_now) THEN
                    latest_sequence := r.latest_sequence; incarnation := r.incarnation;
                END IF;
                RETURN;
            END IF;
        END IF;
        IF cardinality(p_labels) > 0 THEN
            INSERT INTO {labels} (label, created_at, run_key)
            SELECT DISTINCT label, p_run_created_at, p_run_key FROM unnest(p_labels) label;
        END IF;
    END IF;

    INSERT INTO {checkpoints} (run_key, sequence, checkpoint_id, created_at, expires_at,
                               header, payload, refs, token)
    VALUES (p_run_key, p_sequence, p_checkpoint_id, p_created_at, p_expires_at, p_header,
            p_payload, p_refs, p_token)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FC001',
            MESSAGE = format('run key %s already holds a checkpoint at sequence %s, which '
                             'its run row says is the next one', p_run_key, p_sequence);
    END IF;

    IF p_item_keys IS NOT NULL AND cardinality(p_item_keys) > 0 THEN
        -- Each item only where no live item has its key: a live one is kept as it is.
        INSERT INTO {items} AS i (run_key, key, value, owner, expires_at)
        SELECT p_run_key, k, v, o, e
          FROM unnest(p_item_keys, p_item_values, p_item_owners, p_item_expiries) AS t(k, v, o, e)
        ON CONFLICT (run_key, key) DO UPDATE
           SET value = excluded.value, owner = excluded.owner, expires_at = excluded.expires_at
         WHERE i.expires_at IS NOT NULL AND i.expires_at <= p_now;
    END IF;
    IF p_refs IS NOT NULL AND cardinality(p_refs) > 0 THEN
        INSERT INTO {refs} AS f (run_key, key, holders)
        SELECT DISTINCT p_run_key, k, 1 FROM unnest(p_refs) k
        ON CONFLICT (run_key, key) DO UPDATE SET holders = f.holders + 1;
    END IF;

    -- Pruning: expired checkpoints, then the oldest beyond keep_latest.
    v_live := r.checkpoint_count;
    IF r.checkpoint_count > r.forever_count THEN
        v_drop := ARRAY(SELECT c.sequence FROM {checkpoints} c
                         WHERE c.run_key = p_run_key AND c.expires_at <= p_now);
        v_live := v_live - cardinality(v_drop);
    END IF;
    IF p_keep_latest IS NOT NULL AND v_live > p_keep_latest THEN
        v_drop := coalesce(v_drop, '{{}}') || ARRAY(
            SELECT c.sequence FROM {checkpoints} c
             WHERE c.run_key = p_run_key
               AND (c.expires_at IS NULL OR c.expires_at > p_now)
             ORDER BY c.sequence LIMIT v_live - p_keep_latest);
    END IF;
    IF cardinality(v_drop) > 0 THEN
        PERFORM {remove}(p_run_key, v_drop, true);
    END IF;
    outcome := 'ok'; status := r.status;
END
$fn$
"""


def _patched(text: str, *edits: tuple[str, str], times: int = 1) -> str:
    """``text`` with each ``(old, new)`` edit made; each ``old`` occurs exactly ``times``
    times (once, unless the edit is meant for several copies of a part, such as both queries
    of read_with_items)."""
    for old, new in edits:
        if text.count(old) != times:
            raise ValueError(f"{old!r} occurs {text.count(old)} times, not {times}")
        text = text.replace(old, new)
    return text


# Migration 2: the append of migration 1, refusing (FC004, nothing written, a new run's row
# included) refs that name an item the run does not hold live. A writer in another process
# may have pruned the last checkpoint naming an item this writer still believes held; the
# check comes after the sequence check and the recognition of a retry (an append whose reply
# was lost is acknowledged even if its items went since), and after the leftovers of an
# expired run went. The keys, distinct and in refs order, go hex-encoded in DETAIL.
_APPEND_V2 = _patched(
    _APPEND_V1,
    ("CREATE FUNCTION {append}(", "CREATE OR REPLACE FUNCTION {append}("),
    ("    v_problem text;\nBEGIN\n", "    v_problem text;\n    v_unheld bytea[];\nBEGIN\n"),
    ("\n    INSERT INTO {checkpoints} (run_key, sequence, checkpoint_id, created_at, expires_at,\n",
     r"""
    IF cardinality(p_refs) > 0 THEN
        -- The run row is locked by now: a removal of the run's checkpoints (which releases
        -- their shared items) waits for this transaction.
        SELECT array_agg(wanted.k ORDER BY wanted.n) INTO v_unheld
          FROM (SELECT t.k, min(t.n) AS n
                  FROM unnest(p_refs) WITH ORDINALITY AS t(k, n)
                 WHERE NOT (t.k = ANY (coalesce(p_item_keys, '{{}}')))
                 GROUP BY t.k) wanted
         WHERE NOT EXISTS (SELECT 1 FROM {items} i
                            WHERE i.run_key = p_run_key AND i.key = wanted.k
                              AND (i.expires_at IS NULL OR i.expires_at > p_now));
        IF v_unheld IS NOT NULL THEN
            RAISE EXCEPTION USING ERRCODE = 'FC004',
                MESSAGE = format('run key %s: checkpoint %s names shared items the run does '
                                 'not hold', p_run_key, p_sequence),
                DETAIL = array_to_string(ARRAY(
                    SELECT encode(u.k, 'hex') FROM unnest(v_unheld) WITH ORDINALITY AS u(k, n)
                     ORDER BY u.n), ',');
        END IF;
    END IF;

    INSERT INTO {checkpoints} (run_key, sequence, checkpoint_id, created_at, expires_at,
"""),
)

# Deletes whose reply may be lost remember their result under the caller's token for five
# minutes (by the server's clock: these calls carry no manager clock).
_DELETES_V1 = r"""
CREATE FUNCTION {delete}(p_run_key text, p_sequence bigint, p_checkpoint_id text,
                         p_token text)
RETURNS bigint LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_result bigint;
    v_problem text;
    v_server_now double precision := extract(epoch FROM clock_timestamp());
BEGIN
    SELECT o.result INTO v_result FROM {ops} o WHERE o.token = p_token;
    IF FOUND THEN
        RETURN v_result;
    END IF;
    PERFORM 1 FROM {runs} r WHERE r.run_key = p_run_key FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    -- After the lock, in a statement of its own: the row and the log as the last writer left
    -- them (a locking read may return a row newer than its own snapshot).
    SELECT {damage}(p_run_key, r.run_id, r.incarnation, r.latest_sequence,
                    r.checkpoint_count, r.expires_at)
      INTO v_problem FROM {runs} r WHERE r.run_key = p_run_key;
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'FC003', DETAIL = p_run_key,
            MESSAGE = format('the run row of run key %s %s', p_run_key,
                             v_problem);
    END IF;
    PERFORM 1 FROM {checkpoints} c
     WHERE c.run_key = p_run_key AND c.sequence = p_sequence
       AND c.checkpoint_id = p_checkpoint_id;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    v_result := {remove}(p_run_key, ARRAY[p_sequence], true);
    INSERT INTO {ops} (token, result, expires_at) VALUES (p_token, v_result, v_server_now + 300);
    RETURN v_result;
END
$fn$;

CREATE FUNCTION {delete_run}(p_run_key text, p_token text)
RETURNS bigint LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_result bigint;
BEGIN
    SELECT o.result INTO v_result FROM {ops} o WHERE o.token = p_token;
    IF FOUND THEN
        RETURN v_result;
    END IF;
    -- The row first (its checkpoints and labels follow by cascade), then the run's items.
    DELETE FROM {runs} r WHERE r.run_key = p_run_key RETURNING r.checkpoint_count INTO v_result;
    DELETE FROM {refs} f WHERE f.run_key = p_run_key;
    DELETE FROM {items} i WHERE i.run_key = p_run_key;
    IF v_result IS NULL THEN
        RETURN 0;
    END IF;
    INSERT INTO {ops} (token, result, expires_at)
    VALUES (p_token, v_result, extract(epoch FROM clock_timestamp()) + 300);
    RETURN v_result;
END
$fn$
"""

# Compare-and-set of status and data. Outcome 'ok' with the row, 'missing' (no live run) or
# 'conflict' with the row; a retry of an update whose reply was lost finds its token.
_UPDATE_RUN_V1 = r"""
CREATE FUNCTION {update_run}(p_run_key text, p_incarnation text, p_version bigint,
                             p_status text, p_data bytea, p_now double precision,
                             p_token text)
RETURNS TABLE (outcome text, run {runs}) LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    r {runs}%ROWTYPE;
    v_updated boolean;
    v_problem text;
BEGIN
    UPDATE {runs} AS x
       SET status = p_status, data = p_data, version = x.version + 1, updated_at = p_now,
           update_token = p_token
     WHERE x.run_key = p_run_key AND x.incarnation = p_incarnation AND x.version = p_version
       AND (x.expires_at IS NULL OR x.expires_at > p_now)
    RETURNING x.* INTO r;
    v_updated := FOUND;
    -- The row and the log judged in one statement (one snapshot).
    SELECT {damage}(x.run_key, x.run_id, x.incarnation, x.latest_sequence,
                    x.checkpoint_count, x.expires_at)
      INTO v_problem FROM {runs} x WHERE x.run_key = p_run_key;
    IF v_problem IS NOT NULL THEN
        -- Undoes the update: a damaged row takes no status change until repaired.
        RAISE EXCEPTION USING ERRCODE = 'FC003', DETAIL = p_run_key,
            MESSAGE = format('the run row of run key %s %s', p_run_key,
                             v_problem);
    END IF;
    IF NOT v_updated THEN
        SELECT * INTO r FROM {runs} x WHERE x.run_key = p_run_key;
    END IF;
    IF v_updated THEN
        RETURN QUERY SELECT 'ok'::text, r;
        RETURN;
    END IF;
    IF r.run_key IS NULL OR NOT (r.expires_at IS NULL OR r.expires_at > p_now) THEN
        RETURN QUERY SELECT 'missing'::text, NULL::{runs};
    ELSIF r.incarnation = p_incarnation AND r.version = p_version + 1
          AND r.update_token = p_token THEN
        RETURN QUERY SELECT 'ok'::text, r;
    ELSE
        RETURN QUERY SELECT 'conflict'::text, r;
    END IF;
END
$fn$
"""

# Items. put_items with create_only raises FC002 naming a live key (nothing is written);
# put_owned_items writes only while its checkpoint is live and has the given id.
_ITEMS_V1 = r"""
CREATE FUNCTION {put_items}(p_run_key text, p_keys bytea[], p_values bytea[],
                            p_owners bigint[], p_expiries double precision[],
                            p_create_only boolean, p_now double precision, p_token text)
RETURNS void LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_taken bytea;
    v_written bigint;
BEGIN
    IF p_create_only THEN
        -- The retry of a create-only write whose reply was lost: it wrote, once.
        PERFORM 1 FROM {ops} o WHERE o.token = p_token;
        IF FOUND THEN
            RETURN;
        END IF;
    END IF;
    INSERT INTO {items} AS i (run_key, key, value, owner, expires_at)
    SELECT p_run_key, k, v, o, e
      FROM unnest(p_keys, p_values, p_owners, p_expiries) AS t(k, v, o, e)
    ON CONFLICT (run_key, key) DO UPDATE
       SET value = excluded.value, owner = excluded.owner, expires_at = excluded.expires_at
     WHERE NOT p_create_only OR (i.expires_at IS NOT NULL AND i.expires_at <= p_now);
    GET DIAGNOSTICS v_written = ROW_COUNT;
    IF v_written < cardinality(p_keys) THEN
        -- create_only met a live item: the exception undoes the whole batch.
        SELECT i.key INTO v_taken FROM {items} i
         WHERE i.run_key = p_run_key AND i.key = ANY (p_keys)
           AND (i.expires_at IS NULL OR i.expires_at > p_now)
         ORDER BY i.key LIMIT 1;
        RAISE EXCEPTION USING ERRCODE = 'FC002', MESSAGE = coalesce(encode(v_taken, 'hex'), '');
    END IF;
    IF p_create_only THEN
        INSERT INTO {ops} (token, result, expires_at)
        VALUES (p_token, v_written, extract(epoch FROM clock_timestamp()) + 300);
    END IF;
END
$fn$;

CREATE FUNCTION {put_owned_items}(p_run_key text, p_owner bigint, p_checkpoint_id text,
                                  p_keys bytea[], p_values bytea[], p_if_absent boolean,
                                  p_now double precision)
RETURNS boolean LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_expires_at double precision;
BEGIN
    -- Key share on the checkpoint: a concurrent removal waits for this write, and a
    -- removal that came first leaves nothing to find.
    SELECT c.expires_at INTO v_expires_at FROM {checkpoints} c
     WHERE c.run_key = p_run_key AND c.sequence = p_owner
       AND c.checkpoint_id = p_checkpoint_id
       AND (c.expires_at IS NULL OR c.expires_at > p_now)
       FOR KEY SHARE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO {items} AS i (run_key, key, value, owner, expires_at)
    SELECT p_run_key, k, v, p_owner, v_expires_at FROM unnest(p_keys, p_values) AS t(k, v)
    ON CONFLICT (run_key, key) DO UPDATE
       SET value = excluded.value, owner = excluded.owner, expires_at = excluded.expires_at
     WHERE NOT p_if_absent OR (i.expires_at IS NOT NULL AND i.expires_at <= p_now);
    RETURN true;
END
$fn$
"""

# Purging, in bounded batches: emptied runs, expired checkpoints run by run (whole runs whose
# record expired), expired items nothing names, old delete memos. Returns the checkpoints
# removed and whether nothing expired is left.
_PURGE_V1 = r"""
CREATE FUNCTION {purge}(p_now double precision, p_limit integer,
                        OUT removed bigint, OUT done boolean)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_budget integer := greatest(p_limit, 1);
    v_server_now double precision := extract(epoch FROM clock_timestamp());
    v_key text;
    v_count bigint;
    r {runs}%ROWTYPE;
BEGIN
    removed := 0;
    FOR v_key IN
        SELECT x.run_key FROM {runs} x WHERE x.purge_at IS NOT NULL AND x.purge_at <= p_now
         ORDER BY x.purge_at LIMIT v_budget
    LOOP
        DELETE FROM {runs} x WHERE x.run_key = v_key AND x.checkpoint_count = 0
           AND NOT EXISTS (SELECT 1 FROM {checkpoints} c WHERE c.run_key = v_key);
        IF FOUND THEN
            DELETE FROM {refs} f WHERE f.run_key = v_key;
            DELETE FROM {items} i WHERE i.run_key = v_key;
        ELSE
            -- A row that says its run is empty over checkpoints in place (put back from an
            -- older copy): never taken for empty, left for repair, out of this loop.
            UPDATE {runs} x SET purge_at = NULL WHERE x.run_key = v_key AND x.purge_at <= p_now;
        END IF;
        v_budget := v_budget - 1;
    END LOOP;
    FOR v_key IN
        SELECT DISTINCT due.run_key FROM (
            SELECT c.run_key FROM {checkpoints} c
             WHERE c.expires_at IS NOT NULL AND c.expires_at <= p_now
             ORDER BY c.expires_at LIMIT greatest(v_budget, 0)) due
    LOOP
        EXIT WHEN v_budget <= 0;
        SELECT * INTO r FROM {runs} x WHERE x.run_key = v_key FOR NO KEY UPDATE;
        CONTINUE WHEN NOT FOUND;
        IF {damage}(v_key, r.run_id, r.incarnation, r.latest_sequence, r.checkpoint_count,
                    r.expires_at) IS NOT NULL THEN
            -- A damaged row: its expired checkpoints go by their own expiry, the row stays
            -- as it is (never taken for the run's expiry) until a repair rebuilds it.
            v_count := {remove}(v_key, ARRAY(
                SELECT c.sequence FROM {checkpoints} c
                 WHERE c.run_key = v_key AND c.expires_at <= p_now
                 ORDER BY c.expires_at LIMIT v_budget), false);
        ELSIF r.expires_at IS NOT NULL AND r.expires_at <= p_now THEN
            -- The whole run expired: everything of it goes.
            WITH gone AS (DELETE FROM {checkpoints} c WHERE c.run_key = v_key RETURNING 1)
            SELECT count(*) INTO v_count FROM gone;
            DELETE FROM {runs} x WHERE x.run_key = v_key;
            DELETE FROM {refs} f WHERE f.run_key = v_key;
            DELETE FROM {items} i WHERE i.run_key = v_key;
        ELSE
            v_count := {remove}(v_key, ARRAY(
                SELECT c.sequence FROM {checkpoints} c
                 WHERE c.run_key = v_key AND c.expires_at <= p_now
                 ORDER BY c.expires_at LIMIT v_budget), true);
        END IF;
        removed := removed + v_count;
        v_budget := v_budget - greatest(v_count, 1)::integer;
    END LOOP;
    IF v_budget > 0 THEN
        WITH gone AS (
            DELETE FROM {items} i
             WHERE (i.run_key, i.key) IN (
                 SELECT e.run_key, e.key FROM {items} e
                  WHERE e.expires_at IS NOT NULL AND e.expires_at <= p_now
                    AND NOT EXISTS (SELECT 1 FROM {refs} f
                                     WHERE f.run_key = e.run_key AND f.key = e.key)
                  LIMIT v_budget)
            RETURNING 1)
        SELECT v_budget - count(*) INTO v_budget FROM gone;
    END IF;
    -- The server's clock in a variable: compared with a volatile call, the index is unused.
    DELETE FROM {ops} o WHERE o.token IN (
        SELECT token FROM {ops} WHERE expires_at <= v_server_now LIMIT 1000);
    done := NOT EXISTS (SELECT 1 FROM {runs} x
                         WHERE x.purge_at IS NOT NULL AND x.purge_at <= p_now)
        AND NOT EXISTS (SELECT 1 FROM {checkpoints} c
                         WHERE c.expires_at IS NOT NULL AND c.expires_at <= p_now)
        AND NOT EXISTS (SELECT 1 FROM {items} e
                         WHERE e.expires_at IS NOT NULL AND e.expires_at <= p_now
                           AND NOT EXISTS (SELECT 1 FROM {refs} f
                                            WHERE f.run_key = e.run_key AND f.key = e.key));
END
$fn$
"""

# Reads. plpgsql caches each statement's plan in the server process that runs it, so a call
# costs no planning even when the client sends unnamed statements (PgBouncer). A checkpoint
# is read by its own expiry; the status is NULL when the run row is damaged (the store then
# reports 'active'), so a damaged row never hides or fails an intact checkpoint.
# What {damage} checks, inlined where many rows or hot reads need it (a plan cached with the
# query's, no function call): the newest checkpoint of run row x (one primary-key probe), and
# x's status when the row is intact, NULL when it is damaged.
_HEAD = """
        LEFT JOIN LATERAL (SELECT h.sequence, h.checkpoint_id, h.expires_at
                             FROM {checkpoints} h WHERE h.run_key = x.run_key
                            ORDER BY h.sequence DESC LIMIT 1) h ON true"""
_INTACT_STATUS = """CASE WHEN encode(x.run_id, 'hex') ~ '<utf8>'
           AND (h.sequence IS NULL
                OR (h.sequence <= x.latest_sequence AND x.checkpoint_count > 0
                    AND (h.checkpoint_id !~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$'
                         OR split_part(h.checkpoint_id, '-', 3) = x.incarnation)
                    AND (x.expires_at IS NULL
                         OR (h.expires_at IS NOT NULL AND h.expires_at <= x.expires_at))))
          THEN x.status END""".replace("<utf8>", UTF8_HEX)

_READS_V1 = r"""
CREATE FUNCTION {get}(p_run_key text, p_sequence bigint, p_now double precision)
RETURNS TABLE (sequence bigint, checkpoint_id text, created_at double precision,
               expires_at double precision, header bytea, payload bytea, refs bytea[],
               status text)
LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT c.sequence, c.checkpoint_id, c.created_at, c.expires_at, c.header, c.payload,
           c.refs, <status>
      FROM {checkpoints} c JOIN {runs} x ON x.run_key = c.run_key<head>
     WHERE c.run_key = p_run_key AND c.sequence = p_sequence
       AND (c.expires_at IS NULL OR c.expires_at > p_now);
END
$fn$;

CREATE FUNCTION {latest}(p_run_key text, p_now double precision)
RETURNS TABLE (sequence bigint, checkpoint_id text, created_at double precision,
               expires_at double precision, header bytea, payload bytea, refs bytea[],
               status text)
LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT c.sequence, c.checkpoint_id, c.created_at, c.expires_at, c.header, c.payload,
           c.refs, <status>
      FROM (SELECT * FROM {checkpoints} n
             WHERE n.run_key = p_run_key AND (n.expires_at IS NULL OR n.expires_at > p_now)
             ORDER BY n.sequence DESC LIMIT 1) c
      JOIN {runs} x ON x.run_key = c.run_key<head>;
END
$fn$;

-- A checkpoint with the live items it owns and the items its refs name, in one read.
CREATE FUNCTION {read_with_items}(p_run_key text, p_sequence bigint, p_now double precision)
RETURNS TABLE (sequence bigint, checkpoint_id text, created_at double precision,
               expires_at double precision, header bytea, payload bytea, refs bytea[],
               status text, item_keys bytea[], item_values bytea[])
LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
BEGIN
    IF p_sequence IS NULL THEN
        RETURN QUERY
        SELECT c.sequence, c.checkpoint_id, c.created_at, c.expires_at, c.header, c.payload,
               c.refs, <status>, w.keys, w.vals
          FROM (SELECT * FROM {checkpoints} n
                 WHERE n.run_key = p_run_key AND (n.expires_at IS NULL OR n.expires_at > p_now)
                 ORDER BY n.sequence DESC LIMIT 1) c
          JOIN {runs} x ON x.run_key = c.run_key<head>
         CROSS JOIN LATERAL (
               SELECT array_agg(i.key), array_agg(i.value) FROM {items} i
                WHERE i.run_key = p_run_key AND (i.expires_at IS NULL OR i.expires_at > p_now)
                  AND (i.owner = c.sequence OR i.key = ANY (c.refs))) w(keys, vals);
    ELSE
        RETURN QUERY
        SELECT c.sequence, c.checkpoint_id, c.created_at, c.expires_at, c.header, c.payload,
               c.refs, <status>, w.keys, w.vals
          FROM {checkpoints} c JOIN {runs} x ON x.run_key = c.run_key<head>
         CROSS JOIN LATERAL (
               SELECT array_agg(i.key), array_agg(i.value) FROM {items} i
                WHERE i.run_key = p_run_key AND (i.expires_at IS NULL OR i.expires_at > p_now)
                  AND (i.owner = c.sequence OR i.key = ANY (c.refs))) w(keys, vals)
         WHERE c.run_key = p_run_key AND c.sequence = p_sequence
           AND (c.expires_at IS NULL OR c.expires_at > p_now);
    END IF;
END
$fn$;

-- Up to p_limit headers newest first below p_before, with the run's status (NULL when its row
-- is damaged): one row with NULL checkpoint columns when the run holds none to list, no row
-- when there is no run (or, unless p_all, only an intact row that says the run expired).
CREATE FUNCTION {headers}(p_run_key text, p_before bigint, p_limit integer,
                          p_now double precision, p_all boolean)
RETURNS TABLE (status text, sequence bigint, checkpoint_id text, created_at double precision,
               expires_at double precision, header bytea)
LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
DECLARE
    v_status text;
    v_expires_at double precision;
    v_problem text;
BEGIN
    SELECT x.status, x.expires_at,
           {damage}(x.run_key, x.run_id, x.incarnation, x.latest_sequence, x.checkpoint_count,
                    x.expires_at)
      INTO v_status, v_expires_at, v_problem FROM {runs} x WHERE x.run_key = p_run_key;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF v_problem IS NOT NULL THEN
        v_status := NULL;
    ELSIF NOT p_all AND v_expires_at IS NOT NULL AND v_expires_at <= p_now THEN
        RETURN;
    END IF;
    RETURN QUERY
    SELECT v_status, c.sequence, c.checkpoint_id, c.created_at, c.expires_at, c.header
      FROM (SELECT 1) one
      LEFT JOIN LATERAL (
           SELECT n.sequence, n.checkpoint_id, n.created_at, n.expires_at, n.header
             FROM {checkpoints} n
            WHERE n.run_key = p_run_key AND n.sequence < p_before
              AND (p_all OR n.expires_at IS NULL OR n.expires_at > p_now)
            ORDER BY n.sequence DESC LIMIT p_limit) c ON true
     ORDER BY c.sequence DESC;
END
$fn$;

CREATE FUNCTION {get_run}(p_run_key text, p_now double precision)
RETURNS SETOF {runs} LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY SELECT * FROM {runs} x
     WHERE x.run_key = p_run_key AND (x.expires_at IS NULL OR x.expires_at > p_now);
END
$fn$;

-- Live runs newest created first, after the cursor (created_at, run_key); by status when
-- p_status is not NULL.
CREATE FUNCTION {list_runs}(p_status text, p_limit integer, p_created_at double precision,
                            p_run_key text, p_now double precision)
RETURNS SETOF {runs} LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
BEGIN
    IF p_status IS NULL THEN
        RETURN QUERY SELECT * FROM {runs} x
         WHERE (x.expires_at IS NULL OR x.expires_at > p_now)
           AND (x.created_at, x.run_key) < (p_created_at, p_run_key)
         ORDER BY x.created_at DESC, x.run_key DESC LIMIT p_limit;
    ELSE
        RETURN QUERY SELECT * FROM {runs} x
         WHERE x.status = p_status AND (x.expires_at IS NULL OR x.expires_at > p_now)
           AND (x.created_at, x.run_key) < (p_created_at, p_run_key)
         ORDER BY x.created_at DESC, x.run_key DESC LIMIT p_limit;
    END IF;
END
$fn$;

-- Live runs, damaged rows left out (one primary-key probe of the log per row).
CREATE FUNCTION {count_runs}(p_status text, p_now double precision)
RETURNS bigint LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
BEGIN
    IF p_status IS NULL THEN
        RETURN (SELECT count(*) FROM {runs} x<head>
                 WHERE (x.expires_at IS NULL OR x.expires_at > p_now)
                   AND <status> IS NOT NULL);
    END IF;
    RETURN (SELECT count(*) FROM {runs} x<head>
             WHERE x.status = p_status AND (x.expires_at IS NULL OR x.expires_at > p_now)
               AND <status> IS NOT NULL);
END
$fn$;

CREATE FUNCTION {runs_with_label}(p_label bytea, p_limit integer,
                                  p_created_at double precision, p_run_key text,
                                  p_now double precision)
RETURNS SETOF {runs} LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY SELECT x.* FROM {labels} l JOIN {runs} x ON x.run_key = l.run_key
     WHERE l.label = p_label AND (x.expires_at IS NULL OR x.expires_at > p_now)
       AND (l.created_at, l.run_key) < (p_created_at, p_run_key)
     ORDER BY l.created_at DESC, l.run_key DESC LIMIT p_limit;
END
$fn$;

CREATE FUNCTION {get_items}(p_run_key text, p_keys bytea[], p_now double precision)
RETURNS TABLE (key bytea, value bytea) LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY SELECT i.key, i.value FROM {items} i
     WHERE i.run_key = p_run_key AND i.key = ANY (p_keys)
       AND (i.expires_at IS NULL OR i.expires_at > p_now);
END
$fn$;

-- Live items with p_low <= key < p_high, in key order (descending when p_reverse).
CREATE FUNCTION {scan_items}(p_run_key text, p_low bytea, p_high bytea, p_limit integer,
                             p_reverse boolean, p_now double precision)
RETURNS TABLE (key bytea, value bytea) LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
BEGIN
    IF p_reverse THEN
        RETURN QUERY SELECT i.key, i.value FROM {items} i
         WHERE i.run_key = p_run_key AND i.key >= p_low AND i.key < p_high
           AND (i.expires_at IS NULL OR i.expires_at > p_now)
         ORDER BY i.key DESC LIMIT p_limit;
    ELSE
        RETURN QUERY SELECT i.key, i.value FROM {items} i
         WHERE i.run_key = p_run_key AND i.key >= p_low AND i.key < p_high
           AND (i.expires_at IS NULL OR i.expires_at > p_now)
         ORDER BY i.key LIMIT p_limit;
    END IF;
END
$fn$;

CREATE FUNCTION {delete_items}(p_run_key text, p_keys bytea[], p_token text)
RETURNS bigint LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_count bigint;
BEGIN
    SELECT o.result INTO v_count FROM {ops} o WHERE o.token = p_token;
    IF FOUND THEN
        RETURN v_count;
    END IF;
    DELETE FROM {items} i WHERE i.run_key = p_run_key AND i.key = ANY (p_keys);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    IF v_count > 0 THEN
        INSERT INTO {ops} (token, result, expires_at)
        VALUES (p_token, v_count, extract(epoch FROM clock_timestamp()) + 300);
    END IF;
    RETURN v_count;
END
$fn$
""".replace("<head>", _HEAD).replace("<status>", _INTACT_STATUS)

# Repair. damaged_runs judges run rows in run_key order after p_after (all of them, or the
# one p_run_key names), up to p_limit: besides {damage}, the row's counters and expiry
# against its whole log and its labels' UTF-8. A row comes back for every run judged (the
# caller pages on run_key), its problem NULL when it is intact; the newest checkpoint comes
# with a damaged one.
_REPAIR_V1 = r"""
CREATE FUNCTION {damaged_runs}(p_run_key text, p_after text, p_limit integer)
RETURNS TABLE (run_key text, problem text, checkpoints bigint, sequence bigint,
               checkpoint_id text, created_at double precision, expires_at double precision,
               header bytea)
LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH judged AS (
        SELECT x.run_key, coalesce(
                   {damage}(x.run_key, x.run_id, x.incarnation, x.latest_sequence,
                            x.checkpoint_count, x.expires_at),
                   CASE
                   WHEN EXISTS (SELECT 1 FROM unnest(x.labels) label
                                 WHERE encode(label, 'hex') !~ '<utf8>')
                       THEN 'holds a label that is not UTF-8 text'
                   WHEN l.held <> x.checkpoint_count THEN format(
                       'counts %s checkpoints, but %s are in place', x.checkpoint_count,
                       l.held)
                   WHEN l.held > 0 AND l.forever <> x.forever_count THEN format(
                       'counts %s checkpoints that never expire, but %s are in place',
                       x.forever_count, l.forever)
                   WHEN l.held > 0 AND x.expires_at IS DISTINCT FROM
                        (CASE WHEN l.forever > 0 THEN NULL ELSE l.latest END) THEN format(
                       'says the run expires at %s, its checkpoints at %s',
                       coalesce(x.expires_at::text, 'never'),
                       CASE WHEN l.forever > 0 THEN 'never' ELSE l.latest::text END)
                   END) AS problem, l.held
          FROM {runs} x
         CROSS JOIN LATERAL (
               SELECT count(*) AS held, count(*) FILTER (WHERE c.expires_at IS NULL) AS forever,
                      max(c.expires_at) AS latest
                 FROM {checkpoints} c WHERE c.run_key = x.run_key) l
         WHERE x.run_key > p_after AND (p_run_key IS NULL OR x.run_key = p_run_key)
         ORDER BY x.run_key LIMIT p_limit
    )
    SELECT j.run_key, j.problem, j.held, n.sequence, n.checkpoint_id, n.created_at,
           n.expires_at, n.header
      FROM judged j
      LEFT JOIN LATERAL (
           SELECT c.sequence, c.checkpoint_id, c.created_at, c.expires_at, c.header
             FROM {checkpoints} c
            WHERE c.run_key = j.run_key AND j.problem IS NOT NULL
            ORDER BY c.sequence DESC LIMIT 1) n ON true
     ORDER BY j.run_key;
END
$fn$;

-- Replaces a damaged run row by one derived from the log: incarnation (from the newest
-- checkpoint's id), latest sequence, counts and expiry, created_at of the oldest checkpoint,
-- labels (p_labels, else the run's label rows), shared-item reference counts recounted;
-- run id, status and data from the caller, version 0. Outcome 'ok' with the new row,
-- 'missing' (no row, so no checkpoint), 'intact' with the row, 'empty' (no checkpoint to
-- rebuild from), 'foreign' (the newest checkpoint's id is not one of ours).
CREATE FUNCTION {rebuild_run}(p_run_key text, p_run_id bytea, p_status text, p_data bytea,
                              p_labels bytea[], p_now double precision)
RETURNS TABLE (outcome text, run {runs}) LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    r {runs}%ROWTYPE;
    v_problem text;
    v_held bigint;
    v_forever bigint;
    v_latest double precision;
    v_sequence bigint;
    v_id text;
    v_created double precision;
    v_labels bytea[];
BEGIN
    SELECT * INTO r FROM {runs} x WHERE x.run_key = p_run_key FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'missing'::text, NULL::{runs};
        RETURN;
    END IF;
    SELECT d.problem INTO v_problem FROM {damaged_runs}(p_run_key, '', 1) d;
    IF v_problem IS NULL THEN
        RETURN QUERY SELECT 'intact'::text, r;
        RETURN;
    END IF;
    SELECT count(*), count(*) FILTER (WHERE c.expires_at IS NULL), max(c.expires_at)
      INTO v_held, v_forever, v_latest
      FROM {checkpoints} c WHERE c.run_key = p_run_key;
    IF v_held = 0 THEN
        RETURN QUERY SELECT 'empty'::text, NULL::{runs};
        RETURN;
    END IF;
    SELECT c.sequence, c.checkpoint_id INTO v_sequence, v_id
      FROM {checkpoints} c WHERE c.run_key = p_run_key ORDER BY c.sequence DESC LIMIT 1;
    IF v_id !~ ('^ck-' || p_run_key || '-[a-z2-7]+-[0-9]+$') THEN
        RETURN QUERY SELECT 'foreign'::text, NULL::{runs};
        RETURN;
    END IF;
    SELECT c.created_at INTO v_created
      FROM {checkpoints} c WHERE c.run_key = p_run_key ORDER BY c.sequence LIMIT 1;
    IF cardinality(p_labels) > 0 THEN
        v_labels := p_labels;
    ELSE
        -- The label rows are written with the run's creation and follow its incarnation;
        -- the row's own list (in the order given) when it names the same labels.
        v_labels := ARRAY(SELECT DISTINCT l.label FROM {labels} l
                           WHERE l.run_key = p_run_key ORDER BY l.label);
        IF (SELECT array_agg(DISTINCT label ORDER BY label) FROM unnest(r.labels) label)
           IS NOT DISTINCT FROM (CASE WHEN cardinality(v_labels) > 0 THEN v_labels END) THEN
            v_labels := r.labels;
        END IF;
    END IF;
    UPDATE {runs} x
       SET run_id = p_run_id, incarnation = split_part(v_id, '-', 3), status = p_status,
           created_at = v_created, updated_at = p_now, latest_sequence = v_sequence,
           checkpoint_count = v_held, forever_count = v_forever,
           expires_at = CASE WHEN v_forever > 0 THEN NULL ELSE v_latest END, purge_at = NULL,
           version = 0, data = p_data, labels = v_labels, update_token = NULL
     WHERE x.run_key = p_run_key
    RETURNING x.* INTO r;
    DELETE FROM {labels} l WHERE l.run_key = p_run_key;
    INSERT INTO {labels} (label, created_at, run_key)
    SELECT DISTINCT label, v_created, p_run_key FROM unnest(v_labels) label;
    -- Shared items: each key counted once per checkpoint in place that names it.
    DELETE FROM {refs} f WHERE f.run_key = p_run_key;
    INSERT INTO {refs} (run_key, key, holders)
    SELECT p_run_key, named.key, count(*)
      FROM {checkpoints} c, LATERAL (SELECT DISTINCT unnest(c.refs)) named(key)
     WHERE c.run_key = p_run_key
     GROUP BY named.key;
    RETURN QUERY SELECT 'ok'::text, r;
END
$fn$
""".replace("<utf8>", UTF8_HEX)

# Migration 3: items nested under a shared item K (keys starting with K || '/') go with it.
# Where a shared item goes because no checkpoint names it any more ({remove}: pruning,
# delete, purge; the start of a new life in {append}), the items nested under each loose item
# that went (v_dropped) go in the same transaction: one primary-key range delete per item, the
# keys from K || '/' up to K || '0' ('0' is the byte after '/'; bytea order is code point
# order). Deleting a whole run or an expired one already takes all of the run's items.
_DROP_NESTED = """
            IF v_dropped IS NOT NULL THEN
                DELETE FROM {items} i USING unnest(v_dropped) n(k)
                 WHERE i.run_key = p_run_key AND i.key >= n.k || '/'::bytea
                   AND i.key < n.k || '0'::bytea;
            END IF;"""

_REMOVE_V3 = _patched(
    _REMOVE_V1,
    ("CREATE FUNCTION {remove}(", "CREATE OR REPLACE FUNCTION {remove}("),
    ("    v_zeroed bytea[];\n", "    v_zeroed bytea[];\n    v_dropped bytea[];\n"),
    ("""
            DELETE FROM {items}
             WHERE run_key = p_run_key AND key = ANY (v_zeroed) AND owner IS NULL;""",
     """
            WITH dropped AS (
                DELETE FROM {items} i
                 WHERE i.run_key = p_run_key AND i.key = ANY (v_zeroed) AND i.owner IS NULL
                RETURNING i.key
            )
            SELECT array_agg(key) INTO v_dropped FROM dropped;""" + _DROP_NESTED),
)

_APPEND_V3 = _patched(
    _APPEND_V2,
    ("    v_unheld bytea[];\n", "    v_unheld bytea[];\n    v_dropped bytea[];\n"),
    ("""
            WITH released AS (DELETE FROM {refs} f WHERE f.run_key = p_run_key RETURNING f.key)
            DELETE FROM {items} i
             WHERE i.run_key = p_run_key AND i.owner IS NULL
               AND i.key IN (SELECT key FROM released);""",
     """
            WITH released AS (
                DELETE FROM {refs} f WHERE f.run_key = p_run_key RETURNING f.key
            ), dropped AS (
                DELETE FROM {items} i
                 WHERE i.run_key = p_run_key AND i.owner IS NULL
                   AND i.key IN (SELECT key FROM released)
                RETURNING i.key
            )
            SELECT array_agg(key) INTO v_dropped FROM dropped;""" + _DROP_NESTED),
)

# Migration 3, the read: a checkpoint with the live items it owns, the items its refs name,
# and the items nested under those (one primary-key range per distinct ref), still one
# statement, so one snapshot. OFFSET 0 keeps the range subquery from being merged into a join
# that the planner may turn around (the run's items scanned, each tested against every ref):
# each ref is its own primary-key range scan. Owned items come from the first part only; an
# item nested under two refs (one ref nested under another) comes twice, the client keeps one.
_READ_ITEMS = """
         CROSS JOIN LATERAL (
               SELECT array_agg(w.key), array_agg(w.value) FROM (
                   SELECT i.key, i.value FROM {items} i
                    WHERE i.run_key = p_run_key
                      AND (i.expires_at IS NULL OR i.expires_at > p_now)
                      AND (i.owner = c.sequence OR i.key = ANY (c.refs))
                   UNION ALL
                   SELECT r.key, r.value
                     FROM (SELECT DISTINCT unnest(c.refs)) n(k)
                    CROSS JOIN LATERAL (
                          SELECT i.key, i.value FROM {items} i
                           WHERE i.run_key = p_run_key AND i.key >= n.k || '/'::bytea
                             AND i.key < n.k || '0'::bytea
                             AND (i.expires_at IS NULL OR i.expires_at > p_now)
                             AND i.owner IS DISTINCT FROM c.sequence
                          OFFSET 0) r) w) w(keys, vals)"""

_READ_WITH_ITEMS_V3 = r"""
CREATE OR REPLACE FUNCTION {read_with_items}(p_run_key text, p_sequence bigint,
                                             p_now double precision)
RETURNS TABLE (sequence bigint, checkpoint_id text, created_at double precision,
               expires_at double precision, header bytea, payload bytea, refs bytea[],
               status text, item_keys bytea[], item_values bytea[])
LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
BEGIN
    IF p_sequence IS NULL THEN
        RETURN QUERY
        SELECT c.sequence, c.checkpoint_id, c.created_at, c.expires_at, c.header, c.payload,
               c.refs, <status>, w.keys, w.vals
          FROM (SELECT * FROM {checkpoints} n
                 WHERE n.run_key = p_run_key AND (n.expires_at IS NULL OR n.expires_at > p_now)
                 ORDER BY n.sequence DESC LIMIT 1) c
          JOIN {runs} x ON x.run_key = c.run_key<head><items>;
    ELSE
        RETURN QUERY
        SELECT c.sequence, c.checkpoint_id, c.created_at, c.expires_at, c.header, c.payload,
               c.refs, <status>, w.keys, w.vals
          FROM {checkpoints} c JOIN {runs} x ON x.run_key = c.run_key<head><items>
         WHERE c.run_key = p_run_key AND c.sequence = p_sequence
           AND (c.expires_at IS NULL OR c.expires_at > p_now);
    END IF;
END
$fn$
""".replace("<items>", _READ_ITEMS).replace("<head>", _HEAD).replace("<status>", _INTACT_STATUS)

# Migration 4: a call whose connection dropped may still be running on the server when the
# client retries it (same token) on another connection. Its first reads would not see the
# original's uncommitted writes, and it would then wait on their locks and report a conflict
# with its own write (a new run's first append) or a no-op (a delete): the retry now waits
# for the call it repeats, on a transaction-scoped advisory lock of its token, and reads
# what that call committed. Two 32-bit keys: the first one this store's (``fc`` in ASCII).
_TOKEN_LOCK = """
    -- A retry of this call (same token) waits here for the call it repeats to end.
    PERFORM pg_advisory_xact_lock(26211, hashtext(p_token));
"""


def _function(text: str, name: str) -> str:
    """The definition of function ``{name}`` in a block of ``text`` that holds several."""
    start = text.index(f"FUNCTION {{{name}}}(")
    start = text.rindex("CREATE ", 0, start)
    return text[start : text.index("\n$fn$", start) + len("\n$fn$")]


def _token_locked(text: str, name: str) -> str:
    """Function ``{name}`` (its definition in ``text``) taking its token's lock first."""
    return _patched(
        _function(text, name),
        *([] if text.startswith("\nCREATE OR REPLACE") else
          [(f"CREATE FUNCTION {{{name}}}(", f"CREATE OR REPLACE FUNCTION {{{name}}}(")]),
        ("\nBEGIN\n", "\nBEGIN" + _TOKEN_LOCK),
    )


_TOKEN_LOCKED_V4 = ";\n\n".join([
    _token_locked(_APPEND_V3, "append"),
    _token_locked(_DELETES_V1, "delete"),
    _token_locked(_DELETES_V1, "delete_run"),
    _token_locked(_READS_V1, "delete_items"),
    _patched(
        _function(_ITEMS_V1, "put_items"),
        ("CREATE FUNCTION {put_items}(", "CREATE OR REPLACE FUNCTION {put_items}("),
        ("    IF p_create_only THEN\n        -- The retry of a create-only write",
         "    IF p_create_only THEN" + _TOKEN_LOCK.replace("\n    ", "\n        ")
         + "        -- The retry of a create-only write"),
    ),
])

# Migration 5: what is nested under a key K goes when the last checkpoint naming K does,
# whatever became of K's own item (owned by a checkpoint that went first, removed by
# delete_items, or still held by its owner): migration 3 removed it only with a loose item at
# K, so it stayed until the run went. {remove} takes the keys no checkpoint names any more
# (v_zeroed), the start of a new life every key the old life named (released).
_REMOVE_V5 = _patched(
    _REMOVE_V3,
    ("    v_dropped bytea[];\n", ""),
    ("""
            WITH dropped AS (
                DELETE FROM {items} i
                 WHERE i.run_key = p_run_key AND i.key = ANY (v_zeroed) AND i.owner IS NULL
                RETURNING i.key
            )
            SELECT array_agg(key) INTO v_dropped FROM dropped;
            IF v_dropped IS NOT NULL THEN
                DELETE FROM {items} i USING unnest(v_dropped) n(k)
                 WHERE i.run_key = p_run_key AND i.key >= n.k || '/'::bytea
                   AND i.key < n.k || '0'::bytea;
            END IF;""",
     """
            DELETE FROM {items} i
             WHERE i.run_key = p_run_key AND i.key = ANY (v_zeroed) AND i.owner IS NULL;
            DELETE FROM {items} i USING unnest(v_zeroed) n(k)
             WHERE i.run_key = p_run_key AND i.key >= n.k || '/'::bytea
               AND i.key < n.k || '0'::bytea;"""),
)

_APPEND_V5 = _patched(
    _token_locked(_APPEND_V3, "append"),
    ("    v_dropped bytea[];\n", "    v_released bytea[];\n"),
    ("""
            WITH released AS (
                DELETE FROM {refs} f WHERE f.run_key = p_run_key RETURNING f.key
            ), dropped AS (
                DELETE FROM {items} i
                 WHERE i.run_key = p_run_key AND i.owner IS NULL
                   AND i.key IN (SELECT key FROM released)
                RETURNING i.key
            )
            SELECT array_agg(key) INTO v_dropped FROM dropped;
            IF v_dropped IS NOT NULL THEN
                DELETE FROM {items} i USING unnest(v_dropped) n(k)""",
     """
            WITH released AS (
                DELETE FROM {refs} f WHERE f.run_key = p_run_key RETURNING f.key
            )
            SELECT array_agg(key) INTO v_released FROM released;
            IF v_released IS NOT NULL THEN
                DELETE FROM {items} i
                 WHERE i.run_key = p_run_key AND i.owner IS NULL
                   AND i.key = ANY (v_released);
                DELETE FROM {items} i USING unnest(v_released) n(k)"""),
)

# Migration 6: a run update that applies only while the run's newest checkpoint is the one
# the caller saw (``latest_sequence=``, SupportsSequenceGuard). Appends move the row's
# latest_sequence in the UPDATE that takes the row, so one more condition in this function's
# UPDATE decides it against them (a concurrent append's update is waited for, and the row
# re-checked). A new function beside the one of migration 1 (another signature, so another
# object): processes of the release before keep calling theirs until they are rolled out.
# Outcome 'newer' with the row: incarnation and version matched, the latest sequence did not
# (or did too, without a guard: a row deleted and put back while the update waited for
# it; the store takes any outcome but 'ok' and 'missing' as nothing changed).
_UPDATE_RUN_V6 = _patched(
    _UPDATE_RUN_V1,
    ("                             p_token text)\n",
     "                             p_token text, p_latest_sequence bigint)\n"),
    ("       AND (x.expires_at IS NULL OR x.expires_at > p_now)\n    RETURNING x.* INTO r;",
     "       AND (x.expires_at IS NULL OR x.expires_at > p_now)\n"
     "       AND (p_latest_sequence IS NULL OR x.latest_sequence = p_latest_sequence)\n"
     "    RETURNING x.* INTO r;"),
    ("        RETURN QUERY SELECT 'ok'::text, r;\n    ELSE\n",
     "        RETURN QUERY SELECT 'ok'::text, r;\n"
     "    ELSIF r.incarnation = p_incarnation AND r.version = p_version THEN\n"
     "        RETURN QUERY SELECT 'newer'::text, r;\n    ELSE\n"),
)

# Migration 7: an item key nested under another (``K/x`` under ``K``) is an item of its own
# when a held checkpoint names or owns it: the release of the last checkpoint naming ``K``
# keeps what a held checkpoint still names or is nested under a key one names (the {refs} rows
# left after the release, looked up by the item key and each of its prefixes ending before a
# '/'), and owned items (they go with their owner); {read_with_items} leaves out the owned
# items of other checkpoints. Only {remove} releases keys others may still name; a new life
# releases every key at once.
_UNNAMED = """
               AND NOT EXISTS (
                   SELECT 1 FROM {refs} f
                    WHERE f.run_key = p_run_key
                      AND f.key IN (SELECT i.key UNION ALL
                                    SELECT substring(i.key FROM 1 FOR c.n - 1)
                                      FROM generate_series(1, length(i.key)) c(n)
                                     WHERE get_byte(i.key, c.n - 1) = 47))"""

_REMOVE_V7 = _patched(
    _REMOVE_V5,
    ("""
            DELETE FROM {items} i
             WHERE i.run_key = p_run_key AND i.key = ANY (v_zeroed) AND i.owner IS NULL;
            DELETE FROM {items} i USING unnest(v_zeroed) n(k)
             WHERE i.run_key = p_run_key AND i.key >= n.k || '/'::bytea
               AND i.key < n.k || '0'::bytea;""",
     """
            DELETE FROM {items} i
             WHERE i.run_key = p_run_key AND i.key = ANY (v_zeroed) AND i.owner IS NULL""" +
     _UNNAMED + """;
            DELETE FROM {items} i USING unnest(v_zeroed) n(k)
             WHERE i.run_key = p_run_key AND i.key >= n.k || '/'::bytea
               AND i.key < n.k || '0'::bytea AND i.owner IS NULL""" + _UNNAMED + ";"),
)

# And reads: another checkpoint's owned item nested under a ref is not the reader's.
_READ_WITH_ITEMS_V7 = _READ_WITH_ITEMS_V3.replace(
    "AND i.owner IS DISTINCT FROM c.sequence", "AND i.owner IS NULL")
if _READ_WITH_ITEMS_V7.count("AND i.owner IS NULL") != 2:
    raise ValueError("read_with_items of migration 3 changed: migration 7 no longer applies")

# Migration 8, the append. (1) A retry of an append whose reply was lost found its own write
# only by the checkpoint's token: once that checkpoint was gone (deleted, pruned by another
# writer's create, its run deleted or expired) the retry was a conflict, and the manager wrote
# the same create again at the next sequence (a deleted checkpoint came back; a stale one
# pruned a newer one). Every append now remembers its token in {ops}, like the deletes, for
# five minutes of the server's clock; a retry that loses the compare-and-set finds it there
# and is acknowledged. Each append also takes out the memos right after its own in token
# order (two), if they expired: tokens are random, so this keeps the table near twice the
# memos of the last five minutes whatever the cleanup loop does (each append adds one, and
# removes two while half the memos it meets have expired), and appends of different runs
# seldom meet on a memo. (2) Pruning never takes a sequence above p_sequence - p_keep_latest:
# the count comes from the run row, and a row whose count is too high (a copy put back after
# deletes, an operator's UPDATE) made the append prune the checkpoint it had just written.
_APPEND_MEMO = """
    -- Remembered for a retry whose reply is lost (see migration 8), and two memos after it in
    -- token order taken out if they expired.
    INSERT INTO {ops} (token, result, expires_at)
    VALUES (p_token, p_sequence, extract(epoch FROM clock_timestamp()) + 300);
    DELETE FROM {ops} o
     WHERE o.token IN (SELECT n.token FROM {ops} n WHERE n.token > p_token
                        ORDER BY n.token LIMIT 2)
       AND o.expires_at <= extract(epoch FROM clock_timestamp());
    outcome := 'ok'; status := r.status;
END
$fn$"""

_APPEND_V8 = _patched(
    _APPEND_V5,
    ("""        v_found := FOUND;
        IF v_found THEN""",
     """        v_found := FOUND;
        -- A retry of an append whose reply was lost: it was written, whatever became of its
        -- checkpoint since (deleted, pruned, its run deleted or expired).
        PERFORM 1 FROM {ops} o WHERE o.token = p_token;
        IF FOUND THEN
            outcome := 'ok';
            status := CASE WHEN v_found AND r.incarnation = p_incarnation THEN r.status
                           ELSE p_status END;
            RETURN;
        END IF;
        IF v_found THEN"""),
    ("""             WHERE c.run_key = p_run_key
               AND (c.expires_at IS NULL OR c.expires_at > p_now)
             ORDER BY c.sequence LIMIT v_live - p_keep_latest);""",
     """             WHERE c.run_key = p_run_key
               AND (c.expires_at IS NULL OR c.expires_at > p_now)
               AND c.sequence <= p_sequence - p_keep_latest
             ORDER BY c.sequence LIMIT v_live - p_keep_latest);"""),
    ("\n    outcome := 'ok'; status := r.status;\nEND\n$fn$", _APPEND_MEMO),
)

# Migration 8, repair: a NULL element in a run row's labels (an operator's UPDATE) is damage
# damaged_runs reports; the store's reads raise CorruptCheckpointError for it, and listings
# skip the row, as for a label that is not UTF-8.
_DAMAGED_RUNS_V8 = _patched(
    _function(_REPAIR_V1, "damaged_runs"),
    ("CREATE FUNCTION {damaged_runs}(", "CREATE OR REPLACE FUNCTION {damaged_runs}("),
    ("                   WHEN EXISTS (SELECT 1 FROM unnest(x.labels) label\n",
     "                   WHEN array_position(x.labels, NULL) IS NOT NULL\n"
     "                       THEN 'holds a NULL label'\n"
     "                   WHEN EXISTS (SELECT 1 FROM unnest(x.labels) label\n"),
)

# Migration 9, the append: pruning stops below the p_keep_latest-th newest live checkpoint in
# place, not at p_sequence - p_keep_latest. Sequences a delete took are gaps, so a run row put
# back from a copy taken before a delete still agrees with the newest checkpoint (nothing
# tells it apart), counts one too many, and the bound by sequence numbers let the append prune
# one of the p_keep_latest newest the run held. The bound walks p_keep_latest entries of the
# primary key backwards (with their heap rows, for the expiry), once per pruning append.
_APPEND_V9 = _patched(
    _APPEND_V8,
    ("""               AND c.sequence <= p_sequence - p_keep_latest
             ORDER BY c.sequence LIMIT v_live - p_keep_latest);""",
     """               AND c.sequence < (
                   SELECT n.sequence FROM {checkpoints} n
                    WHERE n.run_key = p_run_key
                      AND (n.expires_at IS NULL OR n.expires_at > p_now)
                    ORDER BY n.sequence DESC OFFSET p_keep_latest - 1 LIMIT 1)
             ORDER BY c.sequence LIMIT v_live - p_keep_latest);"""),
)

# Migration 10: damage judged by the run's own checkpoints and run id.
# (1) A checkpoint whose id names another run key (a row of another run swapped in) is not the
# run's: {damage} and the reads' inlined copy judge the row against the newest checkpoint in
# place that is not another run's, so the run goes on from its own checkpoints instead of
# being refused for good; {damaged_runs} offers, and {rebuild_run} takes its incarnation and
# creation time from, the newest and oldest of the run's own checkpoints (the latest sequence
# stays the highest in place, so the next append never meets a primary key in use).
# (2) A run row copied over from another run names another run id: the append, which carries
# the run's own id, refuses to write after it (FC003), and {rebuild_run}, whose caller's run
# id is the run's, rebuilds it. Whether a run id belongs to a run key is a hash the server
# cannot compute: the store judges the other reads in Python.
# (3) {damaged_runs} also reports a creation time that is not a finite number (the row sorts
# past every page of a listing), a latest sequence above what a checkpoint id can name (every
# create fails) and a version no status change can raise.
_ANOTHER_RUNS = ("({c}.checkpoint_id ~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$' "
                 "AND split_part({c}.checkpoint_id, '-', 2) <> {k})")
"""Whether checkpoint row ``{c}`` has an id naming another run key than ``{k}``."""


def _another_runs(row: str, key: str) -> str:
    return _ANOTHER_RUNS.replace("{c}", row).replace("{k}", key)


def _own_id(row: str, key: str) -> str:
    """Whether checkpoint row ``row`` has an id of run key ``key``."""
    return (f"({row}.checkpoint_id ~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$' "
            f"AND split_part({row}.checkpoint_id, '-', 2) = {key})")


_DAMAGE_V10 = _patched(
    _DAMAGE_V1,
    ("CREATE FUNCTION {damage}(", "CREATE OR REPLACE FUNCTION {damage}("),
    ("      FROM {checkpoints} n WHERE n.run_key = p_run_key ORDER BY n.sequence DESC LIMIT 1;",
     "      FROM {checkpoints} n WHERE n.run_key = p_run_key AND NOT "
     + _another_runs("n", "p_run_key") + "\n     ORDER BY n.sequence DESC LIMIT 1;"),
)

_HEAD_V10 = _patched(
    _HEAD,
    ("WHERE h.run_key = x.run_key\n",
     "WHERE h.run_key = x.run_key\n                              AND NOT "
     + _another_runs("h", "x.run_key") + "\n"),
)


def _reads_v10(text: str, name: str) -> str:
    """Function ``{name}`` of ``text`` judging its run row by the head of migration 10."""
    function = _function(text, name)
    if not function.startswith("CREATE OR REPLACE"):
        function = _patched(function, (f"CREATE FUNCTION {{{name}}}(",
                                       f"CREATE OR REPLACE FUNCTION {{{name}}}("))
    if _HEAD not in function:
        raise ValueError(f"{name} judges no run row by the head of migration 1")
    return function.replace(_HEAD, _HEAD_V10)


_READS_V10 = ";\n\n".join([
    _reads_v10(_READS_V1, "get"), _reads_v10(_READS_V1, "latest"),
    _reads_v10(_READS_V1, "count_runs"), _reads_v10(_READ_WITH_ITEMS_V7, "read_with_items"),
])

_FOREIGN_ROW = """
        IF v_problem IS NULL AND r.run_id <> p_run_id THEN
            -- Copied over from another run: the run key derives from the caller's run id.
            v_problem := 'names another run (it was copied over from it)';
        END IF;"""

_APPEND_V10 = _patched(
    _APPEND_V9,
    ("""                              r.checkpoint_count - 1, r.expires_at);
""", """                              r.checkpoint_count - 1, r.expires_at);"""
     + _FOREIGN_ROW + "\n"),
    ("""              INTO v_problem FROM {runs} x WHERE x.run_key = p_run_key;
""", """              INTO v_problem FROM {runs} x WHERE x.run_key = p_run_key;"""
     + _FOREIGN_ROW.replace("\n        ", "\n            ") + "\n"),
)

_DAMAGED_RUNS_V10 = _patched(
    _DAMAGED_RUNS_V8,
    ("                   WHEN l.held <> x.checkpoint_count THEN format(\n",
     """                   WHEN x.created_at IN ('NaN', 'Infinity', '-Infinity') THEN format(
                       'says the run was created at %s', x.created_at)
                   WHEN x.latest_sequence > 9223372036854775806 THEN format(
                       'knows sequences up to %s, more than a checkpoint id can name',
                       x.latest_sequence)
                   WHEN x.version = 9223372036854775807 THEN format(
                       'is at version %s, which no status change can raise', x.version)
                   WHEN l.held <> x.checkpoint_count THEN format(
"""),
    ("            WHERE c.run_key = j.run_key AND j.problem IS NOT NULL\n",
     "            WHERE c.run_key = j.run_key AND j.problem IS NOT NULL\n"
     "              AND " + _own_id("c", "j.run_key") + "\n"),
)

_REBUILD_RUN_V10 = _patched(
    _function(_REPAIR_V1, "rebuild_run"),
    ("CREATE FUNCTION {rebuild_run}(", "CREATE OR REPLACE FUNCTION {rebuild_run}("),
    ("""    SELECT d.problem INTO v_problem FROM {damaged_runs}(p_run_key, '', 1) d;
""", """    SELECT d.problem INTO v_problem FROM {damaged_runs}(p_run_key, '', 1) d;
    IF v_problem IS NULL AND r.run_id IS DISTINCT FROM p_run_id THEN
        -- Copied over from another run: the caller's run id is the one of this run key.
        v_problem := 'names another run';
    END IF;
"""),
    ("""    SELECT count(*), count(*) FILTER (WHERE c.expires_at IS NULL), max(c.expires_at)
      INTO v_held, v_forever, v_latest
""", """    SELECT count(*), count(*) FILTER (WHERE c.expires_at IS NULL), max(c.expires_at),
           max(c.sequence)
      INTO v_held, v_forever, v_latest, v_sequence
"""),
    ("""    SELECT c.sequence, c.checkpoint_id INTO v_sequence, v_id
      FROM {checkpoints} c WHERE c.run_key = p_run_key ORDER BY c.sequence DESC LIMIT 1;
    IF v_id !~ ('^ck-' || p_run_key || '-[a-z2-7]+-[0-9]+$') THEN
""", """    -- The incarnation from the newest of the run's own checkpoints; the latest sequence is
    -- the highest in place, whoever's, so the next append finds its primary key free.
    SELECT c.checkpoint_id INTO v_id
      FROM {checkpoints} c WHERE c.run_key = p_run_key AND <own>
     ORDER BY c.sequence DESC LIMIT 1;
    IF NOT FOUND THEN
"""),
    ("""    SELECT c.created_at INTO v_created
      FROM {checkpoints} c WHERE c.run_key = p_run_key ORDER BY c.sequence LIMIT 1;
""", """    v_created := coalesce((
        SELECT c.created_at FROM {checkpoints} c
         WHERE c.run_key = p_run_key AND <own>
           AND c.created_at > '-Infinity' AND c.created_at < 'Infinity'
         ORDER BY c.sequence LIMIT 1), p_now);
"""),
).replace("<own>", _own_id("c", "p_run_key"))


# Migration 11: a first try delivered late. When a connection drops, the first send of a call
# may still reach the server (on the dropped connection, whose end the server has not seen)
# after the retry committed and the caller went on. The memo under its token makes it a
# no-op; delete_run and delete_items now remember their result also when they removed nothing
# (a late delete_run of a run that did not exist would remove the life started after it, a
# late delete_items an item written after it), and put_items remembers every write, not only
# a create-only one (a late upsert would overwrite a newer value), taking out two expired
# memos after its own as an append does (see migration 8), since item writes are as frequent.
_MEMO_ALWAYS = """    INSERT INTO {ops} (token, result, expires_at)
    VALUES (p_token, coalesce(v_result, 0), extract(epoch FROM clock_timestamp()) + 300);
    RETURN coalesce(v_result, 0);
END
$fn$"""

_DELETE_RUN_V11 = _patched(
    _token_locked(_DELETES_V1, "delete_run"),
    ("""    IF v_result IS NULL THEN
        RETURN 0;
    END IF;
    INSERT INTO {ops} (token, result, expires_at)
    VALUES (p_token, v_result, extract(epoch FROM clock_timestamp()) + 300);
    RETURN v_result;
END
$fn$""", _MEMO_ALWAYS),
)

_DELETE_ITEMS_V11 = _patched(
    _token_locked(_READS_V1, "delete_items"),
    ("""    IF v_count > 0 THEN
        INSERT INTO {ops} (token, result, expires_at)
        VALUES (p_token, v_count, extract(epoch FROM clock_timestamp()) + 300);
    END IF;""", """    INSERT INTO {ops} (token, result, expires_at)
    VALUES (p_token, v_count, extract(epoch FROM clock_timestamp()) + 300);"""),
)

_PUT_ITEMS_MEMO = """    -- A retry of this write whose reply was lost (a create-only one would find
    -- its own items taken), or its first try delivered late: it wrote, once.
    PERFORM 1 FROM {ops} o WHERE o.token = p_token;
    IF FOUND THEN
        RETURN;
    END IF;"""

_PUT_ITEMS_V11 = _patched(
    _function(_ITEMS_V1, "put_items"),
    ("CREATE FUNCTION {put_items}(", "CREATE OR REPLACE FUNCTION {put_items}("),
    ("""    IF p_create_only THEN
        -- The retry of a create-only write whose reply was lost: it wrote, once.
        PERFORM 1 FROM {ops} o WHERE o.token = p_token;
        IF FOUND THEN
            RETURN;
        END IF;
    END IF;""", _TOKEN_LOCK.lstrip("\n") + _PUT_ITEMS_MEMO),
    ("""    IF p_create_only THEN
        INSERT INTO {ops} (token, result, expires_at)
        VALUES (p_token, v_written, extract(epoch FROM clock_timestamp()) + 300);
    END IF;""", """    INSERT INTO {ops} (token, result, expires_at)
    VALUES (p_token, v_written, extract(epoch FROM clock_timestamp()) + 300);
    DELETE FROM {ops} o
     WHERE o.token IN (SELECT n.token FROM {ops} n WHERE n.token > p_token
                        ORDER BY n.token LIMIT 2)
       AND o.expires_at <= extract(epoch FROM clock_timestamp());"""),
)

# Migration 12: put_owned_items remembers its answer under a token when it is an upsert
# (if_absent false: the LangGraph saver's special writes). A first try of an upsert delivered
# late would overwrite the value a later call wrote to the same checkpoint's item; with the
# memo it answers as it did and writes nothing. An insert-if-absent needs none: late, it finds
# the key written and writes nothing, and it costs no more than before. A new function beside
# the one of migration 1 (another signature, so another object): processes of the release
# before keep calling theirs until they are rolled out.
_PUT_OWNED_ITEMS_V12 = _patched(
    _function(_ITEMS_V1, "put_owned_items"),
    ("                                  p_now double precision)\n",
     "                                  p_now double precision, p_token text)\n"),
    ("    v_expires_at double precision;\nBEGIN\n",
     "    v_expires_at double precision;\n    v_result bigint;\nBEGIN\n"
     + """    IF NOT p_if_absent THEN
        -- A retry of this upsert whose reply was lost, or its first try delivered late: it
        -- was answered once, and is answered so again without writing.
        PERFORM pg_advisory_xact_lock(26211, hashtext(p_token));
        SELECT o.result INTO v_result FROM {ops} o WHERE o.token = p_token;
        IF FOUND THEN
            RETURN v_result = 1;
        END IF;
    END IF;
"""),
    ("""    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO {items} AS i (run_key, key, value, owner, expires_at)""",
     """    IF NOT FOUND THEN
        IF NOT p_if_absent THEN
            INSERT INTO {ops} (token, result, expires_at)
            VALUES (p_token, 0, extract(epoch FROM clock_timestamp()) + 300);
        END IF;
        RETURN false;
    END IF;
    INSERT INTO {items} AS i (run_key, key, value, owner, expires_at)"""),
    ("""     WHERE NOT p_if_absent OR (i.expires_at IS NOT NULL AND i.expires_at <= p_now);
    RETURN true;""",
     """     WHERE NOT p_if_absent OR (i.expires_at IS NOT NULL AND i.expires_at <= p_now);
    IF NOT p_if_absent THEN
        INSERT INTO {ops} (token, result, expires_at)
        VALUES (p_token, 1, extract(epoch FROM clock_timestamp()) + 300);
        DELETE FROM {ops} o
         WHERE o.token IN (SELECT n.token FROM {ops} n WHERE n.token > p_token
                            ORDER BY n.token LIMIT 2)
           AND o.expires_at <= extract(epoch FROM clock_timestamp());
    END IF;
    RETURN true;"""),
)

# Migration 13: the store records its removals of items a held checkpoint names, so that a read
# tells them from an item row deleted behind its back (an operator's DELETE, a partial
# restore), which it reports as damage instead of returning the checkpoint without the item.
# The record is a flag on the key's {refs} row: it goes when no held checkpoint names the key
# any more, or with the run, and costs nothing where no such removal happens. Nothing clears a
# flag while the key is named (a value written again at the key keeps it): an append may name
# a key a concurrent delete_items removed, and the flag must stay for the reads of that
# append's checkpoint. The counts in place before this migration record nothing either way
# (NULL, left so by the removals, read as removed): processes of the release before, running
# beside it, remove items without a record while it runs (a removal it cannot see yet) and
# after it (a call entered before it committed runs the function as it found it), so a named
# item missing under such a count reads as absent, as it did; so does one already missing.
# The counts written from here on start at false. Both statements change only the catalog.
_REFS_V13 = r"""
ALTER TABLE {refs} ADD COLUMN removed boolean;

ALTER TABLE {refs} ALTER COLUMN removed SET DEFAULT false
"""

# Records the removal of the keys in ``v_gone_keys`` a held checkpoint names (one probe of the
# {refs} primary key each), only when the removal took some.
_RECORD_REMOVALS = """
    IF v_gone_keys IS NOT NULL THEN
        UPDATE {refs} f SET removed = true
         WHERE f.run_key = p_run_key AND f.key = ANY (v_gone_keys) AND NOT f.removed;
    END IF;"""

# {remove}: owned items go with their owner (also while other checkpoints name them).
_REMOVE_V13 = _patched(
    _REMOVE_V7,
    ("    v_zeroed bytea[];\n", "    v_zeroed bytea[];\n    v_gone_keys bytea[];\n"),
    ("    DELETE FROM {items} WHERE run_key = p_run_key AND owner = ANY (v_gone);\n",
     """    WITH owned AS (
        DELETE FROM {items} i WHERE i.run_key = p_run_key AND i.owner = ANY (v_gone)
        RETURNING i.key
    )
    SELECT array_agg(key) INTO v_gone_keys FROM owned;""" + _RECORD_REMOVALS + "\n"),
)

# delete_items: the keys it removes. An append naming one of them must not commit around the
# removal unrecorded (its {refs} row written after this looked for it, the item gone after its
# check found it): the removal takes the run row's lock, which every append holds from before
# its check until it commits, or, while the run has no row, the lock a run's first append takes
# before it creates the row (an advisory lock of the run key). The append then either commits
# first (its row is there to record the removal on) or checks its refs after the removal (and
# is refused with SharedItemGone).
_RUN_KEY_LOCK = "pg_advisory_xact_lock(26212, hashtext(p_run_key))"

_DELETE_ITEMS_V13 = _patched(
    _DELETE_ITEMS_V11,
    ("    v_count bigint;\nBEGIN\n", "    v_count bigint;\n    v_gone_keys bytea[];\nBEGIN\n"),
    ("""    DELETE FROM {items} i WHERE i.run_key = p_run_key AND i.key = ANY (p_keys);
    GET DIAGNOSTICS v_count = ROW_COUNT;
""", f"""    PERFORM 1 FROM {{runs}} x WHERE x.run_key = p_run_key FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        PERFORM {_RUN_KEY_LOCK};
    END IF;
    WITH gone AS (
        DELETE FROM {{items}} i WHERE i.run_key = p_run_key AND i.key = ANY (p_keys)
        RETURNING i.key
    )
    SELECT array_agg(key) INTO v_gone_keys FROM gone;
    v_count := coalesce(cardinality(v_gone_keys), 0);""" + _RECORD_REMOVALS + "\n"),
)

# delete_run of a run without a row (items put before its first append) is ordered with that
# first append the same way: it waits for the lock of the run key, then removes the row the
# append committed meanwhile (the new life goes whole), or the append, waiting for it, finds
# its items gone. Before, it removed an item the append had checked, under a checkpoint naming
# it with no removal recorded (a read then reported damage).
_DELETE_RUN_V13 = _patched(
    _DELETE_RUN_V11,
    ("    DELETE FROM {refs} f WHERE f.run_key = p_run_key;\n",
     f"""    IF NOT FOUND THEN
        PERFORM {_RUN_KEY_LOCK};
        DELETE FROM {{runs}} r WHERE r.run_key = p_run_key
        RETURNING r.checkpoint_count INTO v_result;
    END IF;
    DELETE FROM {{refs}} f WHERE f.run_key = p_run_key;
"""),
)

# The cleanup's purge of expired items no count names judged "no count" in its own snapshot,
# which misses the count of an append in flight that checked the item live (by its clock,
# earlier than the cleanup's): the item went from under that append's checkpoint with no
# record (a read then reported damage). It now finds them in one pass (up to the budget; a
# pass for each run read the expired items a count names, and a busy run's, once per run),
# then removes them run by run, each under the run's lock taken without waiting (the row
# shared, or for a run without a row the lock a first append takes), in a statement after
# the lock (which sees the counts of the appends that committed meanwhile); an append after
# it waits for it and finds the item gone. The expiry is judged on the item row the delete
# takes: an item written again while the delete waited for its row (put_items, a new value
# and expiry) stays; judged on the row of another read of the table (IN (SELECT ...)), the
# delete took the new value, acknowledged. A run whose lock is taken (a write in flight) is
# left for the next cleanup, and does not keep this one from being done: never a wait here
# (two purges lock runs in different orders), never a cleanup spinning on a run held by a
# slow transaction. The advisory locks are held to the commit, each an entry of the server's
# shared lock table (max_locks_per_transaction per connection, shared by all): a call takes
# at most 64 of them and leaves the further runs without a row to the next call (not done);
# a batch over thousands of such runs ran out of lock memory and failed, every call again.
_PURGE_V13 = _patched(
    _function(_PURGE_V1, "purge"),
    ("CREATE FUNCTION {purge}(", "CREATE OR REPLACE FUNCTION {purge}("),
    ("    v_count bigint;\n",
     "    v_count bigint;\n    v_busy text[] := '{{}}';\n    v_locks integer := 0;\n"
     "    v_runs text[];\n    v_keys bytea[];\n"),
    ("""    IF v_budget > 0 THEN
        WITH gone AS (
            DELETE FROM {items} i
             WHERE (i.run_key, i.key) IN (
                 SELECT e.run_key, e.key FROM {items} e
                  WHERE e.expires_at IS NOT NULL AND e.expires_at <= p_now
                    AND NOT EXISTS (SELECT 1 FROM {refs} f
                                     WHERE f.run_key = e.run_key AND f.key = e.key)
                  LIMIT v_budget)
            RETURNING 1)
        SELECT v_budget - count(*) INTO v_budget FROM gone;
    END IF;
""", """    <<expired_items>>
    LOOP
        EXIT WHEN v_budget <= 0;
        SELECT array_agg(e.run_key), array_agg(e.key) INTO v_runs, v_keys FROM (
            SELECT e.run_key, e.key FROM {items} e
             WHERE e.expires_at IS NOT NULL AND e.expires_at <= p_now
               AND NOT (e.run_key = ANY (v_busy))
               AND NOT EXISTS (SELECT 1 FROM {refs} f
                                WHERE f.run_key = e.run_key AND f.key = e.key)
             LIMIT v_budget) e;
        EXIT WHEN v_runs IS NULL;
        FOR v_key IN SELECT DISTINCT u.k FROM unnest(v_runs) u(k) LOOP
            PERFORM 1 FROM {runs} x WHERE x.run_key = v_key FOR SHARE SKIP LOCKED;
            IF NOT FOUND THEN
                IF EXISTS (SELECT 1 FROM {runs} x WHERE x.run_key = v_key) THEN
                    v_busy := v_busy || v_key;
                    CONTINUE;
                END IF;
                -- The further runs without a row in the next call.
                EXIT expired_items WHEN v_locks >= 64;
                IF NOT pg_try_advisory_xact_lock(26212, hashtext(v_key)) THEN
                    v_busy := v_busy || v_key;
                    CONTINUE;
                END IF;
                v_locks := v_locks + 1;
            END IF;
            WITH gone AS (
                DELETE FROM {items} i
                 WHERE i.run_key = v_key
                   AND i.key = ANY (ARRAY(SELECT c.key FROM unnest(v_runs, v_keys) c(run_key, key)
                                           WHERE c.run_key = v_key))
                   AND i.expires_at IS NOT NULL AND i.expires_at <= p_now
                   AND NOT EXISTS (SELECT 1 FROM {refs} f
                                    WHERE f.run_key = v_key AND f.key = i.key)
                RETURNING 1)
            SELECT count(*) INTO v_count FROM gone;
            IF v_count = 0 THEN
                v_busy := v_busy || v_key;  -- named by an append that committed meanwhile
            END IF;
            v_budget := v_budget - v_count::integer;
        END LOOP;
    END LOOP;
"""),
    ("""                         WHERE e.expires_at IS NOT NULL AND e.expires_at <= p_now
                           AND NOT EXISTS (SELECT 1 FROM {refs} f""",
     """                         WHERE e.expires_at IS NOT NULL AND e.expires_at <= p_now
                           AND NOT (e.run_key = ANY (v_busy))
                           AND NOT EXISTS (SELECT 1 FROM {refs} f"""),
)

_APPEND_V13 = _patched(
    _APPEND_V10,
    ("""        ELSE
            INSERT INTO {runs} AS x (run_key, run_id, incarnation, status, created_at,""",
     f"""        ELSE
            -- Ordered with a delete_items of the run that found no row (migration 13).
            PERFORM {_RUN_KEY_LOCK};
            INSERT INTO {{runs}} AS x (run_key, run_id, incarnation, status, created_at,"""),
)

# read_with_items: when the items found miss a key the checkpoint names (counted by the first
# part of the read, which tests each item against the refs anyway), the keys among them whose
# item row is missing with no removal recorded come back with a NULL value: damage the store
# reports. A read that finds every named item skips that part (a one-time filter). A new
# function beside the one of migration 1 (one more argument, p_check_missing, so another
# object): processes of the release before keep calling theirs, which never sends a NULL value
# they could not take, until they are rolled out.
_READ_WITH_ITEMS_V13 = _patched(
    _patched(_reads_v10(_READ_WITH_ITEMS_V7, "read_with_items"),
             ("CREATE OR REPLACE FUNCTION {read_with_items}(p_run_key text, p_sequence bigint,\n"
              "                                             p_now double precision)",
              "CREATE FUNCTION {read_with_items}(p_run_key text, p_sequence bigint,\n"
              "                                  p_now double precision, "
              "p_check_missing boolean)")),
    ("""               SELECT array_agg(w.key), array_agg(w.value) FROM (
                   SELECT i.key, i.value FROM {items} i""",
     """               SELECT array_agg(w.key), array_agg(w.value), count(*) FILTER (WHERE w.named)
                 FROM (
                   SELECT i.key, i.value, i.key = ANY (c.refs) AS named FROM {items} i"""),
    ("                   SELECT r.key, r.value\n",
     "                   SELECT r.key, r.value, false\n"),
    ("""                          OFFSET 0) r) w) w(keys, vals)""",
     """                          OFFSET 0) r) w) w(keys, vals, named)
         CROSS JOIN LATERAL (
               SELECT array_agg(f.key), array_agg(NULL::bytea) FROM {refs} f
                WHERE p_check_missing
                  AND w.named < (SELECT count(DISTINCT n.k) FROM unnest(c.refs) n(k))
                  AND f.run_key = p_run_key AND f.key = ANY (c.refs) AND NOT f.removed
                  AND NOT EXISTS (SELECT 1 FROM {items} e
                                   WHERE e.run_key = p_run_key AND e.key = f.key)
               ) d(keys, vals)"""),
    (", w.keys, w.vals\n", ", array_cat(w.keys, d.keys), array_cat(w.vals, d.vals)\n"),
    times=2,  # the read by sequence and the read of the latest
)

# rebuild_run counts the references again: the removals recorded stay recorded, and a key
# counted anew (or by a count of before this migration, which recorded nothing) is taken for a
# removal when its item row is missing, and records none when it is in place.
_REBUILD_RUN_V13 = _patched(
    _REBUILD_RUN_V10,
    ("    v_labels bytea[];\nBEGIN\n",
     "    v_labels bytea[];\n    v_removed bytea[];\n    v_kept bytea[];\nBEGIN\n"),
    ("""    DELETE FROM {refs} f WHERE f.run_key = p_run_key;
    INSERT INTO {refs} (run_key, key, holders)
    SELECT p_run_key, named.key, count(*)
""", """    WITH old AS (
        DELETE FROM {refs} f WHERE f.run_key = p_run_key RETURNING f.key, f.removed
    )
    SELECT array_agg(key) FILTER (WHERE removed), array_agg(key) FILTER (WHERE NOT removed)
      INTO v_removed, v_kept FROM old;
    INSERT INTO {refs} (run_key, key, holders, removed)
    SELECT p_run_key, named.key, count(*),
           named.key = ANY (coalesce(v_removed, '{{}}'))
           OR (NOT named.key = ANY (coalesce(v_kept, '{{}}'))
               AND NOT EXISTS (SELECT 1 FROM {items} i
                                WHERE i.run_key = p_run_key AND i.key = named.key))
"""),
)

# Migration 14: the expired items a held checkpoint names stay (their count row exists), and
# the cleanup read past them in every batch of every cleanup while the checkpoint was held
# (to find what to purge, and again to tell whether it was done). It now marks such an item
# (kept) when it first meets it, under the run's lock, and finds expired items on an index of
# the unmarked ones only, so it never reads a marked item again. A mark stands for "a count
# names this key": every removal of a count whose item may stay clears it, under the run row's
# lock as the marking is ({remove} when the last checkpoint naming a key goes: an owned item
# stays with its owner, an item nested under a key still named stays; the new life of a run in
# {append}; {rebuild_run}, which counts the references again); so the cleanup sees the item
# again once no checkpoint names it. A mark missing (an item written anew at a named key)
# only costs reads, as before; one left behind (a count deleted by hand, or removed by a call
# of the release before that was still running when this migration committed, with the
# function it found) keeps its expired item until the item goes otherwise (with its owner, the
# key it is nested under, the run). The index replaces {p}items_expiry; building it reads the
# table once.
_ITEMS_KEPT_V14 = r"""
ALTER TABLE {items} ADD COLUMN kept boolean;

COMMENT ON COLUMN {items}.kept IS 'fastcheckpoint: true when the cleanup found the item named '
    'by a reference count; cleared when the count goes. Expired items marked so are left out '
    'of the cleanup''s index.';

CREATE INDEX {p}items_purge ON {items} (expires_at)
    WHERE expires_at IS NOT NULL AND kept IS NOT TRUE;

DROP INDEX IF EXISTS {schema}.{p}items_expiry
"""

# Clears the marks of the items at keys whose count went (``v_keys``).
_UNMARK = """
            UPDATE {items} i SET kept = NULL
             WHERE i.run_key = p_run_key AND i.key = ANY (<keys>) AND i.kept;"""

_REMOVE_V14 = _patched(
    _REMOVE_V13,
    ("""                                     WHERE get_byte(i.key, c.n - 1) = 47));
        END IF;
    END IF;
""", """                                     WHERE get_byte(i.key, c.n - 1) = 47));"""
     + _UNMARK.replace("<keys>", "v_zeroed").replace("\n            ", "\n            ")
     + """
        END IF;
    END IF;
"""),
)

_APPEND_V14 = _patched(
    _APPEND_V13,
    ("""                   AND i.key < n.k || '0'::bytea;
            END IF;
""", """                   AND i.key < n.k || '0'::bytea;"""
     + _UNMARK.replace("<keys>", "v_released").replace("\n            ", "\n                ")
     + """
            END IF;
"""),
)

_REBUILD_RUN_V14 = _patched(
    _REBUILD_RUN_V13,
    ("""     GROUP BY named.key;
""", """     GROUP BY named.key;
    -- The marks of the items whose count went (migration 14).
    UPDATE {items} i SET kept = NULL
     WHERE i.run_key = p_run_key AND i.kept
       AND NOT EXISTS (SELECT 1 FROM {refs} f WHERE f.run_key = p_run_key AND f.key = i.key);
"""),
)

# Migration 15: a count lowered or deleted by hand (while checkpoints name its key) let the
# pruning of a create that names the key too take it to zero, and {remove} freed the item the
# acknowledged checkpoint names: it read back without it, with no error (no removal recorded).
# A count that falls to zero for a key the run's newest checkpoint names (the one a create just
# wrote, which its pruning never takes) contradicts the log: the run's counts are taken again
# from the refs of the checkpoints it holds, and only the keys no checkpoint names are freed.
# One more probe, of the newest checkpoint's primary key, when a count falls to zero (and of
# {refs}' primary key for a zeroed key nested under one the newest checkpoint names); the
# recount (one read of the run's checkpoints) only when the counts are wrong.
_REMOVE_V15 = _patched(
    _REMOVE_V14,
    ("""        SELECT array_agg(key) FILTER (WHERE holders <= 0) INTO v_zeroed FROM counted;
""", """        SELECT array_agg(key) FILTER (WHERE holders <= 0) INTO v_zeroed FROM counted;
        -- The newest checkpoint names a zeroed key, or a key it is nested under (its item is
        -- read with that key) whose count is missing (deleted by hand: nothing above the
        -- zeroed key holds its item then). A count in place for that key holds it: no recount.
        IF v_zeroed IS NOT NULL AND EXISTS (
               SELECT 1 FROM (SELECT c.refs FROM {checkpoints} c WHERE c.run_key = p_run_key
                               ORDER BY c.sequence DESC LIMIT 1) newest
                WHERE newest.refs && v_zeroed
                   OR EXISTS (
                          SELECT 1 FROM unnest(v_zeroed) z(k),
                                        generate_series(1, length(z.k)) s(n)
                           WHERE get_byte(z.k, s.n - 1) = 47
                             AND substring(z.k FROM 1 FOR s.n - 1) = ANY (newest.refs)
                             AND NOT EXISTS (
                                     SELECT 1 FROM {refs} f
                                      WHERE f.run_key = p_run_key
                                        AND f.key = substring(z.k FROM 1 FOR s.n - 1)))) THEN
            WITH named AS (
                SELECT u.k AS key, count(*) AS holders
                  FROM {checkpoints} c, LATERAL (SELECT DISTINCT unnest(c.refs)) u(k)
                 WHERE c.run_key = p_run_key AND u.k IS NOT NULL
                 GROUP BY u.k
            ), unnamed AS (
                DELETE FROM {refs} f
                 WHERE f.run_key = p_run_key
                   AND NOT EXISTS (SELECT 1 FROM named WHERE named.key = f.key)
                RETURNING f.key
            ), unmarked AS (
                -- Their items may stay (loose items): the cleanup sees them again.
                UPDATE {items} i SET kept = NULL
                  FROM unnamed u
                 WHERE i.run_key = p_run_key AND i.key = u.key AND i.kept
            )
            INSERT INTO {refs} AS f (run_key, key, holders)
            SELECT p_run_key, named.key, named.holders FROM named
            ON CONFLICT (run_key, key) DO UPDATE SET holders = excluded.holders;
            v_zeroed := ARRAY(SELECT z.k FROM unnest(v_zeroed) z(k)
                               WHERE NOT EXISTS (SELECT 1 FROM {refs} f
                                                  WHERE f.run_key = p_run_key AND f.key = z.k));
            IF cardinality(v_zeroed) = 0 THEN
                v_zeroed := NULL;
            END IF;
        END IF;
"""),
)

# rebuild_run takes the run's label rows (when the seed has no labels) that are UTF-8 only: one
# edited to other bytes made it commit a row holding that label, which the store then could not
# read (the call raised after it had changed the row, and the row was still damaged). And it
# counts no NULL ref.
_REBUILD_RUN_V15 = _patched(
    _REBUILD_RUN_V14,
    ("""                           WHERE l.run_key = p_run_key ORDER BY l.label);
""", """                           WHERE l.run_key = p_run_key
                             AND encode(l.label, 'hex') ~ '<utf8>' ORDER BY l.label);
""".replace("<utf8>", UTF8_HEX)),
    # A NULL among a checkpoint's refs (written by hand) is no key: counted, it failed the
    # rebuild on the count table's NOT NULL, so no repair could fix the run.
    ("""     WHERE c.run_key = p_run_key
     GROUP BY named.key;
""", """     WHERE c.run_key = p_run_key AND named.key IS NOT NULL
     GROUP BY named.key;
"""),
)

# {purge}: the expired items not marked, oldest first, on {p}items_purge (named or not: the
# count is judged under the run's lock); in each run it takes, one statement removes those no
# count names and marks those one does. Marks count against the batch's budget like removals.
_PURGE_V14 = _patched(
    _PURGE_V13,
    ("    v_keys bytea[];\n", "    v_keys bytea[];\n    v_run_items bytea[];\n"
     "    v_marked bigint;\n"),
    ("""            SELECT e.run_key, e.key FROM {items} e
             WHERE e.expires_at IS NOT NULL AND e.expires_at <= p_now
               AND NOT (e.run_key = ANY (v_busy))
               AND NOT EXISTS (SELECT 1 FROM {refs} f
                                WHERE f.run_key = e.run_key AND f.key = e.key)
             LIMIT v_budget) e;""",
     """            SELECT e.run_key, e.key FROM {items} e
             WHERE e.expires_at IS NOT NULL AND e.expires_at <= p_now
               AND e.kept IS NOT TRUE
               AND NOT (e.run_key = ANY (v_busy))
             ORDER BY e.expires_at LIMIT v_budget) e;"""),
    ("""            WITH gone AS (
                DELETE FROM {items} i
                 WHERE i.run_key = v_key
                   AND i.key = ANY (ARRAY(SELECT c.key FROM unnest(v_runs, v_keys) c(run_key, key)
                                           WHERE c.run_key = v_key))
                   AND i.expires_at IS NOT NULL AND i.expires_at <= p_now
                   AND NOT EXISTS (SELECT 1 FROM {refs} f
                                    WHERE f.run_key = v_key AND f.key = i.key)
                RETURNING 1)
            SELECT count(*) INTO v_count FROM gone;
            IF v_count = 0 THEN
                v_busy := v_busy || v_key;  -- named by an append that committed meanwhile
            END IF;
            v_budget := v_budget - v_count::integer;""",
     """            v_run_items := ARRAY(SELECT c.key FROM unnest(v_runs, v_keys) c(run_key, key)
                                  WHERE c.run_key = v_key);
            WITH gone AS (
                DELETE FROM {items} i
                 WHERE i.run_key = v_key AND i.key = ANY (v_run_items)
                   AND i.expires_at IS NOT NULL AND i.expires_at <= p_now
                   AND NOT EXISTS (SELECT 1 FROM {refs} f
                                    WHERE f.run_key = v_key AND f.key = i.key)
                RETURNING 1
            ), marked AS (
                UPDATE {items} i SET kept = true
                 WHERE i.run_key = v_key AND i.key = ANY (v_run_items)
                   AND i.kept IS NOT TRUE
                   AND EXISTS (SELECT 1 FROM {refs} f WHERE f.run_key = v_key AND f.key = i.key)
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM marked)
              INTO v_count, v_marked;
            IF v_count + v_marked = 0 THEN
                v_busy := v_busy || v_key;  -- gone, or written again, meanwhile
            END IF;
            v_budget := v_budget - (v_count + v_marked)::integer;"""),
    # Done: no expired item left unmarked outside the runs left busy, found on the index in
    # its order (an EXISTS would drop the ORDER BY, and the planner may then read the table
    # for a first match it expects soon).
    ("""        AND NOT EXISTS (SELECT 1 FROM {items} e
                         WHERE e.expires_at IS NOT NULL AND e.expires_at <= p_now
                           AND NOT (e.run_key = ANY (v_busy))
                           AND NOT EXISTS (SELECT 1 FROM {refs} f
                                            WHERE f.run_key = e.run_key AND f.key = e.key));""",
     """        AND (SELECT e.expires_at FROM {items} e
              WHERE e.expires_at IS NOT NULL AND e.expires_at <= p_now
                AND e.kept IS NOT TRUE AND NOT (e.run_key = ANY (v_busy))
              ORDER BY e.expires_at LIMIT 1) IS NULL;"""),
)

MIGRATIONS = (
    Migration(
        1,
        "runs, checkpoints, items, shared-item references, labels, delete memos and the "
        "store's functions",
        ";\n\n".join([
            _TABLES_V1.strip(), _DAMAGE_V1.strip(), _REMOVE_V1.strip(), _APPEND_V1.strip(),
            _DELETES_V1.strip(),
            _UPDATE_RUN_V1.strip(), _ITEMS_V1.strip(), _PURGE_V1.strip(),
            _READS_V1.strip(), _REPAIR_V1.strip(),
        ]),
    ),
    Migration(
        2,
        "append refuses refs naming items the run does not hold",
        _APPEND_V2.strip(),
    ),
    Migration(
        3,
        "items nested under a shared item are read and removed with it",
        ";\n\n".join([_REMOVE_V3.strip(), _APPEND_V3.strip(), _READ_WITH_ITEMS_V3.strip()]),
    ),
    Migration(
        4,
        "a retry whose first try is still running waits for it",
        _TOKEN_LOCKED_V4.strip(),
    ),
    Migration(
        5,
        "items nested under a key go with the last checkpoint naming it, whoever holds its "
        "item",
        ";\n\n".join([_REMOVE_V5.strip(), _APPEND_V5.strip()]),
    ),
    Migration(
        6,
        "a run update can require the run's newest checkpoint to be the one the caller saw",
        _UPDATE_RUN_V6.strip(),
    ),
    Migration(
        7,
        "an item a checkpoint names or owns stays when a key it is nested under is released",
        ";\n\n".join([_REMOVE_V7.strip(), _READ_WITH_ITEMS_V7.strip()]),
    ),
    Migration(
        8,
        "a create sent again after a lost reply is acknowledged also when its checkpoint went "
        "meanwhile; pruning never takes the new checkpoint; damaged_runs reports NULL labels",
        ";\n\n".join([_APPEND_V8.strip(), _DAMAGED_RUNS_V8.strip()]),
    ),
    Migration(
        9,
        "pruning never takes one of the newest checkpoints a run holds, also after a run row "
        "was put back from before a delete",
        _APPEND_V9.strip(),
    ),
    Migration(
        10,
        "damage is judged by a run's own checkpoints and run id: a checkpoint of another run "
        "swapped in no longer blocks its run, a run row copied from another run is refused and "
        "rebuilt; damaged_runs reports times, sequences and versions out of range",
        ";\n\n".join([_DAMAGE_V10.strip(), _READS_V10.strip(), _APPEND_V10.strip(),
                       _DAMAGED_RUNS_V10.strip(), _REBUILD_RUN_V10.strip()]),
    ),
    Migration(
        11,
        "a call's first try delivered late, after its retry, is a no-op: delete_run and "
        "delete_items remember their result also when they removed nothing, put_items every "
        "write",
        ";\n\n".join([_DELETE_RUN_V11.strip(), _DELETE_ITEMS_V11.strip(),
                       _PUT_ITEMS_V11.strip()]),
    ),
    Migration(
        12,
        "an owned-item upsert's first try delivered late, after its retry, is a no-op",
        _PUT_OWNED_ITEMS_V12.strip(),
    ),
    Migration(
        13,
        "the store records its removals of items a checkpoint names; a read naming an item "
        "whose row is missing with no removal recorded reports damage",
        ";\n\n".join([_REFS_V13.strip(), _REMOVE_V13.strip(), _DELETE_ITEMS_V13.strip(),
                       _APPEND_V13.strip(), _READ_WITH_ITEMS_V13.strip(),
                       _REBUILD_RUN_V13.strip(), _DELETE_RUN_V13.strip(),
                       _PURGE_V13.strip()]),
    ),
    Migration(
        14,
        "the cleanup marks the expired items a checkpoint names when it first meets them and "
        "reads them no more until no checkpoint names them",
        ";\n\n".join([_ITEMS_KEPT_V14.strip(), _REMOVE_V14.strip(), _APPEND_V14.strip(),
                       _REBUILD_RUN_V14.strip(), _PURGE_V14.strip()]),
    ),
    Migration(
        15,
        "a count that falls to zero for a key the run's newest checkpoint names, or nests "
        "under one of them whose count is missing (lowered or deleted by hand), is taken again "
        "from the log, so the item stays; a rebuild leaves out label rows that are not UTF-8 "
        "and NULL refs",
        ";\n\n".join([_REMOVE_V15.strip(), _REBUILD_RUN_V15.strip()]),
    ),
)
"""Every schema version, oldest first. A released migration is never edited: changes come
as a new one."""


class Statements:
    """The statements the store sends: one call of a store function each, rendered for one
    schema and prefix (``$n`` parameters in the function's order)."""

    def __init__(self, names: Names) -> None:
        def call(function: str, arguments: int, columns: str = "*") -> str:
            placeholders = ", ".join(f"${n}" for n in range(1, arguments + 1))
            return names.render(f"SELECT {columns} FROM {{{function}}}({placeholders})")

        self.append = call("append", 22)
        self.get = call("get", 3)
        self.latest = call("latest", 2)
        self.read_with_items = call("read_with_items", 4)
        self.headers = call("headers", 5)
        self.delete = call("delete", 4)
        self.delete_run = call("delete_run", 2)
        self.get_run = call("get_run", 2, RUN_COLUMNS)
        self.update_run = call("update_run", 8, "outcome, " + ", ".join(
            f"(run).{column}" for column in RUN_COLUMNS.split(", ")))
        self.list_runs = call("list_runs", 5, RUN_COLUMNS)
        self.count_runs = call("count_runs", 2)
        self.runs_with_label = call("runs_with_label", 5, RUN_COLUMNS)
        self.put_items = call("put_items", 8)
        self.put_owned_items = call("put_owned_items", 8)
        self.get_items = call("get_items", 3)
        self.scan_items = call("scan_items", 6)
        self.delete_items = call("delete_items", 3)
        self.purge = call("purge", 2)
        # With the row's run id: whether it is the run's is a hash the store checks.
        self.damaged_runs = names.render(
            "SELECT d.*, x.run_id FROM {damaged_runs}($1, $2, $3) d\n"
            " LEFT JOIN {runs} x ON x.run_key = d.run_key ORDER BY d.run_key")
        self.rebuild_run = call("rebuild_run", 6, "outcome, " + ", ".join(
            f"(run).{column}" for column in RUN_COLUMNS.split(", ")))
        problem = names.render(
            "{damage}(run_key, run_id, incarnation, latest_sequence, checkpoint_count, "
            "expires_at)")
        # Run reads with one more column: why the row cannot be used (NULL when it can) for
        # one run, whether it is damaged for a page of runs.
        self.get_run = call("get_run", 2, f"{RUN_COLUMNS}, {problem}")
        columns = ", ".join(f"x.{column}" for column in RUN_COLUMNS.split(", "))
        damaged = names.render(f"{columns}, {_INTACT_STATUS} IS NULL")
        newest_first = names.render(f" x{_HEAD_V10}\n ORDER BY x.created_at DESC, x.run_key DESC")
        self.list_runs = call("list_runs", 5, damaged) + newest_first
        self.runs_with_label = call("runs_with_label", 5, damaged) + newest_first


RUN_COLUMNS = ("run_id, incarnation, status, created_at, updated_at, latest_sequence, "
               "checkpoint_count, expires_at, version, data, labels, run_key")
"""The run columns every run read returns, in this order."""
