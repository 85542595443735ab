//! A view's retry state: the backoff after failures, the backoff after finding another replica
//! refreshing the view, and the circuit breaker. Plain data driven by the caller's clock; the
//! caller turns what it returns into log lines and alerts.
//!
//! ```text
//!   Healthy ──fail──▶ Failing (retry after retry_min·2^(n-1) ≤ retry_max)
//!      ▲                 │ n = [alert] circuit_failures (0: never)
//!      │                 ▼
//!      └──success── Open circuit (one probe after circuit_probe_min·2^k ≤ circuit_probe_max)
//! ```

use std::time::{Duration, Instant};

use crate::config::Config;

use super::task::retry_delay;

/// Retry delay after finding another replica refreshing the same view (doubles, capped).
const BUSY_RETRY: Duration = Duration::from_millis(200);
const BUSY_RETRY_MAX: Duration = Duration::from_secs(5);

/// The delays and the threshold, from `[refresh]` and `[alert]`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Policy {
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Failures in a row that open the circuit; 0: never.
    pub circuit_failures: u32,
    pub probe_min: Duration,
    pub probe_max: Duration,
}

impl Policy {
    pub fn new(config: &Config) -> Policy {
        Policy {
            retry_min: config.refresh.retry_min,
            retry_max: config.refresh.retry_max,
            circuit_failures: config.alert.circuit_failures,
            probe_min: config.alert.circuit_probe_min,
            probe_max: config.alert.circuit_probe_max,
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct Breaker {
    failures: u32,
    busy: u32,
    retry_at: Option<Instant>,
    circuit_open: bool,
}

/// What a success ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Recovery {
    /// Failures in a row before it.
    pub failures: u32,
    /// The circuit was open.
    pub circuit_closed: bool,
}

/// What a failure means.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Failure {
    /// Failures in a row, this one included.
    pub failures: u32,
    /// When the next attempt (or, with the circuit open, probe) is.
    pub delay: Duration,
    /// This failure opened the circuit.
    pub circuit_opened: bool,
}

impl Breaker {
    /// Failures in a row.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// When the view may be refreshed again, if it has to wait.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Whether the view has to wait at `now`.
    pub fn waiting(&self, now: Instant) -> bool {
        self.retry_at.is_some_and(|t| t > now)
    }

    /// A refresh asked for by hand runs at once.
    pub fn release(&mut self) {
        self.retry_at = None;
    }

    /// A refresh succeeded: everything resets.
    pub fn succeeded(&mut self) -> Recovery {
        let recovery = Recovery {
            failures: self.failures,
            circuit_closed: self.circuit_open,
        };
        *self = Breaker::default();
        recovery
    }

    /// Another replica covered what was due: no failure, nothing to wait for.
    pub fn settled(&mut self) {
        self.busy = 0;
        self.retry_at = None;
    }

    /// Another replica is refreshing the view: try again after a delay that doubles while it
    /// stays busy.
    pub fn busy(&mut self, now: Instant) -> Duration {
        let delay = BUSY_RETRY
            .saturating_mul(1 << self.busy.min(8))
            .min(BUSY_RETRY_MAX);
        self.busy += 1;
        self.retry_at = Some(now + delay);
        delay
    }

