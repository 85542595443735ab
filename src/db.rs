//! Connections: the one place that knows how to reach PostgreSQL (URL, timeouts, TLS) and
//! builds the refresh pool. The LISTEN connection is made here too but is never pooled.
//!
//! Every connection — pooled, LISTEN, one-shot, and the side connection of a server-side
//! cancel — goes through the one [`MakeTls`] connector built from the URL's `sslmode` and
//! certificate keys (see [`crate::tls`]).

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use serde::Deserialize;
use tokio_postgres::{CancelToken, Client, Connection, Socket};

use crate::tls::{self, MakeTls, SslMode, TlsError, TlsStream};

/// `[database]`: how to reach PostgreSQL. Defined here, with the code that uses it, so that
/// this module needs nothing of [`crate::config`] (which re-exports it).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// libpq-style URL or key=value string. Never logged: it may hold a password.
    pub url: String,
    pub pool_size: usize,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    pub application_name: String,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            pool_size: 4,
            connect_timeout: Duration::from_secs(10),
            application_name: "mvrefresh".to_owned(),
        }
    }
}

/// A dedicated connection's driver, as returned by [`Db::connect`].
pub type DbConnection = Connection<Socket, TlsStream>;

/// `statement_timeout` of pooled connections outside refreshes.
pub const BOOKKEEPING_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a backend of the pool checks, while running a query, that the daemon is still
/// connected (`client_connection_check_interval`, PostgreSQL 14+).
pub const CLIENT_CHECK: Duration = Duration::from_secs(1);

/// Advisory-lock namespace (first key of the two-key form): "mvrf".
pub const LOCK_NAMESPACE: i32 = 0x6d76_7266;

/// Advisory-lock namespace of a `partitioned` view's key buckets ("mvrg"; see
/// [`crate::partition::bucket`]).
pub const BUCKET_LOCK_NAMESPACE: i32 = 0x6d76_7267;

