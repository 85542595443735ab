//! `config.toml`: parsed once into one validated [`Config`] value that is passed down, never a
//! global. Unknown keys are rejected; durations are humantime strings (`"2s"`, `"10m"`).
//!
//! Every key, its default and its meaning are documented in the shipped `config.toml`; the
//! defaults are in `config/defaults.rs`, one `Default` per section (a unit test parses the
//! shipped file). What serde cannot check is in `config/validate.rs`.
//!
//! Environment overrides: `MVREFRESH_DATABASE_URL` replaces `[database] url`,
//! `MVREFRESH_ALERT_WEBHOOK_URL` replaces `[alert] webhook_url`, and `MVREFRESH_ALERT_SECRET`
//! (never in the file) signs alert bodies.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::db::DatabaseConfig;
use crate::sql::Relation;

mod defaults;
#[cfg(test)]
mod tests;
mod validate;

/// The longest generated identifier is `mvrefresh_capture_<name>_truncate`; PostgreSQL
/// truncates identifiers to 63 bytes, so a capture's name may have this many.
pub const MAX_CAPTURE_NAME: usize = 63 - "mvrefresh_capture__truncate".len();

/// Environment variable that overrides `[database] url`.
pub const ENV_DATABASE_URL: &str = "MVREFRESH_DATABASE_URL";
/// Environment variable that overrides `[alert] webhook_url`.
pub const ENV_ALERT_WEBHOOK_URL: &str = "MVREFRESH_ALERT_WEBHOOK_URL";
/// Environment variable that overrides `[pg_cron] database_url`.
pub const ENV_PG_CRON_DATABASE_URL: &str = "MVREFRESH_PG_CRON_DATABASE_URL";
/// Environment variable holding the secret that signs alert bodies (HMAC-SHA256).
pub const ENV_ALERT_SECRET: &str = "MVREFRESH_ALERT_SECRET";
/// Environment variable holding the bearer token of `POST /refresh` (off when unset).
pub const ENV_ADMIN_TOKEN: &str = "MVREFRESH_ADMIN_TOKEN";
/// The shortest admin token accepted, in bytes.
pub const ADMIN_TOKEN_MIN_LEN: usize = 32;
/// The placeholder of the shipped examples (`deploy/kubernetes/secret.example.yaml`): a secret
/// holding it is refused.
pub const PLACEHOLDER: &str = "CHANGE-ME";

