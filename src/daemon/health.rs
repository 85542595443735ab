//! Health watch of the main loop: views staler than their `max_staleness`, and a listener down
//! longer than `[alert] listener_down_after`, become alerts (and clear them).

use std::time::{Duration, Instant};

use super::{events, Daemon};
use crate::alert::Subject;

impl Daemon {
    /// How often [`Self::check_health`] runs: a quarter of the shortest threshold it watches,
    /// between 50 ms and 5 s.
    pub(super) fn health_interval(&self) -> Duration {
        self.plan
            .views
            .iter()
            .filter_map(|v| v.config.max_staleness)
            .chain([self.config.alert.listener_down_after])
            .min()
            .unwrap_or(Duration::from_secs(5))
            .div_f64(4.0)
            .clamp(Duration::from_millis(50), Duration::from_secs(5))
    }

    /// Staleness of each view with a `max_staleness`, and a listener down too long.
    pub(super) fn check_health(&mut self, now: Instant) {
        for ((channel, reason), suppressed) in self.rejected_log.flush(now) {
            tracing::warn!(%channel, reason, suppressed, "notification rejected: {suppressed} more like it suppressed");
        }
        for i in 0..self.views.len() {
            let Some(limit) = self.plan.views[i].config.max_staleness else {
                continue;
            };
            let name = self.plan.views[i].name.clone();
            let st = &self.views[i];
            let oldest = [
                st.debouncer.oldest(),
                st.in_flight.as_ref().and_then(|f| f.oldest),
            ]
            .into_iter()
            .flatten()
            .min();
            let age = oldest.map(|t| now.saturating_duration_since(t));
            let subject = Subject::Stale(name.clone());
            match age {
                Some(age) if age > limit => {
                    let staleness = events::Staleness {
                        age,
                        limit,
                        since_success: st.last_success.map(|t| now.saturating_duration_since(t)),
                        failures: st.breaker.failures(),
                    };
                    let event = events::view_stale(&name, &staleness);
                    if let Some(alert) = self.tracker.fail(event, now) {
                        self.alerts.send(alert);
                    }
                }
                _ if self.tracker.is_open(&subject) => {
                    let event = events::view_fresh(&name, limit);
                    self.alerts.send_opt(self.tracker.recover(event));
                }
                _ => {}
            }
        }
        if let Some((since, reason)) = &self.listener_down {
            let down = now.saturating_duration_since(*since);
            if down >= self.config.alert.listener_down_after {
                let event = events::listener_down(&self.db.target(), down, reason);
                if let Some(alert) = self.tracker.fail(event, now) {
                    self.alerts.send(alert);
                }
            }
        }
    }
}
