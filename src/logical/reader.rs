//! The daemon's reader of one logical capture's slot (the steps are in [`super`]'s doc).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{pin_mut, TryStreamExt};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::pgoutput::{self, format_lsn};
use super::{Batch, Extractor, SlotError, SlotOutcome, BATCH_CHANGES, MESSAGE_PREFIX};
use crate::alert::{Alerts, Event, Kind, Subject, Tracker};
use crate::config::CaptureConfig;
use crate::db::{Db, LOCK_NAMESPACE};
use crate::stats::Stats;

/// Longest wait between two attempts after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// With nothing delivered, the reader writes a message to move the slot once it lags this many
/// bytes behind the write-ahead log, or has not moved for [`MARKER_EVERY`].
const MARKER_BYTES: i64 = 16 << 20;
const MARKER_EVERY: Duration = Duration::from_secs(10);
/// A peek or a write that takes longer is cancelled server-side.
const STATEMENT_TIMEOUT: &str = "300s";

/// Everything a reader needs from the daemon.
pub struct Wiring {
    pub db: Db,
    pub capture: CaptureConfig,
    pub alerts: Alerts,
    pub tracker: Tracker,
    pub stats: Arc<Stats>,
}

/// Reads the slot of `capture` until `cancel`.
pub async fn run(w: Wiring, cancel: CancellationToken) {
    let mut reader = Reader::new(w);
    let mut failures = 0u32;
    let every = reader.w.capture.poll_interval;
    let mut last_step = Duration::ZERO;
    loop {
        // A peek decodes from the slot's restart point, which PostgreSQL moves only every few
        // seconds: on a busy server each peek reads seconds of write-ahead log again. Waiting at
        // least as long as the last step took keeps the decoding backend under half a core.
        let wait = if failures == 0 {
            every.max(last_step)
        } else {
            (every * 2u32.saturating_pow(failures.min(16))).min(MAX_BACKOFF)
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let started = Instant::now();
        let step = tokio::select! {
            _ = cancel.cancelled() => return,
            r = reader.step() => r,
        };
        last_step = started.elapsed();
        match step {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(slot = %reader.slot, "logical capture reading again");
                }
                failures = 0;
            }
            Err(e) => {
                if failures == 0 {
                    tracing::warn!(slot = %reader.slot, error = %e,
                                   "logical capture: reading the slot failed; retrying with backoff");
                }
                failures = failures.saturating_add(1);
                // A fresh connection next time (it also gives the lock up, so another replica
                // may read meanwhile).
                reader.client = None;
            }
        }
    }
}

/// Why a step failed; the reader retries with backoff on a fresh connection.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error("{}", crate::db::error_text(.0))]
    Query(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error(transparent)]
    Parse(#[from] pgoutput::ParseError),
}

/// One capture's reader: [`Reader::step`] is one pass of the module doc's steps.
pub struct Reader {
    w: Wiring,
    slot: String,
    publication: String,
    max_retained: i64,
    /// The connection, once it holds the slot's advisory lock.
    client: Option<Client>,
    extractor: Option<Extractor>,
    last_moved: Instant,
    marker_sent: Option<Instant>,
}

impl Reader {
    pub fn new(w: Wiring) -> Reader {
        Reader {
            slot: w.capture.slot_name(),
            publication: crate::sql::ident(&w.capture.publication_name()),
            max_retained: i64::try_from(w.capture.max_retained_wal_mb.saturating_mul(1 << 20))
                .unwrap_or(i64::MAX),
            w,
            client: None,
            extractor: None,
            last_moved: Instant::now(),
            marker_sent: None,
        }
    }

    /// Whether this reader holds the slot's lock (another replica's reader does otherwise).
    pub fn is_reading(&self) -> bool {
        self.client.is_some()
    }

