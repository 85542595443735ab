//! One refresh of one view, in one transaction:
//!
//! 1. `SET LOCAL statement_timeout, lock_timeout`;
//! 2. `pg_try_advisory_xact_lock(namespace, hashtext(view))`: at most one refresh of a view at a
//!    time across every replica; when it is taken, the refresh is [`Outcome::Busy`]. A
//!    `partitioned` view's refresh of keys takes that lock shared and its keys' buckets
//!    exclusively ([`crate::partition::bucket`]): refreshes of disjoint buckets (the parallel
//!    chunks of a batch) run at once, never two of the same key, never beside a whole refresh;
//! 3. delete the view's pending rows it covers (all of them for a whole-view mode, the batch's
//!    keys for `incremental`) that the daemon's horizon covers (see [`crate::store`]: every
//!    writer that relied on them has ended). The refresh below reads a later snapshot, so it
//!    sees every change they stand for; rows committed later, or not covered yet, stay pending
//!    and are reported back ([`Outcome::Refreshed::leftover`]);
//! 4. when nothing was consumed, nothing is left and nothing forces it, stop: another replica
//!    did the work ([`Outcome::NothingToDo`]);
//! 5. `REFRESH MATERIALIZED VIEW [CONCURRENTLY]` or `SELECT function(keys)`;
//! 6. record the keys for the views that read this one (durably, so a dependent is refreshed
//!    even if the daemon dies now) and the history row; commit.
//!
//! A failure rolls all of it back: the pending rows are pending again.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, Transaction};

use crate::config::{Mode, RefreshConfig};
use crate::db::{BUCKET_LOCK_NAMESPACE, LOCK_NAMESPACE};
use crate::debounce::ALL;
use crate::partition;
use crate::plan::View;
use crate::store;

/// Why a refresh ran (recorded in the history).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Change,
    Schedule,
    Manual,
    Startup,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Change => "change",
            Reason::Schedule => "schedule",
            Reason::Manual => "manual",
            Reason::Startup => "startup",
        }
    }
}

/// What a refresh is asked to cover.
#[derive(Debug, Clone)]
pub struct Request {
    /// Keys from the debouncer (may hold [`ALL`]).
    pub keys: Vec<String>,
    /// Keys that must be refreshed even without change-log rows.
    pub forced: Vec<String>,
    pub reason: Reason,
    /// Wait for another replica's refresh of this view instead of returning `Busy`.
    pub wait_for_lock: bool,
    /// The snapshot of the daemon's horizon: pending rows written before it may be consumed
    /// (`None`: only rows no writer relied on).
    pub horizon: Option<String>,
    /// A `partitioned` view's refresh of keys also recomputes the rows whose key is NULL
    /// (every refresh but the other chunks of a batch split into several).
    pub nulls: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The view was refreshed; `keys` is what it covered (`None`: everything).
    Refreshed {
        keys: Option<Vec<String>>,
        duration: Duration,
        /// Keys of the request (`*` for a whole refresh) that still have pending rows: not
        /// covered by the horizon yet, or written meanwhile. They are refreshed again.
        leftover: Vec<String>,
    },
    /// Another replica is refreshing this view right now.
    Busy,
    /// Nothing pending was left: another replica already covered it.
    NothingToDo,
}

#[derive(Debug, thiserror::Error)]
#[error("refresh of {view} failed: {}", self.message())]
pub struct RefreshError {
    pub view: String,
    #[source]
    pub source: tokio_postgres::Error,
}

impl RefreshError {
    /// The server's message (with detail and hint when present), for history and alerts.
    pub fn message(&self) -> String {
        crate::db::error_text(&self.source)
    }

    pub fn is_connection_error(&self) -> bool {
        crate::db::is_connection_error(&self.source)
    }
}

/// Settings shared by every refresh of a view.
#[derive(Debug, Clone)]
pub struct Settings {
    pub timeout: Duration,
    pub lock_timeout: Duration,
    /// Identifies this process in the history (`host:pid`).
    pub replica: String,
}

