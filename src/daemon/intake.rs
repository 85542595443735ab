//! What the main loop learns changed, and the hand-over bookkeeping:
//!
//! - **collect** (every `quiet / 2` while it finds keys, else on a notification of a captured
//!   channel, after every (re)connect and every `catch_up_interval`; see `Collecting`; at once
//!   when a logical capture's reader wrote keys): moves dirty keys into pending keys in bounded
//!   chunks ([`store::collect`]) and notes them in the subscribed views' debouncers;
//! - **catch-up** (start-up, reconnect, `catch_up_interval`): reads each view's pending keys,
//!   one bounded query per view ([`store::read_pending`]), for what another replica or an
//!   earlier run collected;
//! - **guards** (while a key waits for the horizon, at most once per `quiet / 5`, but two at
//!   once after a collect a reader asked for):
//!   one statement takes a new guard and tells which earlier ones cleared; the newest cleared
//!   one is the horizon passed to refreshes (see [`crate::store`]);
//! - the listener's **inbox**: captured channels ask for a collect, other channels' keys are
//!   noted as they are;
//! - **pruning** of `refresh_history`, in bounded batches on its own schedule.
//!
//! Every database step runs in a task of its own and reports back through `Internal`, one
//! bounded result at a time, so the loop (and the watchdog it feeds) never waits on a query.

use std::collections::VecDeque;
use std::future::Future;
use std::time::{Duration, Instant};

use super::{Daemon, Internal};
use crate::debounce::{Pending, ALL};
use crate::listener::ListenerEvent;
use crate::store::{self, Collected, Guard, PendingKeys};

/// Dirty rows taken per collect transaction.
const COLLECT_CHUNK: i64 = 5_000;
/// Guards waiting to clear; with more, the newest is replaced (a later guard clearing implies
/// that every earlier one did).
const MAX_GUARDS: usize = 32;
/// How often `refresh_history` is pruned, and how many rows per statement.
const PRUNE_EVERY: Duration = Duration::from_secs(600);
const PRUNE_BATCH: i64 = 10_000;

/// Whether the daemon collects on its own (writers then need not notify; see the generation in
/// `sql/mvrefresh.sql`):
///
/// ```text
///   Polling ──a collect finds nothing (generation made odd: writers notify again)──▶ Quiescing
///     ▲                                                                                 │
///     │            a guard taken afterwards clears (every writer that saw the even      │
///     │            generation has ended), then one more collect:                        │
///     ├────────────────────────── it finds keys ◀───────────────────────────────────────┤
///     │                                                                                 ▼
///     └──── a collect finds keys (generation even) ◀── notification, catch-up ──── Idle (nothing found)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Collecting {
    /// Collects every `quiet / 2` whether notified or not.
    Polling,
    /// Told writers to notify at `since`; `swept` once the last collect was asked for.
    Quiescing { since: Instant, swept: bool },
    /// Collects when notified, and at every catch-up.
    Idle,
}

/// The intake's state, owned by the main loop.
#[derive(Debug)]
pub(super) struct Intake {
    collecting: Collecting,
    collect_running: bool,
    collect_wanted: bool,
    /// A logical capture's reader wrote keys: the next collect does not wait for
    /// `collect_every`.
    collect_now: bool,
    /// The collect running was asked for by a reader.
    collect_prompted: bool,
    last_collect: Option<Instant>,
    /// The least time between two collects that are not continuing a full one.
    collect_every: Duration,
    guard_running: bool,
    last_guard: Option<Instant>,
    guard_every: Duration,
    /// Guards still to take without waiting for `guard_every`: after a collect a reader asked
    /// for found keys, two (one taken after it, one that sees that one clear), so those keys
    /// wait for the horizon no longer than writers' transactions take to end.
    prompt_guards: u8,
    next_guard: i64,
    /// Guards not known to have cleared: id, when their statement was sent, the guard.
    waiting: VecDeque<(i64, Instant, Guard)>,
    /// The newest cleared guard: when its statement was sent, and its snapshot.
    horizon: Option<(Instant, String)>,
    catch_up_running: bool,
    catch_up_again: bool,
    prune_running: bool,
    last_prune: Option<Instant>,
}

