//! The scheduling state of each view, plain data: what is pending (the debouncer), what is in
//! flight, the retry state, the backstop schedule; and the rules that relate views to each
//! other: a view waits while a view it reads has the same keys pending or in flight, and a
//! view's successful refresh makes the keys it covered due for the views that read it.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::breaker::Breaker;
use super::isolate::Isolation;
use crate::debounce::{Batch, Debouncer, ALL};
use crate::refresh::Reason;

/// At most this much earlier than its due time a key makes its view's batch go (the
/// notifications of one commit arrive a few microseconds apart).
const BATCH_SLACK: Duration = Duration::from_millis(50);
/// At most this much earlier than its due time a key joins a batch that goes anyway (see
/// [`join_window`]).
const JOIN_MAX: Duration = Duration::from_secs(1);

/// How much earlier than its due time a key joins a batch of its view that goes now: half the
/// view's quiet period (at most [`JOIN_MAX`]). Keys written continuously are each due at their
/// own `max_wait`, at instants spread over it: one by one they would cost a refresh
/// transaction each (at 200 such keys and a 1 s `max_wait`, ~70 a second, most of their cost
/// bookkeeping); taken along, they share the batches, and they stay together afterwards (their
/// next changes start their waits at about the same time). A key joins only once it has been
/// quiet for half its quiet period, so a burst still running is not cut short.
fn join_window(quiet: Duration) -> Duration {
    (quiet / 2).min(JOIN_MAX)
}

/// What scheduling needs to know of a view from the plan and the config.
pub(super) struct Facts {
    /// A whole-view mode: any due key refreshes everything.
    pub whole: bool,
    /// The backstop: refreshed whole at least this often.
    pub schedule: Option<Duration>,
    /// Its quiet period (its own, else the global one).
    pub quiet: Duration,
    /// The views it reads, directly or not.
    pub ancestors: Vec<usize>,
    /// A big batch may be split into chunks refreshed at once (`partitioned`).
    pub chunked: bool,
}

/// A chunk holds at least this many keys: a batch is split into at most `len / MIN_CHUNK`
/// chunks.
const MIN_CHUNK: usize = 2;

/// A refresh to start.
#[derive(Debug)]
pub(super) struct Start {
    pub view: usize,
    pub batch: Batch,
    pub reason: Reason,
    /// It recomputes a partitioned view's rows whose key is NULL (one chunk of a batch does).
    pub nulls: bool,
}

pub(super) struct ViewState {
    pub debouncer: Debouncer,
    /// Splitting failed batches and quarantining the key that fails (`incremental`).
    pub isolation: Isolation,
    pub in_flight: Option<InFlight>,
    /// Retry backoff, another replica busy, the circuit breaker.
    pub breaker: Breaker,
    pub next_schedule: Option<Instant>,
    /// Why the next refresh runs, when not because of a change.
    pub reason: Option<Reason>,
    /// The last successful refresh in this process.
    pub last_success: Option<Instant>,
}

impl ViewState {
    pub fn new(debouncer: Debouncer) -> ViewState {
        ViewState {
            debouncer,
            isolation: Isolation::default(),
            in_flight: None,
            breaker: Breaker::default(),
            next_schedule: None,
            reason: None,
            last_success: None,
        }
    }
}

/// A refresh in flight, perhaps in several chunks: what it covers.
pub(super) struct InFlight {
    /// A whole-view refresh.
    pub whole: bool,
    /// The keys of the chunks still running.
    pub keys: BTreeSet<String>,
    /// The oldest change the refresh covers.
    pub oldest: Option<Instant>,
    /// Chunks still running.
    pub chunks: usize,
}

impl InFlight {
    /// One chunk ended (its keys `batch`); whether the refresh is over.
    pub fn chunk_done(&mut self, batch: &Batch) -> bool {
        for (k, _) in batch {
            self.keys.remove(k);
        }
        self.chunks = self.chunks.saturating_sub(1);
        self.chunks == 0
    }
}

