//! # mvrefresh
//!
//! A daemon that keeps PostgreSQL materialized views and `analytics_*` tables fresh within
//! seconds of the writes that change them, without blocking readers, losing a change, or failing
//! silently. This is the map.
//!
//! # Layout
//!
//! | module | concern |
//! |---|---|
//! | [`config`] | `config.toml` → one validated [`config::Config`]; errors name file and key |
//! | [`cli`] | the command line: parsing, dispatch |
//! | [`commands`] | one module per command (`run`, `install`, `refresh`, `check`, `status`) |
//! | [`install`] | the schema, the generated capture (row trigger, its inlined checks) and subscriptions, in one transaction |
//! | [`db`] | reaching PostgreSQL: URL, timeouts, the refresh pool, primary check |
//! | [`tls`] | `sslmode`/`sslrootcert`/`sslcert`/`sslkey` → the one rustls connector (`tls/certs.rs`: PEM files, the weaker modes' verifiers) |
//! | [`listener`] | the LISTEN connection: reconnect with backoff, heartbeat, a bounded inbox |
//! | [`logical`] | capture with no trigger: publication, slot, messages → keys (`logical/mod.rs`); the daemon's reader of the slot (`logical/reader.rs`); the replication protocol (`logical/stream.rs`); pgoutput's messages (`logical/pgoutput.rs`) |
//! | [`changelog`] | what a notification means (payloads of channels without capture) |
//! | [`store`] | every statement on mvrefresh's tables: collect, bounded reads, the hand-over guards, what a refresh consumes (`store/mod.rs`); history, last successes, the status rows (`store/history.rs`); schema version, captures, subscriptions, privileges (`store/schema.rs`); the pg_cron cursor (`store/cursor.rs`) |
//! | [`debounce`] | per-key `quiet` / `max_wait` debouncing, bounded, aware of the hand-over horizon |
//! | [`plan`] | resolving views in the catalog, dependency order |
//! | [`partition`] | mode `partitioned`: a table kept equal to a source view per key (checks, the difference statement, the table `install` creates) |
//! | [`refresh`] | one refresh transaction: lock, consume the guarded pending keys, refresh, record |
//! | [`daemon`] | the main loop tying them together (`daemon/mod.rs`: wiring; `daemon/startup.rs`: what it reads before the loop; `daemon/supervisor.rs`: the background tasks, one token tree, ordered stop; `daemon/scheduler.rs`: each view's scheduling state, dispatch, next wake-up, waiting for the views it reads, propagation to the views that read it; `daemon/breaker.rs`: retry backoff, busy replica, the circuit breaker; `daemon/outcomes.rs`: starting a refresh and what its outcome does; `daemon/events.rs`: the alerts' wording; `daemon/intake.rs`: collects, catch-ups, guards, pruning, the inbox; `daemon/task.rs`: one refresh and its liveness watch; `daemon/isolate.rs`: splitting failed batches, quarantining a failing key; `daemon/health.rs`: staleness and listener alerts) |
//! | [`alert`] | alert lifecycle per subject, typed subjects (`alert/mod.rs`); webhook delivery: queue, retries, signature (`alert/delivery.rs`) |
//! | [`pgcron`] | pg_cron: watch of failed and late job runs (`pgcron/watch.rs`), `install --pg-cron` jobs (`pgcron/jobs.rs`) |
//! | [`status`] | the status report from the database (`status`, `/status`) |
//! | [`telemetry`] | OpenTelemetry metrics: Prometheus registry and OTLP push |
//! | [`http`] | the admin server: health, readiness, metrics, status, manual refresh; bounded connections and timeouts |
//! | [`stats`] | live counters shared by tasks and readers |
//! | [`ratelimit`] | at most one log line per key and interval, with the count of the rest |
//! | [`shutdown`] | SIGTERM/SIGINT |
//! | [`sql`] | quoting of identifiers and literals |
//!
//! An event's path: writer's transaction → capture trigger (key already dirty: nothing; else a
//! `mvrefresh.dirty` row + `pg_notify`), or the write-ahead log → [`logical`] reader (the
//! same, in the daemon's transaction) → [`listener`] inbox → [`daemon`] collects the dirty
//! keys into per-view pending keys ([`store::collect`]) and notes them in the views'
//! [`debounce::Debouncer`]s → when due, past the hand-over horizon ([`store`]) and not waiting on
//! a dependency, a task runs [`refresh::refresh`] on a pooled connection → outcome back to
//! [`daemon`], dependents noted.
//! Failures and recoveries seen there (and by the listener and the [`pgcron`] watch) go through
//! an [`alert::Tracker`] to [`alert::Alerts`], whose own task posts them to the webhook.

pub mod alert;
pub mod changelog;
pub mod cli;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod db;
pub mod debounce;
pub mod http;
pub mod install;
pub mod listener;
pub mod logical;
pub mod partition;
pub mod pgcron;
pub mod plan;
pub mod ratelimit;
pub mod refresh;
pub mod shutdown;
pub mod sql;
pub mod stats;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod tls;

/// Installs the process-wide rustls crypto provider (ring) that every HTTP client needs (the
/// alert webhook, the OTLP exporter: reqwest is built without a provider of its own). Idempotent.
pub fn install_tls_provider() {
    // Err means a provider is already installed: fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Sets up `tracing` output as `[log]` asks; `RUST_LOG` wins over `level` when set.
pub fn init_logging(log: &config::LogConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let result = match log.format {
        config::LogFormat::Text => builder.try_init(),
        config::LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // A second initialisation (tests) keeps the first subscriber.
    let _ = result;
}