impl Intake {
    /// `quiet` is the shortest debounce of any view. Collecting every `quiet / 2` takes a key
    /// before it is due (its due time counts from when it turned dirty, not from the collect),
    /// while a key written continuously turns dirty again (one row, no notification while the
    /// daemon polls) and is looked up afresh by each writer's session at most twice per
    /// `quiet`: what writers pay for the daemon running. Guards every `quiet / 5`, so the
    /// horizon passes a collected key before it is due.
    pub(super) fn new(quiet: Duration) -> Intake {
        let collect_every = (quiet / 2).clamp(Duration::from_millis(10), Duration::from_secs(2));
        let guard_every = (quiet / 5).clamp(Duration::from_millis(10), Duration::from_millis(500));
        Intake {
            // Until a collect finds nothing, as if a daemon had been collecting: the first
            // quiet moment sets the generation's parity right, whatever a crash left.
            collecting: Collecting::Polling,
            collect_running: false,
            collect_wanted: false,
            collect_now: false,
            collect_prompted: false,
            last_collect: None,
            collect_every,
            guard_running: false,
            last_guard: None,
            guard_every,
            prompt_guards: 0,
            next_guard: 0,
            waiting: VecDeque::new(),
            horizon: None,
            catch_up_running: false,
            catch_up_again: false,
            prune_running: false,
            last_prune: None,
        }
    }

    /// When the next collect may start: none while one runs or none is wanted (polling wants
    /// one always); at most one per `collect_every`, unless a reader wrote keys.
    fn collect_due(&self, now: Instant) -> Option<Instant> {
        let wanted = self.collect_wanted || self.collecting == Collecting::Polling;
        if !wanted || self.collect_running {
            return None;
        }
        Some(match self.last_collect {
            Some(t) if !self.collect_now => t + self.collect_every,
            _ => now,
        })
    }

    /// When the next guard may be taken, if one is needed and none runs.
    fn guard_ready_at(&self, now: Instant) -> Instant {
        match self.last_guard {
            Some(t) if self.prompt_guards == 0 => t + self.guard_every,
            _ => now,
        }
    }

    /// When the newest cleared guard was taken.
    pub(super) fn horizon(&self) -> Option<Instant> {
        self.horizon.as_ref().map(|(at, _)| *at)
    }

    /// The newest cleared guard's snapshot, for a refresh to consume under.
    pub(super) fn horizon_snapshot(&self) -> Option<String> {
        self.horizon.as_ref().map(|(_, s)| s.clone())
    }
}

impl Daemon {
    /// Runs one database step (a collect, a catch-up, a pruning, a look at partitions) in a task of its own, so the
    /// main loop never waits on a query. At shutdown the step is dropped with its connection,
    /// whose backend then ends too (`client_connection_check_interval` on pooled connections).
    pub(super) fn spawn_step(&self, step: impl Future<Output = ()> + Send + 'static) {
        self.tasks.intake.spawn_until_stopped(step);
    }

    /// The next instant the intake has something to start.
    pub(super) fn intake_wake(&self, now: Instant) -> Option<Instant> {
        let i = &self.intake;
        let collect = i.collect_due(now);
        let guard = (!i.guard_running && self.needs_guard()).then(|| i.guard_ready_at(now));
        let prune = (!i.prune_running).then(|| i.last_prune.map_or(now, |t| t + PRUNE_EVERY));
        [collect, guard, prune].into_iter().flatten().min()
    }

    /// Starts whatever intake work is due.
    pub(super) fn drive_intake(&mut self, now: Instant) {
        // Quiescing: once a guard taken after writers were told to notify has cleared, the last
        // collect.
        if let Collecting::Quiescing {
            since,
            swept: false,
        } = self.intake.collecting
        {
            if self.intake.horizon().is_some_and(|h| h > since) {
                self.intake.collecting = Collecting::Quiescing { since, swept: true };
                self.intake.collect_wanted = true;
            }
        }
        if self.intake.collect_due(now).is_some_and(|t| t <= now) {
            self.start_collect(now);
        }
        let i = &self.intake;
        if !i.guard_running && i.guard_ready_at(now) <= now && self.needs_guard() {
            self.start_guard(now);
        }
        let i = &self.intake;
        if !i.prune_running && i.last_prune.is_none_or(|t| now >= t + PRUNE_EVERY) {
            self.start_prune(now);
        }
    }

