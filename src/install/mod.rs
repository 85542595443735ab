//! `mvrefresh install`: creates or upgrades, in one transaction under an advisory lock, what the
//! daemon needs: its schema (`sql/mvrefresh.sql`), the bundled analytics (`--analytics`), the
//! change capture of every `[[capture]]`, and the (channel, view) subscriptions of every
//! `[[view]]`. Every step is idempotent: a second run changes nothing. Captures and
//! subscriptions that are not in this config are kept (another pipeline's config may have
//! installed them into the same database) unless `--prune` is given. `--pg-cron` then
//! registers the views' schedules as pg_cron jobs, in pg_cron's database and its own
//! transaction ([`crate::pgcron::install_jobs`]).
//!
//! # The capture a `[[capture]]` becomes
//!
//! One `AFTER INSERT OR UPDATE OF <key, columns, the predicate's columns> OR DELETE` row trigger
//! and one `AFTER TRUNCATE` statement trigger on the table. Per row, the trigger function asks
//! one inlined SQL expression whether there is anything to do: the row is relevant (`when`) and
//! its key is one the writer's session remembers as dirty under the current generation (see
//! `sql/mvrefresh.sql`), before and after the change. When not, and the row is relevant and kept
//! its key (a session writing a key it does not remember: after every collect, each session
//! takes this path once per key it writes), the trigger marks that key itself, as
//! `mvrefresh.mark_keys` would; in every other case it calls `mvrefresh.mark_keys` with the
//! row's keys: the old key and the new one when a row moves or stops being relevant, the new one
//! when it is inserted, the old one when it is deleted.
//! An update that sets a captured column to the value it had still marks its key (a refresh
//! that changes nothing): comparing every captured value on every row costs writers more than
//! the occasional extra refresh.
//!
//! With the mvrefresh_capture extension (extension/), the same row trigger runs its C function
//! `native_capture`, which calls the trigger function above only for a row with a key the
//! session does not remember; three statement triggers on `mvrefresh.dirty` then make sessions
//! forget whenever rows leave it ([`NATIVE_DIRTY_TRIGGERS`]).
//!
//! The trigger functions are `SECURITY DEFINER` (writers have no privilege on mvrefresh's
//! tables) with EXECUTE revoked from PUBLIC, and read nothing through the writer's
//! `search_path`: the predicate and the key are parsed once, at install, into SQL-standard
//! function bodies (their operators and functions resolved then, as the installing role sees
//! them), and everything else is schema-qualified. `when` is trusted SQL: it runs as the
//! installing role, inside every writer's statement; schema-qualify what it calls.

use tokio_postgres::Client;

use crate::config::{CaptureConfig, CaptureMethod, Config};
use crate::db::LOCK_NAMESPACE;
use crate::sql::{ident, literal};

mod logical;

/// The daemon's own schema.
pub const CORE_SQL: &str = include_str!("../../sql/mvrefresh.sql");

/// The `schema_version` that [`CORE_SQL`] installs (kept equal by a unit test).
pub const SCHEMA_VERSION: &str = "4";

/// The bundled analytics' capture on bout_results (step 5 of `--analytics`).
const ANALYTICS_CAPTURE_SQL: &str =
    include_str!("../../sql/analytics/050_capture_bout_results.sql");

/// The bundled analytics of the README's analytics section, in the order they run.
pub const ANALYTICS_SQL: &[(&str, &str)] = &[
    (
        "sql/analytics/010_operational.sql",
        include_str!("../../sql/analytics/010_operational.sql"),
    ),
    (
        "sql/analytics/020_compute.sql",
        include_str!("../../sql/analytics/020_compute.sql"),
    ),
    (
        "sql/analytics/030_mv_views.sql",
        include_str!("../../sql/analytics/030_mv_views.sql"),
    ),
    (
        "sql/analytics/040_analytics_tables.sql",
        include_str!("../../sql/analytics/040_analytics_tables.sql"),
    ),
    (
        "sql/analytics/045_analytics_sources.sql",
        include_str!("../../sql/analytics/045_analytics_sources.sql"),
    ),
    (
        "sql/analytics/050_capture_bout_results.sql",
        ANALYTICS_CAPTURE_SQL,
    ),
    (
        "sql/analytics/090_sample_data.sql",
        include_str!("../../sql/analytics/090_sample_data.sql"),
    ),
];

#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    pub analytics: bool,
    /// Remove the captures and subscriptions (and their pending keys) this config does not name.
    pub prune: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("install step `{step}` failed: {message}")]
    Step { step: String, message: String },
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

/// One named piece of the install script.
pub struct Step {
    pub name: String,
    pub sql: String,
}