/// `[database] url` cannot be used. Names the key, never echoes the URL (it may hold a
/// password).
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("database.url: is not a valid connection string: {0}")]
    Parse(#[source] tokio_postgres::Error),
    #[error("database.url: {0}")]
    Tls(#[from] TlsError),
}

impl UrlError {
    /// The problem without the key (for messages that name the key themselves).
    pub fn problem(&self) -> String {
        match self {
            // The parser's message never echoes the URL, so no password can leak here.
            UrlError::Parse(e) => format!("is not a valid connection string: {e}"),
            UrlError::Tls(e) => e.to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot connect to {target} (sslmode={mode}): {}", error_text(source))]
    Connect {
        target: String,
        mode: SslMode,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("cannot connect to {target}: no answer within {timeout:?}")]
    ConnectTimeout { target: String, timeout: Duration },
    #[error("{target} is a standby (pg_is_in_recovery() is true): mvrefresh must run against the primary, where refreshes and the change log can be written")]
    Standby { target: String },
    #[error("cannot get a connection from the pool: {}", pool_error_text(.0))]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("{}", error_text(.0))]
    Query(#[from] tokio_postgres::Error),
    #[error("cannot connect to {target} (sslmode={mode}): {message}")]
    Raw {
        target: String,
        mode: SslMode,
        message: String,
    },
}

/// A byte stream to the server, for a protocol the driver does not speak (the replication
/// protocol of [`crate::logical::stream`]).
pub trait RawStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> RawStream for T {}

/// What the startup message of a [`Db::connect_raw`] stream says, and the password to answer
/// the server's challenge with.
pub struct RawParams {
    pub user: String,
    pub dbname: String,
    pub password: Option<Vec<u8>>,
}

impl DbError {
    /// Whether trying again later may succeed (the server may come back).
    pub fn is_retryable(&self) -> bool {
        !matches!(self, DbError::Standby { .. })
    }
}

/// How to reach the database. Cloning is cheap.
#[derive(Clone)]
pub struct Db {
    config: tokio_postgres::Config,
    settings: DatabaseConfig,
    /// `sslmode` as libpq means it (the driver's own is coarser).
    mode: SslMode,
    verifies_chain: bool,
    /// Every host is a Unix socket: no TLS, whatever `sslmode` says.
    unix_only: bool,
    tls: MakeTls,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it may carry a password.
        f.debug_struct("Db")
            .field("target", &self.target())
            .field("sslmode", &self.mode)
            .finish()
    }
}

impl Db {
    /// Parses the URL and builds the TLS connector (reading the certificate files it names).
    pub fn new(settings: &DatabaseConfig) -> Result<Db, UrlError> {
        let (url, params) = tls::split(&settings.url)?;
        let mut config: tokio_postgres::Config = url.parse().map_err(UrlError::Parse)?;
        let mode = params.mode();
        let hosts = config.get_hosts();
        let unix_only = !hosts.is_empty()
            && hosts
                .iter()
                .all(|h| matches!(h, tokio_postgres::config::Host::Unix(_)));
        // As libpq: TLS does not apply to Unix sockets (the server refuses it there), whatever
        // the mode.
        config.ssl_mode(if unix_only {
            tokio_postgres::config::SslMode::Disable
        } else {
            mode.driver_mode()
        });
        let tls = params.connector()?;
        if config.get_application_name().is_none() {
            config.application_name(&settings.application_name);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(settings.connect_timeout);
        }
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        Ok(Db {
            config,
            settings: settings.clone(),
            mode,
            verifies_chain: params.verifies_chain(),
            unix_only,
            tls,
        })
    }

    /// The `sslmode` in force.
    pub fn ssl_mode(&self) -> SslMode {
        self.mode
    }

    /// Whether every host is a Unix socket (where TLS does not apply).
    pub fn unix_only(&self) -> bool {
        self.unix_only
    }

    /// Whether the server's certificate chain is checked (`verify-*`, or `require` with
    /// `sslrootcert`).
    pub fn verifies_chain(&self) -> bool {
        self.verifies_chain
    }

    /// Cancels what `client` is running, server-side, over the same TLS settings.
    pub fn canceller(&self, client: &Client) -> Canceller {
        Canceller {
            token: client.cancel_token(),
            tls: self.tls.clone(),
        }
    }

    /// `user@host:port/dbname`, safe to log (no password).
    pub fn target(&self) -> String {
        let host = self
            .config
            .get_hosts()
            .first()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(h) => h.clone(),
                tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
            })
            .unwrap_or_else(|| "localhost".into());
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        format!(
            "{}@{host}:{port}/{}",
            self.config.get_user().unwrap_or("?"),
            self.config.get_dbname().unwrap_or("?")
        )
    }

    /// The database name connections go to (libpq's default: the user name).
    pub fn dbname(&self) -> String {
        self.config
            .get_dbname()
            .or(self.config.get_user())
            .unwrap_or("postgres")
            .to_owned()
    }

    /// A dedicated connection with `application_name` set to `app`. The caller drives the
    /// returned `Connection` (spawn it, or poll it for notifications).
    pub async fn connect(&self, app: &str) -> Result<(Client, DbConnection), DbError> {
        let mut config = self.config.clone();
        config.application_name(app);
        let timeout = self.settings.connect_timeout;
        let connect = config.connect(self.tls.clone());
        match tokio::time::timeout(timeout + Duration::from_secs(1), connect).await {
            Ok(Ok(pair)) => Ok(pair),
            Ok(Err(source)) => Err(DbError::Connect {
                target: self.target(),
                mode: self.mode,
                source,
            }),
            Err(_) => Err(DbError::ConnectTimeout {
                target: self.target(),
                timeout,
            }),
        }
    }

    /// A byte stream to the first host that answers, before the startup message: over TLS as
    /// `sslmode` says, with the connector every other connection uses (so `verify-full`
    /// verifies the same way), or a Unix socket.
    pub async fn connect_raw(&self) -> Result<(Box<dyn RawStream>, RawParams), DbError> {
        let timeout = self.settings.connect_timeout;
        let raw =
            match tokio::time::timeout(timeout + Duration::from_secs(1), self.open_raw()).await {
                Ok(Ok(s)) => s,
                Ok(Err(message)) => {
                    return Err(DbError::Raw {
                        target: self.target(),
                        mode: self.mode,
                        message,
                    })
                }
                Err(_) => {
                    return Err(DbError::ConnectTimeout {
                        target: self.target(),
                        timeout,
                    })
                }
            };
        let params = RawParams {
            user: self.config.get_user().unwrap_or("postgres").to_owned(),
            dbname: self.dbname(),
            password: self.config.get_password().map(<[u8]>::to_vec),
        };
        Ok((raw, params))
    }

    async fn open_raw(&self) -> Result<Box<dyn RawStream>, String> {
        use tokio_postgres::config::Host;
        let ports = self.config.get_ports();
        let mut last = "no host in database.url".to_owned();
        for (i, host) in self.config.get_hosts().iter().enumerate() {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match host {
                Host::Tcp(name) => {
                    match tokio::net::TcpStream::connect((name.as_str(), port)).await {
                        Ok(stream) => {
                            let _ = stream.set_nodelay(true);
                            return self.negotiate_tls(stream, name).await;
                        }
                        Err(e) => last = format!("{name}:{port}: {e}"),
                    }
                }
                Host::Unix(dir) => {
                    let path = dir.join(format!(".s.PGSQL.{port}"));
                    match tokio::net::UnixStream::connect(&path).await {
                        Ok(stream) => return Ok(Box::new(stream)),
                        Err(e) => last = format!("{}: {e}", path.display()),
                    }
                }
            }
        }
        Err(last)
    }

    /// The SSLRequest exchange, then the handshake when the server agrees.
    async fn negotiate_tls(
        &self,
        mut stream: tokio::net::TcpStream,
        host: &str,
    ) -> Result<Box<dyn RawStream>, String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio_postgres::config::SslMode as Driver;
        use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
        let mode = self.config.get_ssl_mode();
        if matches!(mode, Driver::Disable) {
            return Ok(Box::new(stream));
        }
        let mut request = bytes::BytesMut::new();
        postgres_protocol::message::frontend::ssl_request(&mut request);
        stream
            .write_all(&request)
            .await
            .map_err(|e| e.to_string())?;
        let mut answer = [0u8; 1];
        stream
            .read_exact(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        if answer[0] != b'S' {
            return if matches!(mode, Driver::Require) {
                Err("the server does not accept TLS".to_owned())
            } else {
                Ok(Box::new(stream))
            };
        }
        let connect =
            MakeTlsConnect::<tokio::net::TcpStream>::make_tls_connect(&mut self.tls.clone(), host)
                .map_err(|e| e.to_string())?;
        let tls = connect.connect(stream).await.map_err(|e| e.to_string())?;
        Ok(Box::new(tls))
    }

    /// A connection whose driver runs in the background, for one-shot commands.
    pub async fn connect_simple(&self, app: &str) -> Result<Client, DbError> {
        let (client, conn) = self.connect(app).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection closed");
            }
        });
        Ok(client)
    }

    /// A connection whose server warnings (`RAISE WARNING`, severity WARNING) are printed on
    /// standard error, for commands a person runs (`install`).
    pub async fn connect_showing_warnings(&self, app: &str) -> Result<Client, DbError> {
        let (client, mut conn) = self.connect(app).await?;
        tokio::spawn(async move {
            loop {
                match futures_util::future::poll_fn(|cx| conn.poll_message(cx)).await {
                    Some(Ok(tokio_postgres::AsyncMessage::Notice(n)))
                        if n.severity() == "WARNING" =>
                    {
                        eprintln!("warning: {}", n.message());
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "connection closed");
                        break;
                    }
                    None => break,
                }
            }
        });
        Ok(client)
    }

    /// The refresh pool: every wait bounded (the pool's defaults are "forever").
    pub fn pool(&self, size: usize) -> Pool {
        // Bookkeeping statements (collects, reads, status) end server-side after this, even when
        // the daemon gave up on them earlier; a refresh sets its own (`SET LOCAL`). And a query
        // whose client is gone (a dropped connection, a daemon that stopped) ends within
        // CLIENT_CHECK, even while it waits for a lock or runs a long REFRESH, instead of
        // holding its locks until it would have tried to answer.
        let mut config = self.config.clone();
        let timeout = format!(
            "-c statement_timeout={} -c client_connection_check_interval={}",
            BOOKKEEPING_TIMEOUT.as_millis(),
            CLIENT_CHECK.as_millis()
        );
        let options = match config.get_options() {
            Some(o) if !o.is_empty() => format!("{o} {timeout}"),
            _ => timeout,
        };
        config.options(&options);
        let manager = Manager::from_config(
            config,
            self.tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Verified,
            },
        );
        let t = self.settings.connect_timeout;
        Pool::builder(manager)
            .max_size(size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(t * 6))
            .create_timeout(Some(t))
            .recycle_timeout(Some(t))
            .build()
            .expect("a runtime and timeouts are set")
    }

    /// Fails with [`DbError::Standby`] unless `client` talks to a primary.
    pub async fn ensure_primary(&self, client: &Client) -> Result<(), DbError> {
        let row = client.query_one("SELECT pg_is_in_recovery()", &[]).await?;
        if row.get::<_, bool>(0) {
            return Err(DbError::Standby {
                target: self.target(),
            });
        }
        Ok(())
    }
}