    /// Whether some key (or going idle) waits for a horizon newer than the current one.
    fn needs_guard(&self) -> bool {
        let horizon = self.intake.horizon();
        if let Collecting::Quiescing {
            since,
            swept: false,
        } = self.intake.collecting
        {
            if horizon.is_none_or(|h| h <= since) {
                return true;
            }
        }
        self.views
            .iter()
            .any(|v| v.debouncer.waits_for_horizon(horizon))
    }

    /// Asks for a collect of the dirty keys (started by [`Daemon::drive_intake`]).
    pub(super) fn want_collect(&mut self) {
        self.intake.collect_wanted = true;
    }

    /// A logical capture's reader wrote keys: collects them as soon as no collect runs. Its
    /// writes come at most twice per `poll_interval` under a steady stream, so these collects
    /// are as bounded as the reader's transactions; waiting for `collect_every` as a writer's
    /// notification does would add up to `quiet / 2` to the lag of every key it read.
    pub(super) fn collect_at_once(&mut self) {
        self.intake.collect_wanted = true;
        self.intake.collect_now = true;
    }

    fn start_collect(&mut self, now: Instant) {
        let channels: Vec<String> = self
            .channels
            .iter()
            .filter(|(_, (_, captured))| *captured)
            .map(|(c, _)| c.clone())
            .collect();
        self.intake.collect_wanted = false;
        self.intake.collect_prompted = self.intake.collect_now;
        self.intake.collect_now = false;
        if channels.is_empty() {
            self.intake.collecting = Collecting::Idle;
            return;
        }
        self.intake.collect_running = true;
        self.intake.last_collect = Some(now);
        let announce = self.intake.collecting == Collecting::Polling;
        let pool = self.pool.clone();
        let done = self.internal_tx.clone();
        self.spawn_step(async move {
            let result = bounded(async {
                let mut client = pool.get().await.map_err(|e| e.to_string())?;
                let rows = store::collect(&mut client, &channels, COLLECT_CHUNK)
                    .await
                    .map_err(|e| crate::db::error_text(&e))?;
                if rows.is_empty() && announce {
                    store::announce_idle(&**client)
                        .await
                        .map_err(|e| crate::db::error_text(&e))?;
                }
                Ok(rows)
            })
            .await;
            let _ = done.send(Internal::Collected(result));
        });
    }