/// A configuration problem: the file, the key and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {location}key `{key}`: {message}")]
    Invalid {
        file: PathBuf,
        /// `line N, column M: ` when known.
        location: String,
        key: String,
        message: String,
    },
    /// An environment variable's value is unusable. The message never holds the value.
    #[error("environment variable {var}: {message}")]
    Env { var: &'static str, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub database: DatabaseConfig,
    #[serde(default)]
    pub listener: ListenerConfig,
    #[serde(default)]
    pub debounce: DebounceConfig,
    #[serde(default)]
    pub refresh: RefreshConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub alert: AlertConfig,
    #[serde(default)]
    pub pg_cron: PgCronConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default, rename = "capture")]
    pub captures: Vec<CaptureConfig>,
    #[serde(rename = "view")]
    pub views: Vec<ViewConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerConfig {
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    #[serde(with = "humantime_serde")]
    pub catch_up_interval: Duration,
    pub payload_key: String,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DebounceConfig {
    #[serde(with = "humantime_serde")]
    pub quiet: Duration,
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RefreshConfig {
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub lock_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    #[serde(with = "humantime_serde")]
    pub history_retention: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_deadline: Duration,
    pub concurrency: usize,
    /// Pending keys a view keeps in memory; with more, it is due as a whole.
    pub max_pending_keys: usize,
    /// Keys per incremental refresh; a larger due set is refreshed in several batches.
    pub batch_keys: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter (`info`, `mvrefresh=debug`); `RUST_LOG` wins when set.
    pub level: String,
}

/// The admin HTTP server: `/healthz`, `/readyz`, `/metrics`, `/status`, `POST /refresh`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// `host:port`; empty (`None`) turns the server off. Loopback by default.
    #[serde(deserialize_with = "listen_address")]
    pub listen: Option<SocketAddr>,
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Bearer token for `POST /refresh` and the full error texts of `/status`, from
    /// [`ENV_ADMIN_TOKEN`] only (never the file). At least [`ADMIN_TOKEN_MIN_LEN`] bytes.
    #[serde(skip)]
    pub admin_token: Option<Secret>,
}

/// A value that must never be printed (a URL with a token, a signing secret): `Debug` shows `***`;
/// nothing else prints it.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    /// The value itself; only for using it, never for logging it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// `[alert]`: where and how failures are reported (see [`crate::alert`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertConfig {
    /// The webhook; none means alerts are only logged. Masked in `Debug`.
    pub webhook_url: Option<Secret>,
    pub format: AlertFormat,
    /// An open alert is sent again (a reminder) at most this often.
    #[serde(with = "humantime_serde")]
    pub repeat_after: Duration,
    /// The listener must be disconnected this long before `listener_down` is sent.
    #[serde(with = "humantime_serde")]
    pub listener_down_after: Duration,
    /// Consecutive failures of a view that open its circuit (0: never).
    pub circuit_failures: u32,
    /// While a circuit is open, probes start this far apart and double...
    #[serde(with = "humantime_serde")]
    pub circuit_probe_min: Duration,
    /// ...up to this.
    #[serde(with = "humantime_serde")]
    pub circuit_probe_max: Duration,
    /// Alerts waiting for delivery; when full, the oldest is dropped (and counted).
    pub queue_size: usize,
    /// Per-request timeout of a webhook POST.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Delivery retries: exponential from retry_min to retry_max, jittered, max_attempts in all.
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    pub max_attempts: usize,
    /// From `MVREFRESH_ALERT_SECRET` only (never the file): signs bodies with HMAC-SHA256.
    #[serde(skip)]
    pub secret: Option<Secret>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertFormat {
    /// The versioned JSON document of [`crate::alert`] (`mvrefresh.alert/v1`).
    #[default]
    Json,
    /// `{"text": "…"}`, which Slack (and Mattermost, Teams' Slack shim…) accept.
    Slack,
}

/// `[pg_cron]`: the watch of pg_cron's job runs (see [`crate::pgcron`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PgCronConfig {
    /// Watch `cron.job_run_details` when it exists.
    pub watch: bool,
    /// The database where pg_cron lives (`cron.database_name`), when it is not the daemon's.
    /// Masked in `Debug`; `MVREFRESH_PG_CRON_DATABASE_URL` overrides it.
    pub database_url: Option<Secret>,
    /// How often failed runs are looked for.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
}

/// OpenTelemetry metrics export (the Prometheus endpoint is always there with `[http]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/HTTP endpoint (`http://collector:4318`); else `OTEL_EXPORTER_OTLP_ENDPOINT`; else off.
    pub otlp_endpoint: Option<String>,
    #[serde(with = "humantime_serde")]
    pub export_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub export_timeout: Duration,
    pub service_name: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A change capture set up by `mvrefresh install`: it records, on `channel`, the `key` of every
/// row that matters (`when`) and whose key, relevance or `columns` changed. By a row trigger
/// on `table` (`method = "trigger"`), or by the daemon reading the write-ahead log through a
/// logical replication slot (`method = "logical"`, see [`crate::logical`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureConfig {
    pub name: String,
    pub table: Relation,
    pub channel: String,
    pub key: String,
    /// SQL predicate over the row's columns; rows where it is not true are ignored.
    #[serde(default)]
    pub when: Option<String>,
    #[serde(default)]
    pub columns: Vec<String>,
    #[serde(default)]
    pub method: CaptureMethod,
    /// `logical`: the replication slot's name (cluster-wide); default `mvrefresh_<name>`.
    #[serde(default)]
    pub slot: Option<String>,
    /// `logical`: how often the daemon reads the slot.
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// `logical`: alert when the slot holds back more write-ahead log than this (MiB).
    #[serde(default = "default_max_retained_wal_mb")]
    pub max_retained_wal_mb: u64,
    /// `trigger`: use the mvrefresh_capture extension when the database has it (rows whose
    /// keys the session remembers as dirty skip the trigger); `false` before dropping it.
    #[serde(default = "default_native")]
    pub native: bool,
}

