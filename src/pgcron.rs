//! pg_cron: the watch of failed job runs, and the backstop jobs of `install --pg-cron`.
//!
//! # Where pg_cron lives
//!
//! pg_cron runs in one database per cluster (`cron.database_name`); its tables
//! `cron.job` and `cron.job_run_details` exist only there, and jobs reach other databases through
//! `cron.schedule_in_database`. Both the watch and `install --pg-cron` therefore talk to
//! `[pg_cron] database_url` when it is set (or `MVREFRESH_PG_CRON_DATABASE_URL`), and to the
//! daemon's own database otherwise. The watch's cursor always lives in the daemon's database
//! (`mvrefresh.pg_cron_cursor`). Without `cron.job_run_details` in that database the watch stays
//! idle (checked at every poll, so installing pg_cron later is noticed).
//!
//! # The watch
//!
//! It reports the failed runs of every job of pg_cron's database, not only the `mvrefresh:*`
//! jobs (failed pg_cron jobs are otherwise silent), with the job's command and error text.
//!
//! Every `[pg_cron] poll_interval` it reads the runs after the cursor, in `runid` order:
//!
//! 1. a run is *failed* when its status is `failed` or its message starts with
//!    `job startup timeout` or is `server restarted` (pg_cron's words for runs that never
//!    started or were cut by a restart);
//! 2. the cursor moves over the leading runs that are finished (a run still `running` stops it,
//!    so its failure is seen later, unless it has been unfinished for a day: then it is given
//!    up); failed runs beyond it that were reported are remembered in `alerted`;
//! 3. the cursor row is updated (only if no other replica moved it since it was read: replicas
//!    take turns), *then* one `pg_cron_job_failed` alert per newly failed run is queued. A
//!    restart therefore neither repeats nor skips a run.
//!
//! On the first poll against a database the cursor starts at the runs already finished: history
//! from before mvrefresh watched is not replayed.
//!
//! Each configured view with a `schedule` and a `max_staleness` whose job `mvrefresh:<view>`
//! exists is also checked: when its last successful run (or, before any, its first run) is
//! older than `max_staleness`, `pg_cron_job_late` opens, and `pg_cron_job_recovered` closes it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio_postgres::{Client, GenericClient};
use tokio_util::sync::CancellationToken;

use crate::alert::{Alerts, Event, Kind, Tracker};
use crate::config::{Config, Mode, ViewConfig};
use crate::db::{Db, DbError, LOCK_NAMESPACE};
use crate::sql::literal;
use crate::stats::Stats;

/// Prefix of the jobs `install --pg-cron` manages.
pub const JOB_PREFIX: &str = "mvrefresh:";
/// At most this many runs are read per poll.
const BATCH: i64 = 1000;
/// A run still unfinished after this long (its worker died without pg_cron noticing) stops
/// holding the cursor back; a failure it records later is not reported.
const STUCK_AFTER: Duration = Duration::from_secs(24 * 3600);
/// Second key of the advisory lock `install --pg-cron` takes in pg_cron's database.
const INSTALL_LOCK: i32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum PgCronError {
    #[error("view[{index}].schedule ({view}): {message}")]
    Schedule {
        index: usize,
        view: String,
        message: String,
    },
    #[error("invalid [pg_cron] database_url: {0}")]
    Url(#[source] crate::db::UrlError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("pg_cron: {}", crate::db::error_text(.0))]
    Query(#[from] tokio_postgres::Error),
}

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
        Mode::Incremental => {
            let function = crate::sql::Relation::parse(view.function.as_deref().unwrap_or(""))
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
            view: v.name.clone(),
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

/// pg_cron's database: `[pg_cron] database_url`, else the daemon's.
pub fn cron_db(config: &Config, db: &Db) -> Result<Db, PgCronError> {
    match &config.pg_cron.database_url {
        Some(url) => {
            let mut settings = config.database.clone();
            settings.url = url.expose().to_owned();
            Db::new(&settings).map_err(PgCronError::Url)
        }
        None => Ok(db.clone()),
    }
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

/// Whether a run's status and message mean it failed.
pub fn is_failure(status: &str, message: Option<&str>) -> bool {
    let message = message.unwrap_or("").trim();
    status == "failed"
        || message.starts_with("job startup timeout")
        || message == "server restarted"
}

fn is_finished(status: &str, message: Option<&str>) -> bool {
    matches!(status, "succeeded" | "failed") || is_failure(status, message)
}

/// Runs the watch until `cancel`.
pub async fn watch(
    db: Db,
    pool: Pool,
    config: Config,
    source: String,
    alerts: Alerts,
    stats: Arc<Stats>,
    cancel: CancellationToken,
) {
    let cron = match cron_db(&config, &db) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "pg_cron watch disabled");
            return;
        }
    };
    let database = db.dbname();
    let mut watcher = Watcher {
        own_database: config.pg_cron.database_url.is_none(),
        database,
        cron,
        pool,
        alerts,
        stats,
        tracker: Tracker::new(config.alert.repeat_after, source),
        config,
        client: None,
        absent_logged: false,
        failing: false,
    };
    let mut interval = tokio::time::interval(watcher.config.pg_cron.poll_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = interval.tick() => {}
        }
        let patience = watcher.config.database.connect_timeout * 3;
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = tokio::time::timeout(patience, watcher.poll()) => r,
        };
        match result {
            Ok(Ok(())) => {
                watcher.failing = false;
                watcher.stats.pg_cron_polls.inc();
            }
            Ok(Err(e)) => watcher.failed(&e.to_string()),
            Err(_) => watcher.failed(&format!("no answer within {patience:?}")),
        }
    }
}

