//! The keys a batch of decoded changes dirtied, and how far the slot may move while they are
//! not recorded.

use std::collections::BTreeMap;

use super::pgoutput::Lsn;
use crate::debounce::ALL;

/// Keys kept per batch; with more, the batch marks `*` (everything) instead.
pub const MAX_BATCH_KEYS: usize = 10_000;
/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 UTC).
const PG_EPOCH_UNIX_US: i64 = 946_684_800_000_000;

fn earliest(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The keys a batch of changes dirtied (with the commit time of the first transaction that
/// dirtied each), and where the slot may move once they are recorded.
#[derive(Debug, Default)]
pub struct Batch {
    keys: BTreeMap<String, Entry>,
    /// Everything is dirty (TRUNCATE, too many keys, a change that cannot be read), since then.
    all: bool,
    all_since: Option<i64>,
    /// With `all`: where the slot may move at most while `*` is not recorded (the earliest
    /// position of the keys it replaced, or of the change that made it).
    all_before: Option<Lsn>,
    /// The end of the last delivered transaction, or the last non-transactional message.
    pub advance_to: Option<Lsn>,
    /// The position this batch started from: everything delivered before it was recorded,
    /// or is in it.
    pub start: Lsn,
    pub messages: u64,
    /// Updates without the old row (the replica identity is not FULL): marked `*`.
    pub without_old_row: u64,
}

/// One key of a batch.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// The commit time of the first transaction that dirtied it.
    since: Option<i64>,
    /// Where the slot may move at most while the key is not recorded: the position before
    /// that transaction.
    before: Lsn,
}

impl Batch {
    /// An empty batch starting at `start`.
    pub fn starting_at(start: Lsn) -> Batch {
        Batch {
            start,
            ..Batch::default()
        }
    }

    pub(super) fn add(&mut self, bytes: &[u8], since: Option<i64>) {
        if self.all {
            return;
        }
        let before = self.advance_to.unwrap_or(self.start);
        match std::str::from_utf8(bytes) {
            // Most changes are to a key the batch has (looked up without a copy of the key).
            Ok(key) => {
                if let Some(entry) = self.keys.get_mut(key) {
                    entry.since = earliest(entry.since, since);
                } else if self.keys.len() < MAX_BATCH_KEYS {
                    self.keys.insert(key.to_owned(), Entry { since, before });
                } else {
                    self.everything(since);
                }
            }
            Err(_) => self.everything(since),
        }
    }

    pub(super) fn everything(&mut self, since: Option<i64>) {
        let first = self.keys.values().fold(since, |a, b| earliest(a, b.since));
        self.all_since = earliest(self.all_since, first);
        let now = self.advance_to.unwrap_or(self.start);
        let before = self.keys.values().map(|e| e.before).fold(now, Lsn::min);
        self.all_before = Some(self.all_before.map_or(before, |b| b.min(before)));
        self.all = true;
        self.keys.clear();
    }

    /// The keys to record: `["*"]` when everything is dirty.
    #[cfg(test)]
    pub fn keys(&self) -> Vec<String> {
        self.dirty().into_iter().map(|(k, _)| k).collect()
    }

    /// The keys to record and when each turned dirty (the commit, as Unix seconds; `None`:
    /// now).
    pub fn dirty(&self) -> Vec<(String, Option<f64>)> {
        let unix = |t: Option<i64>| t.map(|us| (us + PG_EPOCH_UNIX_US) as f64 / 1e6);
        if self.all {
            vec![(ALL.to_owned(), unix(self.all_since))]
        } else {
            self.keys
                .iter()
                .map(|(k, e)| (k.clone(), unix(e.since)))
                .collect()
        }
    }

    /// Takes the keys that `hold` says to keep back out of this batch into a new one starting
    /// at `start` (nothing when everything is dirty: that is recorded at once).
    pub fn split_off_held(&mut self, hold: impl Fn(&str) -> bool, start: Lsn) -> Batch {
        let mut held = Batch::starting_at(start);
        if !self.all {
            let keys = std::mem::take(&mut self.keys);
            for (key, entry) in keys {
                if hold(&key) {
                    held.keys.insert(key, entry);
                } else {
                    self.keys.insert(key, entry);
                }
            }
        }
        held
    }

    /// Where the slot may move at most while this batch's keys are not recorded (`None`:
    /// anywhere).
    pub fn bound(&self) -> Option<Lsn> {
        if self.all {
            return Some(self.all_before.unwrap_or(self.start));
        }
        self.keys.values().map(|e| e.before).min()
    }

    /// The keys of this batch (not `*`).
    pub fn key_names(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        !self.all && self.keys.is_empty()
    }
}
