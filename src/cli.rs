//! The command line: parsing, and one function per command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::db::Db;
use crate::debounce::ALL;
use crate::graph::Plan;
use crate::refresh::{self, Outcome, Reason, Request, Settings};
use crate::stats::Stats;
use crate::tls::SslMode;
use crate::{daemon, install, status};

/// Exit code for a bad configuration file (`EX_CONFIG` from sysexits.h).
pub const EXIT_CONFIG: u8 = 78;

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
        Command::Run => run(config).await,
        Command::Install {
            analytics,
            pg_cron,
            dry_run,
            prune,
        } => install_cmd(config, analytics, pg_cron, dry_run, prune).await,
        Command::Refresh { views, all } => refresh_cmd(config, views, all).await,
        Command::Check { test_alert } => check_cmd(config, test_alert).await,
        Command::Status { json } => status_cmd(config, json).await,
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

async fn run(config: Config) -> anyhow::Result<ExitCode> {
    if let Some(problem) = config.http.exposure_problem() {
        eprintln!("mvrefresh: {problem}");
        return Ok(ExitCode::from(EXIT_CONFIG));
    }
    daemon::run(
        config,
        Arc::new(Stats::default()),
        crate::shutdown::signal(),
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

async fn install_cmd(
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
    let mut client = db.connect_simple("mvrefresh-install").await?;
    db.ensure_primary(&client).await?;
    install::run(&mut client, &steps).await?;
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

async fn refresh_cmd(config: Config, names: Vec<String>, all: bool) -> anyhow::Result<ExitCode> {
    if names.is_empty() && !all {
        anyhow::bail!("name the views to refresh, or pass --all");
    }
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
        let dependents: Vec<String> = view
            .dependents
            .iter()
            .map(|&d| plan.views[d].name.clone())
            .collect();
        let request = Request {
            keys: vec![ALL.to_owned()],
            forced: vec![ALL.to_owned()],
            reason: Reason::Manual,
            wait_for_lock: true,
            horizon: horizon.clone(),
        };
        let settings = Settings {
            timeout: view.config.timeout.unwrap_or(config.refresh.timeout),
            lock_timeout: config.refresh.lock_timeout,
            replica: replica.clone(),
        };
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

async fn check_cmd(config: Config, test_alert: bool) -> anyhow::Result<ExitCode> {
    println!("ok: configuration is valid");
    let exposure_ok = match config.http.exposure_problem() {
        Some(problem) => {
            println!("problem: {problem}");
            false
        }
        None => true,
    };
    let webhook_ok = check_webhook(&config, test_alert).await && exposure_ok;
    let db = Db::new(&config.database)?;
    let client = match db.connect_simple("mvrefresh-check").await {
        Ok(c) => c,
        Err(e) => {
            println!(
                "problem: {e}; fix: check database.url / {}",
                crate::config::ENV_DATABASE_URL
            );
            return Ok(ExitCode::from(1));
        }
    };
    let mut lines = status::check(&client, &config, &db.target()).await?;
    lines.insert(1.min(lines.len()), encryption_line(&client, &db).await?);
    let mut ok = webhook_ok && check_pg_cron(&config, &db).await;
    for l in &lines {
        println!("{}: {}", if l.ok { "ok" } else { "problem" }, l.text);
        ok &= l.ok;
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Prints what the pg_cron watch will see. False only when `[pg_cron] database_url` is set but
/// unusable.
async fn check_pg_cron(config: &Config, db: &Db) -> bool {
    if !config.pg_cron.watch {
        println!("ok: pg_cron watch off (pg_cron.watch = false)");
        return true;
    }
    let explicit = config.pg_cron.database_url.is_some();
    let work = async {
        let cron = crate::pgcron::cron_db(config, db)?;
        let client = cron.connect_simple("mvrefresh-check").await?;
        let present: bool = client
            .query_one(
                "SELECT to_regclass('cron.job_run_details') IS NOT NULL
                        AND to_regclass('cron.job') IS NOT NULL",
                &[],
            )
            .await?
            .get(0);
        let jobs: Option<i64> = if present {
            Some(
                client
                    .query_one(
                        "SELECT count(*) FROM cron.job WHERE jobname LIKE 'mvrefresh:%' AND database = $1",
                        &[&db.dbname()],
                    )
                    .await?
                    .get(0),
            )
        } else {
            None
        };
        Ok::<_, crate::pgcron::PgCronError>((cron.target(), present, jobs))
    };
    match work.await {
        Ok((target, true, jobs)) => {
            println!(
                "ok: pg_cron watch: failed runs in {target} will be alerted; {} job(s) mvrefresh:* for this database",
                jobs.unwrap_or(0)
            );
            true
        }
        Ok((target, false, _)) => {
            println!(
                "ok: pg_cron watch idle: no cron.job_run_details in {target}{}",
                if explicit {
                    ""
                } else {
                    " (set pg_cron.database_url when pg_cron lives in another database)"
                }
            );
            true
        }
        Err(e) => {
            println!(
                "{}: pg_cron watch: {e}{}",
                if explicit { "problem" } else { "ok" },
                if explicit {
                    "; fix: check pg_cron.database_url"
                } else {
                    ""
                }
            );
            !explicit
        }
    }
}

/// Prints whether the webhook answers (and, with `test_alert`, accepts a `test` alert).
/// Never prints the URL.
async fn check_webhook(config: &Config, test_alert: bool) -> bool {
    use crate::alert::{Event, Kind, Webhook};
    let webhook = match Webhook::new(&config.alert) {
        Ok(Some(w)) => w,
        Ok(None) => {
            println!(
                "{}: no alert webhook configured (alerts are only logged; set alert.webhook_url or {})",
                if test_alert { "problem" } else { "ok" },
                crate::config::ENV_ALERT_WEBHOOK_URL
            );
            return !test_alert;
        }
        Err(e) => {
            println!("problem: alert webhook: {e}");
            return false;
        }
    };
    let signed = if config.alert.secret.is_some() {
        "signed"
    } else {
        "unsigned"
    };
    if test_alert {
        let alert = Event::new(
            Kind::Test,
            "test",
            "test alert from `mvrefresh check --test-alert`",
        )
        .into_alert(&format!("cli:{}", std::process::id()));
        match webhook.post(&alert).await {
            Ok(()) => {
                println!("ok: alert webhook accepted a test alert ({signed})");
                true
            }
            Err(e) => {
                println!("problem: alert webhook did not accept a test alert: {e}; fix: check alert.webhook_url / {}", crate::config::ENV_ALERT_WEBHOOK_URL);
                false
            }
        }
    } else {
        match webhook.probe().await {
            Ok(code) => {
                println!("ok: alert webhook answers (HTTP {code} to HEAD; {signed}; `check --test-alert` posts a test alert)");
                true
            }
            Err(e) => {
                println!("problem: alert webhook does not answer: {e}; fix: check alert.webhook_url / {}", crate::config::ENV_ALERT_WEBHOOK_URL);
                false
            }
        }
    }
}

/// Whether the check's own connection is encrypted, and how far the server is verified.
async fn encryption_line(
    client: &tokio_postgres::Client,
    db: &Db,
) -> Result<status::CheckLine, tokio_postgres::Error> {
    let mode = db.ssl_mode();
    let row = client
        .query_opt(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?;
    let (ssl, version) = row
        .map(|r| (r.get::<_, bool>(0), r.get::<_, Option<String>>(1)))
        .unwrap_or((false, None));
    let text = match (ssl, mode) {
        (true, SslMode::VerifyFull) => format!(
            "connection encrypted ({}, sslmode={mode}: certificate and host name verified)",
            version.unwrap_or_default()
        ),
        (true, _) => format!(
            "connection encrypted ({}, sslmode={mode}); {} not verified: consider \
             sslmode=verify-full with sslrootcert",
            version.unwrap_or_default(),
            if db.verifies_chain() {
                "the server's host name is"
            } else {
                "the server's certificate is"
            }
        ),
        (false, _) if db.unix_only() => {
            "connection over a Unix socket (not encrypted; TLS does not apply)".to_owned()
        }
        (false, SslMode::Disable) => "connection not encrypted (sslmode=disable)".to_owned(),
        (false, _) => format!(
            "connection not encrypted: the server offers no TLS and sslmode={mode} fell back to \
             plaintext; use sslmode=verify-full with sslrootcert"
        ),
    };
    Ok(status::CheckLine { ok: true, text })
}

async fn status_cmd(config: Config, json: bool) -> anyhow::Result<ExitCode> {
    let db = Db::new(&config.database)?;
    let client = db.connect_simple("mvrefresh-status").await?;
    let s = status::status(&client, &config).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", status::render_table(&s));
    }
    Ok(ExitCode::SUCCESS)
}
