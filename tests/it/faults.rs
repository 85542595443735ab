//! Faults driven on purpose: a killed listener backend, a restarted server, a frozen connection.
//! Each waits on observable state (reconnect counts, the views' contents), never on sleeps.

use crate::harness::{self, Cluster, Daemon};
use crate::proxy::Proxy;

/// The listener's backend pid, once it is listening.
async fn listener_pid(client: &tokio_postgres::Client) -> Option<i32> {
    client
        .query_opt(
            "SELECT pid FROM pg_stat_activity
             WHERE application_name = 'mvrefresh-listener' AND datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_killed_20_times_loses_nothing() {
    let (_db, c, config) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    let mut last_pid = 0;
    for round in 0..20 {
        let stats = daemon.stats.clone();
        let before = stats.listener_reconnects.get();
        let pid = harness::wait_some("a new listening backend", || async {
            if !stats.listener_connected.get() {
                return None;
            }
            listener_pid(&c).await.filter(|p| *p != last_pid)
        })
        .await;
        last_pid = pid;
        let killed: bool = c
            .query_one("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .unwrap()
            .get(0);
        assert!(killed, "round {round}: backend {pid} was already gone");
        // A change while the listener is down (or just coming back).
        harness::score(&c, round % 5, 2).await;
        harness::wait_for("the listener to reconnect", || {
            let n = stats.listener_reconnects.get();
            async move { n > before }
        })
        .await;
    }
    harness::score(&c, 9, 1).await;
    harness::wait_for("every change to be reflected", || harness::counts_fresh(&c)).await;
    assert!(daemon.stats.listener_reconnects.get() >= 20);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_loses_nothing() {
    let cluster = Cluster::new();
    let (db, _c, config) = harness::setup(&cluster, harness::VIEW_COUNTS).await;
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    {
        let c = db.client().await;
        harness::score(&c, 1, 3).await;
        harness::wait_for("the first change", || harness::counts_fresh(&c)).await;
    }
    let before = daemon.stats.listener_reconnects.get();
    cluster.restart();
    let c = db.client().await;
    for ch in 0..4 {
        harness::score(&c, ch, 5).await;
    }
    daemon.wait_reconnected(before).await;
    harness::wait_for("changes made across the restart", || {
        harness::counts_fresh(&c)
    })
    .await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_connection_is_detected_by_the_heartbeat() {
    let (db, c, _) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    let proxy = Proxy::start(db.port).await;
    let config = harness::counts_config(&db.url_via(proxy.port));
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    harness::score(&c, 1, 1).await;
    harness::wait_for("the first change", || harness::counts_fresh(&c)).await;

    let before = daemon.stats.listener_reconnects.get();
    proxy.freeze();
    // Written directly, not through the frozen proxy.
    for ch in 0..3 {
        harness::score(&c, ch, 4).await;
    }
    // Only the heartbeat can notice: the frozen socket stays open.
    daemon.wait_reconnected(before).await;
    harness::score(&c, 5, 1).await;
    harness::wait_for("every change to be reflected", || harness::counts_fresh(&c)).await;
    // The stalled listener's backend was ended: it would hold back the notification queue.
    harness::wait_for("a single listener backend", || async {
        harness::listeners(&c).await == 1
    })
    .await;
    daemon.stop().await;
}

/// A collect whose connection freezes while its statement runs is given up after a while (its
/// answer never comes), and the next collects run: changes keep being reflected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collect_whose_connection_freezes_is_given_up() {
    let (db, c, _) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    let proxy = Proxy::start(db.port).await;
    let daemon = Daemon::start(harness::counts_config(&db.url_via(proxy.port)));
    daemon.wait_listening().await;
    harness::score(&c, 1, 1).await;
    harness::wait_for("the first change", || harness::counts_fresh(&c)).await;

    // Hold the next collect server-side (writers do not touch mvrefresh.pending).
    let blocker = db.client().await;
    blocker
        .batch_execute("BEGIN; LOCK TABLE mvrefresh.pending IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    harness::score(&c, 2, 1).await;
    harness::wait_for("a collect waiting for the lock", || async {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE wait_event_type = 'Lock' AND query LIKE '%DELETE FROM mvrefresh.dirty%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        n > 0
    })
    .await;
    // Its answer will never arrive.
    proxy.freeze();
    blocker.batch_execute("COMMIT").await.unwrap();
    harness::score(&c, 3, 1).await;
    harness::wait_for("every change to be reflected", || harness::counts_fresh(&c)).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_whose_connection_freezes_is_abandoned_and_redone() {
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(harness::SCHEMA).await.unwrap();
    c.batch_execute(harness::SLOW_SCHEMA).await.unwrap();
    let proxy = Proxy::start(db.port).await;
    // The default refresh timeout (5 minutes) stays: only the liveness probe can save the day.
    let body = format!("{}{}", harness::CAPTURE, harness::VIEW_SLOW);
    let config = harness::config(&db.url_via(proxy.port), &body);
    harness::install(&config).await;
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    harness::wait_for("the initial refresh", || async {
        harness::refreshes(&c, "mv_slow").await >= 1
    })
    .await;
    c.batch_execute("UPDATE knobs SET sleep_s = 2")
        .await
        .unwrap();
    harness::score(&c, 1, 1).await;
    harness::wait_some("a refresh to be running", || {
        harness::refreshing(&c, "mv_slow")
    })
    .await;
    proxy.freeze();
    c.batch_execute("UPDATE knobs SET sleep_s = 0")
        .await
        .unwrap();
    harness::score(&c, 2, 3).await;
    harness::wait_for("mv_slow to reflect every change", || async {
        c.query_one(
            "SELECT (SELECT count(*) FROM mv_slow) = 2 AND (SELECT sum(n) FROM mv_slow) = 4",
            &[],
        )
        .await
        .unwrap()
        .get::<_, bool>(0)
    })
    .await;
    // The frozen refresh was given up (not waited out for 5 minutes), then redone; its attempt
    // has a history row like any other.
    assert!(daemon.stats.refreshes_failed.get() >= 1);
    let failures: i64 = c
        .query_one(
            "SELECT count(*) FROM mvrefresh.refresh_history
             WHERE view_name = 'mv_slow' AND outcome = 'failure'
               AND error LIKE 'the connection stopped answering%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(failures >= 1, "no history row for the abandoned refresh");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connections_are_reestablished() {
    let (db, c, _) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    let proxy = Proxy::start(db.port).await;
    let config = harness::counts_config(&db.url_via(proxy.port));
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    for round in 0..3 {
        let before = daemon.stats.listener_reconnects.get();
        proxy.cut();
        harness::score(&c, round, 2).await;
        daemon.wait_reconnected(before).await;
    }
    harness::wait_for("every change to be reflected", || harness::counts_fresh(&c)).await;
    assert!(proxy.connections() >= 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_is_refused_with_the_reason() {
    let primary = Cluster::new();
    let (db, _c, _config) = harness::setup(&primary, harness::VIEW_COUNTS).await;
    let standby = primary.standby();
    let url = db.url.replace(
        &format!(":{}/", primary.port),
        &format!(":{}/", standby.port),
    );
    // The standby has replayed the install once the schema is visible there.
    harness::wait_for("the standby to replay the install", || async {
        match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(conn);
                client
                    .query_one("SELECT to_regclass('mvrefresh.pending') IS NOT NULL", &[])
                    .await
                    .map(|r| r.get::<_, bool>(0))
                    .unwrap_or(false)
            }
            Err(_) => false,
        }
    })
    .await;
    let config = harness::counts_config(&url);
    let err = Daemon::start(config)
        .result()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("is a standby"), "{err}");
    assert!(err.contains("primary"), "{err}");
}
