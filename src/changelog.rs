//! What a notification means.
//!
//! On a channel fed by a capture, a notification is only a wake-up: the durable `dirty` and
//! `pending` tables say what changed (see [`crate::store`]), and whatever the payload says is
//! ignored, so no role can force a refresh by notifying. On any other channel the payload names
//! the key: the seed's JSON object (`{"challenge_id": …}`, the field named by
//! `[listener] payload_key`), a bare key, or nothing (everything changed).

use crate::debounce::ALL;

/// Longest key accepted from a notification payload.
pub const MAX_KEY_LEN: usize = 1024;

/// Keys of one channel without capture kept between two reads of the listener's inbox; more
/// become "everything".
pub const ALL_KEYS_CAP: usize = 10_000;

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

/// Reads a notification payload: the seed's JSON object (`{"challenge_id": …}`, the field named
/// by `[listener] payload_key`), a bare key, or nothing (everything changed).
pub fn parse_payload(payload: &str, field: &str) -> Result<String, PayloadError> {
    let trimmed = payload.trim();
    if trimmed.is_empty() {
        return Ok(ALL.to_owned());
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
        return check_key(key);
    }
    check_key(trimmed.to_owned())
}

fn check_key(key: String) -> Result<String, PayloadError> {
    if key.len() > MAX_KEY_LEN {
        return Err(PayloadError::TooLong);
    }
    if key.chars().any(char::is_control) {
        return Err(PayloadError::ControlCharacters);
    }
    if key.is_empty() {
        return Err(PayloadError::MissingField("(empty key)".into()));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_key() {
        assert_eq!(parse_payload("42", "challenge_id").unwrap(), "42");
    }

    #[test]
    fn seed_json_payload() {
        let k = parse_payload(
            r#"{"submission_id":"s1","challenge_id":"c-9","agent_id":"a"}"#,
            "challenge_id",
        )
        .unwrap();
        assert_eq!(k, "c-9");
        let n = parse_payload(r#"{"challenge_id": 7}"#, "challenge_id").unwrap();
        assert_eq!(n, "7");
    }

    #[test]
    fn empty_payload_means_everything() {
        assert_eq!(parse_payload("", "x").unwrap(), ALL);
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
