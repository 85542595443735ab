//! The bundled analytics (`install --analytics`): the `analytics_*` tables kept per challenge by
//! the daemon (in mode `incremental` through their functions, and in mode `partitioned` through
//! their source views) equal their `mv_*` twins refreshed from scratch, under odd data, other
//! session time zones, and every kind of write.

use tokio_postgres::Client;

use crate::harness::{self, Cluster, Daemon};

const PAIRS: [(&str, &str); 4] = [
    (
        "analytics_lane_score_distribution",
        "mv_lane_score_distribution",
    ),
    ("analytics_weakness_patterns", "mv_weakness_patterns"),
    ("analytics_agent_progress", "mv_agent_progress"),
    ("analytics_time_to_first_win", "mv_time_to_first_win"),
];

/// The shipped config's captures and views, pointed at `url`, with test timings.
fn shipped_config(url: &str) -> mvrefresh::config::Config {
    let shipped = include_str!("../../config.toml");
    let body = &shipped[shipped
        .find("[[capture]]")
        .expect("a capture in config.toml")..];
    harness::config(url, body)
}

async fn install_analytics(config: &mvrefresh::config::Config) {
    let db = mvrefresh::db::Db::new(&config.database).unwrap();
    let mut client = db.connect_simple("test-install").await.unwrap();
    let steps = mvrefresh::install::script(
        config,
        mvrefresh::install::Options {
            analytics: true,
            prune: false,
        },
    );
    mvrefresh::install::run(&mut client, &steps)
        .await
        .unwrap_or_else(|e| panic!("install --analytics: {e}"));
}

