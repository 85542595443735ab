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
//! # Failures, alerts and the circuit breaker
//!
//! The loop is where failures become known, so it owns the [`Tracker`] of view, circuit,
//! staleness and listener alerts (the pg_cron watch has its own). Each view's retry backoff,
//! busy replica backoff and circuit breaker are plain data (`daemon/breaker.rs`): a failure
//! sends `refresh_failed` (and `circuit_opened` at `[alert] circuit_failures` in a row, after
//! which probes are further and further apart; changes keep accumulating in the debouncer).
//!
//! A success sends `refresh_recovered` (and `circuit_closed` when the circuit was open). A health
//! check runs every few hundred milliseconds: a view whose oldest unreflected change is older
//! than its `max_staleness` is `view_stale` until it is fresh again (`view_fresh`); a listener
//! disconnected longer than `[alert] listener_down_after` is `listener_down` until it is back.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::alert::{Alerts, Event, Kind, Subject, Tracker};
use crate::config::Config;
use crate::db::{Canceller, Db, DbError, UrlError};
use crate::debounce::{Batch, Debouncer, Limits, ALL};
use crate::graph::{Plan, PlanError};
use crate::http::{self, ManualRefresh};
use crate::listener::{self, Inbox, ListenerEvent};
use crate::refresh::{Outcome, Reason, Request, Settings};
use crate::stats::{Stats, ViewGauges};
use crate::store::{self, Collected, Guard, PendingKeys};
use crate::telemetry::{Metrics, RefreshOutcome, Telemetry};

mod breaker;
mod health;
mod intake;
mod isolate;
mod scheduler;
mod supervisor;
mod task;

use breaker::{Failure, Policy};
use scheduler::ViewState;
use supervisor::Supervisor;
use task::{refresh_task, retry_delay, TaskError};

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
    RefreshDone {
        view: usize,
        batch: Batch,
        result: Result<Outcome, TaskError>,
    },
}

/// The task of a refresh in flight, and how to cancel its query.
struct Running {
    cancel: Arc<Mutex<Option<Canceller>>>,
    task: JoinHandle<()>,
}

