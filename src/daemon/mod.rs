//! `mvrefresh run`: the main loop.
//!
//! How an event travels: a writer's transaction marks its key dirty (`mvrefresh.dirty`) and
//! notifies when the key turns dirty; the [`listener`] wakes this loop, which
//! collects the dirty keys into per-view pending keys (`daemon/intake.rs`; a periodic collect
//! and catch-up read find the same keys, so a lost notification only delays them) and notes
//! them in the views' [debouncers](crate::debounce); when keys are ready and no view they
//! depend on has them pending, a refresh task takes a pooled connection and runs
//! [`crate::refresh::refresh`]; its outcome comes back here, and on success the keys are noted
//! for the dependent views. Keys a refresh could not consume yet (the hand-over, see
//! [`crate::store`]) are parked and refreshed once more when the horizon passes them.
//!
//! One task owns all scheduling state; everything else talks to it through channels, so the
//! state needs no locks. Views refresh in dependency order: a view waits while a view it reads
//! has the same keys pending or in flight (per key for `incremental`, any key for whole-view
//! modes), and a failing view keeps its dependents waiting without stopping unrelated views.
//!
//! Shutdown is two-phase: stop intake (listener, catch-up, new refreshes), let in-flight
//! refreshes finish until `[refresh] shutdown_deadline`, then cancel them server-side.
//!
//! Failures, retries, the circuit breaker and their alerts: `daemon/outcomes.rs`.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::alert::{Alerts, Tracker};
use crate::config::Config;
use crate::db::{Canceller, Db, DbError, UrlError};
use crate::debounce::{Batch, ALL};
use crate::http::{self, ManualRefresh};
use crate::listener::{self, Inbox, ListenerEvent};
use crate::plan::{Plan, PlanError};
use crate::refresh::{Outcome, Reason};
use crate::stats::{Stats, ViewGauges};
use crate::store::{Collected, Guard, PendingKeys};
use crate::telemetry::{Metrics, Telemetry};

mod breaker;
mod events;
mod health;
mod intake;
mod isolate;
mod outcomes;
mod partitions;
mod scheduler;
mod startup;
mod supervisor;
mod task;

use scheduler::ViewState;
use startup::{channel_map, start_up, view_states, warn_if_plaintext, Startup};
use supervisor::Supervisor;
use task::TaskError;

/// How long a due key waits for the hand-over horizon before it is refreshed anyway (its
/// pending rows are then consumed by a later refresh).
const HORIZON_PATIENCE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("start-up query failed: {}", crate::db::error_text(.0))]
    Query(#[from] tokio_postgres::Error),
    #[error("cannot set up alert delivery: {0}")]
    Alert(String),
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::TelemetryError),
    #[error("cannot listen on {addr} (http.listen): {source}")]
    Http {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

enum Internal {
    Collected(Result<Vec<Collected>, String>),
    Guarded(Result<(Instant, Guard, Option<i64>), String>),
    CatchUpView {
        view: usize,
        keys: PendingKeys,
        seen: Instant,
    },
    CatchUpDone(Result<(), String>),
    Pruned(Result<u64, String>),
    Partitions(Result<partitions::Seen, String>),
    RefreshDone {
        view: usize,
        /// Which of the view's refresh tasks ([`Daemon::running`]).
        chunk: u64,
        batch: Batch,
        result: Result<Outcome, TaskError>,
    },
}

/// The task of a refresh in flight, and how to cancel its query.
struct Running {
    cancel: Arc<Mutex<Option<Canceller>>>,
    task: JoinHandle<()>,
}

/// The daemon's collaborators, built by [`run`].
struct Wiring {
    config: Arc<Config>,
    db: Db,
    pool: Pool,
    stats: Arc<Stats>,
    metrics: Metrics,
    /// Manual refreshes asked over HTTP.
    manual_rx: mpsc::Receiver<ManualRefresh>,
    alerts: Alerts,
    tasks: Supervisor,
}

/// Runs the daemon until `shutdown` completes; returns after a clean stop.
pub async fn run(
    config: Config,
    stats: Arc<Stats>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let db = Db::new(&config.database)?;
    warn_if_plaintext(&db);
    let pool = db.pool(config.database.pool_size);
    let startup = start_up(&db, &pool, &config).await?;
    let telemetry = Arc::new(Telemetry::new(&config.telemetry, stats.clone())?);
    let config = Arc::new(config);
    let tasks = Supervisor::new();
    let (manual_tx, manual_rx) = mpsc::channel(16);
    if let Some(addr) = config.http.address() {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| DaemonError::Http { addr, source: e })?;
        let bound = listener.local_addr().ok();
        if let Ok(mut slot) = stats.http_addr.lock() {
            *slot = bound;
        }
        tracing::info!(listen = ?bound, "admin HTTP server listening");
        tasks.http.spawn(http::serve(
            listener,
            stats.clone(),
            telemetry.clone(),
            pool.clone(),
            config.clone(),
            manual_tx,
            tasks.http.token(),
        ));
    }
    tracing::info!(
        target = %db.target(),
        order = %startup.plan.describe_order(),
        "mvrefresh started"
    );
    let (alerts, delivery) = Alerts::start(&config.alert, stats.clone(), tasks.alerts.token())
        .map_err(|e| DaemonError::Alert(e.to_string()))?;
    if let Some(delivery) = delivery {
        tasks.alerts.spawn(delivery);
    }
    // Long enough for a webhook POST in flight, the slowest thing a stage waits for.
    let grace = config.alert.timeout + Duration::from_secs(1);
    let wiring = Wiring {
        config,
        db,
        pool,
        stats,
        metrics: telemetry.metrics.clone(),
        manual_rx,
        alerts,
        tasks,
    };
    let mut daemon = Daemon::new(wiring, startup);
    daemon.main_loop(shutdown).await;
    daemon.finish(grace).await;
    // Flush telemetry off the async runtime: the OTLP reader uses a blocking client.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    Ok(())
}

