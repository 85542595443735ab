//! Connections: the one place that knows how to reach PostgreSQL (URL, timeouts, TLS) and
//! builds the refresh pool. The LISTEN connection is made here too but is never pooled.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{Client, Connection, NoTls, Socket};

use crate::config::DatabaseConfig;

/// Advisory-lock namespace (first key of the two-key form): "mvrf".
pub const LOCK_NAMESPACE: i32 = 0x6d76_7266;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("cannot connect to {target}: no answer within {timeout:?}")]
    ConnectTimeout { target: String, timeout: Duration },
    #[error("{target} is a standby (pg_is_in_recovery() is true): mvrefresh must run against the primary, where refreshes and the change log can be written")]
    Standby { target: String },
    #[error("cannot get a connection from the pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error(transparent)]
    Query(#[from] tokio_postgres::Error),
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
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it may carry a password.
        f.debug_struct("Db")
            .field("target", &self.target())
            .finish()
    }
}

impl Db {
    pub fn new(settings: &DatabaseConfig) -> Result<Db, tokio_postgres::Error> {
        let mut config: tokio_postgres::Config = settings.url.parse()?;
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
        })
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
    pub async fn connect(
        &self,
        app: &str,
    ) -> Result<(Client, Connection<Socket, NoTlsStream>), DbError> {
        let mut config = self.config.clone();
        config.application_name(app);
        let timeout = self.settings.connect_timeout;
        match tokio::time::timeout(timeout + Duration::from_secs(1), config.connect(NoTls)).await {
            Ok(Ok(pair)) => Ok(pair),
            Ok(Err(source)) => Err(DbError::Connect {
                target: self.target(),
                source,
            }),
            Err(_) => Err(DbError::ConnectTimeout {
                target: self.target(),
                timeout,
            }),
        }
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

    /// The refresh pool: every wait bounded (the pool's defaults are "forever").
    pub fn pool(&self, size: usize) -> Pool {
        let manager = Manager::from_config(
            self.config.clone(),
            NoTls,
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

/// Whether an error means the connection is gone (as opposed to a failing statement).
pub fn is_connection_error(e: &tokio_postgres::Error) -> bool {
    e.is_closed() || e.code().is_none()
}
