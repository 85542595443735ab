//! Helper of `bench/run` (not part of mvrefresh).
//!
//! `probe lag ...`   writes scored submissions, each with a unique lane key `bench_<tag>_<n>`, on
//!                   one connection (autocommit: one commit per event) following a scenario, while
//!                   a second connection polls the analytics relation every 50 ms for new
//!                   `bench_<tag>_%` lane rows. Lag = first poll that saw the row − the writer's
//!                   commit acknowledgement. Prints one JSON object.
//! `probe flood ...` sends NOTIFYs from a few connections and reads the daemon's
//!                   `mvrefresh_notifications_received_total` until all of them arrived. Prints
//!                   one JSON object.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::{Client, NoTls};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn args() -> (String, HashMap<String, String>) {
    let mut it = std::env::args().skip(1);
    let cmd = it.next().unwrap_or_default();
    let mut m = HashMap::new();
    while let Some(k) = it.next() {
        let k = k.trim_start_matches("--").to_owned();
        let v = it.next().unwrap_or_default();
        m.insert(k, v);
    }
    (cmd, m)
}

fn get<T: std::str::FromStr>(m: &HashMap<String, String>, k: &str, d: T) -> T {
    m.get(k).and_then(|v| v.parse().ok()).unwrap_or(d)
}

async fn connect(url: &str) -> Res<Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("probe: connection error: {e}");
        }
    });
    Ok(client)
}

fn pct(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

async fn lag(m: HashMap<String, String>) -> Res<()> {
    let url = m.get("url").ok_or("--url")?.clone();
    let relation = m.get("relation").ok_or("--relation")?.clone();
    let scenario = m
        .get("scenario")
        .cloned()
        .unwrap_or_else(|| "steady".into());
    let rate: f64 = get(&m, "rate", 2.0);
    let burst: usize = get(&m, "burst", 50);
    let every: f64 = get(&m, "every", 20.0);
    let duration = Duration::from_secs_f64(get(&m, "duration", 60.0));
    let drain = Duration::from_secs_f64(get(&m, "drain", 60.0));
    let tag = m.get("tag").cloned().unwrap_or_else(|| "x".into());
    let challenges: u32 = get(&m, "challenges", 200);
    let agents: u32 = get(&m, "agents", 5000);

    let writer = connect(&url).await?;
    let poller = connect(&url).await?;
    let insert = writer
        .prepare(
            "INSERT INTO submissions (agent_id, challenge_id, status, final_lane_scores, composite_score)
             VALUES (md5('mvrefresh-sample:agent:' || $1::text)::uuid,
                     md5('mvrefresh-sample:challenge:' || $2::text)::uuid,
                     'scored', jsonb_build_object($3::text, 50), 50)",
        )
        .await?;
    let prefix = format!("bench_{tag}_");
    let poll = poller
        .prepare(&format!(
            "SELECT lane_key FROM {relation} WHERE lane_key LIKE $1"
        ))
        .await?;

    // Schedule: offsets from t0.
    let mut schedule: Vec<Duration> = Vec::new();
    if scenario == "burst" {
        let mut k = 0.0;
        while Duration::from_secs_f64(k * every) < duration {
            for _ in 0..burst {
                schedule.push(Duration::from_secs_f64(k * every));
            }
            k += 1.0;
        }
    } else {
        let n = (duration.as_secs_f64() * rate).floor() as usize;
        for i in 0..n {
            schedule.push(Duration::from_secs_f64(i as f64 / rate));
        }
    }
    let total = schedule.len();
    let commits: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; total]));
    let done = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now() + Duration::from_millis(200);

    let w = {
        let commits = commits.clone();
        let done = done.clone();
        let written = written.clone();
        let prefix = prefix.clone();
        tokio::spawn(async move {
            let mut x: u64 = 0x9e3779b97f4a7c15 ^ tag_hash(&prefix);
            for (i, at) in schedule.iter().enumerate() {
                tokio::time::sleep_until((t0 + *at).into()).await;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let c = (x % challenges as u64) + 1;
                let a = ((x >> 20) % agents as u64) + 1;
                let key = format!("{prefix}{i}");
                match writer
                    .execute(&insert, &[&a.to_string(), &c.to_string(), &key])
                    .await
                {
                    Ok(_) => {
                        commits.lock().unwrap()[i] = Some(Instant::now());
                        written.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => eprintln!("probe: insert {i} failed: {e}"),
                }
            }
            done.store(true, Ordering::SeqCst);
        })
    };

    let mut seen: HashMap<usize, Instant> = HashMap::new();
    let like = format!("{prefix}%");
    let mut drain_start: Option<Instant> = None;
    let mut polls = 0u64;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let rows = poller.query(&poll, &[&like]).await?;
        polls += 1;
        let now = Instant::now();
        for r in rows {
            let k: String = r.get(0);
            if let Some(i) = k
                .strip_prefix(&prefix)
                .and_then(|s| s.parse::<usize>().ok())
            {
                seen.entry(i).or_insert(now);
            }
        }
        if done.load(Ordering::SeqCst) {
            let ds = *drain_start.get_or_insert(now);
            if seen.len() >= written.load(Ordering::SeqCst) || now - ds >= drain {
                break;
            }
        }
    }
    w.await?;
    let stream_end = Instant::now();
    let commits = commits.lock().unwrap().clone();
    let mut lags: Vec<f64> = Vec::new();
    let mut not_visible = 0usize;
    for (i, c) in commits.iter().enumerate() {
        let Some(c) = c else { continue };
        match seen.get(&i) {
            Some(s) => lags.push(s.saturating_duration_since(*c).as_secs_f64()),
            None => not_visible += 1,
        }
    }
    lags.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let last_commit = commits.iter().flatten().max().copied().unwrap_or(t0);
    let out = serde_json::json!({
        "scenario": scenario,
        "relation": relation,
        "events": total,
        "committed": commits.iter().flatten().count(),
        "visible": lags.len(),
        "not_visible": not_visible,
        "lag_p50_s": pct(&lags, 50.0),
        "lag_p95_s": pct(&lags, 95.0),
        "lag_p99_s": pct(&lags, 99.0),
        "lag_max_s": lags.last(),
        "stream_s": last_commit.saturating_duration_since(t0).as_secs_f64(),
        "total_s": stream_end.saturating_duration_since(t0).as_secs_f64(),
        "polls": polls,
    });
    println!("{out}");
    Ok(())
}

