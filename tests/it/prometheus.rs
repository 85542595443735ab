//! A real Prometheus (Debian's `prometheus` package; `scripts/test` installs it) scraping a
//! running daemon: every PromQL expression of the Grafana dashboard returns data after a few
//! refreshes (a panel whose query returns nothing is a defect).

use std::net::SocketAddr;
use std::process::{Command, Stdio};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{self, Cluster, Daemon, Reaper};

/// `GET /api/v1/query` on Prometheus: the result vector, or `None` while it cannot answer.
async fn query(prometheus: SocketAddr, promql: &str) -> Option<Vec<Value>> {
    let encoded: String = promql
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let mut stream = TcpStream::connect(prometheus).await.ok()?;
    let request = format!("GET /api/v1/query?query={encoded} HTTP/1.0\r\nHost: test\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8_lossy(&response);
    let (_, body) = text.split_once("\r\n\r\n")?;
    let json: Value = serde_json::from_str(body).ok()?;
    assert_eq!(json["status"], "success", "{promql}: {json}");
    json["data"]["result"].as_array().cloned()
}

/// Every `expr` of the dashboard's panels.
fn dashboard_queries() -> Vec<String> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/mvrefresh-dashboard.json"
    ))
    .unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(e) = target["expr"].as_str() {
                exprs.push(e.to_owned());
            }
        }
    }
    assert!(exprs.len() >= 10, "{exprs:?}");
    exprs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let (_db, c, config) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    let metrics = daemon
        .stats
        .http_addr
        .lock()
        .unwrap()
        .expect("the admin server");

    let dir = std::env::temp_dir().join(format!(
        "mvrefresh-prometheus-{}-{}",
        std::process::id(),
        harness::unique()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: mvrefresh\n    static_configs:\n      - targets: ['{metrics}']\n"
        ),
    )
    .unwrap();
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let _prometheus = Reaper(Some(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (package prometheus; scripts/test installs it)"),
    ));
    harness::wait_for("Prometheus to scrape the daemon", || async {
        query(listen, "up{job=\"mvrefresh\"} == 1")
            .await
            .is_some_and(|r| !r.is_empty())
    })
    .await;
    // A few refreshes while it scrapes.
    for challenge in 1..=3 {
        harness::score(&c, challenge, 2).await;
        harness::wait_for("mv_counts to follow", || harness::counts_fresh(&c)).await;
    }
    for promql in dashboard_queries() {
        let result = harness::wait_some(&format!("data for `{promql}`"), || async {
            query(listen, &promql).await.filter(|r| {
                !r.is_empty() && r.iter().all(|s| s["value"][1].as_str() != Some("NaN"))
            })
        })
        .await;
        assert!(!result.is_empty());
    }
    daemon.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