/// `batch` split into at most `max` chunks of at least [`MIN_CHUNK`] keys, every key of a lock
/// bucket ([`crate::partition::bucket`]) in the same chunk (chunks of one batch never contend),
/// the buckets dealt largest first to the smallest chunk. One chunk when it holds [`ALL`].
pub(super) fn split(batch: Batch, max: usize) -> Vec<Batch> {
    let n = max.min(batch.len() / MIN_CHUNK);
    if n <= 1 || batch.iter().any(|(k, _)| k == ALL) {
        return vec![batch];
    }
    let mut buckets: std::collections::BTreeMap<i32, Batch> = Default::default();
    for (k, p) in batch {
        buckets
            .entry(crate::partition::bucket(&k))
            .or_default()
            .push((k, p));
    }
    let mut buckets: Vec<Batch> = buckets.into_values().collect();
    buckets.sort_by_key(|b| std::cmp::Reverse(b.len()));
    let mut chunks: Vec<Batch> = vec![Vec::new(); n];
    for b in buckets {
        if let Some(smallest) = chunks.iter_mut().min_by_key(|c| c.len()) {
            smallest.extend(b);
        }
    }
    chunks.retain(|c| !c.is_empty());
    chunks
}

/// Whether a view whose `ancestors` (the views it reads, directly or not) are in `views` must
/// wait before refreshing `key` ([`ALL`]: the whole view): an ancestor has the key (or
/// everything) pending and not parked, or a refresh of it in flight.
pub(super) fn blocked(
    views: &[ViewState],
    ancestors: impl IntoIterator<Item = usize>,
    key: &str,
) -> bool {
    ancestors.into_iter().any(|a| {
        let st = &views[a];
        // A parked key was refreshed already: it holds nothing up.
        let pending = if key == ALL {
            st.debouncer.oldest().is_some()
        } else {
            st.debouncer.contains_unparked(key) || st.debouncer.contains_unparked(ALL)
        };
        let in_flight = st
            .in_flight
            .as_ref()
            .is_some_and(|f| key == ALL || f.whole || f.keys.contains(key) || f.keys.contains(ALL));
        pending || in_flight
    })
}

/// The refreshes to start now, in dependency `order`: views due, not waiting for a retry nor
/// for a view they read, within `concurrency` refreshes in flight. Each is marked in flight.
pub(super) fn dispatch(
    views: &mut [ViewState],
    facts: &[Facts],
    order: &[usize],
    concurrency: usize,
    now: Instant,
    horizon: Option<Instant>,
) -> Vec<Start> {
    let mut running: usize = views
        .iter()
        .filter_map(|v| v.in_flight.as_ref())
        .map(|f| f.chunks)
        .sum();
    let mut starts = Vec::new();
    for &i in order {
        if running >= concurrency {
            break;
        }
        let f = &facts[i];
        let st = &mut views[i];
        if st.in_flight.is_some() || st.breaker.waiting(now) {
            continue;
        }
        if let (Some(period), Some(at)) = (f.schedule, st.next_schedule) {
            if at <= now {
                st.debouncer.note_due(ALL, now, now, true);
                st.reason.get_or_insert(Reason::Schedule);
                st.next_schedule = Some(now + period);
            }
        }
        // Only an ordinary batch of keys may be split (not a whole refresh, not isolation's).
        let (batch, chunked) = if f.whole {
            if !views[i].debouncer.any_due(now, horizon)
                || blocked(views, f.ancestors.iter().copied(), ALL)
            {
                continue;
            }
            (views[i].debouncer.take_all(), false)
        } else if let Some(batch) = views[i].isolation.next(now) {
            // A half of a failed batch, or a quarantined key due for its retry.
            (batch, false)
        } else {
            // The batch goes when a key it may take is due (within a moment); keys due a
            // little later join it.
            let soon = now + (f.quiet / 10).min(BATCH_SLACK);
            let until = now + join_window(f.quiet);
            let held: BTreeSet<String> = views[i]
                .debouncer
                .due_keys(until, horizon)
                .into_iter()
                .filter(|k| blocked(views, f.ancestors.iter().copied(), k))
                .map(str::to_owned)
                .collect();
            let st = &mut views[i];
            let isolation = &st.isolation;
            if !st
                .debouncer
                .due_keys(soon, horizon)
                .into_iter()
                .any(|k| !held.contains(k) && !isolation.holds(k))
            {
                continue;
            }
            let batch = st
                .debouncer
                .take_due(until, horizon, |k| !held.contains(k) && !isolation.holds(k));
            (batch, f.chunked)
        };
        if batch.is_empty() {
            continue;
        }
        let st = &mut views[i];
        let keys = batch.iter().map(|(k, _)| k.clone()).collect();
        let oldest = batch.iter().map(|(_, p)| p.first).min();
        let chunks = if chunked {
            split(batch, concurrency - running)
        } else {
            vec![batch]
        };
        st.in_flight = Some(InFlight {
            whole: f.whole,
            keys,
            oldest,
            chunks: chunks.len(),
        });
        running += chunks.len();
        let reason = st.reason.take().unwrap_or(Reason::Change);
        for (n, batch) in chunks.into_iter().enumerate() {
            starts.push(Start {
                view: i,
                batch,
                reason,
                nulls: n == 0,
            });
        }
    }
    starts
}

