//! A refresh task: one refresh on a pooled connection, with the liveness watch that tells a long
//! refresh from a stalled connection, and the retry backoff of a failing view.

use std::sync::Mutex;
use std::time::Duration;

use deadpool_postgres::Pool;

use crate::config::ListenerConfig;
use crate::db::{Canceller, Db, DbError};
use crate::refresh::{self, Outcome, RefreshError, Request, Settings};

/// Why a refresh task failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum TaskError {
    #[error(transparent)]
    Pool(#[from] DbError),
    #[error(transparent)]
    Refresh(#[from] RefreshError),
    #[error("no answer within {0:?} (cancelled server-side, connection discarded)")]
    Timeout(Duration),
    #[error("the connection stopped answering: {0} (cancelled server-side, connection discarded)")]
    Stalled(String),
}

/// Runs one refresh on a pooled connection, watching that connection's liveness.
///
/// A refresh may legitimately run for minutes, so a client-side timeout cannot tell a long
/// refresh from a stalled connection. Instead, every `heartbeat_interval` another connection
/// looks at the refresh's backend in `pg_stat_activity`: gone, or idle while we still wait for
/// its answer for longer than `heartbeat_timeout`, means the answer will never arrive; the
/// refresh is then cancelled server-side and its connection discarded. A wall-clock limit
/// (`timeout + lock_timeout + 10s`) remains as the last resort.
#[allow(
    clippy::too_many_arguments,
    reason = "one refresh's whole context, each piece owned by the spawning task"
)]
pub(super) async fn refresh_task(
    pool: &Pool,
    db: &Db,
    view: &crate::plan::View,
    dependents: &[String],
    request: &Request,
    settings: &Settings,
    liveness: &ListenerConfig,
    cancel: &Mutex<Option<Canceller>>,
) -> Result<Outcome, TaskError> {
    let mut client = pool.get().await.map_err(DbError::from)?;
    if let Ok(mut slot) = cancel.lock() {
        *slot = Some(db.canceller(&client));
    }
    let pid: i32 = match tokio::time::timeout(
        liveness.heartbeat_timeout,
        client.query_one("SELECT pg_backend_pid()", &[]),
    )
    .await
    {
        Ok(Ok(row)) => row.get(0),
        Ok(Err(e)) => return Err(TaskError::Pool(DbError::Query(e))),
        Err(_) => {
            let _ = deadpool_postgres::Object::take(client);
            return Err(TaskError::Stalled("no answer to the first query".into()));
        }
    };
    let started = std::time::Instant::now();
    let limit = settings.timeout + settings.lock_timeout + Duration::from_secs(10);
    let deadline = tokio::time::Instant::now() + limit;
    let mut probe = tokio::time::interval(liveness.heartbeat_interval);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    probe.tick().await;
    let verdict = {
        let work = refresh::refresh(&mut client, view, dependents, request, settings);
        tokio::pin!(work);
        loop {
            tokio::select! {
                result = &mut work => break Ok(result?),
                _ = tokio::time::sleep_until(deadline) => break Err(TaskError::Timeout(limit)),
                _ = probe.tick() => {
                    if let Some(reason) = backend_lost(pool, pid, liveness.heartbeat_timeout).await {
                        break Err(TaskError::Stalled(reason));
                    }
                }
            }
        }
    };
    if let Err(e @ (TaskError::Timeout(_) | TaskError::Stalled(_))) = &verdict {
        // The backend may be idle in its transaction, holding the view's lock and the consumed
        // pending rows until the server notices the client is gone (hours, with default
        // keepalives): end it, which rolls the refresh back. Cancel as a fallback.
        if !terminate_backend(pool, pid, liveness.heartbeat_timeout).await {
            let _ = db.canceller(&client).cancel().await;
        }
        let _ = deadpool_postgres::Object::take(client);
        // Every attempt has its history row, this one too (from another connection).
        let record = async {
            if let Ok(other) = pool.get().await {
                refresh::record_failure(&other, view, request, settings, started, &e.to_string())
                    .await;
            }
        };
        let _ = tokio::time::timeout(liveness.heartbeat_timeout, record).await;
    }
    verdict
}

/// Ends backend `pid` (one of ours: a role may end its own backends). Whether it worked.
pub(crate) async fn terminate_backend(pool: &Pool, pid: i32, patience: Duration) -> bool {
    let work = async {
        let client = pool.get().await.ok()?;
        client
            .query_one("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .ok()
            .map(|r| r.get::<_, bool>(0))
    };
    matches!(tokio::time::timeout(patience, work).await, Ok(Some(true)))
}

/// Why backend `pid` can no longer answer, if it cannot. `None` when it is working, or when
/// that cannot be told (the probe itself failed: the next one will tell).
async fn backend_lost(pool: &Pool, pid: i32, patience: Duration) -> Option<String> {
    let probe = async {
        let client = pool.get().await.ok()?;
        let row = client
            .query_opt(
                "SELECT state, extract(epoch FROM clock_timestamp() - state_change)::float8
                 FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .ok()?;
        Some(match row {
            None => Some(format!("its backend (pid {pid}) is gone")),
            Some(row) => {
                let state: Option<String> = row.get(0);
                let idle_for: Option<f64> = row.get(1);
                let idle = state.as_deref().is_some_and(|s| s.starts_with("idle"));
                let waited = idle_for.unwrap_or(0.0) > patience.as_secs_f64();
                (idle && waited).then(|| {
                    format!(
                        "its backend (pid {pid}) has been {} for {:.1}s while we wait for its answer (connection stalled)",
                        state.unwrap_or_default(),
                        idle_for.unwrap_or(0.0)
                    )
                })
            }
        })
    };
    tokio::time::timeout(patience, probe)
        .await
        .ok()
        .flatten()
        .flatten()
}

/// `min * 2^(failures-1)`, capped at `max`, with ±25% jitter.
pub(super) fn retry_delay(min: Duration, max: Duration, failures: u32) -> Duration {
    let base = min
        .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
        .min(max);
    let jitter = 0.75 + 0.5 * pseudo_random();
    base.mul_f64(jitter).min(max)
}

/// A number in [0, 1) good enough for jitter, from the clock.
fn pseudo_random() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    (nanos % 1000) as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_grows_and_caps() {
        let min = Duration::from_secs(1);
        let max = Duration::from_secs(60);
        assert!(retry_delay(min, max, 1) <= Duration::from_millis(1250));
        assert!(retry_delay(min, max, 4) >= Duration::from_secs(6));
        assert!(retry_delay(min, max, 30) <= max);
    }
}
