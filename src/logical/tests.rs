use super::pgoutput::{Message, Value};
use super::*;

fn t(s: &str) -> Value {
    Value::Text(s.as_bytes().to_vec())
}

/// Columns: id, challenge_id (the key), score (compared), note (not compared).
fn extractor() -> Extractor {
    extractor_comparing(Some(vec!["challenge_id".into(), "score".into()]))
}

/// The same table, comparing `compared` (`None`: every column).
fn extractor_comparing(compared: Option<Vec<String>>) -> Extractor {
    let mut x = Extractor::new("challenge_id", compared);
    let mut b = Batch::default();
    x.apply(
        Message::Relation {
            oid: 1,
            columns: ["id", "challenge_id", "score", "note"]
                .map(String::from)
                .to_vec(),
        },
        &mut b,
    );
    x
}

fn update(old: [Value; 4], new: [Value; 4]) -> Message {
    Message::Update {
        oid: 1,
        old: Some(old.to_vec()),
        key_only: false,
        new: new.to_vec(),
    }
}

#[test]
fn inserts_deletes_and_updates_that_matter_mark_their_keys() {
    let mut x = extractor();
    let mut b = Batch::default();
    x.apply(
        Message::Insert {
            oid: 1,
            new: vec![t("1"), t("7"), t("10"), Value::Null],
        },
        &mut b,
    );
    x.apply(
        Message::Delete {
            oid: 1,
            old: vec![t("2"), t("8"), t("10"), Value::Null],
            key_only: false,
        },
        &mut b,
    );
    // Re-scored: its key.
    x.apply(
        update(
            [t("3"), t("9"), t("1"), Value::Null],
            [t("3"), t("9"), t("2"), Value::Null],
        ),
        &mut b,
    );
    // Moved to another key: both.
    x.apply(
        update(
            [t("4"), t("11"), t("1"), Value::Null],
            [t("4"), t("12"), t("1"), Value::Null],
        ),
        &mut b,
    );
    x.apply(Message::Commit { end: 42 }, &mut b);
    assert_eq!(b.keys(), ["11", "12", "7", "8", "9"]);
    assert_eq!(b.advance_to, Some(42));
}

#[test]
fn an_update_of_columns_that_do_not_matter_marks_nothing() {
    let mut x = extractor();
    let mut b = Batch::default();
    x.apply(
        update(
            [t("3"), t("9"), t("1"), t("a")],
            [t("3"), t("9"), t("1"), t("b")],
        ),
        &mut b,
    );
    // A TOASTed value the update did not touch is unchanged.
    x.apply(
        update(
            [t("3"), t("9"), t("1"), t("a")],
            [t("3"), t("9"), Value::Unchanged, t("c")],
        ),
        &mut b,
    );
    assert!(b.is_empty(), "{:?}", b.keys());
    // NULL keys mark nothing.
    x.apply(
        Message::Insert {
            oid: 1,
            new: vec![t("5"), Value::Null, t("1"), Value::Null],
        },
        &mut b,
    );
    assert!(b.is_empty());
}

#[test]
fn what_cannot_be_read_key_by_key_marks_everything() {
    // TRUNCATE.
    let mut x = extractor();
    let mut b = Batch::default();
    x.apply(Message::Truncate { oids: vec![1] }, &mut b);
    assert_eq!(b.keys(), [ALL]);

    // An update without the old row (replica identity not FULL).
    let mut b = Batch::default();
    x.apply(
        Message::Update {
            oid: 1,
            old: None,
            key_only: false,
            new: vec![t("3"), t("9"), t("2"), Value::Null],
        },
        &mut b,
    );
    assert_eq!(b.keys(), [ALL]);
    assert_eq!(b.without_old_row, 1);

    // A change of a relation never described.
    let mut b = Batch::default();
    x.apply(
        Message::Insert {
            oid: 99,
            new: vec![t("1")],
        },
        &mut b,
    );
    assert_eq!(b.keys(), [ALL]);

    // More keys than a batch keeps; and a key that is not UTF-8.
    let mut b = Batch::default();
    for i in 0..=MAX_BATCH_KEYS {
        x.apply(
            Message::Insert {
                oid: 1,
                new: vec![t("1"), t(&i.to_string()), t("1"), Value::Null],
            },
            &mut b,
        );
    }
    assert_eq!(b.keys(), [ALL]);
    let mut b = Batch::default();
    x.apply(
        Message::Insert {
            oid: 1,
            new: vec![t("1"), Value::Text(vec![0xff, 0xfe]), t("1"), Value::Null],
        },
        &mut b,
    );
    assert_eq!(b.keys(), [ALL]);
}

#[test]
fn every_column_is_compared_when_the_predicate_reads_the_whole_row() {
    let mut x = extractor_comparing(None);
    let mut b = Batch::default();
    x.apply(
        update(
            [t("3"), t("9"), t("1"), t("a")],
            [t("3"), t("9"), t("1"), t("b")],
        ),
        &mut b,
    );
    assert_eq!(b.keys(), ["9"]);
}

#[test]
fn non_transactional_messages_are_places_to_advance_to() {
    let mut x = extractor();
    let mut b = Batch::default();
    let message = |transactional, lsn| Message::Message {
        transactional,
        lsn,
        prefix: "any".into(),
        content: vec![],
    };
    x.apply(message(false, 7), &mut b);
    assert_eq!(b.advance_to, Some(7));
    x.apply(message(true, 9), &mut b);
    assert_eq!(b.advance_to, Some(7));
    assert!(b.is_empty());
}

#[test]
fn a_key_is_dirty_since_the_commit_of_the_first_transaction_that_changed_it() {
    let mut x = extractor();
    let mut b = Batch::default();
    let insert = |key: &str| Message::Insert {
        oid: 1,
        new: vec![t("1"), t(key), t("1"), Value::Null],
    };
    // 2026-01-01T00:00:00Z in PostgreSQL's epoch (microseconds since 2000-01-01).
    let t0: i64 = 820_540_800_000_000;
    x.apply(Message::Begin { commit_time: t0 }, &mut b);
    x.apply(insert("7"), &mut b);
    x.apply(
        Message::Begin {
            commit_time: t0 + 1_500_000,
        },
        &mut b,
    );
    x.apply(insert("7"), &mut b);
    x.apply(insert("8"), &mut b);
    let unix = 1_767_225_600.0; // the same instant in Unix seconds
    assert_eq!(
        b.dirty(),
        [
            ("7".to_owned(), Some(unix)),
            ("8".to_owned(), Some(unix + 1.5))
        ]
    );
    // Everything: since the earliest change it stands for.
    x.apply(Message::Truncate { oids: vec![1] }, &mut b);
    assert_eq!(b.dirty(), [(ALL.to_owned(), Some(unix))]);
}
