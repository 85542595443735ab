//! What a role that can write the captured table, and nothing more, can and cannot do to the
//! capture: it cannot mark keys for rows it did not change, touch the dirty or pending keys,
//! reuse the capture functions, escape the capture with its own operators, force a refresh by
//! notifying, or fail its own write with an odd key.

use tokio_postgres::Client;

use crate::harness::{self, Cluster};

/// A table `docs` captured by `tenant`, and `mv_docs` refreshed from it.
const DOCS: &str = r#"
[[capture]]
name = "docs"
table = "docs"
channel = "docs_changed"
key = "tenant"
[[view]]
name = "mv_docs"
mode = "concurrently"
channels = ["docs_changed"]
"#;

/// Puts a schema of `w`'s own first on its search_path, before pg_catalog, with each
/// (operator, type, result): a binary operator on that type that always gives that result.
async fn shadow_on_path(w: &Client, operators: &[(&str, &str, bool)]) {
    let schema = format!("evil_{}", harness::unique());
    let mut sql = format!("CREATE SCHEMA {schema};");
    for (i, (op, ty, result)) in operators.iter().enumerate() {
        sql.push_str(&format!(
            "CREATE FUNCTION {schema}.f{i}({ty}, {ty}) RETURNS boolean LANGUAGE sql IMMUTABLE
                 RETURN {result};
             CREATE OPERATOR {schema}.{op} (LEFTARG = {ty}, RIGHTARG = {ty}, FUNCTION = {schema}.f{i});"
        ));
    }
    sql.push_str(&format!("SET search_path = {schema}, pg_catalog, public;"));
    w.batch_execute(&sql).await.unwrap();
}

async fn dirty(c: &Client) -> Vec<String> {
    harness::texts(c, "SELECT key FROM mvrefresh.dirty ORDER BY key").await
}

