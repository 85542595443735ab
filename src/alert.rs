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
//! | `test` | `test` (`mvrefresh check --test-alert`) | — |
//!
//! # Delivery
//!
//! [`Alerts::send`] logs the alert and puts it on a bounded in-memory queue; it never waits.
//! When the queue is full the oldest alert is dropped and counted
//! ([`Stats::alerts_dropped`]). One background task (`deliver`) posts the queue in order:
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

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use backon::{ExponentialBuilder, Retryable};
use hmac::{Hmac, KeyInit, Mac};
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{AlertConfig, AlertFormat, Secret};
use crate::stats::Stats;

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
            Kind::Test => "test",
        }
    }

    pub fn status(self) -> AlertStatus {
        match self {
            Kind::RefreshRecovered
            | Kind::CircuitClosed
            | Kind::ViewFresh
            | Kind::ListenerRecovered
            | Kind::PgCronJobRecovered => AlertStatus::Resolved,
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

/// The body and headers of `alert` as posted in `format`, signed with `secret`.
pub fn render(alert: &Alert, format: AlertFormat) -> Vec<u8> {
    let value = match format {
        AlertFormat::Json => serde_json::to_value(alert).unwrap_or_default(),
        AlertFormat::Slack => serde_json::json!({ "text": slack_text(alert) }),
    };
    serde_json::to_vec(&value).unwrap_or_default()
}

fn slack_text(alert: &Alert) -> String {
    let icon = match alert.status {
        AlertStatus::Firing => ":rotating_light:",
        AlertStatus::Resolved => ":white_check_mark:",
        AlertStatus::Test => ":information_source:",
    };
    let mut text = format!(
        "{icon} mvrefresh {} {}: {}",
        alert.kind.as_str(),
        slack_escape(&alert.subject),
        slack_escape(&alert.summary)
    );
    if let Some(e) = &alert.error {
        text.push_str(&format!("\n> {}", slack_escape(e)));
    }
    if alert.reminder {
        text.push_str(&format!(
            "\n(still open; {} repeats suppressed)",
            alert.suppressed
        ));
    }
    text
}

/// `text` as Slack's mrkdwn shows it literally: `&`, `<` and `>` escaped, so that an error text
/// cannot make a mention (`<!channel>`) or a link (`<http://x|y>`).
fn slack_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

/// `sha256=<hex>`: HMAC-SHA256 of `body` with `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// Why a POST failed. Never carries the URL.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("the webhook answered HTTP {0}")]
    Status(u16),
    #[error("{0}")]
    Request(String),
}

impl DeliveryError {
    /// Whether trying again may help (a 4xx other than 408/429 will not).
    pub fn is_retryable(&self) -> bool {
        match self {
            DeliveryError::Status(code) => *code >= 500 || *code == 408 || *code == 429,
            DeliveryError::Request(_) => true,
        }
    }
}

/// The webhook: URL, format, signing secret and an HTTP client. `Debug` shows neither URL nor
/// secret (nor the client, whose proxy settings may hold credentials).
#[derive(Clone)]
pub struct Webhook {
    url: Secret,
    format: AlertFormat,
    secret: Option<Secret>,
    client: reqwest::Client,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &self.url)
            .field("format", &self.format)
            .field("signed", &self.secret.is_some())
            .finish_non_exhaustive()
    }
}

impl Webhook {
    /// The webhook of `config`, or `None` when no URL is configured.
    pub fn new(config: &AlertConfig) -> Result<Option<Webhook>, DeliveryError> {
        let Some(url) = config.webhook_url.clone() else {
            return Ok(None);
        };
        crate::install_tls_provider();
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .user_agent(concat!("mvrefresh/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| DeliveryError::Request(error_text(e)))?;
        Ok(Some(Webhook {
            url,
            format: config.format,
            secret: config.secret.clone(),
            client,
        }))
    }

    /// One POST of `alert`.
    pub async fn post(&self, alert: &Alert) -> Result<(), DeliveryError> {
        let body = render(alert, self.format);
        let mut request = self
            .client
            .post(self.url.expose())
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        if let Some(secret) = &self.secret {
            request = request.header(
                SIGNATURE_HEADER,
                signature(secret.expose().as_bytes(), &body),
            );
        }
        let response = request
            .body(body)
            .send()
            .await
            .map_err(|e| DeliveryError::Request(error_text(e)))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(DeliveryError::Status(status.as_u16()))
        }
    }

    /// Whether the webhook answers at all (any HTTP status counts): a HEAD request.
    pub async fn probe(&self) -> Result<u16, DeliveryError> {
        self.client
            .head(self.url.expose())
            .send()
            .await
            .map(|r| r.status().as_u16())
            .map_err(|e| DeliveryError::Request(error_text(e)))
    }
}

/// A reqwest error with its causes and without the URL (which may hold a token).
fn error_text(e: reqwest::Error) -> String {
    let timeout = e.is_timeout();
    let e = e.without_url();
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    if timeout && !text.contains("timed out") {
        text.push_str(" (timed out)");
    }
    text
}

/// The queue shared by the senders and the delivery task.
#[derive(Debug)]
struct Queue {
    items: Mutex<VecDeque<Alert>>,
    /// Wakes the delivery task when an alert is queued.
    wake: Notify,
    capacity: usize,
}

/// The sending side: cheap to clone, never blocks. Without a webhook, alerts are only logged.
#[derive(Debug, Clone)]
pub struct Alerts {
    /// The delivery task ([`deliver`]) holds the other end; `None` without a webhook.
    queue: Option<Arc<Queue>>,
    stats: Arc<Stats>,
}

impl Alerts {
    /// Alerts that are only logged (no webhook).
    pub fn log_only(stats: Arc<Stats>) -> Alerts {
        Alerts { queue: None, stats }
    }

