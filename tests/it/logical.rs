//! `[[capture]] method = "logical"`: no trigger; the daemon reads the changes from a logical
//! replication slot (the harness's clusters run `wal_level = logical`). Which writes mark which
//! keys, a reader that died between recording and advancing, a dropped slot, two replicas, a
//! server restart, a writer transaction that commits after later ones, uninstall.

use std::sync::Arc;

use mvrefresh::alert::{Alerts, Tracker};
use mvrefresh::config::Config;
use mvrefresh::logical::reader::{Reader, Wiring};
use mvrefresh::stats::Stats;
use tokio_postgres::Client;

use crate::alerts;
use crate::harness::{self, Cluster, Daemon, TestDb};

/// The submissions capture of the other tests, read from a slot of its own (slot names are
/// cluster-wide, the databases are not).
fn capture() -> String {
    harness::CAPTURE.replace(
        "columns = [\"score\"]",
        &format!(
            "columns = [\"score\"]\nmethod = \"logical\"\nslot = \"mvrefresh_it_{}\"\npoll_interval = \"20ms\"",
            harness::unique()
        ),
    )
}

async fn setup_on(cluster: &Cluster, extra: &str) -> (TestDb, Client, Config) {
    setup_schema(cluster, harness::SCHEMA, extra).await
}

async fn setup_schema(cluster: &Cluster, schema: &str, extra: &str) -> (TestDb, Client, Config) {
    let db = cluster.create_db().await;
    let client = db.client().await;
    client.batch_execute(schema).await.unwrap();
    let config = harness::config(
        &db.url,
        &format!("{extra}{}{}", capture(), harness::VIEW_COUNTS),
    );
    harness::install(&config).await;
    (db, client, config)
}

async fn setup() -> (TestDb, Client, Config) {
    setup_on(Cluster::logical(), "").await
}

fn reader(config: &Config) -> Reader {
    reader_holding(config, std::time::Duration::ZERO)
}

/// A reader that keeps back keys it recorded less than `hold` ago.
fn reader_holding(config: &Config, hold: std::time::Duration) -> Reader {
    let stats = Arc::new(Stats::default());
    Reader::new(Wiring {
        db: mvrefresh::db::Db::new(&config.database).unwrap(),
        capture: config.captures[0].clone(),
        alerts: Alerts::log_only(stats.clone()),
        tracker: Tracker::new(std::time::Duration::from_secs(3600), "test"),
        stats,
        recorded: Arc::default(),
        hold,
    })
}

