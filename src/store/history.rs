//! The refresh history: a refresh's record, last successes, the status report's rows, pruning.

use std::time::Duration;

use tokio_postgres::GenericClient;

/// How long ago each of `views` (recorded names) was last refreshed successfully, from the
/// history; `None` for a view with no success in it.
pub async fn last_success_ages(
    client: &impl GenericClient,
    views: &[&str],
) -> Result<Vec<Option<Duration>>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT (SELECT extract(epoch FROM clock_timestamp() - max(h.finished_at))::float8
                     FROM mvrefresh.refresh_history h
                     WHERE h.view_name = n.name AND h.outcome = 'success')
             FROM unnest($1::text[]) WITH ORDINALITY AS n(name, i)
             ORDER BY n.i",
            &[&views],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            r.get::<_, Option<f64>>(0)
                .map(|s| Duration::from_secs_f64(s.max(0.0)))
        })
        .collect())
}

/// One refresh attempt, for its history row.
#[derive(Debug, Clone)]
pub struct Attempt<'a> {
    pub view: &'a str,
    pub mode: &'a str,
    pub reason: &'a str,
    /// How many keys; `None` for a whole refresh.
    pub keys: Option<i32>,
    pub duration: Duration,
    pub replica: &'a str,
}

/// Records a successful refresh, inside its transaction (started when it took the view's lock).
pub async fn record_success(
    client: &impl GenericClient,
    a: &Attempt<'_>,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO mvrefresh.refresh_history
                 (view_name, mode, reason, keys, started_at, duration_ms, outcome, replica)
             VALUES ($1, $2, $3, $4, current_setting('mvrefresh.started_at')::timestamptz, $5,
                     'success', $6)",
            &[
                &a.view,
                &a.mode,
                &a.reason,
                &a.keys,
                &(a.duration.as_secs_f64() * 1000.0),
                &a.replica,
            ],
        )
        .await
}

/// Records a failed refresh (`error`: what went wrong), which started `a.duration` ago.
pub async fn record_failure(
    client: &impl GenericClient,
    a: &Attempt<'_>,
    error: &str,
) -> Result<u64, tokio_postgres::Error> {
    let age = a.duration.as_secs_f64();
    client
        .execute(
            "INSERT INTO mvrefresh.refresh_history
                 (view_name, mode, reason, keys, started_at, duration_ms, outcome, error, replica)
             VALUES ($1, $2, $3, $4, clock_timestamp() - make_interval(secs => $5), $6,
                     'failure', $7, $8)",
            &[
                &a.view,
                &a.mode,
                &a.reason,
                &a.keys,
                &age,
                &(age * 1000.0),
                &error,
                &a.replica,
            ],
        )
        .await
}

/// What the history and the pending keys say of one view (see [`recorded_states`]).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct RecordedState {
    /// RFC 3339, UTC.
    pub last_success: Option<String>,
    pub last_duration_ms: Option<f64>,
    /// The latest error since the last success.
    pub last_error: Option<String>,
    /// Failures since the last success.
    pub consecutive_failures: i64,
    /// Distinct pending keys, counted up to the limit.
    pub pending_keys: i64,
    pub oldest_pending_age_seconds: Option<f64>,
    /// RFC 3339, UTC: last success (or now) + the view's schedule.
    pub next_scheduled_refresh: Option<String>,
}

/// The recorded state of the views `names` (with their `schedules`), in one round trip, in
/// their order; pending keys counted up to `count_limit` per view.
pub async fn recorded_states(
    client: &impl GenericClient,
    names: &[String],
    schedules: &[Option<Duration>],
    count_limit: i64,
) -> Result<Vec<RecordedState>, tokio_postgres::Error> {
    let schedules: Vec<Option<f64>> = schedules
        .iter()
        .map(|s| s.map(|d| d.as_secs_f64()))
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
            &[&names, &schedules, &count_limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| RecordedState {
            last_success: row.get(0),
            last_duration_ms: row.get(1),
            last_error: row.get(2),
            consecutive_failures: row.get(3),
            pending_keys: row.get(4),
            oldest_pending_age_seconds: row.get(5),
            next_scheduled_refresh: row.get(6),
        })
        .collect())
}

/// Deletes at most `batch` history rows older than `retention` (the oldest first); how many.
pub async fn prune_history(
    client: &impl GenericClient,
    retention: Duration,
    batch: i64,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "DELETE FROM mvrefresh.refresh_history
             WHERE id = ANY (ARRAY(
                 SELECT id FROM mvrefresh.refresh_history
                 WHERE finished_at < clock_timestamp() - make_interval(secs => $1)
                 ORDER BY finished_at
                 LIMIT $2))",
            &[&retention.as_secs_f64(), &batch],
        )
        .await
}
