//! Isolating a key that makes a refresh fail (`incremental` views).
//!
//! A batch of keys whose refresh fails with a statement error (not a lost connection) is split
//! in halves, refreshed one after the other without backoff, and so on down to single keys. A
//! single key that still fails while other keys of the same bisection succeeded is
//! **quarantined**: set aside, retried alone with backoff, and alerted, while every other key
//! keeps being refreshed. If nothing in the bisection succeeds, the view itself fails: the keys
//! go back and the view's ordinary failure handling (backoff, alert, circuit) applies.
//!
//! Plain data driven by the caller's clock, like [`crate::debounce::Debouncer`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::debounce::{Batch, Pending, ALL};

/// Keys quarantined at most, per view; a failure beyond it fails the view.
pub(super) const MAX_QUARANTINED: usize = 100;

/// A quarantined key.
#[derive(Debug, Clone)]
pub(super) struct Quarantined {
    pub pending: Pending,
    pub failures: u32,
    pub retry_at: Instant,
}

/// One view's isolation state.
#[derive(Debug, Default)]
pub(super) struct Isolation {
    /// Halves of failed batches, refreshed before anything else (last first).
    halves: Vec<Batch>,
    /// Some half of the current bisection was refreshed successfully.
    bisection_succeeded: bool,
    quarantine: BTreeMap<String, Quarantined>,
}

/// What to do with a failed batch.
#[derive(Debug, PartialEq)]
pub(super) enum Verdict {
    /// Split: its halves are queued; nothing else to do.
    Split,
    /// The single key is quarantined (the first time: `true`, alert).
    Quarantined { key: String, first: bool },
    /// The view fails as a whole: handle as an ordinary failure (these keys go back).
    ViewFails(Batch),
}

impl Isolation {
    /// The next batch to refresh for isolation: a queued half, else a quarantined key due for
    /// its retry.
    pub fn next(&mut self, now: Instant) -> Option<Batch> {
        if let Some(half) = self.halves.pop() {
            return Some(half);
        }
        let key = self
            .quarantine
            .iter()
            .find(|(_, q)| q.retry_at <= now)
            .map(|(k, _)| k.clone())?;
        let q = self.quarantine.get(&key)?;
        Some(vec![(key, q.pending)])
    }

    /// Whether `key` is quarantined (ordinary batches leave it out).
    pub fn holds(&self, key: &str) -> bool {
        self.quarantine.contains_key(key)
    }

    /// When the next quarantined key is due for its retry.
    pub fn next_retry(&self) -> Option<Instant> {
        if !self.halves.is_empty() {
            return Some(Instant::now());
        }
        self.quarantine.values().map(|q| q.retry_at).min()
    }

    #[cfg(test)]
    pub fn quarantined(&self) -> usize {
        self.quarantine.len()
    }

    /// A batch was refreshed: quarantined keys in it are released (returned, to close their
    /// alert).
    pub fn succeeded(&mut self, batch: &Batch) -> Vec<String> {
        // Within a bisection, a success tells its failures apart from a failing view; after
        // its last half, nothing is left to tell.
        self.bisection_succeeded = !self.halves.is_empty();
        batch
            .iter()
            .filter_map(|(k, _)| self.quarantine.remove(k).map(|_| k.clone()))
            .collect()
    }

    /// A batch failed with a statement error. `retry` gives the backoff after `n` failures.
    pub fn failed(
        &mut self,
        batch: Batch,
        now: Instant,
        retry: impl Fn(u32) -> Duration,
    ) -> Verdict {
        if batch.iter().any(|(k, _)| k == ALL) {
            return self.view_fails(batch);
        }
        if batch.len() > 1 {
            let mut first = batch;
            let second = first.split_off(first.len() / 2);
            // Popped last first: the first half is refreshed first.
            self.halves.push(second);
            self.halves.push(first);
            return Verdict::Split;
        }
        let Some((key, pending)) = batch.first().cloned() else {
            return Verdict::ViewFails(batch);
        };
        if let Some(q) = self.quarantine.get_mut(&key) {
            q.failures += 1;
            q.retry_at = now + retry(q.failures);
            q.pending = pending;
            return Verdict::Quarantined { key, first: false };
        }
        let isolated = self.bisection_succeeded || !self.quarantine.is_empty();
        if !isolated || self.quarantine.len() >= MAX_QUARANTINED {
            return self.view_fails(batch);
        }
        self.quarantine.insert(
            key.clone(),
            Quarantined {
                pending,
                failures: 1,
                retry_at: now + retry(1),
            },
        );
        if self.halves.is_empty() {
            self.bisection_succeeded = false;
        }
        Verdict::Quarantined { key, first: true }
    }

