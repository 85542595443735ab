-- mvrefresh bundled analytics, step 2 of 7: the computations, written once.
--
-- Each analytic is a set-returning SQL function parameterised by an array of challenge ids
-- (NULL = every challenge). The materialized views of step 3 are `SELECT * FROM f(NULL)`; the
-- per-challenge refresh functions of step 4 merge `SELECT * FROM f(ids)`. So the view and the
-- table cannot drift: there is one definition of every column and every rounding. (Two places
-- are written twice, next to each other, and covered by the equivalence tests: the weakness
-- patterns' final join, which reads mv_lane_score_distribution for the view and
-- analytics_lane_score_distribution for the table, and the two plans of time to first win.)
--
-- How this stays cheap per challenge: the functions are LANGUAGE sql, STABLE, not STRICT, with no
-- SET clause, and a single SELECT, so the planner inlines them into the calling query. With a
-- constant argument the filter `p_challenge_ids IS NULL OR s.challenge_id = ANY (p_challenge_ids)`
-- folds to either nothing (NULL: the full scan the view wants) or an indexable
-- `challenge_id = ANY ('{...}')` on submissions_scored_challenge_idx. The refresh functions run
-- with plan_cache_mode = force_custom_plan so their argument is always such a constant.
--
-- The bodies are SQL-standard (BEGIN ATOMIC / RETURN): parsed once at creation, their tables
-- resolved then (no search_path dependence at refresh time, also under PostgreSQL 17's restricted
-- search_path during REFRESH MATERIALIZED VIEW), and their dependencies recorded in pg_depend.
--
-- Numbers. All aggregation is exact `numeric` arithmetic: lane values are read as numeric,
-- composite scores are cast to numeric, averages, standard deviations, percentiles and the trend
-- slope are computed on exact sums. The result therefore does not depend on the order rows are
-- read in (a parallel full refresh and an index-driven per-challenge recompute give the same
-- digits), which is what lets the view and the table be compared with `=`. Every rounded column
-- is ROUND(numeric, n), so it always has exactly n decimals.
--
-- Odd data is skipped, never fatal: final_lane_scores that is NULL or not a JSON object, and lane
-- values that are not JSON numbers ("fast", null, {"x":1}, "87.5", true, [..]); composite scores
-- that are NULL, NaN or infinite; rows with a NULL agent_id or challenge_id.

-- A lane value as a number, or NULL when it is not a JSON number.
CREATE OR REPLACE FUNCTION analytics_lane_number(v jsonb)
RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN jsonb_typeof(v) = 'number' THEN v::numeric END;

COMMENT ON FUNCTION analytics_lane_number(jsonb) IS
    'mvrefresh analytics: a lane value as numeric, NULL unless it is a JSON number (never raises)';

-- PostgreSQL's percentile_cont (linear interpolation between the two nearest ranks), in exact
-- numeric arithmetic over an array sorted ascending. NULL for an empty array.
CREATE OR REPLACE FUNCTION analytics_percentile_cont(sorted numeric[], fraction numeric)
RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
    WHEN cardinality(sorted) > 0 THEN
        sorted[1 + floor(fraction * (cardinality(sorted) - 1))::int]
        + (fraction * (cardinality(sorted) - 1) - floor(fraction * (cardinality(sorted) - 1)))
          * (sorted[1 + ceil(fraction * (cardinality(sorted) - 1))::int]
             - sorted[1 + floor(fraction * (cardinality(sorted) - 1))::int])
END;

COMMENT ON FUNCTION analytics_percentile_cont(numeric[], numeric) IS
    'mvrefresh analytics: percentile_cont semantics in exact numeric over an ascending array';

-- How an agent's average on a lane compares with the challenge's quartiles (the seed's rule,
-- applied to the rounded values that are stored next to it).
CREATE OR REPLACE FUNCTION analytics_performance_category(
    avg_score numeric, p25 numeric, p50 numeric, p75 numeric)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
    WHEN avg_score < p25 THEN 'persistent_weakness'
    WHEN avg_score < p50 THEN 'below_median'
    WHEN avg_score > p75 THEN 'consistent_strength'
    ELSE 'average'
END;

COMMENT ON FUNCTION analytics_performance_category(numeric, numeric, numeric, numeric) IS
    'mvrefresh analytics: persistent_weakness | below_median | consistent_strength | average';

