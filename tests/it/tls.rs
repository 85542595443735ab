//! TLS to PostgreSQL: a throwaway cluster with `ssl = on`, a server certificate for
//! `DNS:localhost` only, issued by a CA made here with the `openssl` CLI, and TCP connections
//! allowed over TLS only (`hostssl`). The harness's own connections use the Unix socket.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use mvrefresh::config::DatabaseConfig;
use mvrefresh::db::Db;

use crate::harness::{self, Cluster, Daemon, ServerCert, TestDb};

/// Appears in every URL below; must never appear in an error.
const PASSWORD: &str = "Pa55-w0rd-never-shown";

struct Tls {
    cluster: Cluster,
    /// The CA that issued the server's certificate.
    ca: PathBuf,
    /// A CA that did not.
    other_ca: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("the openssl CLI (scripts/prereqs.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed CA `name.crt` / `name.key` in `dir`.
fn make_ca(dir: &Path, name: &str) -> PathBuf {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=mvrefresh test {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
        ],
    );
    dir.join(format!("{name}.crt"))
}

/// `server.crt` / `server.key` for `DNS:localhost` only, signed by `ca`.
fn issue_server_cert(dir: &Path, ca: &str) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName = DNS:localhost\nextendedKeyUsage = serverAuth\n\
         keyUsage = critical, digitalSignature, keyEncipherment\n\
         basicConstraints = critical, CA:FALSE\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ],
    );
}

/// One TLS cluster for the tests of this module.
fn tls() -> &'static Tls {
    static TLS: OnceLock<Tls> = OnceLock::new();
    TLS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mvrefresh-it-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ca = make_ca(&dir, "ca");
        let other_ca = make_ca(&dir, "other-ca");
        issue_server_cert(&dir, "ca");
        let cluster = Cluster::with_tls(ServerCert {
            cert: &dir.join("server.crt"),
            key: &dir.join("server.key"),
        });
        // Into the cluster's directory, which is removed with the cluster.
        let certs = cluster.dir().join("certs");
        std::fs::rename(&dir, &certs).expect("move the certificates");
        Tls {
            cluster,
            ca: certs.join(ca.file_name().unwrap()),
            other_ca: certs.join(other_ca.file_name().unwrap()),
        }
    })
}

/// `path` with its slashes percent-encoded, as a path is written in a URL query (so the tests
/// go through the decoding).
fn encode(path: &Path) -> String {
    path.display().to_string().replace('/', "%2F")
}

/// The URL of `db` on the TLS cluster at `host` (`localhost` is in the certificate,
/// `127.0.0.1` is not), with `query` (the TLS keys).
fn url(db: &TestDb, host: &str, query: &str) -> String {
    let name = db.url.rsplit("dbname=").next().unwrap();
    format!(
        "postgres://postgres:{PASSWORD}@{host}:{}/{name}?{query}",
        db.port
    )
}

/// The test `[database]` section with `url` (not validated: some tests pass bad ones).
fn db_config(url: &str) -> DatabaseConfig {
    let mut config = harness::config("postgres://localhost/x", harness::VIEW_COUNTS).database;
    config.url = url.to_owned();
    config
}

/// Connects through mvrefresh's own connection code.
async fn connect(url: &str) -> Result<tokio_postgres::Client, String> {
    let db = Db::new(&db_config(url)).map_err(|e| e.to_string())?;
    db.connect_simple("mvrefresh-tls-test")
        .await
        .map_err(|e| e.to_string())
}

