-- mvrefresh bundled analytics, step 7 of 7: a sample-data generator for tests, demos and
-- benchmarks. It only defines functions; nothing runs at install.
--
--   SELECT analytics_generate_sample(1000000, 200, 5000);        -- about a minute on 2 cores
--   SELECT analytics_generate_sample(50000, 20, 500, 0.7);
--
-- Deterministic: challenge and agent ids depend only on their number
-- (md5('mvrefresh-sample:challenge:<n>')::uuid, ...:agent:<n>), so several calls share them;
-- submission and bout ids and every value depend on (seed, row number), so calling again with the
-- same arguments inserts nothing (ON CONFLICT DO NOTHING) and another seed adds new rows.
-- Randomness is hash-based (hashint8extended), not random(), so it does not depend on the plan.
--
-- Shape of the data:
--   * bouts of 3 submissions of one challenge by 3 different agents; ~10% of bouts are practice
--     (bout_id NULL, no bout_results row);
--   * each challenge draws its agents from a pool of about 8 * n_agents / n_challenges agents, so
--     an agent works on about 8 challenges and repeats attempts (weakness patterns, progress);
--   * created_at spread evenly over the 20 weeks (140 days) before today 00:00 UTC, in row order;
--   * lanes correctness, speed, style, robustness (+ security on every 5th challenge), numeric
--     scores 0..100 with 2 decimals, from agent skill, per-lane strengths, a per-agent trend over
--     time, challenge difficulty and noise; composite_score the weighted mean (3 decimals);
--   * status: ~4% pending (no scores), ~3% failed (scores present: only the status filter
--     excludes them), the rest scored;
--   * of the scored rows ~2% are odd: 0.5% NULL final_lane_scores, 0.2% a non-object
--     final_lane_scores, 1.3% one lane replaced by "fast", null, {"x": 1}, "87.5", true or [1, 2];
--     and ~1% have a NULL composite_score;
--   * bout_results: one row per non-practice bout, decided 10 minutes after its last submission;
--     the winner is the scored submission with the best composite score (ties by agent id), or
--     NULL for ~8% of bouts (draws) and bouts without a scored submission.
-- Statistics are refreshed (ANALYZE) at the end. Returns the number of submissions inserted.

-- A deterministic uniform number in [0, 1) from (i, salt).
CREATE OR REPLACE FUNCTION analytics_sample_unit(i bigint, salt bigint)
RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (hashint8extended(i, salt) & 9007199254740991)::double precision / 9007199254740992.0;

COMMENT ON FUNCTION analytics_sample_unit(bigint, bigint) IS
    'mvrefresh analytics sample data: deterministic uniform [0,1) from (i, salt)';

CREATE OR REPLACE FUNCTION analytics_generate_sample(
    n_submissions integer,
    n_challenges  integer,
    n_agents      integer,
    seed          double precision DEFAULT 0.42)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $fn$
DECLARE
    salt       bigint := hashtextextended('mvrefresh-sample:' || seed::text, 0);
    tag        text := 'mvrefresh-sample:' || seed::text;
    challenges uuid[];
    agents     uuid[];
    pool       integer;
    n_bouts    bigint;
    t_end      timestamptz := date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    span       interval := interval '140 days';
    inserted   bigint;