fn denied(result: Result<impl Sized, tokio_postgres::Error>, what: &str) {
    let e = match result {
        Ok(_) => panic!("{what}: allowed"),
        Err(e) => e,
    };
    let code = e.code().map(|c| c.code().to_owned());
    assert_eq!(
        code.as_deref(),
        Some("42501"),
        "{what}: {}",
        mvrefresh::db::error_text(&e)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_cannot_mark_or_touch_keys_except_by_writing() {
    let (db, admin, _config) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    harness::take_dirty(&admin, None).await;
    let w = harness::writer(&db, &admin).await;
    denied(
        w.execute(
            "SELECT mvrefresh.mark('submission_scored', 'x', ARRAY['*'])",
            &[],
        )
        .await,
        "calling mark",
    );
    denied(
        w.execute(
            "INSERT INTO mvrefresh.dirty (channel, key) VALUES ('submission_scored', '*')",
            &[],
        )
        .await,
        "inserting a dirty key",
    );
    denied(
        w.execute("DELETE FROM mvrefresh.pending", &[]).await,
        "deleting pending keys",
    );
    // Its own table with the capture function as trigger: refused at creation.
    w.batch_execute("CREATE TABLE my_rows (LIKE submissions)")
        .await
        .unwrap();
    denied(
        w.execute(
            "CREATE TRIGGER forge AFTER INSERT ON my_rows FOR EACH ROW
             EXECUTE FUNCTION mvrefresh.capture_submissions()",
            &[],
        )
        .await,
        "reusing the capture function",
    );
    // Its real writes are captured.
    w.execute(
        "INSERT INTO submissions (challenge_id, status, score) VALUES (5, 'scored', 1)",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(dirty(&admin).await, ["5"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writers_own_operators_do_not_change_what_is_captured() {
    let (db, admin, _config) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    harness::take_dirty(&admin, None).await;
    let w = harness::writer(&db, &admin).await;
    // An `=` on text and int that is never true, and a `>` on int that always is (it would make
    // the slow path believe every key remembered), found before pg_catalog's on the writer's
    // path.
    shadow_on_path(
        &w,
        &[
            ("=", "text", false),
            ("=", "int", false),
            (">", "int", true),
        ],
    )
    .await;
    w.execute(
        "INSERT INTO submissions (challenge_id, status, score) VALUES (8, 'scored', 1)",
        &[],
    )
    .await
    .unwrap();
    w.execute(
        "UPDATE submissions SET score = 2, challenge_id = 9 WHERE challenge_id OPERATOR(pg_catalog.=) 8",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(dirty(&admin).await, ["8", "9"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writers_own_equality_cannot_hide_a_key_turning_dirty() {
    let (db, admin, _config) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    admin
        .batch_execute(
            "INSERT INTO submissions (challenge_id, status, score) VALUES (10, 'scored', 1);",
        )
        .await
        .unwrap();
    harness::take_dirty(&admin, None).await;
    // Another key is dirty already.
    admin
        .batch_execute(
            "INSERT INTO submissions (challenge_id, status, score) VALUES (7, 'scored', 1);",
        )
        .await
        .unwrap();
    let w = harness::writer(&db, &admin).await;
    // An `=` on text that is always true, found before pg_catalog's: a lookup in the dirty set
    // that used it would find key 7's row for any key, and record nothing.
    shadow_on_path(&w, &[("=", "text", true)]).await;
    // A new scored row, and a re-score of a row whose key is clean: each the common slow path.
    w.execute(
        "INSERT INTO submissions (challenge_id, status, score) VALUES (8, 'scored', 1)",
        &[],
    )
    .await
    .unwrap();
    w.execute(
        "UPDATE submissions SET score = 2 WHERE challenge_id OPERATOR(pg_catalog.=) 10",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(dirty(&admin).await, ["10", "7", "8"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_too_long_for_an_index_marks_everything_and_never_fails_the_writer() {
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE docs (id serial PRIMARY KEY, tenant text, body text);
         CREATE MATERIALIZED VIEW mv_docs AS
             SELECT md5(tenant) AS tenant_md5, count(*) AS n FROM docs GROUP BY 1;
         CREATE UNIQUE INDEX ON mv_docs (tenant_md5);",
    )
    .await
    .unwrap();
    let config = harness::config(&db.url, DOCS);
    harness::install(&config).await;
    harness::take_dirty(&c, None).await;
    // A key of 3,000 random characters: far beyond what a btree index entry may hold.
    c.execute(
        "INSERT INTO docs (tenant, body)
         SELECT string_agg(md5(g::text), ''), 'x' FROM generate_series(1, 94) g",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(dirty(&c).await, ["*"]);
    let daemon = harness::Daemon::start(config);
    harness::wait_for("the long key's tenant refreshed", || async {
        c.query_one(
            "SELECT (SELECT count(*) FROM mv_docs) = 1
                AND NOT EXISTS (SELECT FROM mvrefresh.pending)
                AND NOT EXISTS (SELECT FROM mvrefresh.dirty)",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    })
    .await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_on_a_captured_channel_forces_nothing() {
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(harness::SCHEMA).await.unwrap();
    c.batch_execute(
        "CREATE TABLE counts_by_key (challenge_id int PRIMARY KEY, n bigint);
         CREATE FUNCTION refresh_counts(keys text[]) RETURNS void LANGUAGE sql AS $$
             DELETE FROM counts_by_key WHERE keys IS NULL OR challenge_id::text = ANY (keys);
             INSERT INTO counts_by_key
             SELECT challenge_id, count(*) FROM submissions
             WHERE status = 'scored' AND (keys IS NULL OR challenge_id::text = ANY (keys))
             GROUP BY challenge_id;
         $$;",
    )
    .await
    .unwrap();
    let config = harness::config(
        &db.url,
        &format!(
            "{}[[view]]\nname = \"counts_by_key\"\nmode = \"incremental\"\n\
             function = \"refresh_counts\"\nchannels = [\"submission_scored\"]\n",
            harness::CAPTURE
        ),
    );
    harness::install(&config).await;
    let daemon = harness::Daemon::start(config);
    daemon.wait_listening().await;
    let whole = || async {
        c.query_one(
            "SELECT count(*) FROM mvrefresh.refresh_history
             WHERE view_name = 'counts_by_key' AND outcome = 'success' AND keys IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
    };
    harness::wait_for(
        "the first (whole) refresh of the new subscription",
        || async { whole().await == 1 },
    )
    .await;
    let w = harness::writer(&db, &c).await;
    let before = daemon.stats.notifications_received.get();
    w.batch_execute(
        r#"NOTIFY submission_scored, '{"challenge_id":"*"}';
           NOTIFY submission_scored, '*';
           NOTIFY submission_scored, '';
           NOTIFY submission_scored, '42';"#,
    )
    .await
    .unwrap();
    let stats = daemon.stats.clone();
    harness::wait_for("the notifications received", || {
        let n = stats.notifications_received.get();
        async move { n >= before + 4 }
    })
    .await;
    // A real change afterwards is refreshed by key; nothing refreshed everything again.
    harness::score(&w, 3, 2).await;
    harness::wait_for("the real change refreshed", || async {
        c.query_opt("SELECT n FROM counts_by_key WHERE challenge_id = 3", &[])
            .await
            .unwrap()
            .is_some_and(|r| r.get::<_, i64>(0) == 2)
    })
    .await;
    assert_eq!(whole().await, 1, "a notification forced a whole refresh");
    let by_key: i64 = c
        .query_one(
            "SELECT count(*) FROM mvrefresh.refresh_history
             WHERE view_name = 'counts_by_key' AND outcome = 'success' AND keys IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(by_key, 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_is_not_utf8_refreshes_its_views_whole() {
    let cluster = Cluster::shared();
    let name = format!("ascii_{}", harness::unique());
    harness::connect(&cluster.url("postgres"))
        .await
        .batch_execute(&format!(
            "CREATE DATABASE {name} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        ))
        .await
        .unwrap();
    let url = cluster.url(&name);
    let c = harness::connect(&url).await;
    c.batch_execute(
        "CREATE TABLE docs (id serial PRIMARY KEY, tenant text, body text);
         CREATE MATERIALIZED VIEW mv_docs AS SELECT tenant, count(*) AS n FROM docs GROUP BY tenant;
         CREATE UNIQUE INDEX ON mv_docs (tenant);",
    )
    .await
    .unwrap();
    let config = harness::config(&url, DOCS);
    harness::install(&config).await;
    let daemon = harness::Daemon::start(config);
    daemon.wait_listening().await;
    // A tenant whose bytes are not UTF-8 (legal in a SQL_ASCII database), then an ordinary one.
    c.batch_execute(r"INSERT INTO docs (tenant, body) VALUES (E'\xff\xfe', 'x')")
        .await
        .unwrap();
    c.batch_execute("INSERT INTO docs (tenant, body) VALUES ('plain', 'x')")
        .await
        .unwrap();
    harness::wait_for("both tenants refreshed, nothing left", || async {
        c.query_one(
            "SELECT (SELECT count(*) FROM mv_docs) = 2
                AND NOT EXISTS (SELECT FROM mvrefresh.pending)
                AND NOT EXISTS (SELECT FROM mvrefresh.dirty)",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    })
    .await;
    daemon.stop().await;
}
