//! What the daemon reads and builds before its loop starts: the plan and what the database
//! remembers (start_up), each view's scheduling state, the channel map.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;

use super::scheduler::ViewState;
use super::{DaemonError, HORIZON_PATIENCE};
use crate::config::{Config, Mode};
use crate::db::{Db, DbError};
use crate::debounce::{Debouncer, Limits, ALL};
use crate::plan::Plan;
use crate::refresh::Reason;
use crate::store;

/// What start-up reads from the database before anything runs.
pub(super) struct Startup {
    pub(super) plan: Plan,
    /// Channels a capture feeds, as installed.
    pub(super) captured: Vec<String>,
    /// How long ago each view (in plan order) last refreshed successfully.
    pub(super) last_success: Vec<Option<Duration>>,
}

pub(super) fn warn_if_plaintext(db: &Db) {
    if db.ssl_mode().may_be_plaintext()
        && db.ssl_mode() != crate::tls::SslMode::Disable
        && !db.unix_only()
    {
        tracing::warn!(
            sslmode = %db.ssl_mode(),
            "database.url: sslmode={} falls back to plaintext when the server does not offer TLS, \
             and does not verify the server's certificate; use sslmode=verify-full with sslrootcert",
            db.ssl_mode()
        );
    }
}

/// Resolves the plan, subscribes the views to their channels, and reads what the daemon starts
/// from, on one connection.
pub(super) async fn start_up(
    db: &Db,
    pool: &Pool,
    config: &Config,
) -> Result<Startup, DaemonError> {
    let client = pool.get().await.map_err(DbError::from)?;
    db.ensure_primary(&client).await?;
    let plan = Plan::load(&**client, config).await?;
    let pairs: Vec<(String, String)> = plan
        .views
        .iter()
        .flat_map(|v| {
            v.config
                .channels
                .iter()
                .map(|c| (c.clone(), v.name.clone()))
        })
        .collect();
    store::ensure_subscriptions(&**client, &pairs).await?;
    let captured = store::captured_channels(&**client).await?;
    let names: Vec<&str> = plan.views.iter().map(|v| v.name.as_str()).collect();
    let last_success = store::last_success_ages(&**client, &names).await?;
    Ok(Startup {
        plan,
        captured,
        last_success,
    })
}

/// Each view's scheduling state at start-up: a whole-view view never populated is due at once.
pub(super) fn view_states(plan: &Plan, config: &Config, now: Instant) -> Vec<ViewState> {
    let limits = Limits {
        cap: config.refresh.max_pending_keys,
        batch: config.refresh.batch_keys,
        patience: HORIZON_PATIENCE,
    };
    plan.views
        .iter()
        .map(|v| {
            let mut debouncer = Debouncer::new(v.config.debounce(config.debounce), limits);
            let mut reason = None;
            if (v.mode().is_whole_view() || v.mode() == Mode::Partitioned) && !v.populated {
                debouncer.note_due(ALL, now, now, true);
                reason = Some(Reason::Startup);
            }
            ViewState {
                next_schedule: v.config.schedule.map(|s| now + s),
                reason,
                ..ViewState::new(debouncer)
            }
        })
        .collect()
}

/// channel → (the views subscribed to it, whether a capture feeds it).
pub(super) fn channel_map(
    plan: &Plan,
    config: &Config,
    captured: &[String],
) -> BTreeMap<String, (Vec<usize>, bool)> {
    let captured: BTreeSet<&str> = config
        .captures
        .iter()
        .map(|c| c.channel.as_str())
        .chain(captured.iter().map(String::as_str))
        .collect();
    let mut channels: BTreeMap<String, (Vec<usize>, bool)> = BTreeMap::new();
    for (i, v) in plan.views.iter().enumerate() {
        for c in &v.config.channels {
            let entry = channels
                .entry(c.clone())
                .or_insert_with(|| (Vec::new(), captured.contains(c.as_str())));
            entry.0.push(i);
        }
    }
    channels
}
