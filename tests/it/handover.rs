//! The hand-over between writers and the daemon: a writer that finds its key dirty writes
//! nothing, so the daemon must not consume a pending key while such a writer may still commit.
//! Also: a daemon killed between taking keys and refreshing them, two replicas taking keys at
//! once, bulk writes, and the upgrade from schema version 2.

use std::process::{Command, Stdio};

use tokio_postgres::Client;

use crate::harness::{self, Cluster};

async fn dirty_rows(c: &Client) -> i64 {
    c.query_one("SELECT count(*) FROM mvrefresh.dirty", &[])
        .await
        .unwrap()
        .get(0)
}

/// Lookups in the dirty set as this session counts them so far in its transaction (counts reach
/// the cumulative statistics only now and then: compare two readings in one transaction).
async fn lookups(c: &Client) -> i64 {
    c.query_one(
        "SELECT (coalesce(seq_scan, 0) + coalesce(idx_scan, 0))::int8
         FROM pg_stat_xact_user_tables WHERE relid = 'mvrefresh.dirty'::regclass",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

async fn nothing_left(c: &Client) -> bool {
    c.query_one(
        "SELECT NOT EXISTS (SELECT FROM mvrefresh.pending) AND NOT EXISTS (SELECT FROM mvrefresh.dirty)",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

async fn n_of(c: &Client, challenge: i32) -> Option<i64> {
    c.query_opt(
        "SELECT n FROM mv_counts WHERE challenge_id = $1",
        &[&challenge],
    )
    .await
    .unwrap()
    .map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_found_its_key_dirty_and_commits_late_is_reflected() {
    late_writer_is_reflected(false).await;
}

/// With mvrefresh_capture, the late writer is the session that marked the key: its row does not
/// even run the trigger, and its transaction outlives the collect that moves the generation on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_writer_that_remembered_its_key_and_commits_late_is_reflected() {
    late_writer_is_reflected(true).await;
}

async fn late_writer_is_reflected(native: bool) {
    let (db, c, config) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    if native {
        c.batch_execute("CREATE EXTENSION mvrefresh_capture")
            .await
            .unwrap();
        harness::install(&config).await;
    }
    harness::take_dirty(&c, None).await;
    let w = db.client().await;
    // Key 1 turns dirty (committed)...
    harness::score(if native { &w } else { &c }, 1, 1).await;
    assert_eq!(dirty_rows(&c).await, 1);
    // ...and a second writer (or, native, the same one) changes key 1 in a transaction it keeps
    // open: it finds the key dirty (or remembered) and writes nothing.
    w.batch_execute(
        "BEGIN; INSERT INTO submissions (challenge_id, status, score) VALUES (1, 'scored', 10)",
    )
    .await
    .unwrap();
    assert_eq!(
        dirty_rows(&c).await,
        1,
        "the open writer wrote no dirty row"
    );

    let daemon = harness::Daemon::start(config);
    daemon.wait_listening().await;
    // The daemon takes key 1 and refreshes it while the writer is open: the view shows the
    // first writer's row, not the open one's, and the pending key is not consumed.
    let key_pending = || async {
        c.query_one(
            "SELECT EXISTS (SELECT FROM mvrefresh.pending WHERE view_name = 'mv_counts' AND key = '1')",
            &[],
        )
        .await
        .unwrap()
        .get::<_, bool>(0)
    };
    harness::wait_for(
        "the key taken, then refreshed while the writer is open",
        || async { dirty_rows(&c).await == 0 && key_pending().await },
    )
    .await;
    let before = harness::refreshes(&c, "mv_counts").await;
    harness::wait_for("a refresh after the key was taken", || async {
        harness::refreshes(&c, "mv_counts").await > before
    })
    .await;
    assert_eq!(
        n_of(&c, 1).await,
        Some(1),
        "the open writer's row is not visible yet"
    );
    assert!(
        key_pending().await,
        "a key a live writer may rely on stays pending"
    );
    // The writer commits after the refresh: its change is reflected, and nothing is left.
    w.batch_execute("COMMIT").await.unwrap();
    harness::wait_for("the late writer's row", || async {
        n_of(&c, 1).await == Some(2) && nothing_left(&c).await
    })
    .await;
    assert!(harness::counts_fresh(&c).await);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_between_taking_and_refreshing_loses_nothing() {
    let (db, c, _config) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    // The first daemon collects but never refreshes: its view's quiet period is an hour.
    let dir = std::env::temp_dir().join(format!("mvrefresh-handover-{}", harness::unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let slow = dir.join("slow.toml");
    std::fs::write(
        &slow,
        format!(
            "[database]\nurl = \"{}\"\n[listener]\ncatch_up_interval = \"1h\"\n\
             [http]\nlisten = \"\"\n{}[[view]]\nname = \"mv_counts\"\nmode = \"concurrently\"\n\
             channels = [\"submission_scored\"]\nquiet = \"1h\"\nmax_wait = \"1h\"\n",
            db.url,
            harness::CAPTURE
        ),
    )
    .unwrap();
    let mut first = harness::Reaper(Some(
        Command::new(env!("CARGO_BIN_EXE_mvrefresh"))
            .arg("--config")
            .arg(&slow)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    harness::wait_for("the first daemon to listen", || async {
        harness::listeners(&c).await == 1
    })
    .await;
    let before = harness::refreshes(&c, "mv_counts").await;
    harness::score(&c, 7, 3).await;
    // Taken: no longer dirty, pending for the view.
    harness::wait_for("the key taken into pending", || async {
        dirty_rows(&c).await == 0
            && c.query_one(
                "SELECT EXISTS (SELECT FROM mvrefresh.pending WHERE view_name = 'mv_counts' AND key = '7')",
                &[],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;
    let mut child = first.0.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(harness::refreshes(&c, "mv_counts").await, before);
    assert_eq!(n_of(&c, 7).await, None, "not refreshed before the kill");

    let daemon = harness::Daemon::start(harness::counts_config(&db.url));
    harness::wait_for("the taken key refreshed by the next daemon", || async {
        n_of(&c, 7).await == Some(3) && nothing_left(&c).await
    })
    .await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_taking_keys_at_once_lose_nothing() {
    let (db, c, config) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    let a = harness::Daemon::start(config.clone());
    let b = harness::Daemon::start(config);
    a.wait_listening().await;
    b.wait_listening().await;
    // Writers on 20 keys from 4 connections, some holding their transaction open across
    // other writers' commits, while both replicas collect and refresh.
    let mut writers = Vec::new();
    for w in 0..4 {
        let client = db.client().await;
        writers.push(tokio::spawn(async move {
            for round in 0..25 {
                let key = (w * 7 + round) % 20;
                if round % 5 == 0 {
                    client.batch_execute("BEGIN").await.unwrap();
                    client
                        .execute(
                            "INSERT INTO submissions (challenge_id, status, score) VALUES ($1, 'scored', $2)",
                            &[&key, &f64::from(round)],
                        )
                        .await
                        .unwrap();
                    // Let the others commit and the daemons collect meanwhile.
                    client.execute("SELECT pg_sleep(0.05)", &[]).await.unwrap();
                    client.batch_execute("COMMIT").await.unwrap();
                } else {
                    client
                        .execute(
                            "UPDATE submissions SET score = coalesce(score, 0) + 1
                             WHERE id = (SELECT min(id) FROM submissions WHERE challenge_id = $1)",
                            &[&key],
                        )
                        .await
                        .unwrap();
                    harness::score(&client, key, 1).await;
                }
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    harness::wait_for("every change reflected, nothing left", || async {
        harness::counts_fresh(&c).await && nothing_left(&c).await
    })
    .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_update_writes_one_dirty_row_per_key() {
    let (_db, c, _config) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    c.batch_execute(
        "INSERT INTO submissions (challenge_id, status, score)
         SELECT g % 50, 'scored', g FROM generate_series(1, 100000) g",
    )
    .await
    .unwrap();
    harness::take_dirty(&c, None).await;
    c.batch_execute("BEGIN").await.unwrap();
    let before = lookups(&c).await;
    c.batch_execute("UPDATE submissions SET score = score + 1")
        .await
        .unwrap();
    let probes = lookups(&c).await - before;
    c.batch_execute("COMMIT").await.unwrap();
    // 100,000 rows of 50 keys: the slow path (a lookup, maybe a write) ran once per key; every
    // other row found its key remembered.
    assert_eq!(probes, 50);
    assert_eq!(dirty_rows(&c).await, 50);
    // Rows moving to other keys take mark_keys (old and new key; the old ones are remembered):
    // one lookup per new key. What it remembers is what the common case looks up, so re-scoring
    // those rows looks nothing up.
    c.batch_execute("BEGIN").await.unwrap();
    let before = lookups(&c).await;
    c.batch_execute("UPDATE submissions SET challenge_id = challenge_id + 50")
        .await
        .unwrap();
    let moved = lookups(&c).await - before;
    c.batch_execute("UPDATE submissions SET score = score + 1")
        .await
        .unwrap();
    let rescored = lookups(&c).await - before - moved;
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!((moved, rescored), (50, 0));
    assert_eq!(dirty_rows(&c).await, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_upgrades_version_2_without_losing_pending_changes() {
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(harness::SCHEMA).await.unwrap();
    // Version 2, as its install wrote it, and changes captured by its triggers.
    c.batch_execute(include_str!("../fixtures/schema_v2_install.sql"))
        .await
        .unwrap();
    c.batch_execute("DELETE FROM mvrefresh.change_log")
        .await
        .unwrap();
    harness::score(&c, 3, 2).await;
    harness::score(&c, 4, 1).await;
    let logged: i64 = c
        .query_one("SELECT count(*) FROM mvrefresh.change_log", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged, 2, "version 2 logged both changes");

    let config = harness::counts_config(&db.url);
    harness::install(&config).await;
    let row = c
        .query_one(
            "SELECT (SELECT value FROM mvrefresh.meta WHERE key = 'schema_version'),
                    to_regclass('mvrefresh.change_log') IS NULL,
                    to_regprocedure('mvrefresh.record_changes(text, text[])') IS NULL,
                    (SELECT array_agg(key ORDER BY key) FROM mvrefresh.pending
                     WHERE view_name = 'mv_counts' AND key <> '*'),
                    (SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'mvrefresh\\_capture\\_%\\_upd')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), mvrefresh::install::SCHEMA_VERSION);
    assert!(row.get::<_, bool>(1), "the change log is gone");
    assert!(row.get::<_, bool>(2), "record_changes is gone");
    assert_eq!(
        row.get::<_, Vec<String>>(3),
        ["3", "4"],
        "pending changes moved"
    );
    assert_eq!(row.get::<_, i64>(4), 0, "version 2's triggers are gone");
    // Writers keep working and are captured the new way.
    harness::score(&c, 5, 1).await;
    assert_eq!(dirty_rows(&c).await, 1);

    let daemon = harness::Daemon::start(config);
    harness::wait_for("the changes from before the upgrade refreshed", || async {
        harness::counts_fresh(&c).await && nothing_left(&c).await
    })
    .await;
    daemon.stop().await;
}

/// A table `hosts` captured by `addr` (inet: its text cast, `10.0.0.1/32`, is not its output,
/// `10.0.0.1`), and `mv_hosts` refreshed from it.
const HOSTS: &str = r#"
[[capture]]
name = "hosts"
table = "hosts"
channel = "hosts_changed"
key = "addr"
[[view]]
name = "mv_hosts"
mode = "concurrently"
channels = ["hosts_changed"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_text_cast_is_not_its_output_is_remembered_too() {
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE hosts (id serial PRIMARY KEY, addr inet, n int NOT NULL DEFAULT 0);
         INSERT INTO hosts (addr) SELECT ('10.0.0.' || g % 2)::inet FROM generate_series(1, 1000) g;
         CREATE MATERIALIZED VIEW mv_hosts AS SELECT addr, sum(n) AS n FROM hosts GROUP BY addr;
         CREATE UNIQUE INDEX ON mv_hosts (addr);",
    )
    .await
    .unwrap();
    harness::install(&harness::config(&db.url, HOSTS)).await;
    harness::take_dirty(&c, None).await;
    c.batch_execute("BEGIN").await.unwrap();
    let before = lookups(&c).await;
    c.batch_execute("UPDATE hosts SET n = n + 1").await.unwrap();
    let probes = lookups(&c).await - before;
    c.batch_execute("COMMIT").await.unwrap();
    // 1,000 rows of 2 keys: one lookup per key, then the rows find their key remembered.
    assert_eq!(probes, 2);
    let keys = harness::texts(&c, "SELECT DISTINCT key FROM mvrefresh.dirty ORDER BY key").await;
    assert_eq!(keys, ["10.0.0.0/32", "10.0.0.1/32"]);
}
