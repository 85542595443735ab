-- mvrefresh's own bookkeeping. Installed by `mvrefresh install`, which runs this file in one
-- transaction under an advisory lock. Every statement is idempotent: running it again changes
-- nothing. `meta.schema_version` says which version is installed; an older version is upgraded
-- in place (version 2's pending change-log rows are moved into `pending`, nothing is lost;
-- version 4 added `mark_keys`, which the capture triggers call, and `subscribe`).
--
-- How a change travels (see also src/store.rs):
--   writer's row trigger ─▶ `dirty` (one row per channel and key while the key is dirty; a key
--   already dirty costs the writer a lookup and no write) + pg_notify(channel, '') only when the
--   key turns dirty
--   daemon "collect" ─▶ moves `dirty` rows into `pending` (one row per subscribed view and key),
--   in a short transaction of its own, off the writers' path
--   refresh ─▶ deletes the `pending` rows it covers in its own transaction
--
-- Nothing here is writable by PUBLIC: writers reach `dirty` only through the SECURITY DEFINER
-- capture functions that `mvrefresh install` generates (EXECUTE revoked from PUBLIC), so a role
-- can mark keys dirty only by changing rows of a captured table.

CREATE SCHEMA IF NOT EXISTS mvrefresh;
COMMENT ON SCHEMA mvrefresh IS 'mvrefresh: dirty keys, pending keys, subscriptions and refresh history';
-- Version 2 granted USAGE to every role (writers called record_changes themselves).
REVOKE ALL ON SCHEMA mvrefresh FROM PUBLIC;

CREATE TABLE IF NOT EXISTS mvrefresh.meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- Which view consumes which channel's keys. Written by `mvrefresh install` and by `mvrefresh run`
-- at start-up (adds what is missing).
CREATE TABLE IF NOT EXISTS mvrefresh.subscription (
    channel   text NOT NULL,
    view_name text NOT NULL,
    PRIMARY KEY (channel, view_name)
);