struct Daemon {
    config: Arc<Config>,
    db: Db,
    pool: Pool,
    plan: Arc<Plan>,
    stats: Arc<Stats>,
    views: Vec<ViewState>,
    /// The tasks of each view's refresh in flight, one per chunk, by chunk number (beside its
    /// [`ViewState::in_flight`]).
    running: Vec<Vec<(u64, Running)>>,
    /// Numbers the refresh tasks (chunks).
    next_chunk: u64,
    /// What scheduling needs to know of each view.
    facts: Vec<scheduler::Facts>,
    /// channel → (views subscribed, whether a capture feeds it: its notifications are only
    /// wake-ups)
    channels: BTreeMap<String, (Vec<usize>, bool)>,
    /// Completions of refresh and catch-up tasks; every task holds a sender.
    internal_tx: mpsc::UnboundedSender<Internal>,
    internal_rx: mpsc::UnboundedReceiver<Internal>,
    /// Collects, catch-ups, guards and pruning (`daemon/intake.rs`).
    intake: intake::Intake,
    /// The captured tables' partitions (`daemon/partitions.rs`).
    partitions: partitions::PartitionWatch,
    /// Filled by the listener; taken by this loop.
    inbox: Arc<Inbox>,
    /// Told by the logical captures' readers when they wrote keys.
    recorded: Arc<tokio::sync::Notify>,
    /// One "notification rejected" warning per (channel, reason) per interval.
    rejected_log: crate::ratelimit::LogLimiter<(String, &'static str)>,
    replica: String,
    metrics: Metrics,
    /// Manual refreshes asked over HTTP; [`crate::http`] holds the senders.
    manual_rx: mpsc::Receiver<ManualRefresh>,
    /// Queues alerts for the delivery task.
    alerts: Alerts,
    tracker: Tracker,
    /// Since when the listener is down, and why.
    listener_down: Option<(Instant, String)>,
    /// The background tasks; the intake stage runs the database steps (see `spawn_step`).
    tasks: Supervisor,
}

impl Daemon {
    fn new(w: Wiring, startup: Startup) -> Self {
        let Startup {
            plan,
            captured,
            last_success,
        } = startup;
        let now = Instant::now();
        let mut views = view_states(&plan, &w.config, now);
        for (st, age) in views.iter_mut().zip(last_success) {
            st.last_success = age.and_then(|a| now.checked_sub(a));
        }
        let channels = channel_map(&plan, &w.config, &captured);
        let quiet = plan
            .views
            .iter()
            .map(|v| v.config.debounce(w.config.debounce).quiet)
            .min()
            .unwrap_or(w.config.debounce.quiet);
        let (internal_tx, internal_rx) = mpsc::unbounded_channel();
        let replica = format!(
            "{}:{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into()),
            std::process::id()
        );
        let facts = plan
            .views
            .iter()
            .map(|v| scheduler::Facts {
                whole: v.mode().is_whole_view(),
                schedule: v.config.schedule,
                quiet: v.config.debounce(w.config.debounce).quiet,
                ancestors: v.ancestors.iter().copied().collect(),
                chunked: v.mode() == crate::config::Mode::Partitioned,
            })
            .collect();
        Daemon {
            tracker: Tracker::new(w.config.alert.repeat_after, replica.clone()),
            config: w.config,
            db: w.db,
            pool: w.pool,
            plan: Arc::new(plan),
            stats: w.stats,
            running: views.iter().map(|_| Vec::new()).collect(),
            next_chunk: 0,
            facts,
            views,
            channels,
            internal_tx,
            internal_rx,
            intake: intake::Intake::new(quiet),
            partitions: partitions::PartitionWatch::default(),
            inbox: Arc::default(),
            recorded: Arc::default(),
            rejected_log: crate::ratelimit::LogLimiter::new(crate::ratelimit::DEFAULT_INTERVAL),
            replica,
            metrics: w.metrics,
            manual_rx: w.manual_rx,
            alerts: w.alerts,
            listener_down: None,
            tasks: w.tasks,
        }
    }

