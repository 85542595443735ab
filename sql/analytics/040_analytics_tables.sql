-- mvrefresh bundled analytics, step 4 of 7: the analytics tables (mode `incremental`) and their
-- per-challenge refresh functions.
--
-- Each analytics_* table has exactly the columns (names, order, types) of its mv_* twin, and a
-- primary key on the columns of the twin's unique index; the last block of this file checks it.
-- The tables start empty: backfill them once with analytics_refresh_*(NULL), distribution first.
--
-- analytics_refresh_<name>(keys text[]) RETURNS integer
--   keys    challenge ids as text (challenge_id::text). NULL, or an array containing '*', means
--           every challenge. Keys that are not valid uuids, and NULL elements, are ignored.
--   returns the number of rows written (inserted, updated or deleted); 0 when nothing changed.
-- It recomputes exactly those challenges in one statement, so a reader sees the old rows until the
-- caller's transaction commits, then the new ones. Rows are merged, not rewritten: a row whose
-- values did not change is not touched (no dead tuple, no WAL), changed rows are updated, new
-- rows inserted, rows of the given challenges that no longer exist deleted.
-- It takes SHARE ROW EXCLUSIVE on its table, so two refreshes of one table serialize (instead of
-- racing on the primary key) while readers are never blocked; the daemon's lock_timeout bounds
-- the wait.
--
-- analytics_weakness_patterns reads the percentiles from analytics_lane_score_distribution, not
-- from the submissions: refresh the distribution for the same keys first. pg_depend cannot show
-- this dependency between two tables, so the daemon's config says it:
--   [[view]] name = "analytics_weakness_patterns" ... depends_on = ["analytics_lane_score_distribution"]
--
-- The functions run with plan_cache_mode = force_custom_plan, so the ids are planned as constants
-- and the inlined computation uses submissions_scored_challenge_idx (see 020_compute.sql), and
-- with jit = off: a per-challenge recompute takes milliseconds, JIT compilation alone 20-100 ms.
-- They should run in READ COMMITTED (the daemon's default): each statement then sees the rows a
-- refresh that held the lock before it committed.

-- Lane score distribution ---------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS analytics_lane_score_distribution (
    challenge_id       uuid NOT NULL,
    lane_key           text NOT NULL,
    sample_count       bigint,
    mean_score         numeric,
    stddev_score       numeric,
    min_score          numeric,
    max_score          numeric,
    p10                numeric,
    p25                numeric,
    p50                numeric,
    p75                numeric,
    p90                numeric,
    last_submission_at timestamptz,
    PRIMARY KEY (challenge_id, lane_key)
);

COMMENT ON TABLE analytics_lane_score_distribution IS
    'mvrefresh analytics: mv_lane_score_distribution kept per challenge by analytics_refresh_lane_score_distribution(keys)';

CREATE OR REPLACE FUNCTION analytics_refresh_lane_score_distribution(keys text[])
RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
SET plan_cache_mode = force_custom_plan
SET jit = off
AS $fn$
DECLARE
    ids     uuid[];     -- NULL: every challenge
    written integer;
BEGIN
    IF keys IS NOT NULL AND NOT coalesce('*' = ANY (keys), false) THEN
        ids := analytics_challenge_ids(keys);
        IF cardinality(ids) = 0 THEN
            RETURN 0;
        END IF;
    END IF;
    LOCK TABLE analytics_lane_score_distribution IN SHARE ROW EXCLUSIVE MODE;
    WITH fresh AS MATERIALIZED (
        SELECT * FROM analytics_compute_lane_score_distribution(ids)
    ), gone AS (
        DELETE FROM analytics_lane_score_distribution AS t
        WHERE (ids IS NULL OR t.challenge_id = ANY (ids))
          AND NOT EXISTS (SELECT FROM fresh AS f
                          WHERE f.challenge_id = t.challenge_id AND f.lane_key = t.lane_key)
        RETURNING 1
    ), merged AS (
        INSERT INTO analytics_lane_score_distribution AS t
        SELECT * FROM fresh AS f
        WHERE NOT EXISTS (SELECT FROM analytics_lane_score_distribution AS o
                          WHERE (ids IS NULL OR o.challenge_id = ANY (ids))
                            AND o.challenge_id = f.challenge_id AND o.lane_key = f.lane_key
                            AND o = f)
        ON CONFLICT (challenge_id, lane_key) DO UPDATE SET
            sample_count       = EXCLUDED.sample_count,
            mean_score         = EXCLUDED.mean_score,
            stddev_score       = EXCLUDED.stddev_score,
            min_score          = EXCLUDED.min_score,
            max_score          = EXCLUDED.max_score,
            p10                = EXCLUDED.p10,
            p25                = EXCLUDED.p25,
            p50                = EXCLUDED.p50,
            p75                = EXCLUDED.p75,
            p90                = EXCLUDED.p90,
            last_submission_at = EXCLUDED.last_submission_at
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM gone) + (SELECT count(*) FROM merged) INTO written;
    RETURN written;
END
$fn$;

COMMENT ON FUNCTION analytics_refresh_lane_score_distribution(text[]) IS
    'mvrefresh analytics: recompute analytics_lane_score_distribution for the given challenge ids (NULL: all); returns rows written';

-- Weakness patterns ---------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS analytics_weakness_patterns (
    agent_id             uuid NOT NULL,
    challenge_id         uuid NOT NULL,
    lane_key             text NOT NULL,
    attempt_count        bigint,
    avg_score            numeric,
    min_score            numeric,
    max_score            numeric,
    score_trend_slope    numeric,
    performance_category text,
    challenge_p25        numeric,
    challenge_p50        numeric,
    challenge_p75        numeric,
    PRIMARY KEY (agent_id, challenge_id, lane_key)
);

-- The refresh deletes and compares by challenge; the primary key leads with agent_id.
CREATE INDEX IF NOT EXISTS analytics_weakness_patterns_challenge_idx
    ON analytics_weakness_patterns (challenge_id);
-- Readers' index, as on the view.
CREATE INDEX IF NOT EXISTS analytics_weakness_patterns_category_idx
    ON analytics_weakness_patterns (performance_category, challenge_id);

COMMENT ON TABLE analytics_weakness_patterns IS
    'mvrefresh analytics: mv_weakness_patterns kept per challenge by analytics_refresh_weakness_patterns(keys); reads analytics_lane_score_distribution';

CREATE OR REPLACE FUNCTION analytics_refresh_weakness_patterns(keys text[])
RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
SET plan_cache_mode = force_custom_plan
SET jit = off
AS $fn$
DECLARE
    ids     uuid[];     -- NULL: every challenge
    written integer;
BEGIN
    IF keys IS NOT NULL AND NOT coalesce('*' = ANY (keys), false) THEN
        ids := analytics_challenge_ids(keys);
        IF cardinality(ids) = 0 THEN
            RETURN 0;
        END IF;
    END IF;
    LOCK TABLE analytics_weakness_patterns IN SHARE ROW EXCLUSIVE MODE;
    WITH fresh AS MATERIALIZED (
        -- The same projection as mv_weakness_patterns, over the analytics distribution: the
        -- source of mode `partitioned` (045_analytics_sources.sql, installed with this file).
        SELECT * FROM analytics_weakness_patterns_v AS w
        WHERE ids IS NULL OR w.challenge_id = ANY (ids)
    ), gone AS (
        DELETE FROM analytics_weakness_patterns AS t
        WHERE (ids IS NULL OR t.challenge_id = ANY (ids))
          AND NOT EXISTS (SELECT FROM fresh AS f
                          WHERE f.agent_id = t.agent_id AND f.challenge_id = t.challenge_id
                            AND f.lane_key = t.lane_key)
        RETURNING 1
    ), merged AS (
        INSERT INTO analytics_weakness_patterns AS t
        SELECT * FROM fresh AS f
        WHERE NOT EXISTS (SELECT FROM analytics_weakness_patterns AS o
                          WHERE (ids IS NULL OR o.challenge_id = ANY (ids))
                            AND o.agent_id = f.agent_id AND o.challenge_id = f.challenge_id
                            AND o.lane_key = f.lane_key
                            AND o = f)
        ON CONFLICT (agent_id, challenge_id, lane_key) DO UPDATE SET
            attempt_count        = EXCLUDED.attempt_count,
            avg_score            = EXCLUDED.avg_score,
            min_score            = EXCLUDED.min_score,
            max_score            = EXCLUDED.max_score,
            score_trend_slope    = EXCLUDED.score_trend_slope,
            performance_category = EXCLUDED.performance_category,
            challenge_p25        = EXCLUDED.challenge_p25,
            challenge_p50        = EXCLUDED.challenge_p50,
            challenge_p75        = EXCLUDED.challenge_p75
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM gone) + (SELECT count(*) FROM merged) INTO written;
    RETURN written;
END
$fn$;

COMMENT ON FUNCTION analytics_refresh_weakness_patterns(text[]) IS
    'mvrefresh analytics: recompute analytics_weakness_patterns for the given challenge ids (NULL: all) from analytics_lane_score_distribution; returns rows written';

-- Agent progress ------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS analytics_agent_progress (
    agent_id              uuid NOT NULL,
    challenge_id          uuid NOT NULL,
    week                  date NOT NULL,
    submission_count      bigint,
    avg_composite_score   numeric,
    best_composite_score  numeric,
    worst_composite_score numeric,
    wow_composite_delta   numeric,
    PRIMARY KEY (agent_id, challenge_id, week)
);

-- The refresh deletes and compares by challenge; the primary key leads with agent_id.
CREATE INDEX IF NOT EXISTS analytics_agent_progress_challenge_idx
    ON analytics_agent_progress (challenge_id);

COMMENT ON TABLE analytics_agent_progress IS
    'mvrefresh analytics: mv_agent_progress kept per challenge by analytics_refresh_agent_progress(keys)';

CREATE OR REPLACE FUNCTION analytics_refresh_agent_progress(keys text[])
RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
SET plan_cache_mode = force_custom_plan
SET jit = off
AS $fn$
DECLARE
    ids     uuid[];     -- NULL: every challenge
    written integer;
BEGIN
    IF keys IS NOT NULL AND NOT coalesce('*' = ANY (keys), false) THEN
        ids := analytics_challenge_ids(keys);
        IF cardinality(ids) = 0 THEN
            RETURN 0;
        END IF;
    END IF;
    LOCK TABLE analytics_agent_progress IN SHARE ROW EXCLUSIVE MODE;
    WITH fresh AS MATERIALIZED (
        SELECT * FROM analytics_compute_agent_progress(ids)
    ), gone AS (
        DELETE FROM analytics_agent_progress AS t
        WHERE (ids IS NULL OR t.challenge_id = ANY (ids))
          AND NOT EXISTS (SELECT FROM fresh AS f
                          WHERE f.agent_id = t.agent_id AND f.challenge_id = t.challenge_id
                            AND f.week = t.week)
        RETURNING 1
    ), merged AS (
        INSERT INTO analytics_agent_progress AS t
        SELECT * FROM fresh AS f
        WHERE NOT EXISTS (SELECT FROM analytics_agent_progress AS o
                          WHERE (ids IS NULL OR o.challenge_id = ANY (ids))
                            AND o.agent_id = f.agent_id AND o.challenge_id = f.challenge_id
                            AND o.week = f.week
                            AND o = f)
        ON CONFLICT (agent_id, challenge_id, week) DO UPDATE SET
            submission_count      = EXCLUDED.submission_count,
            avg_composite_score   = EXCLUDED.avg_composite_score,
            best_composite_score  = EXCLUDED.best_composite_score,
            worst_composite_score = EXCLUDED.worst_composite_score,
            wow_composite_delta   = EXCLUDED.wow_composite_delta
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM gone) + (SELECT count(*) FROM merged) INTO written;
    RETURN written;
END
$fn$;

COMMENT ON FUNCTION analytics_refresh_agent_progress(text[]) IS
    'mvrefresh analytics: recompute analytics_agent_progress for the given challenge ids (NULL: all); returns rows written';

-- Time to first win ---------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS analytics_time_to_first_win (
    challenge_id          uuid NOT NULL,
    agents_with_win       bigint,
    avg_days_to_first_win numeric,
    PRIMARY KEY (challenge_id)
);

COMMENT ON TABLE analytics_time_to_first_win IS
    'mvrefresh analytics: mv_time_to_first_win kept per challenge by analytics_refresh_time_to_first_win(keys)';

CREATE OR REPLACE FUNCTION analytics_refresh_time_to_first_win(keys text[])
RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
SET plan_cache_mode = force_custom_plan
SET jit = off
AS $fn$
DECLARE
    ids     uuid[];     -- NULL: every challenge
    written integer;
BEGIN
    IF keys IS NOT NULL AND NOT coalesce('*' = ANY (keys), false) THEN
        ids := analytics_challenge_ids(keys);
        IF cardinality(ids) = 0 THEN
            RETURN 0;
        END IF;
    END IF;
    LOCK TABLE analytics_time_to_first_win IN SHARE ROW EXCLUSIVE MODE;
    WITH fresh AS MATERIALIZED (
        SELECT * FROM analytics_compute_time_to_first_win(ids)
    ), gone AS (
        DELETE FROM analytics_time_to_first_win AS t
        WHERE (ids IS NULL OR t.challenge_id = ANY (ids))
          AND NOT EXISTS (SELECT FROM fresh AS f WHERE f.challenge_id = t.challenge_id)
        RETURNING 1
    ), merged AS (
        INSERT INTO analytics_time_to_first_win AS t
        SELECT * FROM fresh AS f
        WHERE NOT EXISTS (SELECT FROM analytics_time_to_first_win AS o
                          WHERE (ids IS NULL OR o.challenge_id = ANY (ids))
                            AND o.challenge_id = f.challenge_id AND o = f)
        ON CONFLICT (challenge_id) DO UPDATE SET
            agents_with_win       = EXCLUDED.agents_with_win,
            avg_days_to_first_win = EXCLUDED.avg_days_to_first_win
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM gone) + (SELECT count(*) FROM merged) INTO written;
    RETURN written;
END
$fn$;

COMMENT ON FUNCTION analytics_refresh_time_to_first_win(text[]) IS
    'mvrefresh analytics: recompute analytics_time_to_first_win for the given challenge ids (NULL: all); returns rows written';

-- Each table has exactly its view's columns, and a primary key on its unique index's columns.
-- (A table left over from another definition would otherwise fail only at the first refresh.)
DO $check$
DECLARE
    pair record;
    mv_cols text;
    tbl_cols text;
    tbl_key text;
BEGIN
    FOR pair IN
        SELECT ('mv_' || x.name)::regclass AS mv, ('analytics_' || x.name)::regclass AS tbl
        FROM unnest(ARRAY['lane_score_distribution', 'weakness_patterns', 'agent_progress',
                          'time_to_first_win']) AS x(name)
    LOOP
        SELECT string_agg(format('%I %s', a.attname, format_type(a.atttypid, a.atttypmod)), ', '
                          ORDER BY a.attnum)
          INTO mv_cols
          FROM pg_attribute AS a
         WHERE a.attrelid = pair.mv AND a.attnum > 0 AND NOT a.attisdropped;
        SELECT string_agg(format('%I %s', a.attname, format_type(a.atttypid, a.atttypmod)), ', '
                          ORDER BY a.attnum)
          INTO tbl_cols
          FROM pg_attribute AS a
         WHERE a.attrelid = pair.tbl AND a.attnum > 0 AND NOT a.attisdropped;
        IF mv_cols IS DISTINCT FROM tbl_cols THEN
            RAISE EXCEPTION 'table % does not have the columns of %', pair.tbl, pair.mv
                USING DETAIL = format('%s has (%s); %s has (%s)', pair.mv, mv_cols, pair.tbl, tbl_cols),
                      HINT = format('Drop table %s (it is derived data) and install again.', pair.tbl);
        END IF;
        SELECT string_agg(pg_get_indexdef(i.indexrelid, k.n, false), ', ' ORDER BY k.n)
          INTO tbl_key
          FROM pg_index AS i CROSS JOIN generate_series(1, i.indnkeyatts) AS k(n)
         WHERE i.indrelid = pair.tbl AND i.indisprimary;
        IF NOT EXISTS (
            SELECT FROM pg_index AS i
             WHERE i.indrelid = pair.mv AND i.indisunique AND i.indpred IS NULL
               AND (SELECT string_agg(pg_get_indexdef(i.indexrelid, k.n, false), ', ' ORDER BY k.n)
                      FROM generate_series(1, i.indnkeyatts) AS k(n)) = tbl_key
        ) THEN
            RAISE EXCEPTION 'the primary key of % (%) is not a unique index of %',
                pair.tbl, coalesce(tbl_key, 'none'), pair.mv
                USING HINT = format('Drop table %s (it is derived data) and install again.', pair.tbl);
        END IF;
    END LOOP;
END
$check$;
