//! `mvrefresh check`: the configuration, the database, pg_cron and the webhook, one line per
//! finding with its fix; read from the database alone, so it works without a running daemon.

use std::process::ExitCode;

use tokio_postgres::GenericClient;

use crate::config::{CaptureConfig, CaptureMethod, Config};
use crate::db::Db;
use crate::plan::{Plan, PlanError};
use crate::tls::SslMode;

pub async fn execute(config: Config, test_alert: bool) -> anyhow::Result<ExitCode> {
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
    let mut lines = check(&client, &config, &db.target()).await?;
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
            crate::alert::Subject::Test,
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
) -> Result<CheckLine, tokio_postgres::Error> {
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
    Ok(CheckLine { ok: true, text })
}

/// One line of the `check` report.
#[derive(Debug, Clone)]
pub struct CheckLine {
    pub ok: bool,
    pub text: String,
}

/// The lines of the report so far.
#[derive(Default)]
struct Report(Vec<CheckLine>);

impl Report {
    fn say(&mut self, ok: bool, text: impl Into<String>) {
        self.0.push(CheckLine {
            ok,
            text: text.into(),
        });
    }
}

/// Validates the database against the config. Every problem is one line with its fix.
pub async fn check(
    client: &impl GenericClient,
    config: &Config,
    target: &str,
) -> Result<Vec<CheckLine>, tokio_postgres::Error> {
    let mut report = Report::default();
    report.say(true, format!("database reachable: {target}"));
    check_server(client, &mut report).await?;
    let installed = check_schema(client, &mut report).await?;
    match Plan::load(client, config).await {
        Ok(plan) => {
            let n = plan.views.len();
            report.say(true, format!("{n} views resolved and refreshable"));
            report.say(true, format!("refresh order: {}", plan.describe_order()));
        }
        Err(PlanError::Problems(problems)) => {
            for p in problems {
                report.say(false, p.to_string());
            }
        }
        Err(PlanError::Db(e)) => return Err(e),
        Err(e) => report.say(false, e.to_string()),
    }
    for c in &config.captures {
        match c.method {
            CaptureMethod::Trigger => check_capture(client, c, installed, &mut report).await?,
            CaptureMethod::Logical => {
                check_logical_capture(client, c, installed, &mut report).await?
            }
        }
    }
    if installed {
        check_leftovers(client, config, &mut report).await?;
    }
    Ok(report.0)
}

/// A primary, and whether pg_cron is there.
async fn check_server(
    client: &impl GenericClient,
    report: &mut Report,
) -> Result<(), tokio_postgres::Error> {
    let standby: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await?
        .get(0);
    if standby {
        let text = "the server is a standby; fix: point database.url at the primary";
        report.say(false, text);
    } else {
        report.say(true, "the server is a primary");
    }
    let cron: Option<String> = client
        .query_opt(
            "SELECT extversion FROM pg_extension WHERE extname = 'pg_cron'",
            &[],
        )
        .await?
        .map(|r| r.get(0));
    match cron {
        Some(v) => report.say(true, format!("pg_cron {v} installed in this database")),
        None => report.say(
            true,
            "pg_cron not installed in this database (optional: failed-job alerts and database-side backstops)",
        ),
    }
    Ok(())
}

/// The schema's version and this role's privileges on it; whether it is installed.
async fn check_schema(
    client: &impl GenericClient,
    report: &mut Report,
) -> Result<bool, tokio_postgres::Error> {
    match crate::store::installed_version(client).await? {
        Some(v) if v == crate::install::SCHEMA_VERSION => {
            report.say(true, format!("mvrefresh schema installed (version {v})"));
            let missing = crate::store::missing_privileges(client).await?;
            if missing.is_empty() {
                report.say(true, "privileges on the mvrefresh schema suffice");
            } else {
                report.say(
                    false,
                    format!(
                        "missing privileges on {}; fix: GRANT them to this role, or connect as the role that ran `mvrefresh install`",
                        missing.join(", ")
                    ),
                );
            }
            Ok(true)
        }
        Some(v) => {
            report.say(
                false,
                format!(
                    "mvrefresh schema version {v} installed, this binary expects {}; fix: run `mvrefresh install`",
                    crate::install::SCHEMA_VERSION
                ),
            );
            Ok(true)
        }
        None => Ok(false),
    }
}

