//! The LISTEN connection.
//!
//! One dedicated connection (never from the pool), driven through `poll_message`, because
//! notifications arrive only there. States and transitions:
//!
//! ```text
//!   Connecting ──ok──▶ Listening ──heartbeat timeout / error / server gone──▶ Backoff
//!       ▲  │                                                                     │
//!       │  └──error (refused, standby, timeout)──▶ Backoff ◀──────────────────────┘
//!       └──────────────── sleep (capped exponential, jittered; cancellable) ───────┘
//! ```
//!
//! In `Listening` it has LISTENed on every channel and sent [`ListenerEvent::Up`], upon which the
//! daemon collects the dirty keys and reads what is pending (whatever happened while it was away
//! is there), and treats every channel without capture as "everything may have changed" (its
//! notifications were missed). A heartbeat query runs every `heartbeat_interval` under
//! `heartbeat_timeout`: TCP keepalives do not notice a stalled peer, a query does. The backoff
//! resets once a connection is listening.
//!
//! Notifications never wait for the daemon: the task that reads the connection coalesces them
//! into the [`Inbox`] (bounded) and wakes the daemon, so a flood of them neither stops the
//! socket from being read nor delays the heartbeat's answer.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::future::poll_fn;
use tokio::sync::{mpsc, Notify};
use tokio_postgres::{AsyncMessage, Client};
use tokio_util::sync::CancellationToken;

use crate::changelog::{self, ALL_KEYS_CAP};
use crate::config::ListenerConfig;
use crate::db::{Db, DbError};
use crate::debounce::ALL;
use crate::sql::ident;
use crate::stats::Stats;
use crate::telemetry::Metrics;

/// What the listener tells the daemon besides notifications (which go to the [`Inbox`]).
#[derive(Debug)]
pub enum ListenerEvent {
    /// Connected and listening on every channel.
    Up,
    /// The connection was lost (or could not be made); it will be retried.
    Down(String),
}

/// How notifications are read: which channels are fed by a capture (their notifications only
/// wake the daemon up) and where a JSON payload keeps its key.
#[derive(Debug, Clone, Default)]
pub struct Intake {
    pub captured: BTreeSet<String>,
    pub payload_key: String,
}

/// Notifications received and not taken by the daemon yet, coalesced so that the connection is
/// read at the speed the server sends whatever the daemon is doing, in bounded memory: one flag
/// for all captured channels, at most [`ALL_KEYS_CAP`] keys per other channel (more become
/// [`ALL`]), one entry per rejected (channel, reason).
#[derive(Debug, Default)]
pub struct Inbox {
    received: Mutex<Received>,
    /// Woken whenever something was added.
    ready: Notify,
}

/// What the [`Inbox`] holds.
#[derive(Debug, Default)]
pub struct Received {
    /// A notification arrived on a captured channel: collect the dirty keys.
    pub collect: bool,
    /// Keys named by notifications on channels without capture, per channel, each with when it
    /// first arrived.
    pub keys: HashMap<String, HashMap<String, Instant>>,
    /// Rejected payloads per (channel, reason): how many, and the last one with its error.
    pub rejected: HashMap<(String, &'static str), Rejected>,
}

/// Payloads rejected for one reason on one channel.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub count: u64,
    /// The last rejected payload (its first 200 characters).
    pub sample: String,
    pub error: String,
}