impl Settings {
    /// `view`'s settings: its own `timeout` over `[refresh] timeout`.
    pub fn new(view: &View, config: &RefreshConfig, replica: String) -> Settings {
        Settings {
            timeout: view.config.timeout.unwrap_or(config.timeout),
            lock_timeout: config.lock_timeout,
            replica,
        }
    }
}

/// Refreshes `view` as `request` asks. `dependents` are the names of the views that read it.
pub async fn refresh(
    client: &mut Client,
    view: &View,
    dependents: &[String],
    request: &Request,
    settings: &Settings,
) -> Result<Outcome, RefreshError> {
    let started = Instant::now();
    let err = |source| RefreshError {
        view: view.name.clone(),
        source,
    };
    match run_transaction(client, view, dependents, request, settings, started).await {
        Ok(outcome) => Ok(outcome),
        Err(source) => {
            let e = err(source);
            if !e.is_connection_error() {
                record_failure(client, view, request, settings, started, &e.message()).await;
            }
            Err(e)
        }
    }
}

/// The refresh transaction: the view's lock, the pending keys it consumes, the refresh itself,
/// the keys handed to the dependents and the history row, all committed together.
async fn run_transaction(
    client: &mut Client,
    view: &View,
    dependents: &[String],
    request: &Request,
    settings: &Settings,
    started: Instant,
) -> Result<Outcome, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    if !lock(&tx, view, request, settings).await? {
        tx.rollback().await?;
        return Ok(Outcome::Busy);
    }
    let all = view.mode().is_whole_view() || request.keys.iter().any(|k| k == ALL);
    let keys = (!all).then_some(request.keys.as_slice());
    let (consumed, leftover) =
        store::consume_pending(&tx, &view.name, keys, &request.horizon).await?;
    if consumed == 0 && leftover.is_empty() && request.forced.is_empty() {
        tx.commit().await?;
        return Ok(Outcome::NothingToDo);
    }
    let covered: BTreeSet<String> = request.keys.iter().cloned().collect();
    let keys: Option<Vec<&str>> = (!all).then(|| covered.iter().map(String::as_str).collect());
    apply(&tx, view, keys.as_deref(), request.nulls).await?;
    if !dependents.is_empty() {
        let propagate = keys.clone().unwrap_or_else(|| vec![ALL]);
        store::pend_for(&tx, dependents, &propagate).await?;
    }
    let duration = started.elapsed();
    let success = store::Attempt {
        view: &view.name,
        mode: view.mode().as_str(),
        reason: request.reason.as_str(),
        keys: keys.as_ref().map(|k| k.len() as i32),
        duration,
        replica: &settings.replica,
    };
    store::record_success(&tx, &success).await?;
    tx.commit().await?;
    Ok(Outcome::Refreshed {
        keys: (!all).then(|| covered.into_iter().collect()),
        duration,
        leftover,
    })
}

/// Sets the transaction's timeouts (and JIT off for a partitioned view) and takes the view's
/// lock (waiting for it when `request` says so); `false` when another session holds it. Remembers, server-side, when the refresh
/// started (once it holds the lock) for the history row.
async fn lock(
    tx: &Transaction<'_>,
    view: &View,
    request: &Request,
    settings: &Settings,
) -> Result<bool, tokio_postgres::Error> {
    // A partitioned refresh's statement: JIT-compiling it costs more than running it (seconds at
    // scale), and it would be compiled again on every refresh.
    let jit = if view.mode() == Mode::Partitioned {
        "; SET LOCAL jit = off"
    } else {
        ""
    };
    tx.batch_execute(&format!(
        "SET LOCAL statement_timeout = {}; SET LOCAL lock_timeout = {}{jit}",
        settings.timeout.as_millis().max(1),
        settings.lock_timeout.as_millis().max(1)
    ))
    .await?;
    let buckets = buckets(view, request);
    let shared = if buckets.is_some() { "_shared" } else { "" };
    let locked: bool = if request.wait_for_lock {
        tx.execute(
            &format!("SELECT pg_advisory_xact_lock{shared}($1, hashtext($2))"),
            &[&LOCK_NAMESPACE, &view.name],
        )
        .await?;
        // One at a time, in order: two waiting refreshes cannot deadlock.
        for b in buckets.iter().flatten() {
            tx.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2 || '#' || $3::int4))",
                &[&BUCKET_LOCK_NAMESPACE, &view.name, b],
            )
            .await?;
        }
        true
    } else {
        tx.query_one(
            &format!(
                "SELECT pg_try_advisory_xact_lock{shared}($1, hashtext($2))
                    AND (SELECT coalesce(bool_and(pg_try_advisory_xact_lock(
                                 $3, hashtext($2 || '#' || b))), true)
                         FROM unnest($4::int4[]) AS b)"
            ),
            &[
                &LOCK_NAMESPACE,
                &view.name,
                &BUCKET_LOCK_NAMESPACE,
                &buckets.unwrap_or_default(),
            ],
        )
        .await?
        .get(0)
    };
    if locked {
        tx.execute(
            "SELECT set_config('mvrefresh.started_at', clock_timestamp()::text, true)",
            &[],
        )
        .await?;
    }
    Ok(locked)
}

