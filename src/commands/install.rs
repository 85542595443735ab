//! `mvrefresh install`: the schema, captures and subscriptions (see [`crate::install`]), and
//! with `--pg-cron` the views' schedules as pg_cron jobs.

use std::process::ExitCode;

use crate::config::Config;
use crate::db::Db;
use crate::install;

pub async fn execute(
    config: Config,
    analytics: bool,
    pg_cron: bool,
    dry_run: bool,
    prune: bool,
) -> anyhow::Result<ExitCode> {
    let steps = install::script(&config, install::Options { analytics, prune });
    let db = Db::new(&config.database)?;
    // Checked before anything runs, so a bad schedule changes nothing.
    let cron_sql = if pg_cron {
        Some(crate::pgcron::jobs_sql(&config, &db.dbname())?)
    } else {
        None
    };
    if dry_run {
        print!("{}", install::render(&steps));
        if let Some(sql) = cron_sql {
            let cron = crate::pgcron::cron_db(&config, &db)?;
            print!(
                "\n-- pg_cron jobs, in {}\nBEGIN;\n{sql}COMMIT;\n",
                cron.target()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut client = db.connect_showing_warnings("mvrefresh-install").await?;
    db.ensure_primary(&client).await?;
    install::run(&mut client, &steps).await?;
    // Slots are not transactional, and one cannot be created in a transaction that wrote.
    for line in crate::logical::after_install(&client, &config, prune).await? {
        println!("{line}");
    }
    println!(
        "installed into {}: mvrefresh schema{}, {} capture(s), {} view subscription(s)",
        db.target(),
        if analytics { ", bundled analytics" } else { "" },
        config.captures.len(),
        config.views.iter().map(|v| v.channels.len()).sum::<usize>()
    );
    if pg_cron {
        let cron = crate::pgcron::cron_db(&config, &db)?;
        let mut client = cron.connect_simple("mvrefresh-install").await?;
        cron.ensure_primary(&client).await?;
        let jobs = crate::pgcron::install_jobs(&mut client, &config, &db.dbname()).await?;
        println!(
            "pg_cron jobs in {} for database {}: {}",
            cron.target(),
            db.dbname(),
            if jobs.is_empty() {
                "none (no view has a schedule)".to_owned()
            } else {
                jobs.iter()
                    .map(|(name, schedule)| format!("{name} [{schedule}]"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}