async fn encrypted(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Fails the test unless connecting to `url` is refused; returns the message.
async fn refused(url: &str) -> String {
    let message = match connect(url).await {
        Ok(_) => panic!("connected, but should have been refused"),
        Err(e) => e,
    };
    assert!(!message.contains(PASSWORD), "password in: {message}");
    eprintln!("refused as expected: {message}");
    message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_connects_encrypted_and_the_daemon_runs_over_it() {
    let tls = tls();
    let db = tls.cluster.create_db().await;
    let url = url(
        &db,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", encode(&tls.ca)),
    );
    let client = connect(&url).await.expect("verify-full to localhost");
    assert!(encrypted(&client).await, "the session is not encrypted");

    // End to end over TLS: install, a scored row, the view refreshed.
    let admin = db.client().await;
    admin.batch_execute(harness::SCHEMA).await.unwrap();
    let config = harness::counts_config(&url);
    harness::install(&config).await;
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    harness::score(&admin, 1, 3).await;
    harness::wait_for("the view to be refreshed over TLS", || {
        harness::counts_fresh(&admin)
    })
    .await;
    assert!(harness::refreshes(&admin, "mv_counts").await >= 1);
    // Every connection the daemon holds (listener and pool) is encrypted.
    let (daemon_sessions, plaintext): (i64, i64) = {
        let row = admin
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE NOT s.ssl)
                 FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
                 WHERE a.datname = current_database() AND a.application_name LIKE 'mvrefresh%'
                   AND a.application_name <> 'mvrefresh-tls-test'",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(daemon_sessions >= 2, "listener and pool: {daemon_sessions}");
    assert_eq!(plaintext, 0, "a daemon connection is not encrypted");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_refuses_a_host_name_not_in_the_certificate() {
    let tls = tls();
    let db = tls.cluster.create_db().await;
    let message = refused(&url(
        &db,
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={}", encode(&tls.ca)),
    ))
    .await;
    assert!(message.contains("sslmode=verify-full"), "{message}");
    assert!(message.contains("not valid for name"), "{message}");
    assert!(message.contains("127.0.0.1"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_refuses_a_certificate_from_another_ca() {
    let tls = tls();
    let db = tls.cluster.create_db().await;
    let message = refused(&url(
        &db,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", encode(&tls.other_ca)),
    ))
    .await;
    assert!(message.contains("UnknownIssuer"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_ca_checks_the_chain_but_not_the_host_name() {
    let tls = tls();
    let db = tls.cluster.create_db().await;
    let ca = format!("sslmode=verify-ca&sslrootcert={}", encode(&tls.ca));
    let client = connect(&url(&db, "127.0.0.1", &ca))
        .await
        .expect("verify-ca to an address not in the certificate");
    assert!(encrypted(&client).await);
    let other = format!("sslmode=verify-ca&sslrootcert={}", encode(&tls.other_ca));
    let message = refused(&url(&db, "127.0.0.1", &other)).await;
    assert!(message.contains("UnknownIssuer"), "{message}");
    // `require` with a root certificate behaves like `verify-ca`, as in libpq.
    let require = format!("sslmode=require&sslrootcert={}", encode(&tls.other_ca));
    let message = refused(&url(&db, "127.0.0.1", &require)).await;
    assert!(message.contains("UnknownIssuer"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_encrypts_without_a_root_certificate() {
    let tls = tls();
    let db = tls.cluster.create_db().await;
    let client = connect(&url(&db, "127.0.0.1", "sslmode=require"))
        .await
        .expect("require without sslrootcert");
    assert!(encrypted(&client).await);
    // So does the default (`prefer`) when the server offers TLS.
    let client = connect(&url(&db, "127.0.0.1", "application_name=x"))
        .await
        .expect("prefer");
    assert!(encrypted(&client).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_is_refused_by_a_tls_only_server() {
    let tls = tls();
    let db = tls.cluster.create_db().await;
    let message = refused(&url(&db, "127.0.0.1", "sslmode=disable")).await;
    assert!(message.contains("sslmode=disable"), "{message}");
    assert!(message.contains("pg_hba.conf"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_value_form_and_server_side_cancel_use_the_same_tls() {
    let tls = tls();
    let db = tls.cluster.create_db().await;
    let name = db.url.rsplit("dbname=").next().unwrap();
    let conn = format!(
        "host=localhost port={} user=postgres password={PASSWORD} dbname={name} \
         sslmode=verify-full sslrootcert='{}'",
        db.port,
        tls.ca.display()
    );
    let mvdb = Db::new(&db_config(&conn)).unwrap();
    let client = mvdb.connect_simple("mvrefresh-tls-test").await.unwrap();
    assert!(encrypted(&client).await);
    let canceller = mvdb.canceller(&client);
    let sleeping = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(60)").await });
    let admin = db.client().await;
    harness::wait_for("the query to run", || {
        let admin = &admin;
        async move {
            admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE application_name = 'mvrefresh-tls-test' AND query LIKE 'SELECT pg_sleep%'
                       AND datname = current_database()",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
                == 1
        }
    })
    .await;
    canceller.cancel().await.expect("cancel over TLS");
    let e = sleeping
        .await
        .unwrap()
        .expect_err("the query was cancelled");
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_settings_are_refused_before_connecting() {
    let tls = tls();
    let db = tls.cluster.create_db().await;
    let missing = tls.ca.with_file_name("missing-ca.pem");
    let cases = [
        (
            format!("sslmode=verify-full&sslrootcert={}", encode(&missing)),
            format!(
                "database.url: sslrootcert={}: cannot read",
                missing.display()
            ),
        ),
        (
            "sslmode=verify-full".to_owned(),
            "database.url: sslmode=verify-full needs sslrootcert".to_owned(),
        ),
        (
            "sslmode=verify".to_owned(),
            "database.url: sslmode=verify is not one of".to_owned(),
        ),
    ];
    for (query, expected) in cases {
        let message = refused(&url(&db, "localhost", &query)).await;
        assert!(message.starts_with(&expected), "{message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_install_and_check_over_verify_full() {
    use crate::cli::{config_text, mvrefresh, text, write_config};
    let tls = tls();
    let db = tls.cluster.create_db().await;
    db.client()
        .await
        .batch_execute(harness::SCHEMA)
        .await
        .unwrap();
    let good = url(
        &db,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", encode(&tls.ca)),
    );
    let path = write_config("tls.toml", &config_text(&good, harness::VIEW_COUNTS));
    let install = mvrefresh(&path, &["install"]);
    assert!(install.status.success(), "{}", text(&install));
    let check = mvrefresh(&path, &["check"]);
    assert!(check.status.success(), "{}", text(&check));
    assert!(
        text(&check).contains("ok: connection encrypted (TLSv1.3, sslmode=verify-full"),
        "{}",
        text(&check)
    );

    // A root certificate that cannot be read is a configuration error: exit 78, naming the
    // file, the key and the certificate file, never the password.
    let missing = tls.ca.with_file_name("nowhere.pem");
    let bad = url(
        &db,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", encode(&missing)),
    );
    let path = write_config("tls-bad.toml", &config_text(&bad, harness::VIEW_COUNTS));
    let out = mvrefresh(&path, &["check"]);
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(78), "{msg}");
    assert!(msg.contains("tls-bad.toml"), "{msg}");
    assert!(msg.contains("database.url"), "{msg}");
    assert!(msg.contains("nowhere.pem: cannot read"), "{msg}");
    assert!(!msg.contains(PASSWORD), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_connects_without_tls_whatever_the_mode() {
    // As libpq: TLS does not apply to Unix sockets, so verify-full there is not an error.
    let tls = tls();
    let db = tls.cluster.create_db().await;
    let conn = format!(
        "{} sslmode=verify-full sslrootcert='{}'",
        db.url,
        tls.ca.display()
    );
    let client = connect(&conn)
        .await
        .expect("verify-full over the Unix socket");
    assert!(!encrypted(&client).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logical_capture_streams_over_verify_full() {
    let tls = tls();
    let db = tls.cluster.create_db().await;
    let url = url(
        &db,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", encode(&tls.ca)),
    );
    let admin = db.client().await;
    admin.batch_execute(harness::SCHEMA).await.unwrap();
    let capture = harness::CAPTURE.replace(
        "columns = [\"score\"]",
        &format!(
            "columns = [\"score\"]\nmethod = \"logical\"\nslot = \"mvrefresh_tls_{}\"",
            harness::unique()
        ),
    );
    let config = harness::config(&url, &format!("{capture}{}", harness::VIEW_COUNTS));
    harness::install(&config).await;
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    harness::score(&admin, 1, 3).await;
    harness::wait_for("the view to follow the slot over TLS", || {
        harness::counts_fresh(&admin)
    })
    .await;
    // The replication connection (a walsender) is encrypted like every other.
    let encrypted: Vec<bool> = admin
        .query(
            "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.backend_type = 'walsender' AND a.application_name = 'mvrefresh-logical'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(encrypted, [true]);
    daemon.stop().await;
}
