//! A logical capture's replication slot: created when missing, again when lost (every key then
//! marked dirty), dropped; what `install` does with the slots after its transaction.

use tokio_postgres::GenericClient;

use crate::config::CaptureConfig;
use crate::config::{CaptureMethod, Config};
use crate::debounce::ALL;

use crate::store::record_dirty;

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
    record_dirty(client, channel, &[(ALL.to_owned(), None)]).await
}
