//! Capture with no trigger: `[[capture]] method = "logical"`. Writers' transactions carry
//! nothing; the daemon reads the changes from the write-ahead log.
//!
//! `install` puts the table in a publication `mvrefresh_<capture>` (row filter: the capture's
//! `when`, PostgreSQL 15+), sets the table's `REPLICA IDENTITY FULL` (an update or delete then
//! logs the whole old row, so the old key of a row that moved or was deleted is known, and so
//! is whether a captured column changed), registers the capture like a trigger capture, and
//! then, outside its transaction, creates the logical replication slot (`pgoutput`). A
//! partitioned table: every partition `REPLICA IDENTITY FULL`, each leaf in the publication
//! with the `when` filter ([`install_sql`], [`partitions_sql`]); the reader does the same for
//! partitions that come later.
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

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tokio_postgres::{Client, GenericClient};

use crate::config::{CaptureConfig, CaptureMethod, Config};
use crate::debounce::ALL;
use crate::sql::{ident, literal};

pub mod pgoutput;
pub mod reader;
pub mod stream;

use pgoutput::{Lsn, Message, Value};

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

/// Key column types whose binary form the reader turns into the text the trigger writes
/// (`key::text`): int2, int4, int8, uuid, text, varchar, bpchar, name. With another key type the
/// slot is read with values as text.
pub const BINARY_KEY_TYPES: [u32; 8] = [21, 23, 20, 2950, 25, 1043, 1042, 19];
/// `character(n)`: its text keeps trailing blanks, `key::text` drops them.
const BPCHAR: u32 = 1042;

/// A `character(n)` value without its trailing blanks (spaces only, as PostgreSQL trims it).
fn trim_blanks(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().rposition(|&b| b != b' ').map_or(0, |i| i + 1);
    &bytes[..end]
}

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

/// A key's text from its binary form (`None`: a type or a length this does not read).
pub fn binary_key_text(type_oid: u32, bytes: &[u8]) -> Option<String> {
    match (type_oid, bytes.len()) {
        (21, 2) => Some(i16::from_be_bytes(bytes.try_into().ok()?).to_string()),
        (23, 4) => Some(i32::from_be_bytes(bytes.try_into().ok()?).to_string()),
        (20, 8) => Some(i64::from_be_bytes(bytes.try_into().ok()?).to_string()),
        (2950, 16) => {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            let mut text = String::with_capacity(36);
            for (i, b) in bytes.iter().enumerate() {
                if matches!(i, 4 | 6 | 8 | 10) {
                    text.push('-');
                }
                text.push(char::from(HEX[usize::from(b >> 4)]));
                text.push(char::from(HEX[usize::from(b & 15)]));
            }
            Some(text)
        }
        // The text types send their text (in the connection's encoding, UTF-8).
        (BPCHAR, _) => String::from_utf8(trim_blanks(bytes).to_vec()).ok(),
        (25 | 1043 | 19, _) => String::from_utf8(bytes.to_vec()).ok(),
        _ => None,
    }
}

/// The transaction part of a logical capture's install: replica identity, publication (created,
/// or its table and row filter set again when the capture's definition changed), the partitions
/// made ready ([`partitions_sql`]), the trigger capture's triggers and functions dropped if the
/// capture was one, the registration.
///
/// A partitioned table's publication holds the table without a row filter (PostgreSQL allows
/// none on a partitioned table whose partitions publish as themselves) and each leaf partition
/// with the `when` filter: a partition's changes are then filtered, and a partition's TRUNCATE
/// is delivered (with `publish_via_partition_root` it would not be).
pub fn install_sql(c: &CaptureConfig) -> String {
    let table = c.table.quoted();
    let table_lit = literal(&table);
    let name = literal(&c.name);
    let publication = ident(&c.publication_name());
    let filter = c
        .when
        .as_deref()
        .map(|w| format!(" WHERE ({w})"))
        .unwrap_or_default();
    let fingerprint = literal(&crate::install::fingerprint(c));
    let partitions = partitions_sql(c, None);
    format!(
        r#"DO $mvrefresh$
DECLARE
    partitioned boolean := (SELECT c.relkind = 'p' FROM pg_class AS c
                            WHERE c.oid = {table_lit}::regclass);
BEGIN
    IF (SELECT c.relreplident FROM pg_class AS c WHERE c.oid = {table_lit}::regclass) <> 'f' THEN
        ALTER TABLE {table} REPLICA IDENTITY FULL;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_publication WHERE pubname = {pub_lit}) THEN
        IF partitioned THEN
            CREATE PUBLICATION {publication} FOR TABLE {table}
                WITH (publish = 'insert, update, delete, truncate');
        ELSE
            CREATE PUBLICATION {publication} FOR TABLE {table}{filter}
                WITH (publish = 'insert, update, delete, truncate');
        END IF;
    ELSIF NOT EXISTS (SELECT FROM mvrefresh.capture AS c
                      WHERE c.name = {name} AND c.fingerprint = {fingerprint}) THEN
        IF partitioned THEN
            ALTER PUBLICATION {publication} SET TABLE {table};
        ELSE
            ALTER PUBLICATION {publication} SET TABLE {table}{filter};
        END IF;
    END IF;
END
$mvrefresh$;
{identity}{members}{drop_trigger}{register}"#,
        register = crate::install::register_sql(c),
        pub_lit = literal(&c.publication_name()),
        identity = partitions[0],
        members = partitions[1],
        drop_trigger = drop_trigger_capture_sql(&c.name),
    )
}

