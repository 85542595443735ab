//! The partitions of captured tables. Attaching a partition that holds rows, detaching or
//! dropping one changes a captured table's rows with no row change for a trigger to see or a
//! slot to decode. Every [`WATCH_EVERY`] one statement lists the leaf partitions of every
//! captured table feeding a channel this daemon's views subscribe to; when leaves holding
//! storage came, or any went, since the last look, every key of the table's channel is marked
//! dirty (`*`: the views are refreshed whole once). A partition created empty changes nothing.
//!
//! The first look after start-up only learns the partitions: a change made while no daemon
//! ran is not seen (`mvrefresh refresh --all` covers it).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio_postgres::GenericClient;

use super::{Daemon, Internal};
use crate::debounce::ALL;

/// How often the partitions are looked at.
const WATCH_EVERY: Duration = Duration::from_secs(5);

/// Per capture: its channel and its table's leaf partitions, as last seen.
pub(super) type Leaves = HashMap<String, (String, Vec<u32>)>;

/// Per capture: its channel and its table's leaf partitions, each with whether it holds storage.
type Looked = HashMap<String, (String, Vec<(u32, bool)>)>;

/// The watch's state, owned by the main loop.
#[derive(Debug, Default)]
pub(super) struct PartitionWatch {
    running: bool,
    last: Option<Instant>,
    /// `None` until the first look.
    seen: Option<Leaves>,
}

/// Each captured table's leaf partitions with whether each holds storage, for the captures
/// feeding `channels` (a table that is not partitioned has none).
async fn leaves(
    client: &impl GenericClient,
    channels: &[String],
) -> Result<Looked, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT c.name, c.channel, t.relid::oid, pg_relation_size(t.relid) > 0
             FROM mvrefresh.capture AS c,
                  pg_partition_tree(c.table_name) AS t
             WHERE c.channel = ANY ($1) AND t.isleaf
             ORDER BY 1, 3",
            &[&channels],
        )
        .await?;
    let mut out = Looked::new();
    for r in rows {
        out.entry(r.get(0))
            .or_insert_with(|| (r.get(1), Vec::new()))
            .1
            .push((r.get(2), r.get(3)));
    }
    Ok(out)
}

/// The channels whose captured table gained a leaf holding storage or lost one, from `before`
/// to `now` (a table whose last partition went has none left to list).
fn changed(before: &Leaves, now: &Looked) -> Vec<String> {
    let came_or_went = now.iter().filter_map(|(capture, (channel, leaves))| {
        let was = before
            .get(capture)
            .map(|(_, l)| l.as_slice())
            .unwrap_or_default();
        let went = was.iter().any(|w| !leaves.iter().any(|(l, _)| l == w));
        let came = leaves.iter().any(|(l, rows)| *rows && !was.contains(l));
        (went || came).then(|| channel.clone())
    });
    let all_went = before
        .iter()
        .filter(|(capture, (_, was))| !was.is_empty() && !now.contains_key(*capture))
        .map(|(_, (channel, _))| channel.clone());
    let mut channels: Vec<String> = came_or_went.chain(all_went).collect();
    channels.sort();
    channels.dedup();
    channels
}

impl Daemon {
    /// When the next look is due (`None` while one runs).
    pub(super) fn partitions_wake(&self, now: Instant) -> Option<Instant> {
        let w = &self.partitions;
        (!w.running).then(|| w.last.map_or(now, |t| t + WATCH_EVERY))
    }

    /// Starts a look if one is due.
    pub(super) fn drive_partitions(&mut self, now: Instant) {
        if self.partitions_wake(now).is_none_or(|t| t > now) {
            return;
        }
        self.partitions.running = true;
        self.partitions.last = Some(now);
        let pool = self.pool.clone();
        let done = self.internal_tx.clone();
        let channels: Vec<String> = self.channels.keys().cloned().collect();
        let before = self.partitions.seen.clone();
        self.tasks.intake.spawn_until_stopped(async move {
            let result = async {
                let client = pool.get().await.map_err(|e| e.to_string())?;
                let err = |e: tokio_postgres::Error| crate::db::error_text(&e);
                let now = leaves(&**client, &channels).await.map_err(err)?;
                if let Some(before) = &before {
                    for channel in changed(before, &now) {
                        tracing::info!(
                            %channel,
                            "a partition holding rows was attached, or one was detached or \
                             dropped: every key of the channel marked dirty"
                        );
                        crate::logical::record(&**client, &channel, &[(ALL.to_owned(), None)])
                            .await
                            .map_err(err)?;
                    }
                }
                Ok(now
                    .into_iter()
                    .map(|(capture, (channel, leaves))| {
                        (
                            capture,
                            (channel, leaves.into_iter().map(|(l, _)| l).collect()),
                        )
                    })
                    .collect())
            };
            // The pooled connection's statement_timeout ends the statement on the server.
            let result = super::intake::bounded(result).await;
            let _ = done.send(Internal::Partitions(result));
        });
    }

    pub(super) fn on_partitions(&mut self, result: Result<Leaves, String>) {
        self.partitions.running = false;
        match result {
            Ok(seen) => self.partitions.seen = Some(seen),
            Err(e) => {
                tracing::warn!(error = %e, "could not look at the captured tables' partitions")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now(entries: &[(&str, &[(u32, bool)])]) -> Looked {
        entries
            .iter()
            .map(|(c, l)| (c.to_string(), (format!("ch_{c}"), l.to_vec())))
            .collect()
    }

    #[test]
    fn leaves_that_come_with_rows_or_go_mark_their_channel() {
        let before: Leaves = [
            ("a".to_owned(), ("ch_a".to_owned(), vec![1, 2])),
            ("b".to_owned(), ("ch_b".to_owned(), vec![5])),
        ]
        .into_iter()
        .collect();
        let same = now(&[("a", &[(1, true), (2, true)]), ("b", &[(5, true)])]);
        assert!(changed(&before, &same).is_empty());
        // A leaf created empty.
        let created = now(&[
            ("a", &[(1, true), (2, true), (3, false)]),
            ("b", &[(5, true)]),
        ]);
        assert!(changed(&before, &created).is_empty());
        // Attached with rows; detached or dropped; the last one detached.
        let attached = now(&[
            ("a", &[(1, true), (2, true), (3, true)]),
            ("b", &[(5, true)]),
        ]);
        assert_eq!(changed(&before, &attached), ["ch_a"]);
        let detached = now(&[("a", &[(1, true)]), ("b", &[(5, true)])]);
        assert_eq!(changed(&before, &detached), ["ch_a"]);
        assert_eq!(
            changed(&before, &now(&[("a", &[(1, true), (2, false)])])),
            ["ch_b"]
        );
    }
}