-- Refresh keys (challenge_id::text) to challenge ids. Keys that are not valid uuids (and NULLs)
-- are ignored, never raised on: the pattern is exactly the syntax uuid_in accepts (optional
-- braces, 32 hex digits, an optional hyphen after any group of four).
CREATE OR REPLACE FUNCTION analytics_challenge_ids(keys text[])
RETURNS uuid[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT coalesce(array_agg(DISTINCT c.id) FILTER (WHERE c.id IS NOT NULL), '{}'::uuid[])
    FROM unnest(keys) AS k(key)
    CROSS JOIN LATERAL (
        SELECT CASE
            WHEN k.key ~ '^([0-9A-Fa-f]{4}(-?[0-9A-Fa-f]{4}){7}|\{[0-9A-Fa-f]{4}(-?[0-9A-Fa-f]{4}){7}\})$'
            THEN k.key::uuid
        END AS id
    ) AS c;
END;

COMMENT ON FUNCTION analytics_challenge_ids(text[]) IS
    'mvrefresh analytics: refresh keys to challenge ids, silently dropping keys that are not uuids';

-- Every numeric lane value of every scored submission of the given challenges (NULL = all).
CREATE OR REPLACE FUNCTION analytics_scored_lane_values(p_challenge_ids uuid[])
RETURNS TABLE (
    submission_id uuid,
    agent_id      uuid,
    challenge_id  uuid,
    created_at    timestamptz,
    lane_key      text,
    lane_score    numeric
)
LANGUAGE sql STABLE PARALLEL SAFE
BEGIN ATOMIC
    -- One row per lane whose value is a JSON number (jsonb_each raises on a non-object: it is
    -- fed NULL, no rows, instead). The subquery is sorted by challenge and lane, which keeps
    -- PostgreSQL from flattening it into its callers: the value is converted once, below the
    -- sort, instead of again in every aggregate that reads it (flattened, that was a quarter of
    -- a refresh), and the callers group the rows as they come. Conditions on the challenge
    -- still reach the index on submissions (a sorted subquery does not stop them), and the
    -- scan can still run in parallel workers.
    SELECT x.id, x.agent_id, x.challenge_id, x.created_at, x.key, x.score
    FROM (
        SELECT s.id, s.agent_id, s.challenge_id, s.created_at, e.key,
               analytics_lane_number(e.value) AS score
        FROM submissions AS s
        CROSS JOIN LATERAL jsonb_each(
            CASE WHEN jsonb_typeof(s.final_lane_scores) = 'object' THEN s.final_lane_scores END
        ) AS e
        WHERE s.status = 'scored'
          AND s.challenge_id IS NOT NULL
          AND (p_challenge_ids IS NULL OR s.challenge_id = ANY (p_challenge_ids))
          AND jsonb_typeof(e.value) = 'number'
        ORDER BY s.challenge_id, e.key
    ) AS x;
END;

-- Lane score distribution per challenge and lane.
CREATE OR REPLACE FUNCTION analytics_compute_lane_score_distribution(p_challenge_ids uuid[])
RETURNS TABLE (
    challenge_id       uuid,
    lane_key           text,
    sample_count       bigint,
    mean_score         numeric,
    stddev_score       numeric,     -- NULL for a single sample
    min_score          numeric,
    max_score          numeric,
    p10                numeric,
    p25                numeric,
    p50                numeric,
    p75                numeric,
    p90                numeric,
    last_submission_at timestamptz
)
LANGUAGE sql STABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT g.challenge_id, g.lane_key, g.n,
           round(g.mean, 3), round(g.sd, 3), round(g.lo, 3), round(g.hi, 3),
           round(analytics_percentile_cont(g.sorted, 0.10), 3),
           round(analytics_percentile_cont(g.sorted, 0.25), 3),
           round(analytics_percentile_cont(g.sorted, 0.50), 3),
           round(analytics_percentile_cont(g.sorted, 0.75), 3),
           round(analytics_percentile_cont(g.sorted, 0.90), 3),
           g.last_at
    FROM (
        SELECT v.challenge_id, v.lane_key,
               count(*) AS n,
               avg(v.lane_score) AS mean,
               stddev_samp(v.lane_score) AS sd,
               min(v.lane_score) AS lo,
               max(v.lane_score) AS hi,
               array_agg(v.lane_score ORDER BY v.lane_score) AS sorted,
               max(v.created_at) AS last_at
        FROM analytics_scored_lane_values(p_challenge_ids) AS v
        GROUP BY v.challenge_id, v.lane_key
    ) AS g;
END;

-- Per agent, challenge and lane with at least two scored attempts: the attempts' statistics and
-- the least-squares trend of the score over time, in score points per second (the seed's unit;
-- NULL when all attempts have the same timestamp). Rounded like the seed: 3 and 8 decimals.
CREATE OR REPLACE FUNCTION analytics_compute_agent_lane_stats(p_challenge_ids uuid[])
RETURNS TABLE (
    agent_id          uuid,
    challenge_id      uuid,
    lane_key          text,
    attempt_count     bigint,
    avg_score         numeric,
    min_score         numeric,
    max_score         numeric,
    score_trend_slope numeric
)
LANGUAGE sql STABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT v.agent_id, v.challenge_id, v.lane_key,
           count(*),
           round(avg(v.y), 3), round(min(v.y), 3), round(max(v.y), 3),
           -- regr_slope(y, x) = (n*Sxy - Sx*Sy) / (n*Sxx - Sx*Sx), on exact sums
           round((count(*) * sum(v.x * v.y) - sum(v.x) * sum(v.y))
                 / nullif(count(*) * sum(v.x * v.x) - sum(v.x) * sum(v.x), 0), 8)
    FROM (
        SELECT l.agent_id, l.challenge_id, l.lane_key,
               extract(epoch FROM l.created_at) AS x, l.lane_score AS y
        FROM analytics_scored_lane_values(p_challenge_ids) AS l
        WHERE l.agent_id IS NOT NULL
    ) AS v
    -- In the order the lane values come (challenge, lane), then the agent.
    GROUP BY v.challenge_id, v.lane_key, v.agent_id
    HAVING count(*) >= 2;
END;

-- Agent progress per agent, challenge and UTC week. `week` is a date: the Monday that starts the
-- ISO week in UTC, whatever the session's TimeZone. wow_composite_delta compares the week's
-- average with the agent's previous week with submissions on that challenge (the seed's LAG); it
-- is NULL for the first such week.
CREATE OR REPLACE FUNCTION analytics_compute_agent_progress(p_challenge_ids uuid[])
RETURNS TABLE (
    agent_id              uuid,
    challenge_id          uuid,
    week                  date,
    submission_count      bigint,
    avg_composite_score   numeric,
    best_composite_score  numeric,
    worst_composite_score numeric,
    wow_composite_delta   numeric
)
LANGUAGE sql STABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT w.agent_id, w.challenge_id, w.week,
           count(*),
           round(avg(w.score), 3), round(max(w.score), 3), round(min(w.score), 3),
           round(avg(w.score) - lag(avg(w.score)) OVER (
                     PARTITION BY w.agent_id, w.challenge_id ORDER BY w.week), 3)
    FROM (
        SELECT s.agent_id, s.challenge_id,
               date_trunc('week', s.created_at AT TIME ZONE 'UTC')::date AS week,
               s.composite_score::numeric AS score
        FROM submissions AS s
        WHERE s.status = 'scored'
          AND s.agent_id IS NOT NULL
          AND s.challenge_id IS NOT NULL
          AND (p_challenge_ids IS NULL OR s.challenge_id = ANY (p_challenge_ids))
          -- not NULL, NaN or +-Infinity (NaN sorts above Infinity)
          AND s.composite_score > '-Infinity'::double precision
          AND s.composite_score < 'Infinity'::double precision
    ) AS w
    GROUP BY w.agent_id, w.challenge_id, w.week;