/// The partitions of capture `c`'s table that are not ready for logical capture, or only
/// partly: a replica identity other than FULL (the old row is unknown, so every update marks
/// everything dirty; and without a primary key PostgreSQL refuses writers' UPDATE and DELETE
/// on a table a publication holds), or, with `when`, a leaf the publication does not filter
/// (every change to it marks its key). A partition created or attached after `install` is one.
/// Also the publication's members that are no longer in the table (a detached partition: its
/// own TRUNCATE would mark everything). Unlogged and foreign partitions are not decoded at all
/// ([`undecoded_partitions`]), so nothing is asked of them. `$1`: the table, `$2`: the
/// publication, `$3`: whether there is a `when`.
const UNREADY_PARTITIONS: &str = "
    SELECT t.relid::regclass AS rel, k.relreplident <> 'f' AS identity, false AS stray
    FROM pg_partition_tree($1::text::regclass) AS t
    JOIN pg_class AS k ON k.oid = t.relid
    WHERE t.level > 0 AND k.relkind IN ('r', 'p') AND k.relpersistence = 'p'
      AND (k.relreplident <> 'f'
           OR ($3 AND t.isleaf AND NOT EXISTS (
                   SELECT FROM pg_publication_rel AS pr
                   JOIN pg_publication AS p ON p.oid = pr.prpubid
                   WHERE p.pubname = $2 AND pr.prrelid = t.relid)))
    UNION ALL
    SELECT pr.prrelid::regclass, false, true
    FROM pg_publication_rel AS pr
    JOIN pg_publication AS p ON p.oid = pr.prpubid
    WHERE p.pubname = $2 AND pr.prrelid <> $1::text::regclass
      AND pr.prrelid NOT IN (SELECT t.relid FROM pg_partition_tree($1::text::regclass) AS t)";

/// The statements that make the partitions of capture `c`'s table ready ([`UNREADY_PARTITIONS`]),
/// each waiting at most `lock_timeout` for a table's lock (`None`: as long as the session's
/// `lock_timeout` says): every partition `REPLICA IDENTITY FULL`; then, in a statement of its
/// own (so that a failure there does not undo the first, which is what keeps writers working),
/// the publication's members that left the table dropped and, with `when`, each leaf added with
/// that row filter. Nothing for a table that is not partitioned.
pub fn partitions_sql(c: &CaptureConfig, lock_timeout: Option<&str>) -> [String; 2] {
    let wait = lock_timeout
        .map(|t| {
            format!(
                "\n    PERFORM set_config('lock_timeout', {}, true);",
                literal(t)
            )
        })
        .unwrap_or_default();
    let publication = literal(&c.publication_name());
    let add = match &c.when {
        Some(w) => format!(
            "EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s WHERE (%s)', {publication}, \
             r.rel, {});",
            literal(w)
        ),
        None => "NULL;".to_owned(),
    };
    // The values go in last (the table's name may hold a `$`); the publication's name is
    // `mvrefresh_` and a capture name, which has none.
    let query = UNREADY_PARTITIONS
        .replace("$3", if c.when.is_some() { "true" } else { "false" })
        .replace("$2", &publication)
        .replace(
            "$1::text::regclass",
            &format!("{}::regclass", literal(&c.table.quoted())),
        );
    let block = |body: String| {
        format!(
            r#"DO $mvrefresh_partitions$
DECLARE
    r record;
BEGIN{wait}
{body}
END
$mvrefresh_partitions$;
"#
        )
    };
    [
        block(format!(
            "    FOR r IN SELECT * FROM ({query}) AS u WHERE u.identity LOOP
        EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', r.rel);
    END LOOP;"
        )),
        block(format!(
            "    FOR r IN SELECT * FROM ({query}) AS u WHERE u.stray LOOP
        EXECUTE format('ALTER PUBLICATION %I DROP TABLE %s', {publication}, r.rel);
    END LOOP;
    FOR r IN SELECT * FROM ({query}) AS u WHERE NOT u.identity AND NOT u.stray LOOP
        {add}
    END LOOP;"
        )),
    ]
}