fn default_native() -> bool {
    true
}

fn default_poll_interval() -> Duration {
    Duration::from_millis(100)
}

fn default_max_retained_wal_mb() -> u64 {
    1024
}

impl CaptureConfig {
    /// The logical replication slot of a `logical` capture.
    pub fn slot_name(&self) -> String {
        self.slot
            .clone()
            .unwrap_or_else(|| format!("mvrefresh_{}", self.name.to_ascii_lowercase()))
    }

    /// The publication of a `logical` capture (one per database).
    pub fn publication_name(&self) -> String {
        format!("mvrefresh_{}", self.name)
    }
}

/// How a capture learns of changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMethod {
    /// A row trigger in every writer's transaction.
    #[default]
    Trigger,
    /// Logical decoding: nothing in writers' transactions; needs `wal_level = logical`.
    Logical,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// `REFRESH MATERIALIZED VIEW CONCURRENTLY`: readers never blocked; needs a unique index.
    Concurrently,
    /// `REFRESH MATERIALIZED VIEW`: blocks readers while it runs.
    Blocking,
    /// Calls `function(keys text[])`, which recomputes only those keys (NULL = all).
    Incremental,
    /// A table kept equal to `source` (a view of any SQL) by recomputing only the dirty values
    /// of its `key` column and applying the difference: rows of key `k` depend only on the
    /// source rows of key `k`.
    Partitioned,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Concurrently => "concurrently",
            Mode::Blocking => "blocking",
            Mode::Incremental => "incremental",
            Mode::Partitioned => "partitioned",
        }
    }

    /// Whole-view modes refresh everything whenever any key is due.
    pub fn is_whole_view(self) -> bool {
        !matches!(self, Mode::Incremental | Mode::Partitioned)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewConfig {
    pub name: Relation,
    pub mode: Mode,
    #[serde(default)]
    pub channels: Vec<String>,
    /// Incremental mode: the function called with the batch's keys.
    #[serde(default)]
    pub function: Option<Relation>,
    /// Partitioned mode: the view (or table) the table is kept equal to.
    #[serde(default)]
    pub source: Option<Relation>,
    /// Partitioned mode: the column of `source` and of the table whose value the keys are.
    #[serde(default)]
    pub key: Option<String>,
    /// Partitioned mode: the columns that identify a row, for the unique index `install`
    /// creates (when the table has no usable unique index of its own).
    #[serde(default)]
    pub unique: Option<Vec<String>>,
    /// Replaces the dependencies discovered from the catalog.
    #[serde(default)]
    pub depends_on: Option<Vec<Relation>>,
    #[serde(default, with = "humantime_serde")]
    pub schedule: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub max_staleness: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub quiet: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub max_wait: Option<Duration>,
}

impl HttpConfig {
    /// The address to bind, or `None` when the server is off.
    pub fn address(&self) -> Option<SocketAddr> {
        self.listen
    }

    /// Why the daemon must not serve as configured: an admin server reachable beyond loopback
    /// needs [`ENV_ADMIN_TOKEN`] (checked by `mvrefresh run` and reported by `check`; other
    /// commands do not serve).
    pub fn exposure_problem(&self) -> Option<String> {
        let addr = self.address()?;
        if addr.ip().is_loopback() || self.admin_token.is_some() {
            return None;
        }
        Some(format!(
            "http.listen = \"{addr}\" is reachable beyond this host, so the admin server needs \
             a token: set {ENV_ADMIN_TOKEN} (at least {ADMIN_TOKEN_MIN_LEN} bytes, e.g. \
             `openssl rand -hex 32`), or listen on a loopback address"
        ))
    }
}

/// Why `token` cannot be the admin token (never quoting it).
fn admin_token_problem(token: &str) -> Option<String> {
    if token.to_ascii_uppercase().contains(PLACEHOLDER) {
        return Some(
            "is the placeholder of the examples; generate a token with `openssl rand -hex 32`"
                .to_owned(),
        );
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Some(
            "must be printable ASCII without spaces or line breaks (it is compared with an HTTP \
             header; a trailing newline from a file?); generate one with `openssl rand -hex 32`"
                .to_owned(),
        );
    }
    if token.len() < ADMIN_TOKEN_MIN_LEN {
        return Some(format!(
            "is {} bytes long; at least {ADMIN_TOKEN_MIN_LEN} are required: generate one with \
             `openssl rand -hex 32`",
            token.len()
        ));
    }
    None
}

impl ViewConfig {
    /// The view's debounce settings: its own `quiet`/`max_wait` over `[debounce]`.
    pub fn debounce(&self, global: DebounceConfig) -> DebounceConfig {
        DebounceConfig {
            quiet: self.quiet.unwrap_or(global.quiet),
            max_wait: self.max_wait.unwrap_or(global.max_wait),
        }
    }

    pub fn relation(&self) -> &Relation {
        &self.name
    }
}

impl Config {
    /// Reads, parses and validates `path`, then applies environment overrides.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        let env: HashMap<String, String> = std::env::vars().collect();
        Self::from_str_with_env(&text, path, &env)
    }

    /// Parses and validates `text` (as if read from `file`) with `env` as the environment.
    pub fn from_str_with_env(
        text: &str,
        file: &Path,
        env: &HashMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let invalid = |location: String, key: String, message: String| ConfigError::Invalid {
            file: file.to_owned(),
            location,
            key,
            message,
        };
        let de = toml::Deserializer::parse(text).map_err(|e| {
            invalid(
                location(text, e.span()),
                "(syntax)".into(),
                e.message().to_owned(),
            )
        })?;
        let mut config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = match e.path().to_string() {
                p if p == "." => "(top level)".to_owned(),
                p => p,
            };
            let inner = e.into_inner();
            invalid(
                location(text, inner.span()),
                key,
                inner.message().to_owned(),
            )
        })?;
        if let Some(url) = env.get(ENV_DATABASE_URL).filter(|u| !u.is_empty()) {
            config.database.url = url.clone();
        }
        if let Some(url) = env.get(ENV_ALERT_WEBHOOK_URL).filter(|u| !u.is_empty()) {
            config.alert.webhook_url = Some(Secret::new(url.clone()));
        }
        if let Some(url) = env.get(ENV_PG_CRON_DATABASE_URL).filter(|u| !u.is_empty()) {
            config.pg_cron.database_url = Some(Secret::new(url.clone()));
        }
        config.alert.secret = env
            .get(ENV_ALERT_SECRET)
            .filter(|s| !s.is_empty())
            .map(|s| Secret::new(s.clone()));
        config.http.admin_token = env
            .get(ENV_ADMIN_TOKEN)
            .filter(|t| !t.is_empty())
            .map(|t| Secret(t.clone()));
        if let Some(message) = config
            .http
            .admin_token
            .as_ref()
            .and_then(|t| admin_token_problem(t.expose()))
        {
            return Err(ConfigError::Env {
                var: ENV_ADMIN_TOKEN,
                message,
            });
        }
        if config
            .alert
            .secret
            .as_ref()
            .is_some_and(|s| s.expose().to_ascii_uppercase().contains(PLACEHOLDER))
        {
            return Err(ConfigError::Env {
                var: ENV_ALERT_SECRET,
                message: "is the placeholder of the examples; generate a secret with \
                          `openssl rand -hex 32`"
                    .to_owned(),
            });
        }
        config
            .validate()
            .map_err(|(key, message)| invalid(String::new(), key, message))?;
        Ok(config)
    }
}

/// `http.listen`: an address like `127.0.0.1:9187`, or empty for no server.
fn listen_address<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(de)?;
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "`{text}` is not an address like 127.0.0.1:9187 (empty turns the server off)"
        ))
    })
}

/// `line L, column C: ` for a byte span of `text`, or nothing.
fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |p| p + 1) + 1;
    format!("line {line}, column {column}: ")
}
