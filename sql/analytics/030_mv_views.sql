-- mvrefresh bundled analytics, step 3 of 7: the materialized views (mode `concurrently` or
-- `blocking`), each over a computation of step 2, each with the unique index REFRESH ...
-- CONCURRENTLY needs.
--
-- They are created WITH NO DATA, so that installing on a large database is quick and holds its
-- locks briefly: the daemon populates an unpopulated view once without CONCURRENTLY.
-- By hand: REFRESH MATERIALIZED VIEW mv_lane_score_distribution; then the other three (the
-- weakness patterns read the distribution, so refresh it first).
--
-- An existing relation with one of these names is kept only when it is this definition; anything
-- else (for example the seed's views, which abort on a non-numeric lane value and use the server's
-- time zone for weeks) stops the install with the fix, rather than silently keeping it.

DO $check$
DECLARE
    v record;
BEGIN
    FOR v IN
        SELECT x.name, x.computation, c.oid, c.relkind
        FROM (VALUES
            ('mv_lane_score_distribution', 'analytics_compute_lane_score_distribution'),
            ('mv_weakness_patterns',       'analytics_compute_agent_lane_stats'),
            ('mv_agent_progress',          'analytics_compute_agent_progress'),
            ('mv_time_to_first_win',       'analytics_compute_time_to_first_win')
        ) AS x(name, computation)
        JOIN pg_class AS c
          ON c.relname = x.name
         AND c.relnamespace = (SELECT n.oid FROM pg_namespace AS n WHERE n.nspname = current_schema())
    LOOP
        IF v.relkind <> 'm' OR position(v.computation IN pg_get_viewdef(v.oid)) = 0 THEN
            RAISE EXCEPTION 'relation %.% exists but is not mvrefresh''s definition of it',
                    current_schema(), v.name
                USING HINT = format('It is probably the seed''s version. Drop it (DROP MATERIALIZED VIEW %I CASCADE) and install again.', v.name);
        END IF;
    END LOOP;
END
$check$;

CREATE MATERIALIZED VIEW IF NOT EXISTS mv_lane_score_distribution AS
    SELECT * FROM analytics_compute_lane_score_distribution(NULL)
WITH NO DATA;

CREATE UNIQUE INDEX IF NOT EXISTS idx_mv_lane_dist_pk
    ON mv_lane_score_distribution (challenge_id, lane_key);

COMMENT ON MATERIALIZED VIEW mv_lane_score_distribution IS
    'mvrefresh analytics: per challenge and lane, numeric lane scores of scored submissions: count, mean, stddev, min, max, p10-p90, last submission';

-- Reads mv_lane_score_distribution directly (not through a function), so the dependency is in
-- pg_depend and the daemon refreshes the distribution first.
CREATE MATERIALIZED VIEW IF NOT EXISTS mv_weakness_patterns AS
    SELECT st.agent_id,
           st.challenge_id,
           st.lane_key,
           st.attempt_count,
           st.avg_score,
           st.min_score,
           st.max_score,
           st.score_trend_slope,
           analytics_performance_category(st.avg_score, d.p25, d.p50, d.p75) AS performance_category,
           d.p25 AS challenge_p25,
           d.p50 AS challenge_p50,
           d.p75 AS challenge_p75
    FROM analytics_compute_agent_lane_stats(NULL) AS st
    JOIN mv_lane_score_distribution AS d
      ON d.challenge_id = st.challenge_id AND d.lane_key = st.lane_key
WITH NO DATA;

CREATE UNIQUE INDEX IF NOT EXISTS idx_mv_weakness_pk
    ON mv_weakness_patterns (agent_id, challenge_id, lane_key);

CREATE INDEX IF NOT EXISTS idx_mv_weakness_category
    ON mv_weakness_patterns (performance_category, challenge_id);

COMMENT ON MATERIALIZED VIEW mv_weakness_patterns IS
    'mvrefresh analytics: per agent, challenge and lane (>= 2 attempts): attempts, avg/min/max, trend slope (points per second), category vs the challenge''s p25/p50/p75';

CREATE MATERIALIZED VIEW IF NOT EXISTS mv_agent_progress AS
    SELECT * FROM analytics_compute_agent_progress(NULL)
WITH NO DATA;

CREATE UNIQUE INDEX IF NOT EXISTS idx_mv_progress_pk
    ON mv_agent_progress (agent_id, challenge_id, week);

COMMENT ON MATERIALIZED VIEW mv_agent_progress IS
    'mvrefresh analytics: per agent, challenge and UTC week (date of its Monday): scored submissions with a composite score, avg/best/worst, delta vs the previous active week';

CREATE MATERIALIZED VIEW IF NOT EXISTS mv_time_to_first_win AS
    SELECT * FROM analytics_compute_time_to_first_win(NULL)
WITH NO DATA;

CREATE UNIQUE INDEX IF NOT EXISTS idx_mv_ttfw_pk
    ON mv_time_to_first_win (challenge_id);

COMMENT ON MATERIALIZED VIEW mv_time_to_first_win IS
    'mvrefresh analytics: per challenge with >= 5 winning agents: agents with a win, average days from first scored submission to first win';