    /// Starts delivery to the webhook of `config` (when one is configured) until `cancel`.
    pub fn start(
        config: &AlertConfig,
        stats: Arc<Stats>,
        cancel: CancellationToken,
    ) -> Result<(Alerts, Option<tokio::task::JoinHandle<()>>), DeliveryError> {
        let Some(webhook) = Webhook::new(config)? else {
            return Ok((Alerts::log_only(stats), None));
        };
        let queue = Arc::new(Queue {
            items: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            capacity: config.queue_size,
        });
        let task = tokio::spawn(deliver(
            webhook,
            queue.clone(),
            config.clone(),
            stats.clone(),
            cancel,
        ));
        Ok((
            Alerts {
                queue: Some(queue),
                stats,
            },
            Some(task),
        ))
    }

    /// Logs `alert` and queues it for delivery; never waits.
    pub fn send(&self, alert: Alert) {
        match alert.status {
            AlertStatus::Firing => tracing::warn!(
                kind = alert.kind.as_str(),
                subject = %alert.subject,
                error = alert.error.as_deref().unwrap_or(""),
                reminder = alert.reminder,
                "alert: {}", alert.summary
            ),
            _ => tracing::info!(
                kind = alert.kind.as_str(),
                subject = %alert.subject,
                "alert: {}", alert.summary
            ),
        }
        let Some(queue) = &self.queue else {
            return;
        };
        if let Ok(mut items) = queue.items.lock() {
            items.push_back(alert);
            while items.len() > queue.capacity {
                items.pop_front();
                self.stats.alerts_dropped.inc();
                tracing::warn!("alert queue full: dropped the oldest alert");
            }
        }
        queue.wake.notify_one();
    }