-- The installed captures (`[[capture]]` and the bundled analytics' bout_results capture): which
-- table feeds which channel. The daemon reads it to know which channels are captured (their
-- notifications are only wake-ups) and which tables a hand-over must wait for.
CREATE TABLE IF NOT EXISTS mvrefresh.capture (
    name        text PRIMARY KEY,
    table_name  regclass NOT NULL,
    channel     text NOT NULL,
    fingerprint text NOT NULL
);

-- Dirty keys, written by writers' capture triggers: at most one row per (channel, key) and
-- dirty period (a writer that finds the key dirty already writes nothing; writers that turn it
-- dirty at the same moment may each add one, which is harmless). `since` is the start of the
-- first writer's transaction. The daemon's collect deletes them. Key '*' means "everything"
-- (TRUNCATE, or a key longer than 1024 bytes).
CREATE TABLE IF NOT EXISTS mvrefresh.dirty (
    channel text NOT NULL,
    key     text NOT NULL,
    since   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS dirty_channel_key ON mvrefresh.dirty (channel, key);

-- Pending keys per view, written by the daemon (collect, and a refresh for the views that read
-- the refreshed one). A refresh deletes the rows it covers in its own transaction, so a failed
-- refresh leaves them pending. `xact` is the collect that wrote the row: a refresh consumes it
-- only once every writer that could have relied on the collected `dirty` row has ended (the
-- hand-over, see src/store.rs); NULL: no writer relied on it (dependents, upgrades).
CREATE TABLE IF NOT EXISTS mvrefresh.pending (
    view_name text NOT NULL,
    key       text NOT NULL,
    since     timestamptz NOT NULL,
    xact      xid8
);
CREATE INDEX IF NOT EXISTS pending_view_key ON mvrefresh.pending (view_name, key);

-- A secret that changes with every collect. A writer's session remembers the keys it found
-- dirty as md5(key:generation) in settings `mvrefresh.seen_<capture>_<n>`, and skips even the
-- lookup while the generation stands; the daemon changes it (to a random value no writer can
-- read) after taking keys, which forgets every session's memory at once.
-- Its lowest bit says whether writers must notify when a key turns dirty: 0 while a daemon
-- collects on its own every few hundred milliseconds (it finds the key without being told, and
-- writers skip PostgreSQL's commit-time notify lock), 1 once it has gone idle (it waits for a
-- notification). The daemon goes idle only after every writer that could have seen the 0 has
-- ended and a last collect found nothing (see src/daemon/intake.rs).
CREATE SEQUENCE IF NOT EXISTS mvrefresh.generation MINVALUE 1 MAXVALUE 9223372036854775807 NO CYCLE;
SELECT setval('mvrefresh.generation', mvrefresh_new_generation.v)
FROM (SELECT ('x' || substr(md5(gen_random_uuid()::text), 1, 15))::bit(60)::bigint | 1 AS v)
     AS mvrefresh_new_generation
WHERE NOT (SELECT is_called FROM mvrefresh.generation);

-- A view's name as mvrefresh records it (subscriptions, pending keys, history, metrics): the
-- relation the catalog resolves `p_relation` (a quoted, possibly schema-qualified name) to,
-- without `public.`, each part quoted only when it needs to be. Two configs naming one view two
-- ways (`public.mv_x`, `mv_x`) get one name, so replicas share locks and pending keys; two
-- views whose unquoted spellings look alike (`"a.b".c`, `a."b.c"`) get two. NULL when the
-- relation does not exist.
CREATE OR REPLACE FUNCTION mvrefresh.view_name(p_relation text)
RETURNS text
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT CASE WHEN n.nspname = 'public' THEN ''
                WHEN n.nspname ~ '^[a-z_][a-z0-9_$]*$' THEN n.nspname || '.'
                ELSE quote_ident(n.nspname) || '.' END
           || CASE WHEN c.relname ~ '^[a-z_][a-z0-9_$]*$' THEN c.relname::text
                   ELSE quote_ident(c.relname) END
    FROM pg_catalog.pg_class AS c JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
    WHERE c.oid = pg_catalog.to_regclass(p_relation);
END;

-- Adds the (channel, view) subscriptions that are missing, pairwise from the two arrays; a
-- newly subscribed view gets a pending '*' (it may have missed changes, so it is refreshed whole
-- once). How many were added. Used by `install` and by the daemon at start-up. It runs with the
-- caller's privileges (a caller who may not write the tables gets an error), so anyone may call it.
CREATE OR REPLACE FUNCTION mvrefresh.subscribe(p_channels text[], p_views text[])
RETURNS bigint
LANGUAGE sql
BEGIN ATOMIC
    WITH added AS (
        INSERT INTO mvrefresh.subscription (channel, view_name)
        SELECT * FROM unnest(p_channels, p_views)
        ON CONFLICT DO NOTHING
        RETURNING view_name
    ), queued AS (
        INSERT INTO mvrefresh.pending (view_name, key, since)
        SELECT DISTINCT view_name, '*', clock_timestamp() FROM added
    )
    SELECT count(*) FROM added;
END;

-- One row per refresh attempt, kept for `[refresh] history_retention`.
CREATE TABLE IF NOT EXISTS mvrefresh.refresh_history (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    view_name   text NOT NULL,
    mode        text NOT NULL,
    reason      text NOT NULL,
    keys        integer,          -- keys covered; NULL when the whole view was refreshed
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    duration_ms double precision NOT NULL,
    outcome     text NOT NULL CHECK (outcome IN ('success', 'failure')),
    error       text,
    replica     text NOT NULL
);
CREATE INDEX IF NOT EXISTS refresh_history_view_finished
    ON mvrefresh.refresh_history (view_name, finished_at DESC);
-- Pruning deletes the oldest rows in bounded batches.
CREATE INDEX IF NOT EXISTS refresh_history_finished
    ON mvrefresh.refresh_history (finished_at);

-- Marks `p_keys` dirty on `p_channel` for a capture and returns how many keys turned dirty: the
-- slow path of every capture trigger (the generated trigger functions skip it when their session
-- remembers every key as dirty already, and do the same themselves, inline, for the common case
-- of one relevant row that kept its key: keep the two alike). For each key not remembered: a lookup in `dirty` (a row
-- that a collect is taking right now does not count); when absent, one row, and one notification
-- unless a daemon is collecting on its own (PostgreSQL folds a transaction's identical
-- notifications into one). Then the key is remembered in the session setting
-- `<p_seen>_<hash of the key & 31>` as md5(key:generation) (32 settings of at most 16 entries
-- each, so a lookup reads a few hundred bytes). NULL keys are skipped; a key longer than 1024
-- bytes is recorded as '*' (everything), so odd data never fails the writer.
-- The generation is read before any lookup: a collect changes it after it deleted what it took,
-- so a key remembered under the current generation was dirty when remembered and not yet taken.
-- It returns a value so that a trigger can call it as a PL/pgSQL expression (`x := f(...)`)
-- rather than through PERFORM, which runs a whole query; and instead of pinning `search_path`
-- (a configuration change on every call, undone on return, costing more than the rest of a
-- lookup) every type, function and operator it uses is schema-qualified, so a writer's own
-- objects on its search_path cannot stand in for them.
CREATE OR REPLACE FUNCTION mvrefresh.mark_keys(p_channel pg_catalog.text, p_seen pg_catalog.text,
                                               p_keys pg_catalog.text[])
RETURNS pg_catalog.int4
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    g       pg_catalog.int8 :=
                pg_catalog.pg_sequence_last_value('mvrefresh.generation'::pg_catalog.regclass);
    k       pg_catalog.text;
    h       pg_catalog.text;
    setting pg_catalog.text;
    seen    pg_catalog.text;
    added   pg_catalog.int4 := 0;
BEGIN
    FOREACH k IN ARRAY COALESCE(p_keys, '{}'::pg_catalog.text[]) LOOP
        CONTINUE WHEN k IS NULL;
        h := pg_catalog.md5(pg_catalog.format('%s:%s', k, g));
        setting := pg_catalog.format('%s_%s', p_seen,
                                     pg_catalog.hashtext(k) OPERATOR(pg_catalog.&) 31);
        seen := COALESCE(pg_catalog.current_setting(setting, true), '');
        CONTINUE WHEN pg_catalog.strpos(seen, h) OPERATOR(pg_catalog.>) 0;
        IF pg_catalog.octet_length(k) OPERATOR(pg_catalog.>) 1024 THEN
            k := '*';
        END IF;
        PERFORM FROM mvrefresh.dirty AS d
        WHERE d.channel OPERATOR(pg_catalog.=) p_channel
          AND d.key OPERATOR(pg_catalog.=) k
          AND d.xmax OPERATOR(pg_catalog.=) '0'::pg_catalog.xid;
        IF NOT FOUND THEN
            INSERT INTO mvrefresh.dirty (channel, key) VALUES (p_channel, k);
            added := added OPERATOR(pg_catalog.+) 1;
            IF g OPERATOR(pg_catalog.&) 1 OPERATOR(pg_catalog.=) 1 THEN
                PERFORM pg_catalog.pg_notify(p_channel, '');
            END IF;
        END IF;
        IF pg_catalog.octet_length(seen) OPERATOR(pg_catalog.>=) 512 THEN
            seen := '';
        END IF;
        seen := pg_catalog.set_config(setting, seen OPERATOR(pg_catalog.||) h, false);
    END LOOP;
    RETURN added;
END;
$$;
REVOKE ALL ON FUNCTION mvrefresh.mark_keys(text, text, text[]) FROM PUBLIC;

-- The same for statement-level captures (the bundled analytics' capture on bout_results) and for
-- capture triggers generated by earlier versions, which call it through PERFORM.
CREATE OR REPLACE FUNCTION mvrefresh.mark(p_channel text, p_seen text, p_keys text[])
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM mvrefresh.mark_keys(p_channel, p_seen, p_keys);
END;
$$;
REVOKE ALL ON FUNCTION mvrefresh.mark(text, text, text[]) FROM PUBLIC;

-- The pg_cron watch's cursor, per database whose `cron.job_run_details` it reads: every run up
-- to `last_runid` is finished and was looked at; `alerted` holds the failed runs above it that
-- were already reported (runs finish out of order). `version` lets replicas take turns: a poll
-- only sends what it recorded by moving `version` on.
CREATE TABLE IF NOT EXISTS mvrefresh.pg_cron_cursor (
    cron_database text PRIMARY KEY,
    last_runid    bigint NOT NULL,
    alerted       bigint[] NOT NULL DEFAULT '{}',
    version       bigint NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Upgrade from version 2: its change log (one row per view and key and writing statement) becomes
-- pending keys, and its capture machinery goes (its statement triggers are dropped here, whatever
-- the config says, because they call record_changes; the configured captures are re-created
-- by the steps that follow in the same transaction).
DO $mvrefresh$
DECLARE
    t record;
BEGIN
    IF to_regclass('mvrefresh.change_log') IS NOT NULL THEN
        INSERT INTO mvrefresh.pending (view_name, key, since, xact)
        SELECT view_name, key, min(changed_at), NULL
        FROM mvrefresh.change_log
        GROUP BY view_name, key;
        DROP TABLE mvrefresh.change_log;
    END IF;
    FOR t IN
        SELECT tg.tgrelid::regclass AS rel, tg.tgname
        FROM pg_trigger AS tg JOIN pg_proc AS p ON p.oid = tg.tgfoid
        WHERE p.pronamespace = 'mvrefresh'::regnamespace
          AND tg.tgname ~ '^mvrefresh_capture_.*_(ins|upd|del|trunc)$'
          AND (tg.tgoldtable IS NOT NULL OR tg.tgnewtable IS NOT NULL OR tg.tgname LIKE '%\_trunc')
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', t.tgname, t.rel);
    END LOOP;
    -- Their functions, unless a trigger still uses them (they are re-created when configured).
    FOR t IN
        SELECT p.oid::regprocedure AS fn FROM pg_proc AS p
        WHERE p.pronamespace = 'mvrefresh'::regnamespace AND p.proname LIKE 'capture\_%'
          AND p.prosrc LIKE '%record_changes%'
          AND NOT EXISTS (SELECT FROM pg_trigger AS tg WHERE tg.tgfoid = p.oid)
    LOOP
        EXECUTE format('DROP FUNCTION %s', t.fn);
    END LOOP;
END
$mvrefresh$;
DROP FUNCTION IF EXISTS mvrefresh.record_changes(text, text[]);
DELETE FROM mvrefresh.meta WHERE key LIKE 'capture:%';

INSERT INTO mvrefresh.meta (key, value) VALUES ('schema_version', '4')
ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value WHERE mvrefresh.meta.value <> EXCLUDED.value;
