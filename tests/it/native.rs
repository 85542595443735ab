//! Capture triggers with mvrefresh_capture (extension/): a row whose keys the session remembers
//! as dirty does not even queue the trigger. Everything the trigger capture marks, it marks; a
//! session forgets at every collect, on rollback and on a rolled-back savepoint; writers cannot
//! write that memory; captures keep theirs apart; `install` and `check` follow the extension.
//! The extension must be installed for the test cluster's PostgreSQL (`scripts/test` builds and
//! installs it).

use tokio_postgres::Client;

use crate::capture::marks_exactly_the_changed_challenges;
use crate::cli::{config_text, mvrefresh, text, write_config};
use crate::harness::{self, Cluster, TestDb};

/// A database with the test schema, mvrefresh installed, then the extension created and
/// mvrefresh installed again (which moves the capture onto it), and its config.
async fn setup(views: &str) -> (TestDb, Client, mvrefresh::config::Config) {
    let (db, c, config) = harness::setup(Cluster::shared(), views).await;
    create_extension(&c).await;
    harness::install(&config).await;
    (db, c, config)
}

async fn create_extension(c: &Client) {
    c.batch_execute("CREATE EXTENSION mvrefresh_capture")
        .await
        .unwrap_or_else(|e| {
            panic!(
                "CREATE EXTENSION mvrefresh_capture: {e} (scripts/test builds and installs \
                 extension/ for the PostgreSQL the tests use)"
            )
        });
}

/// The capture triggers on `table` and the native function each one's WHEN calls (if any).
async fn triggers(c: &Client, table: &str) -> Vec<(String, Option<String>)> {
    c.query(
        "SELECT tg.tgname::text,
                (SELECT p.proname::text FROM pg_depend AS d JOIN pg_proc AS p ON p.oid = d.refobjid
                 WHERE d.classid = 'pg_trigger'::regclass AND d.objid = tg.oid
                   AND d.refclassid = 'pg_proc'::regclass AND p.proname LIKE 'native\\_unseen\\_%')
         FROM pg_trigger AS tg
         WHERE tg.tgrelid = $1::text::regclass AND NOT tg.tgisinternal
         ORDER BY 1",
        &[&table],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// A writer ([`harness::writer`]) that may also use schema mvrefresh (and so name its functions).
async fn writer_seeing_mvrefresh(db: &TestDb, admin: &Client) -> Client {
    let w = harness::writer(db, admin).await;
    let role: String = w
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    admin
        .batch_execute(&format!("GRANT USAGE ON SCHEMA mvrefresh TO {role}"))
        .await
        .unwrap();
    w
}

/// What the server said.
fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| e.to_string())
}