/// A capture's triggers are there, enabled, and generated from this configuration.
async fn check_capture(
    client: &impl GenericClient,
    c: &CaptureConfig,
    installed: bool,
    report: &mut Report,
) -> Result<(), tokio_postgres::Error> {
    let row = crate::install::trigger_name(c);
    let names = vec![format!("{row}_truncate"), row.clone()];
    // And mvrefresh_capture: whether the capture's row trigger is its native_capture (then the
    // statement triggers on mvrefresh.dirty must be there too), whether 1.0's triggers are
    // still there, and whether `install` would put the capture on it (in the database at 1.1
    // or later and usable, the capture does not say `native = false`).
    let (ins, del) = crate::install::native_trigger_names(c);
    let r = client
        .query_one(
            &format!(
                "SELECT count(*) FILTER (WHERE tgname = ANY($2)),
                        coalesce(bool_or(tgname = $6
                                 AND tgfoid = to_regprocedure('mvrefresh.native_capture()')), false),
                        count(*) FILTER (WHERE tgname = ANY($3)),
                        CASE WHEN $4 AND $5
                                  AND EXISTS (SELECT FROM pg_extension
                                              WHERE extname = 'mvrefresh_capture')
                             THEN {current} AND {usable}
                             ELSE false END,
                        (SELECT count(*) FROM pg_trigger AS d
                         WHERE d.tgrelid = to_regclass('mvrefresh.dirty')
                           AND d.tgfoid = to_regprocedure('mvrefresh.native_dirty_changed()')
                           AND d.tgenabled IN ('O', 'A')),
                        $4 AND EXISTS (SELECT FROM pg_extension WHERE extname = 'mvrefresh_capture')
                           AND NOT {current}
                 FROM pg_trigger WHERE tgrelid = to_regclass($1) AND tgenabled IN ('O', 'A')",
                current = crate::install::NATIVE_CURRENT,
                usable = crate::install::NATIVE_USABLE,
            ),
            &[
                &c.table.quoted(),
                &names,
                &vec![ins, del],
                &c.native,
                &installed,
                &row,
            ],
        )
        .await?;
    let found: i64 = r.get(0);
    let (uses, old, wanted, forgets, outdated): (bool, i64, bool, i64, bool) =
        (r.get(1), r.get(2), r.get(3), r.get(4), r.get(5));
    let current = installed
        && crate::store::capture_is_current(client, &c.name, &crate::install::fingerprint(c))
            .await?;
    let (name, table) = (&c.name, &c.table);
    if found == names.len() as i64 && current && (old > 0 || outdated) {
        report.say(
            false,
            format!(
                "capture {name} on {table}: the database has mvrefresh_capture 1.0, which this version does not use; fix: run ALTER EXTENSION mvrefresh_capture UPDATE, then `mvrefresh install`"
            ),
        );
    } else if found == names.len() as i64 && current && uses && forgets != 3 {
        report.say(
            false,
            format!(
                "capture {name} on {table}: uses mvrefresh_capture, but {forgets} of the 3 triggers on mvrefresh.dirty that make sessions forget are there and enabled; fix: run `mvrefresh install`"
            ),
        );
    } else if found == names.len() as i64 && current && wanted != uses {
        let fix = if uses {
            "installed with mvrefresh_capture, which it may not use (native = false, or the extension is not usable)"
        } else {
            "installed without mvrefresh_capture, which this database has"
        };
        report.say(
            false,
            format!("capture {name} on {table}: {fix}; fix: run `mvrefresh install`"),
        );
    } else if found == names.len() as i64 && current {
        let with = if uses {
            " (with mvrefresh_capture)"
        } else {
            ""
        };
        report.say(
            true,
            format!("capture {name} on {table} installed and current{with}"),
        );
    } else if found == names.len() as i64 {
        report.say(
            false,
            format!(
                "capture {name} on {table}: installed from a different configuration; fix: run `mvrefresh install`"
            ),
        );
    } else {
        report.say(
            false,
            format!(
                "capture {name} on {table}: {found} of {} triggers installed and enabled; fix: run `mvrefresh install`",
                names.len()
            ),
        );
    }
    Ok(())
}

