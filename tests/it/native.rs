//! Capture triggers with mvrefresh_capture (extension/): a row whose keys the session remembers
//! as dirty does not call the capture function. Everything the trigger capture marks, it marks;
//! a session forgets at every collect (even inside a transaction that began before it), on
//! rollback and on a rolled-back savepoint; writers cannot write that memory; captures keep
//! theirs apart; `install` and `check` follow the extension, and move captures off version 1.0.
//! The extension must be installed for the test cluster's PostgreSQL (`scripts/test` builds and
//! installs it).

use std::path::PathBuf;

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

/// The triggers on `table`: name, function, arguments.
async fn triggers(c: &Client, table: &str) -> Vec<(String, String, String)> {
    c.query(
        "SELECT tg.tgname::text, p.proname::text,
                rtrim(replace(encode(tg.tgargs, 'escape'), '\\000', ','), ',')
         FROM pg_trigger AS tg JOIN pg_proc AS p ON p.oid = tg.tgfoid
         WHERE tg.tgrelid = $1::text::regclass AND NOT tg.tgisinternal
         ORDER BY 1",
        &[&table],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// The functions of the triggers on `table`.
async fn trigger_functions(c: &Client, table: &str) -> Vec<String> {
    triggers(c, table).await.into_iter().map(|t| t.1).collect()
}

/// The extension's objects.
async fn members(c: &Client) -> Vec<String> {
    harness::texts(
        c,
        "SELECT pg_describe_object(d.classid, d.objid, d.objsubid) FROM pg_depend AS d
         WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
           AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'mvrefresh_capture')
         ORDER BY 1",
    )
    .await
}

/// The triggers on mvrefresh.dirty that make sessions forget.
async fn forgetting(c: &Client) -> Vec<String> {
    triggers(c, "mvrefresh.dirty")
        .await
        .into_iter()
        .filter(|t| t.1 == "native_dirty_changed")
        .map(|t| t.0)
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

/// `mvrefresh <args>` with the config at `path`, which must succeed: what it printed.
fn succeeds(path: &PathBuf, args: &[&str]) -> String {
    let out = mvrefresh(path, args);
    assert!(out.status.success(), "{args:?}: {}", text(&out));
    text(&out)
}

/// `mvrefresh check` with the config at `path` finds a problem (exit 1) and says `needle`.
fn check_says(path: &PathBuf, needle: &str) {
    let check = mvrefresh(path, &["check"]);
    assert_eq!(check.status.code(), Some(1), "{}", text(&check));
    assert!(text(&check).contains(needle), "{}", text(&check));
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
    let owned = |a: &str, b: &str, c: &str| (a.to_owned(), b.to_owned(), c.to_owned());
    assert_eq!(
        t,
        [
            owned(
                "mvrefresh_capture_submissions",
                "native_capture",
                "mvrefresh.\"capture_submissions\"(),challenge_id"
            ),
            owned(
                "mvrefresh_capture_submissions_truncate",
                "capture_submissions_truncate",
                ""
            ),
        ]
    );
    assert_eq!(
        forgetting(&c).await,
        [
            "mvrefresh_forget$delete",
            "mvrefresh_forget$truncate",
            "mvrefresh_forget$update"
        ]
    );
    marks_exactly_the_changed_challenges(&db.url, &c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remembered_key_does_not_call_the_capture_function() {
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

    // Remembered, then taken by a collect (rows leave mvrefresh.dirty): marked again.
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
async fn a_writer_cannot_write_the_memory_or_make_a_native_trigger() {
    let (db, c, _config) = setup(harness::VIEW_COUNTS).await;
    // USAGE on schema mvrefresh is not needed to write; given so that what is refused below is
    // the function itself.
    let w = writer_seeing_mvrefresh(&db, &c).await;
    harness::take_dirty(&c, None).await;

    // The writer's rows are captured (the capture function runs as its owner).
    harness::score(&w, 8, 3).await;
    w.batch_execute("UPDATE submissions SET score = 1 WHERE challenge_id = 8")
        .await
        .unwrap();
    assert_eq!(harness::take_dirty(&c, None).await, ["8"]);

    // It may not keep a key it never changed, read the epoch, nor make every session forget.
    for sql in [
        "SELECT mvrefresh.native_keep('mvrefresh.capture_submissions()', 9, mvrefresh.native_epoch())",
        "SELECT mvrefresh.native_keep('mvrefresh.capture_submissions()', 9, 1)",
        "SELECT mvrefresh.native_forget()",
    ] {
        let denied = w.batch_execute(sql).await.unwrap_err();
        assert!(
            message(&denied).contains("permission denied for function native_"),
            "{sql}: {denied:?}"
        );
    }
    // Nor point a trigger of its own at a capture function (to run it on rows of its choosing).
    w.batch_execute("CREATE TABLE mine (challenge_id int)")
        .await
        .unwrap();
    let denied = w
        .batch_execute(
            "CREATE TRIGGER t AFTER INSERT ON mine FOR EACH ROW
             EXECUTE FUNCTION mvrefresh.native_capture('mvrefresh.capture_submissions()', 'challenge_id')",
        )
        .await
        .unwrap_err();
    assert!(
        message(&denied).contains("permission denied for function mvrefresh.native_capture"),
        "{denied:?}"
    );
    harness::score(&w, 9, 1).await;
    assert_eq!(harness::take_dirty(&c, None).await, ["9"]);
}

/// Whoever may create a native_capture trigger (the owner of schema mvrefresh) could name any
/// function in it: only a capture function is called, anything else is refused (a function its
/// creator may not execute, one that is not a trigger function, one that would read the
/// trigger's data as something else and crash the server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_trigger_calls_nothing_but_a_capture_function() {
    let (_db, c, _config) = setup(harness::VIEW_COUNTS).await;
    c.batch_execute(
        "CREATE TABLE mine (a int);
         CREATE FUNCTION public.capture_elsewhere() RETURNS trigger LANGUAGE plpgsql
             AS 'BEGIN RETURN NULL; END';",
    )
    .await
    .unwrap();
    for (i, named) in [
        "pg_catalog.pg_switch_wal()",
        "pg_catalog.rank()",
        "mvrefresh.native_capture()",
        "public.capture_elsewhere()",
    ]
    .iter()
    .enumerate()
    {
        c.batch_execute(&format!(
            "CREATE TRIGGER t{i} AFTER INSERT ON mine FOR EACH ROW
             EXECUTE FUNCTION mvrefresh.native_capture('{named}', 'a')"
        ))
        .await
        .unwrap();
        let err = c
            .batch_execute("INSERT INTO mine VALUES (1)")
            .await
            .unwrap_err();
        assert!(
            message(&err).contains("which is not a capture function"),
            "{named}: {err:?}"
        );
        c.batch_execute(&format!("DROP TRIGGER t{i} ON mine"))
            .await
            .unwrap();
    }
    // A capture function owned by another role than the schema's owner is refused too.
    c.batch_execute(
        "CREATE ROLE native_other_owner;
         CREATE FUNCTION mvrefresh.capture_other() RETURNS trigger LANGUAGE plpgsql
             AS 'BEGIN RETURN NULL; END';
         ALTER FUNCTION mvrefresh.capture_other() OWNER TO native_other_owner;
         CREATE TRIGGER t AFTER INSERT ON mine FOR EACH ROW
             EXECUTE FUNCTION mvrefresh.native_capture('mvrefresh.capture_other()', 'a');",
    )
    .await
    .unwrap();
    let err = c
        .batch_execute("INSERT INTO mine VALUES (1)")
        .await
        .unwrap_err();
    assert!(
        message(&err).contains("which is not a capture function"),
        "{err:?}"
    );
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
    assert_eq!(
        triggers(&c, "bouts").await[0],
        (
            "mvrefresh_capture_bouts".to_owned(),
            "native_capture".to_owned(),
            "mvrefresh.\"capture_bouts\"(),challenge_id".to_owned()
        )
    );

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

    // --prune drops the bouts capture; the submissions capture keeps the extension, and so
    // the triggers on mvrefresh.dirty stay.
    let one = harness::config(
        &db.url,
        &format!("{}{}", harness::CAPTURE, harness::VIEW_COUNTS),
    );
    let d = mvrefresh::db::Db::new(&one.database).unwrap();
    let mut client = d.connect_simple("test-install").await.unwrap();
    let steps = mvrefresh::install::script(
        &one,
        mvrefresh::install::Options {
            prune: true,
            ..Default::default()
        },
    );
    mvrefresh::install::run(&mut client, &steps).await.unwrap();
    assert!(triggers(&c, "bouts").await.is_empty());
    assert_eq!(
        trigger_functions(&c, "submissions").await,
        ["native_capture", "capture_submissions_truncate"]
    );
    assert_eq!(forgetting(&c).await.len(), 3);
    harness::score(&c, 2, 1).await;
    assert_eq!(harness::take_dirty(&c, None).await, ["2"]);
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
    succeeds(&path, &["install"]);
    let plain = ["capture_submissions", "capture_submissions_truncate"];
    assert_eq!(trigger_functions(&c, "submissions").await, plain);

    // The extension appears: check says the capture does not use it yet, install moves it on.
    create_extension(&c).await;
    check_says(&path, "installed without mvrefresh_capture");
    succeeds(&path, &["install"]);
    let current = succeeds(&path, &["check"]);
    assert!(
        current.contains("installed and current (with mvrefresh_capture)"),
        "{}",
        current
    );
    assert_eq!(
        trigger_functions(&c, "submissions").await,
        ["native_capture", "capture_submissions_truncate"]
    );
    assert_eq!(forgetting(&c).await.len(), 3);
    // Without the triggers on mvrefresh.dirty, sessions would not forget: check says so.
    c.batch_execute("ALTER TABLE mvrefresh.dirty DISABLE TRIGGER \"mvrefresh_forget$delete\"")
        .await
        .unwrap();
    check_says(&path, "2 of the 3 triggers on mvrefresh.dirty");
    // install enables it again; the same for a trigger that fires only for replication.
    succeeds(&path, &["install"]);
    succeeds(&path, &["check"]);
    c.batch_execute(
        "ALTER TABLE submissions ENABLE REPLICA TRIGGER mvrefresh_capture_submissions;
         ALTER TABLE mvrefresh.dirty ENABLE REPLICA TRIGGER \"mvrefresh_forget$update\"",
    )
    .await
    .unwrap();
    check_says(&path, "1 of 2 triggers installed and enabled");
    succeeds(&path, &["install"]);
    succeeds(&path, &["check"]);

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
    succeeds(&path, &["install"]);
    assert_eq!(trigger_functions(&c, "submissions").await, plain);
    assert!(forgetting(&c).await.is_empty());
    succeeds(&path, &["check"]);
    c.batch_execute("DROP EXTENSION mvrefresh_capture")
        .await
        .unwrap();
    harness::take_dirty(&c, None).await;
    harness::score(&c, 2, 1).await;
    assert_eq!(harness::take_dirty(&c, None).await, ["2"]);
    succeeds(&path, &["check"]);
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

/// A writer whose transaction began before the daemon took its key, holding no lock on the
/// captured table that the hand-over guard waits for (it read the table: a lock, but not one a
/// write takes), must not rely on what it remembered
/// for a write made after the collect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_begun_before_a_collect_forgets_before_it_writes() {
    let (db, c, _config) = setup(harness::VIEW_COUNTS).await;
    let w = db.client().await;
    harness::take_dirty(&c, None).await;
    harness::score(&w, 8, 1).await; // marked and remembered
    w.batch_execute("BEGIN; SELECT count(*) FROM submissions")
        .await
        .unwrap();
    // The daemon collects key 8; a guard taken now has no holder.
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
    // Rows leaving mvrefresh.dirty any other way make sessions forget too.
    for take in [
        "TRUNCATE mvrefresh.dirty",
        "UPDATE mvrefresh.dirty SET key = 'elsewhere'",
    ] {
        harness::score(&w, 8, 1).await;
        c.batch_execute(take).await.unwrap();
        harness::take_dirty(&c, None).await;
        harness::score(&w, 8, 1).await;
        assert_eq!(harness::take_dirty(&c, None).await, ["8"], "after {take}");
    }
}

/// Version 1.0 of the extension (a `WHEN` calling `native_unseen_<slot>` on three triggers) is
/// not used; `check` says how to update it; after the update, install replaces 1.0's triggers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captures_move_off_version_1_0_after_the_update() {
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(harness::SCHEMA).await.unwrap();
    let path = write_config(
        &format!("native-1.0-{}.toml", harness::unique()),
        &config_text(&db.url, harness::VIEW_COUNTS),
    );
    succeeds(&path, &["install"]);
    c.batch_execute("CREATE EXTENSION mvrefresh_capture VERSION '1.0'")
        .await
        .unwrap();
    let warned = succeeds(&path, &["install"]);
    assert!(
        warned.contains("mvrefresh_capture 1.0 is not used"),
        "{}",
        warned
    );
    let plain = ["capture_submissions", "capture_submissions_truncate"];
    assert_eq!(trigger_functions(&c, "submissions").await, plain);
    // What the previous release installed with 1.0: an insert and a delete trigger besides.
    c.batch_execute(
        "CREATE TRIGGER \"mvrefresh_capture_submissions$insert\" AFTER INSERT ON submissions
         FOR EACH ROW WHEN (mvrefresh.native_unseen_0(NEW.challenge_id, NEW.challenge_id))
         EXECUTE FUNCTION mvrefresh.capture_submissions();
         CREATE TRIGGER \"mvrefresh_capture_submissions$delete\" AFTER DELETE ON submissions
         FOR EACH ROW WHEN (mvrefresh.native_unseen_0(OLD.challenge_id, OLD.challenge_id))
         EXECUTE FUNCTION mvrefresh.capture_submissions();",
    )
    .await
    .unwrap();
    check_says(&path, "ALTER EXTENSION mvrefresh_capture UPDATE");
    c.batch_execute("ALTER EXTENSION mvrefresh_capture UPDATE")
        .await
        .unwrap();
    // An updated 1.1 has what a fresh one has (a dump of one restores into the other).
    let (_fresh, f, _) = setup(harness::VIEW_COUNTS).await;
    assert_eq!(members(&c).await, members(&f).await);
    assert!(members(&c).await.len() > 64);
    succeeds(&path, &["install"]);
    assert_eq!(
        trigger_functions(&c, "submissions").await,
        ["native_capture", "capture_submissions_truncate"]
    );
    succeeds(&path, &["check"]);
    harness::take_dirty(&c, None).await;
    harness::score(&c, 4, 2).await;
    c.batch_execute("DELETE FROM submissions WHERE challenge_id = 4")
        .await
        .unwrap();
    assert_eq!(harness::take_dirty(&c, None).await, ["4"]);
}

/// A capture that moves to another channel: what sessions remember for it (dirty on the old
/// channel) must not hide its keys from the new one (install makes every session forget).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capture_moved_to_another_channel_marks_its_keys_there() {
    let (db, c, config) = setup(harness::VIEW_COUNTS).await;
    harness::take_dirty(&c, None).await;
    let w = db.client().await;
    harness::score(&w, 1, 1).await; // remembered, dirty on submission_scored
    let moved = harness::config(
        &db.url,
        &format!("{}{}", harness::CAPTURE, harness::VIEW_COUNTS)
            .replace("submission_scored", "scored_elsewhere"),
    );
    assert_ne!(config.captures[0].channel, moved.captures[0].channel);
    harness::install(&moved).await;
    harness::score(&w, 1, 1).await;
    assert_eq!(
        harness::take_dirty(&c, Some("scored_elsewhere")).await,
        ["1"]
    );
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
    assert_eq!(
        triggers(&c, "odd").await[0],
        (
            "mvrefresh_capture_odd".to_owned(),
            "native_capture".to_owned(),
            "mvrefresh.\"capture_odd\"(),K%ey".to_owned()
        )
    );
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
    let dbname = mvrefresh::db::Db::new(&config.database).unwrap().dbname();
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
    assert_eq!(
        trigger_functions(&c, "submissions").await,
        ["capture_submissions", "capture_submissions_truncate"]
    );
    harness::take_dirty(&c, None).await;
    harness::score(&c, 1, 1).await;
    assert_eq!(harness::take_dirty(&c, None).await, ["1"]);
}
