//! The daemon's background tasks and how they stop.
//!
//! One token tree: a root with one child per [`Stage`]. A stage's tasks are tracked by a
//! [`TaskTracker`] (which, unlike a `JoinSet`, keeps nothing of a finished task, so the many
//! short database steps cost no memory once done). Stopping is ordered and shares one grace
//! period: intake first (the listener, the pg_cron watch and the database steps: nothing new
//! comes in), then the admin server, last the alert delivery, so alerts raised while stopping
//! still get their delivery attempt. Each stage has up to the grace period once asked (they
//! normally end within milliseconds; a stuck stage must not take the alerts' turn); a task
//! still running then is dropped (its stage's second token), never left behind.
//!
//! Refreshes in flight are not here: their stop cancels the query server-side first, which
//! only the main loop knows how to do (see `Daemon::drain_refreshes`).

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Tasks that stop together: asked by [`Stage::token`], dropped when the grace period ends.
pub(super) struct Stage {
    name: &'static str,
    /// Asks the stage's tasks to stop.
    stop: CancellationToken,
    /// Drops whatever is still running once the grace period has passed.
    kill: CancellationToken,
    tracker: TaskTracker,
}

impl Stage {
    fn new(name: &'static str, root: &CancellationToken) -> Stage {
        Stage {
            name,
            stop: root.child_token(),
            kill: CancellationToken::new(),
            tracker: TaskTracker::new(),
        }
    }

    /// The token a task of this stage watches to stop on its own, cleanly.
    pub(super) fn token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Runs `task`, which watches [`Stage::token`] and ends by itself when asked.
    pub(super) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let kill = self.kill.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                biased;
                () = kill.cancelled() => {}
                () = task => {}
            }
        });
    }

    /// Runs `task` until it ends or the stage is asked to stop, whichever comes first (a
    /// database step: dropped with its connection, whose backend then ends too).
    pub(super) fn spawn_until_stopped(&self, task: impl Future<Output = ()> + Send + 'static) {
        let stop = self.stop.clone();
        self.spawn(async move {
            tokio::select! {
                biased;
                () = stop.cancelled() => {}
                () = task => {}
            }
        });
    }

    /// Asks the tasks to stop, so no new work starts; [`Supervisor::stop`] waits for them.
    pub(super) fn cancel(&self) {
        self.stop.cancel();
    }

    async fn stop(&self, grace: Duration) {
        let deadline = Instant::now() + grace;
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout_at(deadline, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                stage = self.name,
                tasks = self.tracker.len(),
                "tasks did not stop within the grace period: dropping them"
            );
            self.kill.cancel();
            self.tracker.wait().await;
        }
    }
}

/// Every background task of the daemon but the refreshes, by the stage it stops with.
pub(super) struct Supervisor {
    root: CancellationToken,
    /// The listener, the pg_cron watch, the collects, catch-ups, guards and pruning.
    pub(super) intake: Stage,
    /// The admin HTTP server.
    pub(super) http: Stage,
    /// Alert delivery to the webhook.
    pub(super) alerts: Stage,
}

impl Supervisor {
    pub(super) fn new() -> Supervisor {
        let root = CancellationToken::new();
        Supervisor {
            intake: Stage::new("intake", &root),
            http: Stage::new("http", &root),
            alerts: Stage::new("alerts", &root),
            root,
        }
    }

    /// Stops the stages in order (intake, admin server, alert delivery), each within `grace`.
    pub(super) async fn stop(self, grace: Duration) {
        for stage in [&self.intake, &self.http, &self.alerts] {
            stage.stop(grace).await;
        }
        self.root.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn stages_stop_in_order_and_a_stuck_task_is_dropped_at_the_grace_period() {
        let sup = Supervisor::new();
        let order = Arc::new(Mutex::new(Vec::new()));
        for (stage, name) in [
            (&sup.intake, "intake"),
            (&sup.http, "http"),
            (&sup.alerts, "alerts"),
        ] {
            let token = stage.token();
            let order = order.clone();
            stage.spawn(async move {
                token.cancelled().await;
                order.lock().unwrap().push(name);
            });
        }
        // A step ends as soon as its stage is asked to stop.
        let step_dropped = Arc::new(AtomicBool::new(true));
        let flag = step_dropped.clone();
        sup.intake.spawn_until_stopped(async move {
            std::future::pending::<()>().await;
            flag.store(false, Ordering::SeqCst);
        });
        // A task that ignores its token is dropped when the grace period ends.
        let stuck_finished = Arc::new(AtomicBool::new(false));
        let flag = stuck_finished.clone();
        sup.http.spawn(async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            flag.store(true, Ordering::SeqCst);
        });
        sup.stop(Duration::from_millis(50)).await;
        assert_eq!(*order.lock().unwrap(), ["intake", "http", "alerts"]);
        assert!(step_dropped.load(Ordering::SeqCst));
        assert!(!stuck_finished.load(Ordering::SeqCst));
    }
}
