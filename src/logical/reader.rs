//! The daemon's reader of one logical capture's slot (the steps are in [`super`]'s doc).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::pgoutput::{self, Lsn};
use super::stream::{Event, Replication, StreamError};
use super::{Batch, Extractor, SlotError, SlotOutcome};
use crate::alert::{Alerts, Event as AlertEvent, Kind, Subject, Tracker};
use crate::config::CaptureConfig;
use crate::db::Db;
use crate::stats::Stats;

/// Longest wait between two attempts after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often the slot's health is checked while streaming.
const HEALTH_EVERY: Duration = Duration::from_secs(5);
/// How long the reader waits for a partition's lock to make it ready for the capture.
const PARTITION_LOCK_WAIT: &str = "100ms";
/// A stream silent this long is asked for a keepalive; one that stays silent as long again
/// after that is given up (a frozen or cut connection).
const STREAM_PING: Duration = Duration::from_secs(10);
/// A statement of the reader's own connection (a write of keys, a check of the slot) that takes
/// longer is cancelled server-side; one whose answer does not come within [`STEP_PATIENCE`] is
/// given up client-side (a frozen connection), and the reader starts over.
const STATEMENT_TIMEOUT: &str = "10s";
const STEP_PATIENCE: Duration = Duration::from_secs(15);
/// After a flush of ours released commits, how long the reader waits for more of them behind
/// the first before writing their keys (they arrive back to back).
const RELEASE_GATHER: Duration = Duration::from_millis(2);
/// SQLSTATE `object_in_use`: the slot is streamed by another connection (another replica).
const SLOT_IN_USE: &str = "55006";
/// SQLSTATE `undefined_function`: pgoutput found no binary output function for a value.
const UNDEFINED_FUNCTION: &str = "42883";
/// The replication connection's and the reader's `application_name`.
pub const APPLICATION: &str = "mvrefresh-logical";

/// A commit is decoded only once the write-ahead log holding it is flushed. Asynchronous commits
/// (`synchronous_commit = off`) wait for the WAL writer (`wal_writer_delay`, 200 ms by default)
/// for that: when WAL is waiting, this statement flushes it by committing, under
/// `synchronous_commit = on`, a transaction that wrote one WAL record (a transactional logical
/// message with prefix `mvrefresh.flush`: one small record, one transaction id, any role may
/// write it; pgoutput passes such messages only to consumers that ask for them with `messages
/// 'true'`, and the extractor ignores them). A transaction that only takes an id is not enough:
/// PostgreSQL commits a transaction that wrote no WAL before its commit record asynchronously,
/// whatever `synchronous_commit` says. Whether it flushed.
pub const FLUSH_WAL: &str =
    "SELECT CASE WHEN pg_current_wal_insert_lsn() > pg_current_wal_flush_lsn()
                 THEN set_config('synchronous_commit', 'on', true) IS NOT NULL
                      AND pg_logical_emit_message(true, 'mvrefresh.flush', '') IS NOT NULL
                 ELSE false END";

/// Everything a reader needs from the daemon.
pub struct Wiring {
    pub db: Db,
    pub capture: CaptureConfig,
    pub alerts: Alerts,
    pub tracker: Tracker,
    pub stats: Arc<Stats>,
    /// Told after every write of keys, so the daemon collects them at once rather than at its
    /// next collect (up to `quiet / 2` later: added to every key's lag).
    pub recorded: Arc<tokio::sync::Notify>,
    /// A key recorded less than this long ago is kept back (and the slot not confirmed past
    /// its change) until this long after that record: the shortest `quiet` of the views the
    /// capture's channel feeds, at most a second (the slot holds WAL meanwhile). Under a steady
    /// stream a key is then written, collected and refreshed about once per `hold`, not once per
    /// `poll_interval`; it adds no lag, as a held key is recorded with its commit time and is
    /// due at once. Zero: nothing is held.
    pub hold: Duration,
}

