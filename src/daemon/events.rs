//! The alert events the main loop raises: their subjects and wording, in one place. The loop
//! decides when (failures, recoveries, staleness, the listener); these say what.

use std::time::Duration;

use crate::alert::{Event, Kind, Subject};

/// `1.2s`: a duration for messages.
pub(super) fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// A refresh of `view` failed, `failures` times in a row; retried in `retry_in`.
pub(super) fn refresh_failed(view: &str, failures: u32, retry_in: Duration, error: &str) -> Event {
    Event::new(
        Kind::RefreshFailed,
        Subject::View(view.to_owned()),
        format!("refresh of {view} failed ({failures} in a row)"),
    )
    .view(view)
    .error(error.to_owned())
    .failures(u64::from(failures))
    .detail("retry_in_seconds", retry_in.as_secs_f64())
}

/// `view` refreshed after failing `failures` times (nothing is sent when it was not failing).
pub(super) fn refresh_recovered(view: &str, failures: u32) -> Event {
    Event::new(
        Kind::RefreshRecovered,
        Subject::View(view.to_owned()),
        format!("refresh of {view} succeeded again"),
    )
    .view(view)
    .failures(u64::from(failures))
}

/// `key` makes every refresh of `view` fail: it is quarantined (`first`: for the first time).
pub(super) fn key_quarantined(view: &str, key: &str, first: bool, error: &str) -> Event {
    Event::new(
        Kind::RefreshFailed,
        key_subject(view, key),
        format!(
            "refresh of {view} fails for key {key}: the key is quarantined (retried alone with \
             backoff); other keys keep refreshing"
        ),
    )
    .view(view)
    .error(error.to_owned())
    .detail("key", key.to_owned())
    .detail("first", first)
}

/// A quarantined `key` of `view` refreshed again.
pub(super) fn key_released(view: &str, key: &str) -> Event {
    Event::new(
        Kind::RefreshRecovered,
        key_subject(view, key),
        format!("refresh of {view} for key {key} succeeded again"),
    )
    .view(view)
}

fn key_subject(view: &str, key: &str) -> Subject {
    Subject::Key {
        view: view.to_owned(),
        key: key.to_owned(),
    }
}

/// `view` failed `failures` times in a row: its circuit opens; the next probe is in `next`.
pub(super) fn circuit_opened(view: &str, failures: u32, next: Duration, error: &str) -> Event {
    Event::new(
        Kind::CircuitOpened,
        Subject::Circuit(view.to_owned()),
        format!(
            "{view} failed {failures} times in a row: refreshes paused, probing with backoff \
             (next in {})",
            humantime::format_duration(Duration::from_millis(next.as_millis() as u64))
        ),
    )
    .view(view)
    .error(error.to_owned())
    .failures(u64::from(failures))
    .detail("next_probe_in_seconds", next.as_secs_f64())
}

/// A probe of `view` succeeded: its circuit closes.
pub(super) fn circuit_closed(view: &str) -> Event {
    Event::new(
        Kind::CircuitClosed,
        Subject::Circuit(view.to_owned()),
        format!("{view} refreshed successfully: circuit closed, normal refreshes resume"),
    )
    .view(view)
}

/// What makes a view stale: its oldest unreflected change, its limit, its last success.
pub(super) struct Staleness {
    pub age: Duration,
    pub limit: Duration,
    pub since_success: Option<Duration>,
    pub failures: u32,
}

/// `view`'s oldest unreflected change is older than its `max_staleness`.
pub(super) fn view_stale(view: &str, s: &Staleness) -> Event {
    let last = s
        .since_success
        .map_or("not since start-up".to_owned(), |d| {
            format!("{} ago", secs(d))
        });
    let event = Event::new(
        Kind::ViewStale,
        Subject::Stale(view.to_owned()),
        format!(
            "{view} is stale: its oldest unreflected change is {} old (max_staleness {}); last \
             success {last}",
            secs(s.age),
            humantime::format_duration(s.limit),
        ),
    )
    .view(view)
    .detail("oldest_change_age_seconds", s.age.as_secs_f64())
    .detail("max_staleness_seconds", s.limit.as_secs_f64())
    .detail(
        "since_last_success_seconds",
        s.since_success.map(|d| d.as_secs_f64()),
    );
    if s.failures > 0 {
        event.failures(u64::from(s.failures))
    } else {
        event
    }
}

/// `view` is within its `max_staleness` again.
pub(super) fn view_fresh(view: &str, limit: Duration) -> Event {
    Event::new(
        Kind::ViewFresh,
        Subject::Stale(view.to_owned()),
        format!(
            "{view} is fresh again (within max_staleness {})",
            humantime::format_duration(limit)
        ),
    )
    .view(view)
}

/// The LISTEN connection to `target` has been down for `down` (`reason`: the last error).
pub(super) fn listener_down(target: &str, down: Duration, reason: &str) -> Event {
    Event::new(
        Kind::ListenerDown,
        Subject::Listener,
        format!(
            "the LISTEN connection to {target} has been down for {}",
            secs(down)
        ),
    )
    .error(reason.to_owned())
    .detail("down_seconds", down.as_secs_f64())
}

/// The LISTEN connection is back after `down`.
pub(super) fn listener_recovered(down: Duration) -> Event {
    Event::new(
        Kind::ListenerRecovered,
        Subject::Listener,
        format!("the LISTEN connection is back after {}", secs(down)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The texts operators match on (runbooks, chat filters) stay as they were.
    #[test]
    fn wording_is_stable() {
        let s = |e: Event| e.into_alert("h:1").summary;
        let d = Duration::from_millis(1500);
        assert_eq!(
            s(refresh_failed("mv_x", 3, d, "boom")),
            "refresh of mv_x failed (3 in a row)"
        );
        assert_eq!(
            s(refresh_recovered("mv_x", 3)),
            "refresh of mv_x succeeded again"
        );
        assert_eq!(
            s(circuit_opened("mv_x", 5, d, "boom")),
            "mv_x failed 5 times in a row: refreshes paused, probing with backoff (next in 1s 500ms)"
        );
        assert_eq!(
            s(key_quarantined("mv_x", "7", true, "boom")),
            "refresh of mv_x fails for key 7: the key is quarantined (retried alone with backoff); \
             other keys keep refreshing"
        );
        let stale = Staleness {
            age: Duration::from_secs(90),
            limit: Duration::from_secs(60),
            since_success: None,
            failures: 2,
        };
        let alert = view_stale("mv_x", &stale).into_alert("h:1");
        assert_eq!(
            alert.summary,
            "mv_x is stale: its oldest unreflected change is 90.0s old (max_staleness 1m); last \
             success not since start-up"
        );
        assert_eq!(alert.consecutive_failures, Some(2));
        assert_eq!(
            s(listener_recovered(d)),
            "the LISTEN connection is back after 1.5s"
        );
    }
}