BEGIN
    IF n_submissions IS NULL OR n_submissions < 0 OR n_challenges IS NULL OR n_challenges < 1
       OR n_agents IS NULL OR n_agents < 1 OR seed IS NULL THEN
        RAISE EXCEPTION 'analytics_generate_sample: need n_submissions >= 0, n_challenges >= 1, n_agents >= 1 and a seed';
    END IF;

    challenges := ARRAY(SELECT md5('mvrefresh-sample:challenge:' || g)::uuid
                        FROM generate_series(1, n_challenges) AS g ORDER BY g);
    agents := ARRAY(SELECT md5('mvrefresh-sample:agent:' || g)::uuid
                    FROM generate_series(1, n_agents) AS g ORDER BY g);
    pool := least(n_agents, greatest(3, ceil(n_agents * 8.0 / n_challenges)::integer));
    n_bouts := (n_submissions + 2) / 3;

    INSERT INTO submissions (id, agent_id, challenge_id, bout_id, status, final_lane_scores,
                             composite_score, created_at, updated_at)
    SELECT md5(tag || ':submission:' || r.i)::uuid,
           agents[r.a],
           challenges[r.c],
           CASE WHEN NOT r.practice THEN md5(tag || ':bout:' || r.b)::uuid END,
           r.status,
           CASE
               WHEN r.status = 'pending' THEN NULL
               WHEN r.status = 'failed' THEN r.lanes
               WHEN r.odd < 0.005 THEN NULL
               WHEN r.odd < 0.007 THEN
                   (ARRAY['"n/a"', '[]', '42', 'null'])[1 + floor(r.odd_kind * 4)::int]::jsonb
               WHEN r.odd < 0.020 THEN
                   r.lanes || jsonb_build_object(
                       (ARRAY['correctness', 'speed', 'style', 'robustness'])[1 + floor(r.odd_lane * 4)::int],
                       (ARRAY['"fast"', 'null', '{"x": 1}', '"87.5"', 'true', '[1, 2]'])[1 + floor(r.odd_kind * 6)::int]::jsonb)
               ELSE r.lanes
           END,
           CASE
               WHEN r.status = 'pending' THEN NULL
               WHEN r.no_composite THEN NULL
               ELSE r.composite
           END,
           r.created_at,
           r.created_at + CASE WHEN r.status = 'pending' THEN interval '0' ELSE interval '3 minutes' END
    FROM (
        SELECT l.*,
               jsonb_build_object('correctness', l.correctness, 'speed', l.speed,
                                  'style', l.style, 'robustness', l.robustness)
               || CASE WHEN l.security IS NOT NULL
                       THEN jsonb_build_object('security', l.security) ELSE '{}'::jsonb END AS lanes,
               round(CASE WHEN l.security IS NULL
                          THEN 0.4 * l.correctness + 0.2 * (l.speed + l.style + l.robustness)
                          ELSE 0.35 * l.correctness + 0.15 * (l.speed + l.style + l.robustness)
                               + 0.2 * l.security
                     END, 3)::double precision AS composite
        FROM (
            SELECT q.i, q.b, q.c, q.a, q.practice, q.created_at,
                   CASE WHEN q.st < 0.04 THEN 'pending' WHEN q.st < 0.07 THEN 'failed'
                        ELSE 'scored' END AS status,
                   analytics_sample_unit(q.i, salt + 40) AS odd,
                   analytics_sample_unit(q.i, salt + 41) AS odd_kind,
                   analytics_sample_unit(q.i, salt + 42) AS odd_lane,
                   analytics_sample_unit(q.i, salt + 43) < 0.01 AS no_composite,
                   round(least(100, greatest(0, q.base
                         + 30 * analytics_sample_unit(q.a * 8 + 1, salt + 13) - 15
                         + 24 * analytics_sample_unit(q.i, salt + 31) - 12))::numeric, 2) AS correctness,
                   round(least(100, greatest(0, q.base
                         + 30 * analytics_sample_unit(q.a * 8 + 2, salt + 13) - 15
                         + 24 * analytics_sample_unit(q.i, salt + 32) - 12))::numeric, 2) AS speed,
                   round(least(100, greatest(0, q.base
                         + 30 * analytics_sample_unit(q.a * 8 + 3, salt + 13) - 15
                         + 24 * analytics_sample_unit(q.i, salt + 33) - 12))::numeric, 2) AS style,
                   round(least(100, greatest(0, q.base
                         + 30 * analytics_sample_unit(q.a * 8 + 4, salt + 13) - 15
                         + 24 * analytics_sample_unit(q.i, salt + 34) - 12))::numeric, 2) AS robustness,
                   CASE WHEN q.c % 5 = 0 THEN
                       round(least(100, greatest(0, q.base
                             + 30 * analytics_sample_unit(q.a * 8 + 5, salt + 13) - 15
                             + 24 * analytics_sample_unit(q.i, salt + 35) - 12))::numeric, 2)
                   END AS security
            FROM (
                SELECT p.i, p.b, p.c, p.a, p.practice,
                       analytics_sample_unit(p.i, salt + 20) AS st,
                       p.bout_at + (p.slot * 7) * interval '1 second'
                                 + analytics_sample_unit(p.i, salt + 50) * interval '30 seconds' AS created_at,
                       -- agent skill + challenge difficulty + the agent's trend over the 20 weeks
                       35 + 40 * analytics_sample_unit(p.a, salt + 10)
                       + 20 * analytics_sample_unit(p.c, salt + 12) - 10
                       + (25 * analytics_sample_unit(p.a, salt + 11) - 5) * p.progress AS base
                FROM (
                    SELECT k.i, k.b, k.slot, k.c, k.practice, k.progress, k.bout_at,
                           1 + ((k.c - 1) * 37
                                + (floor(analytics_sample_unit(k.b, salt + 3) * pool)::int + k.slot) % pool)
                               % n_agents AS a
                    FROM (
                        SELECT g.i, (g.i - 1) / 3 + 1 AS b, ((g.i - 1) % 3)::int AS slot,
                               1 + floor(analytics_sample_unit((g.i - 1) / 3 + 1, salt + 1) * n_challenges)::int AS c,
                               analytics_sample_unit((g.i - 1) / 3 + 1, salt + 2) < 0.10 AS practice,
                               ((g.i - 1) / 3) * 3.0 / greatest(n_submissions, 1) AS progress,
                               t_end - span
                               + span * (((g.i - 1) / 3) * 3.0 / greatest(n_submissions, 1))
                               + analytics_sample_unit((g.i - 1) / 3 + 1, salt + 4) * interval '1 hour' AS bout_at
                        FROM generate_series(1::bigint, n_submissions) AS g(i)
                        OFFSET 0
                    ) AS k
                    OFFSET 0
                ) AS p
                OFFSET 0
            ) AS q
            OFFSET 0
        ) AS l
        OFFSET 0
    ) AS r
    ON CONFLICT (id) DO NOTHING;
    GET DIAGNOSTICS inserted = ROW_COUNT;

    INSERT INTO bout_results (bout_id, challenge_id, winner_agent_id, decided_at)
    SELECT s.bout_id,
           (array_agg(s.challenge_id))[1],
           CASE WHEN analytics_sample_unit(b.n, salt + 5) >= 0.08 THEN
               (array_agg(s.agent_id ORDER BY s.composite_score DESC NULLS LAST, s.agent_id)
                    FILTER (WHERE s.status = 'scored'))[1]
           END,
           max(s.created_at) + interval '10 minutes'
    FROM generate_series(1::bigint, n_bouts) AS b(n)
    JOIN submissions AS s ON s.bout_id = md5(tag || ':bout:' || b.n)::uuid
    GROUP BY s.bout_id, b.n
    ON CONFLICT (bout_id) DO NOTHING;

    ANALYZE submissions;
    ANALYZE bout_results;
    RETURN inserted;
END
$fn$;

COMMENT ON FUNCTION analytics_generate_sample(integer, integer, integer, double precision) IS
    'mvrefresh analytics: insert deterministic sample submissions and bout results (see 090_sample_data.sql)';
