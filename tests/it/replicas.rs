//! Three daemons (real processes) on one database, one killed with SIGKILL mid-refresh: no view
//! is refreshed twice at once, every change is reflected, and the work is not multiplied by the
//! number of replicas.

use std::process::{Child, Command, Stdio};

use tokio_postgres::Client;

use crate::harness::{self, Cluster};

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {}", child.id());
}

async fn slow_fresh(c: &Client) -> bool {
    c.query_one(
        "WITH live AS (SELECT challenge_id, count(*) AS n FROM submissions
                       WHERE status = 'scored' GROUP BY challenge_id)
         SELECT NOT EXISTS (SELECT * FROM live EXCEPT SELECT * FROM mv_slow)
            AND NOT EXISTS (SELECT * FROM mv_slow EXCEPT SELECT * FROM live)",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

async fn all_fresh(c: &Client) -> bool {
    harness::counts_fresh(c).await
        && slow_fresh(c).await
        && harness::pending(c, "mv_counts").await == 0
        && harness::pending(c, "mv_slow").await == 0
}

async fn successes(c: &Client, after: i64) -> i64 {
    c.query_one(
        "SELECT count(*) FROM mvrefresh.refresh_history
         WHERE id > $1 AND outcome = 'success' AND view_name = 'mv_counts'",
        &[&after],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_one_killed_mid_refresh() {
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(harness::SCHEMA).await.unwrap();
    c.batch_execute(harness::SLOW_SCHEMA).await.unwrap();
    let dir = std::env::temp_dir().join(format!("mvrefresh-replicas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut children: Vec<harness::Reaper> = Vec::new();
    for i in 0..3 {
        let config = format!(
            "[database]\nurl = \"{}\"\napplication_name = \"mvrefresh-r{i}\"\n\
             [debounce]\nquiet = \"100ms\"\nmax_wait = \"1s\"\n\
             [listener]\nheartbeat_interval = \"200ms\"\nheartbeat_timeout = \"1s\"\n\
             [refresh]\nretry_min = \"100ms\"\nretry_max = \"1s\"\nshutdown_deadline = \"2s\"\n\
             [http]\nlisten = \"127.0.0.1:0\"\n{}{}{}",
            db.url,
            harness::CAPTURE,
            harness::VIEW_COUNTS,
            harness::VIEW_SLOW
        );
        let path = dir.join(format!("r{i}.toml"));
        std::fs::write(&path, config).unwrap();
        if i == 0 {
            let out = Command::new(env!("CARGO_BIN_EXE_mvrefresh"))
                .arg("--config")
                .arg(&path)
                .arg("install")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let child = Command::new(env!("CARGO_BIN_EXE_mvrefresh"))
            .arg("--config")
            .arg(&path)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        children.push(harness::Reaper(Some(child)));
    }
    harness::wait_for("three listeners", || async {
        harness::listeners(&c).await == 3
    })
    .await;
    harness::wait_for("the initial refreshes", || all_fresh(&c)).await;

    // A slow refresh, and the replica running it killed in the middle.
    c.batch_execute("UPDATE knobs SET sleep_s = 1.5")
        .await
        .unwrap();
    harness::score(&c, 1, 3).await;
    let refresher = harness::wait_some("a replica refreshing mv_slow", || {
        harness::refreshing(&c, "mv_slow")
    })
    .await;
    let victim: usize = refresher
        .strip_prefix("mvrefresh-r")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected refresher {refresher}"));
    let mut killed = children[victim].0.take().unwrap();
    signal(&killed, "-KILL");
    let _ = killed.wait();
    harness::score(&c, 2, 3).await;
    harness::wait_for("every change reflected after the kill", || all_fresh(&c)).await;

    // Bursts after the kill: each is refreshed once, not once per replica.
    c.batch_execute("UPDATE knobs SET sleep_s = 0.05")
        .await
        .unwrap();
    let before = harness::last_history_id(&c).await;
    let bursts: i32 = 5;
    for round in 0..bursts {
        harness::score(&c, round % 3, 4).await;
        harness::wait_for("the burst reflected", || all_fresh(&c)).await;
    }
    let refreshes = successes(&c, before).await;
    assert!(
        (i64::from(bursts)..=i64::from(bursts) + 2).contains(&refreshes),
        "{refreshes} refreshes of mv_counts for {bursts} bursts with 2 replicas"
    );

    let overlaps: i64 = c
        .query_one(
            "SELECT count(*) FROM mvrefresh.refresh_history a JOIN mvrefresh.refresh_history b
               ON a.view_name = b.view_name AND a.id < b.id
              AND a.started_at < b.finished_at AND b.started_at < a.finished_at
             WHERE a.outcome = 'success' AND b.outcome = 'success'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(overlaps, 0, "two refreshes of one view overlapped");
    // The survivors stop cleanly.
    for child in children.iter_mut() {
        if let Some(mut ch) = child.0.take() {
            signal(&ch, "-TERM");
            let status = tokio::task::spawn_blocking(move || ch.wait().unwrap())
                .await
                .unwrap();
            assert_eq!(status.code(), Some(0));
        }
    }
}