    pub(super) fn on_collected(&mut self, result: Result<Vec<Collected>, String>) {
        self.intake.collect_running = false;
        let rows = match result {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "could not collect the dirty keys");
                return;
            }
        };
        if rows.len() as i64 >= COLLECT_CHUNK {
            // More are waiting: the next chunk at once.
            self.intake.collect_wanted = true;
            self.intake.last_collect = None;
        }
        if self.intake.collect_prompted && !rows.is_empty() {
            self.intake.prompt_guards = 2;
        }
        let now = Instant::now();
        self.intake.collecting = match (self.intake.collecting, rows.is_empty()) {
            (_, false) => Collecting::Polling,
            // Writers were told to notify (the task made the generation odd).
            (Collecting::Polling, true) => Collecting::Quiescing {
                since: now,
                swept: false,
            },
            (Collecting::Quiescing { swept: true, .. }, true) => Collecting::Idle,
            (state, true) => state,
        };
        tracing::debug!(keys = rows.len(), state = ?self.intake.collecting, "collected");
        self.stats.collected_keys.add(rows.len() as u64);
        for row in rows {
            if row.odd {
                tracing::warn!(
                    channel = %row.channel,
                    "a dirty key is not valid UTF-8: the views of its channel are refreshed whole"
                );
            }
            let first = now.checked_sub(row.age).unwrap_or(now);
            let Some((views, _)) = self.channels.get(&row.channel) else {
                continue;
            };
            for &i in views {
                self.views[i]
                    .debouncer
                    .add(&row.key, Pending::stored(first, now));
            }
        }
    }

    fn start_guard(&mut self, now: Instant) {
        self.intake.guard_running = true;
        self.intake.last_guard = Some(now);
        self.intake.prompt_guards = self.intake.prompt_guards.saturating_sub(1);
        let waiting: Vec<(i64, Guard)> = self
            .intake
            .waiting
            .iter()
            .map(|(id, _, g)| (*id, g.clone()))
            .collect();
        let pool = self.pool.clone();
        let done = self.internal_tx.clone();
        self.spawn_step(async move {
            let result = bounded(async {
                let client = pool.get().await.map_err(|e| e.to_string())?;
                let refs: Vec<(i64, &Guard)> = waiting.iter().map(|(id, g)| (*id, g)).collect();
                // Taken only now: every collect reported before this instant has committed.
                let sent = Instant::now();
                store::guard(&**client, &refs)
                    .await
                    .map(|(guard, cleared)| (sent, guard, cleared))
                    .map_err(|e| crate::db::error_text(&e))
            })
            .await;
            let _ = done.send(Internal::Guarded(result));
        });
    }

    pub(super) fn on_guarded(&mut self, result: Result<(Instant, Guard, Option<i64>), String>) {
        self.intake.guard_running = false;
        let (sent, guard, cleared) = match result {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "could not take a hand-over guard");
                return;
            }
        };
        let i = &mut self.intake;
        if let Some(cleared) = cleared {
            while let Some((id, at, g)) = i.waiting.pop_front() {
                if id > cleared {
                    i.waiting.push_front((id, at, g));
                    break;
                }
                if id == cleared {
                    i.horizon = Some((at, g.snapshot));
                }
            }
        }
        if guard.holders.is_empty() {
            // Nobody was writing a captured table: it is clear already.
            i.horizon = Some((sent, guard.snapshot));
            i.waiting.clear();
        } else {
            if i.waiting.len() >= MAX_GUARDS {
                i.waiting.pop_back();
            }
            i.next_guard += 1;
            i.waiting.push_back((i.next_guard, sent, guard));
        }
    }

    /// Reads what is pending for every view (and collects), unless a catch-up is running (then
    /// once more after it).
    pub(super) fn start_catch_up(&mut self) {
        self.want_collect();
        if self.intake.catch_up_running {
            self.intake.catch_up_again = true;
            return;
        }
        self.intake.catch_up_running = true;
        let pool = self.pool.clone();
        let done = self.internal_tx.clone();
        let views: Vec<(String, bool)> = self
            .plan
            .views
            .iter()
            .map(|v| (v.name.clone(), v.mode().is_whole_view()))
            .collect();
        let limit = self.config.refresh.max_pending_keys as i64;
        let stats = self.stats.clone();
        self.spawn_step(async move {
            let result = bounded(async {
                let client = pool.get().await.map_err(|e| e.to_string())?;
                for (i, (name, whole)) in views.iter().enumerate() {
                    let keys = store::read_pending(&**client, name, *whole, limit)
                        .await
                        .map_err(|e| crate::db::error_text(&e))?;
                    let seen = Instant::now();
                    if done
                        .send(Internal::CatchUpView {
                            view: i,
                            keys,
                            seen,
                        })
                        .is_err()
                    {
                        break;
                    }
                }
                Ok(())
            })
            .await;
            stats.catch_ups.inc();
            let _ = done.send(Internal::CatchUpDone(result));
        });
    }

    pub(super) fn on_catch_up_view(&mut self, i: usize, keys: PendingKeys, seen: Instant) {
        let debouncer = &mut self.views[i].debouncer;
        if let Some(age) = keys.all {
            let first = seen.checked_sub(age).unwrap_or(seen);
            debouncer.add(ALL, Pending::stored(first, seen));
        }
        for (key, age) in keys.keys {
            let first = seen.checked_sub(age).unwrap_or(seen);
            debouncer.add(&key, Pending::stored(first, seen));
        }
    }

    pub(super) fn on_catch_up_done(&mut self, result: Result<(), String>) {
        self.intake.catch_up_running = false;
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not read the pending keys");
        }
        if std::mem::take(&mut self.intake.catch_up_again) {
            self.start_catch_up();
        }
    }

    fn start_prune(&mut self, now: Instant) {
        self.intake.prune_running = true;
        self.intake.last_prune = Some(now);
        let pool = self.pool.clone();
        let done = self.internal_tx.clone();
        let retention = self.config.refresh.history_retention;
        self.spawn_step(async move {
            let result = bounded(async {
                let client = pool.get().await.map_err(|e| e.to_string())?;
                let mut total = 0;
                loop {
                    let n = store::prune_history(&**client, retention, PRUNE_BATCH)
                        .await
                        .map_err(|e| crate::db::error_text(&e))?;
                    total += n;
                    if (n as i64) < PRUNE_BATCH {
                        return Ok(total);
                    }
                    tokio::task::yield_now().await;
                }
            })
            .await;
            let _ = done.send(Internal::Pruned(result));
        });
    }

    pub(super) fn on_pruned(&mut self, result: Result<u64, String>) {
        self.intake.prune_running = false;
        match result {
            Ok(0) => {}
            Ok(n) => tracing::debug!(rows = n, "pruned mvrefresh.refresh_history"),
            Err(e) => tracing::warn!(error = %e, "could not prune mvrefresh.refresh_history"),
        }
    }

    /// Takes what the listener received: captured channels ask for a collect; keys of other
    /// channels are noted for their views (they write nothing durable: forced).
    pub(super) fn on_inbox(&mut self) {
        let received = self.inbox.take();
        if received.collect {
            self.want_collect();
        }
        for (channel, keys) in received.keys {
            let Some((views, _)) = self.channels.get(&channel) else {
                continue;
            };
            for &i in views {
                for (key, at) in &keys {
                    self.views[i].debouncer.note(key, *at, true);
                }
            }
        }
        let now = Instant::now();
        for ((channel, reason), r) in received.rejected {
            // Counted exactly (metrics); logged at most once per channel, reason and interval.
            let key = (channel, reason);
            if let Some(suppressed) = self.rejected_log.allow_many(&key, r.count, now) {
                tracing::warn!(
                    channel = %key.0,
                    reason,
                    count = r.count,
                    suppressed,
                    payload = %r.sample,
                    "notification rejected: {}",
                    r.error
                );
            }
        }
    }

    pub(super) fn on_listener(&mut self, event: ListenerEvent) {
        match event {
            ListenerEvent::Up => {
                if let Some((since, _)) = self.listener_down.take() {
                    let now = Instant::now();
                    let down = now.saturating_duration_since(since);
                    let event = super::events::listener_recovered(down);
                    self.alerts.send_opt(self.tracker.recover(event));
                }
                // Notifications on channels without capture were missed while not listening
                // (before start-up too): everything may have changed for their views.
                let now = Instant::now();
                for (views, captured) in self.channels.values() {
                    if !captured {
                        for &i in views {
                            self.views[i].debouncer.note(ALL, now, true);
                        }
                    }
                }
                self.start_catch_up();
            }
            ListenerEvent::Down(reason) => match &mut self.listener_down {
                Some((_, last)) => *last = reason,
                None => self.listener_down = Some((Instant::now(), reason)),
            },
        }
    }
}

