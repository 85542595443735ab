//! The durable change log (`mvrefresh.change_log`) and what notifications mean.
//!
//! The log is the truth; a notification is a hint that wakes the daemon early. The daemon reads
//! the log at start-up, after every reconnect and every `catch_up_interval`
//! ([`read_pending`]); a refresh deletes the rows it covered in its own transaction (see
//! [`crate::refresh`]).

use std::time::Duration;

use tokio_postgres::GenericClient;

use crate::debounce::ALL;

/// Longest key accepted from a notification payload.
pub const MAX_KEY_LEN: usize = 1024;

/// Why a notification payload was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("a JSON payload must be an object with field `{0}`")]
    MissingField(String),
    #[error("field `{0}` must be a string or a number")]
    BadField(String),
    #[error("the key is longer than {MAX_KEY_LEN} bytes")]
    TooLong,
    #[error("the key contains control characters")]
    ControlCharacters,
}

impl PayloadError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            PayloadError::MissingField(_) => "missing_field",
            PayloadError::BadField(_) => "bad_field",
            PayloadError::TooLong => "too_long",
            PayloadError::ControlCharacters => "control_characters",
        }
    }
}

/// A key taken from a notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifiedKey {
    pub key: String,
    /// The payload was the seed's JSON form, which no change-log row backs.
    pub json: bool,
}

/// Reads a notification payload: the seed's JSON object (`{"challenge_id": …}`, the field named
/// by `[listener] payload_key`), a bare key, or nothing (everything changed).
pub fn parse_payload(payload: &str, field: &str) -> Result<NotifiedKey, PayloadError> {
    let trimmed = payload.trim();
    if trimmed.is_empty() {
        return Ok(NotifiedKey {
            key: ALL.to_owned(),
            json: false,
        });
    }
    if trimmed.starts_with('{') {
        let value: serde_json::Value = serde_json::from_str(trimmed)
            .map_err(|_| PayloadError::MissingField(field.to_owned()))?;
        let key = match value.get(field) {
            None | Some(serde_json::Value::Null) => {
                return Err(PayloadError::MissingField(field.to_owned()))
            }
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            Some(_) => return Err(PayloadError::BadField(field.to_owned())),
        };
        return check_key(key, true);
    }
    check_key(trimmed.to_owned(), false)
}

fn check_key(key: String, json: bool) -> Result<NotifiedKey, PayloadError> {
    if key.len() > MAX_KEY_LEN {
        return Err(PayloadError::TooLong);
    }
    if key.chars().any(char::is_control) {
        return Err(PayloadError::ControlCharacters);
    }
    if key.is_empty() {
        return Err(PayloadError::MissingField("(empty key)".into()));
    }
    Ok(NotifiedKey { key, json })
}

/// One pending (view, key) in the log, with the ages of its oldest and newest change as the
/// database sees them (so the daemon's and the server's clocks need not agree).
#[derive(Debug, Clone, PartialEq)]
pub struct PendingRow {
    pub view: String,
    pub key: String,
    pub oldest_age: Duration,
    pub newest_age: Duration,
}

/// Everything pending in the change log.
pub async fn read_pending(
    client: &impl GenericClient,
) -> Result<Vec<PendingRow>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT view_name, key,
                    greatest(extract(epoch FROM clock_timestamp() - min(changed_at)), 0)::float8,
                    greatest(extract(epoch FROM clock_timestamp() - max(changed_at)), 0)::float8
             FROM mvrefresh.change_log
             GROUP BY view_name, key",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| PendingRow {
            view: r.get(0),
            key: r.get(1),
            oldest_age: Duration::from_secs_f64(r.get(2)),
            newest_age: Duration::from_secs_f64(r.get(3)),
        })
        .collect())
}

/// Adds the (channel, view) subscriptions that are missing. A newly subscribed view gets an
/// `*` entry in the log: it may have missed changes, so it is refreshed whole once.
pub async fn ensure_subscriptions(
    client: &impl GenericClient,
    pairs: &[(String, String)],
) -> Result<u64, tokio_postgres::Error> {
    let channels: Vec<&str> = pairs.iter().map(|(c, _)| c.as_str()).collect();
    let views: Vec<&str> = pairs.iter().map(|(_, v)| v.as_str()).collect();
    client
        .execute(
            "WITH added AS (
                 INSERT INTO mvrefresh.subscription (channel, view_name)
                 SELECT * FROM unnest($1::text[], $2::text[])
                 ON CONFLICT DO NOTHING
                 RETURNING view_name)
             INSERT INTO mvrefresh.change_log (view_name, key, channel)
             SELECT DISTINCT view_name, '*', 'mvrefresh:subscribed' FROM added",
            &[&channels, &views],
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_key() {
        let k = parse_payload("42", "challenge_id").unwrap();
        assert_eq!(k.key, "42");
        assert!(!k.json);
    }

    #[test]
    fn seed_json_payload() {
        let k = parse_payload(
            r#"{"submission_id":"s1","challenge_id":"c-9","agent_id":"a"}"#,
            "challenge_id",
        )
        .unwrap();
        assert_eq!(k.key, "c-9");
        assert!(k.json);
        let n = parse_payload(r#"{"challenge_id": 7}"#, "challenge_id").unwrap();
        assert_eq!(n.key, "7");
    }

    #[test]
    fn empty_payload_means_everything() {
        assert_eq!(parse_payload("", "x").unwrap().key, ALL);
    }

    #[test]
    fn rejects_bad_payloads() {
        assert_eq!(
            parse_payload(r#"{"agent_id":"a"}"#, "challenge_id"),
            Err(PayloadError::MissingField("challenge_id".into()))
        );
        assert_eq!(
            parse_payload(r#"{"challenge_id":{"a":1}}"#, "challenge_id"),
            Err(PayloadError::BadField("challenge_id".into()))
        );
        assert_eq!(
            parse_payload(r#"{"challenge_id":null}"#, "challenge_id"),
            Err(PayloadError::MissingField("challenge_id".into()))
        );
        assert!(parse_payload("{not json", "challenge_id").is_err());
        assert_eq!(
            parse_payload(&"x".repeat(MAX_KEY_LEN + 1), "k"),
            Err(PayloadError::TooLong)
        );
        assert_eq!(
            parse_payload("a\u{7}b", "k"),
            Err(PayloadError::ControlCharacters)
        );
    }
}
