//! Delivery: rendering an alert (JSON or Slack), signing it, and posting the queue to the
//! webhook in order with retries.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};

use backon::{ExponentialBuilder, Retryable};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{AlertConfig, AlertFormat, Secret};
use crate::stats::Stats;

use super::*;

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
pub(super) fn slack_escape(text: &str) -> String {
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
pub(super) struct Queue {
    pub(super) items: Mutex<VecDeque<Alert>>,
    /// Wakes the delivery task when an alert is queued.
    pub(super) wake: Notify,
    pub(super) capacity: usize,
}

/// The sending side: cheap to clone, never blocks. Without a webhook, alerts are only logged.
#[derive(Debug, Clone)]
pub struct Alerts {
    /// The delivery task ([`deliver`]) holds the other end; `None` without a webhook.
    pub(super) queue: Option<Arc<Queue>>,
    pub(super) stats: Arc<Stats>,
}

impl Alerts {
    /// Alerts that are only logged (no webhook).
    pub fn log_only(stats: Arc<Stats>) -> Alerts {
        Alerts { queue: None, stats }
    }

    /// The alert queue, and the delivery to the webhook of `config` (when one is configured,
    /// for the caller to run) until `cancel`.
    pub fn start(
        config: &AlertConfig,
        stats: Arc<Stats>,
        cancel: CancellationToken,
    ) -> Result<(Alerts, Option<impl Future<Output = ()> + Send + 'static>), DeliveryError> {
        let Some(webhook) = Webhook::new(config)? else {
            return Ok((Alerts::log_only(stats), None));
        };
        let queue = Arc::new(Queue {
            items: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            capacity: config.queue_size,
        });
        let delivery = deliver(
            webhook,
            queue.clone(),
            config.clone(),
            stats.clone(),
            cancel,
        );
        Ok((
            Alerts {
                queue: Some(queue),
                stats,
            },
            Some(delivery),
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
