//! Alerts: the lifecycle of each problem, and delivery to the webhook.
//!
//! # Lifecycle
//!
//! Every alert is about a *subject*: a view's refreshes (`view:<name>`), its circuit
//! (`circuit:<name>`), its freshness (`stale:<name>`), the listener (`listener`), a pg_cron job
//! (`pg_cron_job:<jobname>`). A [`Tracker`] keeps one state per subject:
//!
//! ```text
//!            fail ─▶ send "firing" (count 1, first failure time)
//!   Closed ─────────────────────────────────────────────▶ Open
//!     ▲                                                 │  │ fail: count += 1; suppressed,
//!     │        recover ─▶ send "resolved"               │  │ unless `repeat_after` passed since
//!     └─────────────────────────────────────────────────┘  │ the last send: then a reminder
//!                                                          ◀┘ (`reminder: true`, `suppressed`)
//! ```
//!
//! `recover` on a closed subject sends nothing, so a success after a success is silent.
//! A failed pg_cron *run* is an event of its own, not a state: each failed run is sent exactly
//! once (see [`crate::pgcron`]).
//!
//! | subject | opens with | closes with |
//! |---|---|---|
//! | `view:<v>` | `refresh_failed` | `refresh_recovered` |
//! | `circuit:<v>` | `circuit_opened` | `circuit_closed` |
//! | `stale:<v>` | `view_stale` | `view_fresh` |
//! | `listener` | `listener_down` | `listener_recovered` |
//! | `pg_cron_job:<j>` | `pg_cron_job_late` | `pg_cron_job_recovered` |
//! | `pg_cron_run:<runid>` | `pg_cron_job_failed` (event) | — |
//! | `slot:<s>` | `slot_lost` (event) | — |
//! | `slot_lag:<s>` | `slot_lagging` | `slot_recovered` |
//! | `partitions:<c>` | `partitions_not_ready` | `partitions_ready` |
//! | `test` | `test` (`mvrefresh check --test-alert`) | — |
//!
//! # Delivery
//!
//! [`Alerts::send`] logs the alert and puts it on a bounded in-memory queue; it never waits.
//! When the queue is full the oldest alert is dropped and counted
//! ([`crate::stats::Stats::alerts_dropped`]). One background task (`deliver`) posts the queue in order:
//! each POST has `[alert] timeout`, failures (connection errors, timeouts, 429 and 5xx) are
//! retried with jittered exponential backoff (`retry_min`..`retry_max`, `max_attempts` in all),
//! then the alert is counted as failed and the next one is tried. Refreshes never wait for it.
//!
//! # JSON schema `mvrefresh.alert/v1`
//!
//! `format = "json"` posts this object (`Content-Type: application/json`); fields are never
//! removed or retyped within `v1`, new optional fields may be added.
//!
//! | field | type | meaning |
//! |---|---|---|
//! | `schema` | string | always `"mvrefresh.alert/v1"` |
//! | `id` | string | unique per message |
//! | `kind` | string | one of the kinds in the table above |
//! | `status` | string | `"firing"`, `"resolved"` or `"test"` |
//! | `subject` | string | what the alert is about (`view:mv_x`, `listener`, …) |
//! | `view` | string or null | the view concerned |
//! | `summary` | string | one human-readable line |
//! | `error` | string or null | the error text (server message, detail, hint) |
//! | `consecutive_failures` | integer or null | failures in a row so far |
//! | `first_failure_at` | string or null | RFC 3339 UTC time the subject's problem began |
//! | `sent_at` | string | RFC 3339 UTC time this message was made |
//! | `reminder` | bool | a repeat of an alert still open after `repeat_after` |
//! | `suppressed` | integer | repeats not sent since the previous message of this subject |
//! | `source` | string | the replica that sent it (`host:pid`) |
//! | `details` | object | kind-specific numbers and names (see `docs/alerts.md`) |
//!
//! `format = "slack"` posts `{"text": "<status icon> mvrefresh <kind> <subject>: <summary>"}`,
//! the error quoted on a second line; subject, summary and error are escaped for Slack's mrkdwn
//! (`&`, `<`, `>`), so they cannot mention or link.
//!
//! With `MVREFRESH_ALERT_SECRET` set, every POST carries
//! `X-Mvrefresh-Signature: sha256=<hex HMAC-SHA256 of the exact body with the secret>`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

