//! The status report (`mvrefresh status`, the admin server's `/status`): read from the database
//! alone, so it works without a running daemon.

use serde::Serialize;
use tokio_postgres::GenericClient;

use crate::config::Config;

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