/// Cancels one connection's running query: a side connection to the server, made with the
/// same TLS connector as every other (a `verify-full` deployment never falls back to
/// plaintext for it).
#[derive(Clone)]
pub struct Canceller {
    token: CancelToken,
    tls: MakeTls,
}

impl Canceller {
    pub async fn cancel(&self) -> Result<(), tokio_postgres::Error> {
        self.token.cancel_query(self.tls.clone()).await
    }
}

/// Where [`error_text`] puts the server's DETAIL.
const DETAIL: &str = " (detail: ";

/// What went wrong, for people (logs, alerts, `status`, the refresh history): tokio-postgres's
/// own `Display` is only the kind ("db error", "error performing TLS handshake").
///
/// A server error is `SEVERITY: message (detail: …) (hint: …)`, the parts present; any other
/// error is the kind followed by its causes, `: `-separated (and what to check when the server's
/// certificate was refused).
pub fn error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => server_text(db.severity(), db.message(), db.detail(), db.hint()),
        None => causes(e),
    }
}

/// A pool error, the PostgreSQL error inside told by [`error_text`] (the pool's own `Display`
/// ends in tokio-postgres's "db error").
pub fn pool_error_text(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => {
            format!("error creating a connection: {}", error_text(e))
        }
        other => other.to_string(),
    }
}

