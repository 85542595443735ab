//! `install --pg-cron`: the views' `schedule`s as pg_cron jobs `mvrefresh:<view>`.

use std::time::Duration;

use tokio_postgres::Client;

use super::{PgCronError, JOB_PREFIX};
use crate::config::{Config, Mode, ViewConfig};
use crate::db::LOCK_NAMESPACE;
use crate::sql::literal;

/// Second key of the advisory lock `install --pg-cron` takes in pg_cron's database.
const INSTALL_LOCK: i32 = 1;

/// pg_cron's schedule for "every `d`": `N seconds` below a minute, `*/N * * * *` when N minutes
/// divide an hour, `0 */N * * *` when N hours divide a day, `0 0 * * *` for a day.
pub fn cron_schedule(d: Duration) -> Result<String, String> {
    let s = d.as_secs();
    if d.subsec_nanos() != 0 || s == 0 {
        return Err(format!(
            "`{}` is not a whole number of seconds; pg_cron cannot run it",
            humantime::format_duration(d)
        ));
    }
    if s < 60 {
        return Ok(format!("{s} seconds"));
    }
    if s % 60 == 0 && s < 3600 && 60 % (s / 60) == 0 {
        return Ok(format!("*/{} * * * *", s / 60));
    }
    if s % 3600 == 0 && s < 86400 && 24 % (s / 3600) == 0 {
        return Ok(format!("0 */{} * * *", s / 3600));
    }
    if s == 86400 {
        return Ok("0 0 * * *".to_owned());
    }
    Err(format!(
        "`{}` has no pg_cron equivalent: use seconds below a minute, minutes that divide an \
         hour, hours that divide a day, or 1d",
        humantime::format_duration(d)
    ))
}

/// The job name of a view: `mvrefresh:<view>`.
pub fn job_name(view: &ViewConfig) -> String {
    format!("{JOB_PREFIX}{}", view.relation())
}

/// The SQL a view's job runs: the refresh its mode does, on the whole view.
pub fn job_command(view: &ViewConfig) -> String {
    let target = view.relation().quoted();
    match view.mode {
        Mode::Concurrently => format!("REFRESH MATERIALIZED VIEW CONCURRENTLY {target}"),
        Mode::Blocking => format!("REFRESH MATERIALIZED VIEW {target}"),
        Mode::Partitioned => {
            // The whole table recomputed (readers see the old rows until commit), under the
            // view's lock: never at the same time as a daemon's refresh of it.
            let source = view.source.as_ref().map(|s| s.quoted()).unwrap_or_default();
            format!(
                "SELECT pg_advisory_xact_lock({LOCK_NAMESPACE}, \
                 hashtext(coalesce(mvrefresh.view_name({name}), {shown}))); \
                 DELETE FROM {target}; INSERT INTO {target} SELECT * FROM {source}",
                name = literal(&target),
                shown = literal(&view.relation().to_string()),
            )
        }
        Mode::Incremental => {
            let function = view
                .function
                .as_ref()
                .map(|f| f.quoted())
                .unwrap_or_default();
            format!("SELECT {function}(NULL)")
        }
    }
}

/// The statements that make pg_cron's jobs `mvrefresh:*` for `database` exactly the views of
/// `config` with a `schedule`: created, updated (same name: pg_cron replaces it) or removed.
/// Runs in pg_cron's database.
pub fn jobs_sql(config: &Config, database: &str) -> Result<String, PgCronError> {
    let mut sql = format!(
        "SELECT pg_advisory_xact_lock({LOCK_NAMESPACE}, {INSTALL_LOCK});\n\
         CREATE EXTENSION IF NOT EXISTS pg_cron;\n"
    );
    let mut names = Vec::new();
    for (index, v) in config.views.iter().enumerate() {
        let Some(every) = v.schedule else { continue };
        let schedule = cron_schedule(every).map_err(|message| PgCronError::Schedule {
            index,
            view: v.name.to_string(),
            message,
        })?;
        let name = job_name(v);
        sql.push_str(&format!(
            "SELECT cron.schedule_in_database({}, {}, {}, {});\n",
            literal(&name),
            literal(&schedule),
            literal(&job_command(v)),
            literal(database)
        ));
        names.push(literal(&name));
    }
    sql.push_str(&format!(
        "SELECT cron.unschedule(jobid) FROM cron.job\n\
         WHERE jobname LIKE {} AND database = {} AND jobname <> ALL (ARRAY[{}]::text[]);\n",
        literal(&format!("{JOB_PREFIX}%")),
        literal(database),
        names.join(", ")
    ));
    Ok(sql)
}

/// `install --pg-cron`: runs [`jobs_sql`] in pg_cron's database, in one transaction.
/// Returns the jobs `mvrefresh:*` of `database` afterwards.
pub async fn install_jobs(
    client: &mut Client,
    config: &Config,
    database: &str,
) -> Result<Vec<(String, String)>, PgCronError> {
    let sql = jobs_sql(config, database)?;
    let tx = client.transaction().await?;
    tx.batch_execute(&sql).await?;
    let jobs = tx
        .query(
            "SELECT jobname, schedule FROM cron.job
             WHERE jobname LIKE $1 AND database = $2 ORDER BY jobname",
            &[&format!("{JOB_PREFIX}%"), &database],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    tx.commit().await?;
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Duration {
        humantime::parse_duration(s).unwrap()
    }

    #[test]
    fn schedules_convert_to_pg_cron_syntax() {
        assert_eq!(cron_schedule(d("30s")).unwrap(), "30 seconds");
        assert_eq!(cron_schedule(d("1m")).unwrap(), "*/1 * * * *");
        assert_eq!(cron_schedule(d("15m")).unwrap(), "*/15 * * * *");
        assert_eq!(cron_schedule(d("1h")).unwrap(), "0 */1 * * *");
        assert_eq!(cron_schedule(d("6h")).unwrap(), "0 */6 * * *");
        assert_eq!(cron_schedule(d("1d")).unwrap(), "0 0 * * *");
        for bad in ["7m", "90s", "5h", "1500ms", "2d"] {
            assert!(cron_schedule(d(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn job_commands_quote_names() {
        let text = r#"
[database]
url = "postgres://localhost/app"
[[view]]
name = "Odd.\"Vi\"\"ew\""
mode = "concurrently"
schedule = "5m"
[[view]]
name = "t"
mode = "incremental"
function = "refresh_t"
schedule = "7m"
"#;
        let c =
            Config::from_str_with_env(text, std::path::Path::new("t.toml"), &Default::default())
                .unwrap();
        assert_eq!(
            job_command(&c.views[0]),
            "REFRESH MATERIALIZED VIEW CONCURRENTLY \"odd\".\"Vi\"\"ew\""
        );
        assert_eq!(job_command(&c.views[1]), "SELECT \"refresh_t\"(NULL)");
        let e = jobs_sql(&c, "app").unwrap_err().to_string();
        assert!(e.contains("view[1].schedule (t)"), "{e}");
    }
}
