//! Mode `partitioned`: tables kept equal to their source views by recomputing only the dirty
//! keys, whatever SQL the source runs.

use mvrefresh::plan::Plan;
use tokio_postgres::Client;

use crate::harness::{self, Cluster, Daemon};

/// Sources over `submissions` (plus `teams`, `created_at`): a percentile with HAVING over a
/// CTE and a join, a window function partitioned by the key, and a UTC day (the same in every
/// session time zone).
const SOURCES: &str = "
ALTER TABLE submissions ADD COLUMN team_id int, ADD COLUMN created_at timestamptz NOT NULL DEFAULT now();
CREATE TABLE teams (id int PRIMARY KEY, name text NOT NULL);
INSERT INTO teams VALUES (1, 'red'), (2, 'blue'), (3, 'green');
CREATE VIEW stats_v AS
    WITH s AS (SELECT challenge_id, team_id, score FROM submissions WHERE status = 'scored')
    SELECT s.challenge_id, coalesce(t.name, '-') AS team, count(*) AS n,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY s.score) AS median,
           jsonb_build_object('max', max(s.score), 'min', min(s.score)) AS extremes
    FROM s LEFT JOIN teams AS t ON t.id = s.team_id
    GROUP BY s.challenge_id, coalesce(t.name, '-')
    HAVING count(*) >= 1;
CREATE VIEW ranks_v AS
    SELECT id, challenge_id, score,
           rank() OVER (PARTITION BY challenge_id ORDER BY score DESC NULLS LAST, id) AS rk,
           (created_at AT TIME ZONE 'UTC')::date AS day
    FROM submissions WHERE status = 'scored';
";

const CONFIG: &str = r#"
[[capture]]
name = "submissions"
table = "submissions"
channel = "submission_scored"
key = "challenge_id"
when = "status = 'scored'"
columns = ["score", "team_id", "created_at"]

[[view]]
name = "p_stats"
mode = "partitioned"
source = "stats_v"
key = "challenge_id"
unique = ["challenge_id", "team"]
channels = ["submission_scored"]

[[view]]
name = "p_ranks"
mode = "partitioned"
source = "ranks_v"
key = "challenge_id"
unique = ["id"]
channels = ["submission_scored"]
"#;

/// `per` scored rows (scores 1 to `per`) in each of the challenges 1 to `challenges`.
fn scored(challenges: i32, per: i32) -> String {
    format!(
        "INSERT INTO submissions (challenge_id, status, score)
         SELECT ch, 'scored', g FROM generate_series(1, {challenges}) ch, generate_series(1, {per}) g"
    )
}

/// A database with the sources, rows written by `seed`, and mvrefresh installed with [`CONFIG`]
/// (the partitioned tables created, empty).
async fn setup(seed: &str) -> (harness::TestDb, Client, mvrefresh::config::Config) {
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(harness::SCHEMA).await.unwrap();
    c.batch_execute(SOURCES).await.unwrap();
    c.batch_execute(seed).await.unwrap();
    let config = harness::config(&db.url, CONFIG);
    harness::install(&config).await;
    (db, c, config)
}

/// Whether `table` holds exactly the rows of `source` (as multisets).
async fn equal(c: &Client, table: &str, source: &str) -> bool {
    let sql = format!(
        "SELECT NOT EXISTS (SELECT * FROM {table} EXCEPT ALL SELECT * FROM {source})
            AND NOT EXISTS (SELECT * FROM {source} EXCEPT ALL SELECT * FROM {table})"
    );
    c.query_one(&sql, &[]).await.unwrap().get(0)
}

async fn both_equal(c: &Client) -> bool {
    equal(c, "p_stats", "stats_v").await && equal(c, "p_ranks", "ranks_v").await
}

