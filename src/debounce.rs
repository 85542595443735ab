//! Per-key debouncing with a maximum wait, bounded, and aware of the hand-over.
//!
//! A pending key is **due** at `min(last change + quiet, first change + max_wait)`: when no new
//! change for it arrived for `quiet`, or when its oldest pending change is `max_wait` old,
//! whichever comes first. Keys are independent: a burst on one key never delays another, and a
//! steady stream on one key cannot postpone it past `max_wait`. (A captured key reports only the
//! moment it turned dirty, so for it `last` is that moment: it is due `quiet` after it turned
//! dirty, and changes made meanwhile are in the same refresh.)
//!
//! A key backed by pending rows in the database ([`Pending::seen`]) is **ready** when it is due
//! and the daemon's horizon (see [`crate::store`]) was taken after it was seen, so the refresh
//! can consume those rows; if the horizon lags, it is ready `patience` after it was due anyway
//! (refreshed on time, its rows consumed by a later refresh). A **parked** key was refreshed
//! already and waits only for the horizon.
//!
//! A whole-view mode keeps its keys one by one too, and is refreshed as soon as any of them is
//! ready: a steady stream on some keys never holds back another key that went quiet.
//!
//! Bounded: at most `cap` keys are kept; one more turns the set into the single key [`ALL`]
//! (everything). A batch holds at most `batch` keys; the rest stay ready for the next one.
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
    /// The key must be refreshed even if the database holds nothing pending for it (it came
    /// from a source that writes nothing there: a manual request, a schedule, a payload on a
    /// channel without capture).
    pub forced: bool,
    /// When the daemon learned that pending rows in the database stand for this key: a refresh
    /// consumes them only under a horizon taken later.
    pub seen: Option<Instant>,
    /// Refreshed already, but pending rows remained (not covered by the horizon): waits for the
    /// horizon only.
    pub parked: bool,
}

impl Pending {
    /// A change at `at`, from a source that writes nothing in the database.
    pub fn forced(at: Instant) -> Pending {
        Pending {
            first: at,
            last: at,
            forced: true,
            seen: None,
            parked: false,
        }
    }

    /// Pending rows in the database, oldest change at `first`, learned of at `seen`.
    pub fn stored(first: Instant, seen: Instant) -> Pending {
        Pending {
            first,
            last: first,
            forced: false,
            seen: Some(seen),
            parked: false,
        }
    }

    fn merge(&mut self, other: Pending) {
        self.first = self.first.min(other.first);
        self.last = self.last.max(other.last);
        self.forced |= other.forced;
        self.seen = self.seen.max(other.seen);
        self.parked &= other.parked;
    }
}

/// A set of keys taken for one refresh.
pub type Batch = Vec<(String, Pending)>;

/// Bounds and timing of one view's debouncer.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// More pending keys than this collapse into [`ALL`].
    pub cap: usize,
    /// Keys per batch.
    pub batch: usize,
    /// How long a due key waits for the horizon before it is refreshed anyway.
    pub patience: Duration,
}

#[derive(Debug, Clone)]
pub struct Debouncer {
    quiet: Duration,
    max_wait: Duration,
    limits: Limits,
    pending: HashMap<String, Pending>,
}

impl Debouncer {
    pub fn new(settings: DebounceConfig, limits: Limits) -> Self {
        Self {
            quiet: settings.quiet,
            max_wait: settings.max_wait,
            limits: Limits {
                cap: limits.cap.max(1),
                batch: limits.batch.max(1),
                ..limits
            },
            pending: HashMap::new(),
        }
    }

    /// Records `p` for `key` (merged with what is pending for it).
    pub fn add(&mut self, key: &str, p: Pending) {
        if let Some(existing) = self.pending.get_mut(key) {
            existing.merge(p);
            return;
        }
        if self.pending.len() >= self.limits.cap {
            // Too many keys to track one by one: the view is due as a whole.
            let mut all = p;
            for (_, q) in self.pending.drain() {
                all.merge(q);
            }
            self.pending.insert(ALL.to_owned(), all);
            return;
        }
        self.pending.insert(key.to_owned(), p);
    }