    async fn main_loop(&mut self, shutdown: impl Future<Output = ()>) {
        let mut listener_rx = self.start_intake();
        let mut catch_up = tokio::time::interval(self.config.listener.catch_up_interval);
        catch_up.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let watchdog = watchdog_interval();
        let mut watchdog_tick =
            tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
        let mut health = tokio::time::interval(self.health_interval());
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        self.stats.ready.set(true);
        tokio::pin!(shutdown);

        let inbox = self.inbox.clone();
        let recorded = self.recorded.clone();
        loop {
            let now = Instant::now();
            self.drive_intake(now);
            self.drive_partitions(now);
            self.dispatch(now);
            self.publish_gauges();
            let wake = self.next_wake(now);
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some(event) = self.internal_rx.recv() => self.on_internal(event),
                Some(event) = listener_rx.recv() => self.on_listener(event),
                _ = inbox.ready() => self.on_inbox(),
                _ = recorded.notified() => self.collect_at_once(),
                Some(request) = self.manual_rx.recv() => self.on_manual(request),
                _ = catch_up.tick() => self.start_catch_up(),
                _ = health.tick() => self.check_health(Instant::now()),
                _ = watchdog_tick.tick(), if watchdog.is_some() => {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
                _ = sleep_until(wake) => {}
            }
        }

        tracing::info!("shutting down: no new refreshes; waiting for the ones in flight");
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        self.stats.ready.set(false);
        // Nothing new comes in (listener, pg_cron watch, database steps); the refreshes in
        // flight may finish.
        self.tasks.intake.cancel();
        self.drain_refreshes().await;
    }

