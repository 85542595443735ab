//! Capture with no trigger: `[[capture]] method = "logical"`. Writers' transactions carry
//! nothing; the daemon reads the changes from the write-ahead log.
//!
//! `install` puts the table in a publication `mvrefresh_<capture>` (row filter: the capture's
//! `when`, PostgreSQL 15+), sets the table's `REPLICA IDENTITY FULL` (an update or delete then
//! logs the whole old row, so the old key of a row that moved or was deleted is known, and so
//! is whether a captured column changed), registers the capture like a trigger capture, and
//! then, outside its transaction, creates the logical replication slot (`pgoutput`). A
//! partitioned table: every partition `REPLICA IDENTITY FULL`, each leaf in the publication
//! with the `when` filter (`install`, [`partitions_sql`]); the reader does the same for
//! partitions that come later.
//!
//! Here: what the reader reads from the catalogs ([`compared_columns`], [`binary_readable`]);
//! it writes keys with [`crate::store::record_dirty`]. `slot.rs`: the slot; `partitions.rs`: a
//! partitioned table's partitions; `pgoutput.rs` and `stream.rs`: the protocol;
//! `extract.rs`: messages to keys; `batch.rs`: the keys received and how far the slot may move;
//! `reader.rs`: the reader. The install transaction's part: `install/logical.rs`.
//!
//! The daemon's reader ([`reader::run`]):
//!
//! 1. streams the slot, which PostgreSQL gives to one connection at a time: one replica reads
//!    it, the others try again every few seconds (a replica that dies frees the slot with its
//!    connection; one cut off by the network, once the server's `wal_sender_timeout` passes);
//! 2. checks the slot, then every few seconds: missing or `wal_status = 'lost'` → created again
//!    and every key of the channel marked dirty (`*`, a full resync) with one alert; more
//!    retained write-ahead log than `max_retained_wal_mb` → an alert, resolved once it drops;
//! 3. streams the slot over a replication connection ([`stream`]: every record decoded once,
//!    where `pg_logical_slot_peek_binary_changes` would decode from the slot's restart point
//!    again at every call; values in binary when the key's type is one [`binary_key_text`]
//!    reads and every column can be sent so ([`binary_readable`]), so the walsender runs no output
//!    function: a sixth less of its decoding CPU on the bench's rows of uuids, numbers and
//!    timestamps) and turns the messages into keys ([`Extractor`]): inserted and deleted
//!    rows' keys; for an update, the old and the new key when the key, `columns` or a column of
//!    `when` changed (the row filter turns an update into an insert or a delete when the row
//!    starts or stops matching `when`); TRUNCATE → `*`;
//! 4. every `poll_interval` (at once for a quiet moment's first commit and for what a WAL flush
//!    of its own released), writes the keys received into `mvrefresh.dirty` and notifies the
//!    channel, in one transaction, and tells the daemon, which collects them at once; from there
//!    on they go the way a trigger's keys go (collect, hand-over, refresh). The hand-over also
//!    covers a decoded commit not yet visible to other sessions: the writer holds its table lock
//!    until it is, and a guard waits for it. A key written less than `hold` ago (the shortest
//!    `quiet` of the channel's views, at most a second) waits in the next batch until `hold`
//!    has passed since that write: under a steady stream a key is written about once per
//!    `hold`, not once per `poll_interval` (each write is a collect, a pending row re-stamped,
//!    often a refresh); it is written with its commit time, so it is due at once;
//! 5. only then confirms to the server the position up to which everything was delivered (the
//!    last commit, or a keepalive's position: the server sends one when it has caught up, also
//!    past transactions that touched nothing captured), so the slot moves on; never past the
//!    transaction of a key held back in 4 ([`Batch::bound`]). Killed between 4 and 5, the next
//!    reader receives those changes again: at least once, and refreshes are idempotent.

use std::collections::BTreeSet;

use tokio_postgres::{Client, GenericClient};

use crate::config::CaptureConfig;

mod batch;
mod extract;
mod partitions;
pub mod pgoutput;
pub mod reader;
mod slot;
pub mod stream;

pub use batch::{Batch, MAX_BATCH_KEYS};
pub use extract::{binary_key_text, Extractor, BINARY_KEY_TYPES};
pub use partitions::{partitions_sql, undecoded_partitions, unready_partitions};
pub use slot::{after_install, drop_slot, ensure_slot, SlotError, SlotOutcome};

/// Whether capture `c`'s slot can be read with values in binary: its key is of a type in
/// [`BINARY_KEY_TYPES`], and every column of its table can be sent in binary. pgoutput sends a
/// column whose type has no send function as text, but fails on an array, composite, range or
/// domain built on one, and would fail the same way at every attempt. Only base types (or
/// domains over one) with a send function, enums, and arrays of such, are taken.
pub async fn binary_readable(
    client: &impl GenericClient,
    c: &CaptureConfig,
) -> Result<bool, tokio_postgres::Error> {
    let key_types: Vec<i64> = BINARY_KEY_TYPES.iter().map(|&t| i64::from(t)).collect();
    let row = client
        .query_one(
            "SELECT coalesce(bool_and(
                        t.typsend <> 0 AND t.typtype IN ('b', 'e')
                        AND (t.typelem = 0 OR t.typlen <> -1 OR EXISTS (
                            SELECT FROM pg_type AS e
                            WHERE e.oid = t.typelem AND e.typsend <> 0
                              AND e.typtype IN ('b', 'e') AND e.typelem = 0))), true)
                    AND coalesce(bool_or(a.attname = $2 AND a.atttypid::int8 = ANY ($3)), false)
             FROM pg_attribute AS a
             JOIN pg_type AS d ON d.oid = a.atttypid
             JOIN pg_type AS t
               ON t.oid = CASE WHEN d.typtype = 'd' THEN d.typbasetype ELSE d.oid END
             WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped",
            &[&c.table.quoted(), &c.key, &key_types],
        )
        .await?;
    Ok(row.get(0))
}

/// The columns whose change dirties a row's key: the key, `columns` and the columns `when`
/// reads (read back from a temporary view in a transaction rolled back). `None`: every column
/// (`when` reads the whole row).
pub async fn compared_columns(
    client: &mut Client,
    c: &CaptureConfig,
) -> Result<Option<Vec<String>>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let when = c.when.as_deref().unwrap_or("true");
    tx.batch_execute(&format!(
        "CREATE TEMP VIEW mvrefresh_logical_when AS SELECT ({when})::boolean AS w FROM {} AS n",
        c.table.quoted()
    ))
    .await?;
    let row = tx
        .query_one(
            "SELECT coalesce(bool_or(d.refobjsubid = 0), false),
                    coalesce(array_agg(a.attname::text) FILTER (WHERE a.attname IS NOT NULL), '{}')
             FROM pg_depend AS d
             JOIN pg_rewrite AS r ON r.oid = d.objid
             LEFT JOIN pg_attribute AS a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
             WHERE r.ev_class = 'pg_temp.mvrefresh_logical_when'::regclass
               AND d.refobjid = $1::text::regclass",
            &[&c.table.quoted()],
        )
        .await?;
    tx.rollback().await?;
    if row.get::<_, bool>(0) {
        return Ok(None);
    }
    let mut columns: BTreeSet<String> = row.get::<_, Vec<String>>(1).into_iter().collect();
    columns.insert(c.key.clone());
    columns.extend(c.columns.iter().cloned());
    Ok(Some(columns.into_iter().collect()))
}

#[cfg(test)]
mod tests;
