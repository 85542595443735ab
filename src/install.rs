//! `mvrefresh install`: creates or upgrades, in one transaction under an advisory lock, what the
//! daemon needs: its schema (`sql/mvrefresh.sql`), the bundled analytics (`--analytics`), the
//! change-capture triggers of every `[[capture]]`, and the (channel, view) subscriptions of
//! every `[[view]]`. Every step is idempotent: a second run changes nothing. `--pg-cron` then
//! registers the views' schedules as pg_cron jobs, in pg_cron's database and its own
//! transaction ([`crate::pgcron::install_jobs`]).
//!
//! A capture's trigger is statement-level with transition tables, so a statement touching N rows
//! runs it once. A key is dirty when the multiset of its relevant rows' `(key, columns…)` differs
//! before and after the statement; that covers rows inserted already relevant, changed, made
//! irrelevant, deleted, or moved to another key, and ignores updates of other columns.

use tokio_postgres::Client;

use crate::config::{CaptureConfig, Config};
use crate::db::LOCK_NAMESPACE;
use crate::sql::{ident, literal, Relation};

/// The daemon's own schema.
pub const CORE_SQL: &str = include_str!("../sql/mvrefresh.sql");

/// The `schema_version` that [`CORE_SQL`] installs (kept equal by a unit test).
pub const SCHEMA_VERSION: &str = "2";

/// The bundled analytics of SPEC §1, in the order they run.
pub const ANALYTICS_SQL: &[(&str, &str)] = &[
    (
        "sql/analytics/010_operational.sql",
        include_str!("../sql/analytics/010_operational.sql"),
    ),
    (
        "sql/analytics/020_compute.sql",
        include_str!("../sql/analytics/020_compute.sql"),
    ),
    (
        "sql/analytics/030_mv_views.sql",
        include_str!("../sql/analytics/030_mv_views.sql"),
    ),
    (
        "sql/analytics/040_analytics_tables.sql",
        include_str!("../sql/analytics/040_analytics_tables.sql"),
    ),
    (
        "sql/analytics/050_capture_bout_results.sql",
        include_str!("../sql/analytics/050_capture_bout_results.sql"),
    ),
    (
        "sql/analytics/090_sample_data.sql",
        include_str!("../sql/analytics/090_sample_data.sql"),
    ),
];

#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    pub analytics: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("install step `{step}` failed: {message}")]
    Step { step: String, message: String },
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

/// One named piece of the install script.
pub struct Step {
    pub name: String,
    pub sql: String,
}

/// The whole install script, in order.
pub fn script(config: &Config, options: Options) -> Vec<Step> {
    let mut steps = vec![Step {
        name: "sql/mvrefresh.sql".into(),
        sql: CORE_SQL.to_owned(),
    }];
    if options.analytics {
        steps.extend(ANALYTICS_SQL.iter().map(|(name, sql)| Step {
            name: (*name).to_owned(),
            sql: (*sql).to_owned(),
        }));
    }
    for (i, c) in config.captures.iter().enumerate() {
        steps.push(Step {
            name: format!("capture[{i}] ({})", c.name),
            sql: capture_sql(c),
        });
    }
    steps.push(Step {
        name: "captures: drop the ones no longer configured".into(),
        sql: drop_stale_captures_sql(config),
    });
    steps.push(Step {
        name: "subscriptions".into(),
        sql: subscriptions_sql(config),
    });
    steps
}

/// The script as one SQL text, for `--dry-run`.
pub fn render(steps: &[Step]) -> String {
    let mut out = String::from("BEGIN;\n");
    out.push_str(&format!(
        "SELECT pg_advisory_xact_lock({LOCK_NAMESPACE}, 0);\n"
    ));
    for s in steps {
        out.push_str(&format!("\n-- {}\n{}\n", s.name, s.sql.trim_end()));
    }
    out.push_str("\nCOMMIT;\n");
    out
}

/// Runs the script in one transaction under the install advisory lock.
pub async fn run(client: &mut Client, steps: &[Step]) -> Result<(), InstallError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1, 0)", &[&LOCK_NAMESPACE])
        .await?;
    for s in steps {
        tx.batch_execute(&s.sql)
            .await
            .map_err(|e| InstallError::Step {
                step: s.name.clone(),
                message: e
                    .as_db_error()
                    .map(|d| d.message().to_owned())
                    .unwrap_or_else(|| e.to_string()),
            })?;
    }
    tx.commit().await?;
    Ok(())
}

/// The triggers of a capture: (name suffix, event, transition tables). TRUNCATE has none and
/// records the key `*` (everything).
pub const TRIGGERS: [(&str, &str, &str); 4] = [
    ("ins", "INSERT", "NEW TABLE AS new_rows"),
    (
        "upd",
        "UPDATE",
        "OLD TABLE AS old_rows NEW TABLE AS new_rows",
    ),
    ("del", "DELETE", "OLD TABLE AS old_rows"),
    ("trunc", "TRUNCATE", ""),
];

