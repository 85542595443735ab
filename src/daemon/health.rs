//! Health watch of the main loop: views staler than their `max_staleness`, and a listener down
//! longer than `[alert] listener_down_after`, become alerts (and clear them).

use std::time::{Duration, Instant};

use super::{secs, Daemon};
use crate::alert::{Event, Kind, Subject};

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
                    let since_success = st.last_success.map(|t| now.saturating_duration_since(t));
                    let mut event = Event::new(
                        Kind::ViewStale,
                        subject,
                        format!(
                            "{name} is stale: its oldest unreflected change is {} old (max_staleness {}); last success {}",
                            secs(age),
                            humantime::format_duration(limit),
                            since_success.map_or("not since start-up".to_owned(), |d| format!("{} ago", secs(d)))
                        ),
                    )
                    .view(&name)
                    .detail("oldest_change_age_seconds", age.as_secs_f64())
                    .detail("max_staleness_seconds", limit.as_secs_f64())
                    .detail(
                        "since_last_success_seconds",
                        since_success.map(|d| d.as_secs_f64()),
                    );
                    if st.breaker.failures() > 0 {
                        event = event.failures(u64::from(st.breaker.failures()));
                    }
                    if let Some(alert) = self.tracker.fail(event, now) {
                        self.alerts.send(alert);
                    }
                }
                _ if self.tracker.is_open(&subject) => {
                    let event = Event::new(
                        Kind::ViewFresh,
                        subject,
                        format!(
                            "{name} is fresh again (within max_staleness {})",
                            humantime::format_duration(limit)
                        ),
                    )
                    .view(&name);
                    self.alerts.send_opt(self.tracker.recover(event));
                }
                _ => {}
            }
        }
        if let Some((since, reason)) = &self.listener_down {
            let down = now.saturating_duration_since(*since);
            if down >= self.config.alert.listener_down_after {
                let event = Event::new(
                    Kind::ListenerDown,
                    Subject::Listener,
                    format!(
                        "the LISTEN connection to {} has been down for {}",
                        self.db.target(),
                        secs(down)
                    ),
                )
                .error(reason.clone())
                .detail("down_seconds", down.as_secs_f64());
                if let Some(alert) = self.tracker.fail(event, now) {
                    self.alerts.send(alert);
                }
            }
        }
    }
}
