//! The watch of pg_cron's failed and late job runs, as the module [`super`] describes it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio_postgres::{Client, GenericClient};
use tokio_util::sync::CancellationToken;

use super::{cron_db, job_name, PgCronError, JOB_PREFIX};
use crate::alert::{Alerts, Event, Kind, Subject, Tracker};
use crate::config::Config;
use crate::db::{Db, DbError};
use crate::stats::Stats;
use crate::store;

/// At most this many runs are read per poll.
const BATCH: i64 = 1000;
/// A run still unfinished after this long (its worker died without pg_cron noticing) stops
/// holding the cursor back; a failure it records later is not reported.
const STUCK_AFTER: Duration = Duration::from_secs(24 * 3600);

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
        let runs = read_runs(cron, cursor).await?;
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
            let moved = store::move_cursor(&**main, &key, next, &seen, version).await?;
            if !moved {
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
            let subject = Subject::PgCronJob(name.clone());
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
    if let Some(cursor) = store::read_cursor(main, key).await? {
        return Ok(cursor);
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
    store::create_cursor(main, key, start).await?;
    tracing::info!(database = %key, from_runid = start, "pg_cron watch: cursor created");
    let cursor = store::read_cursor(main, key).await?;
    Ok(cursor.unwrap_or((start, Vec::new(), 0)))
}

/// At most `BATCH` runs after `cursor`, oldest first.
async fn read_runs(cron: &Client, cursor: i64) -> Result<Vec<Run>, PgCronError> {
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
    Ok(rows
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
        .collect())
}

fn failed_run_alert(run: &Run, source: &str) -> crate::alert::Alert {
    let job = run
        .jobname
        .clone()
        .unwrap_or_else(|| format!("job {}", run.jobid));
    let mut event = Event::new(
        Kind::PgCronJobFailed,
        Subject::PgCronRun(run.runid),
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

    #[test]
    fn failures_include_startup_timeout_and_restart() {
        assert!(is_failure("failed", Some("ERROR: division by zero")));
        assert!(is_failure("starting", Some("job startup timeout")));
        assert!(is_failure("running", Some("server restarted")));
        assert!(!is_failure("succeeded", Some("SELECT 1")));
        assert!(!is_failure("running", None));
        assert!(!is_finished("running", None));
    }
}