/// The partitions of capture `c`'s table that are not ready for logical capture (see
/// [`UNREADY_PARTITIONS`]), by name.
pub async fn unready_partitions(
    client: &impl GenericClient,
    c: &CaptureConfig,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!("SELECT rel::text FROM ({UNREADY_PARTITIONS}) AS u ORDER BY 1"),
            &[&c.table.quoted(), &c.publication_name(), &c.when.is_some()],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The partitions of capture `c`'s table whose changes are never decoded: unlogged tables
/// (not in the write-ahead log) and foreign tables (stored elsewhere).
pub async fn undecoded_partitions(
    client: &impl GenericClient,
    c: &CaptureConfig,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT t.relid::regclass::text
             FROM pg_partition_tree($1::text::regclass) AS t
             JOIN pg_class AS k ON k.oid = t.relid
             WHERE t.isleaf AND (k.relkind = 'f' OR k.relpersistence <> 'p')
             ORDER BY 1",
            &[&c.table.quoted()],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Drops the triggers and trigger functions capture `name` had as a trigger capture, in its
/// install transaction.
fn drop_trigger_capture_sql(name: &str) -> String {
    let name_lit = literal(name);
    format!(
        r#"DO $mvrefresh_drop$
DECLARE
    t record;
    f record;
BEGIN
    FOR t IN SELECT tg.tgrelid::regclass AS rel, tg.tgname FROM pg_trigger AS tg
             WHERE NOT tg.tgisinternal AND tg.tgparentid = 0
               AND tg.tgname IN ('mvrefresh_capture_' || {name_lit},
                                 'mvrefresh_capture_' || {name_lit} || '_truncate',
                                 'mvrefresh_capture_' || {name_lit} || '$insert',
                                 'mvrefresh_capture_' || {name_lit} || '$delete')
    LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', t.tgname, t.rel);
    END LOOP;
    FOR f IN SELECT p.oid::regprocedure AS fn FROM pg_proc AS p
             WHERE p.pronamespace = 'mvrefresh'::regnamespace
               AND p.proname IN ({functions})
    LOOP
        EXECUTE format('DROP FUNCTION %s', f.fn);
    END LOOP;
END
$mvrefresh_drop$;
"#,
        functions = crate::install::capture_function_names(&name_lit),
    )
}

/// What became of a slot that [`ensure_slot`] looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotOutcome {
    /// There and usable.
    Present,
    /// Created: it did not exist.
    Created,
    /// Dropped and created again: PostgreSQL had removed the write-ahead log it needed.
    Recreated,
}

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error(
        "replication slot {slot} belongs to database {database} (slot names are cluster-wide); \
         fix: set a `slot` of its own for capture {capture}"
    )]
    OtherDatabase {
        slot: String,
        database: String,
        capture: String,
    },
    #[error("replication slot {slot}: {message}")]
    Db { slot: String, message: String },
}

