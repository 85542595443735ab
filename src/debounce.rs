//! Per-key debouncing with a maximum wait.
//!
//! A pending key is **due** at `min(last change + quiet, first change + max_wait)`: when no new
//! change for it arrived for `quiet`, or when its oldest pending change is `max_wait` old,
//! whichever comes first. Keys are independent: a burst on one key never delays another, and a
//! steady stream on one key cannot postpone it past `max_wait`.
//!
//! The debouncer is plain data driven by the caller's clock (`Instant`s passed in), so its
//! behaviour is tested without sleeping.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::config::DebounceConfig;

/// The key that stands for "every key" (a whole refresh).
pub const ALL: &str = "*";

/// What is known about one pending key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// The oldest change not yet reflected.
    pub first: Instant,
    /// The newest change.
    pub last: Instant,
    /// The key must be refreshed even if the change log holds nothing for it (it came from a
    /// source that does not write the change log: a manual request, a schedule, a payload on a
    /// channel without capture).
    pub forced: bool,
}

impl Pending {
    fn merge(&mut self, other: Pending) {
        self.first = self.first.min(other.first);
        self.last = self.last.max(other.last);
        self.forced |= other.forced;
    }
}

/// A set of keys taken for one refresh.
pub type Batch = Vec<(String, Pending)>;

#[derive(Debug, Clone)]
pub struct Debouncer {
    quiet: Duration,
    max_wait: Duration,
    pending: HashMap<String, Pending>,
}

impl Debouncer {
    pub fn new(settings: DebounceConfig) -> Self {
        Self {
            quiet: settings.quiet,
            max_wait: settings.max_wait,
            pending: HashMap::new(),
        }
    }

    /// Records a change of `key` that happened at `at`.
    pub fn note(&mut self, key: &str, at: Instant, forced: bool) {
        self.note_span(key, at, at, forced);
    }

    /// Records changes of `key` spanning `first..=last` (from the change log).
    pub fn note_span(&mut self, key: &str, first: Instant, last: Instant, forced: bool) {
        let p = Pending {
            first,
            last,
            forced,
        };
        match self.pending.get_mut(key) {
            Some(existing) => existing.merge(p),
            None => {
                self.pending.insert(key.to_owned(), p);
            }
        }
    }

    /// Records a key that is due at once, keeping `first` for the age of its oldest change.
    pub fn note_due(&mut self, key: &str, first: Instant, now: Instant, forced: bool) {
        let last = now.checked_sub(self.quiet).unwrap_or(first).max(first);
        self.note_span(key, first, last, forced);
    }

    /// When `p` becomes due.
    pub fn due_at(&self, p: &Pending) -> Instant {
        (p.last + self.quiet).min(p.first + self.max_wait)
    }

    /// The earliest instant any key becomes due.
    pub fn next_due(&self) -> Option<Instant> {
        self.pending.values().map(|p| self.due_at(p)).min()
    }

    pub fn any_due(&self, now: Instant) -> bool {
        self.next_due().is_some_and(|t| t <= now)
    }

    /// The keys due at `now`.
    pub fn due_keys(&self, now: Instant) -> Vec<&str> {
        self.pending
            .iter()
            .filter(|(_, p)| self.due_at(p) <= now)
            .map(|(k, _)| k.as_str())
            .collect()
    }

    /// Removes and returns the keys due at `now` that `keep` accepts.
    pub fn take_due(&mut self, now: Instant, mut keep: impl FnMut(&str) -> bool) -> Batch {
        let keys: Vec<String> = self
            .pending
            .iter()
            .filter(|(k, p)| self.due_at(p) <= now && keep(k))
            .map(|(k, _)| k.clone())
            .collect();
        keys.into_iter()
            .filter_map(|k| self.pending.remove_entry(&k))
            .collect()
    }

    /// Removes and returns every pending key.
    pub fn take_all(&mut self) -> Batch {
        self.pending.drain().collect()
    }

    /// Puts a batch back (after a failed or contended refresh), merged with newer changes.
    pub fn restore(&mut self, batch: Batch) {
        for (k, p) in batch {
            self.note_span(&k, p.first, p.last, p.forced);
        }
    }

    pub fn contains(&self, key: &str) -> bool {
        self.pending.contains_key(key)
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// The oldest pending change, over all keys.
    pub fn oldest(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.first).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(quiet_ms: u64, max_wait_ms: u64) -> Debouncer {
        Debouncer::new(DebounceConfig {
            quiet: Duration::from_millis(quiet_ms),
            max_wait: Duration::from_millis(max_wait_ms),
        })
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn due_after_quiet() {
        let t0 = Instant::now();
        let mut deb = d(100, 1000);
        deb.note("a", t0, false);
        assert_eq!(deb.next_due(), Some(t0 + ms(100)));
        assert!(deb.take_due(t0 + ms(99), |_| true).is_empty());
        let batch = deb.take_due(t0 + ms(100), |_| true);
        assert_eq!(batch.len(), 1);
        assert!(deb.is_empty());
    }

    #[test]
    fn steady_stream_is_due_at_max_wait() {
        let t0 = Instant::now();
        let mut deb = d(100, 1000);
        // A change every 50 ms (quiet / 2) never lets `quiet` elapse; still no change waits
        // more than max_wait for a refresh.
        let mut refreshes = 0;
        for step in 0..100u64 {
            let now = t0 + ms(step * 50);
            deb.note("a", now, false);
            if let Some(oldest) = deb.oldest() {
                assert!(
                    now - oldest <= ms(1000),
                    "a change waited {:?}",
                    now - oldest
                );
            }
            if !deb.take_due(now, |_| true).is_empty() {
                refreshes += 1;
            }
        }
        assert!(refreshes >= 4, "{refreshes}");
    }

    #[test]
    fn burst_on_one_key_does_not_delay_another() {
        let t0 = Instant::now();
        let mut deb = d(100, 1000);
        deb.note("b", t0, false);
        for i in 0..10 {
            deb.note("a", t0 + ms(i * 20), false);
        }
        let batch = deb.take_due(t0 + ms(100), |_| true);
        assert_eq!(
            batch.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["b"]
        );
        assert!(deb.contains("a"));
    }

    #[test]
    fn restore_keeps_oldest_first() {
        let t0 = Instant::now();
        let mut deb = d(100, 1000);
        deb.note("a", t0, false);
        let batch = deb.take_all();
        deb.note("a", t0 + ms(500), true);
        deb.restore(batch);
        assert_eq!(deb.oldest(), Some(t0));
        assert_eq!(deb.next_due(), Some(t0 + ms(600)));
        let (_, p) = deb.take_all().pop().unwrap();
        assert!(p.forced);
    }

    #[test]
    fn note_due_is_due_now_and_keeps_age() {
        let t0 = Instant::now();
        let mut deb = d(100, 1000);
        let now = t0 + ms(5000);
        deb.note_due("a", t0, now, false);
        assert!(deb.any_due(now));
        assert_eq!(deb.oldest(), Some(t0));
    }

    #[test]
    fn keep_filter_leaves_blocked_keys() {
        let t0 = Instant::now();
        let mut deb = d(0, 10);
        deb.note("a", t0, false);
        deb.note("b", t0, false);
        let batch = deb.take_due(t0, |k| k != "a");
        assert_eq!(batch.len(), 1);
        assert!(deb.contains("a"));
    }
}