    /// A refresh failed: retry with backoff; from `circuit_failures` failures in a row, the
    /// circuit is open and probes are further and further apart.
    pub fn failed(&mut self, now: Instant, policy: &Policy) -> Failure {
        self.failures += 1;
        let threshold = policy.circuit_failures;
        let open = threshold > 0 && self.failures >= threshold;
        let delay = if open {
            retry_delay(
                policy.probe_min,
                policy.probe_max,
                self.failures - threshold + 1,
            )
        } else {
            retry_delay(policy.retry_min, policy.retry_max, self.failures)
        };
        self.retry_at = Some(now + delay);
        let circuit_opened = open && !self.circuit_open;
        self.circuit_open |= open;
        Failure {
            failures: self.failures,
            delay,
            circuit_opened,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn policy(circuit_failures: u32) -> Policy {
        Policy {
            retry_min: S,
            retry_max: 60 * S,
            circuit_failures,
            probe_min: 30 * S,
            probe_max: 600 * S,
        }
    }

    /// `min·2^(n-1)` capped at `max`, within the ±25% jitter.
    fn near(delay: Duration, expected: Duration) -> bool {
        delay >= expected.mul_f64(0.74) && delay <= expected.mul_f64(1.26)
    }

    #[test]
    fn retries_back_off_and_a_success_resets_them() {
        let now = Instant::now();
        let mut b = Breaker::default();
        let p = policy(0);
        let delays: Vec<Duration> = (0..8).map(|_| b.failed(now, &p).delay).collect();
        for (n, d) in delays.iter().enumerate() {
            let expected = (S * (1 << n)).min(60 * S);
            assert!(
                near(*d, expected) && *d <= 60 * S,
                "failure {}: {d:?}",
                n + 1
            );
        }
        assert_eq!(b.failures(), 8);
        assert!(b.waiting(now));
        assert!(!b.waiting(now + 61 * S));
        assert_eq!(
            b.succeeded(),
            Recovery {
                failures: 8,
                circuit_closed: false
            }
        );
        assert_eq!(b.failures(), 0);
        assert!(!b.waiting(now));
        // Back to the first delay.
        assert!(near(b.failed(now, &p).delay, S));
    }

    #[test]
    fn without_a_threshold_the_circuit_never_opens() {
        let now = Instant::now();
        let mut b = Breaker::default();
        for _ in 0..50 {
            assert!(!b.failed(now, &policy(0)).circuit_opened);
        }
        assert!(!b.succeeded().circuit_closed);
    }

    #[test]
    fn the_circuit_opens_once_probes_with_backoff_and_closes_on_success() {
        let now = Instant::now();
        let mut b = Breaker::default();
        let p = policy(3);
        let f1 = b.failed(now, &p);
        let f2 = b.failed(now, &p);
        assert!(!f1.circuit_opened && !f2.circuit_opened);
        assert!(near(f2.delay, 2 * S));
        let f3 = b.failed(now, &p);
        assert!(f3.circuit_opened, "opens at the threshold");
        assert!(near(f3.delay, 30 * S), "first probe: {:?}", f3.delay);
        let f4 = b.failed(now, &p);
        assert!(!f4.circuit_opened, "opened once");
        assert!(
            near(f4.delay, 60 * S),
            "probes further apart: {:?}",
            f4.delay
        );
        for _ in 0..10 {
            assert!(b.failed(now, &p).delay <= 600 * S);
        }
        assert_eq!(
            b.succeeded(),
            Recovery {
                failures: 14,
                circuit_closed: true
            }
        );
        // Closed: the next failures are ordinary retries again.
        let again = b.failed(now, &p);
        assert!(!again.circuit_opened && near(again.delay, S));
    }

    #[test]
    fn another_replica_busy_doubles_the_wait_up_to_a_cap_until_settled() {
        let now = Instant::now();
        let mut b = Breaker::default();
        let waits: Vec<Duration> = (0..8).map(|_| b.busy(now)).collect();
        assert_eq!(waits[0], BUSY_RETRY);
        assert_eq!(waits[1], 2 * BUSY_RETRY);
        assert_eq!(waits[7], BUSY_RETRY_MAX);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(b.retry_at(), Some(now + BUSY_RETRY_MAX));
        assert_eq!(b.failures(), 0, "busy is not a failure");
        b.settled();
        assert!(!b.waiting(now));
        assert_eq!(b.busy(now), BUSY_RETRY, "the doubling starts over");
    }

    #[test]
    fn a_manual_refresh_skips_the_wait_but_keeps_the_count() {
        let now = Instant::now();
        let mut b = Breaker::default();
        b.failed(now, &policy(3));
        b.failed(now, &policy(3));
        b.release();
        assert!(!b.waiting(now));
        assert!(b.failed(now, &policy(3)).circuit_opened);
    }
}
