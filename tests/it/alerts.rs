//! Alerts end to end: a real local HTTP sink (wiremock) receives what the daemon posts, a view
//! made to fail through a knob table, and real pg_cron in the test cluster. Every wait is on
//! observable state (the sink's requests, the history, counters), never a fixed sleep.

use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use mvrefresh::config::{Config, Secret};
use serde_json::Value;
use sha2::Sha256;
use tokio_postgres::Client;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::harness::{self, Cluster, Daemon, TestDb};
use crate::proxy::Proxy;

/// A view whose refresh raises while `knobs.fail` is true.
const FRAGILE: &str = "
CREATE TABLE knobs (fail boolean NOT NULL);
INSERT INTO knobs VALUES (false);
CREATE FUNCTION knob_check() RETURNS int LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF (SELECT fail FROM knobs) THEN
        RAISE EXCEPTION 'the knob says fail';
    END IF;
    RETURN 0;
END $$;
CREATE MATERIALIZED VIEW mv_fragile AS
    SELECT challenge_id, count(*) AS n, max(z.ok) AS ok
    FROM submissions, (SELECT knob_check() AS ok) z
    WHERE status = 'scored' GROUP BY challenge_id;
CREATE UNIQUE INDEX ON mv_fragile (challenge_id);
";

fn fragile_view(extra: &str) -> String {
    format!(
        "[[view]]\nname = \"mv_fragile\"\nmode = \"concurrently\"\nchannels = [\"submission_scored\"]\n{extra}"
    )
}

/// A sink answering 200 to every POST /hook.
pub(crate) async fn sink() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    server
}

/// A database with [`harness::SCHEMA`] and [`FRAGILE`], mvrefresh installed with `views`, and
/// a config whose alerts go to `sink` with `alert` settings.
async fn setup(sink: &MockServer, alert: &str, views: &str) -> (TestDb, Client, Config) {
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(harness::SCHEMA).await.unwrap();
    c.batch_execute(FRAGILE).await.unwrap();
    let body = format!(
        "{}{alert}\n{}{views}",
        alert_section(sink),
        harness::CAPTURE
    );
    let config = harness::config(&db.url, &body);
    harness::install(&config).await;
    (db, c, config)
}

/// An `[alert]` section posting to `sink`'s /hook, retrying quickly.
pub(crate) fn alert_section(sink: &MockServer) -> String {
    format!(
        "[alert]\nwebhook_url = \"{}/hook\"\nretry_min = \"20ms\"\nretry_max = \"200ms\"\n",
        sink.uri()
    )
}

/// Every JSON alert the sink received, in order.
async fn received(sink: &MockServer) -> Vec<Value> {
    sink.received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .filter_map(|r| serde_json::from_slice(&r.body).ok())
        .collect()
}

/// The alerts of `kind` about `subject`.
pub(crate) async fn alerts_of(sink: &MockServer, kind: &str, subject: &str) -> Vec<Value> {
    received(sink)
        .await
        .into_iter()
        .filter(|a| a["kind"] == kind && a["subject"] == subject)
        .collect()
}

async fn wait_alert(sink: &MockServer, kind: &str, subject: &str) -> Value {
    harness::wait_some(&format!("a {kind} alert about {subject}"), || async {
        alerts_of(sink, kind, subject).await.into_iter().next()
    })
    .await
}

async fn history(c: &Client, view: &str, outcome: &str) -> i64 {
    c.query_one(
        "SELECT count(*) FROM mvrefresh.refresh_history WHERE view_name = $1 AND outcome = $2",
        &[&view, &outcome],
    )
    .await
    .unwrap()
    .get(0)
}