    /// Starts the listener, the logical captures' readers and the pg_cron watch in the intake
    /// stage; returns the listener's events.
    fn start_intake(&mut self) -> mpsc::Receiver<ListenerEvent> {
        let (listener_tx, listener_rx) = mpsc::channel(16);
        let captured = self
            .channels
            .iter()
            .filter(|(_, (_, captured))| *captured)
            .map(|(c, _)| c.clone())
            .collect();
        self.tasks.intake.spawn(listener::run(
            self.db.clone(),
            self.channels.keys().cloned().collect(),
            self.config.listener.clone(),
            listener::Intake {
                captured,
                payload_key: self.config.listener.payload_key.clone(),
            },
            listener::Outputs {
                events: listener_tx,
                inbox: self.inbox.clone(),
                stats: self.stats.clone(),
                metrics: self.metrics.clone(),
            },
            self.tasks.intake.token(),
        ));
        for capture in &self.config.captures {
            if capture.method != crate::config::CaptureMethod::Logical {
                continue;
            }
            self.tasks.intake.spawn(crate::logical::reader::run(
                crate::logical::reader::Wiring {
                    db: self.db.clone(),
                    capture: capture.clone(),
                    alerts: self.alerts.clone(),
                    tracker: Tracker::new(self.config.alert.repeat_after, self.replica.clone()),
                    stats: self.stats.clone(),
                    recorded: self.recorded.clone(),
                    hold: reader_hold(&self.config, &capture.channel),
                },
                self.tasks.intake.token(),
            ));
        }
        if self.config.pg_cron.watch {
            self.tasks.intake.spawn(crate::pgcron::watch(
                self.db.clone(),
                self.pool.clone(),
                (*self.config).clone(),
                self.replica.clone(),
                self.alerts.clone(),
                self.stats.clone(),
                self.tasks.intake.token(),
            ));
        }
        listener_rx
    }

    /// Lets the refreshes in flight finish until `[refresh] shutdown_deadline`, then cancels
    /// what is left server-side and waits briefly for it to roll back.
    async fn drain_refreshes(&mut self) {
        let deadline = Instant::now() + self.config.refresh.shutdown_deadline;
        while self.views.iter().any(|v| v.in_flight.is_some()) {
            tokio::select! {
                Some(event) = self.internal_rx.recv() => self.on_internal(event),
                _ = tokio::time::sleep_until(deadline.into()) => break,
            }
        }
        let left: Vec<usize> = (0..self.views.len())
            .filter(|&i| self.views[i].in_flight.is_some())
            .collect();
        for &i in &left {
            tracing::warn!(view = %self.plan.views[i].name, "shutdown deadline passed: cancelling the refresh");
            let tokens: Vec<_> = self.running[i]
                .iter()
                .filter_map(|(_, r)| r.cancel.lock().ok().and_then(|t| t.clone()))
                .collect();
            for token in tokens {
                if let Err(e) = token.cancel().await {
                    tracing::warn!(error = %e, "could not cancel the refresh query");
                }
            }
        }
        let grace = Instant::now() + Duration::from_secs(5);
        while self.views.iter().any(|v| v.in_flight.is_some()) {
            tokio::select! {
                Some(event) = self.internal_rx.recv() => self.on_internal(event),
                _ = tokio::time::sleep_until(grace.into()) => break,
            }
        }
        for (v, r) in self.views.iter_mut().zip(&mut self.running) {
            v.in_flight = None;
            for (_, r) in r.drain(..) {
                r.task.abort();
            }
        }
    }

    /// Stops the background tasks in order (intake, admin server, alert delivery: alerts
    /// raised while stopping still get a delivery attempt), then closes the pool.
    async fn finish(self, grace: Duration) {
        self.tasks.stop(grace).await;
        self.pool.close();
        tracing::info!("stopped");
    }

    /// The next instant something can become due (views or intake), never now or earlier.
    fn next_wake(&self, now: Instant) -> Option<Instant> {
        let views = scheduler::next_wake(&self.views, now, self.intake.horizon());
        [views, self.intake_wake(now), self.partitions_wake(now)]
            .into_iter()
            .flatten()
            .map(|t| t.max(now + Duration::from_millis(1)))
            .min()
    }

    /// Starts every refresh that is due, unblocked, and fits the concurrency limit.
    fn dispatch(&mut self, now: Instant) {
        let starts = scheduler::dispatch(
            &mut self.views,
            &self.facts,
            &self.plan.order,
            self.config.refresh.concurrency,
            now,
            self.intake.horizon(),
        );
        for s in starts {
            self.spawn_refresh(s.view, s.batch, s.reason, s.nulls);
        }
    }

    fn on_internal(&mut self, event: Internal) {
        match event {
            Internal::Collected(result) => self.on_collected(result),
            Internal::Guarded(result) => self.on_guarded(result),
            Internal::CatchUpView { view, keys, seen } => self.on_catch_up_view(view, keys, seen),
            Internal::CatchUpDone(result) => self.on_catch_up_done(result),
            Internal::Pruned(result) => self.on_pruned(result),
            Internal::Partitions(result) => self.on_partitions(result),
            Internal::RefreshDone {
                view,
                chunk,
                batch,
                result,
            } => self.on_refresh_done(view, chunk, batch, result),
        }
    }