impl Inbox {
    /// Takes everything received so far.
    pub fn take(&self) -> Received {
        std::mem::take(&mut *self.received.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Waits until something was added since the last [`Inbox::take`] (returns at once if so).
    pub async fn ready(&self) {
        self.ready.notified().await;
    }

    fn add(&self, channel: &str, payload: &str, intake: &Intake, metrics: &Metrics) {
        metrics.notification(channel);
        {
            let mut r = self.received.lock().unwrap_or_else(|e| e.into_inner());
            if intake.captured.contains(channel) {
                r.collect = true;
            } else {
                match changelog::parse_payload(payload, &intake.payload_key) {
                    Ok(key) => {
                        let keys = r.keys.entry(channel.to_owned()).or_default();
                        let now = Instant::now();
                        if !keys.contains_key(&key) && keys.len() >= ALL_KEYS_CAP {
                            let first = keys.values().min().copied().unwrap_or(now);
                            keys.clear();
                            keys.insert(ALL.to_owned(), first);
                        } else if !keys.contains_key(ALL) {
                            keys.entry(key).or_insert(now);
                        }
                    }
                    Err(e) => {
                        metrics.rejected(channel, e.reason());
                        let entry = r
                            .rejected
                            .entry((channel.to_owned(), e.reason()))
                            .or_insert_with(|| Rejected {
                                count: 0,
                                sample: String::new(),
                                error: String::new(),
                            });
                        entry.count += 1;
                        entry.sample = payload.chars().take(200).collect();
                        entry.error = e.to_string();
                    }
                }
            }
        }
        self.ready.notify_one();
    }
}

/// `application_name` of the LISTEN connection (tests and operators find it by this name).
pub const APPLICATION_NAME: &str = "mvrefresh-listener";

/// Why a session ended.
enum Ended {
    /// The heartbeat got no answer in time: the backend may live on, holding back the server's
    /// notification queue, so the next connection ends it.
    Stalled(String),
    Failed(String),
    Stopped,
}

/// Where a running listener delivers, and what it counts with.
pub struct Outputs {
    /// The daemon's main loop holds the receiving end.
    pub events: mpsc::Sender<ListenerEvent>,
    /// Shared with the daemon's main loop, which takes what arrived.
    pub inbox: Arc<Inbox>,
    pub stats: Arc<Stats>,
    pub metrics: Metrics,
}

/// Runs until `cancel` fires.
pub async fn run(
    db: Db,
    channels: Vec<String>,
    config: ListenerConfig,
    intake: Intake,
    out: Outputs,
    cancel: CancellationToken,
) {
    let builder = ExponentialBuilder::default()
        .with_min_delay(config.reconnect_min)
        .with_max_delay(config.reconnect_max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times();
    let mut backoff = builder.build();
    let mut first = true;
    let mut stalled_backend: Option<i32> = None;
    loop {
        if !first {
            out.stats.listener_reconnects.inc();
        }
        first = false;
        let attempt = tracing::info_span!("listener_connect", target = %db.target());
        let mut listened = false;
        let mut backend = None;
        let ended = tracing::Instrument::instrument(
            session(
                &db,
                &channels,
                &config,
                &intake,
                &out,
                &cancel,
                Session {
                    listened: &mut listened,
                    backend: &mut backend,
                    stalled_backend: stalled_backend.take(),
                },
            ),
            attempt,
        )
        .await;
        if listened {
            backoff = builder.build();
        }
        out.stats.listener_connected.set(false);
        if cancel.is_cancelled() {
            return;
        }
        let message = match ended {
            Ended::Stopped => return,
            Ended::Stalled(m) => {
                stalled_backend = backend;
                m
            }
            Ended::Failed(m) => m,
        };
        let delay = backoff.next().unwrap_or(config.reconnect_max);
        tracing::warn!(error = %message, retry_in = ?delay, "listener disconnected");
        if out.events.send(ListenerEvent::Down(message)).await.is_err() {
            return;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// What a session reports back to the reconnect loop, and what it is told.
struct Session<'a> {
    /// Set once the connection is listening (the backoff then resets).
    listened: &'a mut bool,
    /// The backend pid of this connection.
    backend: &'a mut Option<i32>,
    /// A stalled previous backend to end.
    stalled_backend: Option<i32>,
}

/// One connection's life: connect, LISTEN, then heartbeat until something fails. The
/// connection is read by a task of its own that only counts and coalesces into the inbox, so
/// it never waits for the daemon, and the heartbeat's answer is read however many
/// notifications come before it.
async fn session(
    db: &Db,
    channels: &[String],
    config: &ListenerConfig,
    intake: &Intake,
    out: &Outputs,
    cancel: &CancellationToken,
    mut report: Session<'_>,
) -> Ended {
    let (client, connection) = tokio::select! {
        _ = cancel.cancelled() => return Ended::Stopped,
        r = db.connect(APPLICATION_NAME) => match r {
            Ok(pair) => pair,
            Err(e) => return Ended::Failed(e.to_string()),
        },
    };
    // Abort the driver however this function ends (a frozen socket never ends on its own).
    let (_driver, mut ended) = drive(connection, out, intake);
    let timeout = config.heartbeat_timeout;
    let setup = set_up(db, &client, channels, &mut report);
    match tokio::time::timeout(timeout.max(Duration::from_secs(5)), setup).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Ended::Failed(e.to_string()),
        Err(_) => {
            return Ended::Stalled(format!("LISTEN did not complete within {timeout:?}"));
        }
    }
    tracing::info!(channels = ?channels, "listening");
    out.stats.listener_connected.set(true);
    *report.listened = true;
    if out.events.send(ListenerEvent::Up).await.is_err() {
        return Ended::Stopped;
    }

    let mut interval = tokio::time::interval(config.heartbeat_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ended::Stopped,
            reason = &mut ended => {
                return Ended::Failed(reason.unwrap_or_else(|_| "connection driver stopped".into()));
            }
            _ = interval.tick() => {
                let started = Instant::now();
                match heartbeat(&client, timeout, &out.stats).await {
                    Ok(()) => out.stats.heartbeat_latency.set(started.elapsed()),
                    Err(ended) => return ended,
                }
            }
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Drives `connection` in a task of its own: coalesces notifications into the inbox, and says
/// how the connection ended on the returned channel.
fn drive(
    mut connection: crate::db::DbConnection,
    out: &Outputs,
    intake: &Intake,
) -> (AbortOnDrop, tokio::sync::oneshot::Receiver<String>) {
    let (ended_tx, ended) = tokio::sync::oneshot::channel::<String>();
    let inbox = out.inbox.clone();
    let metrics = out.metrics.clone();
    let intake = intake.clone();
    let driver = tokio::spawn(async move {
        let reason = loop {
            match poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    inbox.add(n.channel(), n.payload(), &intake, &metrics);
                }
                Some(Ok(AsyncMessage::Notice(n))) => {
                    tracing::debug!(notice = %n.message(), "server notice on the listener");
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => break crate::db::error_text(&e),
                None => break "the server closed the connection".to_owned(),
            }
        };
        let _ = ended_tx.send(reason);
    });
    (AbortOnDrop(driver), ended)
}

/// A new connection's set-up: a primary, its backend (reported), the stalled previous backend
/// ended, LISTEN on every channel.
async fn set_up(
    db: &Db,
    client: &Client,
    channels: &[String],
    report: &mut Session<'_>,
) -> Result<(), DbError> {
    db.ensure_primary(client).await?;
    *report.backend = Some(
        client
            .query_one("SELECT pg_backend_pid()", &[])
            .await?
            .get(0),
    );
    if let Some(old) = report.stalled_backend {
        let ended: bool = client
            .query_one(
                "SELECT coalesce(bool_or(pg_terminate_backend(pid)), false)
                 FROM pg_stat_activity WHERE pid = $1 AND application_name = $2",
                &[&old, &APPLICATION_NAME],
            )
            .await?
            .get(0);
        if ended {
            tracing::info!(pid = old, "ended the stalled listener's backend");
        }
    }
    let listen: String = channels
        .iter()
        .map(|c| format!("LISTEN {};", ident(c)))
        .collect();
    client.batch_execute(&listen).await?;
    Ok(())
}

/// One heartbeat query. Its answer comes after every notification the server sent before it,
/// so while notifications keep arriving the connection is alive however long the answer takes:
/// only `timeout` without the answer *and* without a notification is a stall.
async fn heartbeat(
    client: &tokio_postgres::Client,
    timeout: Duration,
    stats: &Stats,
) -> Result<(), Ended> {
    let query = client.simple_query("SELECT 1");
    tokio::pin!(query);
    let mut seen = stats.notifications_received.get();
    loop {
        match tokio::time::timeout(timeout, &mut query).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => {
                return Err(Ended::Failed(format!(
                    "heartbeat failed: {}",
                    crate::db::error_text(&e)
                )))
            }
            Err(_) => {
                let now = stats.notifications_received.get();
                if now == seen {
                    return Err(Ended::Stalled(format!(
                        "heartbeat got no answer within {} (connection stalled)",
                        humantime::format_duration(timeout)
                    )));
                }
                seen = now;
            }
        }
    }
}
