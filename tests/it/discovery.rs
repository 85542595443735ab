//! The second pipeline: the discovery service's five views, driven by the same binary
//! with nothing but `examples/discovery/` (schema, views, config). Only a run's completion
//! refreshes the views; every view must equal a direct query over the base tables once the
//! refresh that covers a change is done.
//!
//! The database's TimeZone is set to America/New_York, so the daemon's sessions are not UTC:
//! the timeline must bucket in UTC anyway. Seeded runs:
//!
//! | run | type       | created (UTC)    | stars | anomalies | clusters                   |
//! |-----|------------|------------------|-------|-----------|----------------------------|
//! | A   | anomaly    | 2026-01-05 04:30 | 1–6   | 1, 2, 3   | 1: {1,2}, 2: {3,4,5}       |
//! | B   | anomaly    | 2026-01-06 10:00 | 1–6   | 2, 3, 4   | 7: {5,6}                   |
//! | C   | clustering | 2026-02-01 04:30 | 1–10  | none      | s % 3                      |
//! | D   | anomaly    | 2026-01-07 00:00 | 1–6   | 1, 5      | none (never completed)     |
//!
//! A and C are created on the evening before, in New York: bucketing in the session's time zone
//! would put A in the week of 2025-12-29 and C in January.

use std::collections::HashMap;
use std::path::Path;

use mvrefresh::config::{Config, Mode};
use tokio_postgres::Client;

use crate::harness::{self, Cluster, Daemon, TestDb};

const SCHEMA: &str = include_str!("../../examples/discovery/schema.sql");
const VIEWS: &str = include_str!("../../examples/discovery/views.sql");
const CONFIG: &str = include_str!("../../examples/discovery/config.toml");

const CHANNEL: &str = "discovery_run_completed";
const RUN_STATS: &str = "mv_discovery_run_stats";
const CLUSTERS: &str = "mv_cluster_size_distribution";
const FREQUENCY: &str = "mv_star_anomaly_frequency";
const OVERLAP: &str = "mv_anomaly_overlap_matrix";
const TIMELINE: &str = "mv_discovery_timeline";
/// The cluster size distribution as a table kept per run (mode `partitioned`).
const CLUSTER_TABLE: &str = "discovery_cluster_sizes";
const ALL_VIEWS: [&str; 6] = [
    RUN_STATS,
    CLUSTERS,
    FREQUENCY,
    OVERLAP,
    TIMELINE,
    CLUSTER_TABLE,
];

// Each view's contents computed directly from the base tables, written independently of
// views.sql (correlated subqueries and arrays instead of joins and grouping sets), with the
// view's columns in the view's order. The overlap query does not read mv_discovery_run_stats.

const LIVE_RUN_STATS: &str = "
SELECT r.run_id, r.run_type, r.created_at, r.completed_at,
       (SELECT count(*) FROM discovery_results x WHERE x.run_id = r.run_id),
       (SELECT count(*) FROM discovery_results x WHERE x.run_id = r.run_id AND x.is_anomaly = 1),
       (SELECT count(DISTINCT x.cluster_id) FROM discovery_results x WHERE x.run_id = r.run_id),
       (SELECT count(*) FROM discovery_results x
         WHERE x.run_id = r.run_id AND x.cluster_id IS NULL),
       coalesce((SELECT count(*) FROM discovery_results x
                  WHERE x.run_id = r.run_id AND x.cluster_id IS NOT NULL
                  GROUP BY x.cluster_id ORDER BY 1 DESC LIMIT 1), 0)
FROM discovery_runs r
WHERE r.is_complete";

const LIVE_CLUSTERS: &str = "
SELECT r.run_id, r.run_type, k.cluster_id,
       (SELECT count(*) FROM discovery_results x
         WHERE x.run_id = r.run_id AND x.cluster_id = k.cluster_id),
       ARRAY(SELECT x.star_id FROM discovery_results x
              WHERE x.run_id = r.run_id AND x.cluster_id = k.cluster_id ORDER BY x.star_id)
FROM discovery_runs r
CROSS JOIN LATERAL (SELECT DISTINCT x.cluster_id FROM discovery_results x
                     WHERE x.run_id = r.run_id AND x.cluster_id IS NOT NULL) k
WHERE r.is_complete";

const LIVE_FREQUENCY: &str = "
WITH runs AS (SELECT run_id, created_at FROM discovery_runs
               WHERE is_complete AND run_type = 'anomaly'),
