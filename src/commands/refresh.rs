//! `mvrefresh refresh`: views refreshed once, in dependency order.

use std::process::ExitCode;

use crate::config::Config;
use crate::db::Db;
use crate::debounce::ALL;
use crate::plan::Plan;
use crate::refresh::{self, Outcome, Reason, Request, Settings};

pub async fn execute(
    config: Config,
    names: Vec<String>,
    all: bool,
    keys: Vec<String>,
) -> anyhow::Result<ExitCode> {
    if names.is_empty() && !all {
        anyhow::bail!("name the views to refresh, or pass --all");
    }
    // Given keys: only those (and their pending rows); none: everything.
    let keys = if keys.is_empty() {
        vec![ALL.to_owned()]
    } else {
        keys
    };
    let db = Db::new(&config.database)?;
    let mut client = db.connect_simple("mvrefresh-refresh").await?;
    db.ensure_primary(&client).await?;
    let plan = Plan::load(&client, &config).await?;
    let mut selected = vec![all; plan.views.len()];
    for n in &names {
        match plan.index(n) {
            Some(i) => selected[i] = true,
            None => anyhow::bail!("`{n}` is not a configured [[view]]"),
        }
    }
    if keys[0] != ALL {
        if let Some(v) = (0..plan.views.len())
            .filter(|&i| selected[i])
            .map(|i| &plan.views[i])
            .find(|v| v.mode().is_whole_view())
        {
            anyhow::bail!(
                "{}: --key applies to `incremental` and `partitioned` views; a `{}` view is \
                 refreshed whole",
                v.name,
                v.mode().as_str()
            );
        }
    }
    let replica = format!("cli:{}", std::process::id());
    let horizon = crate::store::settled_horizon(&client, std::time::Duration::from_secs(5)).await?;
    let mut failed = vec![false; plan.views.len()];
    for &i in &plan.order {
        if !selected[i] {
            continue;
        }
        let view = &plan.views[i];
        if let Some(&d) = view.ancestors.iter().find(|&&a| failed[a]) {
            println!(
                "{}: skipped (it reads {}, which failed)",
                view.name, plan.views[d].name
            );
            failed[i] = true;
            continue;
        }
        let dependents = plan.dependent_names(i);
        let request = Request {
            keys: keys.clone(),
            forced: keys.clone(),
            reason: Reason::Manual,
            wait_for_lock: true,
            horizon: horizon.clone(),
            nulls: true,
        };
        let settings = Settings::new(view, &config.refresh, replica.clone());
        match refresh::refresh(&mut client, view, &dependents, &request, &settings).await {
            Ok(Outcome::Refreshed { duration, .. }) => {
                println!("{}: refreshed in {} ms", view.name, duration.as_millis())
            }
            Ok(other) => println!("{}: {other:?}", view.name),
            Err(e) => {
                println!("{}: FAILED: {}", view.name, e.message());
                failed[i] = true;
            }
        }
    }
    Ok(if failed.iter().any(|f| *f) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