/// The whole install script, in order.
pub fn script(config: &Config, options: Options) -> Vec<Step> {
    let mut steps = vec![Step {
        name: "sql/mvrefresh.sql".into(),
        sql: CORE_SQL.to_owned(),
    }];
    if options.analytics {
        steps.extend(ANALYTICS_SQL.iter().map(|(name, sql)| Step {
            name: (*name).to_owned(),
            sql: (*sql).to_owned(),
        }));
    } else {
        steps.push(Step {
            name: "bundled analytics: upgrade an installed bout_results capture".into(),
            sql: analytics_capture_upgrade_sql(),
        });
    }
    for (i, c) in config.captures.iter().enumerate() {
        steps.push(Step {
            name: format!("capture[{i}] ({})", c.name),
            sql: match c.method {
                CaptureMethod::Trigger => capture_sql(c),
                CaptureMethod::Logical => logical::install_sql(c),
            },
        });
    }
    if options.prune {
        steps.push(Step {
            name: "captures: drop the ones this config does not name (--prune)".into(),
            sql: prune_captures_sql(config),
        });
    }
    for (i, v) in config.views.iter().enumerate() {
        if let Some(sql) = crate::partition::install_sql(v) {
            steps.push(Step {
                name: format!("view[{i}] ({}): the partitioned table", v.name),
                sql,
            });
        }
    }
    steps.push(Step {
        name: "subscriptions".into(),
        sql: subscriptions_sql(config, options.prune),
    });
    steps.push(Step {
        name: "mvrefresh_capture: the triggers on mvrefresh.dirty".into(),
        sql: native_dirty_sql(),
    });
    // Every session forgets the keys it remembers as dirty: a capture may have changed its
    // channel or table. Odd: writers notify until the daemon's next collect.
    steps.push(Step {
        name: "a new generation".into(),
        sql: "SELECT setval('mvrefresh.generation',
                 (('x' || substr(md5(gen_random_uuid()::text), 1, 15))::bit(60)::bigint + 2) | 1);"
            .into(),
    });
    steps
}

/// mvrefresh_capture's statement triggers on `mvrefresh.dirty` ([`NATIVE_DIRTY_TRIGGERS`]),
/// there exactly when some capture's row trigger is native_capture: what a session remembers
/// stays true only while rows do not leave `mvrefresh.dirty` unseen. Then every session forgets
/// (with the extension: a capture may have changed its channel).
fn native_dirty_sql() -> String {
    let [del, upd, trunc] = NATIVE_DIRTY_TRIGGERS.map(ident);
    let [del_lit, upd_lit, trunc_lit] = NATIVE_DIRTY_TRIGGERS.map(literal);
    format!(
        r#"DO $mvrefresh$
BEGIN
    IF EXISTS (SELECT FROM pg_trigger
               WHERE tgfoid = to_regprocedure('mvrefresh.native_capture()')) THEN
        -- (Re)created when one is missing, disabled or fires only for replication: CREATE OR
        -- REPLACE enables it again.
        IF (SELECT count(*) FROM pg_trigger
            WHERE tgrelid = 'mvrefresh.dirty'::regclass AND tgenabled IN ('O', 'A')
              AND tgfoid = to_regprocedure('mvrefresh.native_dirty_changed()')) <> 3 THEN
            CREATE OR REPLACE TRIGGER {del} AFTER DELETE ON mvrefresh.dirty
                REFERENCING OLD TABLE AS gone FOR EACH STATEMENT
                EXECUTE FUNCTION mvrefresh.native_dirty_changed();
            CREATE OR REPLACE TRIGGER {upd} AFTER UPDATE ON mvrefresh.dirty
                REFERENCING OLD TABLE AS gone FOR EACH STATEMENT
                EXECUTE FUNCTION mvrefresh.native_dirty_changed();
            CREATE OR REPLACE TRIGGER {trunc} AFTER TRUNCATE ON mvrefresh.dirty
                FOR EACH STATEMENT EXECUTE FUNCTION mvrefresh.native_dirty_changed();
        END IF;
    ELSIF EXISTS (SELECT FROM pg_trigger
                  WHERE tgrelid = 'mvrefresh.dirty'::regclass
                    AND tgname IN ({del_lit}, {upd_lit}, {trunc_lit})) THEN
        DROP TRIGGER IF EXISTS {del} ON mvrefresh.dirty;
        DROP TRIGGER IF EXISTS {upd} ON mvrefresh.dirty;
        DROP TRIGGER IF EXISTS {trunc} ON mvrefresh.dirty;
    END IF;
    IF coalesce(has_function_privilege(to_regprocedure('mvrefresh.native_forget()'), 'EXECUTE'),
                false) THEN
        PERFORM mvrefresh.native_forget();
    END IF;
END
$mvrefresh$;"#
    )
}