/// Calls of the capture's trigger function this session counted and has not reported yet (it
/// reports at most once a second, between transactions: compare two readings in a transaction).
async fn trigger_calls(c: &Client) -> i64 {
    c.query_one(
        "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_xact_user_functions
         WHERE funcid = 'mvrefresh.capture_submissions()'::regprocedure",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_native_capture_marks_exactly_what_the_trigger_capture_marks() {
    let (db, c, _config) = setup(harness::VIEW_COUNTS).await;
    let t = triggers(&c, "submissions").await;
    let slot = Some("native_unseen_0".to_owned());
    assert_eq!(
        t,
        [
            ("mvrefresh_capture_submissions".to_owned(), slot.clone()),
            (
                "mvrefresh_capture_submissions$delete".to_owned(),
                slot.clone()
            ),
            ("mvrefresh_capture_submissions$insert".to_owned(), slot),
            ("mvrefresh_capture_submissions_truncate".to_owned(), None),
        ]
    );
    marks_exactly_the_changed_challenges(&db.url, &c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remembered_key_does_not_queue_the_trigger() {
    let (_db, c, _config) = setup(harness::VIEW_COUNTS).await;
    harness::take_dirty(&c, None).await;
    c.batch_execute("BEGIN; SET LOCAL track_functions = 'all'")
        .await
        .unwrap();
    let before = trigger_calls(&c).await;
    // The first row of key 5 runs the trigger, which marks and remembers the key...
    harness::score(&c, 5, 1).await;
    assert_eq!(trigger_calls(&c).await - before, 1);
    // ...then 200 more rows of key 5, inserted, re-scored, un-scored, deleted: none does.
    harness::score(&c, 5, 100).await;
    c.batch_execute(
        "UPDATE submissions SET score = score + 1 WHERE challenge_id = 5;
         UPDATE submissions SET status = 'failed' WHERE challenge_id = 5 AND score > 90;
         DELETE FROM submissions WHERE challenge_id = 5 AND score > 95;",
    )
    .await
    .unwrap();
    assert_eq!(trigger_calls(&c).await - before, 1);
    // Another key runs it once more; a row moving from key 5 to a new key 6 too.
    harness::score(&c, 7, 1).await;
    c.batch_execute(
        "UPDATE submissions SET challenge_id = 6
         WHERE id = (SELECT min(id) FROM submissions WHERE challenge_id = 5)",
    )
    .await
    .unwrap();
    assert_eq!(trigger_calls(&c).await - before, 3);
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(harness::take_dirty(&c, None).await, ["5", "6", "7"]);

    // A key first marked on the way out of `when` (un-scored: no key in the native memory yet)
    // is remembered by the next row that runs the trigger, and then skips it.
    c.batch_execute("BEGIN; SET LOCAL track_functions = 'all'")
        .await
        .unwrap();
    let before = trigger_calls(&c).await;
    c.batch_execute(
        "UPDATE submissions SET status = 'pending' WHERE id = (SELECT min(id) FROM submissions WHERE challenge_id = 7);
         UPDATE submissions SET status = 'scored' WHERE challenge_id = 7;
         UPDATE submissions SET score = 3 WHERE challenge_id = 7;",
    )
    .await
    .unwrap();
    assert_eq!(trigger_calls(&c).await - before, 2);
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(harness::take_dirty(&c, None).await, ["7"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_forgets_at_every_collect_and_on_rollback() {
    let (db, c, _config) = setup(harness::VIEW_COUNTS).await;
    let w = db.client().await;
    harness::take_dirty(&c, None).await;

    // Remembered, then taken by a collect (which moves the generation on): marked again.
    harness::score(&w, 1, 1).await;
    assert_eq!(harness::take_dirty(&c, None).await, ["1"]);
    harness::score(&w, 1, 1).await;
    assert_eq!(harness::take_dirty(&c, None).await, ["1"]);

    // Marked and remembered in a transaction that rolls back: the dirty row is gone, so the
    // memory must be too.
    w.batch_execute("BEGIN").await.unwrap();
    harness::score(&w, 2, 1).await;
    w.batch_execute("ROLLBACK").await.unwrap();
    harness::score(&w, 2, 1).await;
    assert_eq!(harness::take_dirty(&c, None).await, ["2"]);

    // The same in a savepoint rolled back inside a transaction that commits.
    w.batch_execute("BEGIN; SAVEPOINT s").await.unwrap();
    harness::score(&w, 3, 1).await;
    w.batch_execute("ROLLBACK TO SAVEPOINT s").await.unwrap();
    harness::score(&w, 3, 1).await;
    w.batch_execute("COMMIT").await.unwrap();
    assert_eq!(harness::take_dirty(&c, None).await, ["3"]);

    // A writer's own error (a failed statement) rolls its transaction back too.
    w.batch_execute("BEGIN").await.unwrap();
    harness::score(&w, 4, 1).await;
    assert!(w.batch_execute("SELECT 1 / 0").await.is_err());
    w.batch_execute("ROLLBACK").await.unwrap();
    harness::score(&w, 4, 1).await;
    assert_eq!(harness::take_dirty(&c, None).await, ["4"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_cannot_write_the_memory_or_read_the_generation() {
    let (db, c, _config) = setup(harness::VIEW_COUNTS).await;
    // USAGE on schema mvrefresh is not needed to write; given so that what is refused below is
    // the function itself.
    let w = writer_seeing_mvrefresh(&db, &c).await;
    harness::take_dirty(&c, None).await;

    // The writer's rows are captured (its WHEN reads the generation it may not read itself).
    harness::score(&w, 8, 3).await;
    w.batch_execute("UPDATE submissions SET score = 1 WHERE challenge_id = 8")
        .await
        .unwrap();
    assert_eq!(harness::take_dirty(&c, None).await, ["8"]);
    let denied = w
        .query_one("SELECT pg_sequence_last_value('mvrefresh.generation')", &[])
        .await
        .unwrap_err();
    assert!(message(&denied).contains("permission denied"), "{denied:?}");

    // It may ask the memory (its WHEN clauses do) but not write it: a key it never changed
    // cannot be made to look remembered.
    let denied = w
        .batch_execute(
            "SELECT mvrefresh.native_remember('mvrefresh.native_unseen_0(anyelement,anyelement)',
                                              9, pg_sequence_last_value('mvrefresh.generation'))",
        )
        .await
        .unwrap_err();
    assert!(
        message(&denied).contains("permission denied for function native_remember"),
        "{denied:?}"
    );
    let unseen: bool = w
        .query_one("SELECT mvrefresh.native_unseen_0(9, 9)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(unseen);
    harness::score(&w, 9, 1).await;
    assert_eq!(harness::take_dirty(&c, None).await, ["9"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captures_keep_their_memories_apart() {
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(harness::SCHEMA).await.unwrap();
    c.batch_execute("CREATE TABLE bouts (id serial PRIMARY KEY, challenge_id int, winner int)")
        .await
        .unwrap();
    let second = r#"
[[capture]]
name = "bouts"
table = "bouts"
channel = "bout_decided"
key = "challenge_id"
columns = ["winner"]
"#;
    let config = harness::config(
        &db.url,
        &format!("{}{second}{}", harness::CAPTURE, harness::VIEW_COUNTS),
    );
    harness::install(&config).await;
    create_extension(&c).await;
    harness::install(&config).await;
    let slots =
        |t: Vec<(String, Option<String>)>| t.into_iter().filter_map(|(_, s)| s).collect::<Vec<_>>();
    assert_eq!(
        slots(triggers(&c, "submissions").await),
        ["native_unseen_0"; 3]
    );
    assert_eq!(slots(triggers(&c, "bouts").await), ["native_unseen_1"; 3]);

    harness::take_dirty(&c, None).await;
    // Key 1 remembered for submissions must not hide key 1 of bouts.
    c.batch_execute(
        "BEGIN;
         INSERT INTO submissions (challenge_id, status, score) VALUES (1, 'scored', 1);
         INSERT INTO bouts (challenge_id, winner) VALUES (1, 1);
         COMMIT;",
    )
    .await
    .unwrap();
    assert_eq!(
        harness::take_dirty(&c, Some("submission_scored")).await,
        ["1"]
    );
    assert_eq!(harness::take_dirty(&c, Some("bout_decided")).await, ["1"]);

    // A second install keeps each capture on its slot.
    harness::install(&config).await;
    assert_eq!(slots(triggers(&c, "bouts").await), ["native_unseen_1"; 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_and_check_follow_the_extension() {
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(harness::SCHEMA).await.unwrap();
    let path = write_config(
        &format!("native-{}.toml", harness::unique()),
        &config_text(&db.url, harness::VIEW_COUNTS),
    );
    let install = mvrefresh(&path, &["install"]);
    assert!(install.status.success(), "{}", text(&install));
    assert_eq!(triggers(&c, "submissions").await.len(), 2);

    // The extension appears: check says the capture does not use it yet, install moves it on.
    create_extension(&c).await;
    let check = mvrefresh(&path, &["check"]);
    assert_eq!(check.status.code(), Some(1), "{}", text(&check));
    assert!(
        text(&check).contains("installed without mvrefresh_capture"),
        "{}",
        text(&check)
    );
    let install = mvrefresh(&path, &["install"]);
    assert!(install.status.success(), "{}", text(&install));
    let check = mvrefresh(&path, &["check"]);
    assert!(check.status.success(), "{}", text(&check));
    assert!(
        text(&check).contains("installed and current (with mvrefresh_capture)"),
        "{}",
        text(&check)
    );
    assert_eq!(triggers(&c, "submissions").await.len(), 4);

    // The extension cannot be dropped while triggers use it; `native = false` moves the capture
    // off it first, and writers are captured all along.
    let err = c
        .batch_execute("DROP EXTENSION mvrefresh_capture")
        .await
        .unwrap_err();
    assert!(message(&err).contains("depend"), "{err:?}");
    let path = write_config(
        &format!("native-off-{}.toml", harness::unique()),
        &config_text(&db.url, harness::VIEW_COUNTS).replace(
            "columns = [\"score\"]\n",
            "columns = [\"score\"]\nnative = false\n",
        ),
    );
    let install = mvrefresh(&path, &["install"]);
    assert!(install.status.success(), "{}", text(&install));
    assert_eq!(triggers(&c, "submissions").await.len(), 2);
    let check = mvrefresh(&path, &["check"]);
    assert!(check.status.success(), "native = false: {}", text(&check));
    c.batch_execute("DROP EXTENSION mvrefresh_capture")
        .await
        .unwrap();
    harness::take_dirty(&c, None).await;
    harness::score(&c, 2, 1).await;
    assert_eq!(harness::take_dirty(&c, None).await, ["2"]);
    let check = mvrefresh(&path, &["check"]);
    assert!(check.status.success(), "{}", text(&check));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uninstall_drops_the_extension_and_leaves_writers_working() {
    let (_db, c, _config) = setup(harness::VIEW_COUNTS).await;
    harness::uninstall(&c).await;
    let left: i64 = c
        .query_one(
            "SELECT (SELECT count(*) FROM pg_extension WHERE extname = 'mvrefresh_capture')
                  + (SELECT count(*) FROM pg_namespace WHERE nspname = 'mvrefresh')
                  + (SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'mvrefresh%')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    harness::score(&c, 1, 3).await;
    c.batch_execute("UPDATE submissions SET score = 0; DELETE FROM submissions;")
        .await
        .unwrap();
}

/// A writer that asks the memory itself (it has USAGE on schema mvrefresh here) before it writes,
/// holding no lock on the captured table then (so no hand-over guard waits for it), must not
/// make its later write rely on what it read before the daemon took its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_cannot_pin_the_generation_before_it_writes() {
    let (db, c, _config) = setup(harness::VIEW_COUNTS).await;
    let w = writer_seeing_mvrefresh(&db, &c).await;
    harness::take_dirty(&c, None).await;
    harness::score(&w, 8, 1).await; // marked and remembered
    w.batch_execute("BEGIN; SELECT mvrefresh.native_unseen_0(8, 8)")
        .await
        .unwrap();
    // The daemon collects key 8 (new generation); a guard taken now has no holder.
    assert_eq!(harness::take_dirty(&c, None).await, ["8"]);
    let holders: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'relation'
               AND relation = 'submissions'::regclass AND mode = 'RowExclusiveLock'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(holders, 0, "the guard would wait for nobody");
    w.batch_execute("UPDATE submissions SET score = 999 WHERE challenge_id = 8; COMMIT")
        .await
        .unwrap();
    assert_eq!(
        harness::take_dirty(&c, None).await,
        ["8"],
        "the committed change to key 8 is neither dirty nor pending"
    );
}

/// A slot freed by --prune (or native = false, or method = "logical") is taken by a later
/// capture: what sessions remembered under it for the old capture must not hide the new one's
/// keys (install moves the generation on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_slot_does_not_hide_keys_of_the_new_capture() {
    let (db, c, _config) = setup(harness::VIEW_COUNTS).await;
    c.batch_execute("CREATE TABLE bouts (id serial PRIMARY KEY, challenge_id int, winner int)")
        .await
        .unwrap();
    harness::take_dirty(&c, None).await;
    let w = db.client().await;
    harness::score(&w, 1, 1).await; // remembered under native_unseen_0 (capture submissions)
    let bouts = |name: &str, channel: &str| {
        format!(
            "\n[[capture]]\nname = \"{name}\"\ntable = \"bouts\"\nchannel = \"{channel}\"\nkey = \"challenge_id\"\ncolumns = [\"winner\"]\n"
        )
    };
    let view = "\n[[view]]\nname = \"mv_counts\"\nmode = \"concurrently\"\nchannels = [\"bout_decided\", \"bout2\"]\n";
    // Drop the submissions capture (prune); a later install adds a capture, which takes slot 0.
    let one = harness::config(
        &db.url,
        &format!("{}{view}", bouts("bouts", "bout_decided")),
    );
    let db_ = mvrefresh::db::Db::new(&one.database).unwrap();
    let mut client = db_.connect_simple("test-install").await.unwrap();
    let steps = mvrefresh::install::script(
        &one,
        mvrefresh::install::Options {
            prune: true,
            ..Default::default()
        },
    );
    mvrefresh::install::run(&mut client, &steps).await.unwrap();
    let two = harness::config(
        &db.url,
        &format!(
            "{}{}{view}",
            bouts("bouts", "bout_decided"),
            bouts("bouts2", "bout2")
        ),
    );
    harness::install(&two).await;
    assert_eq!(
        triggers(&c, "bouts")
            .await
            .iter()
            .filter(|(_, s)| s.as_deref() == Some("native_unseen_0"))
            .count(),
        3
    );
    w.batch_execute("INSERT INTO bouts (challenge_id, winner) VALUES (1, 7)")
        .await
        .unwrap();
    assert_eq!(harness::take_dirty(&c, Some("bout2")).await, ["1"]);
}

/// Captures `s` and `s_insert` on one table: `s`'s insert trigger must not be `s_insert`'s row
/// trigger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captures_whose_names_share_a_prefix_keep_their_triggers() {
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(harness::SCHEMA).await.unwrap();
    let body = r#"
[[capture]]
name = "s"
table = "submissions"
channel = "chan_s"
key = "challenge_id"

[[capture]]
name = "s_insert"
table = "submissions"
channel = "chan_si"
key = "id"

[[view]]
name = "mv_counts"
mode = "concurrently"
channels = ["chan_s", "chan_si"]
"#;
    let config = harness::config(&db.url, body);
    harness::install(&config).await;
    create_extension(&c).await;
    harness::install(&config).await;
    harness::take_dirty(&c, None).await;
    c.batch_execute("INSERT INTO submissions (challenge_id, status) VALUES (42, 'scored')")
        .await
        .unwrap();
    assert_eq!(harness::take_dirty(&c, Some("chan_s")).await, ["42"]);
}

/// Installed with mvrefresh first on its search_path (names the install writes into the trigger
/// function must not depend on it), and a key column whose name needs quoting and has a `%`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_with_mvrefresh_on_its_search_path_and_an_odd_key_name() {
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(harness::SCHEMA).await.unwrap();
    c.batch_execute("CREATE TABLE odd (id serial PRIMARY KEY, \"K%ey\" int, v int)")
        .await
        .unwrap();
    let body = format!(
        "{}\n[[capture]]\nname = \"odd\"\ntable = \"odd\"\nchannel = \"odd\"\nkey = \"K%ey\"\n{}",
        harness::CAPTURE,
        harness::VIEW_COUNTS
    );
    let url = format!("{}&options=-csearch_path%3Dmvrefresh,public", db.url);
    let config = harness::config(&url, &body);
    harness::install(&config).await;
    create_extension(&c).await;
    harness::install(&config).await;
    assert_eq!(triggers(&c, "odd").await.len(), 4);
    harness::take_dirty(&c, None).await;
    harness::score(&c, 3, 2).await;
    c.batch_execute("INSERT INTO odd (\"K%ey\", v) VALUES (5, 1), (5, 2); UPDATE odd SET v = 3;")
        .await
        .unwrap();
    assert_eq!(
        harness::take_dirty(&c, Some("submission_scored")).await,
        ["3"]
    );
    assert_eq!(harness::take_dirty(&c, Some("odd")).await, ["5"]);
}

/// A role that may only create objects in the database can create the (trusted) extension; it
/// could then drop it with CASCADE, and the capture triggers with it: install does not use an
/// extension owned by anyone but the owner of schema mvrefresh or a superuser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extension_created_by_another_role_is_not_used() {
    let (db, c, config) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    let role = format!("native_dbo_{}", harness::unique());
    let dbname = db
        .url
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    c.batch_execute(&format!(
        "CREATE ROLE {role} LOGIN; GRANT CREATE ON DATABASE {dbname} TO {role};"
    ))
    .await
    .unwrap();
    let other = harness::connect(&db.url.replace("postgres@", &format!("{role}@"))).await;
    other
        .batch_execute("CREATE EXTENSION mvrefresh_capture")
        .await
        .unwrap();
    harness::install(&config).await;
    assert_eq!(triggers(&c, "submissions").await.len(), 2);
    harness::take_dirty(&c, None).await;
    harness::score(&c, 1, 1).await;
    assert_eq!(harness::take_dirty(&c, None).await, ["1"]);
}
