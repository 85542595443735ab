-- The discovery service's five materialized views (design document, "Query-Optimized Views"),
-- and one of them as a plain view for a table mvrefresh keeps per run (mode "partitioned"),
-- written from its description. Load it after schema.sql; idempotent (IF NOT EXISTS
-- everywhere), so loading it twice changes nothing. To change a view's definition, drop it and
-- load this file again (CREATE MATERIALIZED VIEW has no OR REPLACE), then run
-- `mvrefresh install` so the daemon refreshes it whole once.
--
-- Each view has a UNIQUE index on plain columns and without WHERE, which
-- `REFRESH MATERIALIZED VIEW CONCURRENTLY` (mvrefresh mode "concurrently") needs.
--
-- Choices where the document is vague:
-- * Only complete runs (`is_complete`) count. A run's results are written before it is marked
--   complete, so an incomplete run's results are partial: counting them would publish numbers
--   that change under the reader and would need a refresh per results batch. The one exception
--   is the timeline, whose completion rate needs the incomplete runs too (see there).
-- * An "anomaly run" is a run with run_type = 'anomaly'. The star frequency and the overlap
--   matrix are about those runs only: a clustering run does not look for anomalies, so counting
--   it would dilute a star's frequency and fill the matrix with empty sets.
-- * Noise is `cluster_id IS NULL` and is not a cluster: no row in the cluster distribution,
--   counted in `noise_count` of the run stats. In a run that does no clustering every star is
--   noise.
-- * Arrays are ordered (star ids ascending; run ids by creation time, then id) so that two
--   refreshes of unchanged data produce identical rows and CONCURRENTLY rewrites nothing.
-- * Time buckets are UTC, whatever the server's or the session's TimeZone.
--
-- Dependency: mv_anomaly_overlap_matrix reads mv_discovery_run_stats (the per-run anomaly counts
-- that are the sizes of the two sets), so it must be refreshed after it. mvrefresh discovers
-- this from the catalog (pg_depend); config.toml subscribes only mv_discovery_run_stats to the
-- completion channel and lets the overlap matrix follow it.

-- 1. Per complete run: how many stars it analyzed, flagged, clustered.
CREATE MATERIALIZED VIEW IF NOT EXISTS mv_discovery_run_stats AS
WITH complete_results AS (
    SELECT res.run_id, res.star_id, res.is_anomaly, res.cluster_id
    FROM discovery_results res
    JOIN discovery_runs r ON r.run_id = res.run_id
    WHERE r.is_complete
),
per_run AS (
    SELECT run_id,
           count(*)                                   AS stars_analyzed,
           count(*) FILTER (WHERE is_anomaly = 1)     AS anomaly_count,
           count(*) FILTER (WHERE cluster_id IS NULL) AS noise_count
    FROM complete_results
    GROUP BY run_id
),
per_cluster AS (
    SELECT run_id, cluster_id, count(*) AS cluster_size
    FROM complete_results
    WHERE cluster_id IS NOT NULL
    GROUP BY run_id, cluster_id
),
clusters AS (
    SELECT run_id, count(*) AS cluster_count, max(cluster_size) AS largest_cluster_size
    FROM per_cluster
    GROUP BY run_id
)
SELECT r.run_id,
       r.run_type,
       r.created_at,
       r.completed_at,
       coalesce(p.stars_analyzed, 0)       AS stars_analyzed,
       coalesce(p.anomaly_count, 0)        AS anomaly_count,
       coalesce(c.cluster_count, 0)        AS cluster_count,
       coalesce(p.noise_count, 0)          AS noise_count,
       -- 0 when the run has no cluster at all.
       coalesce(c.largest_cluster_size, 0) AS largest_cluster_size
FROM discovery_runs r
LEFT JOIN per_run p ON p.run_id = r.run_id
LEFT JOIN clusters c ON c.run_id = r.run_id
WHERE r.is_complete;
CREATE UNIQUE INDEX IF NOT EXISTS mv_discovery_run_stats_key
    ON mv_discovery_run_stats (run_id);

-- 2. Per complete run and cluster (noise excluded): its size and members. Written once, as a
--    plain view, read by the materialized view and by the table `discovery_cluster_sizes` that
--    mvrefresh keeps per run (mode "partitioned": a completed run recomputes only its own rows).
CREATE OR REPLACE VIEW discovery_cluster_sizes_v AS
SELECT res.run_id,
       r.run_type,
       res.cluster_id,
       count(*)                                      AS cluster_size,
       array_agg(res.star_id ORDER BY res.star_id)   AS star_ids
FROM discovery_results res
JOIN discovery_runs r ON r.run_id = res.run_id
WHERE r.is_complete
  AND res.cluster_id IS NOT NULL
GROUP BY res.run_id, r.run_type, res.cluster_id;
CREATE MATERIALIZED VIEW IF NOT EXISTS mv_cluster_size_distribution AS
SELECT * FROM discovery_cluster_sizes_v;
CREATE UNIQUE INDEX IF NOT EXISTS mv_cluster_size_distribution_key
    ON mv_cluster_size_distribution (run_id, cluster_id);

