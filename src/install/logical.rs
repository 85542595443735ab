//! The transaction part of a logical capture's install (the slot comes after it:
//! [`crate::logical::after_install`]).

use crate::config::CaptureConfig;
use crate::logical::partitions_sql;
use crate::sql::{ident, literal};

/// The transaction part of a logical capture's install: replica identity, publication (created,
/// or its table and row filter set again when the capture's definition changed), the partitions
/// made ready ([`partitions_sql`]), the trigger capture's triggers and functions dropped if the
/// capture was one, the registration.
///
/// A partitioned table's publication holds the table without a row filter (PostgreSQL allows
/// none on a partitioned table whose partitions publish as themselves) and each leaf partition
/// with the `when` filter: a partition's changes are then filtered, and a partition's TRUNCATE
/// is delivered (with `publish_via_partition_root` it would not be).
pub fn install_sql(c: &CaptureConfig) -> String {
    let table = c.table.quoted();
    let table_lit = literal(&table);
    let name = literal(&c.name);
    let publication = ident(&c.publication_name());
    let filter = c
        .when
        .as_deref()
        .map(|w| format!(" WHERE ({w})"))
        .unwrap_or_default();
    let fingerprint = literal(&super::fingerprint(c));
    let partitions = partitions_sql(c, None);
    format!(
        r#"DO $mvrefresh$
DECLARE
    partitioned boolean := (SELECT c.relkind = 'p' FROM pg_class AS c
                            WHERE c.oid = {table_lit}::regclass);
BEGIN
    IF (SELECT c.relreplident FROM pg_class AS c WHERE c.oid = {table_lit}::regclass) <> 'f' THEN
        ALTER TABLE {table} REPLICA IDENTITY FULL;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_publication WHERE pubname = {pub_lit}) THEN
        IF partitioned THEN
            CREATE PUBLICATION {publication} FOR TABLE {table}
                WITH (publish = 'insert, update, delete, truncate');
        ELSE
            CREATE PUBLICATION {publication} FOR TABLE {table}{filter}
                WITH (publish = 'insert, update, delete, truncate');
        END IF;
    ELSIF NOT EXISTS (SELECT FROM mvrefresh.capture AS c
                      WHERE c.name = {name} AND c.fingerprint = {fingerprint}) THEN
        IF partitioned THEN
            ALTER PUBLICATION {publication} SET TABLE {table};
        ELSE
            ALTER PUBLICATION {publication} SET TABLE {table}{filter};
        END IF;
    END IF;
END
$mvrefresh$;
{identity}{members}{drop_trigger}{register}"#,
        register = super::register_sql(c),
        pub_lit = literal(&c.publication_name()),
        identity = partitions[0],
        members = partitions[1],
        drop_trigger = drop_trigger_capture_sql(&c.name),
    )
}

/// Drops the triggers and trigger functions capture `name` had as a trigger capture, in its
/// install transaction.
fn drop_trigger_capture_sql(name: &str) -> String {
    let name_lit = literal(name);
    format!(
        r#"DO $mvrefresh_drop$
DECLARE
    t record;
    f record;
BEGIN
    FOR t IN SELECT tg.tgrelid::regclass AS rel, tg.tgname FROM pg_trigger AS tg
             WHERE NOT tg.tgisinternal AND tg.tgparentid = 0
               AND tg.tgname IN ('mvrefresh_capture_' || {name_lit},
                                 'mvrefresh_capture_' || {name_lit} || '_truncate',
                                 'mvrefresh_capture_' || {name_lit} || '$insert',
                                 'mvrefresh_capture_' || {name_lit} || '$delete')
    LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', t.tgname, t.rel);
    END LOOP;
    FOR f IN SELECT p.oid::regprocedure AS fn FROM pg_proc AS p
             WHERE p.pronamespace = 'mvrefresh'::regnamespace
               AND p.proname IN ({functions})
    LOOP
        EXECUTE format('DROP FUNCTION %s', f.fn);
    END LOOP;
END
$mvrefresh_drop$;
"#,
        functions = super::capture_function_names(&name_lit),
    )
}
