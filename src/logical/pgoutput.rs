//! The messages of PostgreSQL's built-in `pgoutput` plugin (protocol version 1; values as text,
//! or in binary with `binary 'true'`), one message per row. Only what the
//! capture needs is kept: relations' column names and types, the tuples of inserts, updates and deletes,
//! truncates, commits' end positions and non-transactional messages' positions (the places the
//! slot may be advanced to).

/// A position in the write-ahead log.
pub type Lsn = u64;

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// A TOASTed value the change did not touch (not sent).
    Unchanged,
    /// The value's text representation.
    Text(Vec<u8>),
    /// The value's binary representation (its type's send function), with `binary 'true'`.
    Binary(Vec<u8>),
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A transaction starts; `commit_time`: when it committed (microseconds since
    /// 2000-01-01 UTC, PostgreSQL's epoch).
    Begin {
        commit_time: i64,
    },
    /// Everything of the transaction is delivered; the slot may move to `end`.
    Commit {
        end: Lsn,
    },
    /// A relation's columns: names and type OIDs.
    Relation {
        oid: u32,
        columns: Vec<String>,
        types: Vec<u32>,
    },
    Insert {
        oid: u32,
        new: Vec<Value>,
    },
    /// `old` is the whole old row with `REPLICA IDENTITY FULL` (`O`), only the identity's columns
    /// when the key changed under another identity (`K`, `key_only`), absent otherwise.
    Update {
        oid: u32,
        old: Option<Vec<Value>>,
        key_only: bool,
        new: Vec<Value>,
    },
    Delete {
        oid: u32,
        old: Vec<Value>,
        key_only: bool,
    },
    Truncate {
        oids: Vec<u32>,
    },
    /// A logical message (`pg_logical_emit_message`); a non-transactional one is a place the slot
    /// may move to: every transaction that committed before it was delivered before it.
    Message {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Vec<u8>,
    },
    /// Types, origins: nothing the capture needs.
    Other,
}

/// A message that is not what protocol version 1 sends.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("pgoutput message `{kind}`: {problem}")]
pub struct ParseError {
    kind: char,
    problem: &'static str,
}

struct Reader<'a> {
    kind: char,
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn err(&self, problem: &'static str) -> ParseError {
        ParseError {
            kind: self.kind,
            problem,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ParseError> {
        if self.rest.len() < n {
            return Err(self.err("truncated"));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, ParseError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, ParseError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, ParseError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, ParseError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A NUL-terminated string.
    fn string(&mut self) -> Result<String, ParseError> {
        let end = self
            .rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.err("unterminated string"))?;
        let s = String::from_utf8_lossy(&self.rest[..end]).into_owned();
        self.rest = &self.rest[end + 1..];
        Ok(s)
    }

    fn tuple(&mut self) -> Result<Vec<Value>, ParseError> {
        let n = self.u16()?;
        let mut values = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            values.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' => {
                    let len = self.u32()? as usize;
                    Value::Text(self.take(len)?.to_vec())
                }
                b'b' => {
                    let len = self.u32()? as usize;
                    Value::Binary(self.take(len)?.to_vec())
                }
                _ => return Err(self.err("unknown tuple value kind")),
            });
        }
        Ok(values)
    }
}