    /// One pass: lock, check the slot, peek, record, advance.
    pub async fn step(&mut self) -> Result<(), StepError> {
        if self.client.is_none() {
            let client = self.w.db.connect_simple("mvrefresh-logical").await?;
            client
                .batch_execute(&format!("SET statement_timeout = '{STATEMENT_TIMEOUT}'"))
                .await?;
            let locked: bool = client
                .query_one(
                    "SELECT pg_try_advisory_lock($1, hashtext($2))",
                    &[&LOCK_NAMESPACE, &self.slot],
                )
                .await?
                .get(0);
            if !locked {
                // Another replica reads this slot; try again next time.
                return Ok(());
            }
            self.client = Some(client);
        }
        let Some(client) = self.client.as_mut() else {
            return Ok(());
        };
        if self.extractor.is_none() {
            let compared = super::compared_columns(client, &self.w.capture).await?;
            self.extractor = Some(Extractor::new(&self.w.capture.key, compared));
        }
        let behind = self.check_slot().await?;
        let batch = self.peek().await?;
        let Some(client) = self.client.as_ref() else {
            return Ok(());
        };
        if batch.without_old_row > 0 {
            tracing::warn!(
                slot = %self.slot, updates = batch.without_old_row,
                "logical capture: changes without the old row (the table's replica identity is \
                 not FULL): marked everything dirty; fix: run `mvrefresh install`"
            );
        }
        if !batch.is_empty() {
            super::record(client, &self.w.capture.channel, &batch.keys()).await?;
        }
        match batch.advance_to {
            Some(lsn) => {
                client
                    .execute(
                        "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
                        &[&self.slot, &format_lsn(lsn)],
                    )
                    .await?;
                self.last_moved = Instant::now();
                if batch.marker_seen {
                    self.marker_sent = None;
                }
            }
            None if behind > 0
                && (behind > MARKER_BYTES || self.last_moved.elapsed() > MARKER_EVERY)
                && self.marker_sent.is_none_or(|t| t.elapsed() > MARKER_EVERY) =>
            {
                client
                    .execute(
                        "SELECT pg_logical_emit_message(false, $1, $2)",
                        &[&MESSAGE_PREFIX, &self.slot],
                    )
                    .await?;
                self.marker_sent = Some(Instant::now());
            }
            None => {}
        }
        Ok(())
    }

    /// Step 2: the slot is there and not lost (else created again, everything marked dirty,
    /// one alert), and its retained write-ahead log is under the limit (else an alert until it
    /// is). How far the slot is behind the write-ahead log, in bytes.
    async fn check_slot(&mut self) -> Result<i64, StepError> {
        let Some(client) = self.client.as_ref() else {
            return Ok(0);
        };
        let capture = &self.w.capture;
        match super::ensure_slot(client, capture).await? {
            SlotOutcome::Present => {}
            outcome => {
                super::mark_all(client, &capture.channel).await?;
                let how = if outcome == SlotOutcome::Created {
                    "was missing"
                } else {
                    "was lost (PostgreSQL removed write-ahead log it needed)"
                };
                tracing::error!(slot = %self.slot, "logical capture: replication slot {how}; \
                                created again and every key marked dirty");
                let event = Event::new(
                    Kind::SlotLost,
                    Subject::Slot(self.slot.clone()),
                    format!(
                        "replication slot {} of capture {} {how}: created again; every view \
                         of channel {} is refreshed whole",
                        self.slot, capture.name, capture.channel
                    ),
                )
                .detail("capture", capture.name.clone());
                self.w
                    .alerts
                    .send(event.into_alert(self.w.tracker.source()));
            }
        }
        let row = client
            .query_one(
                "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::int8,
                        coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::int8
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await?;
        let (retained, behind): (i64, i64) = (row.get(0), row.get(1));
        if let Ok(mut slots) = self.w.stats.slots_retained.lock() {
            slots.insert(self.slot.clone(), retained.max(0));
        }
        let subject = Subject::SlotLag(self.slot.clone());
        if retained > self.max_retained {
            let event = Event::new(
                Kind::SlotLagging,
                subject,
                format!(
                    "replication slot {} holds {} MiB of write-ahead log (more than \
                     max_retained_wal_mb = {}): is the daemon reading it?",
                    self.slot,
                    retained >> 20,
                    capture.max_retained_wal_mb
                ),
            )
            .detail("retained_bytes", retained);
            if let Some(alert) = self.w.tracker.fail(event, Instant::now()) {
                self.w.alerts.send(alert);
            }
        } else if self.w.tracker.is_open(&subject) {
            let event = Event::new(
                Kind::SlotRecovered,
                subject,
                format!(
                    "replication slot {} is within max_retained_wal_mb again",
                    self.slot
                ),
            )
            .detail("retained_bytes", retained);
            self.w.alerts.send_opt(self.w.tracker.recover(event));
        }
        Ok(behind)
    }

    /// Step 3: at most [`BATCH_CHANGES`] changes (and the rest of the transaction the last one
    /// belongs to), read as they stream in: only their keys are kept.
    async fn peek(&mut self) -> Result<Batch, StepError> {
        let mut batch = Batch::default();
        let (Some(client), Some(extractor)) = (self.client.as_ref(), self.extractor.as_mut())
        else {
            return Ok(batch);
        };
        let sql = "SELECT data FROM pg_logical_slot_peek_binary_changes(
                       $1, NULL, $2, 'proto_version', '1', 'publication_names', $3,
                       'messages', 'true')";
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
            [&self.slot, &BATCH_CHANGES, &self.publication];
        let rows = client.query_raw(sql, params).await?;
        pin_mut!(rows);
        while let Some(row) = rows.try_next().await? {
            let data: &[u8] = row.get(0);
            extractor.apply(pgoutput::parse(data)?, &mut batch);
        }
        self.w.stats.logical_messages.add(batch.messages);
        Ok(batch)
    }
}