mod delivery;
#[cfg(test)]
mod tests;

pub use delivery::{render, signature, Alerts, DeliveryError, Webhook};

/// The `schema` field of every JSON alert.
pub const SCHEMA: &str = "mvrefresh.alert/v1";
/// The header carrying the body's signature.
pub const SIGNATURE_HEADER: &str = "X-Mvrefresh-Signature";

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    RefreshFailed,
    RefreshRecovered,
    CircuitOpened,
    CircuitClosed,
    ViewStale,
    ViewFresh,
    ListenerDown,
    ListenerRecovered,
    PgCronJobFailed,
    PgCronJobLate,
    PgCronJobRecovered,
    SlotLost,
    SlotLagging,
    SlotRecovered,
    PartitionsNotReady,
    PartitionsReady,
    Test,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::RefreshFailed => "refresh_failed",
            Kind::RefreshRecovered => "refresh_recovered",
            Kind::CircuitOpened => "circuit_opened",
            Kind::CircuitClosed => "circuit_closed",
            Kind::ViewStale => "view_stale",
            Kind::ViewFresh => "view_fresh",
            Kind::ListenerDown => "listener_down",
            Kind::ListenerRecovered => "listener_recovered",
            Kind::PgCronJobFailed => "pg_cron_job_failed",
            Kind::PgCronJobLate => "pg_cron_job_late",
            Kind::PgCronJobRecovered => "pg_cron_job_recovered",
            Kind::SlotLost => "slot_lost",
            Kind::SlotLagging => "slot_lagging",
            Kind::SlotRecovered => "slot_recovered",
            Kind::PartitionsNotReady => "partitions_not_ready",
            Kind::PartitionsReady => "partitions_ready",
            Kind::Test => "test",
        }
    }

    pub fn status(self) -> AlertStatus {
        match self {
            Kind::RefreshRecovered
            | Kind::CircuitClosed
            | Kind::ViewFresh
            | Kind::ListenerRecovered
            | Kind::PgCronJobRecovered
            | Kind::SlotRecovered
            | Kind::PartitionsReady => AlertStatus::Resolved,
            Kind::Test => AlertStatus::Test,
            _ => AlertStatus::Firing,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertStatus {
    Firing,
    Resolved,
    Test,
}

/// One message, as posted (the `v1` schema).
#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    pub schema: &'static str,
    pub id: String,
    pub kind: Kind,
    pub status: AlertStatus,
    pub subject: String,
    pub view: Option<String>,
    pub summary: String,
    pub error: Option<String>,
    pub consecutive_failures: Option<u64>,
    pub first_failure_at: Option<String>,
    pub sent_at: String,
    pub reminder: bool,
    pub suppressed: u64,
    pub source: String,
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// What an alert is about; its text (`view:mv_x`, `listener`, …) is the `subject` of the JSON
/// document and the key of the [`Tracker`]'s state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A view's refreshes.
    View(String),
    /// One key of an incremental view, quarantined because its refresh fails.
    Key { view: String, key: String },
    /// A view's circuit breaker.
    Circuit(String),
    /// A view's freshness (`max_staleness`).
    Stale(String),
    /// The LISTEN connection.
    Listener,
    /// A pg_cron job's lateness.
    PgCronJob(String),
    /// One failed pg_cron run.
    PgCronRun(i64),
    /// A logical capture's replication slot, lost and created again.
    Slot(String),
    /// The write-ahead log a logical capture's replication slot holds back.
    SlotLag(String),
    /// The partitions of a logical capture's table (by capture), not ready for it.
    Partitions(String),
    /// `check --test-alert`.
    Test,
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::View(v) => write!(f, "view:{v}"),
            Subject::Key { view, key } => write!(f, "key:{view}:{key}"),
            Subject::Circuit(v) => write!(f, "circuit:{v}"),
            Subject::Stale(v) => write!(f, "stale:{v}"),
            Subject::Listener => f.write_str("listener"),
            Subject::PgCronJob(j) => write!(f, "pg_cron_job:{j}"),
            Subject::PgCronRun(r) => write!(f, "pg_cron_run:{r}"),
            Subject::Slot(s) => write!(f, "slot:{s}"),
            Subject::SlotLag(s) => write!(f, "slot_lag:{s}"),
            Subject::Partitions(c) => write!(f, "partitions:{c}"),
            Subject::Test => f.write_str("test"),
        }
    }
}