/// How long a database step may take before the daemon gives up on it: the server ends its
/// statement at `BOOKKEEPING_TIMEOUT`, but a frozen connection never delivers that answer.
const STEP_PATIENCE: Duration = Duration::from_secs(crate::db::BOOKKEEPING_TIMEOUT.as_secs() + 5);

/// `step`, or an error once [`STEP_PATIENCE`] has passed (its pooled connection is then dropped
/// with it, and the pool's check before reuse discards a connection that does not answer).
pub(super) async fn bounded<T>(step: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::time::timeout(STEP_PATIENCE, step)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {STEP_PATIENCE:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_wait_for_collect_every_unless_a_reader_wrote_keys() {
        let t0 = Instant::now();
        let mut i = Intake::new(Duration::from_millis(250));
        i.collecting = Collecting::Idle;
        assert_eq!(i.collect_due(t0), None, "idle and nothing wanted");
        // A writer's notification right after a collect waits for collect_every.
        i.last_collect = Some(t0);
        i.collect_wanted = true;
        let now = t0 + Duration::from_millis(10);
        assert_eq!(i.collect_due(now), Some(t0 + Duration::from_millis(125)));
        // A reader's write does not.
        i.collect_now = true;
        assert_eq!(i.collect_due(now), Some(now));
        // Never two at once: the next starts when the running one ends.
        i.collect_running = true;
        assert_eq!(i.collect_due(now), None);
    }

    #[test]
    fn after_a_collect_a_reader_asked_for_two_guards_go_at_once() {
        let t0 = Instant::now();
        let mut i = Intake::new(Duration::from_millis(250));
        i.last_guard = Some(t0);
        let now = t0 + Duration::from_millis(1);
        assert_eq!(i.guard_ready_at(now), t0 + Duration::from_millis(50));
        i.prompt_guards = 2;
        assert_eq!(i.guard_ready_at(now), now);
        i.prompt_guards = 0;
        assert_eq!(i.guard_ready_at(now), t0 + Duration::from_millis(50));
    }
}
