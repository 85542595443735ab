//! The daemon end to end: debouncing, dependency order, restarts, replicas, start-up checks.

use std::time::Duration;

use crate::harness::{self, Cluster, Daemon};

/// Waits until `view` has been refreshed at least `n` times and nothing is pending for it.
async fn wait_refreshed(client: &tokio_postgres::Client, view: &str, n: i64) {
    harness::wait_for(&format!("{n} refreshes of {view}"), || async {
        harness::refreshes(client, view).await >= n && harness::pending(client, view).await == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_500_rows_in_10_challenges_is_one_refresh() {
    let (db, c, _) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    // A long quiet so the whole burst is one batch, however slow the machine.
    let config = harness::config(
        &db.url,
        &format!(
            "{}{}quiet = \"1s\"\nmax_wait = \"30s\"\n",
            harness::CAPTURE,
            harness::VIEW_COUNTS
        ),
    );
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    wait_refreshed(&c, "mv_counts", 1).await; // the initial refresh of a newly subscribed view
    let before = harness::refreshes(&c, "mv_counts").await;

    c.batch_execute(
        "BEGIN;
         INSERT INTO submissions (challenge_id, status) SELECT g % 10, 'pending' FROM generate_series(1, 500) g;
         UPDATE submissions SET status = 'scored', score = id;
         COMMIT;",
    )
    .await
    .unwrap();
    harness::wait_for("mv_counts to reflect the burst", || {
        harness::counts_fresh(&c)
    })
    .await;
    wait_refreshed(&c, "mv_counts", before + 1).await;
    assert_eq!(harness::refreshes(&c, "mv_counts").await, before + 1);
    assert!(daemon.stats.notifications_received.get() <= 10);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_stream_refreshes_at_least_every_max_wait() {
    let (db, c, _) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    // quiet 400ms, max_wait 1s; an event every 200ms (quiet / 2) for 5 s (5 × max_wait):
    // quiet never elapses, so only max_wait can trigger refreshes during the stream.
    let config = harness::config(
        &db.url,
        &format!(
            "{}{}quiet = \"400ms\"\nmax_wait = \"1s\"\n",
            harness::CAPTURE,
            harness::VIEW_COUNTS
        ),
    );
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    wait_refreshed(&c, "mv_counts", 1).await;
    let before = harness::refreshes(&c, "mv_counts").await;
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    for i in 0..25 {
        ticker.tick().await;
        harness::score(&c, i % 3, 1).await;
    }
    // Counted before the stream's quiet period could trigger anything.
    let during = harness::refreshes(&c, "mv_counts").await - before;
    assert!(
        during >= 3,
        "only {during} refreshes during a 5 s stream with max_wait = 1s"
    );
    harness::wait_for("mv_counts to catch up", || harness::counts_fresh(&c)).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_view_is_refreshed_when_one_key_goes_quiet_while_others_keep_coming() {
    let (db, c, _) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    // quiet 300ms, max_wait 1h (the seed listener's way): only a key going quiet can trigger a
    // refresh. Key 1000 is written once; then a new key every 50 ms, for as long as it takes:
    // the stream never goes quiet as a whole, key 1000 does.
    let config = harness::config(
        &db.url,
        &format!(
            "{}{}quiet = \"300ms\"\nmax_wait = \"1h\"\n",
            harness::CAPTURE,
            harness::VIEW_COUNTS
        ),
    );
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    wait_refreshed(&c, "mv_counts", 1).await;
    harness::score(&c, 1000, 1).await;
    let stream = {
        let w = harness::connect(&db.url).await;
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_millis(50));
            for key in 2000.. {
                ticker.tick().await;
                harness::score(&w, key, 1).await;
            }
        })
    };
    harness::wait_for(
        "mv_counts to show key 1000 while the stream goes on",
        || async {
            c.query_one(
                "SELECT EXISTS (SELECT FROM mv_counts WHERE challenge_id = 1000)",
                &[],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
        },
    )
    .await;
    assert!(!stream.is_finished(), "the stream stopped");
    stream.abort();
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_stopped_are_refreshed_at_start() {
    let (db, c, config) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    let daemon = Daemon::start(config.clone());
    daemon.wait_listening().await;
    harness::score(&c, 1, 3).await;
    harness::wait_for("the first change", || harness::counts_fresh(&c)).await;
    daemon.stop().await;

    for ch in 0..5 {
        harness::score(&c, ch, 10).await;
    }
    assert!(!harness::counts_fresh(&c).await);
    let daemon = Daemon::start(harness::counts_config(&db.url));
    harness::wait_for("the changes made while stopped", || {
        harness::counts_fresh(&c)
    })
    .await;
    daemon.stop().await;
    let _ = config;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_three_views_refreshes_in_dependency_order() {
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(harness::SCHEMA).await.unwrap();
    // mv_b reads mv_counts; mv_c reads mv_b through a plain view.
    c.batch_execute(
        "CREATE MATERIALIZED VIEW mv_b AS SELECT challenge_id, n * 2 AS n2 FROM mv_counts;
         CREATE UNIQUE INDEX ON mv_b (challenge_id);
         CREATE VIEW v_b AS SELECT challenge_id, n2 FROM mv_b;
         CREATE MATERIALIZED VIEW mv_c AS SELECT challenge_id, n2 + 1 AS n3 FROM v_b;
         CREATE UNIQUE INDEX ON mv_c (challenge_id);",
    )
    .await
    .unwrap();
    // Configured in reverse order; only the first view listens, the others follow it.
    let body = format!(
        "{}[[view]]\nname = \"mv_c\"\nmode = \"concurrently\"\n\
         [[view]]\nname = \"mv_b\"\nmode = \"blocking\"\n{}",
        harness::CAPTURE,
        harness::VIEW_COUNTS
    );
    let config = harness::config(&db.url, &body);
    harness::install(&config).await;
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    wait_refreshed(&c, "mv_counts", 1).await;
    // The start-up refresh of mv_counts is followed by its dependents': let the chain finish
    // before forgetting it, or mv_c's start-up refresh lands in the history checked below.
    wait_refreshed(&c, "mv_c", 1).await;
    c.batch_execute("DELETE FROM mvrefresh.refresh_history")
        .await
        .unwrap();

    harness::score(&c, 7, 4).await;
    harness::wait_for("mv_c to reflect the change", || async {
        c.query_opt("SELECT 1 FROM mv_c WHERE challenge_id = 7 AND n3 = 9", &[])
            .await
            .unwrap()
            .is_some()
    })
    .await;
    let order = harness::texts(
        &c,
        "SELECT view_name FROM mvrefresh.refresh_history WHERE outcome = 'success' ORDER BY id",
    )
    .await;
    assert_eq!(order, ["mv_counts", "mv_b", "mv_c"]);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrently_without_a_unique_index_is_refused_by_name() {
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE t (k int);
         CREATE MATERIALIZED VIEW mv_plain AS SELECT k, count(*) FROM t GROUP BY k;
         CREATE INDEX ON mv_plain (k);",
    )
    .await
    .unwrap();
    let config = harness::config(
        &db.url,
        "[[view]]\nname = \"mv_plain\"\nmode = \"concurrently\"\nchannels = [\"c\"]\n",
    );
    harness::install(&config).await;
    let err = Daemon::start(config)
        .result()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("view mv_plain"), "{err}");
    assert!(err.contains("unique index"), "{err}");
    assert!(
        err.contains("CREATE UNIQUE INDEX ON \"public\".\"mv_plain\""),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependency_cycle_is_refused() {
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(harness::SCHEMA).await.unwrap();
    c.batch_execute("CREATE MATERIALIZED VIEW mv_x AS SELECT 1 AS one")
        .await
        .unwrap();
    let body = "[[view]]\nname = \"mv_counts\"\nmode = \"blocking\"\ndepends_on = [\"mv_x\"]\n\
                [[view]]\nname = \"mv_x\"\nmode = \"blocking\"\ndepends_on = [\"mv_counts\"]\n";
    let config = harness::config(&db.url, body);
    harness::install(&config).await;
    let err = Daemon::start(config)
        .result()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("cycle: mv_counts, mv_x"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_never_refresh_one_view_at_once() {
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(harness::SCHEMA).await.unwrap();
    // A view slow enough (50 ms a refresh) for the two daemons to collide if they could.
    c.batch_execute(
        "CREATE MATERIALIZED VIEW mv_slow AS
             SELECT challenge_id, count(*) AS n FROM submissions, (SELECT pg_sleep(0.05)) z
             WHERE status = 'scored' GROUP BY challenge_id;
         CREATE UNIQUE INDEX ON mv_slow (challenge_id);",
    )
    .await
    .unwrap();
    let body = format!(
        "{}{}[[view]]\nname = \"mv_slow\"\nmode = \"concurrently\"\nchannels = [\"submission_scored\"]\n",
        harness::CAPTURE,
        harness::VIEW_COUNTS
    );
    let config = harness::config(&db.url, &body);
    harness::install(&config).await;
    let a = Daemon::start(config.clone());
    let b = Daemon::start(config);
    a.wait_listening().await;
    b.wait_listening().await;
    for round in 0..15 {
        harness::score(&c, round % 4, 5).await;
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    harness::wait_for("mv_counts to catch up", || harness::counts_fresh(&c)).await;
    harness::wait_for("nothing pending", || async {
        harness::pending(&c, "mv_counts").await == 0 && harness::pending(&c, "mv_slow").await == 0
    })
    .await;
    let overlaps: i64 = c
        .query_one(
            "SELECT count(*) FROM mvrefresh.refresh_history a JOIN mvrefresh.refresh_history b
               ON a.view_name = b.view_name AND a.id < b.id
              AND a.started_at < b.finished_at AND b.started_at < a.finished_at",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(overlaps, 0, "two refreshes of one view overlapped");
    let replicas: i64 = c
        .query_one(
            "SELECT count(DISTINCT replica) FROM mvrefresh.refresh_history",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(replicas >= 1);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_view_stops_neither_unrelated_views_nor_recovery() {
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(harness::SCHEMA).await.unwrap();
    // mv_fail raises while knobs.divisor is 0; mv_fail_dep reads it.
    c.batch_execute(
        "CREATE TABLE fail_knob (divisor int NOT NULL);
         INSERT INTO fail_knob VALUES (1);
         CREATE MATERIALIZED VIEW mv_fail AS
             SELECT challenge_id, count(*) / (SELECT divisor FROM fail_knob) AS n
             FROM submissions WHERE status = 'scored' GROUP BY challenge_id;
         CREATE UNIQUE INDEX ON mv_fail (challenge_id);
         CREATE MATERIALIZED VIEW mv_fail_dep AS SELECT challenge_id, n FROM mv_fail;
         CREATE UNIQUE INDEX ON mv_fail_dep (challenge_id);",
    )
    .await
    .unwrap();
    let body = format!(
        "{}{}[[view]]\nname = \"mv_fail\"\nmode = \"concurrently\"\nchannels = [\"submission_scored\"]\n\
         [[view]]\nname = \"mv_fail_dep\"\nmode = \"concurrently\"\n",
        harness::CAPTURE,
        harness::VIEW_COUNTS
    );
    let config = harness::config(&db.url, &body);
    harness::install(&config).await;
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    wait_refreshed(&c, "mv_fail_dep", 1).await;
    let dep_before = harness::refreshes(&c, "mv_fail_dep").await;

    c.batch_execute("UPDATE fail_knob SET divisor = 0")
        .await
        .unwrap();
    harness::score(&c, 1, 2).await;
    harness::wait_for("mv_fail to fail twice (retried)", || async {
        c.query_one(
            "SELECT count(*) >= 2 FROM mvrefresh.refresh_history
             WHERE view_name = 'mv_fail' AND outcome = 'failure' AND error LIKE '%division by zero%'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, bool>(0)
    })
    .await;
    // The unrelated view keeps up.
    harness::score(&c, 2, 2).await;
    harness::wait_for("mv_counts to keep refreshing", || harness::counts_fresh(&c)).await;
    // The dependent waits for the view it reads.
    assert_eq!(harness::refreshes(&c, "mv_fail_dep").await, dep_before);

    c.batch_execute("UPDATE fail_knob SET divisor = 1")
        .await
        .unwrap();
    harness::wait_for("mv_fail to recover and mv_fail_dep to follow", || async {
        c.query_one(
            "SELECT (SELECT sum(n) FROM mv_fail_dep) = 4
                AND NOT EXISTS (SELECT 1 FROM mvrefresh.pending)
                AND NOT EXISTS (SELECT 1 FROM mvrefresh.dirty)",
            &[],
        )
        .await
        .unwrap()
        .get::<_, Option<bool>>(0)
        .unwrap_or(false)
    })
    .await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_backstop_and_history_retention() {
    let (db, c, _) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    // A history row from long ago, which the retention removes.
    c.batch_execute(
        "INSERT INTO mvrefresh.refresh_history
             (view_name, mode, reason, started_at, finished_at, duration_ms, outcome, replica)
         VALUES ('mv_counts', 'concurrently', 'change', now() - interval '30 days',
                 now() - interval '30 days', 1, 'success', 'old')",
    )
    .await
    .unwrap();
    // No channel: only the schedule refreshes it.
    let config = {
        let mut config = harness::config(
            &db.url,
            &format!(
                "{}[[view]]\nname = \"mv_counts\"\nmode = \"concurrently\"\nschedule = \"300ms\"\n",
                harness::CAPTURE
            ),
        );
        config.refresh.history_retention = Duration::from_secs(86_400);
        config
    };
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    harness::wait_for("three scheduled refreshes", || async {
        c.query_one(
            "SELECT count(*) >= 3 FROM mvrefresh.refresh_history
             WHERE view_name = 'mv_counts' AND reason = 'schedule' AND outcome = 'success'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, bool>(0)
    })
    .await;
    harness::wait_for("the old history row pruned", || async {
        c.query_one(
            "SELECT count(*) = 0 FROM mvrefresh.refresh_history WHERE replica = 'old'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, bool>(0)
    })
    .await;
    daemon.stop().await;
}