    /// Records a change of `key` that happened at `at`, from a source that writes nothing in
    /// the database (forced) or backed by pending rows learned of now.
    pub fn note(&mut self, key: &str, at: Instant, forced: bool) {
        let p = if forced {
            Pending::forced(at)
        } else {
            Pending::stored(at, at)
        };
        self.add(key, p);
    }

    /// Records a key that is due at once, keeping `first` for the age of its oldest change.
    pub fn note_due(&mut self, key: &str, first: Instant, now: Instant, forced: bool) {
        let last = now.checked_sub(self.quiet).unwrap_or(first).max(first);
        self.add(
            key,
            Pending {
                first,
                last,
                forced,
                seen: (!forced).then_some(now),
                parked: false,
            },
        );
    }

    /// Records a key that was just refreshed but still has pending rows the horizon did not
    /// cover: it is refreshed again, as soon as a horizon taken after `now` exists.
    pub fn park(&mut self, key: &str, now: Instant) {
        self.add(
            key,
            Pending {
                first: now,
                last: now.checked_sub(self.quiet).unwrap_or(now),
                forced: false,
                seen: Some(now),
                parked: true,
            },
        );
    }

    /// When `p` becomes due.
    pub fn due_at(&self, p: &Pending) -> Instant {
        (p.last + self.quiet).min(p.first + self.max_wait)
    }

    /// When `p` may be refreshed, given the horizon (`None`: when the horizon moves).
    fn ready_at(&self, p: &Pending, horizon: Option<Instant>) -> Option<Instant> {
        let due = self.due_at(p);
        match p.seen {
            None => Some(due),
            Some(seen) if horizon.is_some_and(|h| h > seen) => Some(due),
            Some(_) if p.parked => None,
            Some(_) => Some(due + self.limits.patience),
        }
    }

    /// The earliest instant a key becomes ready (a parked key waits for the horizon).
    pub fn next_due(&self, horizon: Option<Instant>) -> Option<Instant> {
        self.pending
            .values()
            .filter_map(|p| self.ready_at(p, horizon))
            .min()
    }

    pub fn any_due(&self, now: Instant, horizon: Option<Instant>) -> bool {
        self.next_due(horizon).is_some_and(|t| t <= now)
    }

    /// Whether some key waits for a horizon taken after it was seen.
    pub fn waits_for_horizon(&self, horizon: Option<Instant>) -> bool {
        self.pending
            .values()
            .any(|p| p.seen.is_some_and(|s| horizon.is_none_or(|h| h <= s)))
    }

    /// The keys ready at `now`.
    pub fn due_keys(&self, now: Instant, horizon: Option<Instant>) -> Vec<&str> {
        self.pending
            .iter()
            .filter(|(_, p)| self.ready_at(p, horizon).is_some_and(|t| t <= now))
            .map(|(k, _)| k.as_str())
            .collect()
    }