struct Watcher {
    cron: Db,
    /// pg_cron lives in the daemon's own database: poll on a pooled connection, so the daemon
    /// holds no connection beyond the pool and the listener.
    own_database: bool,
    /// The daemon's database (the jobs `install --pg-cron` made for it).
    database: String,
    pool: Pool,
    config: Config,
    alerts: Alerts,
    stats: Arc<Stats>,
    /// `pg_cron_job_late` lifecycle.
    tracker: Tracker,
    /// The connection to pg_cron's database, kept between polls.
    client: Option<Client>,
    absent_logged: bool,
    failing: bool,
}

/// One row of `cron.job_run_details`.
struct Run {
    runid: i64,
    jobid: i64,
    jobname: Option<String>,
    database: Option<String>,
    command: Option<String>,
    status: String,
    message: Option<String>,
    start: Option<String>,
    end: Option<String>,
    /// Since it started.
    age: Duration,
}

impl Watcher {
    fn failed(&mut self, error: &str) {
        self.client = None;
        if !self.failing {
            tracing::warn!(error = %error, "pg_cron watch: poll failed; will retry");
        }
        self.failing = true;
    }

    async fn poll(&mut self) -> Result<(), PgCronError> {
        if self.own_database {
            let pool = self.pool.clone();
            let client = pool.get().await.map_err(DbError::from)?;
            return self.poll_with(&client).await;
        }
        let cron = match self.client.take() {
            Some(c) if !c.is_closed() => c,
            _ => self.cron.connect_simple("mvrefresh-pg-cron").await?,
        };
        let result = self.poll_with(&cron).await;
        if result.is_ok() {
            self.client = Some(cron);
        }
        result
    }

