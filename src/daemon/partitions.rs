//! The partitions of captured tables. Attaching a partition that holds rows, detaching or
//! dropping one changes a captured table's rows with no row change for a trigger to see or a
//! slot to decode. Every [`WATCH_EVERY`] one statement lists the partitions of every captured
//! table feeding a channel this daemon's views subscribe to, each as the attachment it is (its
//! `pg_inherits` row's `xmin`: detached and attached again, it is another); when one went, or
//! one came that holds storage (a partition created empty changes nothing), every key of the
//! table's channel is marked dirty (`*`: the views are refreshed whole once). Comparing
//! attachments, not names, a partition detached and attached again between two looks is seen
//! although the names are the same: a refresh in between may have seen it gone.
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

/// One partition as attached: the table, and the `xmin` of its `pg_inherits` row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Attached {
    relid: u32,
    xmin: i64,
}

/// Per capture: its channel and its table's partitions, as last seen.
pub(super) type Seen = HashMap<String, (String, Vec<Attached>)>;

/// Per capture: its channel and its table's partitions, each with whether its coming changes
/// rows (a leaf holding storage, or a partitioned partition).
type Looked = HashMap<String, (String, Vec<(Attached, bool)>)>;

/// The watch's state, owned by the main loop.
#[derive(Debug, Default)]
pub(super) struct PartitionWatch {
    running: bool,
    last: Option<Instant>,
    /// `None` until the first look.
    seen: Option<Seen>,
}

/// Each captured table's partitions, for the captures feeding `channels` (a table that is not
/// partitioned has none).
async fn look(
    client: &impl GenericClient,
    channels: &[String],
) -> Result<Looked, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT c.name, c.channel, t.relid::oid, i.xmin::text::int8,
                    NOT t.isleaf OR pg_relation_size(t.relid) > 0
             FROM mvrefresh.capture AS c
             CROSS JOIN LATERAL pg_partition_tree(c.table_name) AS t
             JOIN pg_inherits AS i ON i.inhrelid = t.relid
             WHERE c.channel = ANY ($1) AND t.level > 0
             ORDER BY 1, 3",
            &[&channels],
        )
        .await?;
    let mut out = Looked::new();
    for r in rows {
        let attached = Attached {
            relid: r.get(2),
            xmin: r.get(3),
        };
        out.entry(r.get(0))
            .or_insert_with(|| (r.get(1), Vec::new()))
            .1
            .push((attached, r.get(4)));
    }
    Ok(out)
}

/// The channels whose captured table gained a partition that changes rows, or lost one, from
/// `before` to `now` (a table whose last partition went has none left to list).
fn changed(before: &Seen, now: &Looked) -> Vec<String> {
    let came_or_went = now.iter().filter_map(|(capture, (channel, parts))| {
        let was = before
            .get(capture)
            .map(|(_, p)| p.as_slice())
            .unwrap_or_default();
        let went = was.iter().any(|w| !parts.iter().any(|(p, _)| p == w));
        let came = parts.iter().any(|(p, rows)| *rows && !was.contains(p));
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
        self.spawn_step(async move {
            let result = async {
                let client = pool.get().await.map_err(|e| e.to_string())?;
                let err = |e: tokio_postgres::Error| crate::db::error_text(&e);
                let now = look(&**client, &channels).await.map_err(err)?;
                if let Some(before) = &before {
                    for channel in changed(before, &now) {
                        tracing::info!(
                            %channel,
                            "a partition holding rows was attached, or one was detached or \
                             dropped: every key of the channel marked dirty"
                        );
                        crate::store::record_dirty(&**client, &channel, &[(ALL.to_owned(), None)])
                            .await
                            .map_err(err)?;
                    }
                }
                Ok(now
                    .into_iter()
                    .map(|(capture, (channel, parts))| {
                        (
                            capture,
                            (channel, parts.into_iter().map(|(p, _)| p).collect()),
                        )
                    })
                    .collect())
            };
            // The pooled connection's statement_timeout ends the statement on the server.
            let result = super::intake::bounded(result).await;
            let _ = done.send(Internal::Partitions(result));
        });
    }

    pub(super) fn on_partitions(&mut self, result: Result<Seen, String>) {
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

    fn at(relid: u32, xmin: i64) -> Attached {
        Attached { relid, xmin }
    }

    fn now(entries: &[(&str, &[(Attached, bool)])]) -> Looked {
        entries
            .iter()
            .map(|(c, p)| (c.to_string(), (format!("ch_{c}"), p.to_vec())))
            .collect()
    }

    #[test]
    fn partitions_that_come_with_rows_or_go_mark_their_channel() {
        let before: Seen = [
            (
                "a".to_owned(),
                ("ch_a".to_owned(), vec![at(1, 10), at(2, 10)]),
            ),
            ("b".to_owned(), ("ch_b".to_owned(), vec![at(5, 10)])),
        ]
        .into_iter()
        .collect();
        let b = (at(5, 10), true);
        let same = now(&[("a", &[(at(1, 10), true), (at(2, 10), true)]), ("b", &[b])]);
        assert!(changed(&before, &same).is_empty());
        // A partition created empty.
        let created = now(&[
            (
                "a",
                &[(at(1, 10), true), (at(2, 10), true), (at(3, 11), false)],
            ),
            ("b", &[b]),
        ]);
        assert!(changed(&before, &created).is_empty());
        // Attached with rows; detached or dropped; detached and attached again; the last one
        // detached.
        let attached = now(&[
            (
                "a",
                &[(at(1, 10), true), (at(2, 10), true), (at(3, 11), true)],
            ),
            ("b", &[b]),
        ]);
        assert_eq!(changed(&before, &attached), ["ch_a"]);
        let detached = now(&[("a", &[(at(1, 10), true)]), ("b", &[b])]);
        assert_eq!(changed(&before, &detached), ["ch_a"]);
        let again = now(&[("a", &[(at(1, 10), true), (at(2, 12), true)]), ("b", &[b])]);
        assert_eq!(changed(&before, &again), ["ch_a"]);
        let last = now(&[("a", &[(at(1, 10), true), (at(2, 10), true)])]);
        assert_eq!(changed(&before, &last), ["ch_b"]);
    }
}