/// Creates the slot of logical capture `c` if it is missing, or again if it is lost, and then
/// marks every key of its channel dirty: what was written before the slot existed is not in it
/// (if the capture ran before, those changes are lost; one full refresh covers them).
pub async fn ensure_slot(
    client: &impl GenericClient,
    c: &CaptureConfig,
) -> Result<SlotOutcome, SlotError> {
    let slot = c.slot_name();
    let db_err = |e: tokio_postgres::Error| SlotError::Db {
        slot: slot.clone(),
        message: crate::db::error_text(&e),
    };
    let row = client
        .query_opt(
            "SELECT database::text, database = current_database(), wal_status
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(db_err)?;
    let outcome = match row {
        None => SlotOutcome::Created,
        Some(r) if !r.get::<_, Option<bool>>(1).unwrap_or(false) => {
            return Err(SlotError::OtherDatabase {
                slot,
                database: r.get::<_, Option<String>>(0).unwrap_or_default(),
                capture: c.name.clone(),
            })
        }
        Some(r) if r.get::<_, Option<String>>(2).as_deref() == Some("lost") => {
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await
                .map_err(db_err)?;
            SlotOutcome::Recreated
        }
        Some(_) => return Ok(SlotOutcome::Present),
    };
    // PostgreSQL 17+: a failover slot, which standbys with `sync_replication_slots` keep in
    // step, so a failover does not cost a full resync.
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(db_err)?
        .get(0);
    let create = if version >= 170_000 {
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
    } else {
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')"
    };
    client.execute(create, &[&slot]).await.map_err(db_err)?;
    mark_all(client, &c.channel).await.map_err(db_err)?;
    Ok(outcome)
}

/// Drops replication slot `slot` if it exists in this database.
pub async fn drop_slot(
    client: &impl GenericClient,
    slot: &str,
) -> Result<bool, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
             WHERE slot_name = $1 AND database = current_database()",
            &[&slot],
        )
        .await?;
    Ok(!rows.is_empty())
}

/// After the install transaction: every logical capture's slot made usable (a missing or lost
/// one created, with everything marked dirty); the default slot of a capture that is a trigger
/// capture now, dropped; with `prune`, every other `mvrefresh_` slot of this database. What
/// happened, a line each.
pub async fn after_install(
    client: &impl GenericClient,
    config: &Config,
    prune: bool,
) -> anyhow::Result<Vec<String>> {
    let mut said = Vec::new();
    let mut kept = Vec::new();
    for c in &config.captures {
        let slot = c.slot_name();
        if c.method == CaptureMethod::Trigger {
            if drop_slot(client, &slot).await? {
                said.push(format!(
                    "capture {}: dropped its replication slot {slot}",
                    c.name
                ));
            }
            continue;
        }
        kept.push(slot.clone());
        match ensure_slot(client, c).await? {
            SlotOutcome::Present => {}
            SlotOutcome::Created => said.push(format!(
                "capture {}: created replication slot {slot}; every key of channel {} \
                     marked dirty once (what was written before the slot existed is not in it)",
                c.name, c.channel
            )),
            SlotOutcome::Recreated => {
                said.push(format!(
                    "capture {}: replication slot {slot} was lost; created again, every key \
                     marked dirty",
                    c.name
                ));
            }
        }
    }
    if prune {
        let rows = client
            .query(
                "SELECT slot_name::text, pg_drop_replication_slot(slot_name)
                 FROM pg_replication_slots
                 WHERE database = current_database() AND plugin = 'pgoutput'
                   AND slot_name LIKE 'mvrefresh\\_%' AND slot_name <> ALL ($1)",
                &[&kept],
            )
            .await?;
        for r in rows {
            said.push(format!(
                "dropped replication slot {} (--prune)",
                r.get::<_, String>(0)
            ));
        }
    }
    Ok(said)
}

/// Marks every key of `channel` dirty: changes were lost.
pub(crate) async fn mark_all(
    client: &impl GenericClient,
    channel: &str,
) -> Result<(), tokio_postgres::Error> {
    record(client, channel, &[(ALL.to_owned(), None)]).await
}