stars AS (
    SELECT s.star_id,
           ARRAY(SELECT r.run_id FROM runs r JOIN discovery_results x ON x.run_id = r.run_id
                  WHERE x.star_id = s.star_id AND x.is_anomaly = 1
                  ORDER BY r.created_at, r.run_id) AS flagged,
           (SELECT count(*) FROM runs r JOIN discovery_results x ON x.run_id = r.run_id
             WHERE x.star_id = s.star_id) AS analyzed,
           (SELECT max(r.created_at) FROM runs r JOIN discovery_results x ON x.run_id = r.run_id
             WHERE x.star_id = s.star_id AND x.is_anomaly = 1) AS last_flagged
    FROM (SELECT DISTINCT star_id FROM discovery_results) s)
SELECT star_id, cardinality(flagged)::bigint, analyzed,
       round(100.0 * cardinality(flagged) / analyzed, 2), flagged, last_flagged
FROM stars
WHERE cardinality(flagged) > 0";

const LIVE_OVERLAP: &str = "
WITH sets AS (
    SELECT r.run_id,
           ARRAY(SELECT x.star_id FROM discovery_results x
                  WHERE x.run_id = r.run_id AND x.is_anomaly = 1 ORDER BY x.star_id) AS stars
    FROM discovery_runs r
    WHERE r.is_complete AND r.run_type = 'anomaly')
SELECT a.run_id, b.run_id,
       cardinality(a.stars)::bigint, cardinality(b.stars)::bigint,
       i.n, cardinality(a.stars) - i.n, cardinality(b.stars) - i.n, u.n,
       i.n::double precision / nullif(u.n, 0),
       i.stars
FROM sets a
JOIN sets b ON a.run_id < b.run_id
CROSS JOIN LATERAL (SELECT count(*) AS n, coalesce(array_agg(s ORDER BY s), '{}') AS stars
                    FROM unnest(a.stars) AS s WHERE s = ANY (b.stars)) i
CROSS JOIN LATERAL (SELECT count(*) AS n
                    FROM (SELECT unnest(a.stars) UNION SELECT unnest(b.stars)) AS q) u";

const LIVE_TIMELINE: &str = "
WITH periods AS (
    SELECT 'week'::text AS period_type,
           date_trunc('week', created_at AT TIME ZONE 'UTC')::date AS period_start,
           run_id, run_type, is_complete
    FROM discovery_runs
    UNION ALL
    SELECT 'month', date_trunc('month', created_at AT TIME ZONE 'UTC')::date,
           run_id, run_type, is_complete
    FROM discovery_runs),
buckets AS (
    SELECT period_type, period_start, run_type AS bucket, run_id, is_complete FROM periods
    UNION ALL
    SELECT period_type, period_start, '*', run_id, is_complete FROM periods),
g AS (
    SELECT period_type, period_start, bucket,
           count(*) AS total,
           count(*) FILTER (WHERE is_complete) AS done,
           coalesce(array_agg(run_id) FILTER (WHERE is_complete), '{}') AS done_runs
    FROM buckets
    GROUP BY period_type, period_start, bucket)
SELECT period_type, period_start, bucket, total, done, round(done::numeric / total, 4),
       (SELECT count(DISTINCT x.star_id) FROM discovery_results x
         WHERE x.run_id = ANY (g.done_runs)),
       (SELECT count(*) FROM discovery_results x
         WHERE x.run_id = ANY (g.done_runs) AND x.is_anomaly = 1)
FROM g";

/// The example's `[[capture]]` and `[[view]]` tables: the file from its first `[[capture]]` on
/// (the test harness supplies `[database]` and short timings instead of the file's).
fn pipeline() -> &'static str {
    let at = CONFIG
        .find("\n[[capture]]")
        .expect("examples/discovery/config.toml has a [[capture]]");
    &CONFIG[at..]
}

/// A database with the example's schema and views (each loaded twice: both are idempotent),
/// New York as its TimeZone, and mvrefresh installed with the example's config.
async fn setup() -> (TestDb, Client, Config) {
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(
        "DO $$ BEGIN
             EXECUTE format('ALTER DATABASE %I SET TimeZone = %L', current_database(),
                            'America/New_York');
         END $$;
         SET TimeZone = 'America/New_York';",
    )
    .await
    .unwrap();
    for _ in 0..2 {
        c.batch_execute(SCHEMA).await.expect("schema.sql");
        c.batch_execute(VIEWS).await.expect("views.sql");
    }
    let config = harness::config(&db.url, pipeline());
    harness::install(&config).await;
    (db, c, config)
}

