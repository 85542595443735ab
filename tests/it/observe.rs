//! Observability over real HTTP: `/metrics` moves with events, `/readyz` follows the database,
//! `/status` and the CLI agree, manual refresh needs the token, OTLP reaches a collector.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::{self, Cluster, Daemon};

/// A minimal HTTP/1.1 request: returns the status code and the body.
pub(crate) async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("connect to the admin server");
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (code, body)
}

pub(crate) async fn admin_addr(daemon: &Daemon) -> SocketAddr {
    let stats = daemon.stats.clone();
    harness::wait_some("the admin server to listen", || {
        let addr = *stats.http_addr.lock().unwrap();
        async move { addr }
    })
    .await
}

/// The value of the first series named `name` whose labels include every `labels` pair.
pub(crate) fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(series, _)| {
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|(_, v)| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_notifications_refreshes_and_reconnects() {
    let (_db, c, config) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    let addr = admin_addr(&daemon).await;
    let scrape = || async move { http(addr, "GET", "/metrics", None).await.1 };
    let view = [("view", "mv_counts")];
    let ok = [("view", "mv_counts"), ("outcome", "success")];
    harness::wait_for("the initial refresh in the metrics", || async move {
        metric(&scrape().await, "mvrefresh_refreshes_total", &ok).unwrap_or(0.0) >= 1.0
    })
    .await;
    let before = metric(&scrape().await, "mvrefresh_refreshes_total", &ok).unwrap();

    harness::score(&c, 1, 5).await;
    harness::score(&c, 2, 5).await;
    harness::wait_for("a refresh counted and nothing pending", || async move {
        let text = scrape().await;
        metric(&text, "mvrefresh_refreshes_total", &ok).unwrap_or(0.0) > before
            && metric(&text, "mvrefresh_pending_keys", &view) == Some(0.0)
    })
    .await;
    let text = scrape().await;
    let received = metric(
        &text,
        "mvrefresh_notifications_received_total",
        &[("channel", "submission_scored")],
    );
    assert!(received.unwrap_or(0.0) >= 1.0, "{text}");
    // Keys 1 and 2 were taken from the capture (once each, or more if scored across collects).
    assert!(
        metric(&text, "mvrefresh_collected_keys_total", &[]).unwrap_or(0.0) >= 2.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "mvrefresh_listener_connected", &[]),
        Some(1.0)
    );
    assert!(metric(&text, "mvrefresh_refresh_duration_seconds_count", &view).unwrap() >= 2.0);
    assert!(metric(&text, "mvrefresh_last_success_age_seconds", &view).unwrap() >= 0.0);
    assert_eq!(
        metric(&text, "mvrefresh_pending_oldest_age_seconds", &view),
        Some(0.0)
    );

    // A killed listener backend shows up as a reconnect.
    c.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE application_name = 'mvrefresh-listener' AND datname = current_database()",
        &[],
    )
    .await
    .unwrap();
    harness::wait_for("the reconnect in the metrics", || async move {
        let text = scrape().await;
        metric(&text, "mvrefresh_listener_reconnects_total", &[]).unwrap_or(0.0) >= 1.0
            && metric(&text, "mvrefresh_listener_connected", &[]) == Some(1.0)
    })
    .await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_database() {
    let cluster = Cluster::new();
    let (_db, _c, config) = harness::setup(&cluster, harness::VIEW_COUNTS).await;
    let daemon = Daemon::start(config);
    let addr = admin_addr(&daemon).await;
    let status = |path: &'static str| async move { http(addr, "GET", path, None).await.0 };
    harness::wait_for("ready", || async move { status("/readyz").await == 200 }).await;
    cluster.stop();
    harness::wait_for("unready while the database is down", || async move {
        status("/readyz").await == 503
    })
    .await;
    assert_eq!(status("/healthz").await, 200);
    cluster.start();
    harness::wait_for(
        "ready again",
        || async move { status("/readyz").await == 200 },
    )
    .await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_endpoint_matches_the_cli_and_what_happened() {
    let (_db, c, config) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    let daemon = Daemon::start(config.clone());
    daemon.wait_listening().await;
    let addr = admin_addr(&daemon).await;
    harness::score(&c, 4, 2).await;
    harness::wait_for("the change reflected", || harness::counts_fresh(&c)).await;
    harness::wait_for("nothing pending", || async {
        harness::pending(&c, "mv_counts").await == 0
    })
    .await;
    let (code, body) = http(addr, "GET", "/status", None).await;
    assert_eq!(code, 200, "{body}");
    let served: serde_json::Value = serde_json::from_str(&body).unwrap();
    let direct =
        serde_json::to_value(mvrefresh::status::status(&c, &config).await.unwrap()).unwrap();
    assert_eq!(served, direct);
    let v = &served["views"][0];
    assert_eq!(v["name"], "mv_counts");
    assert_eq!(v["mode"], "concurrently");
    assert_eq!(v["pending_keys"], 0);
    assert_eq!(v["consecutive_failures"], 0);
    assert!(v["last_success"].is_string(), "{v}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_refresh_needs_the_token() {
    let (db, c, _) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    const TOKEN: &str = "s3cret-0123456789abcdef-0123456789abcdef";
    let env = HashMap::from([("MVREFRESH_ADMIN_TOKEN".to_owned(), TOKEN.to_owned())]);
    let config = harness::config_with_env(
        &db.url,
        &format!("{}{}", harness::CAPTURE, harness::VIEW_COUNTS),
        &env,
    );
    assert!(
        !format!("{config:?}").contains(TOKEN),
        "the token leaks in Debug"
    );
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    let addr = admin_addr(&daemon).await;
    assert_eq!(http(addr, "POST", "/refresh", None).await.0, 401);
    assert_eq!(http(addr, "POST", "/refresh", Some("wrong")).await.0, 401);
    let (code, body) = http(addr, "POST", "/refresh/mv_nope", Some(TOKEN)).await;
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("mv_nope"), "{body}");
    let (code, body) = http(addr, "POST", "/refresh/mv_counts", Some(TOKEN)).await;
    assert_eq!(code, 202, "{body}");
    assert!(body.contains("mv_counts"), "{body}");
    harness::wait_for("the manual refresh in the history", || async {
        c.query_one(
            "SELECT count(*) FROM mvrefresh.refresh_history WHERE reason = 'manual' AND outcome = 'success'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
            == 1
    })
    .await;
    daemon.stop().await;

    // Without a token, manual refresh is off.
    let (_db2, _c2, config) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    let daemon = Daemon::start(config);
    let addr = admin_addr(&daemon).await;
    assert_eq!(
        http(addr, "POST", "/refresh", Some("anything")).await.0,
        404
    );
    daemon.stop().await;
}

/// A collector stand-in: answers 200 to every request and keeps the bodies.
async fn otlp_sink() -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let bodies: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let sink = bodies.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let sink = sink.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    let Ok(n) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if buf.len() < end + 4 + len {
                        continue;
                    }
                    sink.lock()
                        .unwrap()
                        .push(buf[end + 4..end + 4 + len].to_vec());
                    buf.drain(..end + 4 + len);
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                        .await;
                }
            });
        }
    });
    (addr, bodies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_export_reaches_a_collector() {
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    let (sink, bodies) = otlp_sink().await;
    let (db, c, _) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    let body = format!(
        "{}{}[telemetry]\notlp_endpoint = \"http://{sink}\"\nexport_interval = \"200ms\"\n",
        harness::CAPTURE,
        harness::VIEW_COUNTS
    );
    let daemon = Daemon::start(harness::config(&db.url, &body));
    daemon.wait_listening().await;
    harness::score(&c, 1, 1).await;
    let names = || {
        let mut names = Vec::new();
        for b in bodies.lock().unwrap().iter() {
            let request = ExportMetricsServiceRequest::decode(b.as_slice()).expect("protobuf");
            for rm in request.resource_metrics {
                for sm in rm.scope_metrics {
                    names.extend(sm.metrics.into_iter().map(|m| m.name));
                }
            }
        }
        names
    };
    harness::wait_for("mvrefresh.refreshes exported over OTLP", || {
        let found = names().iter().any(|n| n == "mvrefresh.refreshes");
        async move { found }
    })
    .await;
    assert!(names().iter().any(|n| n == "mvrefresh.listener.connected"));
    daemon.stop().await;
}