/// Writes `keys` into the change log (those not pending already), each dirty since its commit
/// (`None`: now; so the debounce counts from the write, not from when it was decoded), and
/// notifies `channel`, in one statement (one transaction).
pub async fn record(
    client: &impl GenericClient,
    channel: &str,
    keys: &[(String, Option<f64>)],
) -> Result<(), tokio_postgres::Error> {
    let (names, since): (Vec<&str>, Vec<Option<f64>>) =
        keys.iter().map(|(k, t)| (k.as_str(), *t)).unzip();
    client
        .execute(
            "WITH k AS (
                 SELECT CASE WHEN octet_length(x.key) > 1024 THEN '*' ELSE x.key END AS key,
                        least(min(coalesce(to_timestamp(x.since), now())), now()) AS since
                 FROM unnest($2::text[], $3::float8[]) AS x(key, since)
                 GROUP BY 1
             ), added AS (
                 INSERT INTO mvrefresh.dirty (channel, key, since)
                 SELECT $1, k.key, k.since FROM k
                 WHERE NOT EXISTS (SELECT FROM mvrefresh.dirty AS d
                                   WHERE d.channel = $1 AND d.key = k.key AND d.xmax = '0')
             )
             SELECT pg_notify($1, '')",
            &[&channel, &names, &since],
        )
        .await?;
    Ok(())
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

    fn add(&mut self, bytes: &[u8], since: Option<i64>) {
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

    fn everything(&mut self, since: Option<i64>) {
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

/// The positions of the key and the compared columns in one relation's tuples.
#[derive(Debug, Clone)]
struct Positions {
    key: Option<usize>,
    /// The key column's type (how a binary key is read).
    key_type: u32,
    /// `None`: every column.
    compared: Option<Vec<usize>>,
}

/// Turns pgoutput messages into dirty keys (module doc, step 3).
#[derive(Debug)]
pub struct Extractor {
    key: String,
    compared: Option<Vec<String>>,
    relations: HashMap<u32, Positions>,
    /// The commit time of the transaction being delivered.
    commit_time: Option<i64>,
}

impl Extractor {
    pub fn new(key: &str, compared: Option<Vec<String>>) -> Extractor {
        Extractor {
            key: key.to_owned(),
            compared,
            relations: HashMap::new(),
            commit_time: None,
        }
    }

    pub fn apply(&mut self, message: Message, batch: &mut Batch) {
        batch.messages += 1;
        match message {
            Message::Relation {
                oid,
                columns,
                types,
            } => {
                let position = |name: &str| columns.iter().position(|c| c == name);
                let compared = self
                    .compared
                    .as_ref()
                    .map(|names| names.iter().filter_map(|n| position(n)).collect());
                self.relations.insert(
                    oid,
                    Positions {
                        key: position(&self.key),
                        key_type: position(&self.key)
                            .and_then(|i| types.get(i).copied())
                            .unwrap_or(0),
                        compared,
                    },
                );
            }
            Message::Insert { oid, new } => self.key_of(oid, &new, batch),
            Message::Delete { oid, old, key_only } => {
                if key_only {
                    batch.without_old_row += 1;
                    batch.everything(self.commit_time);
                } else {
                    self.key_of(oid, &old, batch);
                }
            }
            Message::Update {
                oid,
                old,
                key_only,
                new,
            } => match old {
                Some(old) if !key_only => {
                    if self.changed(oid, &old, &new) {
                        // An unchanged TOASTed key in `new` is the old one, added already.
                        self.key_of(oid, &old, batch);
                        self.key_of(oid, &new, batch);
                    }
                }
                _ => {
                    batch.without_old_row += 1;
                    batch.everything(self.commit_time);
                }
            },
            Message::Truncate { .. } => batch.everything(self.commit_time),
            Message::Commit { end } => batch.advance_to = Some(end),
            Message::Message {
                transactional: false,
                lsn,
                ..
            } => batch.advance_to = Some(lsn),
            Message::Begin { commit_time } => self.commit_time = Some(commit_time),
            Message::Message { .. } | Message::Other => {}
        }
    }

    fn key_of(&self, oid: u32, tuple: &[Value], batch: &mut Batch) {
        let Some(p) = self.relations.get(&oid) else {
            return batch.everything(self.commit_time);
        };
        match p.key.and_then(|i| tuple.get(i)) {
            // `key::text` of a character(n) has no trailing blanks; its output does.
            Some(Value::Text(bytes)) if p.key_type == BPCHAR => {
                batch.add(trim_blanks(bytes), self.commit_time);
            }
            Some(Value::Text(bytes)) => batch.add(bytes, self.commit_time),
            Some(Value::Binary(bytes)) => match binary_key_text(p.key_type, bytes) {
                Some(text) => batch.add(text.as_bytes(), self.commit_time),
                None => batch.everything(self.commit_time),
            },
            Some(Value::Null | Value::Unchanged) => {}
            None => batch.everything(self.commit_time),
        }
    }

    /// Whether an update changed a compared column (an unchanged TOASTed value did not).
    fn changed(&self, oid: u32, old: &[Value], new: &[Value]) -> bool {
        let Some(p) = self.relations.get(&oid) else {
            return true;
        };
        let differs = |i: usize| match (old.get(i), new.get(i)) {
            (_, Some(Value::Unchanged)) => false,
            (a, b) => a != b,
        };
        match &p.compared {
            Some(columns) => columns.iter().any(|&i| differs(i)),
            None => (0..new.len().max(old.len())).any(differs),
        }
    }
}

#[cfg(test)]
mod tests;