/// Reads the slot of `capture` until `cancel`: streams, and every `poll_interval` records the
/// keys received and confirms the position; reconnects with backoff after a failure.
pub async fn run(w: Wiring, cancel: CancellationToken) {
    let mut reader = Reader::new(w);
    let mut failures = 0u32;
    let every = reader.w.capture.poll_interval;
    loop {
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = reader.stream_until_error() => r,
        };
        match result {
            // Another replica reads this slot: try again later.
            Ok(()) => failures = 0,
            Err(e) => {
                reader.after_error(&e);
                if failures == 0 {
                    tracing::warn!(slot = %reader.slot, error = %e,
                                   "logical capture: reading the slot failed; retrying with backoff");
                }
                failures = failures.saturating_add(1);
            }
        }
        reader.session = None;
        let wait = (every * 2u32.saturating_pow(failures.min(16)))
            .max(every * 10)
            .min(MAX_BACKOFF);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Why reading stopped; the reader starts over on fresh connections.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error("{}", crate::db::error_text(.0))]
    Query(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Parse(#[from] pgoutput::ParseError),
    #[error("no answer from the database within {}s", STEP_PATIENCE.as_secs())]
    Stalled,
}

/// The two connections of a reader holding the slot's lock.
struct Session {
    /// Checks the slot, records keys.
    client: Client,
    stream: Replication,
    last_health: Instant,
    /// When the stream last delivered anything.
    last_event: Instant,
    /// When keys were last recorded (or the session started).
    last_flush: Instant,
    /// When the reader last looked for WAL to flush.
    last_nudge: Instant,
    /// That flush found WAL waiting: the commits it released are written at once, not at the
    /// next `poll_interval` (they waited for it already).
    released: bool,
    /// The server asked for a status update, or we have not answered a ping of ours yet.
    reply_wanted: bool,
    ping_sent: Option<Instant>,
}

/// One capture's reader.
pub struct Reader {
    w: Wiring,
    slot: String,
    publication: String,
    max_retained: i64,
    session: Option<Session>,
    extractor: Option<Extractor>,
    batch: Batch,
    /// Keys recorded less than `hold` ago, and when (at most [`super::MAX_BATCH_KEYS`]).
    recent: HashMap<String, Instant>,
    /// Everything up to here was delivered (commits, keepalives) and is recorded once the
    /// batch is.
    received: Lsn,
    confirmed: Lsn,
    /// The content of the last non-transactional logical message received (tests wait on it).
    last_message: Option<Vec<u8>>,
    /// The stream sends values in binary ([`Reader::reads_binary`]).
    binary: bool,
    /// The server could not send a value in binary (a type without a send function inside an
    /// array, composite or range that [`super::binary_readable`] did not catch): text from then on.
    text_only: bool,
    /// The role may not write logical messages ([`FLUSH_WAL`] was denied): asynchronous commits
    /// reach the slot at the WAL writer's pace (said once, in a warning with the fix).
    flush_denied: bool,
}

impl Reader {
    pub fn new(w: Wiring) -> Reader {
        Reader {
            slot: w.capture.slot_name(),
            publication: w.capture.publication_name(),
            max_retained: i64::try_from(w.capture.max_retained_wal_mb.saturating_mul(1 << 20))
                .unwrap_or(i64::MAX),
            w,
            session: None,
            extractor: None,
            batch: Batch::default(),
            recent: HashMap::new(),
            received: 0,
            confirmed: 0,
            last_message: None,
            binary: false,
            text_only: false,
            flush_denied: false,
        }
    }

    /// Whether the stream being read sends values in binary.
    pub fn reads_binary(&self) -> bool {
        self.session.is_some() && self.binary
    }

    /// Whether this reader holds the slot (another replica's reader does otherwise).
    pub fn is_reading(&self) -> bool {
        self.session.is_some()
    }

    /// Streams until an error; returns `Ok` at once when another replica holds the slot.
    async fn stream_until_error(&mut self) -> Result<(), ReadError> {
        if !self.open().await? {
            return Ok(());
        }
        let every = self.w.capture.poll_interval;
        loop {
            self.receive_for(every).await?;
            match tokio::time::timeout(STEP_PATIENCE, self.flush()).await {
                Ok(flushed) => flushed?,
                Err(_) => return Err(ReadError::Stalled),
            }
        }
    }

    /// For tests: streams until a non-transactional logical message with `content` arrived
    /// (everything committed before it was delivered), then records and confirms.
    /// Returns at once when another replica holds the slot ([`Reader::is_reading`] is false);
    /// after an error the next call starts on fresh connections.
    pub async fn catch_up_to_message(&mut self, content: &[u8]) -> Result<(), ReadError> {
        let result = async {
            if !self.open().await? {
                return Ok(());
            }
            while self.last_message.as_deref() != Some(content) {
                self.receive_for(Duration::from_millis(50)).await?;
            }
            self.flush().await
        }
        .await;
        if let Err(e) = &result {
            self.after_error(e);
            self.session = None;
        }
        result
    }

    /// After a failure: a server that could not send a value in binary (SQLSTATE
    /// `undefined_function`, "no binary output function available for type …") is read with
    /// values as text from then on, as it would fail the same way at every attempt.
    fn after_error(&mut self, e: &ReadError) {
        if let ReadError::Stream(StreamError::Server { code, message }) = e {
            if self.binary && code == UNDEFINED_FUNCTION && !self.text_only {
                tracing::warn!(slot = %self.slot, error = %message,
                               "logical capture: a column cannot be sent in binary; \
                                reading values as text");
                self.text_only = true;
            }
        }
    }

    /// Steps 1 and 2, and the start of streaming: false when another replica streams the slot.
    async fn open(&mut self) -> Result<bool, ReadError> {
        if self.session.is_some() {
            return Ok(true);
        }
        match tokio::time::timeout(STEP_PATIENCE * 2, self.open_session()).await {
            Ok(opened) => opened,
            Err(_) => Err(ReadError::Stalled),
        }
    }

    async fn open_session(&mut self) -> Result<bool, ReadError> {
        let mut client = self.w.db.connect_simple(APPLICATION).await?;
        // A connection left behind by a network failure ends on the server within a minute.
        client
            .batch_execute(&format!(
                "SET statement_timeout = '{STATEMENT_TIMEOUT}'; SET idle_session_timeout = '60s'"
            ))
            .await?;
        if self.extractor.is_none() {
            let compared = super::compared_columns(&mut client, &self.w.capture).await?;
            self.extractor = Some(Extractor::new(&self.w.capture.key, compared));
        }
        let binary = !self.text_only && super::binary_readable(&client, &self.w.capture).await?;
        self.check_slot(&client).await?;
        let mut stream = Replication::connect(&self.w.db, APPLICATION).await?;
        // A slot streams to one connection at a time: that is what keeps replicas apart. One
        // whose connection broke is freed once the server's wal_sender_timeout passes.
        self.binary = binary;
        match stream.start(&self.slot, &self.publication, binary).await {
            Ok(()) => {}
            Err(StreamError::Server { code, .. }) if code == SLOT_IN_USE => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        // The new stream starts over from the confirmed position: what the last one received
        // and did not record comes again.
        // Only what this stream delivers may be confirmed.
        self.batch = Batch::default();
        self.last_message = None;
        self.received = 0;
        self.confirmed = 0;
        self.session = Some(Session {
            client,
            stream,
            last_health: Instant::now(),
            last_event: Instant::now(),
            last_flush: Instant::now(),
            last_nudge: Instant::now(),
            released: false,
            reply_wanted: false,
            ping_sent: None,
        });
        Ok(true)
    }

    /// Step 3: messages for `how_long` (or until a keepalive asks for a reply).
    async fn receive_for(&mut self, how_long: Duration) -> Result<(), ReadError> {
        let mut deadline = tokio::time::Instant::now() + how_long;
        let (Some(session), Some(extractor)) = (self.session.as_mut(), self.extractor.as_mut())
        else {
            return Ok(());
        };
        loop {
            let event = match tokio::time::timeout_at(deadline, session.stream.next()).await {
                Ok(event) => event?,
                Err(_) => return Ok(()),
            };
            session.last_event = Instant::now();
            session.ping_sent = None;
            match event {
                Event::Data(data) => {
                    let message = pgoutput::parse(&data)?;
                    if let pgoutput::Message::Message {
                        transactional: false,
                        content,
                        ..
                    } = &message
                    {
                        self.last_message = Some(content.clone());
                    }
                    let commit = matches!(message, pgoutput::Message::Commit { .. });
                    extractor.apply(message, &mut self.batch);
                    if let Some(lsn) = self.batch.advance_to {
                        self.received = self.received.max(lsn);
                    }
                    // The first commit after a quiet moment is recorded at once; under a steady
                    // stream, at most once per poll_interval, and once more for what a flush
                    // of ours released (with what arrives right behind it).
                    if commit && !self.batch.is_empty() {
                        if session.last_flush.elapsed() >= self.w.capture.poll_interval {
                            return Ok(());
                        }
                        if session.released {
                            session.released = false;
                            deadline = deadline.min(tokio::time::Instant::now() + RELEASE_GATHER);
                        }
                    }
                }
                Event::Keepalive { end, reply } => {
                    self.received = self.received.max(end);
                    if reply {
                        session.reply_wanted = true;
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Steps 4 and 5: the keys received go into the change log, then the slot may move past
    /// what delivered them. Every few seconds, the slot's health.
    async fn flush(&mut self) -> Result<(), ReadError> {
        let Some(session) = self.session.as_mut() else {
            return Ok(());
        };
        let mut batch = std::mem::take(&mut self.batch);
        self.w.stats.logical_messages.add(batch.messages);
        let now = Instant::now();
        let hold = self.w.hold;
        self.recent.retain(|_, at| now.duration_since(*at) < hold);
        if !batch.is_empty() {
            // Also when every key is held: not again at the next commit.
            session.last_flush = now;
        }
        // Keys recorded within `hold` wait in the next batch, which starts here.
        let recent = &self.recent;
        self.batch = batch.split_off_held(|k| recent.contains_key(k), self.received);
        let bound = self.batch.bound();
        if batch.without_old_row > 0 {
            tracing::warn!(
                slot = %self.slot, updates = batch.without_old_row,
                "logical capture: changes without the old row (the table's replica identity is \
                 not FULL): marked everything dirty; fix: run `mvrefresh install`"
            );
        }
        if !batch.is_empty() {
            crate::store::record_dirty(&session.client, &self.w.capture.channel, &batch.dirty())
                .await?;
            session.released = false;
            self.w.recorded.notify_one();
            if !hold.is_zero() {
                for key in batch.key_names() {
                    if self.recent.len() >= super::MAX_BATCH_KEYS {
                        break;
                    }
                    self.recent.insert(key.to_owned(), now);
                }
            }
        }
        // At most once per poll_interval: what is committed reaches the slot within it.
        if !self.flush_denied && session.last_nudge.elapsed() >= self.w.capture.poll_interval {
            session.last_nudge = Instant::now();
            match session.client.query_one(FLUSH_WAL, &[]).await {
                Ok(row) => {
                    let flushed: bool = row.get(0);
                    if flushed {
                        self.w.stats.logical_wal_flushes.inc();
                    }
                    session.released = flushed;
                }
                Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
                    tracing::warn!(
                        slot = %self.slot, error = %crate::db::error_text(&e),
                        "logical capture: the reader may not flush the write-ahead log; \
                         asynchronous commits reach the slot only when the WAL writer flushes \
                         them (wal_writer_delay later); fix: GRANT EXECUTE ON FUNCTION \
                         pg_logical_emit_message(boolean, text, text) to the daemon's role"
                    );
                    self.flush_denied = true;
                }
                Err(e) => return Err(e.into()),
            }
        }
        // A status update when there is a position to confirm or the server asked for one; a
        // ping when the stream has been silent (an idle server sends nothing otherwise).
        let silent = session.last_event.elapsed();
        if let Some(sent) = session.ping_sent {
            if sent.elapsed() >= STREAM_PING {
                return Err(StreamError::Protocol(format!(
                    "no answer from the server for {}s",
                    silent.as_secs()
                ))
                .into());
            }
        }
        let ping = silent >= STREAM_PING && session.ping_sent.is_none();
        // Not past a held key's change; never back.
        let to = bound
            .map_or(self.received, |b| b.min(self.received))
            .max(self.confirmed);
        if to > self.confirmed || session.reply_wanted || ping {
            session.stream.confirm(to, ping).await?;
            self.confirmed = to;
            session.reply_wanted = false;
            if ping {
                session.ping_sent = Some(Instant::now());
            }
        }
        if session.last_health.elapsed() >= HEALTH_EVERY {
            session.last_health = Instant::now();
            let Some(session) = self.session.take() else {
                return Ok(());
            };
            let checked = self.check_slot(&session.client).await;
            self.session = Some(session);
            checked?;
        }
        Ok(())
    }

    /// Step 2: the slot is there and not lost (else created again, everything marked dirty by
    /// [`super::ensure_slot`], one alert), and its retained write-ahead log is under the limit (else an alert until it
    /// is).
    async fn check_slot(&mut self, client: &Client) -> Result<(), ReadError> {
        let capture = &self.w.capture;
        match super::ensure_slot(client, capture).await? {
            SlotOutcome::Present => {}
            outcome => {
                let how = if outcome == SlotOutcome::Created {
                    "was missing"
                } else {
                    "was lost (PostgreSQL removed write-ahead log it needed)"
                };
                tracing::error!(slot = %self.slot, "logical capture: replication slot {how}; \
                                created again and every key marked dirty");
                let event = AlertEvent::new(
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
        let retained: i64 = client
            .query_one(
                "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::int8
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await?
            .get(0);
        if let Ok(mut slots) = self.w.stats.slots_retained.lock() {
            slots.insert(self.slot.clone(), retained.max(0));
        }
        let subject = Subject::SlotLag(self.slot.clone());
        if retained > self.max_retained {
            let event = AlertEvent::new(
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
            let event = AlertEvent::new(
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
        self.check_partitions(client).await
    }

    /// Step 2, for a partitioned table: partitions created or attached since `install` are
    /// made ready for the capture as `install` makes them ([`super::partitions_sql`]: replica
    /// identity FULL, the `when` filter; a detached one leaves the publication), waiting at most
    /// [`PARTITION_LOCK_WAIT`] for each lock (an `ALTER TABLE` waiting for its lock holds up
    /// every reader and writer of that partition behind it); when that fails, an alert until
    /// they are. (A partition attached with rows, detached or dropped: `daemon/partitions.rs`.)
    async fn check_partitions(&mut self, client: &Client) -> Result<(), ReadError> {
        let capture = &self.w.capture;
        let subject = Subject::Partitions(capture.name.clone());
        let unready = super::unready_partitions(client, capture).await?;
        let mut failed = None;
        if !unready.is_empty() {
            for sql in super::partitions_sql(capture, Some(PARTITION_LOCK_WAIT)) {
                match client.batch_execute(&sql).await {
                    Ok(()) => {}
                    Err(e) if e.as_db_error().is_some() => {
                        failed = Some(crate::db::error_text(&e));
                        break;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if failed.is_none() {
                tracing::info!(
                    capture = %capture.name, partitions = ?unready,
                    "logical capture: partitions made ready (replica identity FULL, the `when` \
                     filter, detached ones out of the publication)"
                );
            }
        }
        if let Some(error) = failed {
            // Logged with the alert (once, and with its reminders), not at every attempt.
            tracing::debug!(
                capture = %capture.name, partitions = ?unready, %error,
                "logical capture: partitions not ready"
            );
            let event = AlertEvent::new(
                Kind::PartitionsNotReady,
                subject,
                format!(
                    "capture {}: partitions {} of {} are not ready for logical capture and \
                     could not be made so (without REPLICA IDENTITY FULL, PostgreSQL refuses \
                     UPDATE and DELETE on a partition without a primary key); fix: run \
                     `mvrefresh install`",
                    capture.name,
                    unready.join(", "),
                    capture.table.quoted()
                ),
            )
            .error(error)
            .detail("partitions", unready);
            if let Some(alert) = self.w.tracker.fail(event, Instant::now()) {
                self.w.alerts.send(alert);
            }
        } else if self.w.tracker.is_open(&subject) {
            let event = AlertEvent::new(
                Kind::PartitionsReady,
                subject,
                format!(
                    "capture {}: every partition of {} is ready for logical capture again",
                    capture.name,
                    capture.table.quoted()
                ),
            );
            self.w.alerts.send_opt(self.w.tracker.recover(event));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader() -> Reader {
        let config = crate::config::Config::from_str_with_env(
            r#"
[database]
url = "postgres://localhost/app"
[[capture]]
name = "s"
table = "s"
channel = "c"
key = "k"
method = "logical"
[[view]]
name = "mv_a"
mode = "concurrently"
channels = ["c"]
"#,
            std::path::Path::new("test.toml"),
            &HashMap::new(),
        )
        .unwrap();
        let stats = Arc::new(Stats::default());
        Reader::new(Wiring {
            db: Db::new(&config.database).unwrap(),
            capture: config.captures[0].clone(),
            alerts: Alerts::log_only(stats.clone()),
            tracker: Tracker::new(Duration::from_secs(60), "test"),
            stats,
            recorded: Arc::default(),
            hold: Duration::ZERO,
        })
    }

    fn server(code: &str) -> ReadError {
        ReadError::Stream(StreamError::Server {
            code: code.into(),
            message: "no binary output function available for type aclitem".into(),
        })
    }

    #[test]
    fn a_value_the_server_cannot_send_in_binary_turns_the_reader_to_text() {
        let mut r = reader();
        // Reading as text already, or another error: nothing changes.
        r.after_error(&server(UNDEFINED_FUNCTION));
        assert!(!r.text_only);
        r.binary = true;
        r.after_error(&server(SLOT_IN_USE));
        assert!(!r.text_only);
        r.after_error(&server(UNDEFINED_FUNCTION));
        assert!(r.text_only);
    }
}
