//! `config.toml`: parsed once into one validated [`Config`] value that is passed down, never a
//! global. Unknown keys are rejected; durations are humantime strings (`"2s"`, `"10m"`).
//!
//! Every key, its default and its meaning are documented in the shipped `config.toml`; the
//! defaults live here as named functions so the two can be compared (a unit test parses the
//! shipped file).
//!
//! Environment overrides: `MVREFRESH_DATABASE_URL` replaces `[database] url`,
//! `MVREFRESH_ALERT_WEBHOOK_URL` replaces `[alert] webhook_url`, and `MVREFRESH_ALERT_SECRET`
//! (never in the file) signs alert bodies.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::sql::Relation;

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
pub struct DatabaseConfig {
    /// libpq-style URL or key=value string. Never logged: it may hold a password.
    pub url: String,
    pub pool_size: usize,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    pub application_name: String,
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
    /// `host:port`; empty turns the server off. Loopback by default.
    pub listen: String,
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

/// A change-capture trigger generated by `mvrefresh install`: statement-level triggers on
/// `table` that record the `key` of every row that matters (`when`) and whose key, relevance or
/// `columns` changed, on `channel`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureConfig {
    pub name: String,
    pub table: String,
    pub channel: String,
    pub key: String,
    /// SQL predicate over the row's columns; rows where it is not true are ignored.
    #[serde(default)]
    pub when: Option<String>,
    #[serde(default)]
    pub columns: Vec<String>,
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
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Concurrently => "concurrently",
            Mode::Blocking => "blocking",
            Mode::Incremental => "incremental",
        }
    }

    /// Whole-view modes refresh everything whenever any key is due.
    pub fn is_whole_view(self) -> bool {
        !matches!(self, Mode::Incremental)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewConfig {
    pub name: String,
    pub mode: Mode,
    #[serde(default)]
    pub channels: Vec<String>,
    /// Incremental mode: the function called with the batch's keys.
    #[serde(default)]
    pub function: Option<String>,
    /// Replaces the dependencies discovered from the catalog.
    #[serde(default)]
    pub depends_on: Option<Vec<String>>,
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

impl Default for AlertConfig {
    fn default() -> Self {
        Self {
            webhook_url: None,
            format: AlertFormat::Json,
            repeat_after: Duration::from_secs(3600),
            listener_down_after: Duration::from_secs(60),
            circuit_failures: 5,
            circuit_probe_min: Duration::from_secs(30),
            circuit_probe_max: Duration::from_secs(600),
            queue_size: 1000,
            timeout: Duration::from_secs(10),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            max_attempts: 8,
            secret: None,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9187".to_owned(),
            max_connections: 32,
            admin_token: None,
        }
    }
}

impl Default for PgCronConfig {
    fn default() -> Self {
        Self {
            watch: true,
            database_url: None,
            poll_interval: Duration::from_secs(10),
        }
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            export_interval: Duration::from_secs(15),
            export_timeout: Duration::from_secs(10),
            service_name: "mvrefresh".to_owned(),
        }
    }
}

impl HttpConfig {
    /// The address to bind, or `None` when the server is off.
    pub fn address(&self) -> Option<std::net::SocketAddr> {
        let l = self.listen.trim();
        (!l.is_empty()).then(|| l.parse().expect("validated at load"))
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

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(3),
            reconnect_min: Duration::from_millis(250),
            reconnect_max: Duration::from_secs(30),
            catch_up_interval: Duration::from_secs(30),
            payload_key: "challenge_id".to_owned(),
        }
    }
}

impl Default for DebounceConfig {
    fn default() -> Self {
        Self {
            quiet: Duration::from_secs(2),
            max_wait: Duration::from_secs(15),
        }
    }
}

impl Default for RefreshConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(300),
            lock_timeout: Duration::from_secs(10),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            history_retention: Duration::from_secs(14 * 24 * 3600),
            shutdown_deadline: Duration::from_secs(30),
            concurrency: 2,
            max_pending_keys: 10_000,
            batch_keys: 1_000,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".to_owned(),
        }
    }
}

impl ViewConfig {
    /// The view's debounce settings: its own `quiet`/`max_wait` over `[debounce]`.
    pub fn debounce(&self, global: DebounceConfig) -> DebounceConfig {
        DebounceConfig {
            quiet: self.quiet.unwrap_or(global.quiet),
            max_wait: self.max_wait.unwrap_or(global.max_wait),
        }
    }

