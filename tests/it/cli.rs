//! The `mvrefresh` binary: exit codes, reports, and stopping on SIGTERM.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::harness::{self, Cluster};

const BIN: &str = env!("CARGO_BIN_EXE_mvrefresh");

pub(crate) fn write_config(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mvrefresh-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

pub(crate) fn mvrefresh(config: &PathBuf, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("MVREFRESH_DATABASE_URL")
        .output()
        .expect("run mvrefresh")
}

pub(crate) fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub(crate) fn config_text(url: &str, body: &str) -> String {
    format!(
        "[database]\nurl = \"{url}\"\n[debounce]\nquiet = \"100ms\"\nmax_wait = \"1s\"\n\
         [refresh]\nshutdown_deadline = \"1s\"\n[http]\nlisten = \"127.0.0.1:0\"\n{}{body}",
        harness::CAPTURE
    )
}

#[test]
fn a_bad_config_exits_78_naming_file_and_key() {
    let path = write_config(
        "bad.toml",
        "[database]\nurl = \"postgres://x/y\"\n[debounce]\nquiet = \"soon\"\n[[view]]\nname = \"v\"\nmode = \"blocking\"\n",
    );
    let out = mvrefresh(&path, &["check"]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    let msg = text(&out);
    assert!(msg.contains("bad.toml"), "{msg}");
    assert!(msg.contains("debounce.quiet"), "{msg}");

    let missing = mvrefresh(&PathBuf::from("/nonexistent/mvrefresh.toml"), &["check"]);
    assert_eq!(missing.status.code(), Some(78));
    assert!(text(&missing).contains("/nonexistent/mvrefresh.toml"));
}

#[test]
fn dry_run_prints_the_install_sql() {
    let path = write_config(
        "dry.toml",
        &config_text("postgres://nobody@127.0.0.1:1/none", harness::VIEW_COUNTS),
    );
    let out = mvrefresh(&path, &["install", "--dry-run"]);
    assert!(out.status.success(), "{}", text(&out));
    let sql = String::from_utf8_lossy(&out.stdout);
    assert!(sql.starts_with("BEGIN;"), "{sql}");
    assert!(sql.contains("pg_advisory_xact_lock"));
    assert!(sql.contains("CREATE SCHEMA IF NOT EXISTS mvrefresh"));
    assert!(sql.contains("CREATE OR REPLACE FUNCTION mvrefresh.mark_keys("));
    assert!(sql.contains("CREATE OR REPLACE FUNCTION mvrefresh.mark("));
    assert!(sql.contains("CREATE OR REPLACE TRIGGER %I AFTER INSERT OR UPDATE%s OR DELETE"));
    assert!(sql.contains("'mvrefresh_capture_submissions'"));
    assert!(sql.trim_end().ends_with("COMMIT;"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_check_refresh_status() {
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(harness::SCHEMA).await.unwrap();
    let path = write_config("ok.toml", &config_text(&db.url, harness::VIEW_COUNTS));

    let check = mvrefresh(&path, &["check"]);
    assert_eq!(
        check.status.code(),
        Some(1),
        "not installed yet: {}",
        text(&check)
    );
    assert!(
        text(&check).contains("mvrefresh install"),
        "{}",
        text(&check)
    );

    let install = mvrefresh(&path, &["install"]);
    assert!(install.status.success(), "{}", text(&install));
    let check = mvrefresh(&path, &["check"]);
    assert!(check.status.success(), "{}", text(&check));
    assert!(
        text(&check).contains("refresh order: mv_counts"),
        "{}",
        text(&check)
    );

    harness::score(&c, 3, 2).await;
    let status = mvrefresh(&path, &["status", "--json"]);
    assert!(status.status.success(), "{}", text(&status));
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["views"][0]["name"], "mv_counts");
    assert!(
        json["views"][0]["pending_keys"].as_i64().unwrap() >= 1,
        "{json}"
    );

    let refresh = mvrefresh(&path, &["refresh", "--all"]);
    assert!(refresh.status.success(), "{}", text(&refresh));
    assert!(harness::counts_fresh(&c).await);
    let status = mvrefresh(&path, &["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["views"][0]["pending_keys"], 0, "{json}");
    assert!(json["views"][0]["last_success"].is_string(), "{json}");

    let unknown = mvrefresh(&path, &["refresh", "mv_nope"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(text(&unknown).contains("mv_nope"));

    assert!(text(&check).contains("capture submissions on submissions installed and current"));
    assert!(text(&check).contains("pg_cron"), "{}", text(&check));
    // The capture in the config changed since the install.
    let changed = write_config(
        "changed.toml",
        &config_text(&db.url, harness::VIEW_COUNTS).replace("[\"score\"]", "[\"score\", \"note\"]"),
    );
    let check = mvrefresh(&changed, &["check"]);
    assert_eq!(check.status.code(), Some(1), "{}", text(&check));
    assert!(
        text(&check).contains("installed from a different configuration"),
        "{}",
        text(&check)
    );

    c.batch_execute("DROP INDEX mv_counts_challenge_id_idx")
        .await
        .unwrap();
    let check = mvrefresh(&path, &["check"]);
    assert_eq!(check.status.code(), Some(1), "{}", text(&check));
    assert!(
        text(&check).contains("problem: view mv_counts"),
        "{}",
        text(&check)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_refresh_exits_0_and_cancels_the_refresh() {
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(harness::SCHEMA).await.unwrap();
    c.batch_execute(harness::SLOW_SCHEMA).await.unwrap();
    let path = write_config("slow.toml", &config_text(&db.url, harness::VIEW_SLOW));
    let install = mvrefresh(&path, &["install"]);
    assert!(install.status.success(), "{}", text(&install));
    let mut daemon = harness::Reaper(Some(
        Command::new(BIN)
            .arg("--config")
            .arg(&path)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    harness::wait_for("the initial refresh", || async {
        harness::refreshes(&c, "mv_slow").await >= 1
    })
    .await;
    c.batch_execute("UPDATE knobs SET sleep_s = 600")
        .await
        .unwrap();
    harness::score(&c, 1, 1).await;
    harness::wait_some("a refresh to be running", || {
        harness::refreshing(&c, "mv_slow")
    })
    .await;
    let mut child = daemon.0.take().expect("the daemon process");
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + harness::PATIENCE;
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "mvrefresh did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    assert_eq!(status.code(), Some(0));
    harness::wait_for("the refresh to be cancelled server-side", || async {
        c.query_opt(
            "SELECT 1 FROM pg_stat_activity WHERE query LIKE 'REFRESH MATERIALIZED VIEW%'
               AND state = 'active' AND datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .is_none()
    })
    .await;
    // The change it did not finish is still pending for the next run.
    assert!(harness::pending(&c, "mv_slow").await >= 1);
}
