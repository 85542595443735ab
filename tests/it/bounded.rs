//! Resources stay bounded under backlogs, floods and load: a notification flood is read without
//! a reconnect and nothing is lost; a backlog larger than `max_pending_keys` is refreshed whole
//! with a bounded key set in memory; `/status` under load holds no more connections than the
//! pool; a key that makes a refresh fail is isolated while the others are refreshed; two ways of
//! naming one view are one view, and two views whose names print alike unquoted are two; a daemon whose bookkeeping queries are stuck still stops, and
//! their backends end with it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio_postgres::Client;

use crate::harness::{self, Cluster, Daemon};
use crate::observe::{admin_addr, http};

/// A table kept per key by `refresh_counts(keys)`, which fails for key `'13'` while
/// `poison` says so.
const COUNTS_BY_KEY: &str = "
CREATE TABLE poison (on_13 boolean NOT NULL);
INSERT INTO poison VALUES (false);
CREATE TABLE counts_by_key (challenge_id int PRIMARY KEY, n bigint);
CREATE FUNCTION refresh_counts(keys text[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT on_13 FROM poison) AND '13' = ANY (keys) THEN
        RAISE EXCEPTION 'key 13 cannot be refreshed';
    END IF;
    DELETE FROM counts_by_key WHERE keys IS NULL OR challenge_id::text = ANY (keys);
    INSERT INTO counts_by_key
    SELECT challenge_id, count(*) FROM submissions
    WHERE status = 'scored' AND (keys IS NULL OR challenge_id::text = ANY (keys))
    GROUP BY challenge_id;
END
$$;
";

const VIEW_COUNTS_BY_KEY: &str = r#"
[[view]]
name = "counts_by_key"
mode = "incremental"
function = "refresh_counts"
channels = ["submission_scored"]
"#;

async fn counts_by_key_fresh(c: &Client) -> bool {
    c.query_one(
        "WITH live AS (SELECT challenge_id, count(*) AS n FROM submissions
                       WHERE status = 'scored' GROUP BY challenge_id)
         SELECT NOT EXISTS (SELECT * FROM live EXCEPT SELECT * FROM counts_by_key)
            AND NOT EXISTS (SELECT * FROM counts_by_key EXCEPT SELECT * FROM live)
            AND NOT EXISTS (SELECT FROM mvrefresh.pending)
            AND NOT EXISTS (SELECT FROM mvrefresh.dirty)",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_flood_is_read_without_reconnecting_and_nothing_is_lost() {
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(harness::SCHEMA).await.unwrap();
    // No capture: every notification on `flood` names the key that changed.
    let config = harness::config(
        &db.url,
        "[[view]]\nname = \"mv_counts\"\nmode = \"concurrently\"\nchannels = [\"flood\"]\n",
    );
    harness::install(&config).await;
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    harness::wait_for("the first refresh", || async {
        harness::refreshes(&c, "mv_counts").await >= 1
    })
    .await;
    let reconnects = daemon.stats.listener_reconnects.get();
    let received = daemon.stats.notifications_received.get();
    // Rows the view does not show yet, then 200,000 distinct notifications in one transaction.
    harness::score(&c, 1, 3).await;
    c.batch_execute(
        "BEGIN;
         SELECT pg_notify('flood', g::text) FROM generate_series(1, 200000) AS g;
         COMMIT;",
    )
    .await
    .unwrap();
    let stats = daemon.stats.clone();
    harness::wait_for("all 200,000 notifications counted", || {
        let n = stats.notifications_received.get();
        async move { n >= received + 200_000 }
    })
    .await;
    harness::wait_for("the flooded view refreshed", || harness::counts_fresh(&c)).await;
    assert_eq!(
        daemon.stats.notifications_received.get(),
        received + 200_000
    );
    assert_eq!(
        daemon.stats.listener_reconnects.get(),
        reconnects,
        "the flood made the listener reconnect"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_beyond_max_pending_keys_is_refreshed_whole_in_bounded_memory() {
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(harness::SCHEMA).await.unwrap();
    c.batch_execute(COUNTS_BY_KEY).await.unwrap();
    let body = format!("{}{VIEW_COUNTS_BY_KEY}", harness::CAPTURE);
    let mut config = harness::config(&db.url, &body);
    config.refresh.max_pending_keys = 100;
    config.refresh.batch_keys = 10;
    harness::install(&config).await;
    // 5,000 keys dirty while no daemon runs.
    c.batch_execute(
        "INSERT INTO submissions (challenge_id, status, score)
         SELECT g, 'scored', 1 FROM generate_series(1, 5000) g",
    )
    .await
    .unwrap();
    let daemon = Daemon::start(config);
    let peak = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stats, peak) = (daemon.stats.clone(), peak.clone());
        tokio::spawn(async move {
            loop {
                let keys = stats
                    .views
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|v| v.pending_keys)
                    .max()
                    .unwrap_or(0);
                peak.fetch_max(keys, Ordering::Relaxed);
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
    };
    harness::wait_for("the backlog drained", || counts_by_key_fresh(&c)).await;
    sampler.abort();
    let peak = peak.load(Ordering::Relaxed);
    assert!(
        peak <= 110,
        "{peak} keys held for one view (cap 100, batch 10)"
    );
    let whole: i64 = c
        .query_one(
            "SELECT count(*) FROM mvrefresh.refresh_history
             WHERE view_name = 'counts_by_key' AND outcome = 'success' AND keys IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(whole >= 1, "the view was refreshed whole");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_under_load_holds_no_more_connections_than_the_pool() {
    let (_db, c, config) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    let pool_size = config.database.pool_size as i64;
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    let addr = admin_addr(&daemon).await;
    let peak = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let peak = peak.clone();
        let c2 = harness::connect(&_db.url).await;
        tokio::spawn(async move {
            loop {
                let n: i64 = c2
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity
                         WHERE datname = current_database() AND application_name LIKE 'mvrefresh%'",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                peak.fetch_max(n as usize, Ordering::Relaxed);
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
    };
    // 300 requests, 30 at a time.
    for _ in 0..10 {
        let batch: Vec<_> = (0..30)
            .map(|_| tokio::spawn(async move { http(addr, "GET", "/status", None).await.0 }))
            .collect();
        for r in batch {
            let code = r.await.unwrap();
            assert!(code == 200 || code == 503, "{code}");
        }
    }
    sampler.abort();
    let peak = peak.load(Ordering::Relaxed) as i64;
    assert!(
        peak <= pool_size + 1,
        "{peak} connections held with pool_size {pool_size}"
    );
    assert!(harness::counts_fresh(&c).await);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_fails_its_refresh_is_isolated_and_the_others_are_refreshed() {
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(harness::SCHEMA).await.unwrap();
    c.batch_execute(COUNTS_BY_KEY).await.unwrap();
    let config = harness::config(
        &db.url,
        &format!("{}{VIEW_COUNTS_BY_KEY}", harness::CAPTURE),
    );
    harness::install(&config).await;
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    harness::wait_for("the first (whole) refresh", || async {
        harness::refreshes(&c, "counts_by_key").await >= 1
            && harness::pending(&c, "counts_by_key").await == 0
    })
    .await;
    c.batch_execute("UPDATE poison SET on_13 = true")
        .await
        .unwrap();
    // Twenty keys in one transaction: one batch, which fails because of key 13.
    c.batch_execute(
        "INSERT INTO submissions (challenge_id, status, score)
         SELECT g, 'scored', 1 FROM generate_series(1, 20) g",
    )
    .await
    .unwrap();
    harness::wait_for("every key but 13 refreshed, 13 still pending", || async {
        c.query_one(
            "SELECT (SELECT count(*) FROM counts_by_key) = 19
                AND NOT EXISTS (SELECT FROM counts_by_key WHERE challenge_id = 13)
                AND (SELECT array_agg(DISTINCT key) FROM mvrefresh.pending) = ARRAY['13']",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    })
    .await;
    // Other keys keep refreshing while 13 is quarantined.
    harness::score(&c, 21, 1).await;
    harness::wait_for("a later key refreshed", || async {
        c.query_one(
            "SELECT EXISTS (SELECT FROM counts_by_key WHERE challenge_id = 21)",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    })
    .await;
    // Fixed: the quarantined key is retried and refreshed.
    c.batch_execute("UPDATE poison SET on_13 = false")
        .await
        .unwrap();
    harness::wait_for("key 13 refreshed after the fix", || counts_by_key_fresh(&c)).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_named_two_ways_is_one_view() {
    let (db, c, _config) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    let qualified = harness::config(
        &db.url,
        &format!(
            "{}[[view]]\nname = \"public.mv_counts\"\nmode = \"concurrently\"\nchannels = [\"submission_scored\"]\n",
            harness::CAPTURE
        ),
    );
    harness::install(&qualified).await;
    let subscriptions = harness::texts(&c, "SELECT view_name FROM mvrefresh.subscription").await;
    assert_eq!(subscriptions, ["mv_counts"]);
    let a = Daemon::start(qualified);
    let b = Daemon::start(harness::counts_config(&db.url));
    a.wait_listening().await;
    b.wait_listening().await;
    harness::score(&c, 2, 2).await;
    harness::wait_for("the change refreshed", || async {
        harness::counts_fresh(&c).await && harness::pending(&c, "mv_counts").await == 0
    })
    .await;
    let names = harness::texts(
        &c,
        "SELECT DISTINCT view_name FROM mvrefresh.refresh_history
         UNION SELECT DISTINCT view_name FROM mvrefresh.pending",
    )
    .await;
    assert_eq!(names, ["mv_counts"]);
    a.stop().await;
    b.stop().await;
}

/// Backends of the daemon waiting for a lock.
async fn daemon_backends_waiting_on_a_lock(c: &Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name LIKE 'mvrefresh%'
           AND wait_event_type = 'Lock'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_whose_queries_are_stuck_stops_and_its_backends_end() {
    let (db, c, config) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    harness::wait_for("the initial refresh", || async {
        harness::refreshes(&c, "mv_counts").await >= 1
    })
    .await;
    // Every collect and catch-up now waits for this lock, for as long as the test holds it.
    let mut locker = harness::connect(&db.url).await;
    let tx = locker.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE mvrefresh.dirty, mvrefresh.pending IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    harness::wait_for("a query of the daemon waiting for the lock", || async {
        daemon_backends_waiting_on_a_lock(&c).await >= 1
    })
    .await;
    // The main loop never waits on a query: the daemon stops with the lock still held (`stop`
    // fails the test if it does not) ...
    daemon.stop().await;
    // ... and the server notices that the stuck queries' client is gone (within
    // `client_connection_check_interval`), well before their statement timeout would end them:
    // the deadline tells the two causes apart, it does not time the daemon.
    let deadline = tokio::time::Instant::now() + mvrefresh::db::BOOKKEEPING_TIMEOUT / 2;
    while daemon_backends_waiting_on_a_lock(&c).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the daemon's stuck backends outlived it (ended only by their statement timeout)"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tx.rollback().await.unwrap();
}

/// `"a.b".c` and `a."b.c"` print alike without their quotes: two views all the same, each with
/// its own subscription, pending keys, refreshes and history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_whose_names_print_alike_unquoted_are_kept_apart() {
    let (db, c, _config) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    c.batch_execute(
        r#"CREATE SCHEMA "a.b";
           CREATE SCHEMA a;
           CREATE MATERIALIZED VIEW "a.b".c AS
               SELECT challenge_id, count(*) AS n FROM submissions
               WHERE status = 'scored' GROUP BY challenge_id;
           CREATE UNIQUE INDEX ON "a.b".c (challenge_id);
           CREATE MATERIALIZED VIEW a."b.c" AS
               SELECT challenge_id, sum(score) AS total FROM submissions
               WHERE status = 'scored' GROUP BY challenge_id;
           CREATE UNIQUE INDEX ON a."b.c" (challenge_id);"#,
    )
    .await
    .unwrap();
    let config = harness::config(
        &db.url,
        &format!(
            "{}{}
[[view]]
name = '\"a.b\".c'
mode = \"concurrently\"
channels = [\"submission_scored\"]
[[view]]
name = 'a.\"b.c\"'
mode = \"concurrently\"
channels = [\"submission_scored\"]
",
            harness::CAPTURE,
            harness::VIEW_COUNTS
        ),
    );
    harness::install(&config).await;
    let names = |sql: &'static str| {
        let c = &c;
        async move {
            c.query(sql, &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        names("SELECT view_name FROM mvrefresh.subscription ORDER BY 1").await,
        [r#""a.b".c"#, r#"a."b.c""#, "mv_counts"]
    );
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    harness::score(&c, 4, 3).await;
    let fresh = || async {
        let row = c
            .query_one(
                r#"SELECT (SELECT n FROM "a.b".c WHERE challenge_id = 4),
                          (SELECT total FROM a."b.c" WHERE challenge_id = 4)"#,
                &[],
            )
            .await
            .unwrap();
        row.get::<_, Option<i64>>(0) == Some(3) && row.get::<_, Option<f64>>(1) == Some(6.0)
    };
    harness::wait_for("both views refreshed", fresh).await;
    harness::wait_for("nothing pending", || async {
        harness::pending(&c, r#""a.b".c"#).await == 0
            && harness::pending(&c, r#"a."b.c""#).await == 0
    })
    .await;
    assert_eq!(
        names(
            "SELECT DISTINCT view_name FROM mvrefresh.refresh_history
             WHERE outcome = 'success' ORDER BY 1"
        )
        .await,
        [r#""a.b".c"#, r#"a."b.c""#, "mv_counts"]
    );
    daemon.stop().await;
}