    pub fn relation(&self) -> Relation {
        Relation::parse(&self.name).expect("validated at load")
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

    /// Checks what serde cannot: ranges, references between sections, names.
    /// Returns the offending key and the problem.
    fn validate(&self) -> Result<(), (String, String)> {
        let err = |key: &str, msg: &str| Err((key.to_owned(), msg.to_owned()));
        if self.database.url.trim().is_empty() {
            return err(
                "database.url",
                &format!("is empty; set it or the environment variable {ENV_DATABASE_URL}"),
            );
        }
        // The whole connection setup, TLS files included: a bad one is a configuration error.
        if let Err(e) = crate::db::Db::new(&self.database) {
            return err("database.url", &e.problem());
        }
        if self.database.pool_size < 2 {
            return err("database.pool_size", "must be at least 2");
        }
        positive("database.connect_timeout", self.database.connect_timeout)?;
        positive(
            "listener.heartbeat_interval",
            self.listener.heartbeat_interval,
        )?;
        positive(
            "listener.heartbeat_timeout",
            self.listener.heartbeat_timeout,
        )?;
        positive("listener.reconnect_min", self.listener.reconnect_min)?;
        positive(
            "listener.catch_up_interval",
            self.listener.catch_up_interval,
        )?;
        if self.listener.reconnect_max < self.listener.reconnect_min {
            return err(
                "listener.reconnect_max",
                "must not be less than listener.reconnect_min",
            );
        }
        if self.listener.payload_key.is_empty() {
            return err("listener.payload_key", "must not be empty");
        }
        check_debounce("debounce", self.debounce)?;
        positive("refresh.timeout", self.refresh.timeout)?;
        positive("refresh.lock_timeout", self.refresh.lock_timeout)?;
        positive("refresh.retry_min", self.refresh.retry_min)?;
        positive("refresh.history_retention", self.refresh.history_retention)?;
        if self.refresh.retry_max < self.refresh.retry_min {
            return err(
                "refresh.retry_max",
                "must not be less than refresh.retry_min",
            );
        }
        if self.refresh.max_pending_keys == 0 {
            return err("refresh.max_pending_keys", "must be at least 1");
        }
        if self.refresh.batch_keys == 0 {
            return err("refresh.batch_keys", "must be at least 1");
        }
        if self.refresh.concurrency == 0 {
            return err("refresh.concurrency", "must be at least 1");
        }
        if self.refresh.concurrency >= self.database.pool_size {
            return err(
                "refresh.concurrency",
                "must be less than database.pool_size (one connection is kept for bookkeeping)",
            );
        }
        self.validate_alert()?;
        let listen = self.http.listen.trim();
        if !listen.is_empty() && listen.parse::<std::net::SocketAddr>().is_err() {
            return err(
                "http.listen",
                &format!(
                    "`{listen}` is not an address like 127.0.0.1:9187 (empty turns the server off)"
                ),
            );
        }
        if !(1..=10_000).contains(&self.http.max_connections) {
            return err("http.max_connections", "must be between 1 and 10000");
        }
        positive("telemetry.export_interval", self.telemetry.export_interval)?;
        positive("telemetry.export_timeout", self.telemetry.export_timeout)?;
        if let Some(e) = &self.telemetry.otlp_endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return err(
                    "telemetry.otlp_endpoint",
                    "must be an http:// or https:// URL",
                );
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return err("log.level", &format!("is not a valid filter: {e}"));
        }

        let mut capture_names = BTreeSet::new();
        for (i, c) in self.captures.iter().enumerate() {
            let at = |field: &str| format!("capture[{i}].{field}");
            if !is_simple_name(&c.name) {
                return err(
                    &at("name"),
                    &format!(
                        "must be 1 to {} letters, digits and underscores (it names the triggers and functions)",
                        crate::install::MAX_CAPTURE_NAME
                    ),
                );
            }
            if !capture_names.insert(c.name.as_str()) {
                return err(&at("name"), &format!("`{}` is used twice", c.name));
            }
            if let Err(e) = Relation::parse(&c.table) {
                return err(&at("table"), &e);
            }
            check_channel(&at("channel"), &c.channel)?;
            if c.key.is_empty() {
                return err(&at("key"), "must name the key column");
            }
            if c.when.as_deref().is_some_and(|w| w.trim().is_empty()) {
                return err(&at("when"), "is empty; leave it out to capture every row");
            }
        }

        if self.views.is_empty() {
            return err("view", "at least one [[view]] is required");
        }
        let mut names = BTreeMap::new();
        for (i, v) in self.views.iter().enumerate() {
            let rel = Relation::parse(&v.name).map_err(|e| (format!("view[{i}].name"), e))?;
            if let Some(j) = names.insert(rel.canonical(), i) {
                return err(
                    &format!("view[{i}].name"),
                    &format!("`{}` is also view[{j}]", v.name),
                );
            }
        }
        for (i, v) in self.views.iter().enumerate() {
            let at = |field: &str| format!("view[{i}].{field}");
            for (j, ch) in v.channels.iter().enumerate() {
                check_channel(&format!("view[{i}].channels[{j}]"), ch)?;
            }
            match (v.mode, &v.function) {
                (Mode::Incremental, None) => {
                    return err(&at("function"), "is required in mode `incremental`")
                }
                (Mode::Incremental, Some(f)) => {
                    Relation::parse(f).map_err(|e| (at("function"), e))?;
                }
                (_, Some(_)) => return err(&at("function"), "is only used in mode `incremental`"),
                (_, None) => {}
            }
            if let Some(deps) = &v.depends_on {
                for (j, d) in deps.iter().enumerate() {
                    let key = format!("view[{i}].depends_on[{j}]");
                    let rel = Relation::parse(d).map_err(|e| (key.clone(), e))?;
                    if !names.contains_key(&rel.canonical()) {
                        return err(&key, &format!("`{d}` is not a configured [[view]]"));
                    }
                    if rel.canonical() == v.relation().canonical() {
                        return err(&key, "a view cannot depend on itself");
                    }
                }
            }
            for (field, d) in [
                ("schedule", v.schedule),
                ("max_staleness", v.max_staleness),
                ("timeout", v.timeout),
            ] {
                if let Some(d) = d {
                    positive(&at(field), d)?;
                }
            }
            check_debounce(&format!("view[{i}]"), v.debounce(self.debounce))?;
        }
        Ok(())
    }
}

