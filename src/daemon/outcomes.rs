//! Starting a refresh, and what its outcome does to the view's state: success (recoveries, the
//! backstop schedule, keys left over, dependents), another replica busy, failure (isolating a
//! failing key, backoff, the circuit). The alerts' wording is in `daemon/events.rs`.
//!
//! # Failures, alerts and the circuit breaker
//!
//! The loop is where failures become known, so it owns the [`Tracker`](crate::alert::Tracker) of view, circuit,
//! staleness and listener alerts (the pg_cron watch has its own). Each view's retry backoff,
//! busy replica backoff and circuit breaker are plain data (`daemon/breaker.rs`): a failure
//! sends `refresh_failed` (and `circuit_opened` at `[alert] circuit_failures` in a row, after
//! which probes are further and further apart; changes keep accumulating in the debouncer).
//!
//! A success sends `refresh_recovered` (and `circuit_closed` when the circuit was open). A health
//! check runs every few hundred milliseconds: a view whose oldest unreflected change is older
//! than its `max_staleness` is `view_stale` until it is fresh again (`view_fresh`); a listener
//! disconnected longer than `[alert] listener_down_after` is `listener_down` until it is back.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::breaker::{Failure, Policy};
use super::task::{refresh_task, retry_delay, TaskError};
use super::{events, isolate, scheduler, Daemon, Internal, Running};
use crate::db::Canceller;
use crate::debounce::{Batch, ALL};
use crate::refresh::{Outcome, Reason, Request, Settings};
use crate::telemetry::RefreshOutcome;

impl Daemon {
    pub(super) fn spawn_refresh(&mut self, i: usize, batch: Batch, reason: Reason, nulls: bool) {
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
            nulls,
        };
        let chunk = self.next_chunk;
        self.next_chunk += 1;
        let settings = Settings::new(view, &self.config.refresh, self.replica.clone());
        let dependents = self.plan.dependent_names(i);
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
                        chunk,
                        batch,
                        result,
                    });
                },
                span,
            ))
        };
        self.running[i].push((chunk, Running { cancel, task }));
    }

    pub(super) fn on_refresh_done(
        &mut self,
        i: usize,
        chunk: u64,
        batch: Batch,
        result: Result<Outcome, TaskError>,
    ) {
        let now = Instant::now();
        self.running[i].retain(|(c, _)| *c != chunk);
        let st = &mut self.views[i];
        if st.in_flight.as_mut().is_none_or(|f| f.chunk_done(&batch)) {
            st.in_flight = None;
        }
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
            let released = events::key_released(&name, &key);
            self.alerts.send_opt(self.tracker.recover(released));
        }
        let recovery = st.breaker.succeeded();
        if recovery.failures > 0 {
            tracing::info!(view = %name, after_failures = recovery.failures, "refresh recovered");
        }
        let recovered = events::refresh_recovered(&name, recovery.failures);
        self.alerts.send_opt(self.tracker.recover(recovered));
        if recovery.circuit_closed {
            let closed = events::circuit_closed(&name);
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
                    let event = events::key_quarantined(&name, &key, first, &e.to_string());
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
        let failed = events::refresh_failed(&name, failures, delay, &error);
        match self.tracker.fail(failed, now) {
            Some(alert) => self.alerts.send(alert),
            None => self.stats.alerts_suppressed.inc(),
        }
        if circuit_opened {
            self.stats.circuits_opened.inc();
            let opened = events::circuit_opened(&name, failures, delay, &error);
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
}