-- 3. Per star flagged at least once: how often complete anomaly runs flagged it.
--    runs_analyzed: complete anomaly runs that have a result for the star (the denominator);
--    frequency_pct: 100 × times_flagged / runs_analyzed, two decimals ("flagged in 8 of 10 runs:
--    80.00"). Stars never flagged have no row (their frequency is 0), which keeps the view the
--    size of the anomalies rather than of the catalogue.
CREATE MATERIALIZED VIEW IF NOT EXISTS mv_star_anomaly_frequency AS
WITH analyzed AS (
    SELECT res.star_id, res.is_anomaly, r.run_id, r.created_at
    FROM discovery_results res
    JOIN discovery_runs r ON r.run_id = res.run_id
    WHERE r.is_complete
      AND r.run_type = 'anomaly'
)
SELECT star_id,
       count(*) FILTER (WHERE is_anomaly = 1)                                  AS times_flagged,
       count(*)                                                                AS runs_analyzed,
       round(100.0 * count(*) FILTER (WHERE is_anomaly = 1) / count(*), 2)     AS frequency_pct,
       array_agg(run_id ORDER BY created_at, run_id) FILTER (WHERE is_anomaly = 1)
                                                                               AS flagged_run_ids,
       max(created_at) FILTER (WHERE is_anomaly = 1)                           AS last_flagged_at
FROM analyzed
GROUP BY star_id
HAVING count(*) FILTER (WHERE is_anomaly = 1) > 0;
CREATE UNIQUE INDEX IF NOT EXISTS mv_star_anomaly_frequency_key
    ON mv_star_anomaly_frequency (star_id);

-- 4. Every pair of complete anomaly runs (run_id_a < run_id_b, one row per unordered pair, zero
--    overlap included, so a run's row set is the whole matrix row): the stars both flagged, the
--    stars only one flagged, and their Jaccard similarity |A ∩ B| / |A ∪ B| (NULL when both
--    sets are empty). The set sizes come from mv_discovery_run_stats, which is therefore
--    refreshed first. N anomaly runs make N(N-1)/2 rows.
CREATE MATERIALIZED VIEW IF NOT EXISTS mv_anomaly_overlap_matrix AS
WITH anomaly_runs AS (
    SELECT run_id, anomaly_count
    FROM mv_discovery_run_stats
    WHERE run_type = 'anomaly'
),
flagged AS (
    SELECT res.run_id, res.star_id
    FROM discovery_results res
    JOIN anomaly_runs a ON a.run_id = res.run_id
    WHERE res.is_anomaly = 1
),
pair_overlaps AS (
    SELECT fa.run_id AS run_id_a,
           fb.run_id AS run_id_b,
           count(*)  AS overlap_count,
           array_agg(fa.star_id ORDER BY fa.star_id) AS overlapping_star_ids
    FROM flagged fa
    JOIN flagged fb ON fb.star_id = fa.star_id AND fa.run_id < fb.run_id
    GROUP BY fa.run_id, fb.run_id
)
SELECT a.run_id                                            AS run_id_a,
       b.run_id                                            AS run_id_b,
       a.anomaly_count                                     AS anomaly_count_a,
       b.anomaly_count                                     AS anomaly_count_b,
       coalesce(o.overlap_count, 0)                        AS overlap_count,
       a.anomaly_count - coalesce(o.overlap_count, 0)      AS unique_to_a,
       b.anomaly_count - coalesce(o.overlap_count, 0)      AS unique_to_b,
       a.anomaly_count + b.anomaly_count - coalesce(o.overlap_count, 0) AS union_count,
       coalesce(o.overlap_count, 0)::double precision
           / nullif(a.anomaly_count + b.anomaly_count - coalesce(o.overlap_count, 0), 0)
                                                           AS jaccard_similarity,
       coalesce(o.overlapping_star_ids, '{}'::bigint[])    AS overlapping_star_ids
FROM anomaly_runs a
JOIN anomaly_runs b ON a.run_id < b.run_id
LEFT JOIN pair_overlaps o ON o.run_id_a = a.run_id AND o.run_id_b = b.run_id;
CREATE UNIQUE INDEX IF NOT EXISTS mv_anomaly_overlap_matrix_key
    ON mv_anomaly_overlap_matrix (run_id_a, run_id_b);

-- 5. Per UTC week (ISO, starting Monday) and UTC month, per run type and for all types together
--    (run_type '*', so '*' is reserved as a run type): runs created, runs complete, completion
--    rate (0..1, four decimals), distinct stars analyzed by complete runs, anomalies they
--    flagged.
--    The run counts include incomplete runs, or the completion rate would always be 1; but
--    only a completion refreshes the view, so runs created (or deleted) while incomplete show
--    up at the next completion, or at the backstop `schedule` config.toml gives this view.
CREATE MATERIALIZED VIEW IF NOT EXISTS mv_discovery_timeline AS
WITH run_periods AS (
    SELECT p.period_type, p.period_start, r.run_id, r.run_type, r.is_complete
    FROM discovery_runs r
    CROSS JOIN LATERAL (VALUES
        ('week'::text,  date_trunc('week',  r.created_at AT TIME ZONE 'UTC')::date),
        ('month'::text, date_trunc('month', r.created_at AT TIME ZONE 'UTC')::date)
    ) AS p (period_type, period_start)
)
SELECT rp.period_type,
       rp.period_start,
       CASE WHEN grouping(rp.run_type) = 1 THEN '*' ELSE rp.run_type END AS run_type,
       count(DISTINCT rp.run_id)                                         AS total_runs,
       count(DISTINCT rp.run_id) FILTER (WHERE rp.is_complete)           AS completed_runs,
       round(count(DISTINCT rp.run_id) FILTER (WHERE rp.is_complete)::numeric
             / count(DISTINCT rp.run_id), 4)                             AS completion_rate,
       count(DISTINCT res.star_id)                                       AS stars_analyzed,
       count(res.result_id) FILTER (WHERE res.is_anomaly = 1)            AS anomalies_flagged
FROM run_periods rp
LEFT JOIN discovery_results res ON res.run_id = rp.run_id AND rp.is_complete
GROUP BY GROUPING SETS ((rp.period_type, rp.period_start, rp.run_type),
                        (rp.period_type, rp.period_start));
CREATE UNIQUE INDEX IF NOT EXISTS mv_discovery_timeline_key
    ON mv_discovery_timeline (period_type, period_start, run_type);