/// A small deterministic generator (no dependency for ten lines).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// One random change: insert (a NULL key now and then), re-score, move to another key,
/// un-score, delete, change team or day.
async fn random_change(c: &Client, rng: &mut Lcg) {
    let challenge = |r: &mut Lcg| match r.below(10) {
        0 => None,
        k => Some(k as i32),
    };
    let id = 1 + rng.below(60) as i32;
    match rng.below(7) {
        0 | 1 => {
            let ch = challenge(rng);
            let team = rng.below(4) as i32;
            let score = rng.below(100) as f64;
            c.execute(
                "INSERT INTO submissions (challenge_id, status, score, team_id)
                 VALUES ($1, 'scored', $2, nullif($3, 0))",
                &[&ch, &score, &team],
            )
            .await
            .unwrap();
        }
        2 => {
            let score = rng.below(100) as f64;
            c.execute(
                "UPDATE submissions SET score = $2 WHERE id = $1",
                &[&id, &score],
            )
            .await
            .unwrap();
        }
        3 => {
            let ch = challenge(rng);
            c.execute(
                "UPDATE submissions SET challenge_id = $2 WHERE id = $1",
                &[&id, &ch],
            )
            .await
            .unwrap();
        }
        4 => {
            let status = if rng.below(2) == 0 {
                "pending"
            } else {
                "scored"
            };
            c.execute(
                "UPDATE submissions SET status = $2 WHERE id = $1",
                &[&id, &status],
            )
            .await
            .unwrap();
        }
        5 => {
            c.execute("DELETE FROM submissions WHERE id = $1", &[&id])
                .await
                .unwrap();
        }
        _ => {
            let team = 1 + rng.below(3) as i32;
            let days = rng.below(3) as f64;
            c.execute(
                "UPDATE submissions SET team_id = $2,
                        created_at = created_at - make_interval(days => $3::float8::int)
                 WHERE id = $1",
                &[&id, &team, &days],
            )
            .await
            .unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_tables_stay_equal_to_their_sources_under_random_changes() {
    // Rows before the tables exist: the first refresh fills them.
    let (_db, c, config) = setup(&scored(5, 8)).await;
    // The daemon's sessions and this one are in different time zones.
    c.batch_execute("SET TIME ZONE 'Pacific/Auckland'")
        .await
        .unwrap();
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    harness::wait_for("the tables filled", || both_equal(&c)).await;

    let mut rng = Lcg(42);
    for _round in 0..6 {
        for _ in 0..25 {
            random_change(&c, &mut rng).await;
        }
        harness::wait_for("the tables equal to their sources", || both_equal(&c)).await;
    }
    // Refreshes were per key, not whole.
    let keyed: i64 = c
        .query_one(
            "SELECT count(*) FROM mvrefresh.refresh_history
             WHERE view_name = 'p_stats' AND outcome = 'success' AND keys IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(keyed > 0, "no per-key refresh of p_stats");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_that_did_not_change_are_not_rewritten() {
    let (_db, c, config) = setup(
        "INSERT INTO submissions (challenge_id, status, score, team_id)
         VALUES (7, 'scored', 10, 1), (7, 'scored', 20, 2)",
    )
    .await;
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    harness::wait_for("the tables filled", || both_equal(&c)).await;
    let version = |team: &'static str| {
        let c = &c;
        async move {
            let row = c
                .query_one(
                    "SELECT xmin::text FROM p_stats WHERE challenge_id = 7 AND team = $1",
                    &[&team],
                )
                .await
                .unwrap();
            row.get::<_, String>(0)
        }
    };
    let (red, blue) = (version("red").await, version("blue").await);
    // Key 7 is refreshed; only red's row changes.
    c.execute(
        "UPDATE submissions SET score = 15 WHERE challenge_id = 7 AND team_id = 1",
        &[],
    )
    .await
    .unwrap();
    harness::wait_for("the change reflected", || both_equal(&c)).await;
    assert_ne!(version("red").await, red, "the changed row was rewritten");
    assert_eq!(
        version("blue").await,
        blue,
        "the unchanged row was left alone"
    );
    daemon.stop().await;
}

/// Plan problems, as `check` and the daemon report them.
async fn problems(c: &Client, url: &str, body: &str) -> String {
    let config = harness::config(url, &format!("{}{body}", harness::CAPTURE));
    match Plan::load(c, &config).await {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfit_sources_are_refused_naming_the_view_and_the_reason() {
    let (db, c, _) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    c.batch_execute(
        "CREATE VIEW total_v AS
             SELECT challenge_id, count(*) OVER () AS everyone FROM submissions;
         CREATE TABLE p_total AS SELECT * FROM total_v WITH NO DATA;
         CREATE UNIQUE INDEX ON p_total (challenge_id, everyone);
         CREATE VIEW counts_v AS
             SELECT challenge_id, count(*) AS n FROM submissions GROUP BY challenge_id;
         CREATE TABLE p_counts AS SELECT * FROM counts_v WITH NO DATA;
         CREATE UNIQUE INDEX ON p_counts (challenge_id);
         CREATE TABLE p_other (challenge_id int PRIMARY KEY, n text);
         CREATE TABLE p_bare AS SELECT * FROM counts_v WITH NO DATA;",
    )
    .await
    .unwrap();
    let view = |name: &str, source: &str, key: &str| {
        format!(
            "[[view]]\nname = \"{name}\"\nmode = \"partitioned\"\nsource = \"{source}\"\nkey = \"{key}\"\n"
        )
    };
    // A window over everything: the key cannot be pushed below it.
    let p = problems(&c, &db.url, &view("p_total", "total_v", "challenge_id")).await;
    assert!(p.contains("view p_total"), "{p}");
    assert!(
        p.contains("cannot push `challenge_id = …` into the source"),
        "{p}"
    );
    // A missing key column, a missing source, columns that differ, no unique index.
    let p = problems(&c, &db.url, &view("p_counts", "counts_v", "team")).await;
    assert!(
        p.contains("key column `team` is not a column of source counts_v"),
        "{p}"
    );
    let p = problems(&c, &db.url, &view("p_counts", "nowhere_v", "challenge_id")).await;
    assert!(p.contains("source nowhere_v does not exist"), "{p}");
    let p = problems(&c, &db.url, &view("p_other", "counts_v", "challenge_id")).await;
    assert!(p.contains("view p_other: its columns (challenge_id integer, n text) are not those of its source counts_v (challenge_id integer, n bigint)"), "{p}");
    let p = problems(&c, &db.url, &view("p_bare", "counts_v", "challenge_id")).await;
    assert!(p.contains("view p_bare: has no usable unique index"), "{p}");
    assert!(p.contains("unique = [...]"), "{p}");
    // And a fit one passes.
    let p = problems(&c, &db.url, &view("p_counts", "counts_v", "challenge_id")).await;
    assert_eq!(p, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_view_waits_for_the_views_its_source_reads() {
    let (db, c, _) = harness::setup(Cluster::shared(), harness::VIEW_COUNTS).await;
    c.batch_execute(
        "CREATE VIEW big_v AS SELECT challenge_id, n FROM mv_counts WHERE n > 1;
         CREATE TABLE p_big AS SELECT * FROM big_v WITH NO DATA;
         CREATE UNIQUE INDEX ON p_big (challenge_id);",
    )
    .await
    .unwrap();
    let body = format!(
        "{}{}[[view]]\nname = \"p_big\"\nmode = \"partitioned\"\nsource = \"big_v\"\nkey = \"challenge_id\"\n",
        harness::CAPTURE,
        harness::VIEW_COUNTS
    );
    let config = harness::config(&db.url, &body);
    let plan = Plan::load(&c, &config).await.unwrap();
    assert_eq!(plan.describe_order(), "mv_counts → p_big (after mv_counts)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pg_cron_backstop_job_recomputes_the_whole_table() {
    let (_db, c, config) = setup(&scored(3, 4)).await;
    assert!(!both_equal(&c).await, "install leaves the tables empty");
    for v in &config.views {
        c.batch_execute(&mvrefresh::pgcron::job_command(v))
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", v.name));
    }
    assert!(both_equal(&c).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_refreshes_only_the_keys_it_is_given() {
    let (db, c, _) = setup(&scored(3, 4)).await;
    let text = format!(
        "[database]\nurl = \"{}\"\n{CONFIG}\n[[view]]\nname = \"mv_counts\"\nmode = \"concurrently\"\n",
        db.url
    );
    let path = crate::cli::write_config("partitioned-keys.toml", &text);
    let out = crate::cli::mvrefresh(&path, &["refresh", "p_stats", "--key", "2"]);
    assert!(out.status.success(), "{}", crate::cli::text(&out));
    let only_two = equal(
        &c,
        "p_stats",
        "(SELECT * FROM stats_v WHERE challenge_id = 2) AS s",
    )
    .await;
    assert!(only_two, "p_stats holds exactly challenge 2");
    // A whole-view mode has no keys to refresh.
    let out = crate::cli::mvrefresh(&path, &["refresh", "mv_counts", "--key", "2"]);
    assert!(!out.status.success());
    assert!(
        crate::cli::text(&out)
            .contains("mv_counts: --key applies to `incremental` and `partitioned` views"),
        "{}",
        crate::cli::text(&out)
    );
}

/// Backends of this database waiting on a heavyweight lock while running a statement that
/// names `table`.
async fn waiting_on(c: &Client, table: &str) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock'
           AND query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()",
        &[&table],
    )
    .await
    .unwrap()
    .get(0)
}

/// Successful keyed refreshes of `view` recorded after history row `after`: how many, and the
/// keys they covered in all.
async fn keyed_successes(c: &Client, view: &str, after: i64) -> (i64, i64) {
    let row = c
        .query_one(
            "SELECT count(*), coalesce(sum(keys), 0)::int8 FROM mvrefresh.refresh_history
             WHERE view_name = $1 AND id > $2 AND outcome = 'success' AND keys IS NOT NULL",
            &[&view, &after],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_batch_is_refreshed_in_parallel_chunks_and_ends_equal_to_a_full_recompute() {
    let (db, c, config) = setup(&scored(200, 3)).await;
    assert_eq!(config.refresh.concurrency, 2);
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    harness::wait_for("the tables filled", || both_equal(&c)).await;
    let before = harness::last_history_id(&c).await;

    // p_stats held: the chunks' statements wait on it, so both running at once is seen.
    let mut holder = db.client().await;
    let hold = holder.transaction().await.unwrap();
    hold.batch_execute("LOCK TABLE p_stats IN SHARE MODE")
        .await
        .unwrap();
    c.execute("UPDATE submissions SET score = score + 1", &[])
        .await
        .unwrap();
    harness::wait_for("two chunks of p_stats waiting at once", || async {
        waiting_on(&c, "p_stats").await >= 2
    })
    .await;
    hold.rollback().await.unwrap();

    harness::wait_for("the tables equal to their sources", || both_equal(&c)).await;
    let (refreshes, keys) = keyed_successes(&c, "p_stats", before).await;
    assert!(refreshes >= 2, "the batch was split: {refreshes} refreshes");
    assert_eq!(keys, 200, "every key refreshed once, by one chunk");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_chunk_leaves_its_keys_pending_and_the_other_chunk_lands() {
    let db = Cluster::shared().create_db().await;
    let c = db.client().await;
    c.batch_execute(harness::SCHEMA).await.unwrap();
    c.batch_execute(&scored(40, 3)).await.unwrap();
    // A division by zero for any challenge with a score of 13 (integers: sums of floats
    // could differ in their last bits between two plans).
    c.batch_execute(
        "CREATE VIEW fragile_v AS
             SELECT challenge_id, count(*) AS n, sum(100 / (score::int - 13)) AS s
             FROM submissions WHERE status = 'scored' GROUP BY challenge_id",
    )
    .await
    .unwrap();
    let body = format!(
        "{}\n[[view]]\nname = \"p_fragile\"\nmode = \"partitioned\"\nsource = \"fragile_v\"\n\
         key = \"challenge_id\"\nunique = [\"challenge_id\"]\nchannels = [\"submission_scored\"]\n",
        harness::CAPTURE
    );
    let config = harness::config(&db.url, &body);
    harness::install(&config).await;
    let daemon = Daemon::start(config);
    daemon.wait_listening().await;
    harness::wait_for("the table filled", || equal(&c, "p_fragile", "fragile_v")).await;
    let before = harness::last_history_id(&c).await;

    // Every challenge changes in one statement (one batch of 40 keys, split in two); 7 now fails.
    c.execute(
        "UPDATE submissions
         SET score = CASE WHEN challenge_id = 7 AND score = 1 THEN 13 ELSE score + 1 END",
        &[],
    )
    .await
    .unwrap();
    let others = "(SELECT * FROM fragile_v WHERE challenge_id <> 7) AS f";
    harness::wait_for("every other challenge refreshed", || async {
        equal(
            &c,
            "(SELECT * FROM p_fragile WHERE challenge_id <> 7) AS t",
            others,
        )
        .await
    })
    .await;
    // The first attempts: one chunk failed whole, the other landed whole.
    let firsts: Vec<(String, i32)> = c
        .query(
            "SELECT outcome, keys FROM mvrefresh.refresh_history
             WHERE view_name = 'p_fragile' AND id > $1 ORDER BY id",
            &[&before],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let failed = firsts
        .iter()
        .find(|(o, _)| o == "failure")
        .map(|(_, k)| *k)
        .expect("a failed chunk");
    assert!(
        failed > 1 && failed < 40,
        "a chunk, not the batch: {firsts:?}"
    );
    assert!(
        firsts
            .iter()
            .any(|(o, k)| o == "success" && *k == 40 - failed),
        "the other chunk landed whole: {firsts:?}"
    );
    // Challenge 7 keeps its old row and its pending key; nothing of it half-refreshed.
    let n7: i64 = c
        .query_one("SELECT n FROM p_fragile WHERE challenge_id = 7", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n7, 3);
    let pending: i64 = c
        .query_one(
            "SELECT count(*) FROM mvrefresh.pending WHERE view_name = 'p_fragile' AND key = '7'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(pending > 0, "challenge 7 is still pending");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_of_keys_waits_only_for_the_buckets_it_shares() {
    let (db, c, _) = setup(&scored(40, 2)).await;
    let text = format!("[database]\nurl = \"{}\"\n{CONFIG}\n", db.url);
    let path = crate::cli::write_config("partitioned-buckets.toml", &text);
    // Two keys in different buckets.
    let x = "3".to_owned();
    let y = (1..=40)
        .map(|k| k.to_string())
        .find(|k| mvrefresh::partition::bucket(k) != mvrefresh::partition::bucket(&x))
        .unwrap();
    let holder = db.client().await;
    holder
        .execute(
            "SELECT pg_advisory_lock($1, hashtext('p_stats#' || $2::int4))",
            &[
                &mvrefresh::db::BUCKET_LOCK_NAMESPACE,
                &mvrefresh::partition::bucket(&x),
            ],
        )
        .await
        .unwrap();
    let cli = {
        let (path, x) = (path.clone(), x.clone());
        tokio::task::spawn_blocking(move || {
            crate::cli::mvrefresh(&path, &["refresh", "p_stats", "--key", &x])
        })
    };
    harness::wait_for("the refresh of x waiting for its bucket", || async {
        holder
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event = 'advisory'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
    })
    .await;
    // y's bucket is free: its refresh goes while x's waits.
    let out = crate::cli::mvrefresh(&path, &["refresh", "p_stats", "--key", &y]);
    assert!(out.status.success(), "{}", crate::cli::text(&out));
    let only_y = format!("(SELECT * FROM stats_v WHERE challenge_id = {y}) AS s");
    assert!(equal(&c, "p_stats", &only_y).await, "p_stats holds y only");
    holder
        .execute("SELECT pg_advisory_unlock_all()", &[])
        .await
        .unwrap();
    let out = cli.await.unwrap();
    assert!(out.status.success(), "{}", crate::cli::text(&out));
    let both = format!("(SELECT * FROM stats_v WHERE challenge_id IN ({x}, {y})) AS s");
    assert!(equal(&c, "p_stats", &both).await);
}