/// Lets `reader` receive everything up to the logical message `content`, once it holds the
/// slot (a reader that just stopped may hold it a moment longer).
async fn catch_up(reader: &mut Reader, content: &[u8]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match reader.catch_up_to_message(content).await {
            Ok(()) if reader.is_reading() => return,
            Ok(()) => {}
            Err(e) => eprintln!("catching up: {e}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the reader never caught up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Where the slot confirmed it has everything up to.
async fn confirmed(client: &Client, config: &Config) -> Option<String> {
    client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&config.captures[0].slot_name()],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

/// Writes a non-transactional logical message `content`: a reader that received it has
/// received everything committed before.
async fn mark_position(c: &Client, content: &str) -> Vec<u8> {
    c.execute(
        "SELECT pg_logical_emit_message(false, 'mvrefresh-test', $1)",
        &[&content],
    )
    .await
    .unwrap();
    content.as_bytes().to_vec()
}

async fn drop_slot(client: &Client, config: &Config) {
    let slot = config.captures[0].slot_name();
    // The reader holds the slot only while it peeks: retry until it is free.
    harness::wait_for("the slot to be dropped", || async {
        client
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                 WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .is_ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_marks_exactly_the_changed_challenges_and_writers_carry_no_trigger() {
    let (_db, c, config) = setup().await;
    marks_exactly_the_changed_challenges(&c, &config, CASES).await;
}

/// The same writes to a partitioned table mark the same keys: the `when` filter applies to
/// each partition, a row moved to another partition marks its old and new key, and a
/// partition's TRUNCATE marks everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_table_marks_the_same_keys_through_its_partitions() {
    let (_db, c, config) = setup_schema(Cluster::logical(), harness::PARTITIONED_SCHEMA, "").await;
    let identities = harness::texts(
        &c,
        "SELECT c.relname || ' ' || c.relreplident::text FROM pg_partition_tree('submissions') AS t
         JOIN pg_class AS c ON c.oid = t.relid ORDER BY 1",
    )
    .await;
    assert_eq!(
        identities,
        [
            "submissions f",
            "submissions_high f",
            "submissions_high_0 f",
            "submissions_high_1 f",
            "submissions_low f",
            "submissions_other f",
        ]
    );
    let mut cases = CASES.to_vec();
    // Into the partition for NULL, moved from one partition to another and back.
    cases.insert(
        cases.len() - 1,
        (
            "UPDATE submissions SET challenge_id = 1 WHERE challenge_id = 10",
            &["1", "10"],
        ),
    );
    cases.insert(cases.len() - 1, ("TRUNCATE submissions_low", &["*"]));
    marks_exactly_the_changed_challenges(&c, &config, &cases).await;
}

/// A partition created after `install` is made ready by the reader (replica identity FULL,
/// the `when` filter): writers can update it, and its changes are filtered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reader_makes_a_partition_created_after_install_ready() {
    use crate::cli::{mvrefresh, text, write_config};
    let db = Cluster::logical().create_db().await;
    let c = db.client().await;
    c.batch_execute(harness::PARTITIONED_SCHEMA).await.unwrap();
    let body = format!("{}{}", capture(), harness::VIEW_COUNTS);
    let config = harness::config(&db.url, &body);
    harness::install(&config).await;
    c.batch_execute(
        "CREATE TABLE submissions_new PARTITION OF submissions FOR VALUES FROM (1000) TO (2000)",
    )
    .await
    .unwrap();
    // Before the reader has run: PostgreSQL refuses an UPDATE on it, and `check` says why.
    c.batch_execute("INSERT INTO submissions (challenge_id) VALUES (1500)")
        .await
        .unwrap();
    let refused = c
        .batch_execute("UPDATE submissions SET note = 'x' WHERE challenge_id = 1500")
        .await
        .unwrap_err();
    assert!(
        mvrefresh::db::error_text(&refused).contains("replica identity"),
        "{refused}"
    );
    let path = write_config(
        &format!("logical-parts-{}.toml", harness::unique()),
        &format!(
            "[database]\nurl = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n{body}",
            db.url
        ),
    );
    let check = mvrefresh(&path, &["check"]);
    assert_eq!(check.status.code(), Some(1), "{}", text(&check));
    assert!(
        text(&check).contains("partitions submissions_new are not ready"),
        "{}",
        text(&check)
    );

    let mut reader = reader(&config);
    let mut n = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        n += 1;
        let mark = mark_position(&c, &format!("wait {n}")).await;
        catch_up(&mut reader, &mark).await;
        let ready = harness::texts(
            &c,
            "SELECT c.relreplident::text || ' ' || EXISTS (
                        SELECT FROM pg_publication_rel AS pr
                        WHERE pr.prrelid = c.oid AND pr.prqual IS NOT NULL)
             FROM pg_class AS c WHERE c.relname = 'submissions_new'",
        )
        .await;
        if ready == ["f true"] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never made ready: {ready:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(mvrefresh(&path, &["check"]).status.success());
    harness::take_dirty(&c, None).await;
    for (sql, expected) in [
        (
            "UPDATE submissions SET note = 'x' WHERE challenge_id = 1500",
            &[][..],
        ),
        (
            "INSERT INTO submissions (challenge_id, status) VALUES (1501, 'pending')",
            &[],
        ),
        (
            "UPDATE submissions SET status = 'scored', score = 1 WHERE challenge_id = 1500",
            &["1500"],
        ),
    ] {
        c.batch_execute(sql).await.unwrap();
        n += 1;
        let mark = mark_position(&c, &format!("case {n}")).await;
        catch_up(&mut reader, &mark).await;
        assert_eq!(harness::take_dirty(&c, None).await, expected, "{sql}");
    }
}

/// Reads the slot until `sql` (one boolean) holds: the reader looks at the table's partitions
/// every few seconds.
async fn read_until(reader: &mut Reader, c: &Client, sql: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    for n in 0.. {
        let mark = mark_position(c, &format!("until {n}")).await;
        catch_up(reader, &mark).await;
        if c.query_one(sql, &[]).await.unwrap().get::<_, bool>(0) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "never: {sql}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A detached partition leaves the publication (its own changes no longer count); an unlogged
/// one is never decoded, so nothing is asked of it and it does not keep another from being
/// made ready. (That attaching and detaching reach the views: `partitions_come_and_go`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_partition_leaves_the_publication_and_an_unlogged_one_is_left_alone() {
    let (_db, c, config) = setup_schema(Cluster::logical(), harness::PARTITIONED_SCHEMA, "").await;
    let mut reader = reader(&config);
    catch_up(&mut reader, &mark_position(&c, "start").await).await;
    c.batch_execute(
        "CREATE UNLOGGED TABLE submissions_scratch PARTITION OF submissions
             FOR VALUES FROM (5000) TO (6000);
         CREATE TABLE submissions_new PARTITION OF submissions FOR VALUES FROM (1000) TO (2000);",
    )
    .await
    .unwrap();
    read_until(
        &mut reader,
        &c,
        "SELECT relreplident = 'f' FROM pg_class WHERE relname = 'submissions_new'",
    )
    .await;
    c.batch_execute("ALTER TABLE submissions DETACH PARTITION submissions_low")
        .await
        .unwrap();
    read_until(
        &mut reader,
        &c,
        "SELECT NOT EXISTS (SELECT FROM pg_publication_rel
                            WHERE prrelid = 'submissions_low'::regclass)",
    )
    .await;
    harness::take_dirty(&c, None).await;
    c.batch_execute("TRUNCATE submissions_low").await.unwrap();
    catch_up(&mut reader, &mark_position(&c, "truncated").await).await;
    assert_eq!(harness::take_dirty(&c, None).await, Vec::<String>::new());
}

/// Partitions attached with rows, detached and dropped reach the views.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_attached_detached_or_dropped_reach_the_views() {
    let (_db, c, config) = setup_schema(Cluster::logical(), harness::PARTITIONED_SCHEMA, "").await;
    harness::partitions_come_and_go(&c, &config).await;
}

/// A partition the reader cannot make ready (another transaction holds a lock on it: the
/// reader waits 100 ms, not as long as that transaction) is alerted once, and resolved once it
/// could.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_the_reader_cannot_make_ready_is_alerted_until_it_can() {
    let sink = alerts::sink().await;
    let alert = alerts::alert_section(&sink);
    let (db, c, config) =
        setup_schema(Cluster::logical(), harness::PARTITIONED_SCHEMA, &alert).await;
    c.batch_execute(
        "CREATE TABLE submissions_new PARTITION OF submissions FOR VALUES FROM (1000) TO (2000)",
    )
    .await
    .unwrap();
    let holder = db.client().await;
    holder
        .batch_execute("BEGIN; SELECT FROM submissions_new;")
        .await
        .unwrap();
    let alerts = |kind: &'static str| alerts::alerts_of(&sink, kind, "partitions:submissions");
    let daemon = Daemon::start(config.clone());
    harness::wait_for("a partitions_not_ready alert", || async {
        !alerts("partitions_not_ready").await.is_empty()
    })
    .await;
    let fired = alerts("partitions_not_ready").await;
    assert_eq!(
        fired[0]["details"]["partitions"],
        serde_json::json!(["submissions_new"])
    );
    assert!(
        fired[0]["error"]
            .as_str()
            .unwrap_or("")
            .contains("lock timeout"),
        "{}",
        fired[0]
    );
    assert!(alerts("partitions_ready").await.is_empty());
    holder.batch_execute("COMMIT").await.unwrap();
    harness::wait_for("a partitions_ready alert", || async {
        !alerts("partitions_ready").await.is_empty()
    })
    .await;
    assert_eq!(
        harness::texts(
            &c,
            "SELECT relreplident::text FROM pg_class WHERE relname = 'submissions_new'"
        )
        .await,
        ["f"]
    );
    // Failing every few seconds until then, but alerted once.
    assert_eq!(alerts("partitions_not_ready").await.len(), 1);
    daemon.stop().await;
}

/// Runs each of `cases` against `submissions` and checks that exactly its keys were marked
/// dirty, since the writer's commit, and that the slot moved past it.
async fn marks_exactly_the_changed_challenges(
    c: &Client,
    config: &Config,
    cases: &[(&str, &[&str])],
) {
    let triggers: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_trigger
             WHERE tgrelid = 'submissions'::regclass AND NOT tgisinternal",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(triggers, 0);
    let mut reader = reader(config);
    // A logical message written after a statement arrives after everything committed before
    // it: the reader has then received the statement's changes, if any.
    let first = mark_position(c, "0").await;
    catch_up(&mut reader, &first).await;
    harness::take_dirty(c, None).await;

    let now = || async {
        c.query_one("SELECT clock_timestamp()", &[])
            .await
            .unwrap()
            .get::<_, std::time::SystemTime>(0)
    };
    for (i, (sql, expected)) in cases.iter().enumerate() {
        let started = now().await;
        c.batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let committed = now().await;
        let before = confirmed(c, config).await;
        let mark = mark_position(c, &(i + 1).to_string()).await;
        catch_up(&mut reader, &mark).await;
        assert!(reader.is_reading());
        // Dirty since the writer's commit, not since the reader recorded it.
        let since: Vec<std::time::SystemTime> = c
            .query("SELECT since FROM mvrefresh.dirty", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(
            since.iter().all(|t| *t >= started && *t <= committed),
            "{sql}: dirty since {since:?}, written between {started:?} and {committed:?}"
        );
        assert_eq!(
            harness::take_dirty(c, None).await,
            *expected,
            "dirty keys after: {sql}"
        );
        // Recorded, so the slot moves past it (once the server has read the reader's status
        // update).
        harness::wait_for(&format!("the slot to move past: {sql}"), || async {
            confirmed(c, config).await != before
        })
        .await;
    }
}

/// Which writes to `submissions` mark which keys (each case after the ones before it).
const CASES: &[(&str, &[&str])] = &[
    (
        "INSERT INTO submissions (id, challenge_id, status, score) VALUES (1, 1, 'scored', 5)",
        &["1"],
    ),
    (
        "INSERT INTO submissions (id, challenge_id, status) VALUES (2, 2, 'pending')",
        &[],
    ),
    (
        "UPDATE submissions SET status = 'scored', score = 3 WHERE id = 2",
        &["2"],
    ),
    ("UPDATE submissions SET score = 4 WHERE id = 2", &["2"]),
    // Values are compared: setting a captured column to the value it had changes nothing.
    ("UPDATE submissions SET score = 4 WHERE id = 2", &[]),
    (
        "UPDATE submissions SET note = 'irrelevant' WHERE id = 1",
        &[],
    ),
    (
        "UPDATE submissions SET status = 'failed' WHERE id = 2",
        &["2"],
    ),
    ("DELETE FROM submissions WHERE id = 2", &[]),
    (
        "UPDATE submissions SET challenge_id = 3 WHERE id = 1",
        &["1", "3"],
    ),
    ("DELETE FROM submissions WHERE id = 1", &["3"]),
    (
        "INSERT INTO submissions (challenge_id, status, score) VALUES (NULL, 'scored', 1)",
        &[],
    ),
    (
        "INSERT INTO submissions (challenge_id, status, score)
         SELECT g % 3 + 10, 'scored', g FROM generate_series(1, 5000) g",
        &["10", "11", "12"],
    ),
    ("TRUNCATE submissions", &["*"]),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_refreshes_from_the_slot_and_a_second_replica_waits_its_turn() {
    let (_db, c, config) = setup().await;
    let a = Daemon::start(config.clone());
    let b = Daemon::start(config.clone());
    a.wait_listening().await;
    b.wait_listening().await;
    for round in 1..=3 {
        harness::score(&c, round, 5).await;
        harness::wait_for("mv_counts to follow the writes", || {
            harness::counts_fresh(&c)
        })
        .await;
    }
    // One replica streams the slot; the other's reader waits for it.
    let slot = config.captures[0].slot_name();
    let holders = || async {
        c.query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE backend_type = 'walsender' AND application_name = 'mvrefresh-logical'
               AND datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
    };
    let active = || async {
        c.query_one(
            "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get::<_, bool>(0)
    };
    assert!(active().await);
    assert_eq!(holders().await, 1);
    // Either one stopping, the other takes over.
    a.stop().await;
    harness::score(&c, 7, 3).await;
    harness::wait_for("mv_counts to follow with one replica", || {
        harness::counts_fresh(&c)
    })
    .await;
    harness::wait_for("the remaining replica to hold the slot", || async {
        holders().await == 1
    })
    .await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_received_but_not_confirmed_are_delivered_again_and_only_once_confirmed() {
    let (_db, c, config) = setup().await;
    harness::take_dirty(&c, None).await;
    c.batch_execute("SET synchronous_commit = on")
        .await
        .unwrap();
    let before = confirmed(&c, &config).await;
    harness::score(&c, 1, 4).await;
    harness::score(&c, 2, 4).await;
    // A reader that died after receiving the changes (and even after recording key 1) and
    // before confirming: what it received is still in the slot.
    let peeked: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL,
                 'proto_version', '1', 'publication_names', 'mvrefresh_submissions')",
            &[&config.captures[0].slot_name()],
        )
        .await
        .unwrap()
        .get(0);
    assert!(peeked >= 8, "{peeked} messages");
    c.execute(
        "INSERT INTO mvrefresh.dirty (channel, key) VALUES ('submission_scored', '1')",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(confirmed(&c, &config).await, before);
    // The next reader receives both again; key 1, dirty already, is not written twice.
    let mut next = reader(&config);
    catch_up(&mut next, &mark_position(&c, "a").await).await;
    let rows: i64 = c
        .query_one("SELECT count(*) FROM mvrefresh.dirty", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 2);
    assert_eq!(harness::take_dirty(&c, None).await, ["1", "2"]);
    harness::wait_for("the server to take the confirmation", || async {
        confirmed(&c, &config).await != before
    })
    .await;
    drop(next);
    // Confirmed: a reader after that receives nothing of it.
    let mut after = reader(&config);
    catch_up(&mut after, &mark_position(&c, "b").await).await;
    assert_eq!(harness::take_dirty(&c, None).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_recorded_a_moment_ago_is_held_back_and_the_slot_waits_for_it() {
    let (_db, c, config) = setup().await;
    harness::take_dirty(&c, None).await;
    c.batch_execute("SET synchronous_commit = on")
        .await
        .unwrap();
    // A hold far longer than the test: what is held stays held.
    let mut held = reader_holding(&config, std::time::Duration::from_secs(3600));
    harness::score(&c, 1, 1).await;
    catch_up(&mut held, &mark_position(&c, "a").await).await;
    assert_eq!(harness::take_dirty(&c, None).await, ["1"]);
    // Challenge 1 again: recorded a moment ago, so held; challenge 2 is new: recorded.
    harness::score(&c, 1, 1).await;
    harness::score(&c, 2, 1).await;
    catch_up(&mut held, &mark_position(&c, "b").await).await;
    assert_eq!(harness::take_dirty(&c, None).await, ["2"]);
    drop(held);
    // Nothing is lost: the slot stayed before 1's second change, so the next reader (holding
    // nothing) receives it again, and 2's behind it.
    let mut next = reader(&config);
    catch_up(&mut next, &mark_position(&c, "c").await).await;
    assert_eq!(harness::take_dirty(&c, None).await, ["1", "2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_key_is_written_once_its_hold_has_passed_and_the_slot_moves_on() {
    let (_db, c, config) = setup().await;
    c.batch_execute("SET synchronous_commit = on")
        .await
        .unwrap();
    let mut r = reader_holding(&config, std::time::Duration::from_millis(200));
    harness::score(&c, 1, 1).await;
    catch_up(&mut r, &mark_position(&c, "first").await).await;
    harness::take_dirty(&c, None).await;
    // Challenge 1 again, at once: held (unless this machine took 200 ms to get here).
    harness::score(&c, 1, 1).await;
    let after: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    // The reader reads on: the key is written once its hold has passed, and the slot moves
    // past its change.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut written = Vec::new();
    for n in 0.. {
        catch_up(&mut r, &mark_position(&c, &format!("poll {n}")).await).await;
        written.extend(harness::take_dirty(&c, None).await);
        let past: bool = c
            .query_one(
                "SELECT $1::text::pg_lsn >= $2::text::pg_lsn",
                &[&confirmed(&c, &config).await, &after],
            )
            .await
            .unwrap()
            .get(0);
        if written.contains(&"1".to_owned()) && past {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the held key was never written (written: {written:?}) or the slot never moved past it"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_read_in_binary_are_the_text_the_trigger_writes() {
    // Keys of each type the reader reads in binary (no output function in the walsender),
    // recorded as `key::text`, as a trigger writes them; a table with a column that cannot be
    // sent in binary (an array of a type without a send function) is read as text.
    for (ty, values, extra, binary) in [
        (
            "uuid",
            "'0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0', '00000000-0000-0000-0000-000000000000'",
            "",
            true,
        ),
        ("int2", "-32768, 7", "", true),
        ("int4", "-2147483648, 42", "", true),
        ("int8", "-9223372036854775808, 42", "", true),
        ("text", "'défi', 'a b'", "", true),
        ("varchar(8)", "'défi', ''", "", true),
        ("name", "'défi', 'n'", "", true),
        ("char(4)", "'ab', 'abcd', 'a\tb'", "", true),
        (
            "int4",
            "1, 2",
            ", acl aclitem[] DEFAULT acldefault('r', 10)",
            false,
        ),
        // Read as text, a character(n) key is trimmed as `key::text` trims it too.
        (
            "char(4)",
            "'ab', 'a\\tb'",
            ", acl aclitem[] DEFAULT acldefault('r', 10)",
            false,
        ),
    ] {
        let db = Cluster::logical().create_db().await;
        let c = db.client().await;
        c.batch_execute(&format!(
            "CREATE TABLE keyed (id serial PRIMARY KEY, k {ty}, v int{extra});
             CREATE MATERIALIZED VIEW mv_keyed AS SELECT k, count(*) AS n FROM keyed GROUP BY k;
             CREATE UNIQUE INDEX ON mv_keyed (k)"
        ))
        .await
        .unwrap();
        let config = harness::config(
            &db.url,
            &format!(
                r#"
[[capture]]
name = "keyed"
table = "keyed"
channel = "keyed_changed"
key = "k"
columns = ["v"]
method = "logical"
slot = "mvrefresh_it_{}"

[[view]]
name = "mv_keyed"
mode = "concurrently"
channels = ["keyed_changed"]
"#,
                harness::unique()
            ),
        );
        harness::install(&config).await;
        harness::take_dirty(&c, None).await; // the slot's creation marked everything
        c.batch_execute(&format!(
            "INSERT INTO keyed (k, v) SELECT x::{ty}, 1 FROM (VALUES ({})) AS v(x)",
            values
                .replace(", ", "), (")
                .replace("\\t", "' || chr(9) || '")
        ))
        .await
        .unwrap();
        let mut r = reader(&config);
        catch_up(&mut r, &mark_position(&c, ty).await).await;
        assert_eq!(r.reads_binary(), binary, "{ty}{extra}");
        let expected = harness::texts(&c, "SELECT k::text FROM keyed ORDER BY k::text").await;
        let recorded = harness::texts(
            &c,
            "SELECT key FROM mvrefresh.dirty WHERE channel = 'keyed_changed' ORDER BY key",
        )
        .await;
        assert_eq!(recorded, expected, "{ty}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_slot_is_created_again_with_a_full_resync_and_one_alert() {
    let sink = alerts::sink().await;
    let alert = alerts::alert_section(&sink);
    let (_db, c, config) = setup_on(Cluster::logical(), &alert).await;
    let subject = format!("slot:{}", config.captures[0].slot_name());
    let daemon = Daemon::start(config.clone());
    daemon.wait_listening().await;
    harness::score(&c, 1, 3).await;
    harness::wait_for("mv_counts to follow", || harness::counts_fresh(&c)).await;
    daemon.stop().await;

    // While no daemon runs, the slot goes, and with it the changes written meanwhile.
    drop_slot(&c, &config).await;
    harness::score(&c, 2, 3).await;
    let lost = || async { alerts::alerts_of(&sink, "slot_lost", &subject).await.len() };
    assert_eq!(lost().await, 0);
    let daemon = Daemon::start(config.clone());
    harness::wait_for("a slot_lost alert", || async { lost().await > 0 }).await;
    // Only the resync (every key dirty) can bring challenge 2 in: no slot saw it.
    harness::wait_for("mv_counts to reflect what the lost slot missed", || {
        harness::counts_fresh(&c)
    })
    .await;
    // The new slot delivers.
    harness::score(&c, 3, 3).await;
    harness::wait_for("mv_counts to follow the new slot", || {
        harness::counts_fresh(&c)
    })
    .await;
    assert_eq!(lost().await, 1);

    // Dropped while the daemon streams it (its stream ended first, as a failover would).
    let slot = config.captures[0].slot_name();
    harness::wait_for("the slot to be dropped from under the daemon", || async {
        c.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
             WHERE slot_name = $1 AND active_pid IS NOT NULL",
            &[&slot],
        )
        .await
        .unwrap();
        c.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
             WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .is_ok_and(|n| n == 1)
    })
    .await;
    harness::score(&c, 4, 3).await;
    harness::wait_for("a second slot_lost alert", || async { lost().await == 2 }).await;
    harness::wait_for("mv_counts to follow after the resync", || {
        harness::counts_fresh(&c)
    })
    .await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_commits_after_later_ones_is_reflected() {
    let (db, c, config) = setup().await;
    let daemon = Daemon::start(config.clone());
    daemon.wait_listening().await;
    let slow = db.client().await;
    slow.batch_execute(
        "BEGIN; INSERT INTO submissions (challenge_id, status, score) VALUES (1, 'scored', 100)",
    )
    .await
    .unwrap();
    harness::score(&c, 2, 3).await;
    harness::wait_for("challenge 2 to be reflected", || async {
        c.query_opt("SELECT 1 FROM mv_counts WHERE challenge_id = 2", &[])
            .await
            .unwrap()
            .is_some()
    })
    .await;
    slow.batch_execute("COMMIT").await.unwrap();
    harness::wait_for("the late commit to be reflected", || {
        harness::counts_fresh(&c)
    })
    .await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asynchronous_commits_reach_the_slot_without_waiting_for_the_wal_writer() {
    let cluster = Cluster::new();
    // Asynchronous commits (these clusters' default) are flushed by the WAL writer every 10 s
    // here: the reader has them decoded sooner by flushing the WAL itself.
    let admin = harness::connect(&cluster.url("postgres")).await;
    admin
        .batch_execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
        .await
        .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let (_db, c, config) = setup_on(&cluster, "").await;
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    harness::wait_for("the first refresh", || harness::counts_fresh(&c)).await;
    let before = daemon.stats.logical_wal_flushes.get();
    harness::score(&c, 1, 2).await;
    harness::wait_for("mv_counts to follow", || harness::counts_fresh(&c)).await;
    assert!(
        daemon.stats.logical_wal_flushes.get() > before,
        "the reader flushed the write-ahead log"
    );
    daemon.stop().await;
}

/// The reader's flush makes waiting WAL durable at once: an asynchronous commit's WAL is flushed
/// (hence decodable) when the statement returns, without waiting for the WAL writer. A
/// transaction that only takes an id would not do: PostgreSQL commits it asynchronously too,
/// since it wrote no WAL before its commit record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readers_flush_makes_an_asynchronous_commit_durable_at_once() {
    let cluster = Cluster::new();
    let c = harness::connect(&cluster.url("postgres")).await;
    for step in [
        "ALTER SYSTEM SET wal_writer_delay = '10s'",
        "SELECT pg_reload_conf()",
    ] {
        c.batch_execute(step).await.unwrap();
    }
    c.batch_execute("CREATE TABLE flush_probe (x int); SET synchronous_commit = off")
        .await
        .unwrap();
    let reader = harness::connect(&cluster.url("postgres")).await;
    let lsn_reached = |lsn: String| {
        let c = &c;
        async move {
            c.query_one(
                "SELECT pg_current_wal_flush_lsn() >= $1::text::pg_lsn",
                &[&lsn],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
        }
    };
    // The WAL writer may flush between the commit and the statement (every 10 s here): then
    // the statement finds nothing waiting, and the attempt is made again.
    for _ in 0..20 {
        c.batch_execute("INSERT INTO flush_probe VALUES (1)")
            .await
            .unwrap();
        let commit_end: String = c
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        if lsn_reached(commit_end.clone()).await {
            continue;
        }
        let flushed: bool = reader
            .query_one(mvrefresh::logical::reader::FLUSH_WAL, &[])
            .await
            .unwrap()
            .get(0);
        assert!(
            lsn_reached(commit_end.clone()).await,
            "the asynchronous commit (ending at {commit_end}) is flushed once the statement \
             returns (it said it flushed: {flushed})"
        );
        if flushed {
            return;
        }
    }
    panic!("the WAL writer flushed every asynchronous commit before the statement could");
}

/// A role that may not write logical messages cannot flush the WAL: the reader says so once
/// and reads on (commits then wait for the WAL writer), rather than failing every
/// `poll_interval` and never confirming a position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_may_not_flush_the_wal_reads_on() {
    let db = Cluster::logical().create_db().await;
    let c = db.client().await;
    c.batch_execute(harness::SCHEMA).await.unwrap();
    let body = format!("{}{}", capture(), harness::VIEW_COUNTS);
    let config = harness::config(&db.url, &body);
    harness::install(&config).await;
    let role = format!("reader_{}", harness::unique());
    c.batch_execute(&format!(
        "CREATE ROLE {role} LOGIN REPLICATION;
         GRANT USAGE ON SCHEMA mvrefresh TO {role};
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA mvrefresh TO {role};
         GRANT SELECT ON submissions TO {role};
         REVOKE EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) FROM PUBLIC;"
    ))
    .await
    .unwrap();
    let as_role = harness::config(
        &db.url
            .replace("postgres://postgres@", &format!("postgres://{role}@")),
        &body,
    );
    let mut reader = reader(&as_role);
    let before = confirmed(&c, &config).await;
    harness::take_dirty(&c, None).await;
    harness::score(&c, 7, 1).await;
    catch_up(&mut reader, &mark_position(&c, "after").await).await;
    assert_eq!(harness::take_dirty(&c, None).await, vec!["7".to_owned()]);
    // The confirmation reaches pg_replication_slots once the walsender has read it.
    harness::wait_for("the slot to move past what was recorded", || async {
        confirmed(&c, &config).await != before
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reader_survives_a_server_restart() {
    let cluster = Cluster::new();
    let (db, c, config) = setup_on(&cluster, "").await;
    let daemon = Daemon::start(config.clone());
    daemon.wait_listening().await;
    harness::score(&c, 1, 2).await;
    harness::wait_for("mv_counts to follow", || harness::counts_fresh(&c)).await;
    let reconnects = daemon.stats.listener_reconnects.get();
    cluster.restart();
    daemon.wait_reconnected(reconnects).await;
    let c = db.client().await;
    harness::score(&c, 2, 2).await;
    harness::wait_for("mv_counts to follow after the restart", || {
        harness::counts_fresh(&c)
    })
    .await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_methods_and_uninstall_leave_nothing_behind() {
    let (db, c, config) = setup().await;
    let slot = config.captures[0].slot_name();
    let objects = || async {
        c.query_one(
            "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1),
                    (SELECT count(*) FROM pg_publication WHERE pubname = 'mvrefresh_submissions'),
                    (SELECT count(*) FROM pg_trigger
                     WHERE tgrelid = 'submissions'::regclass AND NOT tgisinternal)",
            &[&slot],
        )
        .await
        .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1), r.get::<_, i64>(2)))
        .unwrap()
    };
    assert_eq!(objects().await, (1, 1, 0));
    // The same capture as a trigger: triggers, no publication, no slot.
    let trigger = harness::config(
        &db.url,
        &format!("{}{}", harness::CAPTURE, harness::VIEW_COUNTS),
    );
    harness::install(&trigger).await;
    assert_eq!(objects().await.1, 0);
    assert_eq!(objects().await.2, 2);
    // And back: the triggers go, the publication and slot are there.
    harness::install(&config).await;
    assert_eq!(objects().await, (1, 1, 0));
    // Uninstall removes the publication and this database's mvrefresh_ slots.
    harness::uninstall(&c).await;
    assert_eq!(objects().await, (0, 0, 0));
    // Writers keep working.
    harness::score(&c, 1, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_what_a_logical_capture_lacks_with_the_fix() {
    use crate::cli::{mvrefresh, text, write_config};
    let db = Cluster::logical().create_db().await;
    let c = db.client().await;
    c.batch_execute(harness::SCHEMA).await.unwrap();
    let slot = format!("mvrefresh_it_{}", harness::unique());
    let body = harness::CAPTURE.replace(
        "columns = [\"score\"]",
        &format!("columns = [\"score\"]\nmethod = \"logical\"\nslot = \"{slot}\""),
    );
    let path = write_config(
        &format!("logical-{slot}.toml"),
        &format!(
            "[database]\nurl = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n{body}{}",
            db.url,
            harness::VIEW_COUNTS
        ),
    );
    let install = mvrefresh(&path, &["install"]);
    assert!(install.status.success(), "{}", text(&install));
    assert!(
        text(&install).contains(&format!("created replication slot {slot}")),
        "{}",
        text(&install)
    );
    let check = mvrefresh(&path, &["check"]);
    assert!(check.status.success(), "{}", text(&check));
    assert!(
        text(&check).contains(&format!("(logical, slot {slot}) installed and current")),
        "{}",
        text(&check)
    );

    c.batch_execute("ALTER TABLE submissions REPLICA IDENTITY DEFAULT")
        .await
        .unwrap();
    c.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .unwrap();
    let check = mvrefresh(&path, &["check"]);
    assert_eq!(check.status.code(), Some(1), "{}", text(&check));
    for wanted in [
        "replica identity is not FULL",
        &format!(
            "replication slot {slot} is missing in this database; fix: run `mvrefresh install`"
        ),
    ] {
        assert!(text(&check).contains(wanted), "{wanted}: {}", text(&check));
    }
    // `install` puts both back; what was written while the slot was gone is covered by
    // marking everything dirty.
    harness::take_dirty(&c, None).await;
    let install = mvrefresh(&path, &["install"]);
    assert!(install.status.success(), "{}", text(&install));
    assert!(mvrefresh(&path, &["check"]).status.success());
    assert_eq!(harness::take_dirty(&c, None).await, ["*"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_replication_connection_is_given_up_and_nothing_is_lost() {
    let (db, c, config) = setup().await;
    let proxy = crate::proxy::Proxy::start(db.port).await;
    let mut via = config.clone();
    via.database.url = db.url_via(proxy.port);
    let daemon = Daemon::start(via);
    daemon.wait_listening().await;
    harness::score(&c, 1, 2).await;
    harness::wait_for("mv_counts to follow", || harness::counts_fresh(&c)).await;
    let streaming = || async {
        c.query_one(
            "SELECT coalesce(max(active_pid), 0) FROM pg_replication_slots WHERE slot_name = $1",
            &[&config.captures[0].slot_name()],
        )
        .await
        .unwrap()
        .get::<_, i32>(0)
    };
    // The views can be fresh (the first refresh after install is whole) before the reader
    // streams.
    harness::wait_for("the reader to stream the slot", || async {
        streaming().await != 0
    })
    .await;
    let before = streaming().await;

    // Every connection of the daemon stalls; writes go on directly.
    proxy.freeze();
    for ch in 2..5 {
        harness::score(&c, ch, 3).await;
    }
    // Only the reader's own watch can notice (the socket stays open): it pings, gives up,
    // and streams again on a new connection once the server has let the old one go.
    harness::wait_for("a new replication connection", || async {
        let now = streaming().await;
        now != 0 && now != before
    })
    .await;
    harness::wait_for("every change to be reflected", || harness::counts_fresh(&c)).await;
    daemon.stop().await;
}