/// The runs of the module's table, with their results; the runs in `complete` are marked
/// complete at the end, in the same transaction.
async fn seed(c: &Client, complete: &[&str]) {
    c.batch_execute(
        "BEGIN;
         INSERT INTO discovery_runs (run_id, run_type, created_at, parameters) VALUES
             ('A', 'anomaly',    '2026-01-04 23:30:00-05', '{\"contamination\": 0.05}'),
             ('B', 'anomaly',    '2026-01-06 10:00:00+00', '{\"contamination\": 0.10}'),
             ('C', 'clustering', '2026-01-31 23:30:00-05', '{\"eps\": 0.5}'),
             ('D', 'anomaly',    '2026-01-07 00:00:00+00', '{\"contamination\": 0.20}');
         INSERT INTO discovery_results (run_id, star_id, is_anomaly, anomaly_score, cluster_id)
         SELECT 'A', s, (s IN (1, 2, 3))::int, s / 10.0,
                CASE WHEN s IN (1, 2) THEN 1 WHEN s IN (3, 4, 5) THEN 2 END
         FROM generate_series(1, 6) s;
         INSERT INTO discovery_results (run_id, star_id, is_anomaly, cluster_id)
         SELECT 'B', s, (s IN (2, 3, 4))::int, CASE WHEN s IN (5, 6) THEN 7 END
         FROM generate_series(1, 6) s;
         INSERT INTO discovery_results (run_id, star_id, cluster_id)
         SELECT 'C', s, s % 3 FROM generate_series(1, 10) s;
         INSERT INTO discovery_results (run_id, star_id, is_anomaly)
         SELECT 'D', s, (s IN (1, 5))::int FROM generate_series(1, 6) s;
         COMMIT;",
    )
    .await
    .unwrap();
    if !complete.is_empty() {
        let ids: Vec<String> = complete.iter().map(|s| s.to_string()).collect();
        c.execute(
            "UPDATE discovery_runs SET is_complete = true, completed_at = now()
             WHERE run_id = ANY ($1)",
            &[&ids],
        )
        .await
        .unwrap();
    }
}

/// Rows in one of `view` and `live` and not in the other (as multisets).
async fn mismatches(c: &Client, view: &str, live: &str) -> i64 {
    c.query_one(
        &format!(
            "WITH live AS ({live})
             SELECT (SELECT count(*) FROM (SELECT * FROM live EXCEPT ALL SELECT * FROM {view}) a)
                  + (SELECT count(*) FROM (SELECT * FROM {view} EXCEPT ALL SELECT * FROM live) b)"
        ),
        &[],
    )
    .await
    .unwrap_or_else(|e| panic!("compare {view} with its direct query: {e:?}"))
    .get(0)
}

fn live_query(view: &str) -> &'static str {
    match view {
        RUN_STATS => LIVE_RUN_STATS,
        CLUSTERS | CLUSTER_TABLE => LIVE_CLUSTERS,
        FREQUENCY => LIVE_FREQUENCY,
        OVERLAP => LIVE_OVERLAP,
        TIMELINE => LIVE_TIMELINE,
        _ => unreachable!("{view}"),
    }
}

async fn count(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

/// Dirty keys marked by the capture on the discovery channel.
async fn captured(c: &Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM mvrefresh.dirty WHERE channel = $1",
        &[&CHANNEL],
    )
    .await
    .unwrap()
    .get(0)
}

/// Waits until each of `views` has at least `at_least[i]` successful refreshes and nothing
/// pending.
async fn wait_refreshed(c: &Client, views: &[&str], at_least: &[i64]) {
    for (view, n) in views.iter().zip(at_least) {
        harness::wait_for(
            &format!("{n} refreshes of {view}, nothing pending"),
            || async {
                harness::refreshes(c, view).await >= *n && harness::pending(c, view).await == 0
            },
        )
        .await;
    }
}

/// Starts the daemon and waits for the first refresh of every view (the four subscribed views
/// are refreshed once when first subscribed, the overlap matrix after the run stats).
async fn start(config: Config, c: &Client) -> Daemon {
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    wait_refreshed(c, &ALL_VIEWS, &[1; 6]).await;
    daemon
}