fn function_name(c: &CaptureConfig) -> String {
    format!("mvrefresh.{}", ident(&format!("capture_{}", c.name)))
}

pub fn trigger_name(c: &CaptureConfig, op: &str) -> String {
    format!("mvrefresh_capture_{}_{op}", c.name)
}

/// The capture function and its triggers (transition tables cannot serve a trigger with more
/// than one event).
pub fn capture_sql(c: &CaptureConfig) -> String {
    let table = Relation::parse(&c.table)
        .expect("validated at load")
        .quoted();
    let when = c.when.as_deref().unwrap_or("true");
    let mut cols = vec![format!("({})::text AS k", ident(&c.key))];
    cols.extend(c.columns.iter().map(|col| ident(col)));
    let cols = cols.join(", ");
    let select = |from: &str| format!("SELECT {cols} FROM {from} WHERE ({when})");
    let function = function_name(c);
    let channel = literal(&c.channel);
    let mut sql = format!(
        r#"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
LANGUAGE plpgsql AS $mvrefresh$
DECLARE
    changed text[];
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        changed := ARRAY['*'];
    ELSIF TG_OP = 'INSERT' THEN
        SELECT array_agg(DISTINCT s.k) INTO changed FROM ({new}) AS s;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(DISTINCT s.k) INTO changed FROM ({old}) AS s;
    ELSE
        SELECT array_agg(DISTINCT s.k) INTO changed FROM (
            ({new} EXCEPT ALL {old})
            UNION ALL
            ({old} EXCEPT ALL {new})
        ) AS s;
    END IF;
    IF changed IS NOT NULL THEN
        PERFORM mvrefresh.record_changes({channel}, changed);
    END IF;
    RETURN NULL;
END
$mvrefresh$;
COMMENT ON FUNCTION {function}() IS {comment};
"#,
        new = select("new_rows"),
        old = select("old_rows"),
        comment = literal(&format!(
            "mvrefresh capture `{}`: {} → channel {}",
            c.name, c.table, c.channel
        )),
    );
    for (op, event, referencing) in TRIGGERS {
        let referencing = if referencing.is_empty() {
            String::new()
        } else {
            format!("\n    REFERENCING {referencing}")
        };
        sql.push_str(&format!(
            "CREATE OR REPLACE TRIGGER {} AFTER {event} ON {table}{referencing}\n    FOR EACH STATEMENT EXECUTE FUNCTION {function}();\n",
            ident(&trigger_name(c, op)),
        ));
    }
    // What `check` compares to tell whether the installed capture is current.
    sql.push_str(&format!(
        "INSERT INTO mvrefresh.meta (key, value) VALUES ({}, {})\n    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value\n    WHERE mvrefresh.meta.value <> EXCLUDED.value;\n",
        literal(&fingerprint_key(c)),
        literal(&fingerprint(c))
    ));
    // Plan the comparison once now, so a bad column, predicate or a type without equality
    // fails the install instead of the first write.
    sql.push_str(&format!(
        "EXPLAIN (COSTS OFF) {} EXCEPT ALL {};\n",
        select(&table),
        select(&table)
    ));
    sql
}

/// The `mvrefresh.meta` key holding a capture's fingerprint.
pub fn fingerprint_key(c: &CaptureConfig) -> String {
    format!("capture:{}", c.name)
}

