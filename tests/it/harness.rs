//! A throwaway PostgreSQL cluster per test binary (plus dedicated ones for tests that restart
//! the server), a database per test, an in-process daemon, and waiting on observable state.
//!
//! The cluster is made with the installed server binaries (`initdb`, `pg_ctl`), as the
//! `postgres` user when the tests run as root (PostgreSQL refuses root), with pg_cron preloaded
//! when it is installed. A watcher process stops and removes the cluster when the test process
//! exits, however it exits.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mvrefresh::config::Config;
use mvrefresh::daemon::DaemonError;
use mvrefresh::stats::Stats;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

static SHARED: OnceLock<Cluster> = OnceLock::new();
static LOGICAL: OnceLock<Cluster> = OnceLock::new();
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// How long any wait may take before the test fails (a bound for failure, not a speed claim).
pub const PATIENCE: Duration = Duration::from_secs(90);

pub struct Cluster {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    /// TCP connections must use TLS (`hostssl` only); the harness's own go through the socket.
    tls_only: bool,
}

/// A server certificate and its key (PEM files).
pub struct ServerCert<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The directory of `initdb`/`pg_ctl`: `MVREFRESH_TEST_PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin`, else `pg_config --bindir`.
fn pg_bin() -> PathBuf {
    if let Ok(p) = std::env::var("MVREFRESH_TEST_PG_BIN") {
        return PathBuf::from(p);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    let out = Command::new("pg_config").arg("--bindir").output().expect(
        "no PostgreSQL server binaries found: install postgresql or set MVREFRESH_TEST_PG_BIN",
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Cluster {
    /// The cluster shared by the tests of this binary.
    pub fn shared() -> &'static Cluster {
        SHARED.get_or_init(Cluster::new)
    }

    /// The cluster shared by the logical capture's tests: creating a replication slot waits
    /// for every transaction of the cluster to end, which the other tests hold open at will.
    pub fn logical() -> &'static Cluster {
        LOGICAL.get_or_init(Cluster::new)
    }

    /// A new cluster of its own (for tests that stop or restart the server).
    pub fn new() -> Cluster {
        Cluster::create(None)
    }

    /// A cluster with `ssl = on` serving `server`, that accepts TCP connections over TLS only
    /// (`hostssl`). [`Cluster::url`] then names its Unix socket, so the harness's own
    /// connections need no certificate.
    pub fn with_tls(server: ServerCert<'_>) -> Cluster {
        Cluster::create(Some(server))
    }

    fn create(tls: Option<ServerCert<'_>>) -> Cluster {
        let bin = pg_bin();
        let as_postgres = is_root();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("mvrefresh-it-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the cluster directory");
        if as_postgres {
            run(Command::new("chown").arg("postgres:postgres").arg(&dir));
        }
        let port = free_port();
        let cluster = Cluster {
            port,
            dir,
            bin,
            as_postgres,
            tls_only: tls.is_some(),
        };
        let data = cluster.data();
        cluster.pg(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        let pkglib = Command::new(cluster.bin.join("pg_config"))
            .arg("--pkglibdir")
            .output()
            .ok()
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
        let cron = pkglib
            .map(|p| p.join("pg_cron.so").exists())
            .unwrap_or_else(|| Path::new("/usr/lib/postgresql/15/lib/pg_cron.so").exists());
        let mut conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             max_connections = 200\nshared_buffers = 64MB\nlog_min_messages = warning\n\
             track_functions = all\nlog_line_prefix = '%m [%p] %a '\n\
             wal_level = logical\nmax_replication_slots = 64\nwal_sender_timeout = '15s'\n",
            cluster.dir.display()
        );
        if cron {
            conf.push_str(
                "shared_preload_libraries = 'pg_cron'\ncron.database_name = 'postgres'\n",
            );
        }
        if let Some(server) = tls {
            cluster.serve_tls(server);
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        }
        let conf_path = data.join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&conf_path).expect("postgresql.conf");
        existing.push_str(&conf);
        std::fs::write(&conf_path, existing).expect("write postgresql.conf");
        cluster.start();
        cluster.watch();
        cluster
    }

    /// Installs the server certificate and key in the data directory (the server insists the key
    /// is private to it) and allows TCP connections over TLS only.
    fn serve_tls(&self, server: ServerCert<'_>) {
        use std::os::unix::fs::PermissionsExt;
        let data = self.data();
        for (from, to) in [(server.cert, "server.crt"), (server.key, "server.key")] {
            let to = data.join(to);
            std::fs::copy(from, &to).expect("copy the server certificate");
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))
                .expect("chmod the server certificate");
            if self.as_postgres {
                run(Command::new("chown").arg("postgres:postgres").arg(&to));
            }
        }
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
        )
        .expect("write pg_hba.conf");
    }

    /// A hot standby streaming from this cluster (made with `pg_basebackup -R`).
    pub fn standby(&self) -> Cluster {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("mvrefresh-it-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the standby directory");
        if self.as_postgres {
            run(Command::new("chown").arg("postgres:postgres").arg(&dir));
        }
        let standby = Cluster {
            port: free_port(),
            dir,
            bin: self.bin.clone(),
            as_postgres: self.as_postgres,
            tls_only: false,
        };
        let data = standby.data();
        let primary_port = self.port.to_string();
        standby.pg(
            "pg_basebackup",
            &[
                "-D",
                data.to_str().unwrap(),
                "-R",
                "--checkpoint=fast",
                "-X",
                "stream",
                "-h",
                "127.0.0.1",
                "-p",
                &primary_port,
                "-U",
                "postgres",
            ],
        );
        let conf_path = data.join("postgresql.conf");
        let mut conf = std::fs::read_to_string(&conf_path).expect("postgresql.conf");
        conf.push_str(&format!(
            "\nport = {}\nunix_socket_directories = '{}'\n",
            standby.port,
            standby.dir.display()
        ));
        std::fs::write(&conf_path, conf).expect("write postgresql.conf");
        standby.start();
        standby.watch();
        standby
    }

    /// Stops and removes the cluster when this process is gone, however it ends. The watcher
    /// outlives this process by design, so it is never waited for.
    fn watch(&self) {
        let data = self.data();
        let pg_ctl = self.bin.join("pg_ctl");
        let stop = if self.as_postgres {
            format!(
                "runuser -u postgres -- {} -D {} stop -m immediate",
                pg_ctl.display(),
                data.display()
            )
        } else {
            format!(
                "{} -D {} stop -m immediate",
                pg_ctl.display(),
                data.display()
            )
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            dir = self.dir.display()
        );
        #[allow(
            clippy::zombie_processes,
            reason = "the watcher must outlive the test process"
        )]
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the cluster watcher");
    }

    /// The cluster's directory, removed with it (for files a test wants gone afterwards).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn pg(&self, tool: &str, args: &[&str]) {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        cmd.args(args);
        run(&mut cmd);
    }

    pub fn start(&self) {
        let log = self.dir.join("server.log");
        self.pg(
            "pg_ctl",
            &[
                "-D",
                self.data().to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "120",
                "start",
            ],
        );
    }

    pub fn stop(&self) {
        self.pg(
            "pg_ctl",
            &[
                "-D",
                self.data().to_str().unwrap(),
                "-w",
                "-m",
                "fast",
                "stop",
            ],
        );
    }

    pub fn restart(&self) {
        self.stop();
        self.start();
    }

    pub fn url(&self, db: &str) -> String {
        if self.tls_only {
            return format!(
                "host={} port={} user=postgres dbname={db}",
                self.dir.display(),
                self.port
            );
        }
        format!(
            "postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// A fresh, empty database.
    pub async fn create_db(&self) -> TestDb {
        let name = format!(
            "it_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let admin = connect(&self.url("postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        TestDb {
            url: self.url(&name),
            port: self.port,
        }
    }
}

/// A number unique in this test process (file names, job names).
pub fn unique() -> u32 {
    COUNTER.fetch_add(1, Ordering::SeqCst)
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A connection whose driver runs in the background.
pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

pub struct TestDb {
    pub url: String,
    pub port: u16,
}

impl TestDb {
    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    /// The same database reached through `port` (a proxy).
    pub fn url_via(&self, port: u16) -> String {
        self.url
            .replace(&format!(":{}/", self.port), &format!(":{port}/"))
    }
}

/// A child process killed when the guard drops (a failing test leaves no daemon behind).
pub struct Reaper(pub Option<std::process::Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits until `check` is true, polling; fails the test after [`PATIENCE`].
pub async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {PATIENCE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `check` returns something, polling; fails the test after [`PATIENCE`].
pub async fn wait_some<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {PATIENCE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A config for tests: short debounce and timeouts, `body` appended (captures and views).
pub fn config(url: &str, body: &str) -> Config {
    config_with_env(url, body, &Default::default())
}

/// [`config`] with `env` as the environment (for secrets such as the admin token).
pub fn config_with_env(
    url: &str,
    body: &str,
    env: &std::collections::HashMap<String, String>,
) -> Config {
    let text = format!(
        r#"
[database]
url = "{url}"
pool_size = 4
connect_timeout = "3s"

[listener]
heartbeat_interval = "200ms"
heartbeat_timeout = "1s"
reconnect_min = "20ms"
reconnect_max = "300ms"
catch_up_interval = "2s"

[debounce]
quiet = "100ms"
max_wait = "1s"

[http]
listen = "127.0.0.1:0"

[refresh]
retry_min = "100ms"
retry_max = "1s"
shutdown_deadline = "5s"
lock_timeout = "5s"
{body}
"#
    );
    Config::from_str_with_env(&text, Path::new("test.toml"), env)
        .unwrap_or_else(|e| panic!("test config: {e}"))
}

/// The schema most daemon tests use: submissions, a capture, and a view counting scored rows.
pub const SCHEMA: &str = "
CREATE TABLE submissions (
    id serial PRIMARY KEY,
    challenge_id int,
    status text NOT NULL DEFAULT 'pending',
    score double precision,
    note text
);
CREATE MATERIALIZED VIEW mv_counts AS
    SELECT challenge_id, count(*) AS n, sum(score) AS total
    FROM submissions WHERE status = 'scored' GROUP BY challenge_id;
CREATE UNIQUE INDEX ON mv_counts (challenge_id);
";

/// A partitioned `submissions` without a primary key, two levels deep: without REPLICA
/// IDENTITY FULL on every partition PostgreSQL would refuse its UPDATEs and DELETEs.
pub const PARTITIONED_SCHEMA: &str = "
CREATE TABLE submissions (
    id serial,
    challenge_id int,
    status text NOT NULL DEFAULT 'pending',
    score double precision,
    note text
) PARTITION BY RANGE (challenge_id);
CREATE TABLE submissions_low PARTITION OF submissions FOR VALUES FROM (MINVALUE) TO (3);
CREATE TABLE submissions_high PARTITION OF submissions FOR VALUES FROM (3) TO (1000)
    PARTITION BY HASH (id);
CREATE TABLE submissions_high_0 PARTITION OF submissions_high
    FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE submissions_high_1 PARTITION OF submissions_high
    FOR VALUES WITH (MODULUS 2, REMAINDER 1);
CREATE TABLE submissions_other PARTITION OF submissions DEFAULT;
CREATE MATERIALIZED VIEW mv_counts AS
    SELECT challenge_id, count(*) AS n, sum(score) AS total
    FROM submissions WHERE status = 'scored' GROUP BY challenge_id;
CREATE UNIQUE INDEX ON mv_counts (challenge_id);
";

/// With a daemon running on `config` (a capture of `submissions` as [`PARTITIONED_SCHEMA`]
/// makes it, and `mv_counts`): a partition detached, attached again with its rows, and a
/// partitioned partition dropped, each reach `mv_counts`, though none changes a row.
pub async fn partitions_come_and_go(c: &Client, config: &Config) {
    let daemon = Daemon::start(config.clone());
    daemon.wait_listening().await;
    c.batch_execute(
        "INSERT INTO submissions (challenge_id, status, score)
         SELECT g % 5, 'scored', g FROM generate_series(1, 50) AS g;
         INSERT INTO submissions (challenge_id, status, score) VALUES (10, 'scored', 1);",
    )
    .await
    .unwrap();
    wait_for("mv_counts to follow the writes", || counts_fresh(c)).await;
    for (what, sql) in [
        (
            "a partition detached",
            "ALTER TABLE submissions DETACH PARTITION submissions_low",
        ),
        (
            "a partition attached with rows",
            "ALTER TABLE submissions ATTACH PARTITION submissions_low
                 FOR VALUES FROM (MINVALUE) TO (3)",
        ),
        ("a partition dropped", "DROP TABLE submissions_high"),
    ] {
        assert!(counts_fresh(c).await);
        c.batch_execute(sql).await.unwrap();
        assert!(!counts_fresh(c).await, "{what}: changes nothing");
        wait_for(&format!("mv_counts to follow {what}"), || counts_fresh(c)).await;
    }
    daemon.stop().await;
}

/// A view whose refresh sleeps `knobs.sleep_s` seconds (0 at first), for mid-refresh faults.
pub const SLOW_SCHEMA: &str = "
CREATE TABLE knobs (sleep_s float8 NOT NULL);
INSERT INTO knobs VALUES (0);
CREATE MATERIALIZED VIEW mv_slow AS
    SELECT challenge_id, count(*) AS n
    FROM submissions, (SELECT pg_sleep((SELECT sleep_s FROM knobs))) z
    WHERE status = 'scored' GROUP BY challenge_id;
CREATE UNIQUE INDEX ON mv_slow (challenge_id);
";

pub const VIEW_SLOW: &str = r#"
[[view]]
name = "mv_slow"
mode = "concurrently"
channels = ["submission_scored"]
"#;

/// Listener backends connected to the current database.
pub async fn listeners(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE application_name = 'mvrefresh-listener' AND datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// The `application_name` of the backend running a `REFRESH` of `view` right now, if any.
pub async fn refreshing(client: &Client, view: &str) -> Option<String> {
    client
        .query_opt(
            "SELECT application_name FROM pg_stat_activity
             WHERE state = 'active' AND query LIKE 'REFRESH MATERIALIZED VIEW%' || $1 || '%'
               AND datname = current_database()
             LIMIT 1",
            &[&view],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

pub const CAPTURE: &str = r#"
[[capture]]
name = "submissions"
table = "submissions"
channel = "submission_scored"
key = "challenge_id"
when = "status = 'scored'"
columns = ["score"]
"#;

pub const VIEW_COUNTS: &str = r#"
[[view]]
name = "mv_counts"
mode = "concurrently"
channels = ["submission_scored"]
"#;

/// A test config with the submissions capture and `mv_counts`.
pub fn counts_config(url: &str) -> Config {
    config(url, &format!("{CAPTURE}{VIEW_COUNTS}"))
}

/// Whether `mv_counts` equals the query it materializes.
pub async fn counts_fresh(client: &Client) -> bool {
    let row = client
        .query_one(
            "WITH live AS (SELECT challenge_id, count(*) AS n, sum(score) AS total
                           FROM submissions WHERE status = 'scored' GROUP BY challenge_id)
             SELECT (SELECT count(*) FROM (SELECT * FROM live EXCEPT SELECT * FROM mv_counts) a)
                  + (SELECT count(*) FROM (SELECT * FROM mv_counts EXCEPT SELECT * FROM live) b)",
            &[],
        )
        .await
        .expect("compare mv_counts");
    row.get::<_, i64>(0) == 0
}

/// Installs mvrefresh with `config` into the database.
pub async fn install(config: &Config) {
    let db = mvrefresh::db::Db::new(&config.database).unwrap();
    let mut client = db.connect_simple("test-install").await.unwrap();
    let steps = mvrefresh::install::script(config, mvrefresh::install::Options::default());
    mvrefresh::install::run(&mut client, &steps)
        .await
        .unwrap_or_else(|e| panic!("install: {e}"));
    mvrefresh::logical::after_install(&client, config, false)
        .await
        .unwrap_or_else(|e| panic!("install (slots): {e}"));
}

/// Daemon logs in test output (captured per test by the harness); `RUST_LOG` sets the level.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("mvrefresh=info")),
        )
        .with_test_writer()
        .try_init();
}

/// A daemon running in this process.
pub struct Daemon {
    pub stats: Arc<Stats>,
    stop: Option<oneshot::Sender<()>>,
    join: JoinHandle<Result<(), DaemonError>>,
}

impl Daemon {
    pub fn start(config: Config) -> Daemon {
        init_logging();
        let stats = Arc::new(Stats::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let join = tokio::spawn(mvrefresh::daemon::run(config, stats.clone(), async move {
            let _ = stopped.await;
        }));
        Daemon {
            stats,
            stop: Some(stop),
            join,
        }
    }

    /// Waits until the listener is connected.
    pub async fn wait_listening(&self) {
        let stats = self.stats.clone();
        wait_for("the listener to connect", || {
            let ok = stats.listener_connected.get() && stats.ready.get();
            async move { ok }
        })
        .await;
    }

    /// Waits until the listener has reconnected more than `before` times and is connected.
    pub async fn wait_reconnected(&self, before: u64) {
        let stats = self.stats.clone();
        wait_for("the listener to reconnect", || {
            let ok = stats.listener_reconnects.get() > before && stats.listener_connected.get();
            async move { ok }
        })
        .await;
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let result = tokio::time::timeout(PATIENCE, &mut self.join)
            .await
            .expect("the daemon stops")
            .expect("the daemon task does not panic");
        result.expect("the daemon exits cleanly");
    }

    /// Waits for the daemon to exit by itself and returns its result.
    pub async fn result(mut self) -> Result<(), DaemonError> {
        tokio::time::timeout(PATIENCE, &mut self.join)
            .await
            .expect("the daemon exits")
            .expect("the daemon task does not panic")
    }
}

/// Number of successful refreshes of `view` recorded in the history.
pub async fn refreshes(client: &Client, view: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM mvrefresh.refresh_history WHERE view_name = $1 AND outcome = 'success'",
            &[&view],
        )
        .await
        .unwrap()
        .get(0)
}

/// The id of the newest `refresh_history` row (0: none): later rows are newer attempts.
pub async fn last_history_id(c: &Client) -> i64 {
    c.query_one(
        "SELECT coalesce(max(id), 0) FROM mvrefresh.refresh_history",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Pending rows of `view`.
pub async fn pending(client: &Client, view: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM mvrefresh.pending WHERE view_name = $1",
            &[&view],
        )
        .await
        .unwrap()
        .get(0)
}

/// The first column of `sql`'s rows, as text.
pub async fn texts(client: &Client, sql: &str) -> Vec<String> {
    client
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Takes the dirty keys (of `channel`, or all) as the daemon's collect does, sorted and
/// distinct: deletes them, then changes the generation, so every session forgets the keys it
/// remembered as dirty.
pub async fn take_dirty(client: &Client, channel: Option<&str>) -> Vec<String> {
    let rows = client
        .query(
            "WITH d AS (DELETE FROM mvrefresh.dirty WHERE $1::text IS NULL OR channel = $1
                        RETURNING key)
             SELECT DISTINCT key FROM d ORDER BY key",
            &[&channel],
        )
        .await
        .unwrap();
    // A new generation, odd: writers notify (as when no daemon collects on its own).
    client
        .execute(
            "SELECT setval('mvrefresh.generation', nextval('mvrefresh.generation') | 1)",
            &[],
        )
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

/// A role that may log in, write `submissions` and create objects, connected to `db` (`admin`
/// creates it).
pub async fn writer(db: &TestDb, admin: &Client) -> Client {
    let role = format!("writer_{}", unique());
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN;
             GRANT USAGE ON SCHEMA public TO {role};
             GRANT CREATE ON SCHEMA public TO {role};
             GRANT SELECT, INSERT, UPDATE, DELETE ON submissions TO {role};
             GRANT USAGE ON SEQUENCE submissions_id_seq TO {role};
             DO $$ BEGIN
                 EXECUTE format('GRANT CREATE ON DATABASE %I TO {role}', current_database());
             END $$;"
        ))
        .await
        .unwrap();
    let url = db
        .url
        .replace("postgres://postgres@", &format!("postgres://{role}@"));
    connect(&url).await
}

/// Runs sql/uninstall.sql in one transaction, as its header says to.
pub async fn uninstall(client: &Client) {
    client
        .batch_execute(&format!(
            "BEGIN;\n{}\nCOMMIT;",
            include_str!("../../sql/uninstall.sql")
        ))
        .await
        .unwrap();
}

/// Sets up a database with [`SCHEMA`], installs mvrefresh with the capture and `views`, and
/// returns the database, a client and the config.
pub async fn setup(cluster: &Cluster, views: &str) -> (TestDb, Client, Config) {
    let db = cluster.create_db().await;
    let client = db.client().await;
    client.batch_execute(SCHEMA).await.unwrap();
    let config = config(&db.url, &format!("{CAPTURE}{views}"));
    install(&config).await;
    (db, client, config)
}

/// Scores `n` new rows for challenge `challenge`, in one transaction.
pub async fn score(client: &Client, challenge: i32, n: i32) {
    client
        .execute(
            "INSERT INTO submissions (challenge_id, status, score)
             SELECT $1, 'scored', g FROM generate_series(1, $2) g",
            &[&challenge, &n],
        )
        .await
        .unwrap();
}