fn tag_hash(s: &str) -> u64 {
    s.bytes().fold(1469598103934665603u64, |h, b| {
        (h ^ b as u64).wrapping_mul(1099511628211)
    })
}

async fn metric(addr: &str, name: &str) -> Res<f64> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    let mut sum = 0.0;
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix(name) {
            if rest.starts_with('{') || rest.starts_with(' ') {
                if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
                    sum += v;
                }
            }
        }
    }
    Ok(sum)
}

async fn flood(m: HashMap<String, String>) -> Res<()> {
    let url = m.get("url").ok_or("--url")?.clone();
    let addr = m.get("metrics").ok_or("--metrics")?.clone();
    let channel = m
        .get("channel")
        .cloned()
        .unwrap_or_else(|| "submission_scored".into());
    let total: u64 = get(&m, "total", 200_000);
    let conns: u64 = get(&m, "conns", 4);
    let batch: u64 = get(&m, "batch", 1000);
    let keys: u64 = get(&m, "keys", 10_000);
    let counter = "mvrefresh_notifications_received_total";
    let base = metric(&addr, counter).await?;
    let per = total / conns;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..conns {
        let url = url.clone();
        let channel = channel.clone();
        tasks.push(tokio::spawn(async move {
            let client = connect(&url).await?;
            let stmt = client
                .prepare(
                    "SELECT count(pg_notify($1, md5('flood:' || (g % $2))::uuid::text))
                     FROM generate_series($3::bigint, $4::bigint) AS g",
                )
                .await?;
            let mut start = c * per;
            let end = start + per;
            while start < end {
                let stop = (start + batch).min(end) - 1;
                client
                    .query_one(
                        &stmt,
                        &[&channel, &(keys as i64), &(start as i64), &(stop as i64)],
                    )
                    .await?;
                start = stop + 1;
            }
            Res::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let sent = t0.elapsed().as_secs_f64();
    let sent_n = per * conns;
    let mut got = base;
    let deadline = Instant::now() + Duration::from_secs(180);
    while got - base < sent_n as f64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        got = metric(&addr, counter).await?;
    }
    let received_s = t0.elapsed().as_secs_f64();
    let received = got - base;
    println!(
        "{}",
        serde_json::json!({
            "sent": sent_n,
            "connections": conns,
            "keys": keys,
            "send_s": sent,
            "received": received,
            "receive_s": received_s,
            "ingest_per_s": received / received_s,
            "send_per_s": sent_n as f64 / sent,
        })
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (cmd, m) = args();
    let r = match cmd.as_str() {
        "lag" => lag(m).await,
        "flood" => flood(m).await,
        _ => Err("usage: probe lag|flood --key value ...".into()),
    };
    if let Err(e) = r {
        eprintln!("probe: {e}");
        std::process::exit(1);
    }
}