/// The script as one SQL text, for `--dry-run`.
pub fn render(steps: &[Step]) -> String {
    let mut out = String::from("BEGIN;\n");
    out.push_str(&format!(
        "SELECT pg_advisory_xact_lock({LOCK_NAMESPACE}, 0);\n"
    ));
    for s in steps {
        out.push_str(&format!("\n-- {}\n{}\n", s.name, s.sql.trim_end()));
    }
    out.push_str("\nCOMMIT;\n");
    out
}

/// Runs the script in one transaction under the install advisory lock.
pub async fn run(client: &mut Client, steps: &[Step]) -> Result<(), InstallError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1, 0)", &[&LOCK_NAMESPACE])
        .await?;
    for s in steps {
        tx.batch_execute(&s.sql)
            .await
            .map_err(|e| InstallError::Step {
                step: s.name.clone(),
                message: crate::db::error_text(&e),
            })?;
    }
    tx.commit().await?;
    Ok(())
}

/// An installed bundled-analytics capture from an older version calls functions this version
/// no longer has: re-create it even when `--analytics` is not given (it only replaces its
/// function; its triggers stay).
fn analytics_capture_upgrade_sql() -> String {
    format!(
        r#"DO $mvrefresh_upgrade$
BEGIN
    IF EXISTS (SELECT FROM pg_proc AS p
               WHERE p.oid = to_regprocedure('mvrefresh_capture_bout_results()')
                 AND p.prosrc LIKE '%record_changes%') THEN
        EXECUTE {};
    END IF;
END
$mvrefresh_upgrade$;
"#,
        literal(ANALYTICS_CAPTURE_SQL)
    )
}

/// The name of a capture's row trigger (and, with `_truncate`, of its TRUNCATE trigger).
pub fn trigger_name(c: &CaptureConfig) -> String {
    format!("mvrefresh_capture_{}", c.name)
}

/// The insert and delete triggers a capture had with mvrefresh_capture 1.0 (install drops them).
/// `$`: no capture name has one, so no other capture's trigger is named so.
pub fn native_trigger_names(c: &CaptureConfig) -> (String, String) {
    let row = trigger_name(c);
    (format!("{row}$insert"), format!("{row}$delete"))
}

/// SQL: true when the database's mvrefresh_capture is version 1.1 or later (1.0's triggers
/// called `native_unseen_<slot>` in a `WHEN`; see extension/mvrefresh_capture.c).
pub const NATIVE_CURRENT: &str = "(to_regprocedure('mvrefresh.native_capture()') IS NOT NULL)";

/// SQL: true when mvrefresh_capture (known to be there, [`NATIVE_CURRENT`]) may be used: owned
/// by the owner of schema mvrefresh (the installing role) or by a superuser (a role with CREATE
/// on the database could otherwise create it, and drop it with CASCADE, and the triggers with
/// it), and that owner may create its triggers and call `native_keep` (the capture functions
/// run as it).
pub const NATIVE_USABLE: &str = "(SELECT (e.extowner = n.nspowner
             OR (SELECT r.rolsuper FROM pg_roles AS r WHERE r.oid = e.extowner))
            AND coalesce(has_function_privilege(n.nspowner,
                    to_regprocedure('mvrefresh.native_keep(pg_catalog.regprocedure, pg_catalog.anyelement, pg_catalog.int8)'),
                    'EXECUTE')
                AND has_function_privilege(n.nspowner,
                    to_regprocedure('mvrefresh.native_capture()'), 'EXECUTE'), false)
       FROM pg_extension AS e, pg_namespace AS n
      WHERE e.extname = 'mvrefresh_capture' AND n.nspname = 'mvrefresh')";

/// The statement triggers on `mvrefresh.dirty` that make every session forget what
/// mvrefresh_capture remembers when rows leave it (a collect): on delete, update, truncate.
pub const NATIVE_DIRTY_TRIGGERS: [&str; 3] = [
    "mvrefresh_forget$delete",
    "mvrefresh_forget$update",
    "mvrefresh_forget$truncate",
];

/// The session setting in which writers remember the keys they found dirty.
fn seen_setting(c: &CaptureConfig) -> String {
    format!("mvrefresh.seen_{}", c.name)
}

