//! The streaming replication protocol, as much of it as a logical capture needs: a connection
//! in `replication=database` mode (startup, password, MD5 or SCRAM-SHA-256 authentication over
//! the connection [`Db::connect_raw`] opens, TLS included), `START_REPLICATION ... LOGICAL`, then
//! the copy-both stream: `XLogData` (one pgoutput message each) and keepalives from the server,
//! standby status updates (the position the slot may move to) from us.
//!
//! The driver does not speak this protocol; its own message crate (`postgres-protocol`) encodes
//! the frontend messages and computes SCRAM. Streaming (rather than calling
//! `pg_logical_slot_peek_binary_changes` again and again) decodes every record once: a peek
//! starts over from the slot's restart point, which PostgreSQL moves only every few seconds.

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::pgoutput::{format_lsn, Lsn};
use crate::db::{Db, DbError, RawStream};
use crate::sql::{ident, literal};

/// No message of the protocol is larger (a row of 1 GB values is not delivered whole either).
const MAX_FRAME: usize = 1 << 30;
/// Free room in the read buffer before a read.
const READ_AHEAD: usize = 64 * 1024;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Connect(#[from] DbError),
    #[error("replication connection: {0}")]
    Io(#[from] std::io::Error),
    /// An `ErrorResponse`: its SQLSTATE and message.
    #[error("replication connection: {message} (SQLSTATE {code})")]
    Server { code: String, message: String },
    #[error("replication connection: {0}")]
    Protocol(String),
}

/// What the server streams.
#[derive(Debug)]
pub enum Event {
    /// One pgoutput message.
    Data(Bytes),
    /// The server has sent everything up to `end`; `reply`: it wants a status update now.
    Keepalive { end: Lsn, reply: bool },
}

/// A replication connection.
pub struct Replication {
    io: Box<dyn RawStream>,
    input: BytesMut,
    output: BytesMut,
}

impl Replication {
    /// Connects and authenticates as the configured user, as application `app`.
    pub async fn connect(db: &Db, app: &str) -> Result<Replication, StreamError> {
        let (io, params) = db.connect_raw().await?;
        let mut r = Replication {
            io,
            input: BytesMut::with_capacity(8192),
            output: BytesMut::new(),
        };
        frontend::startup_message(
            [
                ("user", params.user.as_str()),
                ("database", params.dbname.as_str()),
                ("application_name", app),
                ("replication", "database"),
                ("client_encoding", "UTF8"),
            ],
            &mut r.output,
        )?;
        r.send().await?;
        r.authenticate(&params.user, params.password.as_deref())
            .await?;
        loop {
            match r.frame().await? {
                (b'Z', _) => return Ok(r),
                (b'E', body) => return Err(server_error(&body)),
                _ => {} // parameters, the backend key
            }
        }
    }

    async fn authenticate(
        &mut self,
        user: &str,
        password: Option<&[u8]>,
    ) -> Result<(), StreamError> {
        let need =
            || StreamError::Protocol("the server asks for a password; none is configured".into());
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (tag, mut body) = self.frame().await?;
            match tag {
                b'R' => {}
                b'E' => return Err(server_error(&body)),
                _ => continue,
            }
            if body.len() < 4 {
                return Err(StreamError::Protocol("short authentication message".into()));
            }
            match body.get_i32() {
                0 => return Ok(()),
                3 => frontend::password_message(password.ok_or_else(need)?, &mut self.output)?,
                5 => {
                    if body.len() < 4 {
                        return Err(StreamError::Protocol("short MD5 salt".into()));
                    }
                    let salt = [body[0], body[1], body[2], body[3]];
                    let hash = postgres_protocol::authentication::md5_hash(
                        user.as_bytes(),
                        password.ok_or_else(need)?,
                        salt,
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.output)?;
                }
                10 => {
                    let offered = body
                        .split(|&b| b == 0)
                        .any(|m| m == SCRAM_SHA_256.as_bytes());
                    if !offered {
                        return Err(StreamError::Protocol(
                            "the server offers no SASL mechanism this client knows (SCRAM-SHA-256)"
                                .into(),
                        ));
                    }
                    let s =
                        ScramSha256::new(password.ok_or_else(need)?, ChannelBinding::unsupported());
                    frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut self.output)?;
                    scram = Some(s);
                }
                11 => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| StreamError::Protocol("SASL out of order".into()))?;
                    s.update(&body)?;
                    frontend::sasl_response(s.message(), &mut self.output)?;
                }
                12 => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| StreamError::Protocol("SASL out of order".into()))?;
                    s.finish(&body)?;
                    continue;
                }
                other => {
                    return Err(StreamError::Protocol(format!(
                        "authentication method {other} is not supported on replication connections"
                    )))
                }
            }
            self.send().await?;
        }
    }

    /// Starts streaming slot `slot` from where it confirmed (`0/0`: the server starts at the
    /// slot's confirmed position), pgoutput protocol 1 for `publication`, with logical messages;
    /// with `binary`, values in binary (their types' send functions: no output function turns a
    /// uuid, a number or a timestamp into text in the walsender).
    pub async fn start(
        &mut self,
        slot: &str,
        publication: &str,
        binary: bool,
    ) -> Result<(), StreamError> {
        let query = format!(
            "START_REPLICATION SLOT {} LOGICAL {} (proto_version '1', publication_names {}, messages 'true'{})",
            ident(slot),
            format_lsn(0),
            literal(&ident(publication)),
            if binary { ", binary 'true'" } else { "" },
        );
        frontend::query(&query, &mut self.output)?;
        self.send().await?;
        loop {
            match self.frame().await? {
                (b'W', _) => return Ok(()),
                (b'E', body) => return Err(server_error(&body)),
                _ => {}
            }
        }
    }

    /// The next message or keepalive. Cancel-safe: a partly read frame stays buffered.
    pub async fn next(&mut self) -> Result<Event, StreamError> {
        loop {
            let (tag, mut body) = self.frame().await?;
            match tag {
                b'd' if body.first() == Some(&b'w') && body.len() >= 25 => {
                    body.advance(25); // 'w', start, end, send time
                    return Ok(Event::Data(body));
                }
                b'd' if body.first() == Some(&b'k') && body.len() >= 18 => {
                    body.advance(1);
                    let end = body.get_u64();
                    let _time = body.get_i64();
                    return Ok(Event::Keepalive {
                        end,
                        reply: body.get_u8() == 1,
                    });
                }
                b'd' => return Err(StreamError::Protocol("unknown copy-both message".into())),
                b'E' => return Err(server_error(&body)),
                b'c' => return Err(StreamError::Protocol("the server ended the stream".into())),
                _ => {} // notices, parameter changes
            }
        }
    }

    /// Tells the server everything up to `lsn` is safely recorded: the slot may move there.
    /// `reply`: the server answers at once with a keepalive (a ping).
    pub async fn confirm(&mut self, lsn: Lsn, reply: bool) -> Result<(), StreamError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0)
            - PG_EPOCH_OFFSET_US;
        let mut update = Vec::with_capacity(34);
        update.push(b'r');
        for _ in 0..3 {
            update.extend(lsn.to_be_bytes()); // written, flushed, applied
        }
        update.extend(now.to_be_bytes());
        update.push(u8::from(reply));
        frontend::CopyData::new(&update[..])?.write(&mut self.output);
        self.send().await
    }

    async fn send(&mut self) -> Result<(), StreamError> {
        self.io.write_all(&self.output).await?;
        self.io.flush().await?;
        self.output.clear();
        Ok(())
    }

    /// One backend message: its tag and body.
    async fn frame(&mut self) -> Result<(u8, Bytes), StreamError> {
        loop {
            if self.input.len() >= 5 {
                let len = u32::from_be_bytes([
                    self.input[1],
                    self.input[2],
                    self.input[3],
                    self.input[4],
                ]) as usize;
                if !(4..=MAX_FRAME).contains(&len) {
                    return Err(StreamError::Protocol(format!("message length {len}")));
                }
                if self.input.len() > len {
                    let mut frame = self.input.split_to(len + 1).freeze();
                    let tag = frame[0];
                    frame.advance(5);
                    return Ok((tag, frame));
                }
                self.input.reserve(len + 1 - self.input.len());
            }
            // Room for whatever has arrived (the walsender sends every message on its own):
            // one read takes many messages, not one header and then one body.
            if self.input.capacity() - self.input.len() < READ_AHEAD / 4 {
                self.input.reserve(READ_AHEAD);
            }
            if self.io.read_buf(&mut self.input).await? == 0 {
                return Err(StreamError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }
}

/// An `ErrorResponse`'s SQLSTATE and message.
fn server_error(body: &[u8]) -> StreamError {
    let (mut code, mut message) = (String::new(), String::new());
    for field in body.split(|&b| b == 0) {
        match field.split_first() {
            Some((b'C', v)) => code = String::from_utf8_lossy(v).into_owned(),
            Some((b'M', v)) => message = String::from_utf8_lossy(v).into_owned(),
            _ => {}
        }
    }
    StreamError::Server { code, message }
}