    async fn poll_with(&mut self, cron: &Client) -> Result<(), PgCronError> {
        let present: bool = cron
            .query_one(
                "SELECT to_regclass('cron.job_run_details') IS NOT NULL",
                &[],
            )
            .await?
            .get(0);
        if !present {
            if !self.absent_logged {
                tracing::info!(database = %self.cron.target(), "no cron.job_run_details: pg_cron watch idle");
                self.absent_logged = true;
            }
            return Ok(());
        }
        let key = self.cron.target();
        let main = self.pool.get().await.map_err(DbError::from)?;
        let (cursor, alerted, version) = load_cursor(&**main, cron, &key).await?;
        let rows = cron
            .query(
                "SELECT d.runid, d.jobid, j.jobname, d.database, d.command, d.status,
                        d.return_message,
                        to_char(d.start_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
                        to_char(d.end_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
                        extract(epoch FROM now() - coalesce(d.start_time, now()))::float8
                 FROM cron.job_run_details d LEFT JOIN cron.job j ON j.jobid = d.jobid
                 WHERE d.runid > $1 ORDER BY d.runid LIMIT $2",
                &[&cursor, &BATCH],
            )
            .await?;
        let runs: Vec<Run> = rows
            .iter()
            .map(|r| Run {
                runid: r.get(0),
                jobid: r.get(1),
                jobname: r.get(2),
                database: r.get(3),
                command: r.get(4),
                status: r.get::<_, Option<String>>(5).unwrap_or_default(),
                message: r.get(6),
                start: r.get(7),
                end: r.get(8),
                age: Duration::from_secs_f64(r.get::<_, f64>(9).max(0.0)),
            })
            .collect();
        let mut next = cursor;
        let mut prefix = true;
        let mut seen = alerted.clone();
        let mut fresh = Vec::new();
        for run in &runs {
            let finished =
                is_finished(&run.status, run.message.as_deref()) || run.age > STUCK_AFTER;
            if is_failure(&run.status, run.message.as_deref()) && !seen.contains(&run.runid) {
                seen.push(run.runid);
                fresh.push(run);
            }
            if prefix && finished {
                next = run.runid;
            } else {
                prefix = false;
            }
        }
        seen.retain(|&r| r > next);
        seen.sort_unstable();
        if next != cursor || seen != alerted {
            let moved = main
                .execute(
                    "UPDATE mvrefresh.pg_cron_cursor
                     SET last_runid = $2, alerted = $3, version = version + 1,
                         updated_at = clock_timestamp()
                     WHERE cron_database = $1 AND version = $4",
                    &[&key, &next, &seen, &version],
                )
                .await?;
            if moved == 0 {
                // Another replica moved the cursor since we read it: it reports these runs.
                return Ok(());
            }
        }
        for run in fresh {
            self.stats.pg_cron_failed_runs.inc();
            self.alerts
                .send(failed_run_alert(run, self.tracker.source()));
        }
        self.check_late(cron).await
    }

    async fn check_late(&mut self, cron: &Client) -> Result<(), PgCronError> {
        let database = self.database.clone();
        let now = Instant::now();
        for v in &self.config.views {
            let (Some(_), Some(limit)) = (v.schedule, v.max_staleness) else {
                continue;
            };
            let name = job_name(v);
            let row = cron
                .query_opt(
                    "SELECT extract(epoch FROM clock_timestamp() - coalesce(
                                (SELECT max(end_time) FROM cron.job_run_details d
                                 WHERE d.jobid = j.jobid AND d.status = 'succeeded'),
                                (SELECT min(start_time) FROM cron.job_run_details d
                                 WHERE d.jobid = j.jobid)))::float8,
                            EXISTS (SELECT 1 FROM cron.job_run_details d
                                    WHERE d.jobid = j.jobid AND d.status = 'succeeded')
                     FROM cron.job j WHERE j.jobname = $1 AND j.database = $2",
                    &[&name, &database],
                )
                .await?;
            let Some(row) = row else { continue };
            let age: Option<f64> = row.get(0);
            let ever: bool = row.get(1);
            let subject = format!("pg_cron_job:{name}");
            match age {
                Some(age) if age > limit.as_secs_f64() => {
                    let event = Event::new(
                        Kind::PgCronJobLate,
                        subject,
                        format!(
                            "pg_cron job {name} has not succeeded for {age:.0}s (max_staleness {})",
                            humantime::format_duration(limit)
                        ),
                    )
                    .view(&v.relation().to_string())
                    .detail("jobname", name.clone())
                    .detail("since_last_success_seconds", ever.then_some(age))
                    .detail("max_staleness_seconds", limit.as_secs_f64());
                    if let Some(alert) = self.tracker.fail(event, now) {
                        self.alerts.send(alert);
                    }
                }
                _ if self.tracker.is_open(&subject) => {
                    let event = Event::new(
                        Kind::PgCronJobRecovered,
                        subject,
                        format!("pg_cron job {name} succeeded again"),
                    )
                    .view(&v.relation().to_string())
                    .detail("jobname", name.clone());
                    self.alerts.send_opt(self.tracker.recover(event));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The cursor of `key`, made on first use at the runs already finished.
async fn load_cursor(
    main: &impl GenericClient,
    cron: &Client,
    key: &str,
) -> Result<(i64, Vec<i64>, i64), PgCronError> {
    if let Some(row) = main
        .query_opt(
            "SELECT last_runid, alerted, version FROM mvrefresh.pg_cron_cursor
             WHERE cron_database = $1",
            &[&key],
        )
        .await?
    {
        return Ok((row.get(0), row.get(1), row.get(2)));
    }
    let start: i64 = cron
        .query_one(
            "SELECT coalesce(
                 (SELECT min(runid) - 1 FROM cron.job_run_details
                  WHERE status NOT IN ('succeeded', 'failed')),
                 (SELECT max(runid) FROM cron.job_run_details),
                 0)",
            &[],
        )
        .await?
        .get(0);
    main.execute(
        "INSERT INTO mvrefresh.pg_cron_cursor (cron_database, last_runid) VALUES ($1, $2)
         ON CONFLICT (cron_database) DO NOTHING",
        &[&key, &start],
    )
    .await?;
    tracing::info!(database = %key, from_runid = start, "pg_cron watch: cursor created");
    let row = main
        .query_one(
            "SELECT last_runid, alerted, version FROM mvrefresh.pg_cron_cursor
             WHERE cron_database = $1",
            &[&key],
        )
        .await?;
    Ok((row.get(0), row.get(1), row.get(2)))
}

fn failed_run_alert(run: &Run, source: &str) -> crate::alert::Alert {
    let job = run
        .jobname
        .clone()
        .unwrap_or_else(|| format!("job {}", run.jobid));
    let mut event = Event::new(
        Kind::PgCronJobFailed,
        format!("pg_cron_run:{}", run.runid),
        format!("pg_cron job {job} failed (run {})", run.runid),
    )
    .error(
        run.message
            .clone()
            .unwrap_or_else(|| format!("status {}", run.status)),
    )
    .detail("runid", run.runid)
    .detail("jobid", run.jobid)
    .detail("jobname", run.jobname.clone())
    .detail("database", run.database.clone())
    .detail("command", run.command.clone())
    .detail("status", run.status.clone())
    .detail("start_time", run.start.clone())
    .detail("end_time", run.end.clone());
    if let Some(view) = run
        .jobname
        .as_deref()
        .and_then(|n| n.strip_prefix(JOB_PREFIX))
    {
        event = event.view(view);
    }
    event.into_alert(source)
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
    fn failures_include_startup_timeout_and_restart() {
        assert!(is_failure("failed", Some("ERROR: division by zero")));
        assert!(is_failure("starting", Some("job startup timeout")));
        assert!(is_failure("running", Some("server restarted")));
        assert!(!is_failure("succeeded", Some("SELECT 1")));
        assert!(!is_failure("running", None));
        assert!(!is_finished("running", None));
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
