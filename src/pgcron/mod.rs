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

mod jobs;
mod watch;

pub use jobs::{cron_schedule, install_jobs, job_command, job_name, jobs_sql};
pub use watch::{is_failure, watch};

use crate::config::Config;
use crate::db::{Db, DbError};

/// Prefix of the jobs `install --pg-cron` manages.
pub const JOB_PREFIX: &str = "mvrefresh:";

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