/// The capture's functions and triggers, and its row in `mvrefresh.capture`. The predicate is
/// read back from the catalog (a temporary view over the table aliased `n`, then `o`) so that
/// its column references can be qualified by the row they belong to; the columns it reads come
/// from the same view's dependencies.
///
/// Long on purpose: it is one SQL document (the row trigger's function, the TRUNCATE trigger,
/// the bookkeeping row) with its parameters quoted once at the top; split, the generated
/// trigger could no longer be read in one place.
pub fn capture_sql(c: &CaptureConfig) -> String {
    let table = c.table.quoted();
    let table_lit = literal(&table);
    let when = c.when.as_deref().unwrap_or("true");
    let key = ident(&c.key);
    let name = literal(&c.name);
    let seen = literal(&seen_setting(c));
    let f_row = format!("mvrefresh.{}", ident(&format!("capture_{}", c.name)));
    let f_clean = format!("mvrefresh.{}", ident(&format!("capture_{}_clean", c.name)));
    let f_keys = format!("mvrefresh.{}", ident(&format!("capture_{}_keys", c.name)));
    let f_rel = format!("mvrefresh.{}", ident(&format!("capture_{}_rel", c.name)));
    let f_clean_old = format!(
        "mvrefresh.{}",
        ident(&format!("capture_{}_clean_old", c.name))
    );
    let f_trunc = format!(
        "mvrefresh.{}",
        ident(&format!("capture_{}_truncate", c.name))
    );
    let t_row = trigger_name(c);
    let t_trunc = format!("{t_row}_truncate");
    let (t_ins, t_del) = native_trigger_names(c);
    // With mvrefresh_capture: the trigger function's inline slow path also keeps the key in the
    // session's native memory (read by the row trigger, native_capture), with the memory's epoch
    // read before the key was looked up. The capture function's OID names the capture.
    let epoch = literal("e := mvrefresh.native_epoch();");
    let remember = literal(&format!(
        "PERFORM mvrefresh.native_keep({}::pg_catalog.regprocedure, NEW.{key}, e);",
        literal(&format!("{f_row}()"))
    ));
    let channel = literal(&c.channel);
    let mut listed = vec![literal(&c.key)];
    listed.extend(c.columns.iter().map(|col| literal(col)));
    let listed = listed.join(", ");
    // Text spliced into a format() template: `%` doubled, and `%1$s` / `%2$s` stand for the
    // predicate of the new and of the old row.
    let esc = |text: &str| text.replace('%', "%%");
    let (t, k, sn) = (esc(&table), esc(&key), esc(&seen));
    // Conservative: true only when certainly nothing to mark (NULL counts as false). `clean`,
    // the common case: the new row is relevant, kept its key (or the old row had none), and the
    // writer's session remembers that key as dirty under the current generation (in one of 32
    // settings chosen by the key's hash, so a lookup reads a few entries). `clean_old`, asked
    // only when `clean` is not true: the new row is irrelevant, and so is the old one, or the
    // old key is remembered. Anything else (a row moving to another key, a NULL key, a delete
    // of a relevant row not remembered) takes the slow path. Each is kept small: PL/pgSQL sets
    // an expression up again in every transaction, at a cost that grows with its size (about
    // half a microsecond per function in it), so the common case pays for one only.
    // The setting's name and the remembered entry are built by format() (one call where
    // concatenations and casts take several, each set up again in every transaction). The
    // trigger's own slow path builds them alike. mark_keys builds them from the key's text
    // (`::text`), which is the same for every type whose text cast is its output function; for
    // the few where it is not (boolean, char(n), inet, cidr, "char", name) a key mark_keys
    // remembered is looked up once more when next written (nothing is lost). Casting here too
    // would cost every row an expression step.
    let cached = |side: &str| {
        format!(
            "strpos(current_setting(format('%%s_%%s', {sn}, hashtext({side}.{k}::text) & 31), true),
                    md5(format('%%s:%%s', {side}.{k}, pg_sequence_last_value('mvrefresh.generation'::regclass)))) > 0"
        )
    };
    let clean = format!(
        "(%1$s) AND (o.{k} IS NULL OR o.{k} = n.{k}) AND {cn}",
        cn = cached("n"),
    );
    let clean_old = format!(
        "NOT coalesce(%1$s, false) AND (NOT coalesce(%2$s, false) OR {co})",
        co = cached("o"),
    );
    // `rel`, asked only when `clean` is not true: the common slow path, a relevant row that kept
    // its (non-NULL) key, which the session does not remember; the trigger then marks that one
    // key itself (see below).
    let rel = format!("(%1$s) AND n.{k} IS NOT NULL AND (o.{k} IS NULL OR o.{k} = n.{k})");
    let keys = format!(
        "ARRAY[CASE WHEN coalesce(%1$s, false) THEN n.{k}::text END,
               CASE WHEN coalesce(%2$s, false)
                         AND NOT (coalesce(%1$s, false) AND n.{k} IS NOT DISTINCT FROM o.{k})
                    THEN o.{k}::text END]"
    );
    let (fc, fco, fk, fr, ftr, frel) = (
        esc(&f_clean),
        esc(&f_clean_old),
        esc(&f_keys),
        esc(&f_row),
        esc(&f_trunc),
        esc(&f_rel),
    );
    let fingerprint = literal(&fingerprint(c));
    format!(
        r#"DO $mvrefresh$
DECLARE
    when_new text;
    when_old text;
    cols     text;
    whole    boolean;
    previous regclass;
    native   boolean := false; -- the row trigger is mvrefresh_capture's native_capture
    epoch    text := '';
    remember text := '';
BEGIN
    -- mvrefresh_capture (see extension/): used when the database has it (1.1 or later), it is
    -- trustworthy, and the capture does not say `native = false`.
    IF {native_allowed} AND EXISTS (SELECT FROM pg_extension WHERE extname = 'mvrefresh_capture') THEN
      IF NOT {current} THEN
        RAISE WARNING 'capture %: mvrefresh_capture 1.0 is not used; run ALTER EXTENSION mvrefresh_capture UPDATE, then mvrefresh install again', {name};
      ELSIF NOT {usable} THEN
        RAISE WARNING 'capture %: mvrefresh_capture is not used: it must be owned by the owner of schema mvrefresh or by a superuser, and that owner needs EXECUTE on mvrefresh.native_capture and mvrefresh.native_keep', {name};
      ELSE
        native := true;
        epoch := {epoch};
        remember := {remember};
      END IF;
    END IF;
    CREATE TEMP VIEW mvrefresh_capture_when_n AS
        SELECT ({when})::boolean AS mvrefresh_when FROM {table} AS n, (SELECT) AS mvrefresh_x;
    CREATE TEMP VIEW mvrefresh_capture_when_o AS
        SELECT ({when})::boolean AS mvrefresh_when FROM {table} AS o, (SELECT) AS mvrefresh_x;
    when_new := substring(pg_get_viewdef('pg_temp.mvrefresh_capture_when_n'::regclass, false)
                          FROM '^\s*SELECT\s+(.*)\s+AS\s+mvrefresh_when\s+FROM\s');
    when_old := substring(pg_get_viewdef('pg_temp.mvrefresh_capture_when_o'::regclass, false)
                          FROM '^\s*SELECT\s+(.*)\s+AS\s+mvrefresh_when\s+FROM\s');
    -- UPDATE OF: the key, the listed columns and the columns the predicate reads (a whole-row
    -- reference in it reads them all).
    SELECT coalesce(bool_or(d.refobjsubid = 0), false) INTO whole
      FROM pg_depend AS d JOIN pg_rewrite AS r ON r.oid = d.objid
     WHERE r.ev_class = 'pg_temp.mvrefresh_capture_when_n'::regclass
       AND d.refobjid = {table_lit}::regclass;
    SELECT string_agg(quote_ident(x.col), ', ' ORDER BY x.col) INTO cols
      FROM (SELECT unnest(ARRAY[{listed}]::text[])
            UNION
            SELECT a.attname::text
              FROM pg_depend AS d
              JOIN pg_rewrite AS r ON r.oid = d.objid
              JOIN pg_attribute AS a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
             WHERE r.ev_class = 'pg_temp.mvrefresh_capture_when_n'::regclass
               AND d.refobjid = {table_lit}::regclass) AS x(col);
    DROP VIEW pg_temp.mvrefresh_capture_when_n, pg_temp.mvrefresh_capture_when_o;
    IF when_new IS NULL OR when_old IS NULL THEN
        RAISE EXCEPTION 'capture %: cannot read back its predicate `when`', {name};
    END IF;

    -- Nothing to do for this row: every key it makes dirty is remembered as dirty already.
    -- With mvrefresh_capture its row trigger asks the native memory first: a row that got here
    -- has a key it does not hold, so the session's settings are not asked again (a key they
    -- hold would otherwise never reach the path that tells the native memory); only an
    -- irrelevant row needs nothing.
    IF NOT native THEN
        EXECUTE format($mvrefresh_f$CREATE OR REPLACE FUNCTION {fc}(n {t}, o {t})
            RETURNS boolean LANGUAGE sql VOLATILE
            RETURN {clean}$mvrefresh_f$, when_new, when_old);
        EXECUTE format($mvrefresh_f$CREATE OR REPLACE FUNCTION {fco}(n {t}, o {t})
            RETURNS boolean LANGUAGE sql VOLATILE
            RETURN {clean_old}$mvrefresh_f$, when_new, when_old);
    ELSE
        EXECUTE format($mvrefresh_f$CREATE OR REPLACE FUNCTION {fc}(n {t}, o {t})
            RETURNS boolean LANGUAGE sql VOLATILE
            RETURN false$mvrefresh_f$);
        EXECUTE format($mvrefresh_f$CREATE OR REPLACE FUNCTION {fco}(n {t}, o {t})
            RETURNS boolean LANGUAGE sql VOLATILE
            RETURN NOT coalesce(%1$s, false) AND NOT coalesce(%2$s, false)$mvrefresh_f$,
            when_new, when_old);
    END IF;
    EXECUTE format($mvrefresh_f$CREATE OR REPLACE FUNCTION {frel}(n {t}, o {t})
        RETURNS boolean LANGUAGE sql VOLATILE
        RETURN {rel}$mvrefresh_f$, when_new, when_old);
    -- The keys this row makes dirty (NULL elements: none).
    EXECUTE format($mvrefresh_f$CREATE OR REPLACE FUNCTION {fk}(n {t}, o {t})
        RETURNS text[] LANGUAGE sql VOLATILE
        RETURN {keys}$mvrefresh_f$, when_new, when_old);
    EXECUTE format($mvrefresh_f$CREATE OR REPLACE FUNCTION {fr}() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER AS $mvrefresh_b$
        DECLARE
            added   pg_catalog.int4;
            e       pg_catalog.int8;
            g       pg_catalog.int8;
            k       pg_catalog.text;
            h       pg_catalog.text;
            setting pg_catalog.text;
            seen    pg_catalog.text;
        BEGIN
            IF {fc}(NEW, OLD) THEN
                RETURN NEW; -- ignored (AFTER); returning a variable sets up no expression
            END IF;
            -- The common slow path, as mvrefresh.mark_keys does it for one key (same generation
            -- read first, setting, entry, probe, notify and bound), inline: a call, its array
            -- and the other rows' tests cost a quarter of this path.
            IF {frel}(NEW, OLD) THEN
                k := NEW.{k}::pg_catalog.text;
                IF pg_catalog.octet_length(k) OPERATOR(pg_catalog.>) 1024 THEN
                    added := mvrefresh.mark_keys(%1$L, %2$L, ARRAY[k]);
                    RETURN NULL;
                END IF;
                %4$s
                g := pg_catalog.pg_sequence_last_value('mvrefresh.generation'::pg_catalog.regclass);
                -- From the typed value, as `clean` builds it (not from k: see capture_sql).
                h := pg_catalog.md5(pg_catalog.format('%%s:%%s', NEW.{k}, g));
                setting := pg_catalog.format('%%s_%%s', %2$L,
                                             pg_catalog.hashtext(k) OPERATOR(pg_catalog.&) 31);
                seen := COALESCE(pg_catalog.current_setting(setting, true), '');
                PERFORM FROM mvrefresh.dirty AS d
                WHERE d.channel OPERATOR(pg_catalog.=) %1$L
                  AND d.key OPERATOR(pg_catalog.=) k
                  AND d.xmax OPERATOR(pg_catalog.=) '0'::pg_catalog.xid;
                IF NOT FOUND THEN
                    INSERT INTO mvrefresh.dirty (channel, key) VALUES (%1$L, k);
                    IF g OPERATOR(pg_catalog.&) 1 OPERATOR(pg_catalog.=) 1 THEN
                        PERFORM pg_catalog.pg_notify(%1$L, '');
                    END IF;
                END IF;
                IF pg_catalog.octet_length(seen) OPERATOR(pg_catalog.>=) 512 THEN
                    seen := '';
                END IF;
                seen := pg_catalog.set_config(setting, seen OPERATOR(pg_catalog.||) h, false);
                %3$s
                RETURN NULL;
            END IF;
            IF {fco}(NEW, OLD) THEN
                RETURN NULL;
            END IF;
            -- An assignment, not PERFORM: an expression, not a whole query.
            added := mvrefresh.mark_keys(%1$L, %2$L, {fk}(NEW, OLD));
            RETURN NULL;
        END
        $mvrefresh_b$$mvrefresh_f$, {channel}, {seen}, remember, epoch);
    EXECUTE format($mvrefresh_f$CREATE OR REPLACE FUNCTION {ftr}() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER AS $mvrefresh_b$
        DECLARE
            added pg_catalog.int4;
        BEGIN
            added := mvrefresh.mark_keys(%1$L, %2$L, ARRAY['*']);
            RETURN NULL;
        END
        $mvrefresh_b$$mvrefresh_f$, {channel}, {seen});

    SELECT c.table_name INTO previous FROM mvrefresh.capture AS c WHERE c.name = {name};
    IF previous IS NOT NULL AND previous <> {table_lit}::regclass THEN
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', {t_row_lit}, previous);
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', {t_trunc_lit}, previous);
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', {t_ins_lit}, previous);
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', {t_del_lit}, previous);
    END IF;
    -- (Re)created only when missing, changed, disabled or firing only for replication (CREATE OR
    -- REPLACE enables them again): CREATE TRIGGER locks the table against writers.
    IF previous IS DISTINCT FROM {table_lit}::regclass
       OR NOT EXISTS (SELECT FROM mvrefresh.capture AS c
                      WHERE c.name = {name} AND c.fingerprint = {fingerprint})
       OR (SELECT count(*) FROM pg_trigger AS tg
           WHERE tg.tgrelid = {table_lit}::regclass
             AND tg.tgname IN ({t_row_lit}, {t_trunc_lit}) AND tg.tgenabled IN ('O', 'A')) <> 2
       OR EXISTS (SELECT FROM pg_trigger AS tg
                  WHERE tg.tgrelid = {table_lit}::regclass AND tg.tgname IN ({t_ins_lit}, {t_del_lit}))
       OR (SELECT tg.tgfoid FROM pg_trigger AS tg
           WHERE tg.tgrelid = {table_lit}::regclass AND tg.tgname = {t_row_lit})
          IS DISTINCT FROM (CASE WHEN native THEN to_regprocedure('mvrefresh.native_capture()')::oid
                                 ELSE to_regproc({f_row_lit})::oid END)
    THEN
        -- (mvrefresh_capture 1.0's insert and delete triggers.)
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', {t_ins_lit}, {table_lit});
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', {t_del_lit}, {table_lit});
        IF NOT native THEN
            EXECUTE format('CREATE OR REPLACE TRIGGER %I AFTER INSERT OR UPDATE%s OR DELETE ON %s
                                FOR EACH ROW EXECUTE FUNCTION %s()',
                           {t_row_lit}, CASE WHEN whole THEN '' ELSE ' OF ' || cols END,
                           {table_lit}, {f_row_lit});
        ELSE
            -- native_capture calls the capture function only for a row with a key the session
            -- does not remember (whatever the predicate: a remembered key is dirty already).
            EXECUTE format('CREATE OR REPLACE TRIGGER %I AFTER INSERT OR UPDATE%s OR DELETE ON %s
                                FOR EACH ROW EXECUTE FUNCTION mvrefresh.native_capture(%L, %L)',
                           {t_row_lit}, CASE WHEN whole THEN '' ELSE ' OF ' || cols END,
                           {table_lit}, {f_row_lit} || '()', {key_raw_lit});
        END IF;
        EXECUTE format('CREATE OR REPLACE TRIGGER %I AFTER TRUNCATE ON %s
                            FOR EACH STATEMENT EXECUTE FUNCTION %s()',
                       {t_trunc_lit}, {table_lit}, {f_trunc_lit});
    END IF;
END
$mvrefresh$;
DROP PUBLICATION IF EXISTS {publication};
COMMENT ON FUNCTION {f_row}() IS {comment};
REVOKE ALL ON FUNCTION {f_row}(), {f_trunc}(), {f_clean}({table}, {table}),
    {f_clean_old}({table}, {table}), {f_keys}({table}, {table}), {f_rel}({table}, {table})
    FROM PUBLIC;
{register}"#,
        register = register_sql(c),
        publication = ident(&c.publication_name()),
        t_row_lit = literal(&t_row),
        t_trunc_lit = literal(&t_trunc),
        t_ins_lit = literal(&t_ins),
        t_del_lit = literal(&t_del),
        native_allowed = c.native,
        current = NATIVE_CURRENT,
        usable = NATIVE_USABLE,
        key_raw_lit = literal(&c.key),
        f_row_lit = literal(&f_row),
        f_trunc_lit = literal(&f_trunc),
        comment = literal(&format!(
            "mvrefresh capture `{}`: {} → channel {}",
            c.name, c.table, c.channel
        )),
    )
}