    /// Removes and returns the keys ready at `now` that `keep` accepts, at most a batch.
    pub fn take_due(
        &mut self,
        now: Instant,
        horizon: Option<Instant>,
        mut keep: impl FnMut(&str) -> bool,
    ) -> Batch {
        let keys: Vec<String> = self
            .pending
            .iter()
            .filter(|(k, p)| self.ready_at(p, horizon).is_some_and(|t| t <= now) && keep(k))
            .map(|(k, _)| k.clone())
            .take(self.limits.batch)
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
            self.add(&k, p);
        }
    }

    pub fn contains(&self, key: &str) -> bool {
        self.pending.contains_key(key)
    }

    /// Whether `key` is pending with changes not reflected yet (not merely parked).
    pub fn contains_unparked(&self, key: &str) -> bool {
        self.pending.get(key).is_some_and(|p| !p.parked)
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// The oldest change not reflected yet, over all keys (a parked key's changes are).
    pub fn oldest(&self) -> Option<Instant> {
        self.pending
            .values()
            .filter(|p| !p.parked)
            .map(|p| p.first)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            cap: 100,
            batch: 100,
            patience: Duration::from_millis(1000),
        }
    }

    fn with(quiet_ms: u64, max_wait_ms: u64, limits: Limits) -> Debouncer {
        Debouncer::new(
            DebounceConfig {
                quiet: Duration::from_millis(quiet_ms),
                max_wait: Duration::from_millis(max_wait_ms),
            },
            limits,
        )
    }

    fn d(quiet_ms: u64, max_wait_ms: u64) -> Debouncer {
        with(quiet_ms, max_wait_ms, limits())
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn keys(batch: &Batch) -> Vec<&str> {
        let mut k: Vec<&str> = batch.iter().map(|(k, _)| k.as_str()).collect();
        k.sort();
        k
    }

    #[test]
    fn due_after_quiet() {
        let t0 = Instant::now();
        let mut deb = d(100, 1000);
        deb.note("a", t0, true);
        assert_eq!(deb.next_due(None), Some(t0 + ms(100)));
        assert!(deb.take_due(t0 + ms(99), None, |_| true).is_empty());
        let batch = deb.take_due(t0 + ms(100), None, |_| true);
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
            deb.note("a", now, true);
            if let Some(oldest) = deb.oldest() {
                assert!(
                    now - oldest <= ms(1000),
                    "a change waited {:?}",
                    now - oldest
                );
            }
            if !deb.take_due(now, None, |_| true).is_empty() {
                refreshes += 1;
            }
        }
        assert!(refreshes >= 4, "{refreshes}");
    }

    #[test]
    fn burst_on_one_key_does_not_delay_another() {
        let t0 = Instant::now();
        let mut deb = d(100, 1000);
        deb.note("b", t0, true);
        for i in 0..10 {
            deb.note("a", t0 + ms(i * 20), true);
        }
        let batch = deb.take_due(t0 + ms(100), None, |_| true);
        assert_eq!(keys(&batch), ["b"]);
        assert!(deb.contains("a"));
    }

    #[test]
    fn restore_keeps_oldest_first_and_merges_flags() {
        let t0 = Instant::now();
        let mut deb = d(100, 1000);
        deb.note("a", t0, false);
        let batch = deb.take_all();
        deb.note("a", t0 + ms(500), true);
        deb.restore(batch);
        assert_eq!(deb.oldest(), Some(t0));
        let horizon = Some(t0 + ms(501));
        assert_eq!(deb.next_due(horizon), Some(t0 + ms(600)));
        let (_, p) = deb.take_all().pop().unwrap();
        assert!(p.forced);
        assert_eq!(p.seen, Some(t0));
    }

    #[test]
    fn note_due_is_due_now_and_keeps_age() {
        let t0 = Instant::now();
        let mut deb = d(100, 1000);
        let now = t0 + ms(5000);
        deb.note_due("a", t0, now, true);
        assert!(deb.any_due(now, None));
        assert_eq!(deb.oldest(), Some(t0));
    }

    #[test]
    fn keep_filter_leaves_blocked_keys() {
        let t0 = Instant::now();
        let mut deb = d(0, 10);
        deb.note("a", t0, true);
        deb.note("b", t0, true);
        let batch = deb.take_due(t0, None, |k| k != "a");
        assert_eq!(batch.len(), 1);
        assert!(deb.contains("a"));
    }

    #[test]
    fn a_stored_key_waits_for_a_later_horizon_at_most_patience() {
        let t0 = Instant::now();
        let mut deb = d(100, 1000);
        deb.add("a", Pending::stored(t0, t0 + ms(10)));
        // Due at t0 + 100 ms, but no horizon after it was seen: ready a patience later.
        assert!(deb.take_due(t0 + ms(100), None, |_| true).is_empty());
        assert!(deb
            .take_due(t0 + ms(100), Some(t0 + ms(10)), |_| true)
            .is_empty());
        assert_eq!(deb.next_due(None), Some(t0 + ms(1100)));
        // A horizon taken after it was seen: ready when due.
        let batch = deb.take_due(t0 + ms(100), Some(t0 + ms(11)), |_| true);
        assert_eq!(keys(&batch), ["a"]);
        // Without one, it is refreshed anyway once patience has passed.
        deb.add("b", Pending::stored(t0, t0 + ms(10)));
        assert!(deb.waits_for_horizon(None));
        let batch = deb.take_due(t0 + ms(1100), None, |_| true);
        assert_eq!(keys(&batch), ["b"]);
    }

    #[test]
    fn a_parked_key_waits_for_the_horizon_only() {
        let t0 = Instant::now();
        let mut deb = d(100, 1000);
        deb.park("a", t0);
        assert_eq!(deb.next_due(Some(t0)), None);
        assert!(deb.take_due(t0 + ms(60_000), Some(t0), |_| true).is_empty());
        assert_eq!(deb.oldest(), None, "a parked key's changes are reflected");
        let batch = deb.take_due(t0 + ms(1), Some(t0 + ms(1)), |_| true);
        assert_eq!(keys(&batch), ["a"]);
        // A new change unparks it: it is due again like any key.
        deb.park("b", t0);
        deb.add("b", Pending::stored(t0 + ms(5), t0 + ms(5)));
        assert_eq!(deb.next_due(None), Some(t0 + ms(1105)));
    }

    #[test]
    fn too_many_keys_collapse_into_everything() {
        let t0 = Instant::now();
        let mut deb = with(100, 1000, Limits { cap: 3, ..limits() });
        for (i, k) in ["a", "b", "c"].into_iter().enumerate() {
            deb.note(k, t0 + ms(i as u64), true);
        }
        assert_eq!(deb.len(), 3);
        deb.note("d", t0 + ms(10), false);
        assert_eq!(deb.len(), 1);
        assert!(deb.contains(ALL));
        assert_eq!(deb.oldest(), Some(t0));
        let (_, p) = deb.take_all().pop().unwrap();
        assert!(p.forced);
        // Keys noted after the collapse join the same entry.
        deb.note(ALL, t0, true);
        deb.note("e", t0, true);
        assert_eq!(deb.len(), 2);
    }

    #[test]
    fn a_batch_has_at_most_batch_keys() {
        let t0 = Instant::now();
        let mut deb = with(
            0,
            10,
            Limits {
                batch: 2,
                ..limits()
            },
        );
        for k in ["a", "b", "c", "d", "e"] {
            deb.note(k, t0, true);
        }
        assert_eq!(deb.take_due(t0, None, |_| true).len(), 2);
        assert_eq!(deb.take_due(t0, None, |_| true).len(), 2);
        assert_eq!(deb.take_due(t0, None, |_| true).len(), 1);
        assert!(deb.is_empty());
    }

    #[test]
    fn a_key_gone_quiet_is_due_whatever_a_stream_on_other_keys_does() {
        // A whole-view mode refreshes when any key is due: a steady stream spread over other
        // keys (each written once) must not keep the view waiting for `max_wait`.
        let t0 = Instant::now();
        let mut deb = with(100, 60_000, limits());
        deb.note("a", t0, false);
        for i in 1..20u64 {
            deb.note(&format!("k{i}"), t0 + ms(10 * i), false);
        }
        assert_eq!(deb.len(), 20);
        assert!(!deb.any_due(t0 + ms(99), Some(t0 + ms(1000))));
        assert!(deb.any_due(t0 + ms(100), Some(t0 + ms(1000))));
        assert_eq!(deb.take_all().len(), 20);
    }
}