/// Rows in `a` and not in `b`, plus rows in `b` and not in `a`.
async fn difference(c: &Client, a: &str, b: &str) -> i64 {
    c.query_one(
        &format!(
            "SELECT (SELECT count(*) FROM (SELECT * FROM {a} EXCEPT ALL SELECT * FROM {b}) x)
                  + (SELECT count(*) FROM (SELECT * FROM {b} EXCEPT ALL SELECT * FROM {a}) y)"
        ),
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

async fn nothing_pending(c: &Client) -> bool {
    c.query_one(
        "SELECT NOT EXISTS (SELECT FROM mvrefresh.pending)
            AND NOT EXISTS (SELECT FROM mvrefresh.dirty)",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

async fn failures(c: &Client) -> Vec<String> {
    harness::texts(
        c,
        "SELECT view_name || ': ' || coalesce(error, '') FROM mvrefresh.refresh_history
         WHERE outcome = 'failure'",
    )
    .await
}

/// The shipped config (analytics tables in mode `partitioned`) with the analytics tables in mode
/// `incremental` instead, through their hand-written functions (`sql/analytics/040`).
fn incremental(mut config: mvrefresh::config::Config) -> mvrefresh::config::Config {
    let rel = |s: String| mvrefresh::sql::Relation::parse(&s).unwrap();
    for v in &mut config.views {
        if v.name.name.starts_with("analytics_") {
            v.mode = mvrefresh::config::Mode::Incremental;
            v.function = Some(rel(v.name.name.replacen(
                "analytics_",
                "analytics_refresh_",
                1,
            )));
            v.source = None;
            v.key = None;
            if v.name.name == "analytics_weakness_patterns" {
                // The function reads the distribution table: the catalog cannot tell.
                v.depends_on = Some(vec![rel("analytics_lane_score_distribution".into())]);
            }
        }
    }
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_tables_equal_their_views_after_every_kind_of_write() {
    let db = Cluster::shared().create_db().await;
    let config = incremental(shipped_config(&db.url));
    tables_equal_their_views_after_every_kind_of_write(&db, config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_tables_equal_their_views_after_every_kind_of_write() {
    let db = Cluster::shared().create_db().await;
    let config = shipped_config(&db.url);
    tables_equal_their_views_after_every_kind_of_write(&db, config).await;
}

async fn tables_equal_their_views_after_every_kind_of_write(
    db: &harness::TestDb,
    config: mvrefresh::config::Config,
) {
    install_analytics(&config).await;
    // Nobody works in UTC: the daemon's sessions default to Kolkata, the writers and the
    // from-scratch refresh below use Los Angeles. Weeks must still be UTC weeks.
    db.client()
        .await
        .batch_execute(
            "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET TimeZone = %L',
                                        current_database(), 'Asia/Kolkata'); END $$",
        )
        .await
        .unwrap();
    let la = db.client().await;
    la.batch_execute("SET TimeZone = 'America/Los_Angeles'")
        .await
        .unwrap();
    let kolkata = db.client().await;
    kolkata
        .batch_execute("SET TimeZone = 'Asia/Kolkata'")
        .await
        .unwrap();
    la.query_one("SELECT analytics_generate_sample(4000, 8, 60, 0.3)", &[])
        .await
        .unwrap();

    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    harness::wait_for("the initial refresh of every view", || nothing_pending(&la)).await;

    // Every kind of write, from both sessions, in several transactions.
    la.batch_execute(
        "-- new scored rows, some with odd lanes
         INSERT INTO submissions (agent_id, challenge_id, status, final_lane_scores, composite_score, created_at)
         SELECT s.agent_id, s.challenge_id, 'scored',
                CASE g % 4 WHEN 0 THEN '{\"speed\": \"fast\", \"correctness\": 50}'
                           WHEN 1 THEN '{\"speed\": null, \"correctness\": 60}'
                           WHEN 2 THEN '{\"speed\": {\"x\": 1}, \"correctness\": 70}'
                           ELSE '{\"speed\": 12.5, \"correctness\": 80}' END::jsonb,
                g, now() - make_interval(days => g % 30)
         FROM (SELECT agent_id, challenge_id FROM submissions LIMIT 40) s, generate_series(1, 3) g;
         -- re-score
         UPDATE submissions SET final_lane_scores = final_lane_scores || '{\"style\": 99}',
                                composite_score = composite_score + 1
         WHERE id IN (SELECT id FROM submissions WHERE status = 'scored' ORDER BY id LIMIT 60);",
    )
    .await
    .unwrap();
    kolkata
        .batch_execute(
            "-- un-score
             UPDATE submissions SET status = 'failed'
             WHERE id IN (SELECT id FROM submissions WHERE status = 'scored' ORDER BY id DESC LIMIT 30);
             -- delete scored rows
             DELETE FROM submissions
             WHERE id IN (SELECT id FROM submissions WHERE status = 'scored' ORDER BY created_at LIMIT 30);
             -- pending rows become scored
             UPDATE submissions SET status = 'scored'
             WHERE id IN (SELECT id FROM submissions WHERE status = 'pending' LIMIT 40);
             -- new and changed bout winners
             UPDATE bout_results b SET winner_agent_id = s.agent_id
             FROM (SELECT DISTINCT ON (bout_id) bout_id, agent_id FROM submissions
                   WHERE bout_id IS NOT NULL AND status = 'scored'
                   ORDER BY bout_id, created_at DESC) s
             WHERE b.bout_id = s.bout_id
               AND b.bout_id IN (SELECT bout_id FROM bout_results ORDER BY bout_id LIMIT 50);
             DELETE FROM bout_results WHERE bout_id IN (SELECT bout_id FROM bout_results ORDER BY bout_id DESC LIMIT 5);",
        )
        .await
        .unwrap();
    harness::wait_for("the daemon to catch up", || nothing_pending(&la)).await;
    daemon.stop().await;
    assert_eq!(failures(&la).await, Vec::<String>::new());

    // The daemon's views are fresh: refreshing them from scratch changes nothing...
    for (_, mv) in PAIRS {
        la.batch_execute(&format!(
            "CREATE TEMP TABLE before_{mv} AS SELECT * FROM {mv}"
        ))
        .await
        .unwrap();
    }
    for (_, mv) in PAIRS {
        la.batch_execute(&format!("REFRESH MATERIALIZED VIEW {mv}"))
            .await
            .unwrap();
    }
    for (table, mv) in PAIRS {
        assert_eq!(
            difference(&la, mv, &format!("before_{mv}")).await,
            0,
            "{mv} was stale"
        );
        // ...and every analytics table equals its twin, row for row.
        assert_eq!(
            difference(&la, table, mv).await,
            0,
            "{table} differs from {mv}"
        );
        let rows: i64 = la
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        assert!(
            rows > 0 || table == "analytics_time_to_first_win",
            "{table} is empty"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_lane_values_are_skipped_not_fatal() {
    let db = Cluster::shared().create_db().await;
    let config = shipped_config(&db.url);
    install_analytics(&config).await;
    let c = db.client().await;
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    harness::wait_for("the initial refresh", || nothing_pending(&c)).await;
    c.batch_execute(
        "INSERT INTO submissions (agent_id, challenge_id, status, final_lane_scores, composite_score)
         VALUES ('00000000-0000-0000-0000-00000000000a', '00000000-0000-0000-0000-0000000000c1', 'scored', '{\"speed\": \"fast\", \"style\": 1}', 1),
                ('00000000-0000-0000-0000-00000000000a', '00000000-0000-0000-0000-0000000000c1', 'scored', '{\"speed\": null, \"style\": 2}', 2),
                ('00000000-0000-0000-0000-00000000000a', '00000000-0000-0000-0000-0000000000c1', 'scored', '{\"speed\": {\"x\": 1}, \"style\": 3}', 3),
                ('00000000-0000-0000-0000-00000000000a', '00000000-0000-0000-0000-0000000000c1', 'scored', '{\"speed\": 40, \"style\": 4}', 4),
                ('00000000-0000-0000-0000-00000000000a', '00000000-0000-0000-0000-0000000000c1', 'scored', '\"not an object\"', 5),
                ('00000000-0000-0000-0000-00000000000a', '00000000-0000-0000-0000-0000000000c1', 'scored', NULL, NULL)",
    )
    .await
    .unwrap();
    harness::wait_for("the refresh", || nothing_pending(&c)).await;
    daemon.stop().await;
    assert_eq!(failures(&c).await, Vec::<String>::new());
    for table in [
        "mv_lane_score_distribution",
        "analytics_lane_score_distribution",
    ] {
        let rows = c
            .query(
                &format!(
                    "SELECT lane_key, sample_count::int8 FROM {table}
                     WHERE challenge_id = '00000000-0000-0000-0000-0000000000c1' ORDER BY lane_key"
                ),
                &[],
            )
            .await
            .unwrap();
        let lanes: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(
            lanes,
            [("speed".to_owned(), 1), ("style".to_owned(), 4)],
            "{table}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoring_1000_rows_in_7_challenges_is_one_batch_per_view() {
    let db = Cluster::shared().create_db().await;
    let mut config = shipped_config(&db.url);
    let concurrency = config.refresh.concurrency as i64;
    config.debounce.quiet = std::time::Duration::from_millis(500);
    config.debounce.max_wait = std::time::Duration::from_secs(5);
    install_analytics(&config).await;
    let c = db.client().await;
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    harness::wait_for("the initial refresh", || nothing_pending(&c)).await;
    let baseline = harness::last_history_id(&c).await;
    let notified_before = daemon.stats.notifications_received.get();
    c.batch_execute(
        "INSERT INTO submissions (agent_id, challenge_id, status, final_lane_scores, composite_score)
         SELECT md5('agent' || (g % 50))::uuid, md5('challenge' || (g % 7))::uuid, 'scored',
                jsonb_build_object('speed', g % 100), g % 100
         FROM generate_series(1, 1000) g",
    )
    .await
    .unwrap();
    harness::wait_for("the refresh", || nothing_pending(&c)).await;
    let notified = daemon.stats.notifications_received.get() - notified_before;
    daemon.stop().await;
    assert!(notified <= 7, "{notified} notifications");
    // Each table's refresh is one batch of the 7 keys: one statement, or at most `concurrency`
    // chunks refreshed at once, each key in one of them.
    let batches: Vec<(String, i64, Option<i64>)> = c
        .query(
            "SELECT view_name, count(*), sum(keys) FROM mvrefresh.refresh_history
             WHERE id > $1 AND mode = 'partitioned' AND outcome = 'success'
             GROUP BY view_name ORDER BY view_name",
            &[&baseline],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(batches.len(), 4, "{batches:?}");
    for (view, calls, keys) in batches {
        assert!(
            (1..=concurrency).contains(&calls),
            "{view}: {calls} refreshes"
        );
        assert_eq!(keys, Some(7), "{view}");
    }
}
