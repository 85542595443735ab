//! Live counters and gauges of the running daemon, shared (behind an `Arc`) by the tasks that
//! move them and the readers that report them (tests, the admin endpoints).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A count that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// An on/off state.
#[derive(Debug, Default)]
pub struct Flag(AtomicBool);

impl Flag {
    pub fn set(&self, on: bool) {
        self.0.store(on, Ordering::Relaxed);
    }
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The last value of a duration, in microseconds.
#[derive(Debug, Default)]
pub struct DurationGauge(AtomicU64);

impl DurationGauge {
    pub fn set(&self, d: Duration) {
        self.0.store(
            d.as_micros().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }
    pub fn get(&self) -> Duration {
        Duration::from_micros(self.0.load(Ordering::Relaxed))
    }
}

/// One view's live state, published by the main loop after every step.
#[derive(Debug, Clone)]
pub struct ViewGauges {
    pub name: String,
    /// Keys waiting for a refresh (pending or in flight).
    pub pending_keys: usize,
    /// The oldest change not yet reflected.
    pub oldest_pending: Option<Instant>,
    pub last_success: Option<Instant>,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub listener_connected: Flag,
    /// Connection attempts after the first.
    pub listener_reconnects: Counter,
    pub heartbeat_latency: DurationGauge,
    pub notifications_received: Counter,
    pub catch_ups: Counter,
    /// Dirty keys taken by collects.
    pub collected_keys: Counter,
    /// Refresh attempts that failed (all outcomes are `mvrefresh_refreshes_total`).
    pub refreshes_failed: Counter,
    /// Alerts delivered to the webhook (a 2xx answer).
    pub alerts_sent: Counter,
    /// Alerts given up after every delivery attempt failed.
    pub alerts_failed: Counter,
    /// Alerts dropped, oldest first, because the delivery queue was full.
    pub alerts_dropped: Counter,
    /// Repeats of open refresh-failure alerts not sent (within `repeat_after`).
    pub alerts_suppressed: Counter,
    /// Times a view's circuit opened.
    pub circuits_opened: Counter,
    /// Failed pg_cron runs seen by the watch.
    pub pg_cron_failed_runs: Counter,
    /// Polls of `cron.job_run_details` completed.
    pub pg_cron_polls: Counter,
    /// Messages decoded from logical captures' slots.
    pub logical_messages: Counter,
    /// Flushes of the write-ahead log a logical capture's reader asked for (asynchronous
    /// commits waiting for the WAL writer).
    pub logical_wal_flushes: Counter,
    /// Write-ahead log each logical capture's slot holds back, in bytes, by slot.
    pub slots_retained: Mutex<std::collections::BTreeMap<String, i64>>,
    /// Set once start-up is complete and the main loop runs; cleared at shutdown.
    pub ready: Flag,
    pub views: Mutex<Vec<ViewGauges>>,
    /// Connections open to the admin HTTP server (at most `[http] max_connections`).
    pub http_connections: Gauge,
    /// Connections to the admin HTTP server refused because `max_connections` were open.
    pub http_refused: Counter,
    /// Where the admin HTTP server listens, once bound.
    pub http_addr: Mutex<Option<SocketAddr>>,
}