/// What start-up reads from the database before anything runs.
struct Startup {
    plan: Plan,
    /// Channels a capture feeds, as installed.
    captured: Vec<String>,
    /// How long ago each view (in plan order) last refreshed successfully.
    last_success: Vec<Option<Duration>>,
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

fn warn_if_plaintext(db: &Db) {
    if db.ssl_mode().may_be_plaintext()
        && db.ssl_mode() != crate::tls::SslMode::Disable
        && !db.unix_only()
    {
        tracing::warn!(
            sslmode = %db.ssl_mode(),
            "database.url: sslmode={} falls back to plaintext when the server does not offer TLS, \
             and does not verify the server's certificate; use sslmode=verify-full with sslrootcert",
            db.ssl_mode()
        );
    }
}

/// Resolves the plan, subscribes the views to their channels, and reads what the daemon starts
/// from, on one connection.
async fn start_up(db: &Db, pool: &Pool, config: &Config) -> Result<Startup, DaemonError> {
    let client = pool.get().await.map_err(DbError::from)?;
    db.ensure_primary(&client).await?;
    let plan = Plan::load(&**client, config).await?;
    let pairs: Vec<(String, String)> = plan
        .views
        .iter()
        .flat_map(|v| {
            v.config
                .channels
                .iter()
                .map(|c| (c.clone(), v.name.clone()))
        })
        .collect();
    store::ensure_subscriptions(&**client, &pairs).await?;
    let captured = store::captured_channels(&**client).await?;
    let names: Vec<&str> = plan.views.iter().map(|v| v.name.as_str()).collect();
    let last_success = store::last_success_ages(&**client, &names).await?;
    Ok(Startup {
        plan,
        captured,
        last_success,
    })
}

struct Daemon {
    config: Arc<Config>,
    db: Db,
    pool: Pool,
    plan: Arc<Plan>,
    stats: Arc<Stats>,
    views: Vec<ViewState>,
    /// The task of each view's refresh in flight (beside its [`ViewState::in_flight`]).
    running: Vec<Option<Running>>,
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
    /// Filled by the listener; taken by this loop.
    inbox: Arc<Inbox>,
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
            })
            .collect();
        Daemon {
            tracker: Tracker::new(w.config.alert.repeat_after, replica.clone()),
            config: w.config,
            db: w.db,
            pool: w.pool,
            plan: Arc::new(plan),
            stats: w.stats,
            running: views.iter().map(|_| None).collect(),
            facts,
            views,
            channels,
            internal_tx,
            internal_rx,
            intake: intake::Intake::new(quiet),
            inbox: Arc::default(),
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
        loop {
            let now = Instant::now();
            self.drive_intake(now);
            self.dispatch(now);
            self.publish_gauges();
            let wake = self.next_wake(now);
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some(event) = self.internal_rx.recv() => self.on_internal(event),
                Some(event) = listener_rx.recv() => self.on_listener(event),
                _ = inbox.ready() => self.on_inbox(),
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

    /// Starts the listener and the pg_cron watch in the intake stage; returns the listener's
    /// events.
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
            let token = self.running[i]
                .as_ref()
                .and_then(|r| r.cancel.lock().ok().and_then(|t| t.clone()));
            tracing::warn!(view = %self.plan.views[i].name, "shutdown deadline passed: cancelling the refresh");
            if let Some(token) = token {
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
            if let Some(r) = r.take() {
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
        [views, self.intake_wake()]
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
            self.spawn_refresh(s.view, s.batch, s.reason);
        }
    }

    fn spawn_refresh(&mut self, i: usize, batch: Batch, reason: Reason) {
        let view = &self.plan.views[i];
        let keys: Vec<String> = batch.iter().map(|(k, _)| k.clone()).collect();
        let forced: Vec<String> = batch
            .iter()
            .filter(|(_, p)| p.forced)
            .map(|(k, _)| k.clone())
            .collect();
        let request = Request {
            keys: keys.clone(),
            forced,
            reason,
            wait_for_lock: false,
            horizon: self.intake.horizon_snapshot(),
        };
        let settings = Settings {
            timeout: view.config.timeout.unwrap_or(self.config.refresh.timeout),
            lock_timeout: self.config.refresh.lock_timeout,
            replica: self.replica.clone(),
        };
        let dependents: Vec<String> = view
            .dependents
            .iter()
            .map(|&d| self.plan.views[d].name.clone())
            .collect();
        let cancel: Arc<Mutex<Option<Canceller>>> = Arc::default();
        let task = {
            let pool = self.pool.clone();
            let db = self.db.clone();
            let plan = self.plan.clone();
            let cancel = cancel.clone();
            let liveness = self.config.listener.clone();
            let done = self.internal_tx.clone();
            let span = tracing::info_span!("refresh", view = %view.name, keys = keys.len(), reason = reason.as_str());
            tokio::spawn(tracing::Instrument::instrument(
                async move {
                    let result = refresh_task(
                        &pool,
                        &db,
                        &plan.views[i],
                        &dependents,
                        &request,
                        &settings,
                        &liveness,
                        &cancel,
                    )
                    .await;
                    let _ = done.send(Internal::RefreshDone {
                        view: i,
                        batch,
                        result,
                    });
                },
                span,
            ))
        };
        self.running[i] = Some(Running { cancel, task });
    }

    fn on_internal(&mut self, event: Internal) {
        match event {
            Internal::Collected(result) => self.on_collected(result),
            Internal::Guarded(result) => self.on_guarded(result),
            Internal::CatchUpView { view, keys, seen } => self.on_catch_up_view(view, keys, seen),
            Internal::CatchUpDone(result) => self.on_catch_up_done(result),
            Internal::Pruned(result) => self.on_pruned(result),
            Internal::RefreshDone {
                view,
                batch,
                result,
            } => self.on_refresh_done(view, batch, result),
        }
    }

    fn on_refresh_done(&mut self, i: usize, batch: Batch, result: Result<Outcome, TaskError>) {
        let now = Instant::now();
        self.running[i] = None;
        self.views[i].in_flight = None;
        let name = self.plan.views[i].name.clone();
        let st = &mut self.views[i];
        match result {
            Ok(Outcome::Refreshed {
                keys,
                duration,
                leftover,
            }) => self.on_refreshed(i, batch, keys, duration, leftover, now),
            Ok(Outcome::NothingToDo) => {
                self.metrics
                    .refresh(&name, RefreshOutcome::Skipped, None, None);
                st.breaker.settled();
                tracing::debug!(view = %name, "nothing left to refresh (another replica covered it)");
            }
            Ok(Outcome::Busy) => {
                self.metrics
                    .refresh(&name, RefreshOutcome::Busy, None, None);
                st.debouncer.restore(batch);
                let delay = st.breaker.busy(now);
                tracing::debug!(view = %name, retry_in = ?delay, "another replica is refreshing this view");
            }
            Err(e) => self.on_refresh_failed(i, batch, e, now),
        }
    }

    /// A refresh succeeded: recoveries, the backstop schedule, keys left over, dependents.
    fn on_refreshed(
        &mut self,
        i: usize,
        batch: Batch,
        keys: Option<Vec<String>>,
        duration: Duration,
        leftover: Vec<String>,
        now: Instant,
    ) {
        let name = self.plan.views[i].name.clone();
        let st = &mut self.views[i];
        self.metrics.refresh(
            &name,
            RefreshOutcome::Success,
            Some(duration),
            keys.as_ref().map(Vec::len),
        );
        st.last_success = Some(now);
        for key in st.isolation.succeeded(&batch) {
            tracing::info!(view = %name, key = %key, "a quarantined key refreshed again");
            let released = Event::new(
                Kind::RefreshRecovered,
                Subject::Key {
                    view: name.clone(),
                    key: key.clone(),
                },
                format!("refresh of {name} for key {key} succeeded again"),
            )
            .view(&name);
            self.alerts.send_opt(self.tracker.recover(released));
        }
        let recovery = st.breaker.succeeded();
        if recovery.failures > 0 {
            tracing::info!(view = %name, after_failures = recovery.failures, "refresh recovered");
        }
        let recovered = Event::new(
            Kind::RefreshRecovered,
            Subject::View(name.clone()),
            format!("refresh of {name} succeeded again"),
        )
        .view(&name)
        .failures(u64::from(recovery.failures));
        self.alerts.send_opt(self.tracker.recover(recovered));
        if recovery.circuit_closed {
            let closed = Event::new(
                Kind::CircuitClosed,
                Subject::Circuit(name.clone()),
                format!("{name} refreshed successfully: circuit closed, normal refreshes resume"),
            )
            .view(&name);
            self.alerts.send_opt(self.tracker.recover(closed));
        }
        tracing::info!(
            view = %name,
            keys = keys.as_ref().map_or("all".to_owned(), |k| k.len().to_string()),
            duration_ms = duration.as_millis() as u64,
            "refreshed"
        );
        if keys.is_none() {
            // A whole refresh resets the backstop: `schedule` is "at least this often".
            if let Some(period) = self.plan.views[i].config.schedule {
                st.next_schedule = Some(now + period);
            }
        }
        for k in &leftover {
            st.debouncer.park(k, now);
        }
        let oldest = batch.iter().map(|(_, p)| p.first).min().unwrap_or(now);
        let keys = keys.unwrap_or_else(|| vec![ALL.to_owned()]);
        scheduler::propagate(
            &mut self.views,
            self.plan.views[i].dependents.iter().copied(),
            &keys,
            oldest,
            now,
        );
    }

    /// A refresh failed: a failing key is isolated (incremental views), else the view backs off,
    /// maybe opening its circuit; alerts say so.
    fn on_refresh_failed(&mut self, i: usize, batch: Batch, e: TaskError, now: Instant) {
        let name = self.plan.views[i].name.clone();
        let st = &mut self.views[i];
        self.metrics
            .refresh(&name, RefreshOutcome::Failure, None, None);
        let statement_error = matches!(&e, TaskError::Refresh(r) if !r.is_connection_error());
        let batch = if statement_error && !self.plan.views[i].mode().is_whole_view() {
            let (min, max) = (self.config.refresh.retry_min, self.config.refresh.retry_max);
            match st
                .isolation
                .failed(batch, now, |n| retry_delay(min, max, n))
            {
                isolate::Verdict::Split => {
                    tracing::warn!(view = %name, error = %e, "refresh of several keys failed: refreshing them in halves to isolate the key that fails");
                    return;
                }
                isolate::Verdict::Quarantined { key, first } => {
                    tracing::error!(view = %name, key = %key, error = %e, "a key makes the refresh fail: quarantined, retried alone with backoff; the other keys keep refreshing");
                    let event = Event::new(
                        Kind::RefreshFailed,
                        Subject::Key {
                    view: name.clone(),
                    key: key.clone(),
                },
                        format!("refresh of {name} fails for key {key}: the key is quarantined (retried alone with backoff); other keys keep refreshing"),
                    )
                    .view(&name)
                    .error(e.to_string())
                    .detail("key", key.clone())
                    .detail("first", first);
                    match self.tracker.fail(event, now) {
                        Some(alert) => self.alerts.send(alert),
                        None => self.stats.alerts_suppressed.inc(),
                    }
                    return;
                }
                isolate::Verdict::ViewFails(batch) => batch,
            }
        } else {
            batch
        };
        st.debouncer.restore(batch);
        let Failure {
            failures,
            delay,
            circuit_opened,
        } = st.breaker.failed(now, &Policy::new(&self.config));
        let error = e.to_string();
        let failed = Event::new(
            Kind::RefreshFailed,
            Subject::View(name.clone()),
            format!("refresh of {name} failed ({failures} in a row)"),
        )
        .view(&name)
        .error(error.clone())
        .failures(u64::from(failures))
        .detail("retry_in_seconds", delay.as_secs_f64());
        match self.tracker.fail(failed, now) {
            Some(alert) => self.alerts.send(alert),
            None => self.stats.alerts_suppressed.inc(),
        }
        if circuit_opened {
            self.stats.circuits_opened.inc();
            let opened = Event::new(
                Kind::CircuitOpened,
                Subject::Circuit(name.clone()),
                format!(
                    "{name} failed {failures} times in a row: refreshes paused, probing with backoff (next in {})",
                    humantime::format_duration(Duration::from_millis(delay.as_millis() as u64))
                ),
            )
            .view(&name)
            .error(error)
            .failures(u64::from(failures))
            .detail("next_probe_in_seconds", delay.as_secs_f64());
            if let Some(alert) = self.tracker.fail(opened, now) {
                self.alerts.send(alert);
            }
        }
        tracing::error!(
            view = %name,
            consecutive_failures = failures,
            retry_in = ?delay,
            error = %e,
            "refresh failed"
        );
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

/// Each view's scheduling state at start-up: a whole-view view never populated is due at once.
fn view_states(plan: &Plan, config: &Config, now: Instant) -> Vec<ViewState> {
    let limits = Limits {
        cap: config.refresh.max_pending_keys,
        batch: config.refresh.batch_keys,
        patience: HORIZON_PATIENCE,
    };
    plan.views
        .iter()
        .map(|v| {
            let mut debouncer = Debouncer::new(v.config.debounce(config.debounce), limits);
            let mut reason = None;
            if v.mode().is_whole_view() && !v.populated {
                debouncer.note_due(ALL, now, now, true);
                reason = Some(Reason::Startup);
            }
            ViewState {
                next_schedule: v.config.schedule.map(|s| now + s),
                reason,
                ..ViewState::new(debouncer)
            }
        })
        .collect()
}

/// channel → (the views subscribed to it, whether a capture feeds it).
fn channel_map(
    plan: &Plan,
    config: &Config,
    captured: &[String],
) -> BTreeMap<String, (Vec<usize>, bool)> {
    let captured: BTreeSet<&str> = config
        .captures
        .iter()
        .map(|c| c.channel.as_str())
        .chain(captured.iter().map(String::as_str))
        .collect();
    let mut channels: BTreeMap<String, (Vec<usize>, bool)> = BTreeMap::new();
    for (i, v) in plan.views.iter().enumerate() {
        for c in &v.config.channels {
            let entry = channels
                .entry(c.clone())
                .or_insert_with(|| (Vec::new(), captured.contains(c.as_str())));
            entry.0.push(i);
        }
    }
    channels
}

/// `1.2s`: a duration for messages.
fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
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
