//! `mvrefresh install` and the capture triggers: idempotence and which writes mark which keys.

use std::sync::{Arc, Mutex};

use futures_util::future::poll_fn;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use crate::harness::{self, Cluster};

/// Everything about mvrefresh's objects that a second install must leave as it was.
async fn fingerprint(client: &Client) -> String {
    client
        .query_one(
            "SELECT string_agg(x, E'\n' ORDER BY x) FROM (
                 SELECT 'rel ' || c.oid || ' ' || c.oid::regclass::text || ' ' || c.relkind::text
                 FROM pg_class c WHERE c.relnamespace = 'mvrefresh'::regnamespace
                 UNION ALL
                 SELECT 'fn ' || p.oid || ' ' || p.oid::regprocedure::text || ' '
                        || md5(pg_get_functiondef(p.oid))
                 FROM pg_proc p WHERE p.pronamespace = 'mvrefresh'::regnamespace
                 UNION ALL
                 SELECT 'trigger ' || t.tgrelid::regclass::text || ' ' || t.tgname || ' '
                        || md5(pg_get_triggerdef(t.oid))
                 FROM pg_trigger t WHERE NOT t.tgisinternal
                 UNION ALL
                 SELECT 'sub ' || channel || ' ' || view_name FROM mvrefresh.subscription
                 UNION ALL
                 SELECT 'pending ' || view_name || ' ' || key FROM mvrefresh.pending
                 UNION ALL
                 SELECT 'dirty ' || channel || ' ' || key FROM mvrefresh.dirty
                 UNION ALL
                 SELECT 'capture ' || name || ' ' || table_name::text || ' ' || channel || ' ' || fingerprint
                 FROM mvrefresh.capture
                 UNION ALL
                 SELECT 'meta ' || key || '=' || value FROM mvrefresh.meta
             ) s(x)",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_twice_is_a_no_op() {
    let (_db, client, config) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    let before = fingerprint(&client).await;
    assert!(
        before.contains("trigger submissions mvrefresh_capture_submissions "),
        "{before}"
    );
    assert!(
        before.contains("sub submission_scored mv_counts"),
        "{before}"
    );
    harness::install(&config).await;
    assert_eq!(before, fingerprint(&client).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_prunes_what_left_the_config_only_when_asked() {
    let (db, client, _config) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    // The same view, no capture any more, and subscribed to another channel.
    let config = harness::config(
        &db.url,
        "[[view]]\nname = \"mv_counts\"\nmode = \"concurrently\"\nchannels = [\"other\"]\n",
    );
    // Without --prune, nothing another config may use goes.
    harness::install(&config).await;
    let fp = fingerprint(&client).await;
    assert!(fp.contains("mvrefresh_capture_submissions"), "{fp}");
    assert!(fp.contains("sub submission_scored mv_counts"), "{fp}");
    assert!(fp.contains("sub other mv_counts"), "{fp}");
    let d = mvrefresh::db::Db::new(&config.database).unwrap();
    let mut c = d.connect_simple("t").await.unwrap();
    let steps = mvrefresh::install::script(
        &config,
        mvrefresh::install::Options {
            analytics: false,
            prune: true,
        },
    );
    mvrefresh::install::run(&mut c, &steps).await.unwrap();
    let fp = fingerprint(&client).await;
    assert!(!fp.contains("mvrefresh_capture_submissions"), "{fp}");
    assert!(!fp.contains("capture_submissions"), "{fp}");
    assert!(!fp.contains("sub submission_scored"), "{fp}");
    assert!(fp.contains("sub other mv_counts"), "{fp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_rejects_a_capture_that_cannot_work() {
    let db = Cluster::shared().create_db().await;
    let client = db.client().await;
    client.batch_execute(harness::SCHEMA).await.unwrap();
    let body = harness::CAPTURE.replace("[\"score\"]", "[\"no_such_column\"]");
    let config = harness::config(&db.url, &format!("{body}{}", harness::VIEW_COUNTS));
    let d = mvrefresh::db::Db::new(&config.database).unwrap();
    let mut c = d.connect_simple("t").await.unwrap();
    let steps = mvrefresh::install::script(&config, Default::default());
    let err = mvrefresh::install::run(&mut c, &steps)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("capture[0] (submissions)"), "{err}");
    assert!(err.contains("no_such_column"), "{err}");
    // Nothing of the failed install stays.
    let installed: bool = client
        .query_one("SELECT to_regclass('mvrefresh.pending') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!installed);
}

/// Collects notifications on `channel` from a connection of its own.
struct Listener {
    seen: Arc<Mutex<Vec<String>>>,
    _client: Client,
}

impl Listener {
    async fn start(url: &str, channel: &str) -> Listener {
        let (client, mut conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = seen.clone();
        tokio::spawn(async move {
            while let Some(Ok(m)) = poll_fn(|cx| conn.poll_message(cx)).await {
                if let AsyncMessage::Notification(n) = m {
                    sink.lock().unwrap().push(n.payload().to_owned());
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {channel}"))
            .await
            .unwrap();
        Listener {
            seen,
            _client: client,
        }
    }

    /// Everything notified by transactions committed before now. Notifications arrive in commit
    /// order, so a sentinel sent last marks the end.
    async fn drain(&self, writer: &Client, channel: &str) -> Vec<String> {
        writer
            .batch_execute(&format!("NOTIFY {channel}, 'sentinel'"))
            .await
            .unwrap();
        let seen = self.seen.clone();
        harness::wait_for("the sentinel notification", || {
            let done = seen.lock().unwrap().iter().any(|p| p == "sentinel");
            async move { done }
        })
        .await;
        let mut all = std::mem::take(&mut *self.seen.lock().unwrap());
        all.retain(|p| p != "sentinel");
        all
    }
}

/// The keys marked dirty since the last call (taken as a collect takes them).
async fn logged(client: &Client) -> Vec<String> {
    harness::take_dirty(client, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_marks_exactly_the_changed_challenges() {
    let (db, c, _config) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    marks_exactly_the_changed_challenges(&db.url, &c).await;
}

/// Which writes mark which keys, and wake the daemon: the same with and without
/// mvrefresh_capture (tests/it/native.rs). `c` writes to the installed database at `url`.
pub async fn marks_exactly_the_changed_challenges(url: &str, c: &Client) {
    let listener = Listener::start(url, "submission_scored").await;

    let cases: &[(&str, &[&str])] = &[
        (
            "INSERT INTO submissions (id, challenge_id, status, score) VALUES (1, 1, 'scored', 5)",
            &["1"],
        ),
        (
            "INSERT INTO submissions (id, challenge_id, status) VALUES (2, 2, 'pending')",
            &[],
        ),
        (
            "UPDATE submissions SET status = 'scored', score = 3 WHERE id = 2",
            &["2"],
        ),
        ("UPDATE submissions SET score = 4 WHERE id = 2", &["2"]),
        // Setting a captured column to the value it had still marks the key (values are not
        // compared: an occasional refresh that changes nothing costs less).
        ("UPDATE submissions SET score = 4 WHERE id = 2", &["2"]),
        (
            "UPDATE submissions SET note = 'irrelevant' WHERE id = 1",
            &[],
        ),
        (
            "UPDATE submissions SET status = 'failed' WHERE id = 2",
            &["2"],
        ),
        ("DELETE FROM submissions WHERE id = 2", &[]),
        (
            "UPDATE submissions SET challenge_id = 3 WHERE id = 1",
            &["1", "3"],
        ),
        ("DELETE FROM submissions WHERE id = 1", &["3"]),
        (
            "INSERT INTO submissions (challenge_id, status, score) VALUES (NULL, 'scored', 1)",
            &[],
        ),
        (
            "INSERT INTO submissions (challenge_id, status, score) VALUES (4, 'scored', 'NaN')",
            &["4"],
        ),
        ("TRUNCATE submissions", &["*"]),
    ];
    for (sql, expected) in cases {
        c.batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert_eq!(logged(c).await, *expected, "dirty keys after: {sql}");
        // One wake-up per transaction that turned keys dirty, whatever their number; the
        // payload names nothing (the dirty keys are the truth).
        let notified = listener.drain(c, "submission_scored").await;
        let wanted: &[&str] = if expected.is_empty() { &[] } else { &[""] };
        assert_eq!(notified, wanted, "notifications after: {sql}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_wake_up_and_one_dirty_row_per_key_per_transaction() {
    let (db, c, _config) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    logged(&c).await;
    let listener = Listener::start(&db.url, "submission_scored").await;
    // 1,000 rows over 7 challenges, written by many statements of one transaction.
    c.batch_execute(
        "BEGIN;
         INSERT INTO submissions (challenge_id, status) SELECT g % 7, 'pending' FROM generate_series(1, 1000) g;
         UPDATE submissions SET status = 'scored', score = id WHERE id % 2 = 0;
         UPDATE submissions SET status = 'scored', score = id WHERE id % 2 = 1;
         UPDATE submissions SET score = score + 1;
         COMMIT;",
    )
    .await
    .unwrap();
    let notified = listener.drain(&c, "submission_scored").await;
    assert_eq!(notified, [""], "one wake-up for the whole transaction");
    // 4,000 row changes, one write per key: the other rows found their key dirty already.
    let rows: i64 = c
        .query_one("SELECT count(*) FROM mvrefresh.dirty", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 7);
    assert_eq!(logged(&c).await, ["0", "1", "2", "3", "4", "5", "6"]);
}

/// A partitioned captured table: its partitions carry clones of the capture's triggers, which
/// go with the parent's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uninstall_drops_the_triggers_of_a_partitioned_table() {
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE parted (id int, challenge_id int, status text, score int)
             PARTITION BY RANGE (challenge_id);
         CREATE TABLE parted_low PARTITION OF parted FOR VALUES FROM (0) TO (100);
         CREATE TABLE parted_high PARTITION OF parted FOR VALUES FROM (100) TO (MAXVALUE);",
    )
    .await
    .unwrap();
    let config = harness::config(
        &db.url,
        &format!(
            "{}{}",
            harness::CAPTURE.replace("table = \"submissions\"", "table = \"parted\""),
            harness::VIEW_COUNTS
        ),
    );
    harness::install(&config).await;
    harness::uninstall(&c).await;
    let left: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'mvrefresh%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    c.batch_execute("INSERT INTO parted VALUES (1, 1, 'scored', 1), (2, 200, 'scored', 2)")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uninstall_leaves_writers_working() {
    let db = Cluster::shared().create_db().await;
    let config = harness::config(
        &db.url,
        &include_str!("../../config.toml")[include_str!("../../config.toml")
            .find("[[capture]]")
            .unwrap()..],
    );
    let d = mvrefresh::db::Db::new(&config.database).unwrap();
    let mut c = d.connect_simple("t").await.unwrap();
    let steps = mvrefresh::install::script(
        &config,
        mvrefresh::install::Options {
            analytics: true,
            prune: false,
        },
    );
    mvrefresh::install::run(&mut c, &steps).await.unwrap();
    c.query_one("SELECT analytics_generate_sample(200, 3, 10)", &[])
        .await
        .unwrap();
    harness::uninstall(&c).await;
    let left: i64 = c
        .query_one(
            "SELECT (SELECT count(*) FROM pg_namespace WHERE nspname = 'mvrefresh')
                  + (SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'mvrefresh%')
                  + (SELECT count(*) FROM pg_proc WHERE proname LIKE 'mvrefresh%')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    // Writers are unaffected.
    c.batch_execute(
        "UPDATE submissions SET status = 'scored' WHERE status = 'pending';
         UPDATE bout_results SET winner_agent_id = NULL;
         DELETE FROM submissions WHERE status = 'failed';
         TRUNCATE bout_results;",
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uninstall_removes_only_this_databases_pg_cron_jobs() {
    // A cluster of its own: pg_cron's database (`postgres`) is where the script runs, and the
    // jobs of the shared cluster's other tests must not be touched.
    let cluster = Cluster::new();
    let cron = harness::connect(&cluster.url("postgres")).await;
    cron.batch_execute("CREATE EXTENSION pg_cron")
        .await
        .expect("pg_cron is preloaded in the test cluster");
    let other = cluster.create_db().await;
    let other_name = other
        .url
        .rsplit('/')
        .next()
        .and_then(|n| n.split('?').next())
        .unwrap()
        .to_owned();
    for (job, database) in [
        ("mvrefresh:mv_mine", "postgres"),
        ("mvrefresh:mv_theirs", other_name.as_str()),
        ("nightly", "postgres"),
    ] {
        cron.execute(
            "SELECT cron.schedule_in_database($1, '0 3 * * *', 'SELECT 1', $2)",
            &[&job, &database],
        )
        .await
        .unwrap();
    }
    harness::uninstall(&cron).await;
    let left: Vec<(String, String)> = cron
        .query(
            "SELECT jobname, database FROM cron.job ORDER BY jobname",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        left,
        [
            ("mvrefresh:mv_theirs".to_owned(), other_name),
            ("nightly".to_owned(), "postgres".to_owned()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capture_name_of_the_longest_length_keeps_every_trigger() {
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(harness::SCHEMA).await.unwrap();
    let name = "c".repeat(mvrefresh::config::MAX_CAPTURE_NAME);
    let config = harness::config(
        &db.url,
        &format!(
            "{}{}",
            harness::CAPTURE.replace("name = \"submissions\"", &format!("name = \"{name}\"")),
            harness::VIEW_COUNTS
        ),
    );
    harness::install(&config).await;
    harness::install(&config).await;
    let triggers = harness::texts(
        &c,
        "SELECT tgname FROM pg_trigger WHERE tgrelid = 'submissions'::regclass ORDER BY 1",
    )
    .await;
    assert_eq!(
        triggers,
        [
            format!("mvrefresh_capture_{name}"),
            format!("mvrefresh_capture_{name}_truncate")
        ]
    );
    harness::take_dirty(&c, None).await;
    c.batch_execute("TRUNCATE submissions").await.unwrap();
    assert_eq!(logged(&c).await, ["*"]);
    let report = mvrefresh::commands::check::check(&c, &config, "test")
        .await
        .unwrap();
    let texts: Vec<&str> = report.iter().map(|l| l.text.as_str()).collect();
    assert!(
        report.iter().any(|l| l.ok
            && l.text.contains(&format!(
                "capture {name} on submissions installed and current"
            ))),
        "{texts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_config_leaves_the_first_ones_pipeline_alone() {
    let (db, c, first) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    // The first pipeline has changes pending.
    harness::score(&c, 4, 1).await;
    let daemon = harness::Daemon::start(first.clone());
    harness::wait_for("the first pipeline's change collected", || async {
        c.query_one(
            "SELECT NOT EXISTS (SELECT FROM mvrefresh.dirty)
                AND EXISTS (SELECT FROM mvrefresh.pending WHERE key = '4')",
            &[],
        )
        .await
        .unwrap()
        .get::<_, bool>(0)
            || harness::counts_fresh(&c).await
    })
    .await;
    daemon.stop().await;
    // Another pipeline in the same database: its own table, capture, channel and view.
    c.batch_execute(
        "CREATE TABLE runs (id int PRIMARY KEY, done boolean);
         CREATE MATERIALIZED VIEW mv_runs AS SELECT count(*) AS n FROM runs WHERE done;
         CREATE UNIQUE INDEX ON mv_runs (n);",
    )
    .await
    .unwrap();
    let second = harness::config(
        &db.url,
        r#"
[[capture]]
name = "runs"
table = "runs"
channel = "run_done"
key = "id"
when = "done"
[[view]]
name = "mv_runs"
mode = "concurrently"
channels = ["run_done"]
"#,
    );
    let before = fingerprint(&c).await;
    harness::install(&second).await;
    let after = fingerprint(&c).await;
    for line in before.lines().filter(|l| {
        l.starts_with("trigger submissions")
            || l.starts_with("sub ")
            || l.starts_with("pending ")
            || l.starts_with("capture submissions")
    }) {
        assert!(after.contains(line), "lost: {line}\n{after}");
    }
    assert!(after.contains("capture runs"), "{after}");
    // The first pipeline's daemon still finds everything it had.
    let daemon = harness::Daemon::start(first);
    harness::wait_for("the first pipeline refreshed", || async {
        harness::counts_fresh(&c).await && harness::pending(&c, "mv_counts").await == 0
    })
    .await;
    daemon.stop().await;
    let report = mvrefresh::commands::check::check(&c, &second, "test")
        .await
        .unwrap();
    let texts: Vec<&str> = report.iter().map(|l| l.text.as_str()).collect();
    assert!(
        texts
            .iter()
            .any(|l| l.contains("installed but not in this config: capture submissions")),
        "{texts:?}"
    );
}

/// A trigger sees no row of a partition attached with rows, detached or dropped: the daemon
/// watches the partitions and marks everything, so the views follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_attached_detached_or_dropped_reach_the_views() {
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(harness::PARTITIONED_SCHEMA).await.unwrap();
    let config = harness::config(
        &db.url,
        &format!("{}{}", harness::CAPTURE, harness::VIEW_COUNTS),
    );
    harness::install(&config).await;
    harness::partitions_come_and_go(&c, &config).await;
}
