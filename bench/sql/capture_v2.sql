-- The previous release's capture, for `bench/write-overhead --baseline-sql bench/sql/capture_v2.sql`
-- (contender `capture-v2`): the output of that release's `mvrefresh --config config.toml install
-- --dry-run` with the shipped config.toml, i.e. its mvrefresh schema (schema_version 2: change log,
-- subscriptions, refresh history, record_changes() with one pg_notify per key), the
-- statement-level capture triggers on submissions and the eight subscriptions, in one
-- transaction. Without --analytics: it expects the operational tables and the bundled analytics
-- to exist already (the benchmark's template has them, and no mvrefresh schema).
-- Verbatim from BEGIN to COMMIT; keep it that way so the baseline stays what that release ran.
BEGIN;
SELECT pg_advisory_xact_lock(1836479078, 0);

-- sql/mvrefresh.sql
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

-- capture[0] (submissions)
CREATE OR REPLACE FUNCTION mvrefresh."capture_submissions"() RETURNS trigger
LANGUAGE plpgsql AS $mvrefresh$
DECLARE
    changed text[];
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        changed := ARRAY['*'];
    ELSIF TG_OP = 'INSERT' THEN
        SELECT array_agg(DISTINCT s.k) INTO changed FROM (SELECT ("challenge_id")::text AS k, "agent_id", "bout_id", "created_at", "final_lane_scores", "composite_score" FROM new_rows WHERE (status = 'scored')) AS s;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(DISTINCT s.k) INTO changed FROM (SELECT ("challenge_id")::text AS k, "agent_id", "bout_id", "created_at", "final_lane_scores", "composite_score" FROM old_rows WHERE (status = 'scored')) AS s;
    ELSE
        SELECT array_agg(DISTINCT s.k) INTO changed FROM (
            (SELECT ("challenge_id")::text AS k, "agent_id", "bout_id", "created_at", "final_lane_scores", "composite_score" FROM new_rows WHERE (status = 'scored') EXCEPT ALL SELECT ("challenge_id")::text AS k, "agent_id", "bout_id", "created_at", "final_lane_scores", "composite_score" FROM old_rows WHERE (status = 'scored'))
            UNION ALL
            (SELECT ("challenge_id")::text AS k, "agent_id", "bout_id", "created_at", "final_lane_scores", "composite_score" FROM old_rows WHERE (status = 'scored') EXCEPT ALL SELECT ("challenge_id")::text AS k, "agent_id", "bout_id", "created_at", "final_lane_scores", "composite_score" FROM new_rows WHERE (status = 'scored'))
        ) AS s;
    END IF;
    IF changed IS NOT NULL THEN
        PERFORM mvrefresh.record_changes('submission_scored', changed);
    END IF;
    RETURN NULL;
END
$mvrefresh$;
COMMENT ON FUNCTION mvrefresh."capture_submissions"() IS 'mvrefresh capture `submissions`: submissions → channel submission_scored';
CREATE OR REPLACE TRIGGER "mvrefresh_capture_submissions_ins" AFTER INSERT ON "submissions"
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION mvrefresh."capture_submissions"();
CREATE OR REPLACE TRIGGER "mvrefresh_capture_submissions_upd" AFTER UPDATE ON "submissions"
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION mvrefresh."capture_submissions"();
CREATE OR REPLACE TRIGGER "mvrefresh_capture_submissions_del" AFTER DELETE ON "submissions"
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION mvrefresh."capture_submissions"();
CREATE OR REPLACE TRIGGER "mvrefresh_capture_submissions_trunc" AFTER TRUNCATE ON "submissions"
    FOR EACH STATEMENT EXECUTE FUNCTION mvrefresh."capture_submissions"();
INSERT INTO mvrefresh.meta (key, value) VALUES ('capture:submissions', '4d0c58c80540df86')
    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value
    WHERE mvrefresh.meta.value <> EXCLUDED.value;
EXPLAIN (COSTS OFF) SELECT ("challenge_id")::text AS k, "agent_id", "bout_id", "created_at", "final_lane_scores", "composite_score" FROM "submissions" WHERE (status = 'scored') EXCEPT ALL SELECT ("challenge_id")::text AS k, "agent_id", "bout_id", "created_at", "final_lane_scores", "composite_score" FROM "submissions" WHERE (status = 'scored');

-- captures: drop the ones no longer configured
DO $mvrefresh$
DECLARE
    t record;
BEGIN
    FOR t IN
        SELECT tg.tgrelid::regclass AS rel, tg.tgname
        FROM pg_trigger tg JOIN pg_proc p ON p.oid = tg.tgfoid
        WHERE p.pronamespace = 'mvrefresh'::regnamespace AND p.proname LIKE 'capture\_%'
          AND (tg.tgrelid::regclass, tg.tgname::text) NOT IN (VALUES ('"submissions"'::regclass, 'mvrefresh_capture_submissions_ins'), ('"submissions"'::regclass, 'mvrefresh_capture_submissions_upd'), ('"submissions"'::regclass, 'mvrefresh_capture_submissions_del'), ('"submissions"'::regclass, 'mvrefresh_capture_submissions_trunc'))
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', t.tgname, t.rel);
    END LOOP;
    FOR t IN
        SELECT p.oid::regprocedure AS fn FROM pg_proc p
        WHERE p.pronamespace = 'mvrefresh'::regnamespace AND p.proname LIKE 'capture\_%'
          AND p.proname <> ALL (ARRAY['capture_submissions'])
    LOOP
        EXECUTE format('DROP FUNCTION %s', t.fn);
    END LOOP;
    DELETE FROM mvrefresh.meta
    WHERE key LIKE 'capture:%' AND substr(key, 9) <> ALL (ARRAY['submissions']::text[]);
END
$mvrefresh$;

-- subscriptions
CREATE TEMP TABLE mvrefresh_desired ON COMMIT DROP AS SELECT * FROM (VALUES ('submission_scored', 'mv_lane_score_distribution'), ('submission_scored', 'mv_weakness_patterns'), ('submission_scored', 'mv_agent_progress'), ('submission_scored', 'mv_time_to_first_win'), ('submission_scored', 'analytics_lane_score_distribution'), ('submission_scored', 'analytics_weakness_patterns'), ('submission_scored', 'analytics_agent_progress'), ('submission_scored', 'analytics_time_to_first_win')) AS d(channel, view_name);
DELETE FROM mvrefresh.subscription s
WHERE NOT EXISTS (SELECT 1 FROM mvrefresh_desired d
                  WHERE d.channel = s.channel AND d.view_name = s.view_name);
DELETE FROM mvrefresh.change_log WHERE view_name <> ALL (ARRAY['mv_lane_score_distribution', 'mv_weakness_patterns', 'mv_agent_progress', 'mv_time_to_first_win', 'analytics_lane_score_distribution', 'analytics_weakness_patterns', 'analytics_agent_progress', 'analytics_time_to_first_win']::text[]);
WITH added AS (
    INSERT INTO mvrefresh.subscription (channel, view_name)
    SELECT channel, view_name FROM mvrefresh_desired
    ON CONFLICT DO NOTHING
    RETURNING view_name)
INSERT INTO mvrefresh.change_log (view_name, key, channel)
SELECT DISTINCT view_name, '*', 'mvrefresh:subscribed' FROM added;
DROP TABLE mvrefresh_desired;

COMMIT;