/// The buckets whose locks a refresh takes (exclusively, the view's lock then shared): a
/// `partitioned` view's refresh of keys; `None` for every other refresh (the view's lock,
/// exclusive).
fn buckets(view: &View, request: &Request) -> Option<Vec<i32>> {
    if view.mode() != Mode::Partitioned || request.keys.iter().any(|k| k == ALL) {
        return None;
    }
    let mut buckets: Vec<i32> = request.keys.iter().map(|k| partition::bucket(k)).collect();
    if request.nulls {
        buckets.push(partition::NULL_BUCKET);
    }
    buckets.sort_unstable();
    buckets.dedup();
    Some(buckets)
}

/// The refresh statement of `view`'s mode: `keys` for an incremental view, `None` for all.
async fn apply(
    tx: &Transaction<'_>,
    view: &View,
    keys: Option<&[&str]>,
    nulls: bool,
) -> Result<(), tokio_postgres::Error> {
    match view.mode() {
        Mode::Concurrently | Mode::Blocking => {
            let populated: bool = tx
                .query_one(
                    "SELECT relispopulated FROM pg_class WHERE oid = $1::text::regclass",
                    &[&view.target],
                )
                .await?
                .get(0);
            let concurrently = view.mode() == Mode::Concurrently && populated;
            tx.batch_execute(&format!(
                "REFRESH MATERIALIZED VIEW {}{}",
                if concurrently { "CONCURRENTLY " } else { "" },
                view.target
            ))
            .await?;
        }
        Mode::Partitioned => {
            // Resolved by the plan: a partitioned view has its partition.
            let Some(p) = &view.partition else {
                return Ok(());
            };
            let scope = match keys {
                Some(_) => partition::Scope::Keys { nulls },
                None => partition::Scope::All,
            };
            let sql = partition::refresh_sql(p, &view.target, scope);
            let row = match keys {
                Some(keys) => tx.query_one(&sql, &[&keys]).await?,
                None => tx.query_one(&sql, &[]).await?,
            };
            let (deleted, inserted): (i64, i64) = (row.get(0), row.get(1));
            tracing::debug!(view = %view.name, deleted, inserted, "partitioned refresh applied");
        }
        Mode::Incremental => {
            let function = view.function.as_deref().unwrap_or_default();
            tx.execute(&format!("SELECT {function}($1::text[])"), &[&keys])
                .await?;
        }
    }
    Ok(())
}

/// Records a failed attempt (`error`: what went wrong) in `refresh_history`, on `client`: the
/// refresh's own connection after a failed statement, another one after a stall or timeout.
pub async fn record_failure(
    client: &Client,
    view: &View,
    request: &Request,
    settings: &Settings,
    started: Instant,
    error: &str,
) {
    let failure = store::Attempt {
        view: &view.name,
        mode: view.mode().as_str(),
        reason: request.reason.as_str(),
        keys: Some(request.keys.len() as i32),
        duration: started.elapsed(),
        replica: &settings.replica,
    };
    let result = store::record_failure(client, &failure, error).await;
    if let Err(e) = result {
        tracing::warn!(view = %view.name, error = %e, "could not record the failed refresh in mvrefresh.refresh_history");
    }
}
