-- mvrefresh bundled analytics, step 5 of 7: each analytic as a plain view, the source of its
-- analytics_* table in mode `partitioned` (key challenge_id).
--
-- Each view reads the same computation as its mv_* twin (analytics_compute_*(NULL), see
-- 020_compute.sql), so each analytic is written once. PostgreSQL inlines those SQL functions,
-- so `WHERE challenge_id = ANY (...)` on a view reaches the index on submissions: the daemon
-- recomputes only the dirty challenges and writes only the rows that differ (`mvrefresh check`
-- verifies the restriction is pushed down). The analytics_refresh_* functions of 040 remain for
-- mode `incremental`.
--
-- analytics_weakness_patterns_v reads the distribution's percentiles from the table
-- analytics_lane_score_distribution (as mv_weakness_patterns reads mv_lane_score_distribution):
-- the daemon sees it in the catalog and refreshes the distribution first.

CREATE OR REPLACE VIEW analytics_lane_score_distribution_v AS
    SELECT * FROM analytics_compute_lane_score_distribution(NULL);

CREATE OR REPLACE VIEW analytics_weakness_patterns_v AS
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
    JOIN analytics_lane_score_distribution AS d
      ON d.challenge_id = st.challenge_id AND d.lane_key = st.lane_key;

CREATE OR REPLACE VIEW analytics_agent_progress_v AS
    SELECT * FROM analytics_compute_agent_progress(NULL);

CREATE OR REPLACE VIEW analytics_time_to_first_win_v AS
    SELECT * FROM analytics_compute_time_to_first_win(NULL);
