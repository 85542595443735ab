//! The status report (`mvrefresh status`, the admin server's `/status`): read from the database
//! alone, so it works without a running daemon.

use std::time::Duration;

use serde::Serialize;
use tokio_postgres::GenericClient;

use crate::config::Config;
use crate::store;

/// One view's state, as `status --json` prints it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ViewStatus {
    pub name: String,
    pub mode: String,
    /// What the history and the pending keys say (its fields print at this level).
    #[serde(flatten)]
    pub recorded: store::RecordedState,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub views: Vec<ViewStatus>,
}

/// Pending keys are counted up to this many per view (a count must not cost as much as the
/// backlog it reports).
pub const PENDING_COUNT_LIMIT: i64 = 100_000;

/// Every configured view's state, in configuration order.
pub async fn status(
    client: &impl GenericClient,
    config: &Config,
) -> Result<Status, tokio_postgres::Error> {
    let installed = store::names_views(client).await?;
    // The names the views are recorded under (see `mvrefresh.view_name`).
    let names: Vec<String> = if installed {
        store::recorded_names(client, &config.views).await?
    } else {
        config.views.iter().map(|v| v.name.to_string()).collect()
    };
    let schedules: Vec<Option<Duration>> = config.views.iter().map(|v| v.schedule).collect();
    let mut recorded = if installed {
        store::recorded_states(client, &names, &schedules, PENDING_COUNT_LIMIT).await?
    } else {
        Vec::new()
    };
    recorded.resize_with(names.len(), Default::default);
    let views = config
        .views
        .iter()
        .zip(names)
        .zip(recorded)
        .map(|((v, name), recorded)| ViewStatus {
            name,
            mode: v.mode.as_str().to_owned(),
            recorded,
        })
        .collect();
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
        let r = &v.recorded;
        out.push_str(&format!(
            "{:<36} {:<13} {:<28} {:>10} {:>6} {:>8} {:>10} {:<28} {}\n",
            v.name,
            v.mode,
            r.last_success.as_deref().unwrap_or("never"),
            r.last_duration_ms
                .map_or("-".into(), |d| format!("{d:.0}ms")),
            r.consecutive_failures,
            r.pending_keys,
            r.oldest_pending_age_seconds
                .map_or("-".into(), |a| format!("{a:.1}s")),
            r.next_scheduled_refresh.as_deref().unwrap_or("-"),
            r.last_error.as_deref().unwrap_or("")
        ));
    }
    out
}
