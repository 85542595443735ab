//! The command line: its parsing, and the dispatch to [`crate::commands`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::commands;
use crate::config::Config;

pub use crate::commands::EXIT_CONFIG;

#[derive(Debug, Parser)]
#[command(
    name = "mvrefresh",
    version,
    about = "Keeps PostgreSQL materialized views and analytics tables fresh from live writes"
)]
pub struct Cli {
    /// The configuration file.
    #[arg(
        long,
        global = true,
        env = "MVREFRESH_CONFIG",
        default_value = "config.toml"
    )]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon until SIGTERM/SIGINT.
    Run,
    /// Create or upgrade mvrefresh's database objects (idempotent, one transaction).
    Install {
        /// Also install the bundled analytics (operational tables if missing, mv_* views,
        /// analytics_* tables and their refresh functions).
        #[arg(long)]
        analytics: bool,
        /// Register each view's `schedule` as a pg_cron job `mvrefresh:<view>`.
        #[arg(long)]
        pg_cron: bool,
        /// Print the SQL instead of running it.
        #[arg(long)]
        dry_run: bool,
        /// Also remove the captures and subscriptions this config does not name (with their
        /// pending keys). Without it they are kept: another config may use them.
        #[arg(long)]
        prune: bool,
    },
    /// Refresh views once, in dependency order.
    Refresh {
        /// Views to refresh (as named in the config).
        views: Vec<String>,
        /// Refresh every configured view.
        #[arg(long, conflicts_with = "views")]
        all: bool,
        /// Refresh only these keys (`incremental` and `partitioned` views; repeatable);
        /// default: everything.
        #[arg(long = "key", value_name = "KEY")]
        keys: Vec<String>,
    },
    /// Validate the configuration and the database; print a report.
    Check {
        /// Also post a `test` alert to the webhook and report the answer.
        #[arg(long)]
        test_alert: bool,
    },
    /// Per view: last success, duration, last error, pending keys, oldest pending change.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Runs the parsed command line with a loaded config. Errors are printed here.
pub async fn execute(command: Command, config: Config) -> ExitCode {
    let result = match command {
        Command::Run => commands::run::execute(config).await,
        Command::Install {
            analytics,
            pg_cron,
            dry_run,
            prune,
        } => commands::install::execute(config, analytics, pg_cron, dry_run, prune).await,
        Command::Refresh { views, all, keys } => {
            commands::refresh::execute(config, views, all, keys).await
        }
        Command::Check { test_alert } => commands::check::execute(config, test_alert).await,
        Command::Status { json } => commands::status::execute(config, json).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mvrefresh: {}", describe(&e));
            ExitCode::from(1)
        }
    }
}

/// `e` and its causes, `: `-separated, a PostgreSQL error as [`crate::db::error_text`] tells it
/// (tokio-postgres's own text is only "db error"); a cause already told is not repeated.
fn describe(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = match cause.downcast_ref::<tokio_postgres::Error>() {
            Some(pg) => crate::db::error_text(pg),
            None => cause.to_string(),
        };
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
        if cause.is::<tokio_postgres::Error>() {
            // Its causes are in the text already.
            break;
        }
    }
    text
}