    /// Queues a manual refresh of one view or all (`POST /refresh[/{view}]`).
    fn on_manual(&mut self, request: ManualRefresh) {
        let targets: Vec<usize> = match &request.view {
            None => (0..self.views.len()).collect(),
            Some(name) => match self.plan.index(name) {
                Some(i) => vec![i],
                None => {
                    let _ = request
                        .reply
                        .send(Err(format!("`{name}` is not a configured [[view]]")));
                    return;
                }
            },
        };
        let now = Instant::now();
        for &i in &targets {
            let st = &mut self.views[i];
            st.debouncer.note_due(ALL, now, now, true);
            st.reason = Some(Reason::Manual);
            st.breaker.release();
        }
        tracing::info!(views = targets.len(), "manual refresh queued");
        let names = targets
            .iter()
            .map(|&i| self.plan.views[i].name.clone())
            .collect();
        let _ = request.reply.send(Ok(names));
    }

    /// Publishes each view's pending keys, oldest change and last success for the gauges.
    fn publish_gauges(&self) {
        let gauges = self
            .plan
            .views
            .iter()
            .zip(&self.views)
            .map(|(v, st)| {
                let in_flight = st.in_flight.as_ref().map_or(0, |f| f.keys.len());
                ViewGauges {
                    name: v.name.clone(),
                    pending_keys: st.debouncer.len() + in_flight,
                    oldest_pending: st
                        .debouncer
                        .oldest()
                        .into_iter()
                        .chain(st.in_flight.as_ref().and_then(|f| f.oldest))
                        .min(),
                    last_success: st.last_success,
                }
            })
            .collect();
        if let Ok(mut slot) = self.stats.views.lock() {
            *slot = gauges;
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Half the systemd watchdog period, when the service manager asked for one.
fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|period| period / 2)
}

/// The longest a logical capture's reader keeps back a key: the slot holds write-ahead log for
/// that long (at a busy server's 15 MB/s, a second is 15 MB; a `quiet` of minutes would be
/// gigabytes), and once a second is already ten times less often than `poll_interval`.
const MAX_READER_HOLD: Duration = Duration::from_secs(1);

/// How long a logical capture's reader keeps back a key it recorded (see
/// [`crate::logical::reader::Wiring::hold`]): the shortest `quiet` of the views its channel
/// feeds, at most [`MAX_READER_HOLD`] (no view: nothing is held).
fn reader_hold(config: &Config, channel: &str) -> Duration {
    config
        .views
        .iter()
        .filter(|v| v.channels.iter().any(|c| c == channel))
        .map(|v| v.debounce(config.debounce).quiet)
        .min()
        .unwrap_or(Duration::ZERO)
        .min(MAX_READER_HOLD)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_holds_keys_for_the_shortest_quiet_of_the_views_its_channel_feeds() {
        let config = Config::from_str_with_env(
            r#"
[database]
url = "postgres://localhost/app"
[[view]]
name = "mv_a"
mode = "concurrently"
channels = ["c"]
[[view]]
name = "mv_b"
mode = "concurrently"
channels = ["d", "c"]
quiet = "500ms"
[[view]]
name = "mv_c"
mode = "concurrently"
channels = ["d"]
quiet = "100ms"
"#,
            std::path::Path::new("test.toml"),
            &std::collections::HashMap::new(),
        )
        .unwrap();
        assert_eq!(reader_hold(&config, "c"), Duration::from_millis(500));
        assert_eq!(reader_hold(&config, "d"), Duration::from_millis(100));
        assert_eq!(reader_hold(&config, "e"), Duration::ZERO);
        // mv_a alone (the default quiet, 2 s): a second at most.
        let only_a = Config {
            views: config.views[..1].to_vec(),
            ..config.clone()
        };
        assert_eq!(reader_hold(&only_a, "c"), MAX_READER_HOLD);
    }
}