/// The capture's row in `mvrefresh.capture` (written only when it changed), whichever its method.
pub fn register_sql(c: &CaptureConfig) -> String {
    format!(
        r#"INSERT INTO mvrefresh.capture (name, table_name, channel, fingerprint)
VALUES ({name}, {table}::regclass, {channel}, {fingerprint})
ON CONFLICT (name) DO UPDATE
    SET table_name = EXCLUDED.table_name, channel = EXCLUDED.channel,
        fingerprint = EXCLUDED.fingerprint
    WHERE (mvrefresh.capture.table_name, mvrefresh.capture.channel, mvrefresh.capture.fingerprint)
          IS DISTINCT FROM (EXCLUDED.table_name, EXCLUDED.channel, EXCLUDED.fingerprint);
"#,
        name = literal(&c.name),
        table = literal(&c.table.quoted()),
        channel = literal(&c.channel),
        fingerprint = literal(&fingerprint(c)),
    )
}

/// A fingerprint of everything a capture's triggers are generated from (64-bit FNV-1a of its
/// definition), so `check` can tell an installed capture that no longer matches the config.
pub fn fingerprint(c: &CaptureConfig) -> String {
    let definition = format!(
        "{}\u{0}{}\u{0}{}\u{0}{}\u{0}{:?}\u{0}{}",
        c.table,
        c.channel,
        c.key,
        c.when.as_deref().unwrap_or(""),
        c.columns,
        match c.method {
            CaptureMethod::Trigger => TRIGGER_TEMPLATE_VERSION,
            CaptureMethod::Logical => LOGICAL_TEMPLATE_VERSION,
        }
    );
    // A logical capture's differs from the trigger capture of the same definition (a trigger
    // capture's is what it was before there were two methods).
    let definition = match c.method {
        CaptureMethod::Trigger => definition,
        CaptureMethod::Logical => format!("{definition}\u{0}logical"),
    };
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in definition.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// Bumped whenever [`capture_sql`] changes what it generates.
const TRIGGER_TEMPLATE_VERSION: u32 = 8;

/// Bumped whenever a logical capture's install ([`logical::install_sql`]) changes what it
/// creates. It shared the trigger's version up to 5; kept apart since, so that a new trigger
/// template does not report every logical capture out of date.
const LOGICAL_TEMPLATE_VERSION: u32 = 6;

/// `--prune`: every registered capture this config does not name goes, triggers and functions.
fn prune_captures_sql(config: &Config) -> String {
    let names: Vec<String> = config.captures.iter().map(|c| literal(&c.name)).collect();
    format!(
        r#"DO $mvrefresh$
DECLARE
    c record;
    f record;
BEGIN
    FOR c IN SELECT * FROM mvrefresh.capture
             WHERE name <> ALL (ARRAY[{names}]::text[])
               AND name <> 'bout_results'
    LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'mvrefresh_capture_' || c.name, c.table_name);
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'mvrefresh_capture_' || c.name || '_truncate', c.table_name);
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'mvrefresh_capture_' || c.name || '$insert', c.table_name);
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'mvrefresh_capture_' || c.name || '$delete', c.table_name);
        FOR f IN SELECT p.oid::regprocedure AS fn FROM pg_proc AS p
                 WHERE p.pronamespace = 'mvrefresh'::regnamespace
                   AND p.proname IN ({functions})
        LOOP
            EXECUTE format('DROP FUNCTION %s', f.fn);
        END LOOP;
        EXECUTE format('DROP PUBLICATION IF EXISTS %I', 'mvrefresh_' || c.name);
        DELETE FROM mvrefresh.capture WHERE name = c.name;
    END LOOP;
