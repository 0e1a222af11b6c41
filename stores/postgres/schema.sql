-- fastcheckpoint PostgreSQL store: every table, index and function at schema version 15.
-- Generated from the code (a test keeps it equal); `fastcheckpoint init URL` applies the same.
-- Run it as the role that will own the tables: psql -v ON_ERROR_STOP=1 -f schema.sql

BEGIN;

CREATE SCHEMA IF NOT EXISTS "public";

CREATE TABLE "public"."fc_migrations" (
    version integer PRIMARY KEY,
    description text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE "public"."fc_runs" (
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

COMMENT ON TABLE "public"."fc_runs" IS 'fastcheckpoint runs. expires_at: latest expiry of the checkpoints '
    'held (NULL: one never expires; 0: none held). purge_at: set when none is held.';

CREATE INDEX fc_runs_created ON "public"."fc_runs" (created_at, run_key);

CREATE INDEX fc_runs_status ON "public"."fc_runs" (status, created_at, run_key);

CREATE INDEX fc_runs_purge ON "public"."fc_runs" (purge_at) WHERE purge_at IS NOT NULL;

CREATE TABLE "public"."fc_checkpoints" (
    run_key text COLLATE "C" NOT NULL REFERENCES "public"."fc_runs" (run_key) ON DELETE CASCADE,
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

CREATE INDEX fc_checkpoints_run_expiry ON "public"."fc_checkpoints" (run_key, expires_at)
    WHERE expires_at IS NOT NULL;

CREATE INDEX fc_checkpoints_expiry ON "public"."fc_checkpoints" (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE "public"."fc_items" (
    run_key text COLLATE "C" NOT NULL,
    key bytea NOT NULL,
    value bytea NOT NULL,
    owner bigint,
    expires_at double precision,
    PRIMARY KEY (run_key, key)
);

CREATE INDEX fc_items_owner ON "public"."fc_items" (run_key, owner) WHERE owner IS NOT NULL;

CREATE INDEX fc_items_expiry ON "public"."fc_items" (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE "public"."fc_refs" (
    run_key text COLLATE "C" NOT NULL,
    key bytea NOT NULL,
    holders bigint NOT NULL,
    PRIMARY KEY (run_key, key)
);

CREATE TABLE "public"."fc_labels" (
    label bytea NOT NULL,
    created_at double precision NOT NULL,
    run_key text COLLATE "C" NOT NULL REFERENCES "public"."fc_runs" (run_key) ON DELETE CASCADE,
    PRIMARY KEY (label, created_at, run_key)
);

CREATE INDEX fc_labels_run ON "public"."fc_labels" (run_key);

CREATE TABLE "public"."fc_ops" (
    token text PRIMARY KEY,
    result bigint NOT NULL,
    expires_at double precision NOT NULL
);

CREATE INDEX fc_ops_expiry ON "public"."fc_ops" (expires_at);

-- lz4 where the server has it (PostgreSQL 14+ built with lz4): several times faster than the
-- default pglz for the payloads of agent states.
DO $lz4$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_settings
                WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        ALTER TABLE "public"."fc_checkpoints" ALTER COLUMN payload SET COMPRESSION lz4,
                                  ALTER COLUMN header SET COMPRESSION lz4;
        ALTER TABLE "public"."fc_items" ALTER COLUMN value SET COMPRESSION lz4;
    END IF;
END
$lz4$;

CREATE FUNCTION "public"."fc_damage"(p_run_key text, p_run_id bytea, p_incarnation text, p_latest bigint,
                         p_held bigint, p_expires_at double precision)
RETURNS text LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
DECLARE
    v_sequence bigint;
    v_id text;
    v_expires_at double precision;
BEGIN
    IF encode(p_run_id, 'hex') !~ '^([0-7][0-9a-f]|c[2-9a-f][89ab][0-9a-f]|d[0-9a-f][89ab][0-9a-f]|e0[ab][0-9a-f][89ab][0-9a-f]|e[1-9a-cef][89ab][0-9a-f][89ab][0-9a-f]|ed[89][0-9a-f][89ab][0-9a-f]|f0[9ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f[1-3][89ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f48[0-9a-f][89ab][0-9a-f][89ab][0-9a-f])*$' THEN
        RETURN 'holds a run id that is not UTF-8 text';
    END IF;
    SELECT n.sequence, n.checkpoint_id, n.expires_at INTO v_sequence, v_id, v_expires_at
      FROM "public"."fc_checkpoints" n WHERE n.run_key = p_run_key ORDER BY n.sequence DESC LIMIT 1;
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
$fn$;

CREATE FUNCTION "public"."fc_remove"(p_run_key text, p_sequences bigint[], p_count_run boolean)
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
        DELETE FROM "public"."fc_checkpoints"
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
    DELETE FROM "public"."fc_items" WHERE run_key = p_run_key AND owner = ANY (v_gone);
    IF v_refs IS NOT NULL THEN
        WITH released AS (
            SELECT ref, count(*) AS times FROM unnest(v_refs) ref GROUP BY ref
        ), counted AS (
            UPDATE "public"."fc_refs" r SET holders = r.holders - released.times
              FROM released
             WHERE r.run_key = p_run_key AND r.key = released.ref
            RETURNING r.key, r.holders
        )
        SELECT array_agg(key) FILTER (WHERE holders <= 0) INTO v_zeroed FROM counted;
        IF v_zeroed IS NOT NULL THEN
            DELETE FROM "public"."fc_refs" WHERE run_key = p_run_key AND key = ANY (v_zeroed);
            DELETE FROM "public"."fc_items"
             WHERE run_key = p_run_key AND key = ANY (v_zeroed) AND owner IS NULL;
        END IF;
    END IF;
    IF NOT p_count_run THEN
        RETURN cardinality(v_gone);
    END IF;
    UPDATE "public"."fc_runs" r
       SET checkpoint_count = r.checkpoint_count - cardinality(v_gone),
           forever_count = r.forever_count - v_forever,
           expires_at = CASE
               WHEN r.checkpoint_count = cardinality(v_gone) THEN 0
               WHEN r.forever_count > v_forever THEN NULL
               ELSE (SELECT max(c.expires_at) FROM "public"."fc_checkpoints" c
                      WHERE c.run_key = p_run_key AND c.expires_at IS NOT NULL)
           END,
           purge_at = CASE WHEN r.checkpoint_count = cardinality(v_gone) THEN 0 END
     WHERE r.run_key = p_run_key;
    RETURN cardinality(v_gone);
END
$fn$;

CREATE FUNCTION "public"."fc_append"(
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
    r "public"."fc_runs"%ROWTYPE;
    v_drop bigint[];
    v_live bigint;
    v_next boolean;
    v_found boolean;
    v_problem text;
BEGIN
    -- The compare-and-set: only the next sequence of the live run of this incarnation.
    UPDATE "public"."fc_runs" AS x
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
        v_problem := "public"."fc_damage"(p_run_key, r.run_id, r.incarnation, p_sequence - 1,
                              r.checkpoint_count - 1, r.expires_at);
    ELSE
        SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
        v_found := FOUND;
        IF v_found THEN
            -- Judged in one statement: the row and the log of one snapshot (another writer
            -- may have committed since the row above was read).
            SELECT "public"."fc_damage"(x.run_key, x.run_id, x.incarnation, x.latest_sequence,
                            x.checkpoint_count, x.expires_at)
              INTO v_problem FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
        END IF;
        IF v_found AND (r.expires_at IS NULL OR r.expires_at > p_now
                        OR v_problem IS NOT NULL) THEN
            -- A live run: this call may be the retry of one whose reply was lost.
            PERFORM 1 FROM "public"."fc_checkpoints" c
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
            UPDATE "public"."fc_runs" AS x
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
                SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
                outcome := 'conflict';
                IF FOUND AND (r.expires_at IS NULL OR r.expires_at > p_now) THEN
                    latest_sequence := r.latest_sequence; incarnation := r.incarnation;
                END IF;
                RETURN;
            END IF;
            -- Leftovers of the old run: checkpoints with their owned items, the shared
            -- items they named, its labels. Unowned items stay.
            WITH gone AS (
                DELETE FROM "public"."fc_checkpoints" c WHERE c.run_key = p_run_key RETURNING c.sequence
            )
            DELETE FROM "public"."fc_items" i
             WHERE i.run_key = p_run_key AND i.owner IN (SELECT sequence FROM gone);
            WITH released AS (DELETE FROM "public"."fc_refs" f WHERE f.run_key = p_run_key RETURNING f.key)
            DELETE FROM "public"."fc_items" i
             WHERE i.run_key = p_run_key AND i.owner IS NULL
               AND i.key IN (SELECT key FROM released);
            DELETE FROM "public"."fc_labels" l WHERE l.run_key = p_run_key;
        ELSE
            INSERT INTO "public"."fc_runs" AS x (run_key, run_id, incarnation, status, created_at,
                                     updated_at, latest_sequence, checkpoint_count,
                                     forever_count, expires_at, version, data, labels)
            VALUES (p_run_key, p_run_id, p_incarnation, p_status, p_run_created_at, p_now, 0,
                    1, (p_expires_at IS NULL)::int, p_expires_at, p_version, p_data, p_labels)
            ON CONFLICT (run_key) DO NOTHING
            RETURNING x.* INTO r;
            IF NOT FOUND THEN
                -- Another writer created the run first (its transaction has committed).
                SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
                outcome := 'conflict';
                IF FOUND AND (r.expires_at IS NULL OR r.expires_at > p_now) THEN
                    latest_sequence := r.latest_sequence; incarnation := r.incarnation;
                END IF;
                RETURN;
            END IF;
        END IF;
        IF cardinality(p_labels) > 0 THEN
            INSERT INTO "public"."fc_labels" (label, created_at, run_key)
            SELECT DISTINCT label, p_run_created_at, p_run_key FROM unnest(p_labels) label;
        END IF;
    END IF;

    INSERT INTO "public"."fc_checkpoints" (run_key, sequence, checkpoint_id, created_at, expires_at,
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
        INSERT INTO "public"."fc_items" AS i (run_key, key, value, owner, expires_at)
        SELECT p_run_key, k, v, o, e
          FROM unnest(p_item_keys, p_item_values, p_item_owners, p_item_expiries) AS t(k, v, o, e)
        ON CONFLICT (run_key, key) DO UPDATE
           SET value = excluded.value, owner = excluded.owner, expires_at = excluded.expires_at
         WHERE i.expires_at IS NOT NULL AND i.expires_at <= p_now;
    END IF;
    IF p_refs IS NOT NULL AND cardinality(p_refs) > 0 THEN
        INSERT INTO "public"."fc_refs" AS f (run_key, key, holders)
        SELECT DISTINCT p_run_key, k, 1 FROM unnest(p_refs) k
        ON CONFLICT (run_key, key) DO UPDATE SET holders = f.holders + 1;
    END IF;

    -- Pruning: expired checkpoints, then the oldest beyond keep_latest.
    v_live := r.checkpoint_count;
    IF r.checkpoint_count > r.forever_count THEN
        v_drop := ARRAY(SELECT c.sequence FROM "public"."fc_checkpoints" c
                         WHERE c.run_key = p_run_key AND c.expires_at <= p_now);
        v_live := v_live - cardinality(v_drop);
    END IF;
    IF p_keep_latest IS NOT NULL AND v_live > p_keep_latest THEN
        v_drop := coalesce(v_drop, '{}') || ARRAY(
            SELECT c.sequence FROM "public"."fc_checkpoints" c
             WHERE c.run_key = p_run_key
               AND (c.expires_at IS NULL OR c.expires_at > p_now)
             ORDER BY c.sequence LIMIT v_live - p_keep_latest);
    END IF;
    IF cardinality(v_drop) > 0 THEN
        PERFORM "public"."fc_remove"(p_run_key, v_drop, true);
    END IF;
    outcome := 'ok'; status := r.status;
END
$fn$;

CREATE FUNCTION "public"."fc_delete"(p_run_key text, p_sequence bigint, p_checkpoint_id text,
                         p_token text)
RETURNS bigint LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_result bigint;
    v_problem text;
    v_server_now double precision := extract(epoch FROM clock_timestamp());
BEGIN
    SELECT o.result INTO v_result FROM "public"."fc_ops" o WHERE o.token = p_token;
    IF FOUND THEN
        RETURN v_result;
    END IF;
    PERFORM 1 FROM "public"."fc_runs" r WHERE r.run_key = p_run_key FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    -- After the lock, in a statement of its own: the row and the log as the last writer left
    -- them (a locking read may return a row newer than its own snapshot).
    SELECT "public"."fc_damage"(p_run_key, r.run_id, r.incarnation, r.latest_sequence,
                    r.checkpoint_count, r.expires_at)
      INTO v_problem FROM "public"."fc_runs" r WHERE r.run_key = p_run_key;
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'FC003', DETAIL = p_run_key,
            MESSAGE = format('the run row of run key %s %s', p_run_key,
                             v_problem);
    END IF;
    PERFORM 1 FROM "public"."fc_checkpoints" c
     WHERE c.run_key = p_run_key AND c.sequence = p_sequence
       AND c.checkpoint_id = p_checkpoint_id;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    v_result := "public"."fc_remove"(p_run_key, ARRAY[p_sequence], true);
    INSERT INTO "public"."fc_ops" (token, result, expires_at) VALUES (p_token, v_result, v_server_now + 300);
    RETURN v_result;
END
$fn$;

CREATE FUNCTION "public"."fc_delete_run"(p_run_key text, p_token text)
RETURNS bigint LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_result bigint;
BEGIN
    SELECT o.result INTO v_result FROM "public"."fc_ops" o WHERE o.token = p_token;
    IF FOUND THEN
        RETURN v_result;
    END IF;
    -- The row first (its checkpoints and labels follow by cascade), then the run's items.
    DELETE FROM "public"."fc_runs" r WHERE r.run_key = p_run_key RETURNING r.checkpoint_count INTO v_result;
    DELETE FROM "public"."fc_refs" f WHERE f.run_key = p_run_key;
    DELETE FROM "public"."fc_items" i WHERE i.run_key = p_run_key;
    IF v_result IS NULL THEN
        RETURN 0;
    END IF;
    INSERT INTO "public"."fc_ops" (token, result, expires_at)
    VALUES (p_token, v_result, extract(epoch FROM clock_timestamp()) + 300);
    RETURN v_result;
END
$fn$;

CREATE FUNCTION "public"."fc_update_run"(p_run_key text, p_incarnation text, p_version bigint,
                             p_status text, p_data bytea, p_now double precision,
                             p_token text)
RETURNS TABLE (outcome text, run "public"."fc_runs") LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    r "public"."fc_runs"%ROWTYPE;
    v_updated boolean;
    v_problem text;
BEGIN
    UPDATE "public"."fc_runs" AS x
       SET status = p_status, data = p_data, version = x.version + 1, updated_at = p_now,
           update_token = p_token
     WHERE x.run_key = p_run_key AND x.incarnation = p_incarnation AND x.version = p_version
       AND (x.expires_at IS NULL OR x.expires_at > p_now)
    RETURNING x.* INTO r;
    v_updated := FOUND;
    -- The row and the log judged in one statement (one snapshot).
    SELECT "public"."fc_damage"(x.run_key, x.run_id, x.incarnation, x.latest_sequence,
                    x.checkpoint_count, x.expires_at)
      INTO v_problem FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
    IF v_problem IS NOT NULL THEN
        -- Undoes the update: a damaged row takes no status change until repaired.
        RAISE EXCEPTION USING ERRCODE = 'FC003', DETAIL = p_run_key,
            MESSAGE = format('the run row of run key %s %s', p_run_key,
                             v_problem);
    END IF;
    IF NOT v_updated THEN
        SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
    END IF;
    IF v_updated THEN
        RETURN QUERY SELECT 'ok'::text, r;
        RETURN;
    END IF;
    IF r.run_key IS NULL OR NOT (r.expires_at IS NULL OR r.expires_at > p_now) THEN
        RETURN QUERY SELECT 'missing'::text, NULL::"public"."fc_runs";
    ELSIF r.incarnation = p_incarnation AND r.version = p_version + 1
          AND r.update_token = p_token THEN
        RETURN QUERY SELECT 'ok'::text, r;
    ELSE
        RETURN QUERY SELECT 'conflict'::text, r;
    END IF;
END
$fn$;

CREATE FUNCTION "public"."fc_put_items"(p_run_key text, p_keys bytea[], p_values bytea[],
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
        PERFORM 1 FROM "public"."fc_ops" o WHERE o.token = p_token;
        IF FOUND THEN
            RETURN;
        END IF;
    END IF;
    INSERT INTO "public"."fc_items" AS i (run_key, key, value, owner, expires_at)
    SELECT p_run_key, k, v, o, e
      FROM unnest(p_keys, p_values, p_owners, p_expiries) AS t(k, v, o, e)
    ON CONFLICT (run_key, key) DO UPDATE
       SET value = excluded.value, owner = excluded.owner, expires_at = excluded.expires_at
     WHERE NOT p_create_only OR (i.expires_at IS NOT NULL AND i.expires_at <= p_now);
    GET DIAGNOSTICS v_written = ROW_COUNT;
    IF v_written < cardinality(p_keys) THEN
        -- create_only met a live item: the exception undoes the whole batch.
        SELECT i.key INTO v_taken FROM "public"."fc_items" i
         WHERE i.run_key = p_run_key AND i.key = ANY (p_keys)
           AND (i.expires_at IS NULL OR i.expires_at > p_now)
         ORDER BY i.key LIMIT 1;
        RAISE EXCEPTION USING ERRCODE = 'FC002', MESSAGE = coalesce(encode(v_taken, 'hex'), '');
    END IF;
    IF p_create_only THEN
        INSERT INTO "public"."fc_ops" (token, result, expires_at)
        VALUES (p_token, v_written, extract(epoch FROM clock_timestamp()) + 300);
    END IF;
END
$fn$;

CREATE FUNCTION "public"."fc_put_owned_items"(p_run_key text, p_owner bigint, p_checkpoint_id text,
                                  p_keys bytea[], p_values bytea[], p_if_absent boolean,
                                  p_now double precision)
RETURNS boolean LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_expires_at double precision;
BEGIN
    -- Key share on the checkpoint: a concurrent removal waits for this write, and a
    -- removal that came first leaves nothing to find.
    SELECT c.expires_at INTO v_expires_at FROM "public"."fc_checkpoints" c
     WHERE c.run_key = p_run_key AND c.sequence = p_owner
       AND c.checkpoint_id = p_checkpoint_id
       AND (c.expires_at IS NULL OR c.expires_at > p_now)
       FOR KEY SHARE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO "public"."fc_items" AS i (run_key, key, value, owner, expires_at)
    SELECT p_run_key, k, v, p_owner, v_expires_at FROM unnest(p_keys, p_values) AS t(k, v)
    ON CONFLICT (run_key, key) DO UPDATE
       SET value = excluded.value, owner = excluded.owner, expires_at = excluded.expires_at
     WHERE NOT p_if_absent OR (i.expires_at IS NOT NULL AND i.expires_at <= p_now);
    RETURN true;
END
$fn$;

CREATE FUNCTION "public"."fc_purge"(p_now double precision, p_limit integer,
                        OUT removed bigint, OUT done boolean)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_budget integer := greatest(p_limit, 1);
    v_server_now double precision := extract(epoch FROM clock_timestamp());
    v_key text;
    v_count bigint;
    r "public"."fc_runs"%ROWTYPE;
BEGIN
    removed := 0;
    FOR v_key IN
        SELECT x.run_key FROM "public"."fc_runs" x WHERE x.purge_at IS NOT NULL AND x.purge_at <= p_now
         ORDER BY x.purge_at LIMIT v_budget
    LOOP
        DELETE FROM "public"."fc_runs" x WHERE x.run_key = v_key AND x.checkpoint_count = 0
           AND NOT EXISTS (SELECT 1 FROM "public"."fc_checkpoints" c WHERE c.run_key = v_key);
        IF FOUND THEN
            DELETE FROM "public"."fc_refs" f WHERE f.run_key = v_key;
            DELETE FROM "public"."fc_items" i WHERE i.run_key = v_key;
        ELSE
            -- A row that says its run is empty over checkpoints in place (put back from an
            -- older copy): never taken for empty, left for repair, out of this loop.
            UPDATE "public"."fc_runs" x SET purge_at = NULL WHERE x.run_key = v_key AND x.purge_at <= p_now;
        END IF;
        v_budget := v_budget - 1;
    END LOOP;
    FOR v_key IN
        SELECT DISTINCT due.run_key FROM (
            SELECT c.run_key FROM "public"."fc_checkpoints" c
             WHERE c.expires_at IS NOT NULL AND c.expires_at <= p_now
             ORDER BY c.expires_at LIMIT greatest(v_budget, 0)) due
    LOOP
        EXIT WHEN v_budget <= 0;
        SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = v_key FOR NO KEY UPDATE;
        CONTINUE WHEN NOT FOUND;
        IF "public"."fc_damage"(v_key, r.run_id, r.incarnation, r.latest_sequence, r.checkpoint_count,
                    r.expires_at) IS NOT NULL THEN
            -- A damaged row: its expired checkpoints go by their own expiry, the row stays
            -- as it is (never taken for the run's expiry) until a repair rebuilds it.
            v_count := "public"."fc_remove"(v_key, ARRAY(
                SELECT c.sequence FROM "public"."fc_checkpoints" c
                 WHERE c.run_key = v_key AND c.expires_at <= p_now
                 ORDER BY c.expires_at LIMIT v_budget), false);
        ELSIF r.expires_at IS NOT NULL AND r.expires_at <= p_now THEN
            -- The whole run expired: everything of it goes.
            WITH gone AS (DELETE FROM "public"."fc_checkpoints" c WHERE c.run_key = v_key RETURNING 1)
            SELECT count(*) INTO v_count FROM gone;
            DELETE FROM "public"."fc_runs" x WHERE x.run_key = v_key;
            DELETE FROM "public"."fc_refs" f WHERE f.run_key = v_key;
            DELETE FROM "public"."fc_items" i WHERE i.run_key = v_key;
        ELSE
            v_count := "public"."fc_remove"(v_key, ARRAY(
                SELECT c.sequence FROM "public"."fc_checkpoints" c
                 WHERE c.run_key = v_key AND c.expires_at <= p_now
                 ORDER BY c.expires_at LIMIT v_budget), true);
        END IF;
        removed := removed + v_count;
        v_budget := v_budget - greatest(v_count, 1)::integer;
    END LOOP;
    IF v_budget > 0 THEN
        WITH gone AS (
            DELETE FROM "public"."fc_items" i
             WHERE (i.run_key, i.key) IN (
                 SELECT e.run_key, e.key FROM "public"."fc_items" e
                  WHERE e.expires_at IS NOT NULL AND e.expires_at <= p_now
                    AND NOT EXISTS (SELECT 1 FROM "public"."fc_refs" f
                                     WHERE f.run_key = e.run_key AND f.key = e.key)
                  LIMIT v_budget)
            RETURNING 1)
        SELECT v_budget - count(*) INTO v_budget FROM gone;
    END IF;
    -- The server's clock in a variable: compared with a volatile call, the index is unused.
    DELETE FROM "public"."fc_ops" o WHERE o.token IN (
        SELECT token FROM "public"."fc_ops" WHERE expires_at <= v_server_now LIMIT 1000);
    done := NOT EXISTS (SELECT 1 FROM "public"."fc_runs" x
                         WHERE x.purge_at IS NOT NULL AND x.purge_at <= p_now)
        AND NOT EXISTS (SELECT 1 FROM "public"."fc_checkpoints" c
                         WHERE c.expires_at IS NOT NULL AND c.expires_at <= p_now)
        AND NOT EXISTS (SELECT 1 FROM "public"."fc_items" e
                         WHERE e.expires_at IS NOT NULL AND e.expires_at <= p_now
                           AND NOT EXISTS (SELECT 1 FROM "public"."fc_refs" f
                                            WHERE f.run_key = e.run_key AND f.key = e.key));
END
$fn$;

CREATE FUNCTION "public"."fc_get"(p_run_key text, p_sequence bigint, p_now double precision)
RETURNS TABLE (sequence bigint, checkpoint_id text, created_at double precision,
               expires_at double precision, header bytea, payload bytea, refs bytea[],
               status text)
LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT c.sequence, c.checkpoint_id, c.created_at, c.expires_at, c.header, c.payload,
           c.refs, CASE WHEN encode(x.run_id, 'hex') ~ '^([0-7][0-9a-f]|c[2-9a-f][89ab][0-9a-f]|d[0-9a-f][89ab][0-9a-f]|e0[ab][0-9a-f][89ab][0-9a-f]|e[1-9a-cef][89ab][0-9a-f][89ab][0-9a-f]|ed[89][0-9a-f][89ab][0-9a-f]|f0[9ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f[1-3][89ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f48[0-9a-f][89ab][0-9a-f][89ab][0-9a-f])*$'
           AND (h.sequence IS NULL
                OR (h.sequence <= x.latest_sequence AND x.checkpoint_count > 0
                    AND (h.checkpoint_id !~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$'
                         OR split_part(h.checkpoint_id, '-', 3) = x.incarnation)
                    AND (x.expires_at IS NULL
                         OR (h.expires_at IS NOT NULL AND h.expires_at <= x.expires_at))))
          THEN x.status END
      FROM "public"."fc_checkpoints" c JOIN "public"."fc_runs" x ON x.run_key = c.run_key
        LEFT JOIN LATERAL (SELECT h.sequence, h.checkpoint_id, h.expires_at
                             FROM "public"."fc_checkpoints" h WHERE h.run_key = x.run_key
                            ORDER BY h.sequence DESC LIMIT 1) h ON true
     WHERE c.run_key = p_run_key AND c.sequence = p_sequence
       AND (c.expires_at IS NULL OR c.expires_at > p_now);
END
$fn$;

CREATE FUNCTION "public"."fc_latest"(p_run_key text, p_now double precision)
RETURNS TABLE (sequence bigint, checkpoint_id text, created_at double precision,
               expires_at double precision, header bytea, payload bytea, refs bytea[],
               status text)
LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT c.sequence, c.checkpoint_id, c.created_at, c.expires_at, c.header, c.payload,
           c.refs, CASE WHEN encode(x.run_id, 'hex') ~ '^([0-7][0-9a-f]|c[2-9a-f][89ab][0-9a-f]|d[0-9a-f][89ab][0-9a-f]|e0[ab][0-9a-f][89ab][0-9a-f]|e[1-9a-cef][89ab][0-9a-f][89ab][0-9a-f]|ed[89][0-9a-f][89ab][0-9a-f]|f0[9ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f[1-3][89ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f48[0-9a-f][89ab][0-9a-f][89ab][0-9a-f])*$'
           AND (h.sequence IS NULL
                OR (h.sequence <= x.latest_sequence AND x.checkpoint_count > 0
                    AND (h.checkpoint_id !~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$'
                         OR split_part(h.checkpoint_id, '-', 3) = x.incarnation)
                    AND (x.expires_at IS NULL
                         OR (h.expires_at IS NOT NULL AND h.expires_at <= x.expires_at))))
          THEN x.status END
      FROM (SELECT * FROM "public"."fc_checkpoints" n
             WHERE n.run_key = p_run_key AND (n.expires_at IS NULL OR n.expires_at > p_now)
             ORDER BY n.sequence DESC LIMIT 1) c
      JOIN "public"."fc_runs" x ON x.run_key = c.run_key
        LEFT JOIN LATERAL (SELECT h.sequence, h.checkpoint_id, h.expires_at
                             FROM "public"."fc_checkpoints" h WHERE h.run_key = x.run_key
                            ORDER BY h.sequence DESC LIMIT 1) h ON true;
END
$fn$;

-- A checkpoint with the live items it owns and the items its refs name, in one read.
CREATE FUNCTION "public"."fc_read_with_items"(p_run_key text, p_sequence bigint, p_now double precision)
RETURNS TABLE (sequence bigint, checkpoint_id text, created_at double precision,
               expires_at double precision, header bytea, payload bytea, refs bytea[],
               status text, item_keys bytea[], item_values bytea[])
LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
BEGIN
    IF p_sequence IS NULL THEN
        RETURN QUERY
        SELECT c.sequence, c.checkpoint_id, c.created_at, c.expires_at, c.header, c.payload,
               c.refs, CASE WHEN encode(x.run_id, 'hex') ~ '^([0-7][0-9a-f]|c[2-9a-f][89ab][0-9a-f]|d[0-9a-f][89ab][0-9a-f]|e0[ab][0-9a-f][89ab][0-9a-f]|e[1-9a-cef][89ab][0-9a-f][89ab][0-9a-f]|ed[89][0-9a-f][89ab][0-9a-f]|f0[9ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f[1-3][89ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f48[0-9a-f][89ab][0-9a-f][89ab][0-9a-f])*$'
           AND (h.sequence IS NULL
                OR (h.sequence <= x.latest_sequence AND x.checkpoint_count > 0
                    AND (h.checkpoint_id !~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$'
                         OR split_part(h.checkpoint_id, '-', 3) = x.incarnation)
                    AND (x.expires_at IS NULL
                         OR (h.expires_at IS NOT NULL AND h.expires_at <= x.expires_at))))
          THEN x.status END, w.keys, w.vals
          FROM (SELECT * FROM "public"."fc_checkpoints" n
                 WHERE n.run_key = p_run_key AND (n.expires_at IS NULL OR n.expires_at > p_now)
                 ORDER BY n.sequence DESC LIMIT 1) c
          JOIN "public"."fc_runs" x ON x.run_key = c.run_key
        LEFT JOIN LATERAL (SELECT h.sequence, h.checkpoint_id, h.expires_at
                             FROM "public"."fc_checkpoints" h WHERE h.run_key = x.run_key
                            ORDER BY h.sequence DESC LIMIT 1) h ON true
         CROSS JOIN LATERAL (
               SELECT array_agg(i.key), array_agg(i.value) FROM "public"."fc_items" i
                WHERE i.run_key = p_run_key AND (i.expires_at IS NULL OR i.expires_at > p_now)
                  AND (i.owner = c.sequence OR i.key = ANY (c.refs))) w(keys, vals);
    ELSE
        RETURN QUERY
        SELECT c.sequence, c.checkpoint_id, c.created_at, c.expires_at, c.header, c.payload,
               c.refs, CASE WHEN encode(x.run_id, 'hex') ~ '^([0-7][0-9a-f]|c[2-9a-f][89ab][0-9a-f]|d[0-9a-f][89ab][0-9a-f]|e0[ab][0-9a-f][89ab][0-9a-f]|e[1-9a-cef][89ab][0-9a-f][89ab][0-9a-f]|ed[89][0-9a-f][89ab][0-9a-f]|f0[9ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f[1-3][89ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f48[0-9a-f][89ab][0-9a-f][89ab][0-9a-f])*$'
           AND (h.sequence IS NULL
                OR (h.sequence <= x.latest_sequence AND x.checkpoint_count > 0
                    AND (h.checkpoint_id !~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$'
                         OR split_part(h.checkpoint_id, '-', 3) = x.incarnation)
                    AND (x.expires_at IS NULL
                         OR (h.expires_at IS NOT NULL AND h.expires_at <= x.expires_at))))
          THEN x.status END, w.keys, w.vals
          FROM "public"."fc_checkpoints" c JOIN "public"."fc_runs" x ON x.run_key = c.run_key
        LEFT JOIN LATERAL (SELECT h.sequence, h.checkpoint_id, h.expires_at
                             FROM "public"."fc_checkpoints" h WHERE h.run_key = x.run_key
                            ORDER BY h.sequence DESC LIMIT 1) h ON true
         CROSS JOIN LATERAL (
               SELECT array_agg(i.key), array_agg(i.value) FROM "public"."fc_items" i
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
CREATE FUNCTION "public"."fc_headers"(p_run_key text, p_before bigint, p_limit integer,
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
           "public"."fc_damage"(x.run_key, x.run_id, x.incarnation, x.latest_sequence, x.checkpoint_count,
                    x.expires_at)
      INTO v_status, v_expires_at, v_problem FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
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
             FROM "public"."fc_checkpoints" n
            WHERE n.run_key = p_run_key AND n.sequence < p_before
              AND (p_all OR n.expires_at IS NULL OR n.expires_at > p_now)
            ORDER BY n.sequence DESC LIMIT p_limit) c ON true
     ORDER BY c.sequence DESC;
END
$fn$;

CREATE FUNCTION "public"."fc_get_run"(p_run_key text, p_now double precision)
RETURNS SETOF "public"."fc_runs" LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY SELECT * FROM "public"."fc_runs" x
     WHERE x.run_key = p_run_key AND (x.expires_at IS NULL OR x.expires_at > p_now);
END
$fn$;

-- Live runs newest created first, after the cursor (created_at, run_key); by status when
-- p_status is not NULL.
CREATE FUNCTION "public"."fc_list_runs"(p_status text, p_limit integer, p_created_at double precision,
                            p_run_key text, p_now double precision)
RETURNS SETOF "public"."fc_runs" LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
BEGIN
    IF p_status IS NULL THEN
        RETURN QUERY SELECT * FROM "public"."fc_runs" x
         WHERE (x.expires_at IS NULL OR x.expires_at > p_now)
           AND (x.created_at, x.run_key) < (p_created_at, p_run_key)
         ORDER BY x.created_at DESC, x.run_key DESC LIMIT p_limit;
    ELSE
        RETURN QUERY SELECT * FROM "public"."fc_runs" x
         WHERE x.status = p_status AND (x.expires_at IS NULL OR x.expires_at > p_now)
           AND (x.created_at, x.run_key) < (p_created_at, p_run_key)
         ORDER BY x.created_at DESC, x.run_key DESC LIMIT p_limit;
    END IF;
END
$fn$;

-- Live runs, damaged rows left out (one primary-key probe of the log per row).
CREATE FUNCTION "public"."fc_count_runs"(p_status text, p_now double precision)
RETURNS bigint LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
BEGIN
    IF p_status IS NULL THEN
        RETURN (SELECT count(*) FROM "public"."fc_runs" x
        LEFT JOIN LATERAL (SELECT h.sequence, h.checkpoint_id, h.expires_at
                             FROM "public"."fc_checkpoints" h WHERE h.run_key = x.run_key
                            ORDER BY h.sequence DESC LIMIT 1) h ON true
                 WHERE (x.expires_at IS NULL OR x.expires_at > p_now)
                   AND CASE WHEN encode(x.run_id, 'hex') ~ '^([0-7][0-9a-f]|c[2-9a-f][89ab][0-9a-f]|d[0-9a-f][89ab][0-9a-f]|e0[ab][0-9a-f][89ab][0-9a-f]|e[1-9a-cef][89ab][0-9a-f][89ab][0-9a-f]|ed[89][0-9a-f][89ab][0-9a-f]|f0[9ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f[1-3][89ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f48[0-9a-f][89ab][0-9a-f][89ab][0-9a-f])*$'
           AND (h.sequence IS NULL
                OR (h.sequence <= x.latest_sequence AND x.checkpoint_count > 0
                    AND (h.checkpoint_id !~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$'
                         OR split_part(h.checkpoint_id, '-', 3) = x.incarnation)
                    AND (x.expires_at IS NULL
                         OR (h.expires_at IS NOT NULL AND h.expires_at <= x.expires_at))))
          THEN x.status END IS NOT NULL);
    END IF;
    RETURN (SELECT count(*) FROM "public"."fc_runs" x
        LEFT JOIN LATERAL (SELECT h.sequence, h.checkpoint_id, h.expires_at
                             FROM "public"."fc_checkpoints" h WHERE h.run_key = x.run_key
                            ORDER BY h.sequence DESC LIMIT 1) h ON true
             WHERE x.status = p_status AND (x.expires_at IS NULL OR x.expires_at > p_now)
               AND CASE WHEN encode(x.run_id, 'hex') ~ '^([0-7][0-9a-f]|c[2-9a-f][89ab][0-9a-f]|d[0-9a-f][89ab][0-9a-f]|e0[ab][0-9a-f][89ab][0-9a-f]|e[1-9a-cef][89ab][0-9a-f][89ab][0-9a-f]|ed[89][0-9a-f][89ab][0-9a-f]|f0[9ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f[1-3][89ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f48[0-9a-f][89ab][0-9a-f][89ab][0-9a-f])*$'
           AND (h.sequence IS NULL
                OR (h.sequence <= x.latest_sequence AND x.checkpoint_count > 0
                    AND (h.checkpoint_id !~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$'
                         OR split_part(h.checkpoint_id, '-', 3) = x.incarnation)
                    AND (x.expires_at IS NULL
                         OR (h.expires_at IS NOT NULL AND h.expires_at <= x.expires_at))))
          THEN x.status END IS NOT NULL);
END
$fn$;

CREATE FUNCTION "public"."fc_runs_with_label"(p_label bytea, p_limit integer,
                                  p_created_at double precision, p_run_key text,
                                  p_now double precision)
RETURNS SETOF "public"."fc_runs" LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY SELECT x.* FROM "public"."fc_labels" l JOIN "public"."fc_runs" x ON x.run_key = l.run_key
     WHERE l.label = p_label AND (x.expires_at IS NULL OR x.expires_at > p_now)
       AND (l.created_at, l.run_key) < (p_created_at, p_run_key)
     ORDER BY l.created_at DESC, l.run_key DESC LIMIT p_limit;
END
$fn$;

CREATE FUNCTION "public"."fc_get_items"(p_run_key text, p_keys bytea[], p_now double precision)
RETURNS TABLE (key bytea, value bytea) LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY SELECT i.key, i.value FROM "public"."fc_items" i
     WHERE i.run_key = p_run_key AND i.key = ANY (p_keys)
       AND (i.expires_at IS NULL OR i.expires_at > p_now);
END
$fn$;

-- Live items with p_low <= key < p_high, in key order (descending when p_reverse).
CREATE FUNCTION "public"."fc_scan_items"(p_run_key text, p_low bytea, p_high bytea, p_limit integer,
                             p_reverse boolean, p_now double precision)
RETURNS TABLE (key bytea, value bytea) LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
BEGIN
    IF p_reverse THEN
        RETURN QUERY SELECT i.key, i.value FROM "public"."fc_items" i
         WHERE i.run_key = p_run_key AND i.key >= p_low AND i.key < p_high
           AND (i.expires_at IS NULL OR i.expires_at > p_now)
         ORDER BY i.key DESC LIMIT p_limit;
    ELSE
        RETURN QUERY SELECT i.key, i.value FROM "public"."fc_items" i
         WHERE i.run_key = p_run_key AND i.key >= p_low AND i.key < p_high
           AND (i.expires_at IS NULL OR i.expires_at > p_now)
         ORDER BY i.key LIMIT p_limit;
    END IF;
END
$fn$;

CREATE FUNCTION "public"."fc_delete_items"(p_run_key text, p_keys bytea[], p_token text)
RETURNS bigint LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_count bigint;
BEGIN
    SELECT o.result INTO v_count FROM "public"."fc_ops" o WHERE o.token = p_token;
    IF FOUND THEN
        RETURN v_count;
    END IF;
    DELETE FROM "public"."fc_items" i WHERE i.run_key = p_run_key AND i.key = ANY (p_keys);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    IF v_count > 0 THEN
        INSERT INTO "public"."fc_ops" (token, result, expires_at)
        VALUES (p_token, v_count, extract(epoch FROM clock_timestamp()) + 300);
    END IF;
    RETURN v_count;
END
$fn$;

CREATE FUNCTION "public"."fc_damaged_runs"(p_run_key text, p_after text, p_limit integer)
RETURNS TABLE (run_key text, problem text, checkpoints bigint, sequence bigint,
               checkpoint_id text, created_at double precision, expires_at double precision,
               header bytea)
LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH judged AS (
        SELECT x.run_key, coalesce(
                   "public"."fc_damage"(x.run_key, x.run_id, x.incarnation, x.latest_sequence,
                            x.checkpoint_count, x.expires_at),
                   CASE
                   WHEN EXISTS (SELECT 1 FROM unnest(x.labels) label
                                 WHERE encode(label, 'hex') !~ '^([0-7][0-9a-f]|c[2-9a-f][89ab][0-9a-f]|d[0-9a-f][89ab][0-9a-f]|e0[ab][0-9a-f][89ab][0-9a-f]|e[1-9a-cef][89ab][0-9a-f][89ab][0-9a-f]|ed[89][0-9a-f][89ab][0-9a-f]|f0[9ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f[1-3][89ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f48[0-9a-f][89ab][0-9a-f][89ab][0-9a-f])*$')
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
          FROM "public"."fc_runs" x
         CROSS JOIN LATERAL (
               SELECT count(*) AS held, count(*) FILTER (WHERE c.expires_at IS NULL) AS forever,
                      max(c.expires_at) AS latest
                 FROM "public"."fc_checkpoints" c WHERE c.run_key = x.run_key) l
         WHERE x.run_key > p_after AND (p_run_key IS NULL OR x.run_key = p_run_key)
         ORDER BY x.run_key LIMIT p_limit
    )
    SELECT j.run_key, j.problem, j.held, n.sequence, n.checkpoint_id, n.created_at,
           n.expires_at, n.header
      FROM judged j
      LEFT JOIN LATERAL (
           SELECT c.sequence, c.checkpoint_id, c.created_at, c.expires_at, c.header
             FROM "public"."fc_checkpoints" c
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
CREATE FUNCTION "public"."fc_rebuild_run"(p_run_key text, p_run_id bytea, p_status text, p_data bytea,
                              p_labels bytea[], p_now double precision)
RETURNS TABLE (outcome text, run "public"."fc_runs") LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    r "public"."fc_runs"%ROWTYPE;
    v_problem text;
    v_held bigint;
    v_forever bigint;
    v_latest double precision;
    v_sequence bigint;
    v_id text;
    v_created double precision;
    v_labels bytea[];
BEGIN
    SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'missing'::text, NULL::"public"."fc_runs";
        RETURN;
    END IF;
    SELECT d.problem INTO v_problem FROM "public"."fc_damaged_runs"(p_run_key, '', 1) d;
    IF v_problem IS NULL THEN
        RETURN QUERY SELECT 'intact'::text, r;
        RETURN;
    END IF;
    SELECT count(*), count(*) FILTER (WHERE c.expires_at IS NULL), max(c.expires_at)
      INTO v_held, v_forever, v_latest
      FROM "public"."fc_checkpoints" c WHERE c.run_key = p_run_key;
    IF v_held = 0 THEN
        RETURN QUERY SELECT 'empty'::text, NULL::"public"."fc_runs";
        RETURN;
    END IF;
    SELECT c.sequence, c.checkpoint_id INTO v_sequence, v_id
      FROM "public"."fc_checkpoints" c WHERE c.run_key = p_run_key ORDER BY c.sequence DESC LIMIT 1;
    IF v_id !~ ('^ck-' || p_run_key || '-[a-z2-7]+-[0-9]+$') THEN
        RETURN QUERY SELECT 'foreign'::text, NULL::"public"."fc_runs";
        RETURN;
    END IF;
    SELECT c.created_at INTO v_created
      FROM "public"."fc_checkpoints" c WHERE c.run_key = p_run_key ORDER BY c.sequence LIMIT 1;
    IF cardinality(p_labels) > 0 THEN
        v_labels := p_labels;
    ELSE
        -- The label rows are written with the run's creation and follow its incarnation;
        -- the row's own list (in the order given) when it names the same labels.
        v_labels := ARRAY(SELECT DISTINCT l.label FROM "public"."fc_labels" l
                           WHERE l.run_key = p_run_key ORDER BY l.label);
        IF (SELECT array_agg(DISTINCT label ORDER BY label) FROM unnest(r.labels) label)
           IS NOT DISTINCT FROM (CASE WHEN cardinality(v_labels) > 0 THEN v_labels END) THEN
            v_labels := r.labels;
        END IF;
    END IF;
    UPDATE "public"."fc_runs" x
       SET run_id = p_run_id, incarnation = split_part(v_id, '-', 3), status = p_status,
           created_at = v_created, updated_at = p_now, latest_sequence = v_sequence,
           checkpoint_count = v_held, forever_count = v_forever,
           expires_at = CASE WHEN v_forever > 0 THEN NULL ELSE v_latest END, purge_at = NULL,
           version = 0, data = p_data, labels = v_labels, update_token = NULL
     WHERE x.run_key = p_run_key
    RETURNING x.* INTO r;
    DELETE FROM "public"."fc_labels" l WHERE l.run_key = p_run_key;
    INSERT INTO "public"."fc_labels" (label, created_at, run_key)
    SELECT DISTINCT label, v_created, p_run_key FROM unnest(v_labels) label;
    -- Shared items: each key counted once per checkpoint in place that names it.
    DELETE FROM "public"."fc_refs" f WHERE f.run_key = p_run_key;
    INSERT INTO "public"."fc_refs" (run_key, key, holders)
    SELECT p_run_key, named.key, count(*)
      FROM "public"."fc_checkpoints" c, LATERAL (SELECT DISTINCT unnest(c.refs)) named(key)
     WHERE c.run_key = p_run_key
     GROUP BY named.key;
    RETURN QUERY SELECT 'ok'::text, r;
END
$fn$;

INSERT INTO "public"."fc_migrations" (version, description) VALUES (1, 'runs, checkpoints, items, shared-item references, labels, delete memos and the store''s functions');

CREATE OR REPLACE FUNCTION "public"."fc_append"(
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
    r "public"."fc_runs"%ROWTYPE;
    v_drop bigint[];
    v_live bigint;
    v_next boolean;
    v_found boolean;
    v_problem text;
    v_unheld bytea[];
BEGIN
    -- The compare-and-set: only the next sequence of the live run of this incarnation.
    UPDATE "public"."fc_runs" AS x
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
        v_problem := "public"."fc_damage"(p_run_key, r.run_id, r.incarnation, p_sequence - 1,
                              r.checkpoint_count - 1, r.expires_at);
    ELSE
        SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
        v_found := FOUND;
        IF v_found THEN
            -- Judged in one statement: the row and the log of one snapshot (another writer
            -- may have committed since the row above was read).
            SELECT "public"."fc_damage"(x.run_key, x.run_id, x.incarnation, x.latest_sequence,
                            x.checkpoint_count, x.expires_at)
              INTO v_problem FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
        END IF;
        IF v_found AND (r.expires_at IS NULL OR r.expires_at > p_now
                        OR v_problem IS NOT NULL) THEN
            -- A live run: this call may be the retry of one whose reply was lost.
            PERFORM 1 FROM "public"."fc_checkpoints" c
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
            UPDATE "public"."fc_runs" AS x
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
                SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
                outcome := 'conflict';
                IF FOUND AND (r.expires_at IS NULL OR r.expires_at > p_now) THEN
                    latest_sequence := r.latest_sequence; incarnation := r.incarnation;
                END IF;
                RETURN;
            END IF;
            -- Leftovers of the old run: checkpoints with their owned items, the shared
            -- items they named, its labels. Unowned items stay.
            WITH gone AS (
                DELETE FROM "public"."fc_checkpoints" c WHERE c.run_key = p_run_key RETURNING c.sequence
            )
            DELETE FROM "public"."fc_items" i
             WHERE i.run_key = p_run_key AND i.owner IN (SELECT sequence FROM gone);
            WITH released AS (DELETE FROM "public"."fc_refs" f WHERE f.run_key = p_run_key RETURNING f.key)
            DELETE FROM "public"."fc_items" i
             WHERE i.run_key = p_run_key AND i.owner IS NULL
               AND i.key IN (SELECT key FROM released);
            DELETE FROM "public"."fc_labels" l WHERE l.run_key = p_run_key;
        ELSE
            INSERT INTO "public"."fc_runs" AS x (run_key, run_id, incarnation, status, created_at,
                                     updated_at, latest_sequence, checkpoint_count,
                                     forever_count, expires_at, version, data, labels)
            VALUES (p_run_key, p_run_id, p_incarnation, p_status, p_run_created_at, p_now, 0,
                    1, (p_expires_at IS NULL)::int, p_expires_at, p_version, p_data, p_labels)
            ON CONFLICT (run_key) DO NOTHING
            RETURNING x.* INTO r;
            IF NOT FOUND THEN
                -- Another writer created the run first (its transaction has committed).
                SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
                outcome := 'conflict';
                IF FOUND AND (r.expires_at IS NULL OR r.expires_at > p_now) THEN
                    latest_sequence := r.latest_sequence; incarnation := r.incarnation;
                END IF;
                RETURN;
            END IF;
        END IF;
        IF cardinality(p_labels) > 0 THEN
            INSERT INTO "public"."fc_labels" (label, created_at, run_key)
            SELECT DISTINCT label, p_run_created_at, p_run_key FROM unnest(p_labels) label;
        END IF;
    END IF;

    IF cardinality(p_refs) > 0 THEN
        -- The run row is locked by now: a removal of the run's checkpoints (which releases
        -- their shared items) waits for this transaction.
        SELECT array_agg(wanted.k ORDER BY wanted.n) INTO v_unheld
          FROM (SELECT t.k, min(t.n) AS n
                  FROM unnest(p_refs) WITH ORDINALITY AS t(k, n)
                 WHERE NOT (t.k = ANY (coalesce(p_item_keys, '{}')))
                 GROUP BY t.k) wanted
         WHERE NOT EXISTS (SELECT 1 FROM "public"."fc_items" i
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

    INSERT INTO "public"."fc_checkpoints" (run_key, sequence, checkpoint_id, created_at, expires_at,
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
        INSERT INTO "public"."fc_items" AS i (run_key, key, value, owner, expires_at)
        SELECT p_run_key, k, v, o, e
          FROM unnest(p_item_keys, p_item_values, p_item_owners, p_item_expiries) AS t(k, v, o, e)
        ON CONFLICT (run_key, key) DO UPDATE
           SET value = excluded.value, owner = excluded.owner, expires_at = excluded.expires_at
         WHERE i.expires_at IS NOT NULL AND i.expires_at <= p_now;
    END IF;
    IF p_refs IS NOT NULL AND cardinality(p_refs) > 0 THEN
        INSERT INTO "public"."fc_refs" AS f (run_key, key, holders)
        SELECT DISTINCT p_run_key, k, 1 FROM unnest(p_refs) k
        ON CONFLICT (run_key, key) DO UPDATE SET holders = f.holders + 1;
    END IF;

    -- Pruning: expired checkpoints, then the oldest beyond keep_latest.
    v_live := r.checkpoint_count;
    IF r.checkpoint_count > r.forever_count THEN
        v_drop := ARRAY(SELECT c.sequence FROM "public"."fc_checkpoints" c
                         WHERE c.run_key = p_run_key AND c.expires_at <= p_now);
        v_live := v_live - cardinality(v_drop);
    END IF;
    IF p_keep_latest IS NOT NULL AND v_live > p_keep_latest THEN
        v_drop := coalesce(v_drop, '{}') || ARRAY(
            SELECT c.sequence FROM "public"."fc_checkpoints" c
             WHERE c.run_key = p_run_key
               AND (c.expires_at IS NULL OR c.expires_at > p_now)
             ORDER BY c.sequence LIMIT v_live - p_keep_latest);
    END IF;
    IF cardinality(v_drop) > 0 THEN
        PERFORM "public"."fc_remove"(p_run_key, v_drop, true);
    END IF;
    outcome := 'ok'; status := r.status;
END
$fn$;

INSERT INTO "public"."fc_migrations" (version, description) VALUES (2, 'append refuses refs naming items the run does not hold');

CREATE OR REPLACE FUNCTION "public"."fc_remove"(p_run_key text, p_sequences bigint[], p_count_run boolean)
RETURNS bigint LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_gone bigint[];
    v_forever bigint;
    v_refs bytea[];
    v_zeroed bytea[];
    v_dropped bytea[];
BEGIN
    IF p_sequences IS NULL OR cardinality(p_sequences) = 0 THEN
        RETURN 0;
    END IF;
    WITH gone AS (
        DELETE FROM "public"."fc_checkpoints"
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
    DELETE FROM "public"."fc_items" WHERE run_key = p_run_key AND owner = ANY (v_gone);
    IF v_refs IS NOT NULL THEN
        WITH released AS (
            SELECT ref, count(*) AS times FROM unnest(v_refs) ref GROUP BY ref
        ), counted AS (
            UPDATE "public"."fc_refs" r SET holders = r.holders - released.times
              FROM released
             WHERE r.run_key = p_run_key AND r.key = released.ref
            RETURNING r.key, r.holders
        )
        SELECT array_agg(key) FILTER (WHERE holders <= 0) INTO v_zeroed FROM counted;
        IF v_zeroed IS NOT NULL THEN
            DELETE FROM "public"."fc_refs" WHERE run_key = p_run_key AND key = ANY (v_zeroed);
            WITH dropped AS (
                DELETE FROM "public"."fc_items" i
                 WHERE i.run_key = p_run_key AND i.key = ANY (v_zeroed) AND i.owner IS NULL
                RETURNING i.key
            )
            SELECT array_agg(key) INTO v_dropped FROM dropped;
            IF v_dropped IS NOT NULL THEN
                DELETE FROM "public"."fc_items" i USING unnest(v_dropped) n(k)
                 WHERE i.run_key = p_run_key AND i.key >= n.k || '/'::bytea
                   AND i.key < n.k || '0'::bytea;
            END IF;
        END IF;
    END IF;
    IF NOT p_count_run THEN
        RETURN cardinality(v_gone);
    END IF;
    UPDATE "public"."fc_runs" r
       SET checkpoint_count = r.checkpoint_count - cardinality(v_gone),
           forever_count = r.forever_count - v_forever,
           expires_at = CASE
               WHEN r.checkpoint_count = cardinality(v_gone) THEN 0
               WHEN r.forever_count > v_forever THEN NULL
               ELSE (SELECT max(c.expires_at) FROM "public"."fc_checkpoints" c
                      WHERE c.run_key = p_run_key AND c.expires_at IS NOT NULL)
           END,
           purge_at = CASE WHEN r.checkpoint_count = cardinality(v_gone) THEN 0 END
     WHERE r.run_key = p_run_key;
    RETURN cardinality(v_gone);
END
$fn$;

CREATE OR REPLACE FUNCTION "public"."fc_append"(
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
    r "public"."fc_runs"%ROWTYPE;
    v_drop bigint[];
    v_live bigint;
    v_next boolean;
    v_found boolean;
    v_problem text;
    v_unheld bytea[];
    v_dropped bytea[];
BEGIN
    -- The compare-and-set: only the next sequence of the live run of this incarnation.
    UPDATE "public"."fc_runs" AS x
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
        v_problem := "public"."fc_damage"(p_run_key, r.run_id, r.incarnation, p_sequence - 1,
                              r.checkpoint_count - 1, r.expires_at);
    ELSE
        SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
        v_found := FOUND;
        IF v_found THEN
            -- Judged in one statement: the row and the log of one snapshot (another writer
            -- may have committed since the row above was read).
            SELECT "public"."fc_damage"(x.run_key, x.run_id, x.incarnation, x.latest_sequence,
                            x.checkpoint_count, x.expires_at)
              INTO v_problem FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
        END IF;
        IF v_found AND (r.expires_at IS NULL OR r.expires_at > p_now
                        OR v_problem IS NOT NULL) THEN
            -- A live run: this call may be the retry of one whose reply was lost.
            PERFORM 1 FROM "public"."fc_checkpoints" c
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
            UPDATE "public"."fc_runs" AS x
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
                SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
                outcome := 'conflict';
                IF FOUND AND (r.expires_at IS NULL OR r.expires_at > p_now) THEN
                    latest_sequence := r.latest_sequence; incarnation := r.incarnation;
                END IF;
                RETURN;
            END IF;
            -- Leftovers of the old run: checkpoints with their owned items, the shared
            -- items they named, its labels. Unowned items stay.
            WITH gone AS (
                DELETE FROM "public"."fc_checkpoints" c WHERE c.run_key = p_run_key RETURNING c.sequence
            )
            DELETE FROM "public"."fc_items" i
             WHERE i.run_key = p_run_key AND i.owner IN (SELECT sequence FROM gone);
            WITH released AS (
                DELETE FROM "public"."fc_refs" f WHERE f.run_key = p_run_key RETURNING f.key
            ), dropped AS (
                DELETE FROM "public"."fc_items" i
                 WHERE i.run_key = p_run_key AND i.owner IS NULL
                   AND i.key IN (SELECT key FROM released)
                RETURNING i.key
            )
            SELECT array_agg(key) INTO v_dropped FROM dropped;
            IF v_dropped IS NOT NULL THEN
                DELETE FROM "public"."fc_items" i USING unnest(v_dropped) n(k)
                 WHERE i.run_key = p_run_key AND i.key >= n.k || '/'::bytea
                   AND i.key < n.k || '0'::bytea;
            END IF;
            DELETE FROM "public"."fc_labels" l WHERE l.run_key = p_run_key;
        ELSE
            INSERT INTO "public"."fc_runs" AS x (run_key, run_id, incarnation, status, created_at,
                                     updated_at, latest_sequence, checkpoint_count,
                                     forever_count, expires_at, version, data, labels)
            VALUES (p_run_key, p_run_id, p_incarnation, p_status, p_run_created_at, p_now, 0,
                    1, (p_expires_at IS NULL)::int, p_expires_at, p_version, p_data, p_labels)
            ON CONFLICT (run_key) DO NOTHING
            RETURNING x.* INTO r;
            IF NOT FOUND THEN
                -- Another writer created the run first (its transaction has committed).
                SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
                outcome := 'conflict';
                IF FOUND AND (r.expires_at IS NULL OR r.expires_at > p_now) THEN
                    latest_sequence := r.latest_sequence; incarnation := r.incarnation;
                END IF;
                RETURN;
            END IF;
        END IF;
        IF cardinality(p_labels) > 0 THEN
            INSERT INTO "public"."fc_labels" (label, created_at, run_key)
            SELECT DISTINCT label, p_run_created_at, p_run_key FROM unnest(p_labels) label;
        END IF;
    END IF;

    IF cardinality(p_refs) > 0 THEN
        -- The run row is locked by now: a removal of the run's checkpoints (which releases
        -- their shared items) waits for this transaction.
        SELECT array_agg(wanted.k ORDER BY wanted.n) INTO v_unheld
          FROM (SELECT t.k, min(t.n) AS n
                  FROM unnest(p_refs) WITH ORDINALITY AS t(k, n)
                 WHERE NOT (t.k = ANY (coalesce(p_item_keys, '{}')))
                 GROUP BY t.k) wanted
         WHERE NOT EXISTS (SELECT 1 FROM "public"."fc_items" i
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

    INSERT INTO "public"."fc_checkpoints" (run_key, sequence, checkpoint_id, created_at, expires_at,
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
        INSERT INTO "public"."fc_items" AS i (run_key, key, value, owner, expires_at)
        SELECT p_run_key, k, v, o, e
          FROM unnest(p_item_keys, p_item_values, p_item_owners, p_item_expiries) AS t(k, v, o, e)
        ON CONFLICT (run_key, key) DO UPDATE
           SET value = excluded.value, owner = excluded.owner, expires_at = excluded.expires_at
         WHERE i.expires_at IS NOT NULL AND i.expires_at <= p_now;
    END IF;
    IF p_refs IS NOT NULL AND cardinality(p_refs) > 0 THEN
        INSERT INTO "public"."fc_refs" AS f (run_key, key, holders)
        SELECT DISTINCT p_run_key, k, 1 FROM unnest(p_refs) k
        ON CONFLICT (run_key, key) DO UPDATE SET holders = f.holders + 1;
    END IF;

    -- Pruning: expired checkpoints, then the oldest beyond keep_latest.
    v_live := r.checkpoint_count;
    IF r.checkpoint_count > r.forever_count THEN
        v_drop := ARRAY(SELECT c.sequence FROM "public"."fc_checkpoints" c
                         WHERE c.run_key = p_run_key AND c.expires_at <= p_now);
        v_live := v_live - cardinality(v_drop);
    END IF;
    IF p_keep_latest IS NOT NULL AND v_live > p_keep_latest THEN
        v_drop := coalesce(v_drop, '{}') || ARRAY(
            SELECT c.sequence FROM "public"."fc_checkpoints" c
             WHERE c.run_key = p_run_key
               AND (c.expires_at IS NULL OR c.expires_at > p_now)
             ORDER BY c.sequence LIMIT v_live - p_keep_latest);
    END IF;
    IF cardinality(v_drop) > 0 THEN
        PERFORM "public"."fc_remove"(p_run_key, v_drop, true);
    END IF;
    outcome := 'ok'; status := r.status;
END
$fn$;

CREATE OR REPLACE FUNCTION "public"."fc_read_with_items"(p_run_key text, p_sequence bigint,
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
               c.refs, CASE WHEN encode(x.run_id, 'hex') ~ '^([0-7][0-9a-f]|c[2-9a-f][89ab][0-9a-f]|d[0-9a-f][89ab][0-9a-f]|e0[ab][0-9a-f][89ab][0-9a-f]|e[1-9a-cef][89ab][0-9a-f][89ab][0-9a-f]|ed[89][0-9a-f][89ab][0-9a-f]|f0[9ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f[1-3][89ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f48[0-9a-f][89ab][0-9a-f][89ab][0-9a-f])*$'
           AND (h.sequence IS NULL
                OR (h.sequence <= x.latest_sequence AND x.checkpoint_count > 0
                    AND (h.checkpoint_id !~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$'
                         OR split_part(h.checkpoint_id, '-', 3) = x.incarnation)
                    AND (x.expires_at IS NULL
                         OR (h.expires_at IS NOT NULL AND h.expires_at <= x.expires_at))))
          THEN x.status END, w.keys, w.vals
          FROM (SELECT * FROM "public"."fc_checkpoints" n
                 WHERE n.run_key = p_run_key AND (n.expires_at IS NULL OR n.expires_at > p_now)
                 ORDER BY n.sequence DESC LIMIT 1) c
          JOIN "public"."fc_runs" x ON x.run_key = c.run_key
        LEFT JOIN LATERAL (SELECT h.sequence, h.checkpoint_id, h.expires_at
                             FROM "public"."fc_checkpoints" h WHERE h.run_key = x.run_key
                            ORDER BY h.sequence DESC LIMIT 1) h ON true
         CROSS JOIN LATERAL (
               SELECT array_agg(w.key), array_agg(w.value) FROM (
                   SELECT i.key, i.value FROM "public"."fc_items" i
                    WHERE i.run_key = p_run_key
                      AND (i.expires_at IS NULL OR i.expires_at > p_now)
                      AND (i.owner = c.sequence OR i.key = ANY (c.refs))
                   UNION ALL
                   SELECT r.key, r.value
                     FROM (SELECT DISTINCT unnest(c.refs)) n(k)
                    CROSS JOIN LATERAL (
                          SELECT i.key, i.value FROM "public"."fc_items" i
                           WHERE i.run_key = p_run_key AND i.key >= n.k || '/'::bytea
                             AND i.key < n.k || '0'::bytea
                             AND (i.expires_at IS NULL OR i.expires_at > p_now)
                             AND i.owner IS DISTINCT FROM c.sequence
                          OFFSET 0) r) w) w(keys, vals);
    ELSE
        RETURN QUERY
        SELECT c.sequence, c.checkpoint_id, c.created_at, c.expires_at, c.header, c.payload,
               c.refs, CASE WHEN encode(x.run_id, 'hex') ~ '^([0-7][0-9a-f]|c[2-9a-f][89ab][0-9a-f]|d[0-9a-f][89ab][0-9a-f]|e0[ab][0-9a-f][89ab][0-9a-f]|e[1-9a-cef][89ab][0-9a-f][89ab][0-9a-f]|ed[89][0-9a-f][89ab][0-9a-f]|f0[9ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f[1-3][89ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f48[0-9a-f][89ab][0-9a-f][89ab][0-9a-f])*$'
           AND (h.sequence IS NULL
                OR (h.sequence <= x.latest_sequence AND x.checkpoint_count > 0
                    AND (h.checkpoint_id !~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$'
                         OR split_part(h.checkpoint_id, '-', 3) = x.incarnation)
                    AND (x.expires_at IS NULL
                         OR (h.expires_at IS NOT NULL AND h.expires_at <= x.expires_at))))
          THEN x.status END, w.keys, w.vals
          FROM "public"."fc_checkpoints" c JOIN "public"."fc_runs" x ON x.run_key = c.run_key
        LEFT JOIN LATERAL (SELECT h.sequence, h.checkpoint_id, h.expires_at
                             FROM "public"."fc_checkpoints" h WHERE h.run_key = x.run_key
                            ORDER BY h.sequence DESC LIMIT 1) h ON true
         CROSS JOIN LATERAL (
               SELECT array_agg(w.key), array_agg(w.value) FROM (
                   SELECT i.key, i.value FROM "public"."fc_items" i
                    WHERE i.run_key = p_run_key
                      AND (i.expires_at IS NULL OR i.expires_at > p_now)
                      AND (i.owner = c.sequence OR i.key = ANY (c.refs))
                   UNION ALL
                   SELECT r.key, r.value
                     FROM (SELECT DISTINCT unnest(c.refs)) n(k)
                    CROSS JOIN LATERAL (
                          SELECT i.key, i.value FROM "public"."fc_items" i
                           WHERE i.run_key = p_run_key AND i.key >= n.k || '/'::bytea
                             AND i.key < n.k || '0'::bytea
                             AND (i.expires_at IS NULL OR i.expires_at > p_now)
                             AND i.owner IS DISTINCT FROM c.sequence
                          OFFSET 0) r) w) w(keys, vals)
         WHERE c.run_key = p_run_key AND c.sequence = p_sequence
           AND (c.expires_at IS NULL OR c.expires_at > p_now);
    END IF;
END
$fn$;

INSERT INTO "public"."fc_migrations" (version, description) VALUES (3, 'items nested under a shared item are read and removed with it');

CREATE OR REPLACE FUNCTION "public"."fc_append"(
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
    r "public"."fc_runs"%ROWTYPE;
    v_drop bigint[];
    v_live bigint;
    v_next boolean;
    v_found boolean;
    v_problem text;
    v_unheld bytea[];
    v_dropped bytea[];
BEGIN
    -- A retry of this call (same token) waits here for the call it repeats to end.
    PERFORM pg_advisory_xact_lock(26211, hashtext(p_token));
    -- The compare-and-set: only the next sequence of the live run of this incarnation.
    UPDATE "public"."fc_runs" AS x
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
        v_problem := "public"."fc_damage"(p_run_key, r.run_id, r.incarnation, p_sequence - 1,
                              r.checkpoint_count - 1, r.expires_at);
    ELSE
        SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
        v_found := FOUND;
        IF v_found THEN
            -- Judged in one statement: the row and the log of one snapshot (another writer
            -- may have committed since the row above was read).
            SELECT "public"."fc_damage"(x.run_key, x.run_id, x.incarnation, x.latest_sequence,
                            x.checkpoint_count, x.expires_at)
              INTO v_problem FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
        END IF;
        IF v_found AND (r.expires_at IS NULL OR r.expires_at > p_now
                        OR v_problem IS NOT NULL) THEN
            -- A live run: this call may be the retry of one whose reply was lost.
            PERFORM 1 FROM "public"."fc_checkpoints" c
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
            UPDATE "public"."fc_runs" AS x
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
                SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
                outcome := 'conflict';
                IF FOUND AND (r.expires_at IS NULL OR r.expires_at > p_now) THEN
                    latest_sequence := r.latest_sequence; incarnation := r.incarnation;
                END IF;
                RETURN;
            END IF;
            -- Leftovers of the old run: checkpoints with their owned items, the shared
            -- items they named, its labels. Unowned items stay.
            WITH gone AS (
                DELETE FROM "public"."fc_checkpoints" c WHERE c.run_key = p_run_key RETURNING c.sequence
            )
            DELETE FROM "public"."fc_items" i
             WHERE i.run_key = p_run_key AND i.owner IN (SELECT sequence FROM gone);
            WITH released AS (
                DELETE FROM "public"."fc_refs" f WHERE f.run_key = p_run_key RETURNING f.key
            ), dropped AS (
                DELETE FROM "public"."fc_items" i
                 WHERE i.run_key = p_run_key AND i.owner IS NULL
                   AND i.key IN (SELECT key FROM released)
                RETURNING i.key
            )
            SELECT array_agg(key) INTO v_dropped FROM dropped;
            IF v_dropped IS NOT NULL THEN
                DELETE FROM "public"."fc_items" i USING unnest(v_dropped) n(k)
                 WHERE i.run_key = p_run_key AND i.key >= n.k || '/'::bytea
                   AND i.key < n.k || '0'::bytea;
            END IF;
            DELETE FROM "public"."fc_labels" l WHERE l.run_key = p_run_key;
        ELSE
            INSERT INTO "public"."fc_runs" AS x (run_key, run_id, incarnation, status, created_at,
                                     updated_at, latest_sequence, checkpoint_count,
                                     forever_count, expires_at, version, data, labels)
            VALUES (p_run_key, p_run_id, p_incarnation, p_status, p_run_created_at, p_now, 0,
                    1, (p_expires_at IS NULL)::int, p_expires_at, p_version, p_data, p_labels)
            ON CONFLICT (run_key) DO NOTHING
            RETURNING x.* INTO r;
            IF NOT FOUND THEN
                -- Another writer created the run first (its transaction has committed).
                SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
                outcome := 'conflict';
                IF FOUND AND (r.expires_at IS NULL OR r.expires_at > p_now) THEN
                    latest_sequence := r.latest_sequence; incarnation := r.incarnation;
                END IF;
                RETURN;
            END IF;
        END IF;
        IF cardinality(p_labels) > 0 THEN
            INSERT INTO "public"."fc_labels" (label, created_at, run_key)
            SELECT DISTINCT label, p_run_created_at, p_run_key FROM unnest(p_labels) label;
        END IF;
    END IF;

    IF cardinality(p_refs) > 0 THEN
        -- The run row is locked by now: a removal of the run's checkpoints (which releases
        -- their shared items) waits for this transaction.
        SELECT array_agg(wanted.k ORDER BY wanted.n) INTO v_unheld
          FROM (SELECT t.k, min(t.n) AS n
                  FROM unnest(p_refs) WITH ORDINALITY AS t(k, n)
                 WHERE NOT (t.k = ANY (coalesce(p_item_keys, '{}')))
                 GROUP BY t.k) wanted
         WHERE NOT EXISTS (SELECT 1 FROM "public"."fc_items" i
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

    INSERT INTO "public"."fc_checkpoints" (run_key, sequence, checkpoint_id, created_at, expires_at,
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
        INSERT INTO "public"."fc_items" AS i (run_key, key, value, owner, expires_at)
        SELECT p_run_key, k, v, o, e
          FROM unnest(p_item_keys, p_item_values, p_item_owners, p_item_expiries) AS t(k, v, o, e)
        ON CONFLICT (run_key, key) DO UPDATE
           SET value = excluded.value, owner = excluded.owner, expires_at = excluded.expires_at
         WHERE i.expires_at IS NOT NULL AND i.expires_at <= p_now;
    END IF;
    IF p_refs IS NOT NULL AND cardinality(p_refs) > 0 THEN
        INSERT INTO "public"."fc_refs" AS f (run_key, key, holders)
        SELECT DISTINCT p_run_key, k, 1 FROM unnest(p_refs) k
        ON CONFLICT (run_key, key) DO UPDATE SET holders = f.holders + 1;
    END IF;

    -- Pruning: expired checkpoints, then the oldest beyond keep_latest.
    v_live := r.checkpoint_count;
    IF r.checkpoint_count > r.forever_count THEN
        v_drop := ARRAY(SELECT c.sequence FROM "public"."fc_checkpoints" c
                         WHERE c.run_key = p_run_key AND c.expires_at <= p_now);
        v_live := v_live - cardinality(v_drop);
    END IF;
    IF p_keep_latest IS NOT NULL AND v_live > p_keep_latest THEN
        v_drop := coalesce(v_drop, '{}') || ARRAY(
            SELECT c.sequence FROM "public"."fc_checkpoints" c
             WHERE c.run_key = p_run_key
               AND (c.expires_at IS NULL OR c.expires_at > p_now)
             ORDER BY c.sequence LIMIT v_live - p_keep_latest);
    END IF;
    IF cardinality(v_drop) > 0 THEN
        PERFORM "public"."fc_remove"(p_run_key, v_drop, true);
    END IF;
    outcome := 'ok'; status := r.status;
END
$fn$;

CREATE OR REPLACE FUNCTION "public"."fc_delete"(p_run_key text, p_sequence bigint, p_checkpoint_id text,
                         p_token text)
RETURNS bigint LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_result bigint;
    v_problem text;
    v_server_now double precision := extract(epoch FROM clock_timestamp());
BEGIN
    -- A retry of this call (same token) waits here for the call it repeats to end.
    PERFORM pg_advisory_xact_lock(26211, hashtext(p_token));
    SELECT o.result INTO v_result FROM "public"."fc_ops" o WHERE o.token = p_token;
    IF FOUND THEN
        RETURN v_result;
    END IF;
    PERFORM 1 FROM "public"."fc_runs" r WHERE r.run_key = p_run_key FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    -- After the lock, in a statement of its own: the row and the log as the last writer left
    -- them (a locking read may return a row newer than its own snapshot).
    SELECT "public"."fc_damage"(p_run_key, r.run_id, r.incarnation, r.latest_sequence,
                    r.checkpoint_count, r.expires_at)
      INTO v_problem FROM "public"."fc_runs" r WHERE r.run_key = p_run_key;
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'FC003', DETAIL = p_run_key,
            MESSAGE = format('the run row of run key %s %s', p_run_key,
                             v_problem);
    END IF;
    PERFORM 1 FROM "public"."fc_checkpoints" c
     WHERE c.run_key = p_run_key AND c.sequence = p_sequence
       AND c.checkpoint_id = p_checkpoint_id;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    v_result := "public"."fc_remove"(p_run_key, ARRAY[p_sequence], true);
    INSERT INTO "public"."fc_ops" (token, result, expires_at) VALUES (p_token, v_result, v_server_now + 300);
    RETURN v_result;
END
$fn$;

CREATE OR REPLACE FUNCTION "public"."fc_delete_run"(p_run_key text, p_token text)
RETURNS bigint LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_result bigint;
BEGIN
    -- A retry of this call (same token) waits here for the call it repeats to end.
    PERFORM pg_advisory_xact_lock(26211, hashtext(p_token));
    SELECT o.result INTO v_result FROM "public"."fc_ops" o WHERE o.token = p_token;
    IF FOUND THEN
        RETURN v_result;
    END IF;
    -- The row first (its checkpoints and labels follow by cascade), then the run's items.
    DELETE FROM "public"."fc_runs" r WHERE r.run_key = p_run_key RETURNING r.checkpoint_count INTO v_result;
    DELETE FROM "public"."fc_refs" f WHERE f.run_key = p_run_key;
    DELETE FROM "public"."fc_items" i WHERE i.run_key = p_run_key;
    IF v_result IS NULL THEN
        RETURN 0;
    END IF;
    INSERT INTO "public"."fc_ops" (token, result, expires_at)
    VALUES (p_token, v_result, extract(epoch FROM clock_timestamp()) + 300);
    RETURN v_result;
END
$fn$;

CREATE OR REPLACE FUNCTION "public"."fc_delete_items"(p_run_key text, p_keys bytea[], p_token text)
RETURNS bigint LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_count bigint;
BEGIN
    -- A retry of this call (same token) waits here for the call it repeats to end.
    PERFORM pg_advisory_xact_lock(26211, hashtext(p_token));
    SELECT o.result INTO v_count FROM "public"."fc_ops" o WHERE o.token = p_token;
    IF FOUND THEN
        RETURN v_count;
    END IF;
    DELETE FROM "public"."fc_items" i WHERE i.run_key = p_run_key AND i.key = ANY (p_keys);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    IF v_count > 0 THEN
        INSERT INTO "public"."fc_ops" (token, result, expires_at)
        VALUES (p_token, v_count, extract(epoch FROM clock_timestamp()) + 300);
    END IF;
    RETURN v_count;
END
$fn$;

CREATE OR REPLACE FUNCTION "public"."fc_put_items"(p_run_key text, p_keys bytea[], p_values bytea[],
                            p_owners bigint[], p_expiries double precision[],
                            p_create_only boolean, p_now double precision, p_token text)
RETURNS void LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_taken bytea;
    v_written bigint;
BEGIN
    IF p_create_only THEN
        -- A retry of this call (same token) waits here for the call it repeats to end.
        PERFORM pg_advisory_xact_lock(26211, hashtext(p_token));
        -- The retry of a create-only write whose reply was lost: it wrote, once.
        PERFORM 1 FROM "public"."fc_ops" o WHERE o.token = p_token;
        IF FOUND THEN
            RETURN;
        END IF;
    END IF;
    INSERT INTO "public"."fc_items" AS i (run_key, key, value, owner, expires_at)
    SELECT p_run_key, k, v, o, e
      FROM unnest(p_keys, p_values, p_owners, p_expiries) AS t(k, v, o, e)
    ON CONFLICT (run_key, key) DO UPDATE
       SET value = excluded.value, owner = excluded.owner, expires_at = excluded.expires_at
     WHERE NOT p_create_only OR (i.expires_at IS NOT NULL AND i.expires_at <= p_now);
    GET DIAGNOSTICS v_written = ROW_COUNT;
    IF v_written < cardinality(p_keys) THEN
        -- create_only met a live item: the exception undoes the whole batch.
        SELECT i.key INTO v_taken FROM "public"."fc_items" i
         WHERE i.run_key = p_run_key AND i.key = ANY (p_keys)
           AND (i.expires_at IS NULL OR i.expires_at > p_now)
         ORDER BY i.key LIMIT 1;
        RAISE EXCEPTION USING ERRCODE = 'FC002', MESSAGE = coalesce(encode(v_taken, 'hex'), '');
    END IF;
    IF p_create_only THEN
        INSERT INTO "public"."fc_ops" (token, result, expires_at)
        VALUES (p_token, v_written, extract(epoch FROM clock_timestamp()) + 300);
    END IF;
END
$fn$;

INSERT INTO "public"."fc_migrations" (version, description) VALUES (4, 'a retry whose first try is still running waits for it');

CREATE OR REPLACE FUNCTION "public"."fc_remove"(p_run_key text, p_sequences bigint[], p_count_run boolean)
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
        DELETE FROM "public"."fc_checkpoints"
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
    DELETE FROM "public"."fc_items" WHERE run_key = p_run_key AND owner = ANY (v_gone);
    IF v_refs IS NOT NULL THEN
        WITH released AS (
            SELECT ref, count(*) AS times FROM unnest(v_refs) ref GROUP BY ref
        ), counted AS (
            UPDATE "public"."fc_refs" r SET holders = r.holders - released.times
              FROM released
             WHERE r.run_key = p_run_key AND r.key = released.ref
            RETURNING r.key, r.holders
        )
        SELECT array_agg(key) FILTER (WHERE holders <= 0) INTO v_zeroed FROM counted;
        IF v_zeroed IS NOT NULL THEN
            DELETE FROM "public"."fc_refs" WHERE run_key = p_run_key AND key = ANY (v_zeroed);
            DELETE FROM "public"."fc_items" i
             WHERE i.run_key = p_run_key AND i.key = ANY (v_zeroed) AND i.owner IS NULL;
            DELETE FROM "public"."fc_items" i USING unnest(v_zeroed) n(k)
             WHERE i.run_key = p_run_key AND i.key >= n.k || '/'::bytea
               AND i.key < n.k || '0'::bytea;
        END IF;
    END IF;
    IF NOT p_count_run THEN
        RETURN cardinality(v_gone);
    END IF;
    UPDATE "public"."fc_runs" r
       SET checkpoint_count = r.checkpoint_count - cardinality(v_gone),
           forever_count = r.forever_count - v_forever,
           expires_at = CASE
               WHEN r.checkpoint_count = cardinality(v_gone) THEN 0
               WHEN r.forever_count > v_forever THEN NULL
               ELSE (SELECT max(c.expires_at) FROM "public"."fc_checkpoints" c
                      WHERE c.run_key = p_run_key AND c.expires_at IS NOT NULL)
           END,
           purge_at = CASE WHEN r.checkpoint_count = cardinality(v_gone) THEN 0 END
     WHERE r.run_key = p_run_key;
    RETURN cardinality(v_gone);
END
$fn$;

CREATE OR REPLACE FUNCTION "public"."fc_append"(
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
    r "public"."fc_runs"%ROWTYPE;
    v_drop bigint[];
    v_live bigint;
    v_next boolean;
    v_found boolean;
    v_problem text;
    v_unheld bytea[];
    v_released bytea[];
BEGIN
    -- A retry of this call (same token) waits here for the call it repeats to end.
    PERFORM pg_advisory_xact_lock(26211, hashtext(p_token));
    -- The compare-and-set: only the next sequence of the live run of this incarnation.
    UPDATE "public"."fc_runs" AS x
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
        v_problem := "public"."fc_damage"(p_run_key, r.run_id, r.incarnation, p_sequence - 1,
                              r.checkpoint_count - 1, r.expires_at);
    ELSE
        SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
        v_found := FOUND;
        IF v_found THEN
            -- Judged in one statement: the row and the log of one snapshot (another writer
            -- may have committed since the row above was read).
            SELECT "public"."fc_damage"(x.run_key, x.run_id, x.incarnation, x.latest_sequence,
                            x.checkpoint_count, x.expires_at)
              INTO v_problem FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
        END IF;
        IF v_found AND (r.expires_at IS NULL OR r.expires_at > p_now
                        OR v_problem IS NOT NULL) THEN
            -- A live run: this call may be the retry of one whose reply was lost.
            PERFORM 1 FROM "public"."fc_checkpoints" c
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
            UPDATE "public"."fc_runs" AS x
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
                SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
                outcome := 'conflict';
                IF FOUND AND (r.expires_at IS NULL OR r.expires_at > p_now) THEN
                    latest_sequence := r.latest_sequence; incarnation := r.incarnation;
                END IF;
                RETURN;
            END IF;
            -- Leftovers of the old run: checkpoints with their owned items, the shared
            -- items they named, its labels. Unowned items stay.
            WITH gone AS (
                DELETE FROM "public"."fc_checkpoints" c WHERE c.run_key = p_run_key RETURNING c.sequence
            )
            DELETE FROM "public"."fc_items" i
             WHERE i.run_key = p_run_key AND i.owner IN (SELECT sequence FROM gone);
            WITH released AS (
                DELETE FROM "public"."fc_refs" f WHERE f.run_key = p_run_key RETURNING f.key
            )
            SELECT array_agg(key) INTO v_released FROM released;
            IF v_released IS NOT NULL THEN
                DELETE FROM "public"."fc_items" i
                 WHERE i.run_key = p_run_key AND i.owner IS NULL
                   AND i.key = ANY (v_released);
                DELETE FROM "public"."fc_items" i USING unnest(v_released) n(k)
                 WHERE i.run_key = p_run_key AND i.key >= n.k || '/'::bytea
                   AND i.key < n.k || '0'::bytea;
            END IF;
            DELETE FROM "public"."fc_labels" l WHERE l.run_key = p_run_key;
        ELSE
            INSERT INTO "public"."fc_runs" AS x (run_key, run_id, incarnation, status, created_at,
                                     updated_at, latest_sequence, checkpoint_count,
                                     forever_count, expires_at, version, data, labels)
            VALUES (p_run_key, p_run_id, p_incarnation, p_status, p_run_created_at, p_now, 0,
                    1, (p_expires_at IS NULL)::int, p_expires_at, p_version, p_data, p_labels)
            ON CONFLICT (run_key) DO NOTHING
            RETURNING x.* INTO r;
            IF NOT FOUND THEN
                -- Another writer created the run first (its transaction has committed).
                SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
                outcome := 'conflict';
                IF FOUND AND (r.expires_at IS NULL OR r.expires_at > p_now) THEN
                    latest_sequence := r.latest_sequence; incarnation := r.incarnation;
                END IF;
                RETURN;
            END IF;
        END IF;
        IF cardinality(p_labels) > 0 THEN
            INSERT INTO "public"."fc_labels" (label, created_at, run_key)
            SELECT DISTINCT label, p_run_created_at, p_run_key FROM unnest(p_labels) label;
        END IF;
    END IF;

    IF cardinality(p_refs) > 0 THEN
        -- The run row is locked by now: a removal of the run's checkpoints (which releases
        -- their shared items) waits for this transaction.
        SELECT array_agg(wanted.k ORDER BY wanted.n) INTO v_unheld
          FROM (SELECT t.k, min(t.n) AS n
                  FROM unnest(p_refs) WITH ORDINALITY AS t(k, n)
                 WHERE NOT (t.k = ANY (coalesce(p_item_keys, '{}')))
                 GROUP BY t.k) wanted
         WHERE NOT EXISTS (SELECT 1 FROM "public"."fc_items" i
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

    INSERT INTO "public"."fc_checkpoints" (run_key, sequence, checkpoint_id, created_at, expires_at,
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
        INSERT INTO "public"."fc_items" AS i (run_key, key, value, owner, expires_at)
        SELECT p_run_key, k, v, o, e
          FROM unnest(p_item_keys, p_item_values, p_item_owners, p_item_expiries) AS t(k, v, o, e)
        ON CONFLICT (run_key, key) DO UPDATE
           SET value = excluded.value, owner = excluded.owner, expires_at = excluded.expires_at
         WHERE i.expires_at IS NOT NULL AND i.expires_at <= p_now;
    END IF;
    IF p_refs IS NOT NULL AND cardinality(p_refs) > 0 THEN
        INSERT INTO "public"."fc_refs" AS f (run_key, key, holders)
        SELECT DISTINCT p_run_key, k, 1 FROM unnest(p_refs) k
        ON CONFLICT (run_key, key) DO UPDATE SET holders = f.holders + 1;
    END IF;

    -- Pruning: expired checkpoints, then the oldest beyond keep_latest.
    v_live := r.checkpoint_count;
    IF r.checkpoint_count > r.forever_count THEN
        v_drop := ARRAY(SELECT c.sequence FROM "public"."fc_checkpoints" c
                         WHERE c.run_key = p_run_key AND c.expires_at <= p_now);
        v_live := v_live - cardinality(v_drop);
    END IF;
    IF p_keep_latest IS NOT NULL AND v_live > p_keep_latest THEN
        v_drop := coalesce(v_drop, '{}') || ARRAY(
            SELECT c.sequence FROM "public"."fc_checkpoints" c
             WHERE c.run_key = p_run_key
               AND (c.expires_at IS NULL OR c.expires_at > p_now)
             ORDER BY c.sequence LIMIT v_live - p_keep_latest);
    END IF;
    IF cardinality(v_drop) > 0 THEN
        PERFORM "public"."fc_remove"(p_run_key, v_drop, true);
    END IF;
    outcome := 'ok'; status := r.status;
END
$fn$;

INSERT INTO "public"."fc_migrations" (version, description) VALUES (5, 'items nested under a key go with the last checkpoint naming it, whoever holds its item');

CREATE FUNCTION "public"."fc_update_run"(p_run_key text, p_incarnation text, p_version bigint,
                             p_status text, p_data bytea, p_now double precision,
                             p_token text, p_latest_sequence bigint)
RETURNS TABLE (outcome text, run "public"."fc_runs") LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    r "public"."fc_runs"%ROWTYPE;
    v_updated boolean;
    v_problem text;
BEGIN
    UPDATE "public"."fc_runs" AS x
       SET status = p_status, data = p_data, version = x.version + 1, updated_at = p_now,
           update_token = p_token
     WHERE x.run_key = p_run_key AND x.incarnation = p_incarnation AND x.version = p_version
       AND (x.expires_at IS NULL OR x.expires_at > p_now)
       AND (p_latest_sequence IS NULL OR x.latest_sequence = p_latest_sequence)
    RETURNING x.* INTO r;
    v_updated := FOUND;
    -- The row and the log judged in one statement (one snapshot).
    SELECT "public"."fc_damage"(x.run_key, x.run_id, x.incarnation, x.latest_sequence,
                    x.checkpoint_count, x.expires_at)
      INTO v_problem FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
    IF v_problem IS NOT NULL THEN
        -- Undoes the update: a damaged row takes no status change until repaired.
        RAISE EXCEPTION USING ERRCODE = 'FC003', DETAIL = p_run_key,
            MESSAGE = format('the run row of run key %s %s', p_run_key,
                             v_problem);
    END IF;
    IF NOT v_updated THEN
        SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
    END IF;
    IF v_updated THEN
        RETURN QUERY SELECT 'ok'::text, r;
        RETURN;
    END IF;
    IF r.run_key IS NULL OR NOT (r.expires_at IS NULL OR r.expires_at > p_now) THEN
        RETURN QUERY SELECT 'missing'::text, NULL::"public"."fc_runs";
    ELSIF r.incarnation = p_incarnation AND r.version = p_version + 1
          AND r.update_token = p_token THEN
        RETURN QUERY SELECT 'ok'::text, r;
    ELSIF r.incarnation = p_incarnation AND r.version = p_version THEN
        RETURN QUERY SELECT 'newer'::text, r;
    ELSE
        RETURN QUERY SELECT 'conflict'::text, r;
    END IF;
END
$fn$;

INSERT INTO "public"."fc_migrations" (version, description) VALUES (6, 'a run update can require the run''s newest checkpoint to be the one the caller saw');

CREATE OR REPLACE FUNCTION "public"."fc_remove"(p_run_key text, p_sequences bigint[], p_count_run boolean)
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
        DELETE FROM "public"."fc_checkpoints"
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
    DELETE FROM "public"."fc_items" WHERE run_key = p_run_key AND owner = ANY (v_gone);
    IF v_refs IS NOT NULL THEN
        WITH released AS (
            SELECT ref, count(*) AS times FROM unnest(v_refs) ref GROUP BY ref
        ), counted AS (
            UPDATE "public"."fc_refs" r SET holders = r.holders - released.times
              FROM released
             WHERE r.run_key = p_run_key AND r.key = released.ref
            RETURNING r.key, r.holders
        )
        SELECT array_agg(key) FILTER (WHERE holders <= 0) INTO v_zeroed FROM counted;
        IF v_zeroed IS NOT NULL THEN
            DELETE FROM "public"."fc_refs" WHERE run_key = p_run_key AND key = ANY (v_zeroed);
            DELETE FROM "public"."fc_items" i
             WHERE i.run_key = p_run_key AND i.key = ANY (v_zeroed) AND i.owner IS NULL
               AND NOT EXISTS (
                   SELECT 1 FROM "public"."fc_refs" f
                    WHERE f.run_key = p_run_key
                      AND f.key IN (SELECT i.key UNION ALL
                                    SELECT substring(i.key FROM 1 FOR c.n - 1)
                                      FROM generate_series(1, length(i.key)) c(n)
                                     WHERE get_byte(i.key, c.n - 1) = 47));
            DELETE FROM "public"."fc_items" i USING unnest(v_zeroed) n(k)
             WHERE i.run_key = p_run_key AND i.key >= n.k || '/'::bytea
               AND i.key < n.k || '0'::bytea AND i.owner IS NULL
               AND NOT EXISTS (
                   SELECT 1 FROM "public"."fc_refs" f
                    WHERE f.run_key = p_run_key
                      AND f.key IN (SELECT i.key UNION ALL
                                    SELECT substring(i.key FROM 1 FOR c.n - 1)
                                      FROM generate_series(1, length(i.key)) c(n)
                                     WHERE get_byte(i.key, c.n - 1) = 47));
        END IF;
    END IF;
    IF NOT p_count_run THEN
        RETURN cardinality(v_gone);
    END IF;
    UPDATE "public"."fc_runs" r
       SET checkpoint_count = r.checkpoint_count - cardinality(v_gone),
           forever_count = r.forever_count - v_forever,
           expires_at = CASE
               WHEN r.checkpoint_count = cardinality(v_gone) THEN 0
               WHEN r.forever_count > v_forever THEN NULL
               ELSE (SELECT max(c.expires_at) FROM "public"."fc_checkpoints" c
                      WHERE c.run_key = p_run_key AND c.expires_at IS NOT NULL)
           END,
           purge_at = CASE WHEN r.checkpoint_count = cardinality(v_gone) THEN 0 END
     WHERE r.run_key = p_run_key;
    RETURN cardinality(v_gone);
END
$fn$;

CREATE OR REPLACE FUNCTION "public"."fc_read_with_items"(p_run_key text, p_sequence bigint,
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
               c.refs, CASE WHEN encode(x.run_id, 'hex') ~ '^([0-7][0-9a-f]|c[2-9a-f][89ab][0-9a-f]|d[0-9a-f][89ab][0-9a-f]|e0[ab][0-9a-f][89ab][0-9a-f]|e[1-9a-cef][89ab][0-9a-f][89ab][0-9a-f]|ed[89][0-9a-f][89ab][0-9a-f]|f0[9ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f[1-3][89ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f48[0-9a-f][89ab][0-9a-f][89ab][0-9a-f])*$'
           AND (h.sequence IS NULL
                OR (h.sequence <= x.latest_sequence AND x.checkpoint_count > 0
                    AND (h.checkpoint_id !~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$'
                         OR split_part(h.checkpoint_id, '-', 3) = x.incarnation)
                    AND (x.expires_at IS NULL
                         OR (h.expires_at IS NOT NULL AND h.expires_at <= x.expires_at))))
          THEN x.status END, w.keys, w.vals
          FROM (SELECT * FROM "public"."fc_checkpoints" n
                 WHERE n.run_key = p_run_key AND (n.expires_at IS NULL OR n.expires_at > p_now)
                 ORDER BY n.sequence DESC LIMIT 1) c
          JOIN "public"."fc_runs" x ON x.run_key = c.run_key
        LEFT JOIN LATERAL (SELECT h.sequence, h.checkpoint_id, h.expires_at
                             FROM "public"."fc_checkpoints" h WHERE h.run_key = x.run_key
                            ORDER BY h.sequence DESC LIMIT 1) h ON true
         CROSS JOIN LATERAL (
               SELECT array_agg(w.key), array_agg(w.value) FROM (
                   SELECT i.key, i.value FROM "public"."fc_items" i
                    WHERE i.run_key = p_run_key
                      AND (i.expires_at IS NULL OR i.expires_at > p_now)
                      AND (i.owner = c.sequence OR i.key = ANY (c.refs))
                   UNION ALL
                   SELECT r.key, r.value
                     FROM (SELECT DISTINCT unnest(c.refs)) n(k)
                    CROSS JOIN LATERAL (
                          SELECT i.key, i.value FROM "public"."fc_items" i
                           WHERE i.run_key = p_run_key AND i.key >= n.k || '/'::bytea
                             AND i.key < n.k || '0'::bytea
                             AND (i.expires_at IS NULL OR i.expires_at > p_now)
                             AND i.owner IS NULL
                          OFFSET 0) r) w) w(keys, vals);
    ELSE
        RETURN QUERY
        SELECT c.sequence, c.checkpoint_id, c.created_at, c.expires_at, c.header, c.payload,
               c.refs, CASE WHEN encode(x.run_id, 'hex') ~ '^([0-7][0-9a-f]|c[2-9a-f][89ab][0-9a-f]|d[0-9a-f][89ab][0-9a-f]|e0[ab][0-9a-f][89ab][0-9a-f]|e[1-9a-cef][89ab][0-9a-f][89ab][0-9a-f]|ed[89][0-9a-f][89ab][0-9a-f]|f0[9ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f[1-3][89ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f48[0-9a-f][89ab][0-9a-f][89ab][0-9a-f])*$'
           AND (h.sequence IS NULL
                OR (h.sequence <= x.latest_sequence AND x.checkpoint_count > 0
                    AND (h.checkpoint_id !~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$'
                         OR split_part(h.checkpoint_id, '-', 3) = x.incarnation)
                    AND (x.expires_at IS NULL
                         OR (h.expires_at IS NOT NULL AND h.expires_at <= x.expires_at))))
          THEN x.status END, w.keys, w.vals
          FROM "public"."fc_checkpoints" c JOIN "public"."fc_runs" x ON x.run_key = c.run_key
        LEFT JOIN LATERAL (SELECT h.sequence, h.checkpoint_id, h.expires_at
                             FROM "public"."fc_checkpoints" h WHERE h.run_key = x.run_key
                            ORDER BY h.sequence DESC LIMIT 1) h ON true
         CROSS JOIN LATERAL (
               SELECT array_agg(w.key), array_agg(w.value) FROM (
                   SELECT i.key, i.value FROM "public"."fc_items" i
                    WHERE i.run_key = p_run_key
                      AND (i.expires_at IS NULL OR i.expires_at > p_now)
                      AND (i.owner = c.sequence OR i.key = ANY (c.refs))
                   UNION ALL
                   SELECT r.key, r.value
                     FROM (SELECT DISTINCT unnest(c.refs)) n(k)
                    CROSS JOIN LATERAL (
                          SELECT i.key, i.value FROM "public"."fc_items" i
                           WHERE i.run_key = p_run_key AND i.key >= n.k || '/'::bytea
                             AND i.key < n.k || '0'::bytea
                             AND (i.expires_at IS NULL OR i.expires_at > p_now)
                             AND i.owner IS NULL
                          OFFSET 0) r) w) w(keys, vals)
         WHERE c.run_key = p_run_key AND c.sequence = p_sequence
           AND (c.expires_at IS NULL OR c.expires_at > p_now);
    END IF;
END
$fn$;

INSERT INTO "public"."fc_migrations" (version, description) VALUES (7, 'an item a checkpoint names or owns stays when a key it is nested under is released');

CREATE OR REPLACE FUNCTION "public"."fc_append"(
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
    r "public"."fc_runs"%ROWTYPE;
    v_drop bigint[];
    v_live bigint;
    v_next boolean;
    v_found boolean;
    v_problem text;
    v_unheld bytea[];
    v_released bytea[];
BEGIN
    -- A retry of this call (same token) waits here for the call it repeats to end.
    PERFORM pg_advisory_xact_lock(26211, hashtext(p_token));
    -- The compare-and-set: only the next sequence of the live run of this incarnation.
    UPDATE "public"."fc_runs" AS x
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
        v_problem := "public"."fc_damage"(p_run_key, r.run_id, r.incarnation, p_sequence - 1,
                              r.checkpoint_count - 1, r.expires_at);
    ELSE
        SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
        v_found := FOUND;
        -- A retry of an append whose reply was lost: it was written, whatever became of its
        -- checkpoint since (deleted, pruned, its run deleted or expired).
        PERFORM 1 FROM "public"."fc_ops" o WHERE o.token = p_token;
        IF FOUND THEN
            outcome := 'ok';
            status := CASE WHEN v_found AND r.incarnation = p_incarnation THEN r.status
                           ELSE p_status END;
            RETURN;
        END IF;
        IF v_found THEN
            -- Judged in one statement: the row and the log of one snapshot (another writer
            -- may have committed since the row above was read).
            SELECT "public"."fc_damage"(x.run_key, x.run_id, x.incarnation, x.latest_sequence,
                            x.checkpoint_count, x.expires_at)
              INTO v_problem FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
        END IF;
        IF v_found AND (r.expires_at IS NULL OR r.expires_at > p_now
                        OR v_problem IS NOT NULL) THEN
            -- A live run: this call may be the retry of one whose reply was lost.
            PERFORM 1 FROM "public"."fc_checkpoints" c
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
            UPDATE "public"."fc_runs" AS x
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
                SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
                outcome := 'conflict';
                IF FOUND AND (r.expires_at IS NULL OR r.expires_at > p_now) THEN
                    latest_sequence := r.latest_sequence; incarnation := r.incarnation;
                END IF;
                RETURN;
            END IF;
            -- Leftovers of the old run: checkpoints with their owned items, the shared
            -- items they named, its labels. Unowned items stay.
            WITH gone AS (
                DELETE FROM "public"."fc_checkpoints" c WHERE c.run_key = p_run_key RETURNING c.sequence
            )
            DELETE FROM "public"."fc_items" i
             WHERE i.run_key = p_run_key AND i.owner IN (SELECT sequence FROM gone);
            WITH released AS (
                DELETE FROM "public"."fc_refs" f WHERE f.run_key = p_run_key RETURNING f.key
            )
            SELECT array_agg(key) INTO v_released FROM released;
            IF v_released IS NOT NULL THEN
                DELETE FROM "public"."fc_items" i
                 WHERE i.run_key = p_run_key AND i.owner IS NULL
                   AND i.key = ANY (v_released);
                DELETE FROM "public"."fc_items" i USING unnest(v_released) n(k)
                 WHERE i.run_key = p_run_key AND i.key >= n.k || '/'::bytea
                   AND i.key < n.k || '0'::bytea;
            END IF;
            DELETE FROM "public"."fc_labels" l WHERE l.run_key = p_run_key;
        ELSE
            INSERT INTO "public"."fc_runs" AS x (run_key, run_id, incarnation, status, created_at,
                                     updated_at, latest_sequence, checkpoint_count,
                                     forever_count, expires_at, version, data, labels)
            VALUES (p_run_key, p_run_id, p_incarnation, p_status, p_run_created_at, p_now, 0,
                    1, (p_expires_at IS NULL)::int, p_expires_at, p_version, p_data, p_labels)
            ON CONFLICT (run_key) DO NOTHING
            RETURNING x.* INTO r;
            IF NOT FOUND THEN
                -- Another writer created the run first (its transaction has committed).
                SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
                outcome := 'conflict';
                IF FOUND AND (r.expires_at IS NULL OR r.expires_at > p_now) THEN
                    latest_sequence := r.latest_sequence; incarnation := r.incarnation;
                END IF;
                RETURN;
            END IF;
        END IF;
        IF cardinality(p_labels) > 0 THEN
            INSERT INTO "public"."fc_labels" (label, created_at, run_key)
            SELECT DISTINCT label, p_run_created_at, p_run_key FROM unnest(p_labels) label;
        END IF;
    END IF;

    IF cardinality(p_refs) > 0 THEN
        -- The run row is locked by now: a removal of the run's checkpoints (which releases
        -- their shared items) waits for this transaction.
        SELECT array_agg(wanted.k ORDER BY wanted.n) INTO v_unheld
          FROM (SELECT t.k, min(t.n) AS n
                  FROM unnest(p_refs) WITH ORDINALITY AS t(k, n)
                 WHERE NOT (t.k = ANY (coalesce(p_item_keys, '{}')))
                 GROUP BY t.k) wanted
         WHERE NOT EXISTS (SELECT 1 FROM "public"."fc_items" i
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

    INSERT INTO "public"."fc_checkpoints" (run_key, sequence, checkpoint_id, created_at, expires_at,
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
        INSERT INTO "public"."fc_items" AS i (run_key, key, value, owner, expires_at)
        SELECT p_run_key, k, v, o, e
          FROM unnest(p_item_keys, p_item_values, p_item_owners, p_item_expiries) AS t(k, v, o, e)
        ON CONFLICT (run_key, key) DO UPDATE
           SET value = excluded.value, owner = excluded.owner, expires_at = excluded.expires_at
         WHERE i.expires_at IS NOT NULL AND i.expires_at <= p_now;
    END IF;
    IF p_refs IS NOT NULL AND cardinality(p_refs) > 0 THEN
        INSERT INTO "public"."fc_refs" AS f (run_key, key, holders)
        SELECT DISTINCT p_run_key, k, 1 FROM unnest(p_refs) k
        ON CONFLICT (run_key, key) DO UPDATE SET holders = f.holders + 1;
    END IF;

    -- Pruning: expired checkpoints, then the oldest beyond keep_latest.
    v_live := r.checkpoint_count;
    IF r.checkpoint_count > r.forever_count THEN
        v_drop := ARRAY(SELECT c.sequence FROM "public"."fc_checkpoints" c
                         WHERE c.run_key = p_run_key AND c.expires_at <= p_now);
        v_live := v_live - cardinality(v_drop);
    END IF;
    IF p_keep_latest IS NOT NULL AND v_live > p_keep_latest THEN
        v_drop := coalesce(v_drop, '{}') || ARRAY(
            SELECT c.sequence FROM "public"."fc_checkpoints" c
             WHERE c.run_key = p_run_key
               AND (c.expires_at IS NULL OR c.expires_at > p_now)
               AND c.sequence <= p_sequence - p_keep_latest
             ORDER BY c.sequence LIMIT v_live - p_keep_latest);
    END IF;
    IF cardinality(v_drop) > 0 THEN
        PERFORM "public"."fc_remove"(p_run_key, v_drop, true);
    END IF;
    -- Remembered for a retry whose reply is lost (see migration 8), and two memos after it in
    -- token order taken out if they expired.
    INSERT INTO "public"."fc_ops" (token, result, expires_at)
    VALUES (p_token, p_sequence, extract(epoch FROM clock_timestamp()) + 300);
    DELETE FROM "public"."fc_ops" o
     WHERE o.token IN (SELECT n.token FROM "public"."fc_ops" n WHERE n.token > p_token
                        ORDER BY n.token LIMIT 2)
       AND o.expires_at <= extract(epoch FROM clock_timestamp());
    outcome := 'ok'; status := r.status;
END
$fn$;

CREATE OR REPLACE FUNCTION "public"."fc_damaged_runs"(p_run_key text, p_after text, p_limit integer)
RETURNS TABLE (run_key text, problem text, checkpoints bigint, sequence bigint,
               checkpoint_id text, created_at double precision, expires_at double precision,
               header bytea)
LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH judged AS (
        SELECT x.run_key, coalesce(
                   "public"."fc_damage"(x.run_key, x.run_id, x.incarnation, x.latest_sequence,
                            x.checkpoint_count, x.expires_at),
                   CASE
                   WHEN array_position(x.labels, NULL) IS NOT NULL
                       THEN 'holds a NULL label'
                   WHEN EXISTS (SELECT 1 FROM unnest(x.labels) label
                                 WHERE encode(label, 'hex') !~ '^([0-7][0-9a-f]|c[2-9a-f][89ab][0-9a-f]|d[0-9a-f][89ab][0-9a-f]|e0[ab][0-9a-f][89ab][0-9a-f]|e[1-9a-cef][89ab][0-9a-f][89ab][0-9a-f]|ed[89][0-9a-f][89ab][0-9a-f]|f0[9ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f[1-3][89ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f48[0-9a-f][89ab][0-9a-f][89ab][0-9a-f])*$')
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
          FROM "public"."fc_runs" x
         CROSS JOIN LATERAL (
               SELECT count(*) AS held, count(*) FILTER (WHERE c.expires_at IS NULL) AS forever,
                      max(c.expires_at) AS latest
                 FROM "public"."fc_checkpoints" c WHERE c.run_key = x.run_key) l
         WHERE x.run_key > p_after AND (p_run_key IS NULL OR x.run_key = p_run_key)
         ORDER BY x.run_key LIMIT p_limit
    )
    SELECT j.run_key, j.problem, j.held, n.sequence, n.checkpoint_id, n.created_at,
           n.expires_at, n.header
      FROM judged j
      LEFT JOIN LATERAL (
           SELECT c.sequence, c.checkpoint_id, c.created_at, c.expires_at, c.header
             FROM "public"."fc_checkpoints" c
            WHERE c.run_key = j.run_key AND j.problem IS NOT NULL
            ORDER BY c.sequence DESC LIMIT 1) n ON true
     ORDER BY j.run_key;
END
$fn$;

INSERT INTO "public"."fc_migrations" (version, description) VALUES (8, 'a create sent again after a lost reply is acknowledged also when its checkpoint went meanwhile; pruning never takes the new checkpoint; damaged_runs reports NULL labels');

CREATE OR REPLACE FUNCTION "public"."fc_append"(
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
    r "public"."fc_runs"%ROWTYPE;
    v_drop bigint[];
    v_live bigint;
    v_next boolean;
    v_found boolean;
    v_problem text;
    v_unheld bytea[];
    v_released bytea[];
BEGIN
    -- A retry of this call (same token) waits here for the call it repeats to end.
    PERFORM pg_advisory_xact_lock(26211, hashtext(p_token));
    -- The compare-and-set: only the next sequence of the live run of this incarnation.
    UPDATE "public"."fc_runs" AS x
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
        v_problem := "public"."fc_damage"(p_run_key, r.run_id, r.incarnation, p_sequence - 1,
                              r.checkpoint_count - 1, r.expires_at);
    ELSE
        SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
        v_found := FOUND;
        -- A retry of an append whose reply was lost: it was written, whatever became of its
        -- checkpoint since (deleted, pruned, its run deleted or expired).
        PERFORM 1 FROM "public"."fc_ops" o WHERE o.token = p_token;
        IF FOUND THEN
            outcome := 'ok';
            status := CASE WHEN v_found AND r.incarnation = p_incarnation THEN r.status
                           ELSE p_status END;
            RETURN;
        END IF;
        IF v_found THEN
            -- Judged in one statement: the row and the log of one snapshot (another writer
            -- may have committed since the row above was read).
            SELECT "public"."fc_damage"(x.run_key, x.run_id, x.incarnation, x.latest_sequence,
                            x.checkpoint_count, x.expires_at)
              INTO v_problem FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
        END IF;
        IF v_found AND (r.expires_at IS NULL OR r.expires_at > p_now
                        OR v_problem IS NOT NULL) THEN
            -- A live run: this call may be the retry of one whose reply was lost.
            PERFORM 1 FROM "public"."fc_checkpoints" c
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
            UPDATE "public"."fc_runs" AS x
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
                SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
                outcome := 'conflict';
                IF FOUND AND (r.expires_at IS NULL OR r.expires_at > p_now) THEN
                    latest_sequence := r.latest_sequence; incarnation := r.incarnation;
                END IF;
                RETURN;
            END IF;
            -- Leftovers of the old run: checkpoints with their owned items, the shared
            -- items they named, its labels. Unowned items stay.
            WITH gone AS (
                DELETE FROM "public"."fc_checkpoints" c WHERE c.run_key = p_run_key RETURNING c.sequence
            )
            DELETE FROM "public"."fc_items" i
             WHERE i.run_key = p_run_key AND i.owner IN (SELECT sequence FROM gone);
            WITH released AS (
                DELETE FROM "public"."fc_refs" f WHERE f.run_key = p_run_key RETURNING f.key
            )
            SELECT array_agg(key) INTO v_released FROM released;
            IF v_released IS NOT NULL THEN
                DELETE FROM "public"."fc_items" i
                 WHERE i.run_key = p_run_key AND i.owner IS NULL
                   AND i.key = ANY (v_released);
                DELETE FROM "public"."fc_items" i USING unnest(v_released) n(k)
                 WHERE i.run_key = p_run_key AND i.key >= n.k || '/'::bytea
                   AND i.key < n.k || '0'::bytea;
            END IF;
            DELETE FROM "public"."fc_labels" l WHERE l.run_key = p_run_key;
        ELSE
            INSERT INTO "public"."fc_runs" AS x (run_key, run_id, incarnation, status, created_at,
                                     updated_at, latest_sequence, checkpoint_count,
                                     forever_count, expires_at, version, data, labels)
            VALUES (p_run_key, p_run_id, p_incarnation, p_status, p_run_created_at, p_now, 0,
                    1, (p_expires_at IS NULL)::int, p_expires_at, p_version, p_data, p_labels)
            ON CONFLICT (run_key) DO NOTHING
            RETURNING x.* INTO r;
            IF NOT FOUND THEN
                -- Another writer created the run first (its transaction has committed).
                SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
                outcome := 'conflict';
                IF FOUND AND (r.expires_at IS NULL OR r.expires_at > p_now) THEN
                    latest_sequence := r.latest_sequence; incarnation := r.incarnation;
                END IF;
                RETURN;
            END IF;
        END IF;
        IF cardinality(p_labels) > 0 THEN
            INSERT INTO "public"."fc_labels" (label, created_at, run_key)
            SELECT DISTINCT label, p_run_created_at, p_run_key FROM unnest(p_labels) label;
        END IF;
    END IF;

    IF cardinality(p_refs) > 0 THEN
        -- The run row is locked by now: a removal of the run's checkpoints (which releases
        -- their shared items) waits for this transaction.
        SELECT array_agg(wanted.k ORDER BY wanted.n) INTO v_unheld
          FROM (SELECT t.k, min(t.n) AS n
                  FROM unnest(p_refs) WITH ORDINALITY AS t(k, n)
                 WHERE NOT (t.k = ANY (coalesce(p_item_keys, '{}')))
                 GROUP BY t.k) wanted
         WHERE NOT EXISTS (SELECT 1 FROM "public"."fc_items" i
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

    INSERT INTO "public"."fc_checkpoints" (run_key, sequence, checkpoint_id, created_at, expires_at,
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
        INSERT INTO "public"."fc_items" AS i (run_key, key, value, owner, expires_at)
        SELECT p_run_key, k, v, o, e
          FROM unnest(p_item_keys, p_item_values, p_item_owners, p_item_expiries) AS t(k, v, o, e)
        ON CONFLICT (run_key, key) DO UPDATE
           SET value = excluded.value, owner = excluded.owner, expires_at = excluded.expires_at
         WHERE i.expires_at IS NOT NULL AND i.expires_at <= p_now;
    END IF;
    IF p_refs IS NOT NULL AND cardinality(p_refs) > 0 THEN
        INSERT INTO "public"."fc_refs" AS f (run_key, key, holders)
        SELECT DISTINCT p_run_key, k, 1 FROM unnest(p_refs) k
        ON CONFLICT (run_key, key) DO UPDATE SET holders = f.holders + 1;
    END IF;

    -- Pruning: expired checkpoints, then the oldest beyond keep_latest.
    v_live := r.checkpoint_count;
    IF r.checkpoint_count > r.forever_count THEN
        v_drop := ARRAY(SELECT c.sequence FROM "public"."fc_checkpoints" c
                         WHERE c.run_key = p_run_key AND c.expires_at <= p_now);
        v_live := v_live - cardinality(v_drop);
    END IF;
    IF p_keep_latest IS NOT NULL AND v_live > p_keep_latest THEN
        v_drop := coalesce(v_drop, '{}') || ARRAY(
            SELECT c.sequence FROM "public"."fc_checkpoints" c
             WHERE c.run_key = p_run_key
               AND (c.expires_at IS NULL OR c.expires_at > p_now)
               AND c.sequence < (
                   SELECT n.sequence FROM "public"."fc_checkpoints" n
                    WHERE n.run_key = p_run_key
                      AND (n.expires_at IS NULL OR n.expires_at > p_now)
                    ORDER BY n.sequence DESC OFFSET p_keep_latest - 1 LIMIT 1)
             ORDER BY c.sequence LIMIT v_live - p_keep_latest);
    END IF;
    IF cardinality(v_drop) > 0 THEN
        PERFORM "public"."fc_remove"(p_run_key, v_drop, true);
    END IF;
    -- Remembered for a retry whose reply is lost (see migration 8), and two memos after it in
    -- token order taken out if they expired.
    INSERT INTO "public"."fc_ops" (token, result, expires_at)
    VALUES (p_token, p_sequence, extract(epoch FROM clock_timestamp()) + 300);
    DELETE FROM "public"."fc_ops" o
     WHERE o.token IN (SELECT n.token FROM "public"."fc_ops" n WHERE n.token > p_token
                        ORDER BY n.token LIMIT 2)
       AND o.expires_at <= extract(epoch FROM clock_timestamp());
    outcome := 'ok'; status := r.status;
END
$fn$;

INSERT INTO "public"."fc_migrations" (version, description) VALUES (9, 'pruning never takes one of the newest checkpoints a run holds, also after a run row was put back from before a delete');

CREATE OR REPLACE FUNCTION "public"."fc_damage"(p_run_key text, p_run_id bytea, p_incarnation text, p_latest bigint,
                         p_held bigint, p_expires_at double precision)
RETURNS text LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
DECLARE
    v_sequence bigint;
    v_id text;
    v_expires_at double precision;
BEGIN
    IF encode(p_run_id, 'hex') !~ '^([0-7][0-9a-f]|c[2-9a-f][89ab][0-9a-f]|d[0-9a-f][89ab][0-9a-f]|e0[ab][0-9a-f][89ab][0-9a-f]|e[1-9a-cef][89ab][0-9a-f][89ab][0-9a-f]|ed[89][0-9a-f][89ab][0-9a-f]|f0[9ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f[1-3][89ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f48[0-9a-f][89ab][0-9a-f][89ab][0-9a-f])*$' THEN
        RETURN 'holds a run id that is not UTF-8 text';
    END IF;
    SELECT n.sequence, n.checkpoint_id, n.expires_at INTO v_sequence, v_id, v_expires_at
      FROM "public"."fc_checkpoints" n WHERE n.run_key = p_run_key AND NOT (n.checkpoint_id ~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$' AND split_part(n.checkpoint_id, '-', 2) <> p_run_key)
     ORDER BY n.sequence DESC LIMIT 1;
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
$fn$;

CREATE OR REPLACE FUNCTION "public"."fc_get"(p_run_key text, p_sequence bigint, p_now double precision)
RETURNS TABLE (sequence bigint, checkpoint_id text, created_at double precision,
               expires_at double precision, header bytea, payload bytea, refs bytea[],
               status text)
LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT c.sequence, c.checkpoint_id, c.created_at, c.expires_at, c.header, c.payload,
           c.refs, CASE WHEN encode(x.run_id, 'hex') ~ '^([0-7][0-9a-f]|c[2-9a-f][89ab][0-9a-f]|d[0-9a-f][89ab][0-9a-f]|e0[ab][0-9a-f][89ab][0-9a-f]|e[1-9a-cef][89ab][0-9a-f][89ab][0-9a-f]|ed[89][0-9a-f][89ab][0-9a-f]|f0[9ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f[1-3][89ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f48[0-9a-f][89ab][0-9a-f][89ab][0-9a-f])*$'
           AND (h.sequence IS NULL
                OR (h.sequence <= x.latest_sequence AND x.checkpoint_count > 0
                    AND (h.checkpoint_id !~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$'
                         OR split_part(h.checkpoint_id, '-', 3) = x.incarnation)
                    AND (x.expires_at IS NULL
                         OR (h.expires_at IS NOT NULL AND h.expires_at <= x.expires_at))))
          THEN x.status END
      FROM "public"."fc_checkpoints" c JOIN "public"."fc_runs" x ON x.run_key = c.run_key
        LEFT JOIN LATERAL (SELECT h.sequence, h.checkpoint_id, h.expires_at
                             FROM "public"."fc_checkpoints" h WHERE h.run_key = x.run_key
                              AND NOT (h.checkpoint_id ~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$' AND split_part(h.checkpoint_id, '-', 2) <> x.run_key)
                            ORDER BY h.sequence DESC LIMIT 1) h ON true
     WHERE c.run_key = p_run_key AND c.sequence = p_sequence
       AND (c.expires_at IS NULL OR c.expires_at > p_now);
END
$fn$;

CREATE OR REPLACE FUNCTION "public"."fc_latest"(p_run_key text, p_now double precision)
RETURNS TABLE (sequence bigint, checkpoint_id text, created_at double precision,
               expires_at double precision, header bytea, payload bytea, refs bytea[],
               status text)
LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT c.sequence, c.checkpoint_id, c.created_at, c.expires_at, c.header, c.payload,
           c.refs, CASE WHEN encode(x.run_id, 'hex') ~ '^([0-7][0-9a-f]|c[2-9a-f][89ab][0-9a-f]|d[0-9a-f][89ab][0-9a-f]|e0[ab][0-9a-f][89ab][0-9a-f]|e[1-9a-cef][89ab][0-9a-f][89ab][0-9a-f]|ed[89][0-9a-f][89ab][0-9a-f]|f0[9ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f[1-3][89ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f48[0-9a-f][89ab][0-9a-f][89ab][0-9a-f])*$'
           AND (h.sequence IS NULL
                OR (h.sequence <= x.latest_sequence AND x.checkpoint_count > 0
                    AND (h.checkpoint_id !~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$'
                         OR split_part(h.checkpoint_id, '-', 3) = x.incarnation)
                    AND (x.expires_at IS NULL
                         OR (h.expires_at IS NOT NULL AND h.expires_at <= x.expires_at))))
          THEN x.status END
      FROM (SELECT * FROM "public"."fc_checkpoints" n
             WHERE n.run_key = p_run_key AND (n.expires_at IS NULL OR n.expires_at > p_now)
             ORDER BY n.sequence DESC LIMIT 1) c
      JOIN "public"."fc_runs" x ON x.run_key = c.run_key
        LEFT JOIN LATERAL (SELECT h.sequence, h.checkpoint_id, h.expires_at
                             FROM "public"."fc_checkpoints" h WHERE h.run_key = x.run_key
                              AND NOT (h.checkpoint_id ~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$' AND split_part(h.checkpoint_id, '-', 2) <> x.run_key)
                            ORDER BY h.sequence DESC LIMIT 1) h ON true;
END
$fn$;

CREATE OR REPLACE FUNCTION "public"."fc_count_runs"(p_status text, p_now double precision)
RETURNS bigint LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
BEGIN
    IF p_status IS NULL THEN
        RETURN (SELECT count(*) FROM "public"."fc_runs" x
        LEFT JOIN LATERAL (SELECT h.sequence, h.checkpoint_id, h.expires_at
                             FROM "public"."fc_checkpoints" h WHERE h.run_key = x.run_key
                              AND NOT (h.checkpoint_id ~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$' AND split_part(h.checkpoint_id, '-', 2) <> x.run_key)
                            ORDER BY h.sequence DESC LIMIT 1) h ON true
                 WHERE (x.expires_at IS NULL OR x.expires_at > p_now)
                   AND CASE WHEN encode(x.run_id, 'hex') ~ '^([0-7][0-9a-f]|c[2-9a-f][89ab][0-9a-f]|d[0-9a-f][89ab][0-9a-f]|e0[ab][0-9a-f][89ab][0-9a-f]|e[1-9a-cef][89ab][0-9a-f][89ab][0-9a-f]|ed[89][0-9a-f][89ab][0-9a-f]|f0[9ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f[1-3][89ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f48[0-9a-f][89ab][0-9a-f][89ab][0-9a-f])*$'
           AND (h.sequence IS NULL
                OR (h.sequence <= x.latest_sequence AND x.checkpoint_count > 0
                    AND (h.checkpoint_id !~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$'
                         OR split_part(h.checkpoint_id, '-', 3) = x.incarnation)
                    AND (x.expires_at IS NULL
                         OR (h.expires_at IS NOT NULL AND h.expires_at <= x.expires_at))))
          THEN x.status END IS NOT NULL);
    END IF;
    RETURN (SELECT count(*) FROM "public"."fc_runs" x
        LEFT JOIN LATERAL (SELECT h.sequence, h.checkpoint_id, h.expires_at
                             FROM "public"."fc_checkpoints" h WHERE h.run_key = x.run_key
                              AND NOT (h.checkpoint_id ~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$' AND split_part(h.checkpoint_id, '-', 2) <> x.run_key)
                            ORDER BY h.sequence DESC LIMIT 1) h ON true
             WHERE x.status = p_status AND (x.expires_at IS NULL OR x.expires_at > p_now)
               AND CASE WHEN encode(x.run_id, 'hex') ~ '^([0-7][0-9a-f]|c[2-9a-f][89ab][0-9a-f]|d[0-9a-f][89ab][0-9a-f]|e0[ab][0-9a-f][89ab][0-9a-f]|e[1-9a-cef][89ab][0-9a-f][89ab][0-9a-f]|ed[89][0-9a-f][89ab][0-9a-f]|f0[9ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f[1-3][89ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f48[0-9a-f][89ab][0-9a-f][89ab][0-9a-f])*$'
           AND (h.sequence IS NULL
                OR (h.sequence <= x.latest_sequence AND x.checkpoint_count > 0
                    AND (h.checkpoint_id !~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$'
                         OR split_part(h.checkpoint_id, '-', 3) = x.incarnation)
                    AND (x.expires_at IS NULL
                         OR (h.expires_at IS NOT NULL AND h.expires_at <= x.expires_at))))
          THEN x.status END IS NOT NULL);
END
$fn$;

CREATE OR REPLACE FUNCTION "public"."fc_read_with_items"(p_run_key text, p_sequence bigint,
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
               c.refs, CASE WHEN encode(x.run_id, 'hex') ~ '^([0-7][0-9a-f]|c[2-9a-f][89ab][0-9a-f]|d[0-9a-f][89ab][0-9a-f]|e0[ab][0-9a-f][89ab][0-9a-f]|e[1-9a-cef][89ab][0-9a-f][89ab][0-9a-f]|ed[89][0-9a-f][89ab][0-9a-f]|f0[9ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f[1-3][89ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f48[0-9a-f][89ab][0-9a-f][89ab][0-9a-f])*$'
           AND (h.sequence IS NULL
                OR (h.sequence <= x.latest_sequence AND x.checkpoint_count > 0
                    AND (h.checkpoint_id !~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$'
                         OR split_part(h.checkpoint_id, '-', 3) = x.incarnation)
                    AND (x.expires_at IS NULL
                         OR (h.expires_at IS NOT NULL AND h.expires_at <= x.expires_at))))
          THEN x.status END, w.keys, w.vals
          FROM (SELECT * FROM "public"."fc_checkpoints" n
                 WHERE n.run_key = p_run_key AND (n.expires_at IS NULL OR n.expires_at > p_now)
                 ORDER BY n.sequence DESC LIMIT 1) c
          JOIN "public"."fc_runs" x ON x.run_key = c.run_key
        LEFT JOIN LATERAL (SELECT h.sequence, h.checkpoint_id, h.expires_at
                             FROM "public"."fc_checkpoints" h WHERE h.run_key = x.run_key
                              AND NOT (h.checkpoint_id ~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$' AND split_part(h.checkpoint_id, '-', 2) <> x.run_key)
                            ORDER BY h.sequence DESC LIMIT 1) h ON true
         CROSS JOIN LATERAL (
               SELECT array_agg(w.key), array_agg(w.value) FROM (
                   SELECT i.key, i.value FROM "public"."fc_items" i
                    WHERE i.run_key = p_run_key
                      AND (i.expires_at IS NULL OR i.expires_at > p_now)
                      AND (i.owner = c.sequence OR i.key = ANY (c.refs))
                   UNION ALL
                   SELECT r.key, r.value
                     FROM (SELECT DISTINCT unnest(c.refs)) n(k)
                    CROSS JOIN LATERAL (
                          SELECT i.key, i.value FROM "public"."fc_items" i
                           WHERE i.run_key = p_run_key AND i.key >= n.k || '/'::bytea
                             AND i.key < n.k || '0'::bytea
                             AND (i.expires_at IS NULL OR i.expires_at > p_now)
                             AND i.owner IS NULL
                          OFFSET 0) r) w) w(keys, vals);
    ELSE
        RETURN QUERY
        SELECT c.sequence, c.checkpoint_id, c.created_at, c.expires_at, c.header, c.payload,
               c.refs, CASE WHEN encode(x.run_id, 'hex') ~ '^([0-7][0-9a-f]|c[2-9a-f][89ab][0-9a-f]|d[0-9a-f][89ab][0-9a-f]|e0[ab][0-9a-f][89ab][0-9a-f]|e[1-9a-cef][89ab][0-9a-f][89ab][0-9a-f]|ed[89][0-9a-f][89ab][0-9a-f]|f0[9ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f[1-3][89ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f48[0-9a-f][89ab][0-9a-f][89ab][0-9a-f])*$'
           AND (h.sequence IS NULL
                OR (h.sequence <= x.latest_sequence AND x.checkpoint_count > 0
                    AND (h.checkpoint_id !~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$'
                         OR split_part(h.checkpoint_id, '-', 3) = x.incarnation)
                    AND (x.expires_at IS NULL
                         OR (h.expires_at IS NOT NULL AND h.expires_at <= x.expires_at))))
          THEN x.status END, w.keys, w.vals
          FROM "public"."fc_checkpoints" c JOIN "public"."fc_runs" x ON x.run_key = c.run_key
        LEFT JOIN LATERAL (SELECT h.sequence, h.checkpoint_id, h.expires_at
                             FROM "public"."fc_checkpoints" h WHERE h.run_key = x.run_key
                              AND NOT (h.checkpoint_id ~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$' AND split_part(h.checkpoint_id, '-', 2) <> x.run_key)
                            ORDER BY h.sequence DESC LIMIT 1) h ON true
         CROSS JOIN LATERAL (
               SELECT array_agg(w.key), array_agg(w.value) FROM (
                   SELECT i.key, i.value FROM "public"."fc_items" i
                    WHERE i.run_key = p_run_key
                      AND (i.expires_at IS NULL OR i.expires_at > p_now)
                      AND (i.owner = c.sequence OR i.key = ANY (c.refs))
                   UNION ALL
                   SELECT r.key, r.value
                     FROM (SELECT DISTINCT unnest(c.refs)) n(k)
                    CROSS JOIN LATERAL (
                          SELECT i.key, i.value FROM "public"."fc_items" i
                           WHERE i.run_key = p_run_key AND i.key >= n.k || '/'::bytea
                             AND i.key < n.k || '0'::bytea
                             AND (i.expires_at IS NULL OR i.expires_at > p_now)
                             AND i.owner IS NULL
                          OFFSET 0) r) w) w(keys, vals)
         WHERE c.run_key = p_run_key AND c.sequence = p_sequence
           AND (c.expires_at IS NULL OR c.expires_at > p_now);
    END IF;
END
$fn$;

CREATE OR REPLACE FUNCTION "public"."fc_append"(
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
    r "public"."fc_runs"%ROWTYPE;
    v_drop bigint[];
    v_live bigint;
    v_next boolean;
    v_found boolean;
    v_problem text;
    v_unheld bytea[];
    v_released bytea[];
BEGIN
    -- A retry of this call (same token) waits here for the call it repeats to end.
    PERFORM pg_advisory_xact_lock(26211, hashtext(p_token));
    -- The compare-and-set: only the next sequence of the live run of this incarnation.
    UPDATE "public"."fc_runs" AS x
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
        v_problem := "public"."fc_damage"(p_run_key, r.run_id, r.incarnation, p_sequence - 1,
                              r.checkpoint_count - 1, r.expires_at);
        IF v_problem IS NULL AND r.run_id <> p_run_id THEN
            -- Copied over from another run: the run key derives from the caller's run id.
            v_problem := 'names another run (it was copied over from it)';
        END IF;
    ELSE
        SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
        v_found := FOUND;
        -- A retry of an append whose reply was lost: it was written, whatever became of its
        -- checkpoint since (deleted, pruned, its run deleted or expired).
        PERFORM 1 FROM "public"."fc_ops" o WHERE o.token = p_token;
        IF FOUND THEN
            outcome := 'ok';
            status := CASE WHEN v_found AND r.incarnation = p_incarnation THEN r.status
                           ELSE p_status END;
            RETURN;
        END IF;
        IF v_found THEN
            -- Judged in one statement: the row and the log of one snapshot (another writer
            -- may have committed since the row above was read).
            SELECT "public"."fc_damage"(x.run_key, x.run_id, x.incarnation, x.latest_sequence,
                            x.checkpoint_count, x.expires_at)
              INTO v_problem FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
            IF v_problem IS NULL AND r.run_id <> p_run_id THEN
                -- Copied over from another run: the run key derives from the caller's run id.
                v_problem := 'names another run (it was copied over from it)';
            END IF;
        END IF;
        IF v_found AND (r.expires_at IS NULL OR r.expires_at > p_now
                        OR v_problem IS NOT NULL) THEN
            -- A live run: this call may be the retry of one whose reply was lost.
            PERFORM 1 FROM "public"."fc_checkpoints" c
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
            UPDATE "public"."fc_runs" AS x
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
                SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
                outcome := 'conflict';
                IF FOUND AND (r.expires_at IS NULL OR r.expires_at > p_now) THEN
                    latest_sequence := r.latest_sequence; incarnation := r.incarnation;
                END IF;
                RETURN;
            END IF;
            -- Leftovers of the old run: checkpoints with their owned items, the shared
            -- items they named, its labels. Unowned items stay.
            WITH gone AS (
                DELETE FROM "public"."fc_checkpoints" c WHERE c.run_key = p_run_key RETURNING c.sequence
            )
            DELETE FROM "public"."fc_items" i
             WHERE i.run_key = p_run_key AND i.owner IN (SELECT sequence FROM gone);
            WITH released AS (
                DELETE FROM "public"."fc_refs" f WHERE f.run_key = p_run_key RETURNING f.key
            )
            SELECT array_agg(key) INTO v_released FROM released;
            IF v_released IS NOT NULL THEN
                DELETE FROM "public"."fc_items" i
                 WHERE i.run_key = p_run_key AND i.owner IS NULL
                   AND i.key = ANY (v_released);
                DELETE FROM "public"."fc_items" i USING unnest(v_released) n(k)
                 WHERE i.run_key = p_run_key AND i.key >= n.k || '/'::bytea
                   AND i.key < n.k || '0'::bytea;
            END IF;
            DELETE FROM "public"."fc_labels" l WHERE l.run_key = p_run_key;
        ELSE
            INSERT INTO "public"."fc_runs" AS x (run_key, run_id, incarnation, status, created_at,
                                     updated_at, latest_sequence, checkpoint_count,
                                     forever_count, expires_at, version, data, labels)
            VALUES (p_run_key, p_run_id, p_incarnation, p_status, p_run_created_at, p_now, 0,
                    1, (p_expires_at IS NULL)::int, p_expires_at, p_version, p_data, p_labels)
            ON CONFLICT (run_key) DO NOTHING
            RETURNING x.* INTO r;
            IF NOT FOUND THEN
                -- Another writer created the run first (its transaction has committed).
                SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
                outcome := 'conflict';
                IF FOUND AND (r.expires_at IS NULL OR r.expires_at > p_now) THEN
                    latest_sequence := r.latest_sequence; incarnation := r.incarnation;
                END IF;
                RETURN;
            END IF;
        END IF;
        IF cardinality(p_labels) > 0 THEN
            INSERT INTO "public"."fc_labels" (label, created_at, run_key)
            SELECT DISTINCT label, p_run_created_at, p_run_key FROM unnest(p_labels) label;
        END IF;
    END IF;

    IF cardinality(p_refs) > 0 THEN
        -- The run row is locked by now: a removal of the run's checkpoints (which releases
        -- their shared items) waits for this transaction.
        SELECT array_agg(wanted.k ORDER BY wanted.n) INTO v_unheld
          FROM (SELECT t.k, min(t.n) AS n
                  FROM unnest(p_refs) WITH ORDINALITY AS t(k, n)
                 WHERE NOT (t.k = ANY (coalesce(p_item_keys, '{}')))
                 GROUP BY t.k) wanted
         WHERE NOT EXISTS (SELECT 1 FROM "public"."fc_items" i
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

    INSERT INTO "public"."fc_checkpoints" (run_key, sequence, checkpoint_id, created_at, expires_at,
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
        INSERT INTO "public"."fc_items" AS i (run_key, key, value, owner, expires_at)
        SELECT p_run_key, k, v, o, e
          FROM unnest(p_item_keys, p_item_values, p_item_owners, p_item_expiries) AS t(k, v, o, e)
        ON CONFLICT (run_key, key) DO UPDATE
           SET value = excluded.value, owner = excluded.owner, expires_at = excluded.expires_at
         WHERE i.expires_at IS NOT NULL AND i.expires_at <= p_now;
    END IF;
    IF p_refs IS NOT NULL AND cardinality(p_refs) > 0 THEN
        INSERT INTO "public"."fc_refs" AS f (run_key, key, holders)
        SELECT DISTINCT p_run_key, k, 1 FROM unnest(p_refs) k
        ON CONFLICT (run_key, key) DO UPDATE SET holders = f.holders + 1;
    END IF;

    -- Pruning: expired checkpoints, then the oldest beyond keep_latest.
    v_live := r.checkpoint_count;
    IF r.checkpoint_count > r.forever_count THEN
        v_drop := ARRAY(SELECT c.sequence FROM "public"."fc_checkpoints" c
                         WHERE c.run_key = p_run_key AND c.expires_at <= p_now);
        v_live := v_live - cardinality(v_drop);
    END IF;
    IF p_keep_latest IS NOT NULL AND v_live > p_keep_latest THEN
        v_drop := coalesce(v_drop, '{}') || ARRAY(
            SELECT c.sequence FROM "public"."fc_checkpoints" c
             WHERE c.run_key = p_run_key
               AND (c.expires_at IS NULL OR c.expires_at > p_now)
               AND c.sequence < (
                   SELECT n.sequence FROM "public"."fc_checkpoints" n
                    WHERE n.run_key = p_run_key
                      AND (n.expires_at IS NULL OR n.expires_at > p_now)
                    ORDER BY n.sequence DESC OFFSET p_keep_latest - 1 LIMIT 1)
             ORDER BY c.sequence LIMIT v_live - p_keep_latest);
    END IF;
    IF cardinality(v_drop) > 0 THEN
        PERFORM "public"."fc_remove"(p_run_key, v_drop, true);
    END IF;
    -- Remembered for a retry whose reply is lost (see migration 8), and two memos after it in
    -- token order taken out if they expired.
    INSERT INTO "public"."fc_ops" (token, result, expires_at)
    VALUES (p_token, p_sequence, extract(epoch FROM clock_timestamp()) + 300);
    DELETE FROM "public"."fc_ops" o
     WHERE o.token IN (SELECT n.token FROM "public"."fc_ops" n WHERE n.token > p_token
                        ORDER BY n.token LIMIT 2)
       AND o.expires_at <= extract(epoch FROM clock_timestamp());
    outcome := 'ok'; status := r.status;
END
$fn$;

CREATE OR REPLACE FUNCTION "public"."fc_damaged_runs"(p_run_key text, p_after text, p_limit integer)
RETURNS TABLE (run_key text, problem text, checkpoints bigint, sequence bigint,
               checkpoint_id text, created_at double precision, expires_at double precision,
               header bytea)
LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH judged AS (
        SELECT x.run_key, coalesce(
                   "public"."fc_damage"(x.run_key, x.run_id, x.incarnation, x.latest_sequence,
                            x.checkpoint_count, x.expires_at),
                   CASE
                   WHEN array_position(x.labels, NULL) IS NOT NULL
                       THEN 'holds a NULL label'
                   WHEN EXISTS (SELECT 1 FROM unnest(x.labels) label
                                 WHERE encode(label, 'hex') !~ '^([0-7][0-9a-f]|c[2-9a-f][89ab][0-9a-f]|d[0-9a-f][89ab][0-9a-f]|e0[ab][0-9a-f][89ab][0-9a-f]|e[1-9a-cef][89ab][0-9a-f][89ab][0-9a-f]|ed[89][0-9a-f][89ab][0-9a-f]|f0[9ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f[1-3][89ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f48[0-9a-f][89ab][0-9a-f][89ab][0-9a-f])*$')
                       THEN 'holds a label that is not UTF-8 text'
                   WHEN x.created_at IN ('NaN', 'Infinity', '-Infinity') THEN format(
                       'says the run was created at %s', x.created_at)
                   WHEN x.latest_sequence > 9223372036854775806 THEN format(
                       'knows sequences up to %s, more than a checkpoint id can name',
                       x.latest_sequence)
                   WHEN x.version = 9223372036854775807 THEN format(
                       'is at version %s, which no status change can raise', x.version)
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
          FROM "public"."fc_runs" x
         CROSS JOIN LATERAL (
               SELECT count(*) AS held, count(*) FILTER (WHERE c.expires_at IS NULL) AS forever,
                      max(c.expires_at) AS latest
                 FROM "public"."fc_checkpoints" c WHERE c.run_key = x.run_key) l
         WHERE x.run_key > p_after AND (p_run_key IS NULL OR x.run_key = p_run_key)
         ORDER BY x.run_key LIMIT p_limit
    )
    SELECT j.run_key, j.problem, j.held, n.sequence, n.checkpoint_id, n.created_at,
           n.expires_at, n.header
      FROM judged j
      LEFT JOIN LATERAL (
           SELECT c.sequence, c.checkpoint_id, c.created_at, c.expires_at, c.header
             FROM "public"."fc_checkpoints" c
            WHERE c.run_key = j.run_key AND j.problem IS NOT NULL
              AND (c.checkpoint_id ~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$' AND split_part(c.checkpoint_id, '-', 2) = j.run_key)
            ORDER BY c.sequence DESC LIMIT 1) n ON true
     ORDER BY j.run_key;
END
$fn$;

CREATE OR REPLACE FUNCTION "public"."fc_rebuild_run"(p_run_key text, p_run_id bytea, p_status text, p_data bytea,
                              p_labels bytea[], p_now double precision)
RETURNS TABLE (outcome text, run "public"."fc_runs") LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    r "public"."fc_runs"%ROWTYPE;
    v_problem text;
    v_held bigint;
    v_forever bigint;
    v_latest double precision;
    v_sequence bigint;
    v_id text;
    v_created double precision;
    v_labels bytea[];
BEGIN
    SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'missing'::text, NULL::"public"."fc_runs";
        RETURN;
    END IF;
    SELECT d.problem INTO v_problem FROM "public"."fc_damaged_runs"(p_run_key, '', 1) d;
    IF v_problem IS NULL AND r.run_id IS DISTINCT FROM p_run_id THEN
        -- Copied over from another run: the caller's run id is the one of this run key.
        v_problem := 'names another run';
    END IF;
    IF v_problem IS NULL THEN
        RETURN QUERY SELECT 'intact'::text, r;
        RETURN;
    END IF;
    SELECT count(*), count(*) FILTER (WHERE c.expires_at IS NULL), max(c.expires_at),
           max(c.sequence)
      INTO v_held, v_forever, v_latest, v_sequence
      FROM "public"."fc_checkpoints" c WHERE c.run_key = p_run_key;
    IF v_held = 0 THEN
        RETURN QUERY SELECT 'empty'::text, NULL::"public"."fc_runs";
        RETURN;
    END IF;
    -- The incarnation from the newest of the run's own checkpoints; the latest sequence is
    -- the highest in place, whoever's, so the next append finds its primary key free.
    SELECT c.checkpoint_id INTO v_id
      FROM "public"."fc_checkpoints" c WHERE c.run_key = p_run_key AND (c.checkpoint_id ~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$' AND split_part(c.checkpoint_id, '-', 2) = p_run_key)
     ORDER BY c.sequence DESC LIMIT 1;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'foreign'::text, NULL::"public"."fc_runs";
        RETURN;
    END IF;
    v_created := coalesce((
        SELECT c.created_at FROM "public"."fc_checkpoints" c
         WHERE c.run_key = p_run_key AND (c.checkpoint_id ~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$' AND split_part(c.checkpoint_id, '-', 2) = p_run_key)
           AND c.created_at > '-Infinity' AND c.created_at < 'Infinity'
         ORDER BY c.sequence LIMIT 1), p_now);
    IF cardinality(p_labels) > 0 THEN
        v_labels := p_labels;
    ELSE
        -- The label rows are written with the run's creation and follow its incarnation;
        -- the row's own list (in the order given) when it names the same labels.
        v_labels := ARRAY(SELECT DISTINCT l.label FROM "public"."fc_labels" l
                           WHERE l.run_key = p_run_key ORDER BY l.label);
        IF (SELECT array_agg(DISTINCT label ORDER BY label) FROM unnest(r.labels) label)
           IS NOT DISTINCT FROM (CASE WHEN cardinality(v_labels) > 0 THEN v_labels END) THEN
            v_labels := r.labels;
        END IF;
    END IF;
    UPDATE "public"."fc_runs" x
       SET run_id = p_run_id, incarnation = split_part(v_id, '-', 3), status = p_status,
           created_at = v_created, updated_at = p_now, latest_sequence = v_sequence,
           checkpoint_count = v_held, forever_count = v_forever,
           expires_at = CASE WHEN v_forever > 0 THEN NULL ELSE v_latest END, purge_at = NULL,
           version = 0, data = p_data, labels = v_labels, update_token = NULL
     WHERE x.run_key = p_run_key
    RETURNING x.* INTO r;
    DELETE FROM "public"."fc_labels" l WHERE l.run_key = p_run_key;
    INSERT INTO "public"."fc_labels" (label, created_at, run_key)
    SELECT DISTINCT label, v_created, p_run_key FROM unnest(v_labels) label;
    -- Shared items: each key counted once per checkpoint in place that names it.
    DELETE FROM "public"."fc_refs" f WHERE f.run_key = p_run_key;
    INSERT INTO "public"."fc_refs" (run_key, key, holders)
    SELECT p_run_key, named.key, count(*)
      FROM "public"."fc_checkpoints" c, LATERAL (SELECT DISTINCT unnest(c.refs)) named(key)
     WHERE c.run_key = p_run_key
     GROUP BY named.key;
    RETURN QUERY SELECT 'ok'::text, r;
END
$fn$;

INSERT INTO "public"."fc_migrations" (version, description) VALUES (10, 'damage is judged by a run''s own checkpoints and run id: a checkpoint of another run swapped in no longer blocks its run, a run row copied from another run is refused and rebuilt; damaged_runs reports times, sequences and versions out of range');

CREATE OR REPLACE FUNCTION "public"."fc_delete_run"(p_run_key text, p_token text)
RETURNS bigint LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_result bigint;
BEGIN
    -- A retry of this call (same token) waits here for the call it repeats to end.
    PERFORM pg_advisory_xact_lock(26211, hashtext(p_token));
    SELECT o.result INTO v_result FROM "public"."fc_ops" o WHERE o.token = p_token;
    IF FOUND THEN
        RETURN v_result;
    END IF;
    -- The row first (its checkpoints and labels follow by cascade), then the run's items.
    DELETE FROM "public"."fc_runs" r WHERE r.run_key = p_run_key RETURNING r.checkpoint_count INTO v_result;
    DELETE FROM "public"."fc_refs" f WHERE f.run_key = p_run_key;
    DELETE FROM "public"."fc_items" i WHERE i.run_key = p_run_key;
    INSERT INTO "public"."fc_ops" (token, result, expires_at)
    VALUES (p_token, coalesce(v_result, 0), extract(epoch FROM clock_timestamp()) + 300);
    RETURN coalesce(v_result, 0);
END
$fn$;

CREATE OR REPLACE FUNCTION "public"."fc_delete_items"(p_run_key text, p_keys bytea[], p_token text)
RETURNS bigint LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_count bigint;
BEGIN
    -- A retry of this call (same token) waits here for the call it repeats to end.
    PERFORM pg_advisory_xact_lock(26211, hashtext(p_token));
    SELECT o.result INTO v_count FROM "public"."fc_ops" o WHERE o.token = p_token;
    IF FOUND THEN
        RETURN v_count;
    END IF;
    DELETE FROM "public"."fc_items" i WHERE i.run_key = p_run_key AND i.key = ANY (p_keys);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    INSERT INTO "public"."fc_ops" (token, result, expires_at)
    VALUES (p_token, v_count, extract(epoch FROM clock_timestamp()) + 300);
    RETURN v_count;
END
$fn$;

CREATE OR REPLACE FUNCTION "public"."fc_put_items"(p_run_key text, p_keys bytea[], p_values bytea[],
                            p_owners bigint[], p_expiries double precision[],
                            p_create_only boolean, p_now double precision, p_token text)
RETURNS void LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_taken bytea;
    v_written bigint;
BEGIN
    -- A retry of this call (same token) waits here for the call it repeats to end.
    PERFORM pg_advisory_xact_lock(26211, hashtext(p_token));
    -- A retry of this write whose reply was lost (a create-only one would find
    -- its own items taken), or its first try delivered late: it wrote, once.
    PERFORM 1 FROM "public"."fc_ops" o WHERE o.token = p_token;
    IF FOUND THEN
        RETURN;
    END IF;
    INSERT INTO "public"."fc_items" AS i (run_key, key, value, owner, expires_at)
    SELECT p_run_key, k, v, o, e
      FROM unnest(p_keys, p_values, p_owners, p_expiries) AS t(k, v, o, e)
    ON CONFLICT (run_key, key) DO UPDATE
       SET value = excluded.value, owner = excluded.owner, expires_at = excluded.expires_at
     WHERE NOT p_create_only OR (i.expires_at IS NOT NULL AND i.expires_at <= p_now);
    GET DIAGNOSTICS v_written = ROW_COUNT;
    IF v_written < cardinality(p_keys) THEN
        -- create_only met a live item: the exception undoes the whole batch.
        SELECT i.key INTO v_taken FROM "public"."fc_items" i
         WHERE i.run_key = p_run_key AND i.key = ANY (p_keys)
           AND (i.expires_at IS NULL OR i.expires_at > p_now)
         ORDER BY i.key LIMIT 1;
        RAISE EXCEPTION USING ERRCODE = 'FC002', MESSAGE = coalesce(encode(v_taken, 'hex'), '');
    END IF;
    INSERT INTO "public"."fc_ops" (token, result, expires_at)
    VALUES (p_token, v_written, extract(epoch FROM clock_timestamp()) + 300);
    DELETE FROM "public"."fc_ops" o
     WHERE o.token IN (SELECT n.token FROM "public"."fc_ops" n WHERE n.token > p_token
                        ORDER BY n.token LIMIT 2)
       AND o.expires_at <= extract(epoch FROM clock_timestamp());
END
$fn$;

INSERT INTO "public"."fc_migrations" (version, description) VALUES (11, 'a call''s first try delivered late, after its retry, is a no-op: delete_run and delete_items remember their result also when they removed nothing, put_items every write');

CREATE FUNCTION "public"."fc_put_owned_items"(p_run_key text, p_owner bigint, p_checkpoint_id text,
                                  p_keys bytea[], p_values bytea[], p_if_absent boolean,
                                  p_now double precision, p_token text)
RETURNS boolean LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_expires_at double precision;
    v_result bigint;
BEGIN
    IF NOT p_if_absent THEN
        -- A retry of this upsert whose reply was lost, or its first try delivered late: it
        -- was answered once, and is answered so again without writing.
        PERFORM pg_advisory_xact_lock(26211, hashtext(p_token));
        SELECT o.result INTO v_result FROM "public"."fc_ops" o WHERE o.token = p_token;
        IF FOUND THEN
            RETURN v_result = 1;
        END IF;
    END IF;
    -- Key share on the checkpoint: a concurrent removal waits for this write, and a
    -- removal that came first leaves nothing to find.
    SELECT c.expires_at INTO v_expires_at FROM "public"."fc_checkpoints" c
     WHERE c.run_key = p_run_key AND c.sequence = p_owner
       AND c.checkpoint_id = p_checkpoint_id
       AND (c.expires_at IS NULL OR c.expires_at > p_now)
       FOR KEY SHARE;
    IF NOT FOUND THEN
        IF NOT p_if_absent THEN
            INSERT INTO "public"."fc_ops" (token, result, expires_at)
            VALUES (p_token, 0, extract(epoch FROM clock_timestamp()) + 300);
        END IF;
        RETURN false;
    END IF;
    INSERT INTO "public"."fc_items" AS i (run_key, key, value, owner, expires_at)
    SELECT p_run_key, k, v, p_owner, v_expires_at FROM unnest(p_keys, p_values) AS t(k, v)
    ON CONFLICT (run_key, key) DO UPDATE
       SET value = excluded.value, owner = excluded.owner, expires_at = excluded.expires_at
     WHERE NOT p_if_absent OR (i.expires_at IS NOT NULL AND i.expires_at <= p_now);
    IF NOT p_if_absent THEN
        INSERT INTO "public"."fc_ops" (token, result, expires_at)
        VALUES (p_token, 1, extract(epoch FROM clock_timestamp()) + 300);
        DELETE FROM "public"."fc_ops" o
         WHERE o.token IN (SELECT n.token FROM "public"."fc_ops" n WHERE n.token > p_token
                            ORDER BY n.token LIMIT 2)
           AND o.expires_at <= extract(epoch FROM clock_timestamp());
    END IF;
    RETURN true;
END
$fn$;

INSERT INTO "public"."fc_migrations" (version, description) VALUES (12, 'an owned-item upsert''s first try delivered late, after its retry, is a no-op');

ALTER TABLE "public"."fc_refs" ADD COLUMN removed boolean;

ALTER TABLE "public"."fc_refs" ALTER COLUMN removed SET DEFAULT false;

CREATE OR REPLACE FUNCTION "public"."fc_remove"(p_run_key text, p_sequences bigint[], p_count_run boolean)
RETURNS bigint LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_gone bigint[];
    v_forever bigint;
    v_refs bytea[];
    v_zeroed bytea[];
    v_gone_keys bytea[];
BEGIN
    IF p_sequences IS NULL OR cardinality(p_sequences) = 0 THEN
        RETURN 0;
    END IF;
    WITH gone AS (
        DELETE FROM "public"."fc_checkpoints"
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
    WITH owned AS (
        DELETE FROM "public"."fc_items" i WHERE i.run_key = p_run_key AND i.owner = ANY (v_gone)
        RETURNING i.key
    )
    SELECT array_agg(key) INTO v_gone_keys FROM owned;
    IF v_gone_keys IS NOT NULL THEN
        UPDATE "public"."fc_refs" f SET removed = true
         WHERE f.run_key = p_run_key AND f.key = ANY (v_gone_keys) AND NOT f.removed;
    END IF;
    IF v_refs IS NOT NULL THEN
        WITH released AS (
            SELECT ref, count(*) AS times FROM unnest(v_refs) ref GROUP BY ref
        ), counted AS (
            UPDATE "public"."fc_refs" r SET holders = r.holders - released.times
              FROM released
             WHERE r.run_key = p_run_key AND r.key = released.ref
            RETURNING r.key, r.holders
        )
        SELECT array_agg(key) FILTER (WHERE holders <= 0) INTO v_zeroed FROM counted;
        IF v_zeroed IS NOT NULL THEN
            DELETE FROM "public"."fc_refs" WHERE run_key = p_run_key AND key = ANY (v_zeroed);
            DELETE FROM "public"."fc_items" i
             WHERE i.run_key = p_run_key AND i.key = ANY (v_zeroed) AND i.owner IS NULL
               AND NOT EXISTS (
                   SELECT 1 FROM "public"."fc_refs" f
                    WHERE f.run_key = p_run_key
                      AND f.key IN (SELECT i.key UNION ALL
                                    SELECT substring(i.key FROM 1 FOR c.n - 1)
                                      FROM generate_series(1, length(i.key)) c(n)
                                     WHERE get_byte(i.key, c.n - 1) = 47));
            DELETE FROM "public"."fc_items" i USING unnest(v_zeroed) n(k)
             WHERE i.run_key = p_run_key AND i.key >= n.k || '/'::bytea
               AND i.key < n.k || '0'::bytea AND i.owner IS NULL
               AND NOT EXISTS (
                   SELECT 1 FROM "public"."fc_refs" f
                    WHERE f.run_key = p_run_key
                      AND f.key IN (SELECT i.key UNION ALL
                                    SELECT substring(i.key FROM 1 FOR c.n - 1)
                                      FROM generate_series(1, length(i.key)) c(n)
                                     WHERE get_byte(i.key, c.n - 1) = 47));
        END IF;
    END IF;
    IF NOT p_count_run THEN
        RETURN cardinality(v_gone);
    END IF;
    UPDATE "public"."fc_runs" r
       SET checkpoint_count = r.checkpoint_count - cardinality(v_gone),
           forever_count = r.forever_count - v_forever,
           expires_at = CASE
               WHEN r.checkpoint_count = cardinality(v_gone) THEN 0
               WHEN r.forever_count > v_forever THEN NULL
               ELSE (SELECT max(c.expires_at) FROM "public"."fc_checkpoints" c
                      WHERE c.run_key = p_run_key AND c.expires_at IS NOT NULL)
           END,
           purge_at = CASE WHEN r.checkpoint_count = cardinality(v_gone) THEN 0 END
     WHERE r.run_key = p_run_key;
    RETURN cardinality(v_gone);
END
$fn$;

CREATE OR REPLACE FUNCTION "public"."fc_delete_items"(p_run_key text, p_keys bytea[], p_token text)
RETURNS bigint LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_count bigint;
    v_gone_keys bytea[];
BEGIN
    -- A retry of this call (same token) waits here for the call it repeats to end.
    PERFORM pg_advisory_xact_lock(26211, hashtext(p_token));
    SELECT o.result INTO v_count FROM "public"."fc_ops" o WHERE o.token = p_token;
    IF FOUND THEN
        RETURN v_count;
    END IF;
    PERFORM 1 FROM "public"."fc_runs" x WHERE x.run_key = p_run_key FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        PERFORM pg_advisory_xact_lock(26212, hashtext(p_run_key));
    END IF;
    WITH gone AS (
        DELETE FROM "public"."fc_items" i WHERE i.run_key = p_run_key AND i.key = ANY (p_keys)
        RETURNING i.key
    )
    SELECT array_agg(key) INTO v_gone_keys FROM gone;
    v_count := coalesce(cardinality(v_gone_keys), 0);
    IF v_gone_keys IS NOT NULL THEN
        UPDATE "public"."fc_refs" f SET removed = true
         WHERE f.run_key = p_run_key AND f.key = ANY (v_gone_keys) AND NOT f.removed;
    END IF;
    INSERT INTO "public"."fc_ops" (token, result, expires_at)
    VALUES (p_token, v_count, extract(epoch FROM clock_timestamp()) + 300);
    RETURN v_count;
END
$fn$;

CREATE OR REPLACE FUNCTION "public"."fc_append"(
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
    r "public"."fc_runs"%ROWTYPE;
    v_drop bigint[];
    v_live bigint;
    v_next boolean;
    v_found boolean;
    v_problem text;
    v_unheld bytea[];
    v_released bytea[];
BEGIN
    -- A retry of this call (same token) waits here for the call it repeats to end.
    PERFORM pg_advisory_xact_lock(26211, hashtext(p_token));
    -- The compare-and-set: only the next sequence of the live run of this incarnation.
    UPDATE "public"."fc_runs" AS x
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
        v_problem := "public"."fc_damage"(p_run_key, r.run_id, r.incarnation, p_sequence - 1,
                              r.checkpoint_count - 1, r.expires_at);
        IF v_problem IS NULL AND r.run_id <> p_run_id THEN
            -- Copied over from another run: the run key derives from the caller's run id.
            v_problem := 'names another run (it was copied over from it)';
        END IF;
    ELSE
        SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
        v_found := FOUND;
        -- A retry of an append whose reply was lost: it was written, whatever became of its
        -- checkpoint since (deleted, pruned, its run deleted or expired).
        PERFORM 1 FROM "public"."fc_ops" o WHERE o.token = p_token;
        IF FOUND THEN
            outcome := 'ok';
            status := CASE WHEN v_found AND r.incarnation = p_incarnation THEN r.status
                           ELSE p_status END;
            RETURN;
        END IF;
        IF v_found THEN
            -- Judged in one statement: the row and the log of one snapshot (another writer
            -- may have committed since the row above was read).
            SELECT "public"."fc_damage"(x.run_key, x.run_id, x.incarnation, x.latest_sequence,
                            x.checkpoint_count, x.expires_at)
              INTO v_problem FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
            IF v_problem IS NULL AND r.run_id <> p_run_id THEN
                -- Copied over from another run: the run key derives from the caller's run id.
                v_problem := 'names another run (it was copied over from it)';
            END IF;
        END IF;
        IF v_found AND (r.expires_at IS NULL OR r.expires_at > p_now
                        OR v_problem IS NOT NULL) THEN
            -- A live run: this call may be the retry of one whose reply was lost.
            PERFORM 1 FROM "public"."fc_checkpoints" c
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
            UPDATE "public"."fc_runs" AS x
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
                SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
                outcome := 'conflict';
                IF FOUND AND (r.expires_at IS NULL OR r.expires_at > p_now) THEN
                    latest_sequence := r.latest_sequence; incarnation := r.incarnation;
                END IF;
                RETURN;
            END IF;
            -- Leftovers of the old run: checkpoints with their owned items, the shared
            -- items they named, its labels. Unowned items stay.
            WITH gone AS (
                DELETE FROM "public"."fc_checkpoints" c WHERE c.run_key = p_run_key RETURNING c.sequence
            )
            DELETE FROM "public"."fc_items" i
             WHERE i.run_key = p_run_key AND i.owner IN (SELECT sequence FROM gone);
            WITH released AS (
                DELETE FROM "public"."fc_refs" f WHERE f.run_key = p_run_key RETURNING f.key
            )
            SELECT array_agg(key) INTO v_released FROM released;
            IF v_released IS NOT NULL THEN
                DELETE FROM "public"."fc_items" i
                 WHERE i.run_key = p_run_key AND i.owner IS NULL
                   AND i.key = ANY (v_released);
                DELETE FROM "public"."fc_items" i USING unnest(v_released) n(k)
                 WHERE i.run_key = p_run_key AND i.key >= n.k || '/'::bytea
                   AND i.key < n.k || '0'::bytea;
            END IF;
            DELETE FROM "public"."fc_labels" l WHERE l.run_key = p_run_key;
        ELSE
            -- Ordered with a delete_items of the run that found no row (migration 13).
            PERFORM pg_advisory_xact_lock(26212, hashtext(p_run_key));
            INSERT INTO "public"."fc_runs" AS x (run_key, run_id, incarnation, status, created_at,
                                     updated_at, latest_sequence, checkpoint_count,
                                     forever_count, expires_at, version, data, labels)
            VALUES (p_run_key, p_run_id, p_incarnation, p_status, p_run_created_at, p_now, 0,
                    1, (p_expires_at IS NULL)::int, p_expires_at, p_version, p_data, p_labels)
            ON CONFLICT (run_key) DO NOTHING
            RETURNING x.* INTO r;
            IF NOT FOUND THEN
                -- Another writer created the run first (its transaction has committed).
                SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
                outcome := 'conflict';
                IF FOUND AND (r.expires_at IS NULL OR r.expires_at > p_now) THEN
                    latest_sequence := r.latest_sequence; incarnation := r.incarnation;
                END IF;
                RETURN;
            END IF;
        END IF;
        IF cardinality(p_labels) > 0 THEN
            INSERT INTO "public"."fc_labels" (label, created_at, run_key)
            SELECT DISTINCT label, p_run_created_at, p_run_key FROM unnest(p_labels) label;
        END IF;
    END IF;

    IF cardinality(p_refs) > 0 THEN
        -- The run row is locked by now: a removal of the run's checkpoints (which releases
        -- their shared items) waits for this transaction.
        SELECT array_agg(wanted.k ORDER BY wanted.n) INTO v_unheld
          FROM (SELECT t.k, min(t.n) AS n
                  FROM unnest(p_refs) WITH ORDINALITY AS t(k, n)
                 WHERE NOT (t.k = ANY (coalesce(p_item_keys, '{}')))
                 GROUP BY t.k) wanted
         WHERE NOT EXISTS (SELECT 1 FROM "public"."fc_items" i
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

    INSERT INTO "public"."fc_checkpoints" (run_key, sequence, checkpoint_id, created_at, expires_at,
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
        INSERT INTO "public"."fc_items" AS i (run_key, key, value, owner, expires_at)
        SELECT p_run_key, k, v, o, e
          FROM unnest(p_item_keys, p_item_values, p_item_owners, p_item_expiries) AS t(k, v, o, e)
        ON CONFLICT (run_key, key) DO UPDATE
           SET value = excluded.value, owner = excluded.owner, expires_at = excluded.expires_at
         WHERE i.expires_at IS NOT NULL AND i.expires_at <= p_now;
    END IF;
    IF p_refs IS NOT NULL AND cardinality(p_refs) > 0 THEN
        INSERT INTO "public"."fc_refs" AS f (run_key, key, holders)
        SELECT DISTINCT p_run_key, k, 1 FROM unnest(p_refs) k
        ON CONFLICT (run_key, key) DO UPDATE SET holders = f.holders + 1;
    END IF;

    -- Pruning: expired checkpoints, then the oldest beyond keep_latest.
    v_live := r.checkpoint_count;
    IF r.checkpoint_count > r.forever_count THEN
        v_drop := ARRAY(SELECT c.sequence FROM "public"."fc_checkpoints" c
                         WHERE c.run_key = p_run_key AND c.expires_at <= p_now);
        v_live := v_live - cardinality(v_drop);
    END IF;
    IF p_keep_latest IS NOT NULL AND v_live > p_keep_latest THEN
        v_drop := coalesce(v_drop, '{}') || ARRAY(
            SELECT c.sequence FROM "public"."fc_checkpoints" c
             WHERE c.run_key = p_run_key
               AND (c.expires_at IS NULL OR c.expires_at > p_now)
               AND c.sequence < (
                   SELECT n.sequence FROM "public"."fc_checkpoints" n
                    WHERE n.run_key = p_run_key
                      AND (n.expires_at IS NULL OR n.expires_at > p_now)
                    ORDER BY n.sequence DESC OFFSET p_keep_latest - 1 LIMIT 1)
             ORDER BY c.sequence LIMIT v_live - p_keep_latest);
    END IF;
    IF cardinality(v_drop) > 0 THEN
        PERFORM "public"."fc_remove"(p_run_key, v_drop, true);
    END IF;
    -- Remembered for a retry whose reply is lost (see migration 8), and two memos after it in
    -- token order taken out if they expired.
    INSERT INTO "public"."fc_ops" (token, result, expires_at)
    VALUES (p_token, p_sequence, extract(epoch FROM clock_timestamp()) + 300);
    DELETE FROM "public"."fc_ops" o
     WHERE o.token IN (SELECT n.token FROM "public"."fc_ops" n WHERE n.token > p_token
                        ORDER BY n.token LIMIT 2)
       AND o.expires_at <= extract(epoch FROM clock_timestamp());
    outcome := 'ok'; status := r.status;
END
$fn$;

CREATE FUNCTION "public"."fc_read_with_items"(p_run_key text, p_sequence bigint,
                                  p_now double precision, p_check_missing boolean)
RETURNS TABLE (sequence bigint, checkpoint_id text, created_at double precision,
               expires_at double precision, header bytea, payload bytea, refs bytea[],
               status text, item_keys bytea[], item_values bytea[])
LANGUAGE plpgsql STABLE AS $fn$
#variable_conflict use_column
BEGIN
    IF p_sequence IS NULL THEN
        RETURN QUERY
        SELECT c.sequence, c.checkpoint_id, c.created_at, c.expires_at, c.header, c.payload,
               c.refs, CASE WHEN encode(x.run_id, 'hex') ~ '^([0-7][0-9a-f]|c[2-9a-f][89ab][0-9a-f]|d[0-9a-f][89ab][0-9a-f]|e0[ab][0-9a-f][89ab][0-9a-f]|e[1-9a-cef][89ab][0-9a-f][89ab][0-9a-f]|ed[89][0-9a-f][89ab][0-9a-f]|f0[9ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f[1-3][89ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f48[0-9a-f][89ab][0-9a-f][89ab][0-9a-f])*$'
           AND (h.sequence IS NULL
                OR (h.sequence <= x.latest_sequence AND x.checkpoint_count > 0
                    AND (h.checkpoint_id !~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$'
                         OR split_part(h.checkpoint_id, '-', 3) = x.incarnation)
                    AND (x.expires_at IS NULL
                         OR (h.expires_at IS NOT NULL AND h.expires_at <= x.expires_at))))
          THEN x.status END, array_cat(w.keys, d.keys), array_cat(w.vals, d.vals)
          FROM (SELECT * FROM "public"."fc_checkpoints" n
                 WHERE n.run_key = p_run_key AND (n.expires_at IS NULL OR n.expires_at > p_now)
                 ORDER BY n.sequence DESC LIMIT 1) c
          JOIN "public"."fc_runs" x ON x.run_key = c.run_key
        LEFT JOIN LATERAL (SELECT h.sequence, h.checkpoint_id, h.expires_at
                             FROM "public"."fc_checkpoints" h WHERE h.run_key = x.run_key
                              AND NOT (h.checkpoint_id ~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$' AND split_part(h.checkpoint_id, '-', 2) <> x.run_key)
                            ORDER BY h.sequence DESC LIMIT 1) h ON true
         CROSS JOIN LATERAL (
               SELECT array_agg(w.key), array_agg(w.value), count(*) FILTER (WHERE w.named)
                 FROM (
                   SELECT i.key, i.value, i.key = ANY (c.refs) AS named FROM "public"."fc_items" i
                    WHERE i.run_key = p_run_key
                      AND (i.expires_at IS NULL OR i.expires_at > p_now)
                      AND (i.owner = c.sequence OR i.key = ANY (c.refs))
                   UNION ALL
                   SELECT r.key, r.value, false
                     FROM (SELECT DISTINCT unnest(c.refs)) n(k)
                    CROSS JOIN LATERAL (
                          SELECT i.key, i.value FROM "public"."fc_items" i
                           WHERE i.run_key = p_run_key AND i.key >= n.k || '/'::bytea
                             AND i.key < n.k || '0'::bytea
                             AND (i.expires_at IS NULL OR i.expires_at > p_now)
                             AND i.owner IS NULL
                          OFFSET 0) r) w) w(keys, vals, named)
         CROSS JOIN LATERAL (
               SELECT array_agg(f.key), array_agg(NULL::bytea) FROM "public"."fc_refs" f
                WHERE p_check_missing
                  AND w.named < (SELECT count(DISTINCT n.k) FROM unnest(c.refs) n(k))
                  AND f.run_key = p_run_key AND f.key = ANY (c.refs) AND NOT f.removed
                  AND NOT EXISTS (SELECT 1 FROM "public"."fc_items" e
                                   WHERE e.run_key = p_run_key AND e.key = f.key)
               ) d(keys, vals);
    ELSE
        RETURN QUERY
        SELECT c.sequence, c.checkpoint_id, c.created_at, c.expires_at, c.header, c.payload,
               c.refs, CASE WHEN encode(x.run_id, 'hex') ~ '^([0-7][0-9a-f]|c[2-9a-f][89ab][0-9a-f]|d[0-9a-f][89ab][0-9a-f]|e0[ab][0-9a-f][89ab][0-9a-f]|e[1-9a-cef][89ab][0-9a-f][89ab][0-9a-f]|ed[89][0-9a-f][89ab][0-9a-f]|f0[9ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f[1-3][89ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f48[0-9a-f][89ab][0-9a-f][89ab][0-9a-f])*$'
           AND (h.sequence IS NULL
                OR (h.sequence <= x.latest_sequence AND x.checkpoint_count > 0
                    AND (h.checkpoint_id !~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$'
                         OR split_part(h.checkpoint_id, '-', 3) = x.incarnation)
                    AND (x.expires_at IS NULL
                         OR (h.expires_at IS NOT NULL AND h.expires_at <= x.expires_at))))
          THEN x.status END, array_cat(w.keys, d.keys), array_cat(w.vals, d.vals)
          FROM "public"."fc_checkpoints" c JOIN "public"."fc_runs" x ON x.run_key = c.run_key
        LEFT JOIN LATERAL (SELECT h.sequence, h.checkpoint_id, h.expires_at
                             FROM "public"."fc_checkpoints" h WHERE h.run_key = x.run_key
                              AND NOT (h.checkpoint_id ~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$' AND split_part(h.checkpoint_id, '-', 2) <> x.run_key)
                            ORDER BY h.sequence DESC LIMIT 1) h ON true
         CROSS JOIN LATERAL (
               SELECT array_agg(w.key), array_agg(w.value), count(*) FILTER (WHERE w.named)
                 FROM (
                   SELECT i.key, i.value, i.key = ANY (c.refs) AS named FROM "public"."fc_items" i
                    WHERE i.run_key = p_run_key
                      AND (i.expires_at IS NULL OR i.expires_at > p_now)
                      AND (i.owner = c.sequence OR i.key = ANY (c.refs))
                   UNION ALL
                   SELECT r.key, r.value, false
                     FROM (SELECT DISTINCT unnest(c.refs)) n(k)
                    CROSS JOIN LATERAL (
                          SELECT i.key, i.value FROM "public"."fc_items" i
                           WHERE i.run_key = p_run_key AND i.key >= n.k || '/'::bytea
                             AND i.key < n.k || '0'::bytea
                             AND (i.expires_at IS NULL OR i.expires_at > p_now)
                             AND i.owner IS NULL
                          OFFSET 0) r) w) w(keys, vals, named)
         CROSS JOIN LATERAL (
               SELECT array_agg(f.key), array_agg(NULL::bytea) FROM "public"."fc_refs" f
                WHERE p_check_missing
                  AND w.named < (SELECT count(DISTINCT n.k) FROM unnest(c.refs) n(k))
                  AND f.run_key = p_run_key AND f.key = ANY (c.refs) AND NOT f.removed
                  AND NOT EXISTS (SELECT 1 FROM "public"."fc_items" e
                                   WHERE e.run_key = p_run_key AND e.key = f.key)
               ) d(keys, vals)
         WHERE c.run_key = p_run_key AND c.sequence = p_sequence
           AND (c.expires_at IS NULL OR c.expires_at > p_now);
    END IF;
END
$fn$;

CREATE OR REPLACE FUNCTION "public"."fc_rebuild_run"(p_run_key text, p_run_id bytea, p_status text, p_data bytea,
                              p_labels bytea[], p_now double precision)
RETURNS TABLE (outcome text, run "public"."fc_runs") LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    r "public"."fc_runs"%ROWTYPE;
    v_problem text;
    v_held bigint;
    v_forever bigint;
    v_latest double precision;
    v_sequence bigint;
    v_id text;
    v_created double precision;
    v_labels bytea[];
    v_removed bytea[];
    v_kept bytea[];
BEGIN
    SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'missing'::text, NULL::"public"."fc_runs";
        RETURN;
    END IF;
    SELECT d.problem INTO v_problem FROM "public"."fc_damaged_runs"(p_run_key, '', 1) d;
    IF v_problem IS NULL AND r.run_id IS DISTINCT FROM p_run_id THEN
        -- Copied over from another run: the caller's run id is the one of this run key.
        v_problem := 'names another run';
    END IF;
    IF v_problem IS NULL THEN
        RETURN QUERY SELECT 'intact'::text, r;
        RETURN;
    END IF;
    SELECT count(*), count(*) FILTER (WHERE c.expires_at IS NULL), max(c.expires_at),
           max(c.sequence)
      INTO v_held, v_forever, v_latest, v_sequence
      FROM "public"."fc_checkpoints" c WHERE c.run_key = p_run_key;
    IF v_held = 0 THEN
        RETURN QUERY SELECT 'empty'::text, NULL::"public"."fc_runs";
        RETURN;
    END IF;
    -- The incarnation from the newest of the run's own checkpoints; the latest sequence is
    -- the highest in place, whoever's, so the next append finds its primary key free.
    SELECT c.checkpoint_id INTO v_id
      FROM "public"."fc_checkpoints" c WHERE c.run_key = p_run_key AND (c.checkpoint_id ~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$' AND split_part(c.checkpoint_id, '-', 2) = p_run_key)
     ORDER BY c.sequence DESC LIMIT 1;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'foreign'::text, NULL::"public"."fc_runs";
        RETURN;
    END IF;
    v_created := coalesce((
        SELECT c.created_at FROM "public"."fc_checkpoints" c
         WHERE c.run_key = p_run_key AND (c.checkpoint_id ~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$' AND split_part(c.checkpoint_id, '-', 2) = p_run_key)
           AND c.created_at > '-Infinity' AND c.created_at < 'Infinity'
         ORDER BY c.sequence LIMIT 1), p_now);
    IF cardinality(p_labels) > 0 THEN
        v_labels := p_labels;
    ELSE
        -- The label rows are written with the run's creation and follow its incarnation;
        -- the row's own list (in the order given) when it names the same labels.
        v_labels := ARRAY(SELECT DISTINCT l.label FROM "public"."fc_labels" l
                           WHERE l.run_key = p_run_key ORDER BY l.label);
        IF (SELECT array_agg(DISTINCT label ORDER BY label) FROM unnest(r.labels) label)
           IS NOT DISTINCT FROM (CASE WHEN cardinality(v_labels) > 0 THEN v_labels END) THEN
            v_labels := r.labels;
        END IF;
    END IF;
    UPDATE "public"."fc_runs" x
       SET run_id = p_run_id, incarnation = split_part(v_id, '-', 3), status = p_status,
           created_at = v_created, updated_at = p_now, latest_sequence = v_sequence,
           checkpoint_count = v_held, forever_count = v_forever,
           expires_at = CASE WHEN v_forever > 0 THEN NULL ELSE v_latest END, purge_at = NULL,
           version = 0, data = p_data, labels = v_labels, update_token = NULL
     WHERE x.run_key = p_run_key
    RETURNING x.* INTO r;
    DELETE FROM "public"."fc_labels" l WHERE l.run_key = p_run_key;
    INSERT INTO "public"."fc_labels" (label, created_at, run_key)
    SELECT DISTINCT label, v_created, p_run_key FROM unnest(v_labels) label;
    -- Shared items: each key counted once per checkpoint in place that names it.
    WITH old AS (
        DELETE FROM "public"."fc_refs" f WHERE f.run_key = p_run_key RETURNING f.key, f.removed
    )
    SELECT array_agg(key) FILTER (WHERE removed), array_agg(key) FILTER (WHERE NOT removed)
      INTO v_removed, v_kept FROM old;
    INSERT INTO "public"."fc_refs" (run_key, key, holders, removed)
    SELECT p_run_key, named.key, count(*),
           named.key = ANY (coalesce(v_removed, '{}'))
           OR (NOT named.key = ANY (coalesce(v_kept, '{}'))
               AND NOT EXISTS (SELECT 1 FROM "public"."fc_items" i
                                WHERE i.run_key = p_run_key AND i.key = named.key))
      FROM "public"."fc_checkpoints" c, LATERAL (SELECT DISTINCT unnest(c.refs)) named(key)
     WHERE c.run_key = p_run_key
     GROUP BY named.key;
    RETURN QUERY SELECT 'ok'::text, r;
END
$fn$;

CREATE OR REPLACE FUNCTION "public"."fc_delete_run"(p_run_key text, p_token text)
RETURNS bigint LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_result bigint;
BEGIN
    -- A retry of this call (same token) waits here for the call it repeats to end.
    PERFORM pg_advisory_xact_lock(26211, hashtext(p_token));
    SELECT o.result INTO v_result FROM "public"."fc_ops" o WHERE o.token = p_token;
    IF FOUND THEN
        RETURN v_result;
    END IF;
    -- The row first (its checkpoints and labels follow by cascade), then the run's items.
    DELETE FROM "public"."fc_runs" r WHERE r.run_key = p_run_key RETURNING r.checkpoint_count INTO v_result;
    IF NOT FOUND THEN
        PERFORM pg_advisory_xact_lock(26212, hashtext(p_run_key));
        DELETE FROM "public"."fc_runs" r WHERE r.run_key = p_run_key
        RETURNING r.checkpoint_count INTO v_result;
    END IF;
    DELETE FROM "public"."fc_refs" f WHERE f.run_key = p_run_key;
    DELETE FROM "public"."fc_items" i WHERE i.run_key = p_run_key;
    INSERT INTO "public"."fc_ops" (token, result, expires_at)
    VALUES (p_token, coalesce(v_result, 0), extract(epoch FROM clock_timestamp()) + 300);
    RETURN coalesce(v_result, 0);
END
$fn$;

CREATE OR REPLACE FUNCTION "public"."fc_purge"(p_now double precision, p_limit integer,
                        OUT removed bigint, OUT done boolean)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_budget integer := greatest(p_limit, 1);
    v_server_now double precision := extract(epoch FROM clock_timestamp());
    v_key text;
    v_count bigint;
    v_busy text[] := '{}';
    v_locks integer := 0;
    v_runs text[];
    v_keys bytea[];
    r "public"."fc_runs"%ROWTYPE;
BEGIN
    removed := 0;
    FOR v_key IN
        SELECT x.run_key FROM "public"."fc_runs" x WHERE x.purge_at IS NOT NULL AND x.purge_at <= p_now
         ORDER BY x.purge_at LIMIT v_budget
    LOOP
        DELETE FROM "public"."fc_runs" x WHERE x.run_key = v_key AND x.checkpoint_count = 0
           AND NOT EXISTS (SELECT 1 FROM "public"."fc_checkpoints" c WHERE c.run_key = v_key);
        IF FOUND THEN
            DELETE FROM "public"."fc_refs" f WHERE f.run_key = v_key;
            DELETE FROM "public"."fc_items" i WHERE i.run_key = v_key;
        ELSE
            -- A row that says its run is empty over checkpoints in place (put back from an
            -- older copy): never taken for empty, left for repair, out of this loop.
            UPDATE "public"."fc_runs" x SET purge_at = NULL WHERE x.run_key = v_key AND x.purge_at <= p_now;
        END IF;
        v_budget := v_budget - 1;
    END LOOP;
    FOR v_key IN
        SELECT DISTINCT due.run_key FROM (
            SELECT c.run_key FROM "public"."fc_checkpoints" c
             WHERE c.expires_at IS NOT NULL AND c.expires_at <= p_now
             ORDER BY c.expires_at LIMIT greatest(v_budget, 0)) due
    LOOP
        EXIT WHEN v_budget <= 0;
        SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = v_key FOR NO KEY UPDATE;
        CONTINUE WHEN NOT FOUND;
        IF "public"."fc_damage"(v_key, r.run_id, r.incarnation, r.latest_sequence, r.checkpoint_count,
                    r.expires_at) IS NOT NULL THEN
            -- A damaged row: its expired checkpoints go by their own expiry, the row stays
            -- as it is (never taken for the run's expiry) until a repair rebuilds it.
            v_count := "public"."fc_remove"(v_key, ARRAY(
                SELECT c.sequence FROM "public"."fc_checkpoints" c
                 WHERE c.run_key = v_key AND c.expires_at <= p_now
                 ORDER BY c.expires_at LIMIT v_budget), false);
        ELSIF r.expires_at IS NOT NULL AND r.expires_at <= p_now THEN
            -- The whole run expired: everything of it goes.
            WITH gone AS (DELETE FROM "public"."fc_checkpoints" c WHERE c.run_key = v_key RETURNING 1)
            SELECT count(*) INTO v_count FROM gone;
            DELETE FROM "public"."fc_runs" x WHERE x.run_key = v_key;
            DELETE FROM "public"."fc_refs" f WHERE f.run_key = v_key;
            DELETE FROM "public"."fc_items" i WHERE i.run_key = v_key;
        ELSE
            v_count := "public"."fc_remove"(v_key, ARRAY(
                SELECT c.sequence FROM "public"."fc_checkpoints" c
                 WHERE c.run_key = v_key AND c.expires_at <= p_now
                 ORDER BY c.expires_at LIMIT v_budget), true);
        END IF;
        removed := removed + v_count;
        v_budget := v_budget - greatest(v_count, 1)::integer;
    END LOOP;
    <<expired_items>>
    LOOP
        EXIT WHEN v_budget <= 0;
        SELECT array_agg(e.run_key), array_agg(e.key) INTO v_runs, v_keys FROM (
            SELECT e.run_key, e.key FROM "public"."fc_items" e
             WHERE e.expires_at IS NOT NULL AND e.expires_at <= p_now
               AND NOT (e.run_key = ANY (v_busy))
               AND NOT EXISTS (SELECT 1 FROM "public"."fc_refs" f
                                WHERE f.run_key = e.run_key AND f.key = e.key)
             LIMIT v_budget) e;
        EXIT WHEN v_runs IS NULL;
        FOR v_key IN SELECT DISTINCT u.k FROM unnest(v_runs) u(k) LOOP
            PERFORM 1 FROM "public"."fc_runs" x WHERE x.run_key = v_key FOR SHARE SKIP LOCKED;
            IF NOT FOUND THEN
                IF EXISTS (SELECT 1 FROM "public"."fc_runs" x WHERE x.run_key = v_key) THEN
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
                DELETE FROM "public"."fc_items" i
                 WHERE i.run_key = v_key
                   AND i.key = ANY (ARRAY(SELECT c.key FROM unnest(v_runs, v_keys) c(run_key, key)
                                           WHERE c.run_key = v_key))
                   AND i.expires_at IS NOT NULL AND i.expires_at <= p_now
                   AND NOT EXISTS (SELECT 1 FROM "public"."fc_refs" f
                                    WHERE f.run_key = v_key AND f.key = i.key)
                RETURNING 1)
            SELECT count(*) INTO v_count FROM gone;
            IF v_count = 0 THEN
                v_busy := v_busy || v_key;  -- named by an append that committed meanwhile
            END IF;
            v_budget := v_budget - v_count::integer;
        END LOOP;
    END LOOP;
    -- The server's clock in a variable: compared with a volatile call, the index is unused.
    DELETE FROM "public"."fc_ops" o WHERE o.token IN (
        SELECT token FROM "public"."fc_ops" WHERE expires_at <= v_server_now LIMIT 1000);
    done := NOT EXISTS (SELECT 1 FROM "public"."fc_runs" x
                         WHERE x.purge_at IS NOT NULL AND x.purge_at <= p_now)
        AND NOT EXISTS (SELECT 1 FROM "public"."fc_checkpoints" c
                         WHERE c.expires_at IS NOT NULL AND c.expires_at <= p_now)
        AND NOT EXISTS (SELECT 1 FROM "public"."fc_items" e
                         WHERE e.expires_at IS NOT NULL AND e.expires_at <= p_now
                           AND NOT (e.run_key = ANY (v_busy))
                           AND NOT EXISTS (SELECT 1 FROM "public"."fc_refs" f
                                            WHERE f.run_key = e.run_key AND f.key = e.key));
END
$fn$;

INSERT INTO "public"."fc_migrations" (version, description) VALUES (13, 'the store records its removals of items a checkpoint names; a read naming an item whose row is missing with no removal recorded reports damage');

ALTER TABLE "public"."fc_items" ADD COLUMN kept boolean;

COMMENT ON COLUMN "public"."fc_items".kept IS 'fastcheckpoint: true when the cleanup found the item named '
    'by a reference count; cleared when the count goes. Expired items marked so are left out '
    'of the cleanup''s index.';

CREATE INDEX fc_items_purge ON "public"."fc_items" (expires_at)
    WHERE expires_at IS NOT NULL AND kept IS NOT TRUE;

DROP INDEX IF EXISTS "public".fc_items_expiry;

CREATE OR REPLACE FUNCTION "public"."fc_remove"(p_run_key text, p_sequences bigint[], p_count_run boolean)
RETURNS bigint LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_gone bigint[];
    v_forever bigint;
    v_refs bytea[];
    v_zeroed bytea[];
    v_gone_keys bytea[];
BEGIN
    IF p_sequences IS NULL OR cardinality(p_sequences) = 0 THEN
        RETURN 0;
    END IF;
    WITH gone AS (
        DELETE FROM "public"."fc_checkpoints"
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
    WITH owned AS (
        DELETE FROM "public"."fc_items" i WHERE i.run_key = p_run_key AND i.owner = ANY (v_gone)
        RETURNING i.key
    )
    SELECT array_agg(key) INTO v_gone_keys FROM owned;
    IF v_gone_keys IS NOT NULL THEN
        UPDATE "public"."fc_refs" f SET removed = true
         WHERE f.run_key = p_run_key AND f.key = ANY (v_gone_keys) AND NOT f.removed;
    END IF;
    IF v_refs IS NOT NULL THEN
        WITH released AS (
            SELECT ref, count(*) AS times FROM unnest(v_refs) ref GROUP BY ref
        ), counted AS (
            UPDATE "public"."fc_refs" r SET holders = r.holders - released.times
              FROM released
             WHERE r.run_key = p_run_key AND r.key = released.ref
            RETURNING r.key, r.holders
        )
        SELECT array_agg(key) FILTER (WHERE holders <= 0) INTO v_zeroed FROM counted;
        IF v_zeroed IS NOT NULL THEN
            DELETE FROM "public"."fc_refs" WHERE run_key = p_run_key AND key = ANY (v_zeroed);
            DELETE FROM "public"."fc_items" i
             WHERE i.run_key = p_run_key AND i.key = ANY (v_zeroed) AND i.owner IS NULL
               AND NOT EXISTS (
                   SELECT 1 FROM "public"."fc_refs" f
                    WHERE f.run_key = p_run_key
                      AND f.key IN (SELECT i.key UNION ALL
                                    SELECT substring(i.key FROM 1 FOR c.n - 1)
                                      FROM generate_series(1, length(i.key)) c(n)
                                     WHERE get_byte(i.key, c.n - 1) = 47));
            DELETE FROM "public"."fc_items" i USING unnest(v_zeroed) n(k)
             WHERE i.run_key = p_run_key AND i.key >= n.k || '/'::bytea
               AND i.key < n.k || '0'::bytea AND i.owner IS NULL
               AND NOT EXISTS (
                   SELECT 1 FROM "public"."fc_refs" f
                    WHERE f.run_key = p_run_key
                      AND f.key IN (SELECT i.key UNION ALL
                                    SELECT substring(i.key FROM 1 FOR c.n - 1)
                                      FROM generate_series(1, length(i.key)) c(n)
                                     WHERE get_byte(i.key, c.n - 1) = 47));
            UPDATE "public"."fc_items" i SET kept = NULL
             WHERE i.run_key = p_run_key AND i.key = ANY (v_zeroed) AND i.kept;
        END IF;
    END IF;
    IF NOT p_count_run THEN
        RETURN cardinality(v_gone);
    END IF;
    UPDATE "public"."fc_runs" r
       SET checkpoint_count = r.checkpoint_count - cardinality(v_gone),
           forever_count = r.forever_count - v_forever,
           expires_at = CASE
               WHEN r.checkpoint_count = cardinality(v_gone) THEN 0
               WHEN r.forever_count > v_forever THEN NULL
               ELSE (SELECT max(c.expires_at) FROM "public"."fc_checkpoints" c
                      WHERE c.run_key = p_run_key AND c.expires_at IS NOT NULL)
           END,
           purge_at = CASE WHEN r.checkpoint_count = cardinality(v_gone) THEN 0 END
     WHERE r.run_key = p_run_key;
    RETURN cardinality(v_gone);
END
$fn$;

CREATE OR REPLACE FUNCTION "public"."fc_append"(
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
    r "public"."fc_runs"%ROWTYPE;
    v_drop bigint[];
    v_live bigint;
    v_next boolean;
    v_found boolean;
    v_problem text;
    v_unheld bytea[];
    v_released bytea[];
BEGIN
    -- A retry of this call (same token) waits here for the call it repeats to end.
    PERFORM pg_advisory_xact_lock(26211, hashtext(p_token));
    -- The compare-and-set: only the next sequence of the live run of this incarnation.
    UPDATE "public"."fc_runs" AS x
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
        v_problem := "public"."fc_damage"(p_run_key, r.run_id, r.incarnation, p_sequence - 1,
                              r.checkpoint_count - 1, r.expires_at);
        IF v_problem IS NULL AND r.run_id <> p_run_id THEN
            -- Copied over from another run: the run key derives from the caller's run id.
            v_problem := 'names another run (it was copied over from it)';
        END IF;
    ELSE
        SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
        v_found := FOUND;
        -- A retry of an append whose reply was lost: it was written, whatever became of its
        -- checkpoint since (deleted, pruned, its run deleted or expired).
        PERFORM 1 FROM "public"."fc_ops" o WHERE o.token = p_token;
        IF FOUND THEN
            outcome := 'ok';
            status := CASE WHEN v_found AND r.incarnation = p_incarnation THEN r.status
                           ELSE p_status END;
            RETURN;
        END IF;
        IF v_found THEN
            -- Judged in one statement: the row and the log of one snapshot (another writer
            -- may have committed since the row above was read).
            SELECT "public"."fc_damage"(x.run_key, x.run_id, x.incarnation, x.latest_sequence,
                            x.checkpoint_count, x.expires_at)
              INTO v_problem FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
            IF v_problem IS NULL AND r.run_id <> p_run_id THEN
                -- Copied over from another run: the run key derives from the caller's run id.
                v_problem := 'names another run (it was copied over from it)';
            END IF;
        END IF;
        IF v_found AND (r.expires_at IS NULL OR r.expires_at > p_now
                        OR v_problem IS NOT NULL) THEN
            -- A live run: this call may be the retry of one whose reply was lost.
            PERFORM 1 FROM "public"."fc_checkpoints" c
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
            UPDATE "public"."fc_runs" AS x
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
                SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
                outcome := 'conflict';
                IF FOUND AND (r.expires_at IS NULL OR r.expires_at > p_now) THEN
                    latest_sequence := r.latest_sequence; incarnation := r.incarnation;
                END IF;
                RETURN;
            END IF;
            -- Leftovers of the old run: checkpoints with their owned items, the shared
            -- items they named, its labels. Unowned items stay.
            WITH gone AS (
                DELETE FROM "public"."fc_checkpoints" c WHERE c.run_key = p_run_key RETURNING c.sequence
            )
            DELETE FROM "public"."fc_items" i
             WHERE i.run_key = p_run_key AND i.owner IN (SELECT sequence FROM gone);
            WITH released AS (
                DELETE FROM "public"."fc_refs" f WHERE f.run_key = p_run_key RETURNING f.key
            )
            SELECT array_agg(key) INTO v_released FROM released;
            IF v_released IS NOT NULL THEN
                DELETE FROM "public"."fc_items" i
                 WHERE i.run_key = p_run_key AND i.owner IS NULL
                   AND i.key = ANY (v_released);
                DELETE FROM "public"."fc_items" i USING unnest(v_released) n(k)
                 WHERE i.run_key = p_run_key AND i.key >= n.k || '/'::bytea
                   AND i.key < n.k || '0'::bytea;
                UPDATE "public"."fc_items" i SET kept = NULL
                 WHERE i.run_key = p_run_key AND i.key = ANY (v_released) AND i.kept;
            END IF;
            DELETE FROM "public"."fc_labels" l WHERE l.run_key = p_run_key;
        ELSE
            -- Ordered with a delete_items of the run that found no row (migration 13).
            PERFORM pg_advisory_xact_lock(26212, hashtext(p_run_key));
            INSERT INTO "public"."fc_runs" AS x (run_key, run_id, incarnation, status, created_at,
                                     updated_at, latest_sequence, checkpoint_count,
                                     forever_count, expires_at, version, data, labels)
            VALUES (p_run_key, p_run_id, p_incarnation, p_status, p_run_created_at, p_now, 0,
                    1, (p_expires_at IS NULL)::int, p_expires_at, p_version, p_data, p_labels)
            ON CONFLICT (run_key) DO NOTHING
            RETURNING x.* INTO r;
            IF NOT FOUND THEN
                -- Another writer created the run first (its transaction has committed).
                SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key;
                outcome := 'conflict';
                IF FOUND AND (r.expires_at IS NULL OR r.expires_at > p_now) THEN
                    latest_sequence := r.latest_sequence; incarnation := r.incarnation;
                END IF;
                RETURN;
            END IF;
        END IF;
        IF cardinality(p_labels) > 0 THEN
            INSERT INTO "public"."fc_labels" (label, created_at, run_key)
            SELECT DISTINCT label, p_run_created_at, p_run_key FROM unnest(p_labels) label;
        END IF;
    END IF;

    IF cardinality(p_refs) > 0 THEN
        -- The run row is locked by now: a removal of the run's checkpoints (which releases
        -- their shared items) waits for this transaction.
        SELECT array_agg(wanted.k ORDER BY wanted.n) INTO v_unheld
          FROM (SELECT t.k, min(t.n) AS n
                  FROM unnest(p_refs) WITH ORDINALITY AS t(k, n)
                 WHERE NOT (t.k = ANY (coalesce(p_item_keys, '{}')))
                 GROUP BY t.k) wanted
         WHERE NOT EXISTS (SELECT 1 FROM "public"."fc_items" i
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

    INSERT INTO "public"."fc_checkpoints" (run_key, sequence, checkpoint_id, created_at, expires_at,
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
        INSERT INTO "public"."fc_items" AS i (run_key, key, value, owner, expires_at)
        SELECT p_run_key, k, v, o, e
          FROM unnest(p_item_keys, p_item_values, p_item_owners, p_item_expiries) AS t(k, v, o, e)
        ON CONFLICT (run_key, key) DO UPDATE
           SET value = excluded.value, owner = excluded.owner, expires_at = excluded.expires_at
         WHERE i.expires_at IS NOT NULL AND i.expires_at <= p_now;
    END IF;
    IF p_refs IS NOT NULL AND cardinality(p_refs) > 0 THEN
        INSERT INTO "public"."fc_refs" AS f (run_key, key, holders)
        SELECT DISTINCT p_run_key, k, 1 FROM unnest(p_refs) k
        ON CONFLICT (run_key, key) DO UPDATE SET holders = f.holders + 1;
    END IF;

    -- Pruning: expired checkpoints, then the oldest beyond keep_latest.
    v_live := r.checkpoint_count;
    IF r.checkpoint_count > r.forever_count THEN
        v_drop := ARRAY(SELECT c.sequence FROM "public"."fc_checkpoints" c
                         WHERE c.run_key = p_run_key AND c.expires_at <= p_now);
        v_live := v_live - cardinality(v_drop);
    END IF;
    IF p_keep_latest IS NOT NULL AND v_live > p_keep_latest THEN
        v_drop := coalesce(v_drop, '{}') || ARRAY(
            SELECT c.sequence FROM "public"."fc_checkpoints" c
             WHERE c.run_key = p_run_key
               AND (c.expires_at IS NULL OR c.expires_at > p_now)
               AND c.sequence < (
                   SELECT n.sequence FROM "public"."fc_checkpoints" n
                    WHERE n.run_key = p_run_key
                      AND (n.expires_at IS NULL OR n.expires_at > p_now)
                    ORDER BY n.sequence DESC OFFSET p_keep_latest - 1 LIMIT 1)
             ORDER BY c.sequence LIMIT v_live - p_keep_latest);
    END IF;
    IF cardinality(v_drop) > 0 THEN
        PERFORM "public"."fc_remove"(p_run_key, v_drop, true);
    END IF;
    -- Remembered for a retry whose reply is lost (see migration 8), and two memos after it in
    -- token order taken out if they expired.
    INSERT INTO "public"."fc_ops" (token, result, expires_at)
    VALUES (p_token, p_sequence, extract(epoch FROM clock_timestamp()) + 300);
    DELETE FROM "public"."fc_ops" o
     WHERE o.token IN (SELECT n.token FROM "public"."fc_ops" n WHERE n.token > p_token
                        ORDER BY n.token LIMIT 2)
       AND o.expires_at <= extract(epoch FROM clock_timestamp());
    outcome := 'ok'; status := r.status;
END
$fn$;

CREATE OR REPLACE FUNCTION "public"."fc_rebuild_run"(p_run_key text, p_run_id bytea, p_status text, p_data bytea,
                              p_labels bytea[], p_now double precision)
RETURNS TABLE (outcome text, run "public"."fc_runs") LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    r "public"."fc_runs"%ROWTYPE;
    v_problem text;
    v_held bigint;
    v_forever bigint;
    v_latest double precision;
    v_sequence bigint;
    v_id text;
    v_created double precision;
    v_labels bytea[];
    v_removed bytea[];
    v_kept bytea[];
BEGIN
    SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'missing'::text, NULL::"public"."fc_runs";
        RETURN;
    END IF;
    SELECT d.problem INTO v_problem FROM "public"."fc_damaged_runs"(p_run_key, '', 1) d;
    IF v_problem IS NULL AND r.run_id IS DISTINCT FROM p_run_id THEN
        -- Copied over from another run: the caller's run id is the one of this run key.
        v_problem := 'names another run';
    END IF;
    IF v_problem IS NULL THEN
        RETURN QUERY SELECT 'intact'::text, r;
        RETURN;
    END IF;
    SELECT count(*), count(*) FILTER (WHERE c.expires_at IS NULL), max(c.expires_at),
           max(c.sequence)
      INTO v_held, v_forever, v_latest, v_sequence
      FROM "public"."fc_checkpoints" c WHERE c.run_key = p_run_key;
    IF v_held = 0 THEN
        RETURN QUERY SELECT 'empty'::text, NULL::"public"."fc_runs";
        RETURN;
    END IF;
    -- The incarnation from the newest of the run's own checkpoints; the latest sequence is
    -- the highest in place, whoever's, so the next append finds its primary key free.
    SELECT c.checkpoint_id INTO v_id
      FROM "public"."fc_checkpoints" c WHERE c.run_key = p_run_key AND (c.checkpoint_id ~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$' AND split_part(c.checkpoint_id, '-', 2) = p_run_key)
     ORDER BY c.sequence DESC LIMIT 1;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'foreign'::text, NULL::"public"."fc_runs";
        RETURN;
    END IF;
    v_created := coalesce((
        SELECT c.created_at FROM "public"."fc_checkpoints" c
         WHERE c.run_key = p_run_key AND (c.checkpoint_id ~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$' AND split_part(c.checkpoint_id, '-', 2) = p_run_key)
           AND c.created_at > '-Infinity' AND c.created_at < 'Infinity'
         ORDER BY c.sequence LIMIT 1), p_now);
    IF cardinality(p_labels) > 0 THEN
        v_labels := p_labels;
    ELSE
        -- The label rows are written with the run's creation and follow its incarnation;
        -- the row's own list (in the order given) when it names the same labels.
        v_labels := ARRAY(SELECT DISTINCT l.label FROM "public"."fc_labels" l
                           WHERE l.run_key = p_run_key ORDER BY l.label);
        IF (SELECT array_agg(DISTINCT label ORDER BY label) FROM unnest(r.labels) label)
           IS NOT DISTINCT FROM (CASE WHEN cardinality(v_labels) > 0 THEN v_labels END) THEN
            v_labels := r.labels;
        END IF;
    END IF;
    UPDATE "public"."fc_runs" x
       SET run_id = p_run_id, incarnation = split_part(v_id, '-', 3), status = p_status,
           created_at = v_created, updated_at = p_now, latest_sequence = v_sequence,
           checkpoint_count = v_held, forever_count = v_forever,
           expires_at = CASE WHEN v_forever > 0 THEN NULL ELSE v_latest END, purge_at = NULL,
           version = 0, data = p_data, labels = v_labels, update_token = NULL
     WHERE x.run_key = p_run_key
    RETURNING x.* INTO r;
    DELETE FROM "public"."fc_labels" l WHERE l.run_key = p_run_key;
    INSERT INTO "public"."fc_labels" (label, created_at, run_key)
    SELECT DISTINCT label, v_created, p_run_key FROM unnest(v_labels) label;
    -- Shared items: each key counted once per checkpoint in place that names it.
    WITH old AS (
        DELETE FROM "public"."fc_refs" f WHERE f.run_key = p_run_key RETURNING f.key, f.removed
    )
    SELECT array_agg(key) FILTER (WHERE removed), array_agg(key) FILTER (WHERE NOT removed)
      INTO v_removed, v_kept FROM old;
    INSERT INTO "public"."fc_refs" (run_key, key, holders, removed)
    SELECT p_run_key, named.key, count(*),
           named.key = ANY (coalesce(v_removed, '{}'))
           OR (NOT named.key = ANY (coalesce(v_kept, '{}'))
               AND NOT EXISTS (SELECT 1 FROM "public"."fc_items" i
                                WHERE i.run_key = p_run_key AND i.key = named.key))
      FROM "public"."fc_checkpoints" c, LATERAL (SELECT DISTINCT unnest(c.refs)) named(key)
     WHERE c.run_key = p_run_key
     GROUP BY named.key;
    -- The marks of the items whose count went (migration 14).
    UPDATE "public"."fc_items" i SET kept = NULL
     WHERE i.run_key = p_run_key AND i.kept
       AND NOT EXISTS (SELECT 1 FROM "public"."fc_refs" f WHERE f.run_key = p_run_key AND f.key = i.key);
    RETURN QUERY SELECT 'ok'::text, r;
END
$fn$;

CREATE OR REPLACE FUNCTION "public"."fc_purge"(p_now double precision, p_limit integer,
                        OUT removed bigint, OUT done boolean)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_budget integer := greatest(p_limit, 1);
    v_server_now double precision := extract(epoch FROM clock_timestamp());
    v_key text;
    v_count bigint;
    v_busy text[] := '{}';
    v_locks integer := 0;
    v_runs text[];
    v_keys bytea[];
    v_run_items bytea[];
    v_marked bigint;
    r "public"."fc_runs"%ROWTYPE;
BEGIN
    removed := 0;
    FOR v_key IN
        SELECT x.run_key FROM "public"."fc_runs" x WHERE x.purge_at IS NOT NULL AND x.purge_at <= p_now
         ORDER BY x.purge_at LIMIT v_budget
    LOOP
        DELETE FROM "public"."fc_runs" x WHERE x.run_key = v_key AND x.checkpoint_count = 0
           AND NOT EXISTS (SELECT 1 FROM "public"."fc_checkpoints" c WHERE c.run_key = v_key);
        IF FOUND THEN
            DELETE FROM "public"."fc_refs" f WHERE f.run_key = v_key;
            DELETE FROM "public"."fc_items" i WHERE i.run_key = v_key;
        ELSE
            -- A row that says its run is empty over checkpoints in place (put back from an
            -- older copy): never taken for empty, left for repair, out of this loop.
            UPDATE "public"."fc_runs" x SET purge_at = NULL WHERE x.run_key = v_key AND x.purge_at <= p_now;
        END IF;
        v_budget := v_budget - 1;
    END LOOP;
    FOR v_key IN
        SELECT DISTINCT due.run_key FROM (
            SELECT c.run_key FROM "public"."fc_checkpoints" c
             WHERE c.expires_at IS NOT NULL AND c.expires_at <= p_now
             ORDER BY c.expires_at LIMIT greatest(v_budget, 0)) due
    LOOP
        EXIT WHEN v_budget <= 0;
        SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = v_key FOR NO KEY UPDATE;
        CONTINUE WHEN NOT FOUND;
        IF "public"."fc_damage"(v_key, r.run_id, r.incarnation, r.latest_sequence, r.checkpoint_count,
                    r.expires_at) IS NOT NULL THEN
            -- A damaged row: its expired checkpoints go by their own expiry, the row stays
            -- as it is (never taken for the run's expiry) until a repair rebuilds it.
            v_count := "public"."fc_remove"(v_key, ARRAY(
                SELECT c.sequence FROM "public"."fc_checkpoints" c
                 WHERE c.run_key = v_key AND c.expires_at <= p_now
                 ORDER BY c.expires_at LIMIT v_budget), false);
        ELSIF r.expires_at IS NOT NULL AND r.expires_at <= p_now THEN
            -- The whole run expired: everything of it goes.
            WITH gone AS (DELETE FROM "public"."fc_checkpoints" c WHERE c.run_key = v_key RETURNING 1)
            SELECT count(*) INTO v_count FROM gone;
            DELETE FROM "public"."fc_runs" x WHERE x.run_key = v_key;
            DELETE FROM "public"."fc_refs" f WHERE f.run_key = v_key;
            DELETE FROM "public"."fc_items" i WHERE i.run_key = v_key;
        ELSE
            v_count := "public"."fc_remove"(v_key, ARRAY(
                SELECT c.sequence FROM "public"."fc_checkpoints" c
                 WHERE c.run_key = v_key AND c.expires_at <= p_now
                 ORDER BY c.expires_at LIMIT v_budget), true);
        END IF;
        removed := removed + v_count;
        v_budget := v_budget - greatest(v_count, 1)::integer;
    END LOOP;
    <<expired_items>>
    LOOP
        EXIT WHEN v_budget <= 0;
        SELECT array_agg(e.run_key), array_agg(e.key) INTO v_runs, v_keys FROM (
            SELECT e.run_key, e.key FROM "public"."fc_items" e
             WHERE e.expires_at IS NOT NULL AND e.expires_at <= p_now
               AND e.kept IS NOT TRUE
               AND NOT (e.run_key = ANY (v_busy))
             ORDER BY e.expires_at LIMIT v_budget) e;
        EXIT WHEN v_runs IS NULL;
        FOR v_key IN SELECT DISTINCT u.k FROM unnest(v_runs) u(k) LOOP
            PERFORM 1 FROM "public"."fc_runs" x WHERE x.run_key = v_key FOR SHARE SKIP LOCKED;
            IF NOT FOUND THEN
                IF EXISTS (SELECT 1 FROM "public"."fc_runs" x WHERE x.run_key = v_key) THEN
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
            v_run_items := ARRAY(SELECT c.key FROM unnest(v_runs, v_keys) c(run_key, key)
                                  WHERE c.run_key = v_key);
            WITH gone AS (
                DELETE FROM "public"."fc_items" i
                 WHERE i.run_key = v_key AND i.key = ANY (v_run_items)
                   AND i.expires_at IS NOT NULL AND i.expires_at <= p_now
                   AND NOT EXISTS (SELECT 1 FROM "public"."fc_refs" f
                                    WHERE f.run_key = v_key AND f.key = i.key)
                RETURNING 1
            ), marked AS (
                UPDATE "public"."fc_items" i SET kept = true
                 WHERE i.run_key = v_key AND i.key = ANY (v_run_items)
                   AND i.kept IS NOT TRUE
                   AND EXISTS (SELECT 1 FROM "public"."fc_refs" f WHERE f.run_key = v_key AND f.key = i.key)
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM marked)
              INTO v_count, v_marked;
            IF v_count + v_marked = 0 THEN
                v_busy := v_busy || v_key;  -- gone, or written again, meanwhile
            END IF;
            v_budget := v_budget - (v_count + v_marked)::integer;
        END LOOP;
    END LOOP;
    -- The server's clock in a variable: compared with a volatile call, the index is unused.
    DELETE FROM "public"."fc_ops" o WHERE o.token IN (
        SELECT token FROM "public"."fc_ops" WHERE expires_at <= v_server_now LIMIT 1000);
    done := NOT EXISTS (SELECT 1 FROM "public"."fc_runs" x
                         WHERE x.purge_at IS NOT NULL AND x.purge_at <= p_now)
        AND NOT EXISTS (SELECT 1 FROM "public"."fc_checkpoints" c
                         WHERE c.expires_at IS NOT NULL AND c.expires_at <= p_now)
        AND (SELECT e.expires_at FROM "public"."fc_items" e
              WHERE e.expires_at IS NOT NULL AND e.expires_at <= p_now
                AND e.kept IS NOT TRUE AND NOT (e.run_key = ANY (v_busy))
              ORDER BY e.expires_at LIMIT 1) IS NULL;
END
$fn$;

INSERT INTO "public"."fc_migrations" (version, description) VALUES (14, 'the cleanup marks the expired items a checkpoint names when it first meets them and reads them no more until no checkpoint names them');

CREATE OR REPLACE FUNCTION "public"."fc_remove"(p_run_key text, p_sequences bigint[], p_count_run boolean)
RETURNS bigint LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_gone bigint[];
    v_forever bigint;
    v_refs bytea[];
    v_zeroed bytea[];
    v_gone_keys bytea[];
BEGIN
    IF p_sequences IS NULL OR cardinality(p_sequences) = 0 THEN
        RETURN 0;
    END IF;
    WITH gone AS (
        DELETE FROM "public"."fc_checkpoints"
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
    WITH owned AS (
        DELETE FROM "public"."fc_items" i WHERE i.run_key = p_run_key AND i.owner = ANY (v_gone)
        RETURNING i.key
    )
    SELECT array_agg(key) INTO v_gone_keys FROM owned;
    IF v_gone_keys IS NOT NULL THEN
        UPDATE "public"."fc_refs" f SET removed = true
         WHERE f.run_key = p_run_key AND f.key = ANY (v_gone_keys) AND NOT f.removed;
    END IF;
    IF v_refs IS NOT NULL THEN
        WITH released AS (
            SELECT ref, count(*) AS times FROM unnest(v_refs) ref GROUP BY ref
        ), counted AS (
            UPDATE "public"."fc_refs" r SET holders = r.holders - released.times
              FROM released
             WHERE r.run_key = p_run_key AND r.key = released.ref
            RETURNING r.key, r.holders
        )
        SELECT array_agg(key) FILTER (WHERE holders <= 0) INTO v_zeroed FROM counted;
        -- The newest checkpoint names a zeroed key, or a key it is nested under (its item is
        -- read with that key) whose count is missing (deleted by hand: nothing above the
        -- zeroed key holds its item then). A count in place for that key holds it: no recount.
        IF v_zeroed IS NOT NULL AND EXISTS (
               SELECT 1 FROM (SELECT c.refs FROM "public"."fc_checkpoints" c WHERE c.run_key = p_run_key
                               ORDER BY c.sequence DESC LIMIT 1) newest
                WHERE newest.refs && v_zeroed
                   OR EXISTS (
                          SELECT 1 FROM unnest(v_zeroed) z(k),
                                        generate_series(1, length(z.k)) s(n)
                           WHERE get_byte(z.k, s.n - 1) = 47
                             AND substring(z.k FROM 1 FOR s.n - 1) = ANY (newest.refs)
                             AND NOT EXISTS (
                                     SELECT 1 FROM "public"."fc_refs" f
                                      WHERE f.run_key = p_run_key
                                        AND f.key = substring(z.k FROM 1 FOR s.n - 1)))) THEN
            WITH named AS (
                SELECT u.k AS key, count(*) AS holders
                  FROM "public"."fc_checkpoints" c, LATERAL (SELECT DISTINCT unnest(c.refs)) u(k)
                 WHERE c.run_key = p_run_key AND u.k IS NOT NULL
                 GROUP BY u.k
            ), unnamed AS (
                DELETE FROM "public"."fc_refs" f
                 WHERE f.run_key = p_run_key
                   AND NOT EXISTS (SELECT 1 FROM named WHERE named.key = f.key)
                RETURNING f.key
            ), unmarked AS (
                -- Their items may stay (loose items): the cleanup sees them again.
                UPDATE "public"."fc_items" i SET kept = NULL
                  FROM unnamed u
                 WHERE i.run_key = p_run_key AND i.key = u.key AND i.kept
            )
            INSERT INTO "public"."fc_refs" AS f (run_key, key, holders)
            SELECT p_run_key, named.key, named.holders FROM named
            ON CONFLICT (run_key, key) DO UPDATE SET holders = excluded.holders;
            v_zeroed := ARRAY(SELECT z.k FROM unnest(v_zeroed) z(k)
                               WHERE NOT EXISTS (SELECT 1 FROM "public"."fc_refs" f
                                                  WHERE f.run_key = p_run_key AND f.key = z.k));
            IF cardinality(v_zeroed) = 0 THEN
                v_zeroed := NULL;
            END IF;
        END IF;
        IF v_zeroed IS NOT NULL THEN
            DELETE FROM "public"."fc_refs" WHERE run_key = p_run_key AND key = ANY (v_zeroed);
            DELETE FROM "public"."fc_items" i
             WHERE i.run_key = p_run_key AND i.key = ANY (v_zeroed) AND i.owner IS NULL
               AND NOT EXISTS (
                   SELECT 1 FROM "public"."fc_refs" f
                    WHERE f.run_key = p_run_key
                      AND f.key IN (SELECT i.key UNION ALL
                                    SELECT substring(i.key FROM 1 FOR c.n - 1)
                                      FROM generate_series(1, length(i.key)) c(n)
                                     WHERE get_byte(i.key, c.n - 1) = 47));
            DELETE FROM "public"."fc_items" i USING unnest(v_zeroed) n(k)
             WHERE i.run_key = p_run_key AND i.key >= n.k || '/'::bytea
               AND i.key < n.k || '0'::bytea AND i.owner IS NULL
               AND NOT EXISTS (
                   SELECT 1 FROM "public"."fc_refs" f
                    WHERE f.run_key = p_run_key
                      AND f.key IN (SELECT i.key UNION ALL
                                    SELECT substring(i.key FROM 1 FOR c.n - 1)
                                      FROM generate_series(1, length(i.key)) c(n)
                                     WHERE get_byte(i.key, c.n - 1) = 47));
            UPDATE "public"."fc_items" i SET kept = NULL
             WHERE i.run_key = p_run_key AND i.key = ANY (v_zeroed) AND i.kept;
        END IF;
    END IF;
    IF NOT p_count_run THEN
        RETURN cardinality(v_gone);
    END IF;
    UPDATE "public"."fc_runs" r
       SET checkpoint_count = r.checkpoint_count - cardinality(v_gone),
           forever_count = r.forever_count - v_forever,
           expires_at = CASE
               WHEN r.checkpoint_count = cardinality(v_gone) THEN 0
               WHEN r.forever_count > v_forever THEN NULL
               ELSE (SELECT max(c.expires_at) FROM "public"."fc_checkpoints" c
                      WHERE c.run_key = p_run_key AND c.expires_at IS NOT NULL)
           END,
           purge_at = CASE WHEN r.checkpoint_count = cardinality(v_gone) THEN 0 END
     WHERE r.run_key = p_run_key;
    RETURN cardinality(v_gone);
END
$fn$;

CREATE OR REPLACE FUNCTION "public"."fc_rebuild_run"(p_run_key text, p_run_id bytea, p_status text, p_data bytea,
                              p_labels bytea[], p_now double precision)
RETURNS TABLE (outcome text, run "public"."fc_runs") LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    r "public"."fc_runs"%ROWTYPE;
    v_problem text;
    v_held bigint;
    v_forever bigint;
    v_latest double precision;
    v_sequence bigint;
    v_id text;
    v_created double precision;
    v_labels bytea[];
    v_removed bytea[];
    v_kept bytea[];
BEGIN
    SELECT * INTO r FROM "public"."fc_runs" x WHERE x.run_key = p_run_key FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'missing'::text, NULL::"public"."fc_runs";
        RETURN;
    END IF;
    SELECT d.problem INTO v_problem FROM "public"."fc_damaged_runs"(p_run_key, '', 1) d;
    IF v_problem IS NULL AND r.run_id IS DISTINCT FROM p_run_id THEN
        -- Copied over from another run: the caller's run id is the one of this run key.
        v_problem := 'names another run';
    END IF;
    IF v_problem IS NULL THEN
        RETURN QUERY SELECT 'intact'::text, r;
        RETURN;
    END IF;
    SELECT count(*), count(*) FILTER (WHERE c.expires_at IS NULL), max(c.expires_at),
           max(c.sequence)
      INTO v_held, v_forever, v_latest, v_sequence
      FROM "public"."fc_checkpoints" c WHERE c.run_key = p_run_key;
    IF v_held = 0 THEN
        RETURN QUERY SELECT 'empty'::text, NULL::"public"."fc_runs";
        RETURN;
    END IF;
    -- The incarnation from the newest of the run's own checkpoints; the latest sequence is
    -- the highest in place, whoever's, so the next append finds its primary key free.
    SELECT c.checkpoint_id INTO v_id
      FROM "public"."fc_checkpoints" c WHERE c.run_key = p_run_key AND (c.checkpoint_id ~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$' AND split_part(c.checkpoint_id, '-', 2) = p_run_key)
     ORDER BY c.sequence DESC LIMIT 1;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'foreign'::text, NULL::"public"."fc_runs";
        RETURN;
    END IF;
    v_created := coalesce((
        SELECT c.created_at FROM "public"."fc_checkpoints" c
         WHERE c.run_key = p_run_key AND (c.checkpoint_id ~ '^ck-[a-z2-7]+-[a-z2-7]+-[0-9]+$' AND split_part(c.checkpoint_id, '-', 2) = p_run_key)
           AND c.created_at > '-Infinity' AND c.created_at < 'Infinity'
         ORDER BY c.sequence LIMIT 1), p_now);
    IF cardinality(p_labels) > 0 THEN
        v_labels := p_labels;
    ELSE
        -- The label rows are written with the run's creation and follow its incarnation;
        -- the row's own list (in the order given) when it names the same labels.
        v_labels := ARRAY(SELECT DISTINCT l.label FROM "public"."fc_labels" l
                           WHERE l.run_key = p_run_key
                             AND encode(l.label, 'hex') ~ '^([0-7][0-9a-f]|c[2-9a-f][89ab][0-9a-f]|d[0-9a-f][89ab][0-9a-f]|e0[ab][0-9a-f][89ab][0-9a-f]|e[1-9a-cef][89ab][0-9a-f][89ab][0-9a-f]|ed[89][0-9a-f][89ab][0-9a-f]|f0[9ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f[1-3][89ab][0-9a-f][89ab][0-9a-f][89ab][0-9a-f]|f48[0-9a-f][89ab][0-9a-f][89ab][0-9a-f])*$' ORDER BY l.label);
        IF (SELECT array_agg(DISTINCT label ORDER BY label) FROM unnest(r.labels) label)
           IS NOT DISTINCT FROM (CASE WHEN cardinality(v_labels) > 0 THEN v_labels END) THEN
            v_labels := r.labels;
        END IF;
    END IF;
    UPDATE "public"."fc_runs" x
       SET run_id = p_run_id, incarnation = split_part(v_id, '-', 3), status = p_status,
           created_at = v_created, updated_at = p_now, latest_sequence = v_sequence,
           checkpoint_count = v_held, forever_count = v_forever,
           expires_at = CASE WHEN v_forever > 0 THEN NULL ELSE v_latest END, purge_at = NULL,
           version = 0, data = p_data, labels = v_labels, update_token = NULL
     WHERE x.run_key = p_run_key
    RETURNING x.* INTO r;
    DELETE FROM "public"."fc_labels" l WHERE l.run_key = p_run_key;
    INSERT INTO "public"."fc_labels" (label, created_at, run_key)
    SELECT DISTINCT label, v_created, p_run_key FROM unnest(v_labels) label;
    -- Shared items: each key counted once per checkpoint in place that names it.
    WITH old AS (
        DELETE FROM "public"."fc_refs" f WHERE f.run_key = p_run_key RETURNING f.key, f.removed
    )
    SELECT array_agg(key) FILTER (WHERE removed), array_agg(key) FILTER (WHERE NOT removed)
      INTO v_removed, v_kept FROM old;
    INSERT INTO "public"."fc_refs" (run_key, key, holders, removed)
    SELECT p_run_key, named.key, count(*),
           named.key = ANY (coalesce(v_removed, '{}'))
           OR (NOT named.key = ANY (coalesce(v_kept, '{}'))
               AND NOT EXISTS (SELECT 1 FROM "public"."fc_items" i
                                WHERE i.run_key = p_run_key AND i.key = named.key))
      FROM "public"."fc_checkpoints" c, LATERAL (SELECT DISTINCT unnest(c.refs)) named(key)
     WHERE c.run_key = p_run_key AND named.key IS NOT NULL
     GROUP BY named.key;
    -- The marks of the items whose count went (migration 14).
    UPDATE "public"."fc_items" i SET kept = NULL
     WHERE i.run_key = p_run_key AND i.kept
       AND NOT EXISTS (SELECT 1 FROM "public"."fc_refs" f WHERE f.run_key = p_run_key AND f.key = i.key);
    RETURN QUERY SELECT 'ok'::text, r;
END
$fn$;

INSERT INTO "public"."fc_migrations" (version, description) VALUES (15, 'a count that falls to zero for a key the run''s newest checkpoint names, or nests under one of them whose count is missing (lowered or deleted by hand), is taken again from the log, so the item stays; a rebuild leaves out label rows that are not UTF-8 and NULL refs');

COMMIT;