/// What a caller knows about a failure or a recovery; the [`Tracker`] adds the lifecycle.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: Kind,
    pub subject: String,
    pub view: Option<String>,
    pub summary: String,
    pub error: Option<String>,
    /// Failures in a row, when the caller counts them (refreshes do).
    pub failures: Option<u64>,
    pub details: serde_json::Map<String, serde_json::Value>,
}

impl Event {
    pub fn new(kind: Kind, subject: Subject, summary: impl Into<String>) -> Event {
        Event {
            kind,
            subject: subject.to_string(),
            view: None,
            summary: summary.into(),
            error: None,
            failures: None,
            details: serde_json::Map::new(),
        }
    }

    pub fn view(mut self, view: &str) -> Event {
        self.view = Some(view.to_owned());
        self
    }

    pub fn error(mut self, error: impl Into<String>) -> Event {
        self.error = Some(error.into());
        self
    }

    pub fn failures(mut self, n: u64) -> Event {
        self.failures = Some(n);
        self
    }

    pub fn detail(mut self, key: &str, value: impl Into<serde_json::Value>) -> Event {
        self.details.insert(key.to_owned(), value.into());
        self
    }

    /// The message for this event as it stands, outside any lifecycle (events, tests).
    pub fn into_alert(self, source: &str) -> Alert {
        self.build(source, None, false, 0)
    }

    fn build(
        self,
        source: &str,
        first: Option<SystemTime>,
        reminder: bool,
        suppressed: u64,
    ) -> Alert {
        Alert {
            schema: SCHEMA,
            id: next_id(),
            kind: self.kind,
            status: self.kind.status(),
            subject: self.subject,
            view: self.view,
            summary: self.summary,
            error: self.error,
            consecutive_failures: self.failures,
            first_failure_at: first.map(rfc3339),
            sent_at: rfc3339(SystemTime::now()),
            reminder,
            suppressed,
            source: source.to_owned(),
            details: self.details,
        }
    }
}

/// RFC 3339 UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn next_id() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    format!(
        "{ms:x}-{:x}-{:x}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// An open problem of one subject.
#[derive(Debug, Clone)]
struct Open {
    first_wall: SystemTime,
    last_sent: Instant,
    count: u64,
    suppressed: u64,
}

/// The lifecycle of every subject (see the module doc). Plain data: its owner calls it from one
/// task, with the time passed in, so it is tested without clocks.
#[derive(Debug)]
pub struct Tracker {
    repeat_after: Duration,
    source: String,
    open: HashMap<String, Open>,
}

impl Tracker {
    pub fn new(repeat_after: Duration, source: impl Into<String>) -> Tracker {
        Tracker {
            repeat_after,
            source: source.into(),
            open: HashMap::new(),
        }
    }

    /// A failure of `event.subject` at `now`: the message to send, if any.
    pub fn fail(&mut self, mut event: Event, now: Instant) -> Option<Alert> {
        match self.open.get_mut(&event.subject) {
            None => {
                let first_wall = SystemTime::now();
                self.open.insert(
                    event.subject.clone(),
                    Open {
                        first_wall,
                        last_sent: now,
                        count: 1,
                        suppressed: 0,
                    },
                );
                Some(event.build(&self.source, Some(first_wall), false, 0))
            }
            Some(open) => {
                open.count += 1;
                if now.saturating_duration_since(open.last_sent) < self.repeat_after {
                    open.suppressed += 1;
                    return None;
                }
                let suppressed = std::mem::take(&mut open.suppressed);
                open.last_sent = now;
                event.failures = event.failures.or(Some(open.count));
                Some(event.build(&self.source, Some(open.first_wall), true, suppressed))
            }
        }
    }

    /// A recovery of `event.subject`: the closing message when it was open.
    pub fn recover(&mut self, mut event: Event) -> Option<Alert> {
        let open = self.open.remove(&event.subject)?;
        event.failures = event.failures.or(Some(open.count));
        Some(event.build(&self.source, Some(open.first_wall), false, open.suppressed))
    }

    pub fn is_open(&self, subject: &Subject) -> bool {
        self.open.contains_key(&subject.to_string())
    }

    pub fn source(&self) -> &str {
        &self.source
    }
}