/// Parses one message.
pub fn parse(data: &[u8]) -> Result<Message, ParseError> {
    let Some((&kind, rest)) = data.split_first() else {
        return Err(ParseError {
            kind: ' ',
            problem: "empty",
        });
    };
    let mut r = Reader {
        kind: char::from(kind),
        rest,
    };
    let message = match kind {
        b'B' => {
            let _final = r.u64()?;
            Message::Begin {
                commit_time: r.u64()? as i64,
            }
        }
        b'C' => {
            let _flags = r.u8()?;
            let _commit = r.u64()?;
            let end = r.u64()?;
            Message::Commit { end }
        }
        b'R' => {
            let oid = r.u32()?;
            let _namespace = r.string()?;
            let _name = r.string()?;
            let _identity = r.u8()?;
            let n = r.u16()?;
            let mut columns = Vec::with_capacity(usize::from(n));
            let mut types = Vec::with_capacity(usize::from(n));
            for _ in 0..n {
                let _flags = r.u8()?;
                columns.push(r.string()?);
                types.push(r.u32()?);
                let _typmod = r.u32()?;
            }
            Message::Relation {
                oid,
                columns,
                types,
            }
        }
        b'I' => {
            let oid = r.u32()?;
            if r.u8()? != b'N' {
                return Err(r.err("insert without a new tuple"));
            }
            Message::Insert {
                oid,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let oid = r.u32()?;
            let (old, key_only) = match r.u8()? {
                b'O' => (Some(r.tuple()?), false),
                b'K' => (Some(r.tuple()?), true),
                b'N' => (None, false),
                _ => return Err(r.err("unknown tuple marker")),
            };
            if old.is_some() && r.u8()? != b'N' {
                return Err(r.err("update without a new tuple"));
            }
            Message::Update {
                oid,
                old,
                key_only,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let oid = r.u32()?;
            let key_only = match r.u8()? {
                b'O' => false,
                b'K' => true,
                _ => return Err(r.err("unknown tuple marker")),
            };
            Message::Delete {
                oid,
                old: r.tuple()?,
                key_only,
            }
        }
        b'T' => {
            let n = r.u32()?;
            let _options = r.u8()?;
            let mut oids = Vec::new();
            for _ in 0..n.min(65_536) {
                oids.push(r.u32()?);
            }
            Message::Truncate { oids }
        }
        b'M' => {
            let transactional = r.u8()? & 1 == 1;
            let lsn = r.u64()?;
            let prefix = r.string()?;
            let len = r.u32()? as usize;
            let content = r.take(len)?.to_vec();
            Message::Message {
                transactional,
                lsn,
                prefix,
                content,
            }
        }
        b'Y' | b'O' => Message::Other,
        _ => return Err(r.err("unknown message")),
    };
    Ok(message)
}

/// The position as PostgreSQL writes it.
pub fn format_lsn(lsn: Lsn) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(values: &[Option<&str>]) -> Vec<u8> {
        let mut out = (values.len() as u16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => out.push(b'n'),
                Some("\u{0}unchanged") => out.push(b'u'),
                Some(t) => {
                    out.push(b't');
                    out.extend((t.len() as u32).to_be_bytes());
                    out.extend(t.as_bytes());
                }
            }
        }
        out
    }

    #[test]
    fn relation_insert_update_delete_commit_are_read() {
        let mut rel = vec![b'R'];
        rel.extend(16_384u32.to_be_bytes());
        rel.extend(b"public\0submissions\0");
        rel.push(b'f');
        rel.extend(2u16.to_be_bytes());
        for name in ["id", "challenge_id"] {
            rel.push(0);
            rel.extend(name.as_bytes());
            rel.push(0);
            rel.extend(23u32.to_be_bytes());
            rel.extend(u32::MAX.to_be_bytes());
        }
        assert_eq!(
            parse(&rel).unwrap(),
            Message::Relation {
                oid: 16_384,
                columns: vec!["id".into(), "challenge_id".into()],
                types: vec![23, 23],
            }
        );

        let mut ins = vec![b'I'];
        ins.extend(16_384u32.to_be_bytes());
        ins.push(b'N');
        ins.extend(tuple(&[Some("1"), Some("7")]));
        assert_eq!(
            parse(&ins).unwrap(),
            Message::Insert {
                oid: 16_384,
                new: vec![Value::Text(b"1".to_vec()), Value::Text(b"7".to_vec())]
            }
        );

        let mut upd = vec![b'U'];
        upd.extend(16_384u32.to_be_bytes());
        upd.push(b'O');
        upd.extend(tuple(&[Some("1"), None]));
        upd.push(b'N');
        upd.extend(tuple(&[Some("1"), Some("\u{0}unchanged")]));
        assert_eq!(
            parse(&upd).unwrap(),
            Message::Update {
                oid: 16_384,
                old: Some(vec![Value::Text(b"1".to_vec()), Value::Null]),
                key_only: false,
                new: vec![Value::Text(b"1".to_vec()), Value::Unchanged],
            }
        );

        // With `binary 'true'`: a value in binary.
        let mut bin = vec![b'I'];
        bin.extend(16_384u32.to_be_bytes());
        bin.push(b'N');
        bin.extend(2u16.to_be_bytes());
        bin.push(b'b');
        bin.extend(4u32.to_be_bytes());
        bin.extend(7i32.to_be_bytes());
        bin.push(b'n');
        assert_eq!(
            parse(&bin).unwrap(),
            Message::Insert {
                oid: 16_384,
                new: vec![Value::Binary(7i32.to_be_bytes().to_vec()), Value::Null]
            }
        );

        let mut del = vec![b'D'];
        del.extend(16_384u32.to_be_bytes());
        del.push(b'K');
        del.extend(tuple(&[Some("1")]));
        assert!(matches!(
            parse(&del).unwrap(),
            Message::Delete { key_only: true, .. }
        ));

        let mut commit = vec![b'C', 0];
        commit.extend(0x0001_0000_0010_u64.to_be_bytes());
        commit.extend(0x0001_0000_0040_u64.to_be_bytes());
        commit.extend(0u64.to_be_bytes());
        assert_eq!(
            parse(&commit).unwrap(),
            Message::Commit {
                end: 0x0001_0000_0040
            }
        );
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        for bad in [
            &b""[..],
            b"I",
            b"I\0\0\0\x01X",
            b"C\0\0",
            b"Z",
            b"R\0\0\0\x01public",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let mut short = vec![b'I'];
        short.extend(1u32.to_be_bytes());
        short.push(b'N');
        short.extend(1u16.to_be_bytes());
        short.push(b't');
        short.extend(100u32.to_be_bytes());
        short.extend(b"abc");
        assert!(parse(&short).is_err());
    }

    #[test]
    fn positions_print_as_postgresql_does() {
        assert_eq!(format_lsn(0x1A_016B_3748), "1A/16B3748");
    }
}
