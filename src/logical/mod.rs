//! Capture with no trigger: `[[capture]] method = "logical"`. Writers' transactions carry
//! nothing; the daemon reads the changes from the write-ahead log.
//!
//! `install` puts the table in a publication `mvrefresh_<capture>` (row filter: the capture's
//! `when`, PostgreSQL 15+), sets the table's `REPLICA IDENTITY FULL` (an update or delete then
//! logs the whole old row, so the old key of a row that moved or was deleted is known, and so
//! is whether a captured column changed), registers the capture like a trigger capture, and
//! then, outside its transaction, creates the logical replication slot (`pgoutput`).
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
//!    again at every call) and turns the messages into keys ([`Extractor`]): inserted and deleted
//!    rows' keys; for an update, the old and the new key when the key, `columns` or a column of
//!    `when` changed (the row filter turns an update into an insert or a delete when the row
//!    starts or stops matching `when`); TRUNCATE → `*`;
//! 4. every `poll_interval` (at once for a quiet moment's first commit and for what a WAL flush
//!    of its own released), writes the keys received into `mvrefresh.dirty` and notifies the
//!    channel, in one transaction, and tells the daemon, which collects them at once; from there
//!    on they go the way a trigger's keys go (collect, hand-over, refresh). The hand-over also
//!    covers a decoded commit not yet visible to other sessions: the writer holds its table lock
//!    until it is, and a guard waits for it;
//! 5. only then confirms to the server the position up to which everything was delivered (the
//!    last commit, or a keepalive's position: the server sends one when it has caught up, also
//!    past transactions that touched nothing captured), so the slot moves on. Killed between 4
//!    and 5, the next reader receives those changes again: at least once, and refreshes are
//!    idempotent.

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

/// The transaction part of a logical capture's install: replica identity, publication (created,
/// or its table and row filter set again when the capture's definition changed), the trigger
/// capture's triggers and functions dropped if the capture was one, the registration.
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
    format!(
        r#"DO $mvrefresh$
BEGIN
    IF (SELECT c.relreplident FROM pg_class AS c WHERE c.oid = {table_lit}::regclass) <> 'f' THEN
        ALTER TABLE {table} REPLICA IDENTITY FULL;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_publication WHERE pubname = {pub_lit}) THEN
        CREATE PUBLICATION {publication} FOR TABLE {table}{filter}
            WITH (publish = 'insert, update, delete, truncate');
    ELSIF NOT EXISTS (SELECT FROM mvrefresh.capture AS c
                      WHERE c.name = {name} AND c.fingerprint = {fingerprint}) THEN
        ALTER PUBLICATION {publication} SET TABLE {table}{filter};
    END IF;
END
$mvrefresh$;
{drop_trigger}{register}"#,
        register = crate::install::register_sql(c),
        pub_lit = literal(&c.publication_name()),
        drop_trigger = drop_trigger_capture_sql(&c.name),
    )
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
             WHERE NOT tg.tgisinternal
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
async fn mark_all(client: &impl GenericClient, channel: &str) -> Result<(), tokio_postgres::Error> {
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
    keys: BTreeMap<String, Option<i64>>,
    /// Everything is dirty (TRUNCATE, too many keys, a change that cannot be read), since then.
    all: bool,
    all_since: Option<i64>,
    /// The end of the last delivered transaction, or the last non-transactional message.
    pub advance_to: Option<Lsn>,
    pub messages: u64,
    /// Updates without the old row (the replica identity is not FULL): marked `*`.
    pub without_old_row: u64,
}

impl Batch {
    fn add(&mut self, value: &Value, since: Option<i64>) {
        let Value::Text(bytes) = value else { return };
        if self.all {
            return;
        }
        match std::str::from_utf8(bytes) {
            Ok(key) if self.keys.len() < MAX_BATCH_KEYS || self.keys.contains_key(key) => {
                let first = self.keys.entry(key.to_owned()).or_insert(since);
                *first = earliest(*first, since);
            }
            _ => self.everything(since),
        }
    }

    fn everything(&mut self, since: Option<i64>) {
        let first = self.keys.values().fold(since, |a, b| earliest(a, *b));
        self.all_since = earliest(self.all_since, first);
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
                .map(|(k, t)| (k.clone(), unix(*t)))
                .collect()
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.all && self.keys.is_empty()
    }
}

/// The positions of the key and the compared columns in one relation's tuples.
#[derive(Debug, Clone)]
struct Positions {
    key: Option<usize>,
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
            Message::Relation { oid, columns } => {
                let position = |name: &str| columns.iter().position(|c| c == name);
                let compared = self
                    .compared
                    .as_ref()
                    .map(|names| names.iter().filter_map(|n| position(n)).collect());
                self.relations.insert(
                    oid,
                    Positions {
                        key: position(&self.key),
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
        match self.relations.get(&oid).and_then(|p| p.key) {
            Some(i) => match tuple.get(i) {
                Some(v @ Value::Text(_)) => batch.add(v, self.commit_time),
                Some(Value::Null | Value::Unchanged) => {}
                None => batch.everything(self.commit_time),
            },
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