END;

-- Time to first win per challenge: over the agents that won a bout with a scored submission, the
-- average days from their first scored submission to their first winning one; only challenges
-- with at least 5 such agents.
--
-- The per-agent part has two plans, one per argument; with a constant argument the planner
-- drops the other branch:
--  * every challenge (NULL): one pass over the scored submissions, hash-joined to bout_results
--    (the seed's shape; ~0.7 s at 1M submissions);
--  * given challenges: per agent, walk its scored submissions in time order on
--    submissions_scored_challenge_idx and probe bout_results by primary key until the first win
--    (a few probes per agent instead of scanning all of bout_results, which is what the hash plan
--    does; that plan costs as much for one challenge as for all of them).
-- Both compute min(created_at) over the agent's scored submissions and over the winning ones; the
-- equivalence tests compare them (a keyed refresh of the table against the view).
CREATE OR REPLACE FUNCTION analytics_compute_time_to_first_win(p_challenge_ids uuid[])
RETURNS TABLE (
    challenge_id          uuid,
    agents_with_win       bigint,
    avg_days_to_first_win numeric
)
LANGUAGE sql STABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT a.challenge_id,
           count(*),
           round(avg(extract(epoch FROM a.first_win_at - a.first_at) / 86400), 1)
    FROM (
        SELECT s.agent_id, s.challenge_id,
               min(s.created_at) AS first_at,
               min(s.created_at) FILTER (WHERE br.bout_id IS NOT NULL) AS first_win_at
        FROM submissions AS s
        LEFT JOIN bout_results AS br
               ON br.bout_id = s.bout_id AND br.winner_agent_id = s.agent_id
        WHERE p_challenge_ids IS NULL
          AND s.status = 'scored'
          AND s.agent_id IS NOT NULL
          AND s.challenge_id IS NOT NULL
        GROUP BY s.agent_id, s.challenge_id
        UNION ALL
        SELECT f.agent_id, f.challenge_id, f.first_at, w.first_win_at
        FROM (
            SELECT s.agent_id, s.challenge_id, min(s.created_at) AS first_at
            FROM submissions AS s
            WHERE p_challenge_ids IS NOT NULL
              AND s.status = 'scored'
              AND s.agent_id IS NOT NULL
              AND s.challenge_id = ANY (p_challenge_ids)
            GROUP BY s.agent_id, s.challenge_id
        ) AS f
        CROSS JOIN LATERAL (
            SELECT w.created_at AS first_win_at
            FROM submissions AS w
            JOIN bout_results AS br
              ON br.bout_id = w.bout_id AND br.winner_agent_id = w.agent_id
            WHERE w.status = 'scored'
              AND w.challenge_id = f.challenge_id
              AND w.agent_id = f.agent_id
            ORDER BY w.created_at
            LIMIT 1
        ) AS w
    ) AS a
    WHERE a.first_win_at IS NOT NULL
    GROUP BY a.challenge_id
    HAVING count(*) >= 5;
END;