fn server_text(severity: &str, message: &str, detail: Option<&str>, hint: Option<&str>) -> String {
    let mut text = format!("{severity}: {message}");
    if let Some(d) = detail {
        text.push_str(&format!("{DETAIL}{d})"));
    }
    if let Some(h) = hint {
        text.push_str(&format!(" (hint: {h})"));
    }
    text
}

/// `text` as [`error_text`] makes it, without the server's DETAIL: PostgreSQL quotes row values
/// there (`Key (id)=(42) already exists.`). What follows the DETAIL goes too, since where it ends
/// cannot be told for sure (it may contain anything); a text without DETAIL is unchanged.
pub fn without_detail(text: &str) -> std::borrow::Cow<'_, str> {
    match text.find(DETAIL) {
        Some(at) => format!("{} (detail hidden)", &text[..at]).into(),
        None => text.into(),
    }
}

/// `e` and its causes, `: `-separated.
fn causes(e: &tokio_postgres::Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    let mut hint = None;
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        // tokio-rustls wraps the rustls error in an io::Error, whose source() skips it.
        let tls = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        hint = hint.or_else(|| tls.and_then(tls_hint));
        cause = c.source();
    }
    if let Some(hint) = hint {
        text.push_str(" (");
        text.push_str(hint);
        text.push(')');
    }
    text
}

/// What an operator should look at when the server's certificate is refused.
fn tls_hint(e: &rustls::Error) -> Option<&'static str> {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            Some("the server's certificate is not issued by a CA in sslrootcert")
        }
        rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            Some("the host in database.url is not a name in the server's certificate: connect by a name it lists, or use sslmode=verify-ca")
        }
        _ => None,
    }
}

/// Whether an error means the connection is gone (as opposed to a failing statement).
pub fn is_connection_error(e: &tokio_postgres::Error) -> bool {
    e.is_closed() || e.code().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_read_as_severity_message_detail_hint() {
        assert_eq!(
            server_text(
                "ERROR",
                "duplicate key value violates unique constraint \"t_pkey\"",
                Some("Key (id)=(42) already exists."),
                Some("look elsewhere")
            ),
            "ERROR: duplicate key value violates unique constraint \"t_pkey\" \
             (detail: Key (id)=(42) already exists.) (hint: look elsewhere)"
        );
        assert_eq!(
            server_text("FATAL", "too many connections", None, None),
            "FATAL: too many connections"
        );
    }

    #[test]
    fn other_errors_keep_their_causes() {
        let e = "host=localhost port=notaport"
            .parse::<tokio_postgres::Config>()
            .unwrap_err();
        let text = error_text(&e);
        // tokio-postgres's own text is only the kind; the cause says what is wrong.
        assert_eq!(e.to_string(), "invalid connection string");
        assert_eq!(
            text,
            "invalid connection string: invalid value for option `port`"
        );
    }

    #[test]
    fn pool_errors_tell_the_postgresql_error_inside() {
        let e = "host=localhost port=notaport"
            .parse::<tokio_postgres::Config>()
            .unwrap_err();
        let text = pool_error_text(&deadpool_postgres::PoolError::Backend(e));
        assert_eq!(
            text,
            "error creating a connection: invalid connection string: invalid value for option `port`"
        );
        assert_eq!(
            pool_error_text(&deadpool_postgres::PoolError::Closed),
            "Pool has been closed"
        );
    }

    #[test]
    fn the_detail_is_hidden_and_nothing_else_changes() {
        let full = server_text(
            "ERROR",
            "could not create unique index \"mv_idx\"",
            Some("Key (challenge_id)=(424242) is duplicated."),
            Some("x"),
        );
        let hidden = without_detail(&full);
        assert_eq!(
            hidden,
            "ERROR: could not create unique index \"mv_idx\" (detail hidden)"
        );
        assert!(!hidden.contains("424242"));
        // A detail that imitates the format cannot smuggle anything past the cut.
        let tricky = server_text("ERROR", "m", Some("a) (hint: 424242"), None);
        assert!(!without_detail(&tricky).contains("424242"));
        for plain in ["ERROR: division by zero", "the connection was closed", ""] {
            assert_eq!(without_detail(plain), plain);
        }
    }
}
