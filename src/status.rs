//! `mvrefresh status` and `mvrefresh check`: reports read from the database alone, so they work
//! without a running daemon.

use serde::Serialize;
use tokio_postgres::GenericClient;

use crate::config::Config;
use crate::graph::{Plan, PlanError};

/// One view's state, as `status --json` prints it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ViewStatus {
    pub name: String,
    pub mode: String,
    /// RFC 3339, UTC.
    pub last_success: Option<String>,
    pub last_duration_ms: Option<f64>,
    pub last_error: Option<String>,
    pub consecutive_failures: i64,
    pub pending_keys: i64,
    pub oldest_pending_age_seconds: Option<f64>,
    /// RFC 3339, UTC: when the `schedule` backstop refreshes next (last success + schedule).
    pub next_scheduled_refresh: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub views: Vec<ViewStatus>,
}

/// Pending keys are counted up to this many per view (a count must not cost as much as the
/// backlog it reports).
pub const PENDING_COUNT_LIMIT: i64 = 100_000;

pub async fn status(
    client: &impl GenericClient,
    config: &Config,
) -> Result<Status, tokio_postgres::Error> {
    let installed: bool = client
        .query_one(
            "SELECT to_regprocedure('mvrefresh.view_name(text)') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    // The names the views are recorded under (see `mvrefresh.view_name`).
    let names: Vec<String> = if installed {
        crate::store::recorded_names(client, &config.views).await?
    } else {
        config
            .views
            .iter()
            .map(|v| v.relation().to_string())
            .collect()
    };
    let mut views: Vec<ViewStatus> = config
        .views
        .iter()
        .zip(&names)
        .map(|(v, name)| ViewStatus {
            name: name.clone(),
            mode: v.mode.as_str().to_owned(),
            last_success: None,
            last_duration_ms: None,
            last_error: None,
            consecutive_failures: 0,
            pending_keys: 0,
            oldest_pending_age_seconds: None,
            next_scheduled_refresh: None,
        })
        .collect();
    if installed {
        // Every view in one round trip, in configuration order.
        let schedules: Vec<Option<f64>> = config
            .views
            .iter()
            .map(|v| v.schedule.map(|d| d.as_secs_f64()))
            .collect();
        let rows = client
            .query(
                "SELECT to_char(ok.finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                        ok.duration_ms,
                        f.last_error,
                        f.n,
                        p.keys,
                        p.oldest_age,
                        to_char((coalesce(ok.finished_at, clock_timestamp())
                                 + make_interval(secs => v.schedule_s)) AT TIME ZONE 'UTC',
                                'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
                 FROM unnest($1::text[], $2::float8[]) WITH ORDINALITY AS v(name, schedule_s, ord)
                 LEFT JOIN LATERAL (
                     SELECT finished_at, duration_ms FROM mvrefresh.refresh_history
                     WHERE view_name = v.name AND outcome = 'success'
                     ORDER BY finished_at DESC LIMIT 1) AS ok ON true
                 CROSS JOIN LATERAL (
                     SELECT count(*) AS n,
                            (array_agg(error ORDER BY finished_at DESC))[1] AS last_error
                     FROM mvrefresh.refresh_history
                     WHERE view_name = v.name AND outcome = 'failure'
                       AND finished_at > coalesce(ok.finished_at, '-infinity')) AS f
                 CROSS JOIN LATERAL (
                     SELECT (SELECT count(*) FROM (SELECT DISTINCT key FROM mvrefresh.pending
                                                   WHERE view_name = v.name LIMIT $3) AS k) AS keys,
                            (SELECT extract(epoch FROM clock_timestamp() - min(since))::float8
                             FROM mvrefresh.pending WHERE view_name = v.name) AS oldest_age) AS p
                 ORDER BY v.ord",
                &[&names, &schedules, &PENDING_COUNT_LIMIT],
            )
            .await?;
        for (s, row) in views.iter_mut().zip(rows) {
            s.last_success = row.get(0);
            s.last_duration_ms = row.get(1);
            s.last_error = row.get(2);
            s.consecutive_failures = row.get(3);
            s.pending_keys = row.get(4);
            s.oldest_pending_age_seconds = row.get(5);
            s.next_scheduled_refresh = row.get(6);
        }
    }
    Ok(Status { views })
}

/// The readable table of `mvrefresh status`.
pub fn render_table(status: &Status) -> String {
    let mut out = format!(
        "{:<36} {:<13} {:<28} {:>10} {:>6} {:>8} {:>10} {:<28} {}\n",
        "VIEW",
        "MODE",
        "LAST SUCCESS",
        "DURATION",
        "FAILS",
        "PENDING",
        "OLDEST",
        "NEXT SCHEDULED",
        "LAST ERROR"
    );
    for v in &status.views {
        out.push_str(&format!(
            "{:<36} {:<13} {:<28} {:>10} {:>6} {:>8} {:>10} {:<28} {}\n",
            v.name,
            v.mode,
            v.last_success.as_deref().unwrap_or("never"),
            v.last_duration_ms
                .map_or("-".into(), |d| format!("{d:.0}ms")),
            v.consecutive_failures,
            v.pending_keys,
            v.oldest_pending_age_seconds
                .map_or("-".into(), |a| format!("{a:.1}s")),
            v.next_scheduled_refresh.as_deref().unwrap_or("-"),
            v.last_error.as_deref().unwrap_or("")
        ));
    }
    out
}

/// One line of the `check` report.
#[derive(Debug, Clone)]
pub struct CheckLine {
    pub ok: bool,
    pub text: String,
}

/// Validates the database against the config. Every problem is one line with its fix.
pub async fn check(
    client: &impl GenericClient,
    config: &Config,
    target: &str,
) -> Result<Vec<CheckLine>, tokio_postgres::Error> {
    let mut lines = Vec::new();
    let mut say = |ok: bool, text: String| lines.push(CheckLine { ok, text });
    say(true, format!("database reachable: {target}"));
    let standby: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await?
        .get(0);
    if standby {
        say(
            false,
            "the server is a standby; fix: point database.url at the primary".into(),
        );
    } else {
        say(true, "the server is a primary".into());
    }
    let installed = crate::store::installed_version(client).await?;
    let installed = match installed {
        Some(v) if v == crate::install::SCHEMA_VERSION => {
            say(true, format!("mvrefresh schema installed (version {v})"));
            let privileges: Vec<String> = client
                .query(
                    "SELECT t.name || ' (' || t.privs || ')' FROM (VALUES
                         ('mvrefresh.dirty', 'SELECT,UPDATE,DELETE'),
                         ('mvrefresh.pending', 'SELECT,INSERT,UPDATE,DELETE'),
                         ('mvrefresh.refresh_history', 'SELECT,INSERT,DELETE'),
                         ('mvrefresh.subscription', 'SELECT,INSERT'),
                         ('mvrefresh.capture', 'SELECT')) AS t(name, privs)
                     WHERE NOT has_table_privilege(t.name, t.privs)
                     UNION ALL
                     SELECT 'mvrefresh.generation (UPDATE)'
                     WHERE NOT has_sequence_privilege('mvrefresh.generation', 'UPDATE')",
                    &[],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            if privileges.is_empty() {
                say(true, "privileges on the mvrefresh schema suffice".into());
            } else {
                say(
                    false,
                    format!(
                        "missing privileges on {}; fix: GRANT them to this role, or connect as the role that ran `mvrefresh install`",
                        privileges.join(", ")
                    ),
                );
            }
            true
        }
        Some(v) => {
            say(
                false,
                format!(
                    "mvrefresh schema version {v} installed, this binary expects {}; fix: run `mvrefresh install`",
                    crate::install::SCHEMA_VERSION
                ),
            );
            true
        }
        None => false,
    };
    let cron: Option<String> = client
        .query_opt(
            "SELECT extversion FROM pg_extension WHERE extname = 'pg_cron'",
            &[],
        )
        .await?
        .map(|r| r.get(0));
    match cron {
        Some(v) => say(true, format!("pg_cron {v} installed in this database")),
        None => say(
            true,
            "pg_cron not installed in this database (optional: failed-job alerts and database-side backstops)".into(),
        ),
    }
    match Plan::load(client, config).await {
        Ok(plan) => {
            say(
                true,
                format!("{} views resolved and refreshable", plan.views.len()),
            );
            say(true, format!("refresh order: {}", plan.describe_order()));
        }
        Err(PlanError::Problems(problems)) => {
            for p in problems {
                say(false, p.to_string());
            }
        }
        Err(PlanError::Db(e)) => return Err(e),
        Err(e) => say(false, e.to_string()),
    }
    for c in &config.captures {
        let row = crate::install::trigger_name(c);
        let names = vec![format!("{row}_truncate"), row];
        let table = crate::sql::Relation::parse(&c.table)
            .map(|r| r.quoted())
            .unwrap_or_default();
        let found: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_trigger
                 WHERE tgrelid = to_regclass($1) AND tgname = ANY($2) AND tgenabled <> 'D'",
                &[&table, &names],
            )
            .await?
            .get(0);
        let current: bool = if installed {
            client
                .query_one(
                    "SELECT coalesce((SELECT fingerprint = $2 FROM mvrefresh.capture WHERE name = $1), false)",
                    &[&c.name, &crate::install::fingerprint(c)],
                )
                .await?
                .get(0)
        } else {
            false
        };
        if found == names.len() as i64 && current {
            say(
                true,
                format!("capture {} on {} installed and current", c.name, c.table),
            );
        } else if found == names.len() as i64 {
            say(
                false,
                format!(
                    "capture {} on {}: installed from a different configuration; fix: run `mvrefresh install`",
                    c.name, c.table
                ),
            );
        } else {
            say(
                false,
                format!(
                    "capture {} on {}: {found} of {} triggers installed and enabled; fix: run `mvrefresh install`",
                    c.name, c.table, names.len()
                ),
            );
        }
    }
    if installed {
        // Captures and subscriptions another config installed (or this one no longer names).
        let configured: Vec<&str> = config.captures.iter().map(|c| c.name.as_str()).collect();
        let views: Vec<String> = config
            .views
            .iter()
            .map(|v| v.relation().to_string())
            .collect();
        let others: Vec<String> = client
            .query(
                "SELECT 'capture ' || name FROM mvrefresh.capture
                 WHERE name <> ALL ($1) AND name <> 'bout_results'
                 UNION ALL
                 SELECT DISTINCT 'view ' || view_name FROM mvrefresh.subscription
                 WHERE view_name <> ALL ($2)
                 ORDER BY 1",
                &[&configured, &views],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !others.is_empty() {
            say(
                true,
                format!(
                    "installed but not in this config: {}. Another config's daemon runs them, \
                     or they are left over: then `mvrefresh install --prune` removes them (with \
                     their pending keys); captured writes keep marking their keys until then",
                    others.join(", ")
                ),
            );
        }
    }
    Ok(lines)
}