END
$mvrefresh$;
"#,
        names = names.join(", "),
        functions = capture_function_names("c.name"),
    )
}

/// The names of the functions a trigger capture generates, as SQL expressions over `name` (an
/// SQL expression for the capture's name), for dropping them.
pub fn capture_function_names(name: &str) -> String {
    ["", "_truncate", "_clean", "_clean_old", "_keys", "_rel"]
        .iter()
        .map(|suffix| format!("'capture_' || {name} || '{suffix}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Adds the configured (channel, view) subscriptions that are missing; a newly subscribed view
/// gets a pending `*` (it may have missed changes, so it is refreshed whole once). With
/// `prune`, subscriptions this config does not name go, with the pending keys of views no
/// longer subscribed to anything.
fn subscriptions_sql(config: &Config, prune: bool) -> String {
    let pairs: Vec<String> = config
        .views
        .iter()
        .flat_map(|v| {
            let quoted = v.relation().quoted();
            let shown = v.relation().to_string();
            v.channels.iter().map(move |ch| {
                format!(
                    "({}, coalesce(mvrefresh.view_name({}), {}))",
                    literal(ch),
                    literal(&quoted),
                    literal(&shown)
                )
            })
        })
        .collect();
    let desired = if pairs.is_empty() {
        "SELECT NULL::text AS channel, NULL::text AS view_name WHERE false".to_owned()
    } else {
        format!(
            "SELECT * FROM (VALUES {}) AS d(channel, view_name)",
            pairs.join(", ")
        )
    };
    let prune = if prune {
        "DELETE FROM mvrefresh.subscription s
WHERE NOT EXISTS (SELECT 1 FROM mvrefresh_desired d
                  WHERE d.channel = s.channel AND d.view_name = s.view_name);
DELETE FROM mvrefresh.pending p
WHERE NOT EXISTS (SELECT 1 FROM mvrefresh.subscription s WHERE s.view_name = p.view_name)
  AND NOT EXISTS (SELECT 1 FROM mvrefresh_desired d WHERE d.view_name = p.view_name);
"
    } else {
        ""
    };
    format!(
        r#"CREATE TEMP TABLE mvrefresh_desired ON COMMIT DROP AS {desired};
{prune}SELECT mvrefresh.subscribe(array_agg(channel), array_agg(view_name)) FROM mvrefresh_desired;
DROP TABLE mvrefresh_desired;
"#
    )
}

#[cfg(test)]
mod tests;