/// A logical capture: the server decodes (`wal_level`), the daemon's role may read slots, and
/// the publication, replica identity, slot and registration are there and current.
async fn check_logical_capture(
    client: &impl GenericClient,
    c: &CaptureConfig,
    installed: bool,
    report: &mut Report,
) -> Result<(), tokio_postgres::Error> {
    let (name, table, slot) = (&c.name, &c.table, c.slot_name());
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'),
                    (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user),
                    (SELECT relreplident::text FROM pg_class WHERE oid = to_regclass($1)),
                    EXISTS (SELECT FROM pg_publication_rel AS pr
                            JOIN pg_publication AS p ON p.oid = pr.prpubid
                            WHERE p.pubname = $2 AND pr.prrelid = to_regclass($1)),
                    (SELECT coalesce(wal_status, 'unknown') FROM pg_replication_slots
                     WHERE slot_name = $3 AND database = current_database()),
                    (SELECT count(*) FROM pg_replication_slots)
                        >= current_setting('max_replication_slots')::int,
                    current_setting('max_replication_slots')",
            &[&table.quoted(), &c.publication_name(), &slot],
        )
        .await?;
    let wal_level: String = row.get(0);
    let can_read: Option<bool> = row.get(1);
    let identity: Option<String> = row.get(2);
    let published: bool = row.get(3);
    let wal_status: Option<String> = row.get(4);
    let slots_full: bool = row.get(5);
    let max_slots: String = row.get(6);
    let mut ok = true;
    let mut problem = |text: String| {
        ok = false;
        report.say(
            false,
            format!("capture {name} on {table} (logical): {text}"),
        );
    };
    if wal_level != "logical" {
        problem(format!(
            "wal_level is {wal_level}; fix: ALTER SYSTEM SET wal_level = logical and restart \
             PostgreSQL (Amazon RDS/Aurora: rds.logical_replication = 1; Cloud SQL: \
             cloudsql.logical_decoding = on; Azure: wal_level = logical)"
        ));
    }
    if can_read != Some(true) {
        problem(
            "the daemon's role may not read replication slots; fix: ALTER ROLE <role> \
             REPLICATION (Amazon RDS: GRANT rds_replication TO <role>)"
                .to_owned(),
        );
    }
    if identity.as_deref() != Some("f") {
        problem(
            "the table's replica identity is not FULL (old keys of moved and deleted rows are \
             unknown); fix: run `mvrefresh install`"
                .to_owned(),
        );
    }
    if identity.is_some() {
        let unready = crate::logical::unready_partitions(client, c).await?;
        if !unready.is_empty() {
            problem(format!(
                "partitions {} are not ready (replica identity not FULL: PostgreSQL refuses \
                 UPDATE and DELETE on one without a primary key, and each update marks every \
                 key dirty; or not filtered by `when`); fix: run `mvrefresh install` (the \
                 daemon also does it when its role owns them)",
                unready.join(", ")
            ));
        }
        let undecoded = crate::logical::undecoded_partitions(client, c).await?;
        if !undecoded.is_empty() {
            problem(format!(
                "partitions {} are unlogged or foreign: their changes are not in the \
                 write-ahead log, so no change to them marks a key; fix: `method = \"trigger\"`, \
                 or ALTER TABLE … SET LOGGED",
                undecoded.join(", ")
            ));
        }
    }
    if !published {
        problem(format!(
            "publication {} does not hold the table; fix: run `mvrefresh install`",
            c.publication_name()
        ));
    }
    match wal_status.as_deref() {
        None if slots_full => problem(format!(
            "replication slot {slot} is missing and all max_replication_slots ({max_slots}) are \
             in use; fix: raise max_replication_slots (a restart) or drop an unused slot, then \
             run `mvrefresh install`"
        )),
        None => problem(format!(
            "replication slot {slot} is missing in this database; fix: run `mvrefresh install` \
             (the daemon also creates it, marking every key dirty)"
        )),
        Some("lost") => problem(format!(
            "replication slot {slot} is lost (PostgreSQL removed write-ahead log it needed); \
             fix: run `mvrefresh install` or start the daemon: it is created again and every key \
             marked dirty"
        )),
        Some(_) => {}
    }
    let current = installed
        && crate::store::capture_is_current(client, name, &crate::install::fingerprint(c)).await?;
    if !current {
        problem("not installed from this configuration; fix: run `mvrefresh install`".to_owned());
    }
    if ok {
        report.say(
            true,
            format!("capture {name} on {table} (logical, slot {slot}) installed and current"),
        );
    }
    Ok(())
}

/// Captures and subscriptions another config installed (or this one no longer names).
async fn check_leftovers(
    client: &impl GenericClient,
    config: &Config,
    report: &mut Report,
) -> Result<(), tokio_postgres::Error> {
    let others = crate::store::not_configured(client, config).await?;
    if !others.is_empty() {
        report.say(
            true,
            format!(
                "installed but not in this config: {}. Another config's daemon runs them, \
                 or they are left over: then `mvrefresh install --prune` removes them (with \
                 their pending keys); captured writes keep marking their keys until then",
                others.join(", ")
            ),
        );
    }
    Ok(())
}