async fn set_fail(c: &Client, fail: bool) {
    c.execute("UPDATE knobs SET fail = $1", &[&fail])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_view_alerts_once_then_recovers_with_a_verified_signature() {
    let sink = sink().await;
    let (_db, c, mut config) = setup(
        &sink,
        "repeat_after = \"1h\"\ncircuit_failures = 0",
        &fragile_view(""),
    )
    .await;
    config.alert.secret = Some(Secret::new("s3cret"));
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    harness::wait_for("the first refresh", || async {
        history(&c, "mv_fragile", "success").await >= 1
    })
    .await;

    set_fail(&c, true).await;
    harness::score(&c, 1, 1).await;
    let failed = wait_alert(&sink, "refresh_failed", "view:mv_fragile").await;
    harness::wait_for("many failed attempts", || async {
        history(&c, "mv_fragile", "failure").await >= 6
    })
    .await;
    assert_eq!(
        alerts_of(&sink, "refresh_failed", "view:mv_fragile")
            .await
            .len(),
        1,
        "repeats within repeat_after are suppressed"
    );
    // A failure is in the history before the main loop has taken its outcome: wait for the
    // counter rather than read it at once.
    let stats = daemon.stats.clone();
    harness::wait_for("the repeats to be counted as suppressed", || {
        let n = stats.alerts_suppressed.get();
        async move { n >= 5 }
    })
    .await;
    assert_eq!(failed["schema"], "mvrefresh.alert/v1");
    assert_eq!(failed["status"], "firing");
    assert_eq!(failed["view"], "mv_fragile");
    assert_eq!(failed["consecutive_failures"], 1);
    assert!(failed["first_failure_at"].is_string());
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("the knob says fail"), "{error}");

    set_fail(&c, false).await;
    let recovered = wait_alert(&sink, "refresh_recovered", "view:mv_fragile").await;
    assert_eq!(recovered["status"], "resolved");
    assert!(recovered["consecutive_failures"].as_u64().unwrap() >= 6);
    assert_eq!(recovered["first_failure_at"], failed["first_failure_at"]);
    harness::score(&c, 2, 1).await;
    harness::wait_for("a later refresh", || async {
        history(&c, "mv_fragile", "success").await >= 3
    })
    .await;
    assert_eq!(
        alerts_of(&sink, "refresh_failed", "view:mv_fragile")
            .await
            .len(),
        1
    );
    assert_eq!(
        alerts_of(&sink, "refresh_recovered", "view:mv_fragile")
            .await
            .len(),
        1
    );

    // Every request is signed: HMAC-SHA256 of the exact body with the secret.
    let requests = sink.received_requests().await.unwrap();
    assert!(requests.len() >= 2);
    for r in &requests {
        let header = r.headers["x-mvrefresh-signature"].to_str().unwrap();
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(b"s3cret").unwrap();
        mac.update(&r.body);
        let hex = header.strip_prefix("sha256=").expect("sha256= prefix");
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        mac.verify_slice(&bytes).expect("the signature verifies");
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_answering_500_then_200_gets_the_alert_after_retries() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(200))
        .with_priority(2)
        .mount(&server)
        .await;
    let (_db, c, config) = setup(&server, "circuit_failures = 0", &fragile_view("")).await;
    set_fail(&c, true).await;
    let daemon = Daemon::start(config);
    let stats = daemon.stats.clone();
    harness::wait_for("the alert to be delivered", || {
        let sent = stats.alerts_sent.get();
        async move { sent >= 1 }
    })
    .await;
    let attempts = alerts_of(&server, "refresh_failed", "view:mv_fragile").await;
    assert!(attempts.len() >= 3, "two 500s, then the 200: {attempts:?}");
    assert!(
        attempts[..3].iter().all(|a| a["id"] == attempts[0]["id"]),
        "the same alert was retried"
    );
    assert_eq!(daemon.stats.alerts_failed.get(), 0);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_webhook_does_not_delay_refreshes() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(3600)))
        .mount(&server)
        .await;
    let (_db, c, config) = setup(
        &server,
        "timeout = \"2s\"\ncircuit_failures = 0",
        &format!("{}{}", fragile_view(""), harness::VIEW_COUNTS),
    )
    .await;
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    set_fail(&c, true).await;
    harness::score(&c, 1, 1).await;
    harness::wait_for("the alert to reach the hanging sink", || async {
        !alerts_of(&server, "refresh_failed", "view:mv_fragile")
            .await
            .is_empty()
    })
    .await;
    // While the delivery hangs, refreshes go on: the healthy view follows new changes, and the
    // fragile one recovers.
    for round in 0..3 {
        harness::score(&c, 10 + round, 2).await;
        harness::wait_for("mv_counts to follow", || harness::counts_fresh(&c)).await;
    }
    set_fail(&c, false).await;
    let before = history(&c, "mv_fragile", "success").await;
    harness::wait_for("mv_fragile to refresh again", || async {
        history(&c, "mv_fragile", "success").await > before
    })
    .await;
    assert_eq!(
        daemon.stats.alerts_sent.get(),
        0,
        "the sink never answered, yet refreshes went on"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_view_alerts_and_clears() {
    let sink = sink().await;
    let (_db, c, config) = setup(
        &sink,
        "circuit_failures = 0",
        &fragile_view("max_staleness = \"1s\"\n"),
    )
    .await;
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    harness::wait_for("the first refresh", || async {
        history(&c, "mv_fragile", "success").await >= 1
    })
    .await;
    set_fail(&c, true).await;
    harness::score(&c, 1, 1).await;
    let stale = wait_alert(&sink, "view_stale", "stale:mv_fragile").await;
    assert_eq!(stale["view"], "mv_fragile");
    assert!(
        stale["details"]["oldest_change_age_seconds"]
            .as_f64()
            .unwrap()
            > 1.0
    );
    assert_eq!(stale["details"]["max_staleness_seconds"], 1.0);
    assert!(
        stale["details"]["since_last_success_seconds"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    set_fail(&c, false).await;
    let fresh = wait_alert(&sink, "view_fresh", "stale:mv_fragile").await;
    assert_eq!(fresh["status"], "resolved");
    assert_eq!(
        alerts_of(&sink, "view_stale", "stale:mv_fragile")
            .await
            .len(),
        1
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_circuit_opens_after_n_failures_and_closes_on_success() {
    let sink = sink().await;
    let (_db, c, config) = setup(
        &sink,
        "circuit_failures = 3\ncircuit_probe_min = \"200ms\"\ncircuit_probe_max = \"400ms\"",
        &fragile_view(""),
    )
    .await;
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    harness::wait_for("the first refresh", || async {
        history(&c, "mv_fragile", "success").await >= 1
    })
    .await;
    set_fail(&c, true).await;
    harness::score(&c, 1, 1).await;
    let opened = wait_alert(&sink, "circuit_opened", "circuit:mv_fragile").await;
    assert_eq!(opened["consecutive_failures"], 3);
    assert_eq!(opened["view"], "mv_fragile");
    assert!(opened["details"]["next_probe_in_seconds"].as_f64().unwrap() > 0.0);
    // Probes go on while it is open (no more circuit_opened alerts).
    harness::wait_for("a few probes", || async {
        history(&c, "mv_fragile", "failure").await >= 5
    })
    .await;
    assert_eq!(daemon.stats.circuits_opened.get(), 1);
    set_fail(&c, false).await;
    let closed = wait_alert(&sink, "circuit_closed", "circuit:mv_fragile").await;
    assert_eq!(closed["status"], "resolved");
    wait_alert(&sink, "refresh_recovered", "view:mv_fragile").await;
    assert_eq!(
        alerts_of(&sink, "circuit_opened", "circuit:mv_fragile")
            .await
            .len(),
        1
    );
    daemon.stop().await;
}

/// Creates pg_cron in the cluster's `postgres` database once (tests run in parallel).
async fn ensure_pg_cron(cluster: &Cluster) -> Client {
    let admin = harness::connect(&cluster.url("postgres")).await;
    admin
        .batch_execute(
            "BEGIN; SELECT pg_advisory_xact_lock(1836479078, 1);
             CREATE EXTENSION IF NOT EXISTS pg_cron; COMMIT;",
        )
        .await
        .expect("pg_cron is preloaded in the test cluster");
    admin
}

/// A run of `jobid` as pg_cron records it, returning its runid.
async fn insert_run(cron: &Client, jobid: i64, db: &str, status: &str, message: &str) -> i64 {
    cron.query_one(
        "INSERT INTO cron.job_run_details
             (jobid, job_pid, database, username, command, status, return_message, start_time, end_time)
         VALUES ($1, 0, $2, 'postgres', 'SELECT 1/0', $3, $4, now(), now())
         RETURNING runid",
        &[&jobid, &db, &status, &message],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_pg_cron_runs_alert_once_each_even_across_a_restart() {
    let cluster = Cluster::shared();
    let cron = ensure_pg_cron(cluster).await;
    let sink = sink().await;
    let (db, _c, config) = setup(&sink, "", harness::VIEW_COUNTS).await;
    let dbname = db
        .url
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    let jobname = format!("it_fail_{dbname}");
    let mut config = config;
    config.pg_cron.database_url = Some(Secret::new(cluster.url("postgres")));
    config.pg_cron.poll_interval = Duration::from_millis(100);

    let daemon = Daemon::start(config.clone());
    let stats = daemon.stats.clone();
    harness::wait_for("the watch's first poll (cursor made)", || {
        let n = stats.pg_cron_polls.get();
        async move { n >= 1 }
    })
    .await;
    // A real job that fails every minute, run by pg_cron itself.
    let jobid: i64 = cron
        .query_one(
            "SELECT cron.schedule_in_database($1, '* * * * *', 'SELECT 1/0', $2)",
            &[&jobname, &dbname],
        )
        .await
        .unwrap()
        .get(0);
    // Runs as pg_cron records them, including its two messages for runs that never finished.
    let failed = insert_run(&cron, jobid, &dbname, "failed", "ERROR: synthetic failure").await;
    let timeout = insert_run(&cron, jobid, &dbname, "failed", "job startup timeout").await;
    let running = insert_run(&cron, jobid, &dbname, "running", "").await;
    let restarted = insert_run(&cron, jobid, &dbname, "failed", "server restarted").await;
    let ok = insert_run(&cron, jobid, &dbname, "succeeded", "SELECT 1").await;

    let ours = |all: Vec<Value>| -> Vec<i64> {
        all.into_iter()
            .filter(|a| a["kind"] == "pg_cron_job_failed" && a["details"]["jobname"] == jobname)
            .map(|a| a["details"]["runid"].as_i64().unwrap())
            .collect()
    };
    harness::wait_for("three failed runs to alert", || async {
        ours(received(&sink).await).len() >= 3
    })
    .await;
    let mut seen = ours(received(&sink).await);
    seen.sort();
    assert_eq!(seen, vec![failed, timeout, restarted]);
    let timeout_alert = received(&sink)
        .await
        .into_iter()
        .find(|a| a["details"]["runid"] == timeout)
        .unwrap();
    assert_eq!(timeout_alert["error"], "job startup timeout");
    assert_eq!(timeout_alert["status"], "firing");
    daemon.stop().await;

    // A new daemon: the cursor (with the still-running run below it) is in the database.
    let daemon = Daemon::start(config);
    let stats = daemon.stats.clone();
    harness::wait_for("the new daemon's polls", || {
        let n = stats.pg_cron_polls.get();
        async move { n >= 3 }
    })
    .await;
    cron.execute(
        "UPDATE cron.job_run_details SET status = 'failed', return_message = 'ERROR: late failure'
         WHERE runid = $1",
        &[&running],
    )
    .await
    .unwrap();
    harness::wait_for("the run that finished late to alert", || async {
        ours(received(&sink).await).contains(&running)
    })
    .await;
    // pg_cron's own run of the job fails too (it runs at the start of every minute).
    harness::wait_for("a real pg_cron run to fail and alert", || async {
        received(&sink).await.iter().any(|a| {
            a["details"]["jobname"] == jobname
                && a["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("division by zero"))
        })
    })
    .await;
    let _ = ok;
    let mut all = ours(received(&sink).await);
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n, "no run alerted twice: {all:?}");
    cron.execute("SELECT cron.unschedule($1::bigint)", &[&jobid])
        .await
        .unwrap();
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_pg_cron_registers_updates_and_removes_jobs() {
    let cluster = Cluster::shared();
    let cron = ensure_pg_cron(cluster).await;
    let db = cluster.create_db().await;
    let c = db.client().await;
    c.batch_execute(harness::SCHEMA).await.unwrap();
    let dbname = db
        .url
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    let with_schedule = |schedule: &str| {
        let mut config = harness::config(
            &db.url,
            &format!(
                "{}{}schedule = \"{schedule}\"\n",
                harness::CAPTURE,
                harness::VIEW_COUNTS
            ),
        );
        config.pg_cron.database_url = Some(Secret::new(cluster.url("postgres")));
        config
    };
    let jobs =
        || async {
            cron.query(
            "SELECT jobname, schedule, command FROM cron.job WHERE database = $1 ORDER BY jobname",
            &[&dbname],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1), r.get::<_, String>(2)))
        .collect::<Vec<_>>()
        };
    let install = |config: Config| async move {
        let mut client = harness::connect(&cluster.url("postgres")).await;
        mvrefresh::pgcron::install_jobs(&mut client, &config, &dbname_of(&config)).await
    };

    install(with_schedule("5m")).await.unwrap();
    install(with_schedule("5m")).await.unwrap();
    let first = jobs().await;
    assert_eq!(
        first,
        vec![(
            "mvrefresh:mv_counts".to_owned(),
            "*/5 * * * *".to_owned(),
            "REFRESH MATERIALIZED VIEW CONCURRENTLY \"mv_counts\"".to_owned()
        )],
        "one job, however often installed"
    );
    // The job's command is valid in the view's database.
    c.batch_execute(&first[0].2).await.unwrap();

    install(with_schedule("2h")).await.unwrap();
    assert_eq!(
        jobs().await[0].1,
        "0 */2 * * *",
        "the schedule follows the config"
    );

    let err = install(with_schedule("7m")).await.unwrap_err().to_string();
    assert!(err.contains("view[0].schedule (mv_counts)"), "{err}");

    let mut without = harness::counts_config(&db.url);
    without.pg_cron.database_url = Some(Secret::new(cluster.url("postgres")));
    install(without).await.unwrap();
    assert!(
        jobs().await.is_empty(),
        "a view without schedule has no job"
    );
}

fn dbname_of(config: &Config) -> String {
    mvrefresh::db::Db::new(&config.database).unwrap().dbname()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_test_alert_posts_a_signed_test_alert_without_printing_the_url() {
    let sink = sink().await;
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(harness::SCHEMA).await.unwrap();
    let text = format!(
        "[database]\nurl = \"{}\"\n{}{}",
        db.url,
        harness::CAPTURE,
        harness::VIEW_COUNTS
    );
    let dir = std::env::temp_dir().join(format!("mvrefresh-alert-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("check.toml");
    std::fs::write(&file, text).unwrap();
    let url = format!("{}/hook", sink.uri());
    let hook = url.clone();
    // The sink runs on this runtime: the binary is waited for off its worker threads.
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_mvrefresh"))
            .arg("--config")
            .arg(&file)
            .args(["check", "--test-alert"])
            .env_remove("MVREFRESH_DATABASE_URL")
            .env("MVREFRESH_ALERT_WEBHOOK_URL", &hook)
            .env("MVREFRESH_ALERT_SECRET", "s3cret")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        printed.contains("ok: alert webhook accepted a test alert (signed)"),
        "{printed}"
    );
    assert!(!printed.contains(&url), "{printed}");
    assert!(!printed.contains("s3cret"), "{printed}");
    let got = received(&sink).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["kind"], "test");
    assert_eq!(got[0]["status"], "test");
    let request = &sink.received_requests().await.unwrap()[0];
    assert!(request.headers.contains_key("x-mvrefresh-signature"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_down_too_long_alerts_and_recovers() {
    let sink = sink().await;
    let (db, _c, _) = setup(&sink, "", harness::VIEW_COUNTS).await;
    let proxy = Proxy::start(db.port).await;
    let config = harness::config(
        &db.url_via(proxy.port),
        &format!(
            "[alert]\nwebhook_url = \"{}/hook\"\nlistener_down_after = \"300ms\"\n{}{}",
            sink.uri(),
            harness::CAPTURE,
            harness::VIEW_COUNTS
        ),
    );
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    proxy.refuse(true);
    proxy.cut();
    let down = wait_alert(&sink, "listener_down", "listener").await;
    assert_eq!(down["status"], "firing");
    assert!(down["details"]["down_seconds"].as_f64().unwrap() >= 0.3);
    assert!(down["error"].is_string());
    proxy.refuse(false);
    let up = wait_alert(&sink, "listener_recovered", "listener").await;
    assert_eq!(up["status"], "resolved");
    assert_eq!(up["first_failure_at"], down["first_failure_at"]);
    assert_eq!(alerts_of(&sink, "listener_down", "listener").await.len(), 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pg_cron_job_without_success_within_max_staleness_alerts_and_recovers() {
    let cluster = Cluster::shared();
    let cron = ensure_pg_cron(cluster).await;
    let sink = sink().await;
    let view = format!(
        "{}schedule = \"1m\"\nmax_staleness = \"1s\"\n",
        harness::VIEW_COUNTS
    );
    let (db, _c, mut config) = setup(&sink, "", &view).await;
    config.pg_cron.database_url = Some(Secret::new(cluster.url("postgres")));
    config.pg_cron.poll_interval = Duration::from_millis(100);
    let dbname = dbname_of(&config);
    let mut client = harness::connect(&cluster.url("postgres")).await;
    mvrefresh::pgcron::install_jobs(&mut client, &config, &dbname)
        .await
        .unwrap();
    let jobid: i64 = cron
        .query_one(
            "SELECT jobid FROM cron.job WHERE jobname = 'mvrefresh:mv_counts' AND database = $1",
            &[&dbname],
        )
        .await
        .unwrap()
        .get(0);
    let run = |status: &'static str, offset: &'static str| {
        let cron = &cron;
        let dbname = dbname.clone();
        async move {
            cron.execute(
                &format!(
                    "INSERT INTO cron.job_run_details
                         (jobid, job_pid, database, username, command, status, return_message,
                          start_time, end_time)
                     VALUES ($1, 0, $2, 'postgres', 'x', $3, 'synthetic',
                             now() + interval '{offset}', now() + interval '{offset}')"
                ),
                &[&jobid, &dbname, &status],
            )
            .await
            .unwrap();
        }
    };
    run("failed", "-10 seconds").await;
    let daemon = Daemon::start(config);
    let late = wait_alert(&sink, "pg_cron_job_late", "pg_cron_job:mvrefresh:mv_counts").await;
    assert_eq!(late["view"], "mv_counts");
    assert_eq!(late["details"]["jobname"], "mvrefresh:mv_counts");
    assert_eq!(late["details"]["max_staleness_seconds"], 1.0);
    // A success recorded as just now (an hour ahead, so it stays recent for the whole test).
    run("succeeded", "1 hour").await;
    let ok = wait_alert(
        &sink,
        "pg_cron_job_recovered",
        "pg_cron_job:mvrefresh:mv_counts",
    )
    .await;
    assert_eq!(ok["status"], "resolved");
    assert_eq!(
        alerts_of(&sink, "pg_cron_job_late", "pg_cron_job:mvrefresh:mv_counts")
            .await
            .len(),
        1
    );
    let _ = db;
    cron.execute("SELECT cron.unschedule($1::bigint)", &[&jobid])
        .await
        .unwrap();
    daemon.stop().await;
}

/// Runs the binary with `args` on `config_text`, off the runtime's worker threads.
async fn run_cli(config_text: String, args: &'static [&'static str]) -> (Option<i32>, String) {
    tokio::task::spawn_blocking(move || {
        let dir = std::env::temp_dir().join(format!("mvrefresh-alert-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(format!("{}.toml", harness::unique()));
        std::fs::write(&file, config_text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mvrefresh"))
            .arg("--config")
            .arg(&file)
            .args(args)
            .env_remove("MVREFRESH_DATABASE_URL")
            .env_remove("MVREFRESH_ALERT_WEBHOOK_URL")
            .env_remove("MVREFRESH_PG_CRON_DATABASE_URL")
            .output()
            .unwrap();
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_pg_cron_dry_run_prints_the_jobs_and_names_a_bad_schedule() {
    let cluster = Cluster::shared();
    let db = cluster.create_db().await;
    let text = |schedule: &str| {
        format!(
            "[database]\nurl = \"{}\"\n[pg_cron]\ndatabase_url = \"{}\"\n{}{}schedule = \"{schedule}\"\n",
            db.url,
            cluster.url("postgres"),
            harness::CAPTURE,
            harness::VIEW_COUNTS
        )
    };
    let (code, out) = run_cli(text("5m"), &["install", "--pg-cron", "--dry-run"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(
            "cron.schedule_in_database('mvrefresh:mv_counts', '*/5 * * * *', \
             'REFRESH MATERIALIZED VIEW CONCURRENTLY \"mv_counts\"'"
        ),
        "{out}"
    );
    let (code, out) = run_cli(text("7m"), &["install", "--pg-cron", "--dry-run"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("view[0].schedule (mv_counts)"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slack_format_posts_one_text_line() {
    let sink = sink().await;
    let (_db, c, config) = setup(
        &sink,
        "format = \"slack\"\ncircuit_failures = 0",
        &fragile_view(""),
    )
    .await;
    set_fail(&c, true).await;
    let daemon = Daemon::start(config);
    let text = harness::wait_some("a Slack message", || async {
        received(&sink)
            .await
            .into_iter()
            .find_map(|m| m["text"].as_str().map(str::to_owned))
    })
    .await;
    assert!(text.contains("refresh_failed view:mv_fragile"), "{text}");
    assert!(text.contains("the knob says fail"), "{text}");
    let first = &received(&sink).await[0];
    assert_eq!(
        first.as_object().unwrap().keys().collect::<Vec<_>>(),
        vec!["text"]
    );
    daemon.stop().await;
}