/// A fingerprint of everything a capture's triggers are generated from (64-bit FNV-1a of its
/// definition), so `check` can tell an installed capture that no longer matches the config.
pub fn fingerprint(c: &CaptureConfig) -> String {
    let definition = format!(
        "{}\u{0}{}\u{0}{}\u{0}{}\u{0}{:?}\u{0}{}",
        c.table,
        c.channel,
        c.key,
        c.when.as_deref().unwrap_or(""),
        c.columns,
        TRIGGER_TEMPLATE_VERSION
    );
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in definition.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// Bumped whenever [`capture_sql`] changes what it generates.
const TRIGGER_TEMPLATE_VERSION: u32 = 1;

fn drop_stale_captures_sql(config: &Config) -> String {
    let keep: Vec<String> = config
        .captures
        .iter()
        .map(|c| literal(&format!("capture_{}", c.name)))
        .collect();
    let names: Vec<String> = config.captures.iter().map(|c| literal(&c.name)).collect();
    let keep_names = format!("ARRAY[{}]::text[]", names.join(", "));
    let keep = if keep.is_empty() {
        "ARRAY[]::text[]".to_owned()
    } else {
        format!("ARRAY[{}]", keep.join(", "))
    };
    // A configured capture whose table changed leaves triggers on the old table: those go too.
    let keep_triggers: Vec<String> = config
        .captures
        .iter()
        .flat_map(|c| {
            let table = Relation::parse(&c.table).expect("validated").quoted();
            TRIGGERS.map(|(op, _, _)| {
                format!(
                    "({}::regclass, {})",
                    literal(&table),
                    literal(&trigger_name(c, op))
                )
            })
        })
        .collect();
    let keep_triggers = if keep_triggers.is_empty() {
        "SELECT NULL::regclass, NULL::text WHERE false".to_owned()
    } else {
        format!("VALUES {}", keep_triggers.join(", "))
    };
    format!(
        r#"DO $mvrefresh$
DECLARE
    t record;
BEGIN
    FOR t IN
        SELECT tg.tgrelid::regclass AS rel, tg.tgname
        FROM pg_trigger tg JOIN pg_proc p ON p.oid = tg.tgfoid
        WHERE p.pronamespace = 'mvrefresh'::regnamespace AND p.proname LIKE 'capture\_%'
          AND (tg.tgrelid::regclass, tg.tgname::text) NOT IN ({keep_triggers})
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', t.tgname, t.rel);
    END LOOP;
    FOR t IN
        SELECT p.oid::regprocedure AS fn FROM pg_proc p
        WHERE p.pronamespace = 'mvrefresh'::regnamespace AND p.proname LIKE 'capture\_%'
          AND p.proname <> ALL ({keep})
    LOOP
        EXECUTE format('DROP FUNCTION %s', t.fn);
    END LOOP;
    DELETE FROM mvrefresh.meta
    WHERE key LIKE 'capture:%' AND substr(key, 9) <> ALL ({keep_names});
END
$mvrefresh$;
"#
    )
}

fn subscriptions_sql(config: &Config) -> String {
    let pairs: Vec<String> = config
        .views
        .iter()
        .flat_map(|v| {
            let name = v.relation().to_string();
            v.channels
                .iter()
                .map(move |ch| format!("({}, {})", literal(ch), literal(&name)))
        })
        .collect();
    let desired = if pairs.is_empty() {
        "SELECT NULL::text AS channel, NULL::text AS view_name WHERE false".to_owned()
    } else {
        format!(
            "SELECT * FROM (VALUES {}) AS d(channel, view_name)",
            pairs.join(", ")
        )
    };
    let views: Vec<String> = config
        .views
        .iter()
        .map(|v| literal(&v.relation().to_string()))
        .collect();
    format!(
        r#"CREATE TEMP TABLE mvrefresh_desired ON COMMIT DROP AS {desired};
DELETE FROM mvrefresh.subscription s
WHERE NOT EXISTS (SELECT 1 FROM mvrefresh_desired d
                  WHERE d.channel = s.channel AND d.view_name = s.view_name);
DELETE FROM mvrefresh.change_log WHERE view_name <> ALL (ARRAY[{views}]::text[]);
WITH added AS (
    INSERT INTO mvrefresh.subscription (channel, view_name)
    SELECT channel, view_name FROM mvrefresh_desired
    ON CONFLICT DO NOTHING
    RETURNING view_name)
INSERT INTO mvrefresh.change_log (view_name, key, channel)
SELECT DISTINCT view_name, '*', 'mvrefresh:subscribed' FROM added;
DROP TABLE mvrefresh_desired;
"#,
        views = views.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_version_matches_the_sql() {
        assert!(CORE_SQL.contains(&format!("VALUES ('schema_version', '{SCHEMA_VERSION}')")));
    }

    #[test]
    fn fingerprint_changes_with_the_capture() {
        let c = CaptureConfig {
            name: "x".into(),
            table: "t".into(),
            channel: "c".into(),
            key: "k".into(),
            when: None,
            columns: vec!["a".into()],
        };
        let mut d = c.clone();
        d.columns.push("b".into());
        assert_ne!(fingerprint(&c), fingerprint(&d));
        assert_eq!(fingerprint(&c), fingerprint(&c.clone()));
    }

    #[test]
    fn every_analytics_file_is_installed_in_order() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/sql/analytics");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| format!("sql/analytics/{}", e.unwrap().file_name().to_string_lossy()))
            .filter(|f| f.ends_with(".sql"))
            .collect();
        files.sort();
        let listed: Vec<&str> = ANALYTICS_SQL.iter().map(|(n, _)| *n).collect();
        assert_eq!(listed, files);
    }

    #[test]
    fn capture_sql_quotes_configured_names() {
        let c = CaptureConfig {
            name: "x".into(),
            table: "\"Odd\"\"Table\"".into(),
            channel: "it's".into(),
            key: "k\"ey".into(),
            when: None,
            columns: vec!["a\"b".into()],
        };
        let sql = capture_sql(&c);
        assert!(sql.contains("ON \"Odd\"\"Table\""), "{sql}");
        assert!(sql.contains("record_changes('it''s', changed)"), "{sql}");
        assert!(
            sql.contains("(\"k\"\"ey\")::text AS k, \"a\"\"b\""),
            "{sql}"
        );
    }
}