#[test]
fn the_example_config_is_valid_and_subscribes_as_documented() {
    let config = Config::from_str_with_env(
        CONFIG,
        Path::new("examples/discovery/config.toml"),
        &HashMap::new(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.captures.len(), 1);
    let capture = &config.captures[0];
    assert_eq!(capture.table.to_string(), "discovery_runs");
    assert_eq!(capture.channel, CHANNEL);
    assert_eq!(capture.key, "run_id");
    assert_eq!(capture.when.as_deref(), Some("is_complete"));
    let names: Vec<String> = config.views.iter().map(|v| v.name.to_string()).collect();
    assert_eq!(names, ALL_VIEWS);
    for v in &config.views {
        let mode = if v.name.to_string() == CLUSTER_TABLE {
            Mode::Partitioned
        } else {
            Mode::Concurrently
        };
        assert_eq!(v.mode, mode, "{}", v.name);
        assert!(
            v.depends_on.is_none(),
            "{}: order comes from the catalog",
            v.name
        );
        if v.name.to_string() == OVERLAP {
            assert!(
                v.channels.is_empty(),
                "the overlap matrix follows the run stats"
            );
        } else {
            assert_eq!(v.channels, [CHANNEL], "{}", v.name);
        }
    }
    // The part the tests load parses on top of the harness's settings.
    assert!(!pipeline().contains("\n[database]") && !pipeline().contains("\n[debounce]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_completion_marks_runs_dirty_never_results() {
    let (_db, c, _config) = setup().await;
    seed(&c, &[]).await;
    // Keys the capture marked dirty since the last call (and takes them, as a collect does).
    async fn logged(c: &Client) -> Vec<String> {
        harness::take_dirty(c, Some(CHANNEL)).await
    }
    assert_eq!(
        logged(&c).await,
        Vec::<String>::new(),
        "seeding incomplete runs"
    );
    let cases: &[(&str, &[&str])] = &[
        (
            "INSERT INTO discovery_results (run_id, star_id, is_anomaly)
             SELECT 'D', s, 1 FROM generate_series(7, 20) s",
            &[],
        ),
        (
            "UPDATE discovery_results SET is_anomaly = 1 - is_anomaly, cluster_id = 3
             WHERE run_id = 'D'",
            &[],
        ),
        ("DELETE FROM discovery_results WHERE run_id = 'D' AND star_id > 10", &[]),
        (
            "UPDATE discovery_runs SET run_type = 'clustering', created_at = now() WHERE run_id = 'D'",
            &[],
        ),
        (
            "INSERT INTO discovery_runs (run_id, run_type) VALUES ('E', 'anomaly')",
            &[],
        ),
        ("DELETE FROM discovery_runs WHERE run_id = 'E'", &[]),
        (
            "UPDATE discovery_runs SET is_complete = true, completed_at = now() WHERE run_id = 'A'",
            &["A"],
        ),
        // A listed column set to the value it had still marks the run (values are not
        // compared; the refresh that follows changes nothing).
        (
            "UPDATE discovery_runs SET completed_at = completed_at WHERE run_id = 'A'",
            &["A"],
        ),
        // Columns no view reads and results of a complete run: nothing.
        (
            "UPDATE discovery_runs SET parameters = '{\"contamination\": 0.5}' WHERE run_id = 'A'",
            &[],
        ),
        (
            "UPDATE discovery_results SET anomaly_score = 0.9 WHERE run_id = 'A'",
            &[],
        ),
        (
            "UPDATE discovery_runs SET created_at = created_at - interval '1 day' WHERE run_id = 'A'",
            &["A"],
        ),
        (
            "UPDATE discovery_runs SET completed_at = now() + interval '1 s' WHERE run_id = 'A'",
            &["A"],
        ),
        (
            "INSERT INTO discovery_runs (run_id, run_type, is_complete, completed_at)
             VALUES ('G', 'anomaly', true, now())",
            &["G"],
        ),
        ("UPDATE discovery_runs SET is_complete = false WHERE run_id = 'A'", &["A"]),
        ("DELETE FROM discovery_runs WHERE run_id = 'G'", &["G"]),
        ("DELETE FROM discovery_runs WHERE run_id = 'B'", &[]),
        // One statement completing two runs and touching an incomplete one.
        (
            "UPDATE discovery_runs SET is_complete = (run_id <> 'D'), completed_at = now()",
            &["A", "C"],
        ),
    ];
    for (sql, want) in cases {
        c.batch_execute(sql).await.unwrap();
        assert_eq!(logged(&c).await, *want, "after {sql}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_of_an_incomplete_run_trigger_no_refresh() {
    let (_db, c, config) = setup().await;
    seed(&c, &[]).await;
    assert_eq!(captured(&c).await, 0);
    let daemon = start(config, &c).await;
    let history = count(&c, "SELECT count(*) FROM mvrefresh.refresh_history").await;

    // Results of the incomplete run D, and a whole new incomplete run with results.
    c.batch_execute(
        "INSERT INTO discovery_results (run_id, star_id, is_anomaly, cluster_id)
         SELECT 'D', s, 1, 4 FROM generate_series(7, 50) s;
         UPDATE discovery_results SET is_anomaly = 0 WHERE run_id = 'D' AND star_id = 1;
         DELETE FROM discovery_results WHERE run_id = 'D' AND star_id = 2;
         BEGIN;
         INSERT INTO discovery_runs (run_id, run_type) VALUES ('E', 'anomaly');
         INSERT INTO discovery_results (run_id, star_id, is_anomaly)
         SELECT 'E', s, s % 2 FROM generate_series(1, 30) s;
         COMMIT;",
    )
    .await
    .unwrap();
    // The capture would have written its rows in those transactions.
    assert_eq!(captured(&c).await, 0, "change-log rows for incomplete runs");
    // Let the daemon read the change log at least once after the writes (catch-up runs every
    // 2 s in the test config; the second one from now started after the writes committed).
    let catch_ups = daemon.stats.catch_ups.get();
    let stats = daemon.stats.clone();
    harness::wait_for("two catch-up reads of the change log", || {
        let n = stats.catch_ups.get();
        async move { n >= catch_ups + 2 }
    })
    .await;
    assert_eq!(captured(&c).await, 0);
    assert_eq!(daemon.stats.notifications_received.get(), 0);
    assert_eq!(
        count(&c, "SELECT count(*) FROM mvrefresh.refresh_history").await,
        history,
        "a refresh ran for writes to incomplete runs"
    );
    for view in ALL_VIEWS {
        assert_eq!(harness::pending(&c, view).await, 0, "{view}");
    }
    assert_eq!(
        count(&c, "SELECT count(*) FROM mv_discovery_run_stats").await,
        0
    );

    // The control: completing D publishes everything written to it while incomplete.
    let mut before = Vec::new();
    for view in ALL_VIEWS {
        before.push(harness::refreshes(&c, view).await);
    }
    c.batch_execute("UPDATE discovery_runs SET is_complete = true WHERE run_id = 'D'")
        .await
        .unwrap();
    let want: Vec<i64> = before.iter().map(|n| n + 1).collect();
    wait_refreshed(&c, &ALL_VIEWS, &want).await;
    let row = c
        .query_one(
            "SELECT stars_analyzed, anomaly_count, cluster_count FROM mv_discovery_run_stats
             WHERE run_id = 'D'",
            &[],
        )
        .await
        .unwrap();
    // Stars 1–6 less star 2, plus 7–50; flagged: 5 and 7–50; one cluster (4).
    assert_eq!(
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2)
        ),
        (49, 45, 1)
    );
    for view in ALL_VIEWS {
        assert_eq!(mismatches(&c, view, live_query(view)).await, 0, "{view}");
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completing_a_run_refreshes_every_view_in_dependency_order() {
    let (_db, c, config) = setup().await;
    seed(&c, &["A"]).await;
    let daemon = start(config, &c).await;
    for view in ALL_VIEWS {
        assert_eq!(mismatches(&c, view, live_query(view)).await, 0, "{view}");
    }
    c.batch_execute("DELETE FROM mvrefresh.refresh_history")
        .await
        .unwrap();

    c.batch_execute(
        "UPDATE discovery_runs SET is_complete = true, completed_at = now() WHERE run_id = 'B'",
    )
    .await
    .unwrap();
    wait_refreshed(&c, &ALL_VIEWS, &[1; 6]).await;

    // Every view reflects B, and equals its direct query.
    for (view, sql) in [
        (
            RUN_STATS,
            "SELECT count(*) FROM mv_discovery_run_stats WHERE run_id = 'B'",
        ),
        (
            CLUSTERS,
            "SELECT count(*) FROM mv_cluster_size_distribution
             WHERE run_id = 'B' AND cluster_id = 7 AND star_ids = '{5,6}'",
        ),
        (
            FREQUENCY,
            "SELECT count(*) FROM mv_star_anomaly_frequency
             WHERE star_id = 4 AND flagged_run_ids = '{B}'",
        ),
        (
            OVERLAP,
            "SELECT count(*) FROM mv_anomaly_overlap_matrix
             WHERE run_id_a = 'A' AND run_id_b = 'B'",
        ),
        (
            TIMELINE,
            "SELECT count(*) FROM mv_discovery_timeline
             WHERE period_type = 'week' AND period_start = '2026-01-05' AND run_type = '*'
               AND completed_runs = 2",
        ),
    ] {
        assert_eq!(count(&c, sql).await, 1, "{view} does not reflect run B");
        assert_eq!(mismatches(&c, view, live_query(view)).await, 0, "{view}");
    }

    // One refresh per view, all successful, the overlap matrix after the run stats it reads.
    let rows = c
        .query(
            "SELECT view_name, outcome, reason FROM mvrefresh.refresh_history ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let order: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    for r in &rows {
        let (view, outcome, reason): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        assert_eq!(
            (outcome.as_str(), reason.as_str()),
            ("success", "change"),
            "{view}"
        );
    }
    let mut sorted = order.clone();
    sorted.sort();
    let mut want: Vec<String> = ALL_VIEWS.iter().map(|v| v.to_string()).collect();
    want.sort();
    assert_eq!(sorted, want, "one refresh per view: {order:?}");
    let pos = |v: &str| order.iter().position(|o| o == v).unwrap();
    assert!(pos(RUN_STATS) < pos(OVERLAP), "{order:?}");
    let after: bool = c
        .query_one(
            "SELECT (SELECT started_at FROM mvrefresh.refresh_history WHERE view_name = $2)
                 >= (SELECT finished_at FROM mvrefresh.refresh_history WHERE view_name = $1)",
            &[&RUN_STATS, &OVERLAP],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        after,
        "the overlap matrix started before the run stats finished"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anomaly_overlap_matrix_jaccard_on_a_hand_computed_case() {
    let (_db, c, config) = setup().await;
    seed(&c, &[]).await;
    // A third anomaly run with no anomaly at all, and one that flags exactly A's set.
    c.batch_execute(
        "INSERT INTO discovery_runs (run_id, run_type, created_at) VALUES
             ('E', 'anomaly', '2026-01-08 00:00:00+00'), ('F', 'anomaly', '2026-01-09 00:00:00+00');
         INSERT INTO discovery_results (run_id, star_id, is_anomaly)
         SELECT 'E', s, 0 FROM generate_series(1, 6) s;
         INSERT INTO discovery_results (run_id, star_id, is_anomaly)
         SELECT 'F', s, (s <= 3)::int FROM generate_series(1, 6) s;",
    )
    .await
    .unwrap();
    let daemon = start(config, &c).await;
    assert_eq!(
        count(&c, "SELECT count(*) FROM mv_anomaly_overlap_matrix").await,
        0
    );
    let before = harness::refreshes(&c, OVERLAP).await;
    // C is a clustering run and D stays incomplete: neither is in the matrix.
    c.batch_execute(
        "UPDATE discovery_runs SET is_complete = true, completed_at = now()
         WHERE run_id IN ('A', 'B', 'C', 'E', 'F')",
    )
    .await
    .unwrap();
    wait_refreshed(&c, &[OVERLAP], &[before + 1]).await;

    let rows = c
        .query(
            "SELECT run_id_a || run_id_b, anomaly_count_a, anomaly_count_b, overlap_count,
                    unique_to_a, unique_to_b, union_count, jaccard_similarity,
                    overlapping_star_ids
             FROM mv_anomaly_overlap_matrix ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    type Pair = (String, i64, i64, i64, i64, i64, i64, Option<f64>, Vec<i64>);
    let got: Vec<Pair> = rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
                r.get(7),
                r.get(8),
            )
        })
        .collect();
    let pair = |ab: &str, a, b, o, ua, ub, u, j: Option<f64>, s: &[i64]| -> Pair {
        (ab.to_owned(), a, b, o, ua, ub, u, j, s.to_vec())
    };
    // A = {1,2,3}, B = {2,3,4}, E = {}, F = {1,2,3}.
    let want = vec![
        // |A ∩ B| = |{2,3}| = 2, |A ∪ B| = |{1,2,3,4}| = 4: 2 / 4.
        pair("AB", 3, 3, 2, 1, 1, 4, Some(0.5), &[2, 3]),
        pair("AE", 3, 0, 0, 3, 0, 3, Some(0.0), &[]),
        pair("AF", 3, 3, 3, 0, 0, 3, Some(1.0), &[1, 2, 3]),
        pair("BE", 3, 0, 0, 3, 0, 3, Some(0.0), &[]),
        // {2,3} of {1,2,3,4}.
        pair("BF", 3, 3, 2, 1, 1, 4, Some(0.5), &[2, 3]),
        pair("EF", 0, 3, 0, 0, 3, 3, Some(0.0), &[]),
    ];
    assert_eq!(got, want);
    assert_eq!(mismatches(&c, OVERLAP, LIVE_OVERLAP).await, 0);

    // Both sets empty: no similarity rather than a division by zero.
    let before = harness::refreshes(&c, OVERLAP).await;
    c.batch_execute(
        "BEGIN;
         INSERT INTO discovery_runs (run_id, run_type, is_complete) VALUES ('G', 'anomaly', true);
         INSERT INTO discovery_results (run_id, star_id) VALUES ('G', 1);
         COMMIT;",
    )
    .await
    .unwrap();
    wait_refreshed(&c, &[OVERLAP], &[before + 1]).await;
    let j: Option<f64> = c
        .query_one(
            "SELECT jaccard_similarity FROM mv_anomaly_overlap_matrix
             WHERE run_id_a = 'E' AND run_id_b = 'G'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(j, None);
    assert_eq!(mismatches(&c, OVERLAP, LIVE_OVERLAP).await, 0);
    daemon.stop().await;
}

/// A sequence of writes through every way a run's completion can change, each followed by the
/// refresh of `view` that covers it; after each, `view` must equal its direct query.
struct Accuracy {
    c: Client,
    view: &'static str,
    daemon: Daemon,
    _db: TestDb,
}

impl Accuracy {
    async fn start(view: &'static str) -> Accuracy {
        let (db, c, config) = setup().await;
        seed(&c, &[]).await;
        let daemon = start(config, &c).await;
        let me = Accuracy {
            c,
            view,
            daemon,
            _db: db,
        };
        me.check("the first refresh").await;
        me
    }

    async fn check(&self, after: &str) {
        assert_eq!(
            mismatches(&self.c, self.view, live_query(self.view)).await,
            0,
            "{} differs from its direct query after {after}",
            self.view
        );
    }

    async fn step(&self, what: &str, sql: &str) {
        let before = harness::refreshes(&self.c, self.view).await;
        self.c
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        wait_refreshed(&self.c, &[self.view], &[before + 1]).await;
        self.check(what).await;
        let rows = count(&self.c, &format!("SELECT count(*) FROM {}", self.view)).await;
        assert!(rows > 0, "{} is empty after {what}", self.view);
    }

    /// Completes A, B and C (D stays incomplete throughout).
    async fn complete(&self) {
        self.step(
            "completing A, B and C",
            "UPDATE discovery_runs SET is_complete = true, completed_at = now()
             WHERE run_id IN ('A', 'B', 'C')",
        )
        .await;
    }

    async fn the_rest(self) {
        self.step(
            "inserting run F already complete, with its results",
            "BEGIN;
             INSERT INTO discovery_runs (run_id, run_type, created_at, is_complete, completed_at)
             VALUES ('F', 'anomaly', '2026-03-02 12:00:00+00', true, now());
             INSERT INTO discovery_results (run_id, star_id, is_anomaly, cluster_id)
             SELECT 'F', s, (s IN (3, 4, 7))::int, CASE WHEN s IN (7, 8) THEN 1 END
             FROM unnest(ARRAY[3, 4, 7, 8]) s;
             COMMIT;",
        )
        .await;
        self.step(
            "moving complete run B to February",
            "UPDATE discovery_runs SET created_at = '2026-02-10 12:00:00+00' WHERE run_id = 'B'",
        )
        .await;
        self.step(
            "deleting complete run C",
            "DELETE FROM discovery_runs WHERE run_id = 'C'",
        )
        .await;
        self.step(
            "marking F incomplete again",
            "UPDATE discovery_runs SET is_complete = false WHERE run_id = 'F'",
        )
        .await;
        self.step(
            "correcting A's results and re-announcing A",
            "BEGIN;
             UPDATE discovery_results SET is_anomaly = 1, cluster_id = 2
             WHERE run_id = 'A' AND star_id = 6;
             DELETE FROM discovery_results WHERE run_id = 'A' AND star_id = 1;
             UPDATE discovery_runs SET completed_at = now() WHERE run_id = 'A';
             COMMIT;",
        )
        .await;
        self.daemon.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mv_discovery_run_stats_matches_base_tables() {
    let t = Accuracy::start(RUN_STATS).await;
    t.complete().await;
    let rows =
        t.c.query(
            "SELECT run_id, stars_analyzed, anomaly_count, cluster_count, noise_count,
                    largest_cluster_size
             FROM mv_discovery_run_stats ORDER BY run_id",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, i64, i64, i64, i64, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect();
    assert_eq!(
        got,
        [
            ("A".to_owned(), 6, 3, 2, 1, 3),
            ("B".to_owned(), 6, 3, 1, 4, 2),
            ("C".to_owned(), 10, 0, 3, 0, 4),
        ]
    );
    t.the_rest().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mv_cluster_size_distribution_matches_base_tables() {
    let t = Accuracy::start(CLUSTERS).await;
    t.complete().await;
    let rows =
        t.c.query(
            "SELECT run_id, cluster_id, cluster_size, star_ids
             FROM mv_cluster_size_distribution ORDER BY run_id, cluster_id",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, i32, i64, Vec<i64>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let row =
        |run: &str, cluster, size, stars: &[i64]| (run.to_owned(), cluster, size, stars.to_vec());
    assert_eq!(
        got,
        [
            row("A", 1, 2, &[1, 2]),
            row("A", 2, 3, &[3, 4, 5]),
            row("B", 7, 2, &[5, 6]),
            row("C", 0, 3, &[3, 6, 9]),
            row("C", 1, 4, &[1, 4, 7, 10]),
            row("C", 2, 3, &[2, 5, 8]),
        ]
    );
    t.the_rest().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mv_star_anomaly_frequency_matches_base_tables() {
    let t = Accuracy::start(FREQUENCY).await;
    t.complete().await;
    let rows =
        t.c.query(
            "SELECT star_id, times_flagged, runs_analyzed, frequency_pct::text, flagged_run_ids
             FROM mv_star_anomaly_frequency ORDER BY star_id",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(i64, i64, i64, String, Vec<String>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    let row = |star, n, of, pct: &str, runs: &[&str]| {
        (
            star,
            n,
            of,
            pct.to_owned(),
            runs.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
        )
    };
    // Over the complete anomaly runs A and B; D (incomplete) flagged 1 and 5 and counts not.
    assert_eq!(
        got,
        [
            row(1, 1, 2, "50.00", &["A"]),
            row(2, 2, 2, "100.00", &["A", "B"]),
            row(3, 2, 2, "100.00", &["A", "B"]),
            row(4, 1, 2, "50.00", &["B"]),
        ]
    );
    t.the_rest().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mv_anomaly_overlap_matrix_matches_base_tables() {
    let t = Accuracy::start(OVERLAP).await;
    t.complete().await;
    t.the_rest().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mv_discovery_timeline_matches_base_tables_in_utc() {
    let t = Accuracy::start(TIMELINE).await;
    t.complete().await;
    let rows =
        t.c.query(
            "SELECT period_type, period_start::text, run_type, total_runs, completed_runs,
                    completion_rate::text, stars_analyzed, anomalies_flagged
             FROM mv_discovery_timeline ORDER BY 1, 2, 3",
            &[],
        )
        .await
        .unwrap();
    type Row = (String, String, String, i64, i64, String, i64, i64);
    let got: Vec<Row> = rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
                r.get(7),
            )
        })
        .collect();
    let row = |p: &str, start: &str, ty: &str, runs, done, rate: &str, stars, flagged| -> Row {
        (
            p.to_owned(),
            start.to_owned(),
            ty.to_owned(),
            runs,
            done,
            rate.to_owned(),
            stars,
            flagged,
        )
    };
    // A (UTC Monday 2026-01-05 04:30), B and the incomplete D share the UTC week of 01-05 and
    // January; C (UTC 2026-02-01 04:30) is in February and the week of 2026-01-26.
    assert_eq!(
        got,
        [
            row("month", "2026-01-01", "*", 3, 2, "0.6667", 6, 6),
            row("month", "2026-01-01", "anomaly", 3, 2, "0.6667", 6, 6),
            row("month", "2026-02-01", "*", 1, 1, "1.0000", 10, 0),
            row("month", "2026-02-01", "clustering", 1, 1, "1.0000", 10, 0),
            row("week", "2026-01-05", "*", 3, 2, "0.6667", 6, 6),
            row("week", "2026-01-05", "anomaly", 3, 2, "0.6667", 6, 6),
            row("week", "2026-01-26", "*", 1, 1, "1.0000", 10, 0),
            row("week", "2026-01-26", "clustering", 1, 1, "1.0000", 10, 0),
        ]
    );
    t.the_rest().await;
}
