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
//! daemon reads the change log (whatever happened while it was away is there). A heartbeat
//! query runs every `heartbeat_interval` under `heartbeat_timeout`: TCP keepalives do not notice
//! a stalled peer, a query does. The backoff resets once a connection is listening.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::future::poll_fn;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use crate::config::ListenerConfig;
use crate::db::{Db, DbError};
use crate::sql::ident;
use crate::stats::Stats;

/// A notification as received.
#[derive(Debug, Clone)]
pub struct Notification {
    pub channel: String,
    pub payload: String,
}

/// What the listener tells the daemon.
#[derive(Debug)]
pub enum ListenerEvent {
    /// Connected and listening on every channel.
    Up,
    /// The connection was lost (or could not be made); it will be retried.
    Down(String),
    Notification(Notification),
}

/// `application_name` of the LISTEN connection (tests and operators find it by this name).
pub const APPLICATION_NAME: &str = "mvrefresh-listener";

/// Runs until `cancel` fires. Every event goes to `events`.
pub async fn run(
    db: Db,
    channels: Vec<String>,
    config: ListenerConfig,
    stats: Arc<Stats>,
    events: mpsc::Sender<ListenerEvent>,
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
    // The backend of the previous connection, when it was lost by a stall: it may live on
    // server-side, and a listening backend that never reads holds back the server's whole
    // notification queue, so the next connection ends it.
    let mut stalled_backend: Option<i32> = None;
    loop {
        if !first {
            stats.listener_reconnects.inc();
        }
        first = false;
        let attempt = tracing::info_span!("listener_connect", target = %db.target());
        let mut listened = false;
        let mut backend = None;
        let result = tracing::Instrument::instrument(
            session(
                &db,
                &channels,
                &config,
                &stats,
                &events,
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
        if matches!(&result, Err(e) if e.contains("stalled")) {
            stalled_backend = backend;
        }
        if listened {
            backoff = builder.build();
        }
        stats.listener_connected.set(false);
        if cancel.is_cancelled() {
            return;
        }
        let message = match result {
            Ok(()) => "connection closed".to_owned(),
            Err(e) => e,
        };
        let delay = backoff.next().unwrap_or(config.reconnect_max);
        tracing::warn!(error = %message, retry_in = ?delay, "listener disconnected");
        if events.send(ListenerEvent::Down(message)).await.is_err() {
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

/// One connection's life: connect, LISTEN, then heartbeat until something fails.
async fn session(
    db: &Db,
    channels: &[String],
    config: &ListenerConfig,
    stats: &Stats,
    events: &mpsc::Sender<ListenerEvent>,
    cancel: &CancellationToken,
    report: Session<'_>,
) -> Result<(), String> {
    let (client, mut connection) = tokio::select! {
        _ = cancel.cancelled() => return Ok(()),
        r = db.connect(APPLICATION_NAME) => r.map_err(|e| e.to_string())?,
    };
    // Drive the connection: forward notifications; report how it ended.
    let (ended_tx, mut ended) = tokio::sync::oneshot::channel::<String>();
    let forward = events.clone();
    let driver = tokio::spawn(async move {
        let reason = loop {
            match poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    let n = Notification {
                        channel: n.channel().to_owned(),
                        payload: n.payload().to_owned(),
                    };
                    if forward.send(ListenerEvent::Notification(n)).await.is_err() {
                        break "daemon stopped".to_owned();
                    }
                }
                Some(Ok(AsyncMessage::Notice(n))) => {
                    tracing::debug!(notice = %n.message(), "server notice on the listener");
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => break e.to_string(),
                None => break "the server closed the connection".to_owned(),
            }
        };
        let _ = ended_tx.send(reason);
    });
    // Abort the driver however this function ends (a frozen socket never ends on its own).
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _driver = AbortOnDrop(driver);

    let timeout = config.heartbeat_timeout;
    let setup = async {
        db.ensure_primary(&client).await?;
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
        Ok::<_, DbError>(())
    };
    match tokio::time::timeout(timeout.max(Duration::from_secs(5)), setup).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err(format!("LISTEN did not complete within {timeout:?}")),
    }
    tracing::info!(channels = ?channels, "listening");
    stats.listener_connected.set(true);
    *report.listened = true;
    if events.send(ListenerEvent::Up).await.is_err() {
        return Ok(());
    }

    let mut interval = tokio::time::interval(config.heartbeat_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            reason = &mut ended => {
                return Err(reason.unwrap_or_else(|_| "connection driver stopped".into()));
            }
            _ = interval.tick() => {
                let started = std::time::Instant::now();
                match tokio::time::timeout(timeout, client.simple_query("SELECT 1")).await {
                    Ok(Ok(_)) => stats.heartbeat_latency.set(started.elapsed()),
                    Ok(Err(e)) => return Err(format!("heartbeat failed: {e}")),
                    Err(_) => {
                        return Err(format!(
                            "heartbeat got no answer within {} (connection stalled)",
                            humantime::format_duration(timeout)
                        ))
                    }
                }
            }
        }
    }
}