    /// The whole view fails: the bisection ends, and its remaining halves go back with the
    /// failed batch.
    fn view_fails(&mut self, mut batch: Batch) -> Verdict {
        for half in self.halves.drain(..) {
            batch.extend(half);
        }
        self.bisection_succeeded = false;
        Verdict::ViewFails(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(keys: &[&str], at: Instant) -> Batch {
        keys.iter()
            .map(|k| (k.to_string(), Pending::forced(at)))
            .collect()
    }

    fn keys(b: &Batch) -> Vec<&str> {
        b.iter().map(|(k, _)| k.as_str()).collect()
    }

    fn retry(n: u32) -> Duration {
        Duration::from_secs(u64::from(n))
    }

    /// Refreshes `b`, failing when it contains `bad`.
    fn run(iso: &mut Isolation, b: Batch, bad: &[&str], now: Instant) -> Option<Verdict> {
        if b.iter().any(|(k, _)| bad.contains(&k.as_str())) {
            Some(iso.failed(b, now, retry))
        } else {
            iso.succeeded(&b);
            None
        }
    }

    #[test]
    fn one_bad_key_among_eight_is_quarantined_and_the_rest_refreshed() {
        let t0 = Instant::now();
        let mut iso = Isolation::default();
        let first = batch(&["a", "b", "c", "d", "e", "f", "g", "h"], t0);
        assert_eq!(iso.failed(first, t0, retry), Verdict::Split);
        let mut refreshed = Vec::new();
        let mut quarantined = Vec::new();
        while let Some(b) = iso.next(t0) {
            let ks: Vec<String> = keys(&b).iter().map(|k| k.to_string()).collect();
            match run(&mut iso, b, &["f"], t0) {
                None => refreshed.extend(ks),
                Some(Verdict::Quarantined { key, first }) => {
                    assert!(first);
                    quarantined.push(key);
                }
                Some(Verdict::Split) => {}
                Some(v) => panic!("{v:?}"),
            }
        }
        refreshed.sort();
        assert_eq!(refreshed, ["a", "b", "c", "d", "e", "g", "h"]);
        assert_eq!(quarantined, ["f"]);
        assert!(iso.holds("f"));
        // Retried alone after the backoff; its success releases it.
        assert!(iso.next(t0).is_none());
        let retry_batch = iso.next(t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(keys(&retry_batch), ["f"]);
        assert_eq!(iso.succeeded(&retry_batch), ["f"]);
        assert_eq!(iso.quarantined(), 0);
    }

    #[test]
    fn when_every_key_fails_the_view_fails_with_all_its_keys() {
        let t0 = Instant::now();
        let mut iso = Isolation::default();
        let all = ["a", "b", "c", "d"];
        assert_eq!(iso.failed(batch(&all, t0), t0, retry), Verdict::Split);
        let mut verdict = None;
        while let Some(b) = iso.next(t0) {
            match iso.failed(b, t0, retry) {
                Verdict::Split => {}
                v => {
                    verdict = Some(v);
                    break;
                }
            }
        }
        let Some(Verdict::ViewFails(back)) = verdict else {
            panic!("{verdict:?}");
        };
        let mut back: Vec<&str> = keys(&back);
        back.sort();
        assert_eq!(back, all);
        assert!(iso.next(t0).is_none());
        assert_eq!(iso.quarantined(), 0);
    }

    #[test]
    fn a_batch_of_everything_is_not_split() {
        let t0 = Instant::now();
        let mut iso = Isolation::default();
        let v = iso.failed(batch(&[ALL, "a"], t0), t0, retry);
        assert!(matches!(v, Verdict::ViewFails(b) if b.len() == 2));
    }
}
