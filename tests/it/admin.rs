//! The admin server under abuse, over raw TCP: silent and half-sent requests are cut off,
//! connections beyond `[http] max_connections` are refused without growing anything, `/status`
//! shows row values only to the token's holder, and the token itself is checked before anything
//! starts.

use std::collections::HashMap;
use std::process::Command;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cli::{text, write_config};
use crate::harness::{self, Cluster, Daemon};
use crate::observe::{admin_addr, http, metric};

/// A token of the accepted length.
const TOKEN: &str = "9f2c4e6a8b0d1f3e5a7c9b1d3f5e7a9c0b2d4f6e8a1c3e5b7d9f1a3c5e7b9d0f";

/// Reads until the server closes the connection (a reset counts as closing); everything read.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(harness::PATIENCE, async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the server kept the connection open for {:?}",
        harness::PATIENCE
    );
    got
}

/// Reads one response with a `content-length` from a kept-alive connection.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.expect("read the response");
        assert!(n > 0, "closed before a whole response");
        got.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_owned())
                })
                .and_then(|v| v.parse().ok())
                .expect("a content-length");
            if body.len() >= length {
                return text;
            }
        }
    }
}

async fn connections(daemon: &Daemon) -> i64 {
    daemon.stats.http_connections.get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_half_sent_and_idle_connections_are_closed_by_the_server() {
    let (_db, _c, config) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    let daemon = Daemon::start(config);
    let addr = admin_addr(&daemon).await;

    // Connects and says nothing.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    // Half a request line.
    let mut partial = TcpStream::connect(addr).await.unwrap();
    partial.write_all(b"GET /heal").await.unwrap();
    // A whole request on a kept-alive connection, then nothing.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let answer = read_response(&mut idle).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    for (what, stream) in [
        ("silent", &mut silent),
        ("partial", &mut partial),
        ("idle", &mut idle),
    ] {
        let got = read_until_closed(stream).await;
        assert!(
            got.is_empty(),
            "{what}: nothing more is sent before closing: {}",
            String::from_utf8_lossy(&got)
        );
    }
    harness::wait_for("every admin connection closed", || async {
        connections(&daemon).await == 0
    })
    .await;
    assert_eq!(http(addr, "GET", "/healthz", None).await.0, 200);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_refused_and_healthz_answers_once_they_go() {
    let (_db, _c, mut config) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    config.http.max_connections = 2;
    let daemon = Daemon::start(config);
    let addr = admin_addr(&daemon).await;

    // Two slow requests take both slots: headers started, never finished.
    let mut hanging = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
            .await
            .unwrap();
        hanging.push(s);
    }
    harness::wait_for("both slots taken", || async {
        connections(&daemon).await == 2
    })
    .await;

    // Many more while they hang: each is answered 503 and closed; nothing grows.
    for i in 0..20 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let got = String::from_utf8_lossy(&read_until_closed(&mut s).await).into_owned();
        assert!(got.starts_with("HTTP/1.1 503 "), "connection {i}: {got}");
        assert!(got.contains("too many connections"), "{got}");
        assert_eq!(connections(&daemon).await, 2);
    }
    assert_eq!(daemon.stats.http_refused.get(), 20);

    // The server ends the slow requests itself (header read timeout)...
    for s in &mut hanging {
        assert!(read_until_closed(s).await.is_empty());
    }
    // ...and answers again.
    harness::wait_for(
        "/healthz answering once the slow requests are gone",
        || async { http(addr, "GET", "/healthz", None).await.0 == 200 },
    )
    .await;
    let metrics = http(addr, "GET", "/metrics", None).await.1;
    assert_eq!(
        metric(&metrics, "mvrefresh_http_refused_total", &[]),
        Some(20.0),
        "{metrics}"
    );
    daemon.stop().await;
}

/// `mv_dup` fails to refresh once two scored rows share a challenge: its unique index is
/// rebuilt and PostgreSQL says which key is duplicated, in the error's DETAIL.
const DUP_SCHEMA: &str = "
CREATE MATERIALIZED VIEW mv_dup AS
    SELECT challenge_id FROM submissions WHERE status = 'scored';
CREATE UNIQUE INDEX mv_dup_key ON mv_dup (challenge_id);
";

const VIEW_DUP: &str = r#"
[[view]]
name = "mv_dup"
mode = "blocking"
channels = ["submission_scored"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_row_values_of_errors_only_with_the_token() {
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(harness::SCHEMA).await.unwrap();
    c.batch_execute(DUP_SCHEMA).await.unwrap();
    let env = HashMap::from([("MVREFRESH_ADMIN_TOKEN".to_owned(), TOKEN.to_owned())]);
    let config =
        harness::config_with_env(&db.url, &format!("{}{VIEW_DUP}", harness::CAPTURE), &env);
    harness::install(&config).await;
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    let addr = admin_addr(&daemon).await;

    harness::score(&c, 424242, 2).await;
    harness::wait_for("the failed refresh in the history", || async {
        c.query_one(
            "SELECT count(*) FROM mvrefresh.refresh_history
             WHERE view_name = 'mv_dup' AND outcome = 'failure' AND error LIKE '%424242%'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
            >= 1
    })
    .await;

    let last_error = |token: Option<&'static str>| async move {
        let (code, body) = http(addr, "GET", "/status", token).await;
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["views"][0]["last_error"]
            .as_str()
            .unwrap_or_else(|| panic!("no last_error: {body}"))
            .to_owned()
    };
    for token in [None, Some("wrong"), Some(&TOKEN[1..])] {
        let shown = last_error(token).await;
        assert!(
            shown.contains("could not create unique index"),
            "{token:?}: {shown}"
        );
        assert!(shown.contains("(detail hidden)"), "{token:?}: {shown}");
        assert!(!shown.contains("424242"), "{token:?}: {shown}");
    }
    let full = last_error(Some(TOKEN)).await;
    assert!(
        full.contains("(detail: Key (challenge_id)=(424242) is duplicated.)"),
        "{full}"
    );
    daemon.stop().await;
}

fn run_daemon(config: &std::path::Path, token: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mvrefresh"));
    cmd.arg("--config")
        .arg(config)
        .arg("run")
        .env_remove("MVREFRESH_DATABASE_URL")
        .env_remove("MVREFRESH_ADMIN_TOKEN");
    if let Some(t) = token {
        cmd.env("MVREFRESH_ADMIN_TOKEN", t);
    }
    cmd.output().expect("run mvrefresh")
}

#[test]
fn the_daemon_refuses_a_weak_token_or_an_open_listen_without_one() {
    // Neither check needs the database: both come before any connection.
    let body = "[database]\nurl = \"postgres://nobody@127.0.0.1:1/none\"\n\
                [[view]]\nname = \"mv_counts\"\nmode = \"concurrently\"\n";
    let open = write_config(
        "open.toml",
        &format!("[http]\nlisten = \"0.0.0.0:0\"\n{body}"),
    );
    let out = run_daemon(&open, None);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(78), "{said}");
    assert!(said.contains("MVREFRESH_ADMIN_TOKEN"), "{said}");
    assert!(said.contains("http.listen"), "{said}");

    for weak in ["s3cret-but-short", "CHANGE-ME"] {
        let out = run_daemon(&open, Some(weak));
        let said = text(&out);
        assert_eq!(out.status.code(), Some(78), "{said}");
        assert!(said.contains("MVREFRESH_ADMIN_TOKEN"), "{said}");
        assert!(said.contains("openssl rand -hex 32"), "{said}");
        assert!(!said.contains(weak), "the token is printed: {said}");
    }
}