/// The next instant something can become due for a view not in flight (only future instants:
/// a view that is due but blocked waits for the event that unblocks it).
pub(super) fn next_wake(
    views: &[ViewState],
    now: Instant,
    horizon: Option<Instant>,
) -> Option<Instant> {
    views
        .iter()
        .filter(|v| v.in_flight.is_none())
        .flat_map(|v| {
            let due = match v.breaker.retry_at() {
                Some(t) if t > now => Some(t),
                _ => v.debouncer.next_due(horizon),
            };
            [due, v.next_schedule, v.isolation.next_retry()]
        })
        .flatten()
        .min()
}

/// A refresh covered `keys` (its oldest change at `oldest`): they are due at once for the
/// `dependents`, which read the refreshed view.
pub(super) fn propagate(
    views: &mut [ViewState],
    dependents: impl IntoIterator<Item = usize>,
    keys: &[String],
    oldest: Instant,
    now: Instant,
) {
    for d in dependents {
        for k in keys {
            views[d].debouncer.note_due(k, oldest, now, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::breaker::Policy;
    use super::*;
    use crate::config::DebounceConfig;
    use crate::debounce::Limits;

    const QUIET: Duration = Duration::from_millis(200);
    const MAX_WAIT: Duration = Duration::from_secs(1);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn view() -> ViewState {
        ViewState::new(Debouncer::new(
            DebounceConfig {
                quiet: QUIET,
                max_wait: MAX_WAIT,
            },
            Limits {
                cap: 100,
                batch: 10,
                patience: Duration::from_secs(1),
            },
        ))
    }

    /// A parent (0) read by a child (1), both fed key "k" by the same channel.
    fn parent_and_child() -> Vec<ViewState> {
        vec![view(), view()]
    }

    #[test]
    fn a_child_waits_for_its_parents_pending_and_in_flight_keys_only() {
        let t0 = Instant::now();
        let mut views = parent_and_child();
        views[0].debouncer.note("k", t0, false);
        views[1].debouncer.note("k", t0, false);
        let parent = [0];
        assert!(blocked(&views, parent, "k"), "the parent has k pending");
        assert!(
            !blocked(&views, parent, "other"),
            "not a key the parent has"
        );
        assert!(
            blocked(&views, parent, ALL),
            "a whole refresh waits for any key"
        );
        // The parent's k goes in flight: still blocked, for k only.
        let batch = views[0].debouncer.take_all();
        assert_eq!(batch.len(), 1);
        views[0].in_flight = Some(InFlight {
            whole: false,
            keys: ["k".to_owned()].into(),
            oldest: Some(t0),
            chunks: 1,
        });
        assert!(blocked(&views, parent, "k"));
        assert!(!blocked(&views, parent, "other"));
        // A whole refresh of the parent holds up every key.
        views[0].in_flight.as_mut().unwrap().whole = true;
        assert!(blocked(&views, parent, "other"));
        views[0].in_flight = None;
        assert!(!blocked(&views, parent, "k"));
        // A view with no ancestors never waits.
        assert!(!blocked(&views, [], "k"));
    }

    #[test]
    fn a_child_past_its_max_wait_still_waits_for_its_parent_then_goes_at_once() {
        let t0 = Instant::now();
        let mut views = parent_and_child();
        // Changes keep coming for k: the parent is due at max_wait whatever the quiet period.
        let mut t = t0;
        while t < t0 + MAX_WAIT {
            views[0].debouncer.note("k", t, false);
            views[1].debouncer.note("k", t, false);
            t += QUIET / 2;
        }
        let late = t0 + MAX_WAIT + Duration::from_millis(1);
        // The hand-over horizon has passed every change noted.
        let horizon = Some(late);
        assert!(
            views[0].debouncer.any_due(late, horizon),
            "parent due at max_wait"
        );
        assert!(
            views[1].debouncer.any_due(late, horizon),
            "child due at max_wait too"
        );
        assert!(
            blocked(&views, [0], "k"),
            "but it reads the parent, whose k is pending"
        );
        // The parent refreshes k; its success makes k due for the child at once.
        let batch = views[0].debouncer.take_all();
        let oldest = batch.iter().map(|(_, p)| p.first).min().unwrap();
        assert_eq!(oldest, t0);
        propagate(&mut views, [1], &["k".to_owned()], oldest, late);
        assert!(!blocked(&views, [0], "k"));
        let next = late + Duration::from_millis(1);
        assert_eq!(views[1].debouncer.due_keys(next, Some(next)), ["k"]);
        assert_eq!(
            views[1].debouncer.oldest(),
            Some(t0),
            "staleness counts from the first change"
        );
    }

    #[test]
    fn a_failing_parent_keeps_its_children_waiting_and_unrelated_keys_go() {
        let t0 = Instant::now();
        let mut views = parent_and_child();
        views[0].debouncer.note("k", t0, false);
        views[1].debouncer.note("k", t0, false);
        views[1].debouncer.note("j", t0, false);
        // The parent's refresh of k fails: k goes back to its debouncer (restore).
        let batch = views[0].debouncer.take_all();
        views[0].debouncer.restore(batch);
        views[0].breaker.failed(
            t0,
            &Policy {
                retry_min: Duration::from_secs(1),
                retry_max: Duration::from_secs(60),
                circuit_failures: 0,
                probe_min: Duration::from_secs(30),
                probe_max: Duration::from_secs(600),
            },
        );
        let later = t0 + MAX_WAIT * 2;
        assert!(blocked(&views, [0], "k"), "k waits while the parent fails");
        assert!(
            !blocked(&views, [0], "j"),
            "j does not depend on the failing refresh"
        );
        assert!(views[1].debouncer.due_keys(later, None).contains(&"j"));
        // Nothing reached the child from the failed refresh.
        assert!(views[1].debouncer.contains("k") && views[1].debouncer.len() == 2);
    }

    #[test]
    fn a_whole_refresh_propagates_everything() {
        let t0 = Instant::now();
        let mut views = parent_and_child();
        // The refresh covered changes from t0 and ended a while later.
        let now = t0 + 2 * QUIET;
        propagate(&mut views, [1], &[ALL.to_owned()], t0, now);
        assert!(views[1].debouncer.contains(ALL));
        let next = now + Duration::from_millis(1);
        assert!(views[1].debouncer.any_due(next, Some(next)), "due at once");
        assert_eq!(views[1].debouncer.oldest(), Some(t0));
    }

    fn facts(whole: bool, ancestors: &[usize]) -> Facts {
        Facts {
            whole,
            schedule: None,
            quiet: QUIET,
            ancestors: ancestors.to_vec(),
            chunked: false,
        }
    }

    /// `n` views, each with key "k" changed at `t0`.
    fn with_k(n: usize, t0: Instant) -> Vec<ViewState> {
        (0..n)
            .map(|_| {
                let mut v = view();
                v.debouncer.note("k", t0, false);
                v
            })
            .collect()
    }

    #[test]
    fn dispatch_starts_due_views_in_order_within_the_concurrency() {
        let t0 = Instant::now();
        let now = t0 + QUIET * 2;
        let mut views = with_k(3, t0);
        let facts: Vec<Facts> = (0..3).map(|_| facts(false, &[])).collect();
        let starts = dispatch(&mut views, &facts, &[2, 0, 1], 2, now, Some(now));
        let started: Vec<usize> = starts.iter().map(|s| s.view).collect();
        assert_eq!(started, [2, 0], "in the plan's order, two at a time");
        assert!(starts
            .iter()
            .all(|s| s.reason == Reason::Change && s.batch.len() == 1));
        assert!(views[2].in_flight.is_some() && views[0].in_flight.is_some());
        assert!(views[1].in_flight.is_none());
        // Nothing more while two are in flight; the third once one ends.
        assert!(dispatch(&mut views, &facts, &[2, 0, 1], 2, now, Some(now)).is_empty());
        views[2].in_flight = None;
        let next = dispatch(&mut views, &facts, &[2, 0, 1], 2, now, Some(now));
        assert_eq!(next.iter().map(|s| s.view).collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn dispatch_holds_a_child_while_its_parent_refreshes_the_same_key() {
        let t0 = Instant::now();
        let now = t0 + QUIET * 2;
        let mut views = with_k(2, t0);
        views[1].debouncer.note("j", t0, false);
        let facts = [facts(false, &[]), facts(false, &[0])];
        let starts = dispatch(&mut views, &facts, &[0, 1], 4, now, Some(now));
        assert_eq!(starts.len(), 2);
        assert_eq!(starts[0].view, 0);
        let child: Vec<&str> = starts[1].batch.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(child, ["j"], "k waits for the parent, j does not");
        assert!(views[1].debouncer.contains("k"));
    }

    #[test]
    fn dispatch_skips_a_view_waiting_for_its_retry_and_runs_the_schedule_backstop() {
        let t0 = Instant::now();
        let now = t0 + QUIET * 2;
        let mut views = with_k(2, t0);
        views[0].breaker.busy(now);
        let mut whole = facts(true, &[]);
        whole.schedule = Some(Duration::from_secs(60));
        let mut backstop = view();
        backstop.next_schedule = Some(now);
        views.push(backstop);
        let facts = [facts(false, &[]), facts(true, &[]), whole];
        let starts = dispatch(&mut views, &facts, &[0, 1, 2], 4, now, Some(now));
        let started: Vec<(usize, Reason)> = starts.iter().map(|s| (s.view, s.reason)).collect();
        assert_eq!(started, [(1, Reason::Change)], "0 waits for its retry");
        assert!(views[1].in_flight.as_ref().unwrap().whole);
        // The backstop came due at `now`: everything is noted, due like any change.
        assert_eq!(views[2].next_schedule, Some(now + Duration::from_secs(60)));
        // The loop wakes when the retry or the backstop is due, whichever first.
        let wake = next_wake(&views, now, Some(now)).unwrap();
        assert!(wake > now && wake <= views[0].breaker.retry_at().unwrap());
        let later = now + QUIET;
        let starts = dispatch(&mut views, &facts, &[0, 1, 2], 4, later, Some(later));
        let started: Vec<(usize, Reason)> = starts.iter().map(|s| (s.view, s.reason)).collect();
        assert_eq!(started, [(0, Reason::Change), (2, Reason::Schedule)]);
        assert_eq!(
            starts[1].batch[0].0, ALL,
            "the backstop refreshes everything"
        );
    }

    #[test]
    fn a_batch_that_goes_takes_along_keys_due_within_half_the_quiet_period() {
        let t0 = Instant::now();
        let mut views = vec![view()];
        let facts = [facts(false, &[])];
        // "a" due at t0 + QUIET; "b" 60 ms later (within QUIET / 2 = 100 ms); "c" 150 ms later.
        views[0].debouncer.note("a", t0, false);
        views[0].debouncer.note("b", t0 + ms(60), false);
        views[0].debouncer.note("c", t0 + ms(150), false);
        let h = Some(t0 + QUIET * 2);
        // Nothing is due yet: nothing goes, however close "a" is.
        assert!(dispatch(&mut views, &facts, &[0], 4, t0 + ms(150), h).is_empty());
        let starts = dispatch(&mut views, &facts, &[0], 4, t0 + QUIET, h);
        let mut keys: Vec<&str> = starts[0].batch.iter().map(|(k, _)| k.as_str()).collect();
        keys.sort();
        assert_eq!(
            keys,
            ["a", "b"],
            "b joins a's batch, c is not quiet long enough"
        );
        assert!(views[0].debouncer.contains("c"));
        // c goes on its own, when due.
        views[0].in_flight = None;
        assert!(dispatch(&mut views, &facts, &[0], 4, t0 + QUIET + ms(60), h).is_empty());
        let starts = dispatch(&mut views, &facts, &[0], 4, t0 + QUIET + ms(150), h);
        assert_eq!(starts[0].batch.len(), 1);
    }

    #[test]
    fn a_due_key_held_by_its_parent_does_not_make_the_others_go_early() {
        let t0 = Instant::now();
        let mut views = vec![view(), view()];
        let facts = [facts(false, &[]), facts(false, &[0])];
        views[0].debouncer.note("k", t0 + QUIET, false);
        views[1].debouncer.note("k", t0, false);
        views[1].debouncer.note("j", t0 + ms(60), false);
        let h = Some(t0 + QUIET * 3);
        // The child's k is due but held (the parent has k pending); j is not due yet.
        let starts = dispatch(&mut views, &facts, &[1], 4, t0 + QUIET, h);
        assert!(starts.is_empty(), "j is not due and k is held: {starts:?}");
    }

    fn batch_of(keys: impl IntoIterator<Item = String>) -> Batch {
        let t0 = Instant::now();
        keys.into_iter()
            .map(|k| (k, crate::debounce::Pending::forced(t0)))
            .collect()
    }

    #[test]
    fn a_batch_splits_into_balanced_chunks_that_share_no_bucket() {
        let batch = batch_of((1..=200).map(|k| k.to_string()));
        let chunks = split(batch.clone(), 3);
        assert_eq!(chunks.len(), 3);
        let sizes: Vec<usize> = chunks.iter().map(Vec::len).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 200, "every key in one chunk");
        assert!(
            sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 20,
            "balanced: {sizes:?}"
        );
        let buckets: Vec<BTreeSet<i32>> = chunks
            .iter()
            .map(|c| c.iter().map(|(k, _)| crate::partition::bucket(k)).collect())
            .collect();
        for (a, b) in [(0, 1), (0, 2), (1, 2)] {
            assert!(
                buckets[a].is_disjoint(&buckets[b]),
                "chunks {a} and {b} share a bucket"
            );
        }
        let mut all: Vec<String> = chunks.into_iter().flatten().map(|(k, _)| k).collect();
        all.sort();
        let mut want: Vec<String> = batch.into_iter().map(|(k, _)| k).collect();
        want.sort();
        assert_eq!(all, want);
        // Too few keys, one slot, or everything: one chunk.
        assert_eq!(
            split(
                batch_of(["1".to_owned(), "2".to_owned(), "3".to_owned()]),
                4
            )
            .len(),
            1
        );
        assert_eq!(split(batch_of((1..=50).map(|k| k.to_string())), 1).len(), 1);
        assert_eq!(
            split(
                batch_of(
                    [ALL.to_owned()]
                        .into_iter()
                        .chain((1..=50).map(|k| k.to_string()))
                ),
                4
            )
            .len(),
            1
        );
    }

    #[test]
    fn a_chunked_view_starts_its_batch_on_every_free_slot_and_waits_for_all_chunks() {
        let t0 = Instant::now();
        let now = t0 + QUIET * 2;
        let mut views = vec![view(), view()];
        for k in 1..=10 {
            views[0].debouncer.note(&k.to_string(), t0, false);
        }
        views[1].debouncer.note("k", t0, false);
        let mut chunked = facts(false, &[]);
        chunked.chunked = true;
        let facts = [chunked, facts(false, &[])];
        // Concurrency 3: view 0's batch takes every slot, view 1 waits.
        let starts = dispatch(&mut views, &facts, &[0, 1], 3, now, Some(now));
        assert_eq!(starts.len(), 3, "{starts:?}");
        assert!(starts.iter().all(|s| s.view == 0));
        assert_eq!(
            starts.iter().filter(|s| s.nulls).count(),
            1,
            "one chunk recomputes the NULL-key rows"
        );
        assert_eq!(starts.iter().map(|s| s.batch.len()).sum::<usize>(), 10);
        assert_eq!(views[0].in_flight.as_ref().unwrap().chunks, 3);
        // More keys arrive for view 0: nothing starts while its chunks run (nor view 1: no
        // slot is free).
        views[0].debouncer.note("11", t0, false);
        assert!(dispatch(&mut views, &facts, &[0, 1], 3, now, Some(now)).is_empty());
        // The first chunk ends: its keys no longer hold anything up; the view is still in
        // flight, and view 1 gets the free slot.
        let first = &starts[0].batch;
        assert!(!views[0].in_flight.as_mut().unwrap().chunk_done(first));
        let f = views[0].in_flight.as_ref().unwrap();
        assert!(first.iter().all(|(k, _)| !f.keys.contains(k)));
        let next = dispatch(&mut views, &facts, &[0, 1], 3, now, Some(now));
        assert_eq!(next.iter().map(|s| s.view).collect::<Vec<_>>(), [1]);
        // The other two end: the view is done.
        assert!(!views[0]
            .in_flight
            .as_mut()
            .unwrap()
            .chunk_done(&starts[1].batch));
        assert!(views[0]
            .in_flight
            .as_mut()
            .unwrap()
            .chunk_done(&starts[2].batch));
    }
}
