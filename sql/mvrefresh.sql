-- mvrefresh's own bookkeeping. Installed by `mvrefresh install`, which runs this file in one
-- transaction under an advisory lock. Every statement is idempotent: running it again changes
-- nothing. Upgrades are additive (new objects, CREATE OR REPLACE FUNCTION); `meta.schema_version`
-- says which version is installed.

CREATE SCHEMA IF NOT EXISTS mvrefresh;
COMMENT ON SCHEMA mvrefresh IS 'mvrefresh: change log, subscriptions and refresh history';

CREATE TABLE IF NOT EXISTS mvrefresh.meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- Which view consumes which channel's changes. Written by `mvrefresh install` (exactly the
-- configured views) and by `mvrefresh run` at start-up (adds what is missing).
CREATE TABLE IF NOT EXISTS mvrefresh.subscription (
    channel   text NOT NULL,
    view_name text NOT NULL,
    PRIMARY KEY (channel, view_name)
);

-- The durable change log: one row per (view, dirty key) per writing statement, inserted in the
-- writer's transaction by mvrefresh.record_changes(). A refresh deletes exactly the rows it
-- covered, in its own transaction, so a failed refresh leaves them pending. Writers only ever
-- insert, so they never wait on a refresh. The key '*' means "everything".
CREATE TABLE IF NOT EXISTS mvrefresh.change_log (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    view_name  text NOT NULL,
    key        text NOT NULL,
    channel    text NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS change_log_view_key ON mvrefresh.change_log (view_name, key);

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

-- Record that `p_keys` changed on `p_channel`: one change-log row per subscribed view and distinct
-- non-null key, and one notification per distinct key. PostgreSQL folds identical notifications
-- of one transaction into one, so a transaction that dirties K keys sends at most K. Never raises
-- on odd keys: NULLs are skipped, and a key too long for a notification payload is logged but
-- not announced (the daemon's periodic catch-up finds it).
CREATE OR REPLACE FUNCTION mvrefresh.record_changes(p_channel text, p_keys text[])
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    k text;
BEGIN
    IF p_keys IS NULL OR cardinality(p_keys) = 0 THEN
        RETURN;
    END IF;
    INSERT INTO mvrefresh.change_log (view_name, key, channel)
    SELECT s.view_name, d.key, p_channel
    FROM mvrefresh.subscription AS s
    CROSS JOIN (SELECT DISTINCT u.key FROM unnest(p_keys) AS u(key) WHERE u.key IS NOT NULL) AS d
    WHERE s.channel = p_channel;
    FOR k IN SELECT DISTINCT u.key FROM unnest(p_keys) AS u(key)
             WHERE u.key IS NOT NULL AND octet_length(u.key) < 7900
    LOOP
        PERFORM pg_notify(p_channel, k);
    END LOOP;
END;
$$;
GRANT USAGE ON SCHEMA mvrefresh TO PUBLIC;
GRANT EXECUTE ON FUNCTION mvrefresh.record_changes(text, text[]) TO PUBLIC;

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

INSERT INTO mvrefresh.meta (key, value) VALUES ('schema_version', '2')
ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value WHERE mvrefresh.meta.value <> EXCLUDED.value;