impl Config {
    fn validate_alert(&self) -> Result<(), (String, String)> {
        let err = |key: &str, msg: &str| Err((key.to_owned(), msg.to_owned()));
        let a = &self.alert;
        if let Some(url) = &a.webhook_url {
            let u = url.expose();
            // Never echo the URL: it may carry a token.
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return err(
                    "alert.webhook_url",
                    &format!("must be an http:// or https:// URL (or set {ENV_ALERT_WEBHOOK_URL})"),
                );
            }
            if reqwest::Url::parse(u).is_err() {
                return err("alert.webhook_url", "is not a valid URL");
            }
        }
        positive("alert.repeat_after", a.repeat_after)?;
        positive("alert.listener_down_after", a.listener_down_after)?;
        positive("alert.circuit_probe_min", a.circuit_probe_min)?;
        if a.circuit_probe_max < a.circuit_probe_min {
            return err(
                "alert.circuit_probe_max",
                "must not be less than alert.circuit_probe_min",
            );
        }
        if a.queue_size == 0 {
            return err("alert.queue_size", "must be at least 1");
        }
        positive("alert.timeout", a.timeout)?;
        positive("alert.retry_min", a.retry_min)?;
        if a.retry_max < a.retry_min {
            return err("alert.retry_max", "must not be less than alert.retry_min");
        }
        if a.max_attempts == 0 {
            return err("alert.max_attempts", "must be at least 1");
        }
        positive("pg_cron.poll_interval", self.pg_cron.poll_interval)?;
        if let Some(url) = &self.pg_cron.database_url {
            // Same checks as database.url (TLS files included); the problem never echoes the URL.
            let mut settings = self.database.clone();
            settings.url = url.expose().to_owned();
            if let Err(e) = crate::db::Db::new(&settings) {
                return err("pg_cron.database_url", &e.problem());
            }
        }
        Ok(())
    }
}

fn positive(key: &str, d: Duration) -> Result<(), (String, String)> {
    if d.is_zero() {
        Err((key.to_owned(), "must be greater than zero".to_owned()))
    } else {
        Ok(())
    }
}

