use super::pgoutput::{Lsn, Message, Value};
use super::*;
use crate::debounce::ALL;

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
            types: vec![23, 23, 23, 25],
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

fn insert(id: &str, key: &str) -> Message {
    Message::Insert {
        oid: 1,
        new: vec![t(id), t(key), t("1"), Value::Null],
    }
}

/// One transaction committed at `commit_time`, ending at `end`, delivered into `b`.
fn txn(x: &mut Extractor, b: &mut Batch, commit_time: i64, changes: Vec<Message>, end: Lsn) {
    x.apply(Message::Begin { commit_time }, b);
    for change in changes {
        x.apply(change, b);
    }
    x.apply(Message::Commit { end }, b);
}

#[test]
fn held_keys_bound_the_slot_to_the_position_before_their_first_change() {
    let mut x = extractor();
    let mut b = Batch::starting_at(100);
    txn(&mut x, &mut b, 1, vec![insert("1", "7")], 110);
    txn(
        &mut x,
        &mut b,
        2,
        vec![insert("2", "8"), insert("3", "7")],
        120,
    );
    txn(&mut x, &mut b, 3, vec![insert("4", "9")], 130);

    // 7 and 9 were recorded a moment ago: kept back; 8 is recorded now.
    let held = b.split_off_held(|k| k == "7" || k == "9", 130);
    assert_eq!(b.keys(), ["8"]);
    assert_eq!(held.keys(), ["7", "9"]);
    // 7 turned dirty in the first transaction: the slot stays before it.
    assert_eq!(held.bound(), Some(100));
    // 7 keeps the commit time of its first transaction, older than 8's.
    assert!(held.dirty()[0].1 < b.dirty()[0].1);

    // Nothing held: no bound. A held batch goes on collecting; a new key's bound is where the
    // held batch started, or the last commit delivered into it.
    let mut only_9 = Batch::starting_at(100);
    txn(&mut x, &mut only_9, 3, vec![], 110);
    txn(&mut x, &mut only_9, 4, vec![insert("5", "9")], 120);
    let mut held = only_9.split_off_held(|_| true, 120);
    assert_eq!(only_9.bound(), None);
    assert_eq!(held.bound(), Some(110));
    txn(&mut x, &mut held, 5, vec![insert("6", "10")], 140);
    assert_eq!(held.keys(), ["10", "9"]);
    assert_eq!(held.bound(), Some(110));
    let rest = held.split_off_held(|k| k == "10", 140);
    assert_eq!(held.keys(), ["9"]);
    assert_eq!(rest.bound(), Some(120));
}

#[test]
fn everything_dirty_is_never_held() {
    let mut x = extractor();
    let mut b = Batch::starting_at(100);
    txn(&mut x, &mut b, 1, vec![insert("1", "7")], 110);
    txn(
        &mut x,
        &mut b,
        2,
        vec![Message::Truncate { oids: vec![1] }],
        120,
    );
    // `*` stands for 7 too: the slot may not pass 7's transaction until it is recorded.
    assert_eq!(b.bound(), Some(100));
    let held = b.split_off_held(|_| true, 120);
    assert_eq!(b.keys(), ["*"]);
    assert_eq!(b.bound(), Some(100));
    assert!(held.is_empty());
    assert_eq!(held.bound(), None);
}

#[test]
fn binary_keys_read_as_the_trigger_writes_them() {
    assert_eq!(binary_key_text(21, &(-3i16).to_be_bytes()).unwrap(), "-3");
    assert_eq!(binary_key_text(23, &7i32.to_be_bytes()).unwrap(), "7");
    assert_eq!(
        binary_key_text(20, &i64::MIN.to_be_bytes()).unwrap(),
        "-9223372036854775808"
    );
    let uuid = [
        0x0f, 0x1e, 0x2d, 0x3c, 0x4b, 0x5a, 0x69, 0x78, 0x87, 0x96, 0xa5, 0xb4, 0xc3, 0xd2, 0xe1,
        0xf0,
    ];
    assert_eq!(
        binary_key_text(2950, &uuid).unwrap(),
        "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    );
    assert_eq!(binary_key_text(25, "défi".as_bytes()).unwrap(), "défi");
    // A length or a type it does not read: no key (the batch then marks everything).
    assert_eq!(binary_key_text(23, &[0, 0, 7]), None);
    assert_eq!(binary_key_text(1700, &[0, 1]), None);
    assert_eq!(binary_key_text(25, &[0xff]), None);
    for t in BINARY_KEY_TYPES {
        assert!(t == 25 || t == 1043 || t == 1042 || t == 19 || binary_key_text(t, &[]).is_none());
    }

    // A binary key in a change, and one that cannot be read, through the extractor.
    let mut x = extractor();
    let mut b = Batch::default();
    x.apply(
        Message::Insert {
            oid: 1,
            new: vec![
                Value::Binary(1i32.to_be_bytes().to_vec()),
                Value::Binary(42i32.to_be_bytes().to_vec()),
                Value::Null,
                Value::Null,
            ],
        },
        &mut b,
    );
    assert_eq!(b.keys(), ["42"]);
    x.apply(
        Message::Insert {
            oid: 1,
            new: vec![
                Value::Null,
                Value::Binary(vec![1]),
                Value::Null,
                Value::Null,
            ],
        },
        &mut b,
    );
    assert_eq!(b.keys(), ["*"]);
}
