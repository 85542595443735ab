//! From pgoutput messages to dirty keys: which changes dirty which keys, and a key's text from
//! its binary form.

use std::collections::HashMap;

use super::batch::Batch;
use super::pgoutput::{Message, Value};

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