fn check_debounce(prefix: &str, d: DebounceConfig) -> Result<(), (String, String)> {
    positive(&format!("{prefix}.max_wait"), d.max_wait)?;
    if d.quiet > d.max_wait {
        return Err((
            format!("{prefix}.quiet"),
            format!(
                "({}) must not exceed max_wait ({})",
                humantime::format_duration(d.quiet),
                humantime::format_duration(d.max_wait)
            ),
        ));
    }
    Ok(())
}

fn check_channel(key: &str, channel: &str) -> Result<(), (String, String)> {
    if channel.is_empty() || channel.len() > 63 || channel.contains('\0') {
        return Err((
            key.to_owned(),
            "a channel name must be 1 to 63 bytes".to_owned(),
        ));
    }
    Ok(())
}

fn is_simple_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= crate::install::MAX_CAPTURE_NAME
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_str_with_env(text, Path::new("test.toml"), &HashMap::new())
    }

    const MINIMAL: &str = r#"
[database]
url = "postgres://localhost/app"
[[view]]
name = "mv_a"
mode = "concurrently"
channels = ["c"]
"#;

    #[test]
    fn shipped_config_parses() {
        let text = include_str!("../config.toml");
        let c = Config::from_str_with_env(text, Path::new("config.toml"), &HashMap::new())
            .expect("shipped config.toml is valid");
        assert_eq!(c.views.len(), 8);
        assert_eq!(c.debounce.quiet, Duration::from_secs(2));
        // The documented values are the defaults.
        let d = AlertConfig::default();
        assert_eq!(c.alert.webhook_url, None);
        assert_eq!(c.alert.format, d.format);
        assert_eq!(c.alert.repeat_after, d.repeat_after);
        assert_eq!(c.alert.listener_down_after, d.listener_down_after);
        assert_eq!(c.alert.circuit_failures, d.circuit_failures);
        assert_eq!(c.alert.circuit_probe_min, d.circuit_probe_min);
        assert_eq!(c.alert.circuit_probe_max, d.circuit_probe_max);
        assert_eq!(c.alert.queue_size, d.queue_size);
        assert_eq!(c.alert.timeout, d.timeout);
        assert_eq!(c.alert.retry_min, d.retry_min);
        assert_eq!(c.alert.retry_max, d.retry_max);
        assert_eq!(c.alert.max_attempts, d.max_attempts);
        assert_eq!(c.pg_cron.watch, PgCronConfig::default().watch);
        assert_eq!(c.pg_cron.poll_interval, Duration::from_secs(10));
        assert_eq!(c.http.max_connections, 32);
        assert_eq!(c.refresh.max_pending_keys, 10_000);
        assert_eq!(c.refresh.batch_keys, 1_000);
    }

    #[test]
    fn a_capture_name_must_fit_every_generated_identifier() {
        let with = |name: &str| {
            format!(
                "{MINIMAL}[[capture]]\nname = \"{name}\"\ntable = \"t\"\nchannel = \"c\"\nkey = \"k\"\n"
            )
        };
        let longest = "n".repeat(crate::install::MAX_CAPTURE_NAME);
        assert!(parse(&with(&longest)).is_ok());
        let e = parse(&with(&format!("{longest}n")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("capture[0].name"), "{e}");
        assert!(e.contains("1 to 36"), "{e}");
    }

    #[test]
    fn defaults_apply() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.listener.catch_up_interval, Duration::from_secs(30));
        assert_eq!(
            c.views[0].debounce(c.debounce).max_wait,
            Duration::from_secs(15)
        );
    }

    #[test]
    fn env_overrides_url() {
        let env = HashMap::from([(
            ENV_DATABASE_URL.to_owned(),
            "postgres://other/db".to_owned(),
        )]);
        let c = Config::from_str_with_env(MINIMAL, Path::new("x.toml"), &env).unwrap();
        assert_eq!(c.database.url, "postgres://other/db");
    }

    #[test]
    fn unknown_key_names_file_key_and_line() {
        let text = MINIMAL.replace("[[view]]", "[debounce]\nquite = \"1s\"\n[[view]]");
        let msg = parse(&text).unwrap_err().to_string();
        assert!(msg.starts_with("test.toml: line 5"), "{msg}");
        assert!(msg.contains("quite"), "{msg}");
    }

    #[test]
    fn bad_duration_names_key() {
        let text = MINIMAL.replace("[[view]]", "[debounce]\nquiet = \"soon\"\n[[view]]");
        let msg = parse(&text).unwrap_err().to_string();
        assert!(msg.contains("key `debounce.quiet`"), "{msg}");
    }

    #[test]
    fn quiet_above_max_wait_rejected() {
        let text = MINIMAL.replace(
            "[[view]]",
            "[debounce]\nquiet = \"20s\"\nmax_wait = \"5s\"\n[[view]]",
        );
        let msg = parse(&text).unwrap_err().to_string();
        assert!(msg.contains("key `debounce.quiet`"), "{msg}");
    }

    #[test]
    fn incremental_needs_function() {
        let text = MINIMAL.replace("concurrently", "incremental");
        let msg = parse(&text).unwrap_err().to_string();
        assert!(msg.contains("key `view[0].function`"), "{msg}");
    }

    #[test]
    fn unknown_dependency_rejected() {
        let text = format!("{MINIMAL}depends_on = [\"mv_b\"]\n");
        let msg = parse(&text).unwrap_err().to_string();
        assert!(msg.contains("view[0].depends_on[0]"), "{msg}");
    }

    #[test]
    fn duplicate_view_rejected() {
        let text = format!("{MINIMAL}[[view]]\nname = \"MV_A\"\nmode = \"blocking\"\n");
        let msg = parse(&text).unwrap_err().to_string();
        assert!(msg.contains("view[1].name"), "{msg}");
    }

    #[test]
    fn alert_env_overrides_and_masks() {
        let text = MINIMAL.replace(
            "[[view]]",
            "[alert]\nwebhook_url = \"http://file/hook\"\n[[view]]",
        );
        let env = HashMap::from([
            (
                ENV_ALERT_WEBHOOK_URL.to_owned(),
                "https://hooks.example/T0K3N".to_owned(),
            ),
            (ENV_ALERT_SECRET.to_owned(), "s3cret".to_owned()),
        ]);
        let c = Config::from_str_with_env(&text, Path::new("x.toml"), &env).unwrap();
        assert_eq!(
            c.alert.webhook_url.as_ref().unwrap().expose(),
            "https://hooks.example/T0K3N"
        );
        let shown = format!("{c:?}");
        assert!(!shown.contains("T0K3N"), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn a_section_that_sets_some_keys_keeps_the_defaults_of_the_others() {
        let text = MINIMAL.replace(
            "[[view]]",
            "[debounce]\nquiet = \"1s\"\n[alert]\nformat = \"slack\"\n[pg_cron]\nwatch = false\n\
             [refresh]\nbatch_keys = 10\n[[view]]",
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.debounce.quiet, Duration::from_secs(1));
        assert_eq!(c.debounce.max_wait, DebounceConfig::default().max_wait);
        assert_eq!(c.alert.format, AlertFormat::Slack);
        assert_eq!(c.alert.max_attempts, AlertConfig::default().max_attempts);
        assert!(!c.pg_cron.watch);
        assert_eq!(
            c.pg_cron.poll_interval,
            PgCronConfig::default().poll_interval
        );
        assert_eq!(c.refresh.batch_keys, 10);
        assert_eq!(c.refresh.timeout, RefreshConfig::default().timeout);
        assert_eq!(c.database.pool_size, DatabaseConfig::default().pool_size);
        // And a section left out is its defaults.
        assert_eq!(
            c.listener.payload_key,
            ListenerConfig::default().payload_key
        );
        assert!(PgCronConfig::default().watch);
    }

    fn with_env(text: &str, pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_str_with_env(text, Path::new("x.toml"), &env)
    }

    #[test]
    fn admin_tokens_too_short_or_placeholders_are_refused_without_echo() {
        let cases = [
            ("sh0rt-T0K3N", "at least 32"),
            ("CHANGE-ME", "placeholder"),
            ("change-me-T0K3N-0123456789abcdef0123456789", "placeholder"),
            ("T0K3N0123456789abcdef0123456789abcdef\n", "printable ASCII"),
            ("T0K3N 0123456789abcdef0123456789abcdef", "printable ASCII"),
        ];
        for (token, expected) in cases {
            let e = with_env(MINIMAL, &[(ENV_ADMIN_TOKEN, token)]).unwrap_err();
            assert!(matches!(e, ConfigError::Env { .. }), "{e:?}");
            let msg = e.to_string();
            assert!(msg.contains(ENV_ADMIN_TOKEN), "{msg}");
            assert!(msg.contains(expected), "{msg}");
            assert!(msg.contains("openssl rand -hex 32"), "{msg}");
            assert!(!msg.contains("T0K3N"), "the token is echoed: {msg}");
        }
        let token = "0123456789abcdef0123456789abcdef";
        let c = with_env(MINIMAL, &[(ENV_ADMIN_TOKEN, token)]).unwrap();
        assert_eq!(c.http.admin_token.unwrap().expose(), token);
        // Empty is unset: manual refresh off.
        assert!(with_env(MINIMAL, &[(ENV_ADMIN_TOKEN, "")])
            .unwrap()
            .http
            .admin_token
            .is_none());
    }

    #[test]
    fn the_placeholder_alert_secret_is_refused() {
        let msg = with_env(MINIMAL, &[(ENV_ALERT_SECRET, "CHANGE-ME")])
            .unwrap_err()
            .to_string();
        assert!(msg.contains(ENV_ALERT_SECRET), "{msg}");
        assert!(msg.contains("openssl rand -hex 32"), "{msg}");
    }

    #[test]
    fn listening_beyond_loopback_needs_a_token() {
        let token = "0123456789abcdef0123456789abcdef";
        let listen = |addr: &str| {
            MINIMAL.replace(
                "[[view]]",
                &format!("[http]\nlisten = \"{addr}\"\n[[view]]"),
            )
        };
        for open in ["0.0.0.0:9187", "[::]:9187", "10.1.2.3:9187"] {
            let c = with_env(&listen(open), &[]).unwrap();
            let problem = c.http.exposure_problem().expect(open);
            assert!(problem.contains(ENV_ADMIN_TOKEN), "{problem}");
            assert!(problem.contains("http.listen"), "{problem}");
            let c = with_env(&listen(open), &[(ENV_ADMIN_TOKEN, token)]).unwrap();
            assert_eq!(c.http.exposure_problem(), None);
        }
        for closed in ["127.0.0.1:9187", "[::1]:9187", ""] {
            let c = with_env(&listen(closed), &[]).unwrap();
            assert_eq!(c.http.exposure_problem(), None, "{closed}");
        }
    }

    #[test]
    fn max_connections_is_bounded() {
        for bad in [0, 10_001] {
            let text = MINIMAL.replace(
                "[[view]]",
                &format!("[http]\nmax_connections = {bad}\n[[view]]"),
            );
            let msg = parse(&text).unwrap_err().to_string();
            assert!(msg.contains("key `http.max_connections`"), "{msg}");
        }
        assert_eq!(parse(MINIMAL).unwrap().http.max_connections, 32);
    }

    #[test]
    fn bad_webhook_url_names_key_without_echo() {
        let text = MINIMAL.replace(
            "[[view]]",
            "[alert]\nwebhook_url = \"ftp://T0K3N@x\"\n[[view]]",
        );
        let msg = parse(&text).unwrap_err().to_string();
        assert!(msg.contains("key `alert.webhook_url`"), "{msg}");
        assert!(!msg.contains("T0K3N"), "{msg}");
    }

    #[test]
    fn bad_url_does_not_echo_password() {
        let text = MINIMAL.replace(
            "postgres://localhost/app",
            "postgres://u:s3cret@localhost:notaport/app",
        );
        let msg = parse(&text).unwrap_err().to_string();
        assert!(msg.contains("database.url"), "{msg}");
        assert!(!msg.contains("s3cret"), "{msg}");
    }

    #[test]
    fn bad_tls_settings_name_key_and_file_without_the_password() {
        let cases = [
            ("sslmode=verify_full", "sslmode=verify_full is not one of"),
            (
                "sslmode=verify-full",
                "sslmode=verify-full needs sslrootcert",
            ),
            (
                "sslmode=verify-ca&sslrootcert=%2Fno%2Fsuch%2Fca.pem",
                "sslrootcert=/no/such/ca.pem: cannot read",
            ),
        ];
        for (query, expected) in cases {
            let url = format!("postgres://u:s3cret@localhost/app?{query}");
            let msg = parse(&MINIMAL.replace("postgres://localhost/app", &url))
                .unwrap_err()
                .to_string();
            assert!(msg.contains("key `database.url`"), "{msg}");
            assert!(msg.contains(expected), "{msg}");
            assert!(!msg.contains("s3cret"), "{msg}");
        }
    }
}