    /// [`Tracker`] output: sends it when there is one.
    pub fn send_opt(&self, alert: Option<Alert>) {
        if let Some(a) = alert {
            self.send(a);
        }
    }
}

/// The delivery task: posts queued alerts in order, with retries, until `cancel`; then makes one
/// last attempt at what is left, within `[alert] timeout` in all.
async fn deliver(
    webhook: Webhook,
    queue: Arc<Queue>,
    config: AlertConfig,
    stats: Arc<Stats>,
    cancel: CancellationToken,
) {
    let backoff = ExponentialBuilder::default()
        .with_min_delay(config.retry_min)
        .with_max_delay(config.retry_max)
        .with_factor(2.0)
        .with_jitter()
        .with_max_times(config.max_attempts.saturating_sub(1));
    let pop = || queue.items.lock().ok().and_then(|mut q| q.pop_front());
    loop {
        let Some(alert) = pop() else {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = queue.wake.notified() => continue,
            }
        };
        let attempt = || webhook.post(&alert);
        let result = attempt
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(DeliveryError::is_retryable)
            .notify(|e, delay| {
                tracing::debug!(kind = alert.kind.as_str(), error = %e, retry_in = ?delay, "alert delivery failed; retrying");
            });
        tokio::select! {
            _ = cancel.cancelled() => {
                // Shutting down: put it back for the last attempt below.
                if let Ok(mut q) = queue.items.lock() {
                    q.push_front(alert);
                }
                break;
            }
            result = result => match result {
                Ok(()) => stats.alerts_sent.inc(),
                Err(e) => {
                    stats.alerts_failed.inc();
                    tracing::error!(kind = alert.kind.as_str(), subject = %alert.subject, error = %e, "alert could not be delivered");
                }
            },
        }
    }
    let flush = async {
        while let Some(alert) = pop() {
            match webhook.post(&alert).await {
                Ok(()) => stats.alerts_sent.inc(),
                Err(_) => stats.alerts_failed.inc(),
            }
        }
    };
    if tokio::time::timeout(config.timeout, flush).await.is_err() {
        tracing::warn!("alerts left undelivered at shutdown");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_print_as_documented() {
        let cases = [
            (Subject::View("mv_x".into()), "view:mv_x"),
            (
                Subject::Key {
                    view: "a_x".into(),
                    key: "42".into(),
                },
                "key:a_x:42",
            ),
            (Subject::Circuit("mv_x".into()), "circuit:mv_x"),
            (Subject::Stale("mv_x".into()), "stale:mv_x"),
            (Subject::Listener, "listener"),
            (
                Subject::PgCronJob("mvrefresh:mv_x".into()),
                "pg_cron_job:mvrefresh:mv_x",
            ),
            (Subject::PgCronRun(7), "pg_cron_run:7"),
            (Subject::Test, "test"),
        ];
        for (subject, text) in cases {
            assert_eq!(subject.to_string(), text);
        }
    }

    fn failed(n: u64) -> Event {
        Event::new(
            Kind::RefreshFailed,
            Subject::View("mv".into()),
            "refresh of mv failed",
        )
        .view("mv")
        .error("boom")
        .failures(n)
    }

    #[test]
    fn repeats_are_suppressed_until_repeat_after_and_recovery_closes() {
        let mut t = Tracker::new(Duration::from_secs(60), "h:1");
        let t0 = Instant::now();
        let first = t.fail(failed(1), t0).expect("opens");
        assert_eq!(first.status, AlertStatus::Firing);
        assert_eq!(first.consecutive_failures, Some(1));
        assert!(first.first_failure_at.is_some());
        for i in 2..10 {
            assert!(t.fail(failed(i), t0 + Duration::from_secs(i)).is_none());
        }
        let reminder = t.fail(failed(10), t0 + Duration::from_secs(61)).unwrap();
        assert!(reminder.reminder);
        assert_eq!(reminder.suppressed, 8);
        assert_eq!(reminder.first_failure_at, first.first_failure_at);
        let ok = Event::new(
            Kind::RefreshRecovered,
            Subject::View("mv".into()),
            "recovered",
        );
        let closed = t.recover(ok.clone()).unwrap();
        assert_eq!(closed.status, AlertStatus::Resolved);
        assert_eq!(closed.consecutive_failures, Some(10));
        assert!(t.recover(ok).is_none());
        assert!(!t.is_open(&Subject::View("mv".into())));
    }

    #[test]
    fn json_has_the_v1_fields_and_slack_has_text() {
        let a = failed(3).into_alert("h:1");
        let v: serde_json::Value = serde_json::from_slice(&render(&a, AlertFormat::Json)).unwrap();
        assert_eq!(v["schema"], SCHEMA);
        assert_eq!(v["kind"], "refresh_failed");
        assert_eq!(v["status"], "firing");
        assert_eq!(v["consecutive_failures"], 3);
        assert_eq!(v["view"], "mv");
        let s: serde_json::Value = serde_json::from_slice(&render(&a, AlertFormat::Slack)).unwrap();
        let text = s["text"].as_str().unwrap();
        assert!(
            text.contains("refresh_failed") && text.contains("boom"),
            "{text}"
        );
    }

    #[test]
    fn slack_text_cannot_mention_or_link() {
        let a = Event::new(
            Kind::RefreshFailed,
            Subject::View("<!here>".into()),
            "refresh of <@U123> failed & <!subteam^S1>",
        )
        .error("ERROR: value <!channel> in <http://evil.example|your bank> > 1 (detail: a&b)")
        .into_alert("h:1");
        let s: serde_json::Value = serde_json::from_slice(&render(&a, AlertFormat::Slack)).unwrap();
        let text = s["text"].as_str().unwrap();
        let (head, quoted) = text.split_once("\n> ").expect("the error is quoted");
        for part in [head, quoted] {
            assert!(!part.contains('<') && !part.contains('>'), "{text}");
        }
        assert!(text.contains("view:&lt;!here&gt;"), "{text}");
        assert!(
            text.contains("&lt;@U123&gt; failed &amp; &lt;!subteam^S1&gt;"),
            "{text}"
        );
        assert!(
            text.contains("&lt;!channel&gt; in &lt;http://evil.example|your bank&gt; &gt; 1 (detail: a&amp;b)"),
            "{text}"
        );
        assert_eq!(slack_escape("a & b"), "a &amp; b");
        assert_eq!(slack_escape("&amp;"), "&amp;amp;");
    }

    #[test]
    fn signature_matches_rfc4231_case_2() {
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts_it() {
        let stats = Arc::new(Stats::default());
        let queue = Arc::new(Queue {
            items: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            capacity: 3,
        });
        let alerts = Alerts {
            queue: Some(queue.clone()),
            stats: stats.clone(),
        };
        for n in 1..=5 {
            alerts.send(failed(n).into_alert("h:1"));
        }
        assert_eq!(stats.alerts_dropped.get(), 2);
        let kept: Vec<Option<u64>> = queue
            .items
            .lock()
            .unwrap()
            .iter()
            .map(|a| a.consecutive_failures)
            .collect();
        assert_eq!(kept, vec![Some(3), Some(4), Some(5)]);
    }

    #[test]
    fn webhook_debug_masks_url_and_secret() {
        let config = AlertConfig {
            webhook_url: Some(Secret::new("https://hooks.example/T0K3N")),
            secret: Some(Secret::new("s3cret")),
            ..AlertConfig::default()
        };
        let w = Webhook::new(&config).unwrap().unwrap();
        let shown = format!("{w:?}");
        assert!(
            !shown.contains("T0K3N") && !shown.contains("s3cret"),
            "{shown}"
        );
    }
}
