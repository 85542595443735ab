//! Rate limiting of repetitive log lines: at most one line per key and interval, the next one
//! saying how many were suppressed meanwhile. Counters and metrics are not limited: only what
//! is written to the log.
//!
//! Like [`crate::debounce`], the limiter is plain data driven by the caller's clock (`Instant`s
//! passed in), so its behaviour is tested without sleeping. Keys should come from a bounded set
//! (configured channels × a fixed set of reasons); [`LogLimiter::flush`] also forgets idle keys.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// The interval a repeated warning is limited to, unless the caller chooses another.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// When a line of this key was last let through.
    logged: Instant,
    /// Lines held back since then.
    suppressed: u64,
}

/// At most one log line per key per `interval`.
#[derive(Debug, Clone)]
pub struct LogLimiter<K> {
    interval: Duration,
    entries: HashMap<K, Entry>,
}

impl<K: Hash + Eq + Clone> LogLimiter<K> {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            entries: HashMap::new(),
        }
    }

    /// An event of `key` at `now`: `Some(n)` when it is to be logged, `n` being how many of
    /// this key were suppressed since the last one logged; `None` when it is suppressed (and
    /// counted).
    pub fn allow(&mut self, key: &K, now: Instant) -> Option<u64> {
        self.allow_many(key, 1, now)
    }

    /// `count` events of `key` at `now`, told in one line when it is let through (`Some(n)`,
    /// `n` events suppressed since the last line), else counted as suppressed.
    pub fn allow_many(&mut self, key: &K, count: u64, now: Instant) -> Option<u64> {
        match self.entries.get_mut(key) {
            Some(e) if now.saturating_duration_since(e.logged) < self.interval => {
                e.suppressed += count;
                None
            }
            Some(e) => {
                e.logged = now;
                Some(std::mem::take(&mut e.suppressed))
            }
            None => {
                self.entries.insert(
                    key.clone(),
                    Entry {
                        logged: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        }
    }

    /// Forgets the keys whose interval has passed, returning those that had events suppressed
    /// and how many: the caller logs them (call it now and then, e.g. on a periodic tick, so
    /// the tail of a burst is told even when no event of its key comes later).
    pub fn flush(&mut self, now: Instant) -> Vec<(K, u64)> {
        let mut told = Vec::new();
        self.entries.retain(|key, e| {
            if now.saturating_duration_since(e.logged) < self.interval {
                return true;
            }
            if e.suppressed > 0 {
                told.push((key.clone(), e.suppressed));
            }
            false
        });
        told
    }

    /// Keys currently remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn one_line_per_key_and_interval_then_the_count_of_the_rest() {
        let mut l = LogLimiter::new(s(10));
        let t0 = Instant::now();
        let key = ("submission_scored".to_owned(), "invalid_key");
        assert_eq!(l.allow(&key, t0), Some(0));
        let mut logged = 1;
        // 20,000 rejections within the interval: none logged, all counted.
        for i in 0..20_000u32 {
            if l.allow(&key, t0 + Duration::from_micros(u64::from(i) * 100))
                .is_some()
            {
                logged += 1;
            }
        }
        assert_eq!(logged, 1);
        // The first after the interval is logged and tells the count; the count starts again.
        assert_eq!(l.allow(&key, t0 + s(10)), Some(20_000));
        assert_eq!(l.allow(&key, t0 + s(11)), None);
        assert_eq!(l.allow(&key, t0 + s(20)), Some(1));
        assert_eq!(l.allow(&key, t0 + s(31)), Some(0));
    }

    #[test]
    fn keys_are_independent() {
        let mut l = LogLimiter::new(s(10));
        let t0 = Instant::now();
        let a = ("c1".to_owned(), "invalid_key");
        let b = ("c1".to_owned(), "bad_json");
        let c = ("c2".to_owned(), "invalid_key");
        assert_eq!(l.allow(&a, t0), Some(0));
        assert_eq!(l.allow(&a, t0 + s(1)), None);
        assert_eq!(l.allow(&b, t0 + s(1)), Some(0));
        assert_eq!(l.allow(&c, t0 + s(2)), Some(0));
        assert_eq!(l.allow(&c, t0 + s(3)), None);
        assert_eq!(l.len(), 3);
    }

    #[test]
    fn flush_tells_the_tail_of_a_burst_and_forgets_idle_keys() {
        let mut l = LogLimiter::new(s(10));
        let t0 = Instant::now();
        let (a, b, c) = ("a", "b", "c");
        l.allow(&a, t0);
        for i in 1..=5 {
            l.allow(&a, t0 + s(i));
        }
        l.allow(&b, t0);
        l.allow(&c, t0 + s(5));
        // Nothing is due before the interval has passed.
        assert!(l.flush(t0 + s(9)).is_empty());
        assert_eq!(l.len(), 3);
        let told = l.flush(t0 + s(10));
        assert_eq!(told, vec![("a", 5)]);
        // `b` (nothing suppressed) is forgotten silently; `c` is still within its interval.
        assert_eq!(l.len(), 1);
        assert_eq!(l.allow(&a, t0 + s(10)), Some(0));
        assert!(l.flush(t0 + s(100)).is_empty());
        assert!(l.is_empty());
    }
}
