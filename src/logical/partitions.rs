//! A partitioned captured table: what makes its partitions ready for logical capture (replica
//! identity, the publication's members and row filters), for `install` and for the reader.

use tokio_postgres::GenericClient;

use crate::config::CaptureConfig;
use crate::sql::literal;

/// The partitions of capture `c`'s table that are not ready for logical capture, or only
/// partly: a replica identity other than FULL (the old row is unknown, so every update marks
/// everything dirty; and without a primary key PostgreSQL refuses writers' UPDATE and DELETE
/// on a table a publication holds), or, with `when`, a leaf the publication does not filter
/// (every change to it marks its key). A partition created or attached after `install` is one.
/// Also the publication's members that are no longer in the table (a detached partition: its
/// own TRUNCATE would mark everything). Unlogged and foreign partitions are not decoded at all
/// ([`undecoded_partitions`]), so nothing is asked of them. `$1`: the table, `$2`: the
/// publication, `$3`: whether there is a `when`.
const UNREADY_PARTITIONS: &str = "
    SELECT t.relid::regclass AS rel, k.relreplident <> 'f' AS identity, false AS stray
    FROM pg_partition_tree($1::text::regclass) AS t
    JOIN pg_class AS k ON k.oid = t.relid
    WHERE t.level > 0 AND k.relkind IN ('r', 'p') AND k.relpersistence = 'p'
      AND (k.relreplident <> 'f'
           OR ($3 AND t.isleaf AND NOT EXISTS (
                   SELECT FROM pg_publication_rel AS pr
                   JOIN pg_publication AS p ON p.oid = pr.prpubid
                   WHERE p.pubname = $2 AND pr.prrelid = t.relid)))
    UNION ALL
    SELECT pr.prrelid::regclass, false, true
    FROM pg_publication_rel AS pr
    JOIN pg_publication AS p ON p.oid = pr.prpubid
    WHERE p.pubname = $2 AND pr.prrelid <> $1::text::regclass
      AND pr.prrelid NOT IN (SELECT t.relid FROM pg_partition_tree($1::text::regclass) AS t)";

/// The statements that make the partitions of capture `c`'s table ready (`UNREADY_PARTITIONS`),
/// each waiting at most `lock_timeout` for a table's lock (`None`: as long as the session's
/// `lock_timeout` says): every partition `REPLICA IDENTITY FULL`; then, in a statement of its
/// own (so that a failure there does not undo the first, which is what keeps writers working),
/// the publication's members that left the table dropped and, with `when`, each leaf added with
/// that row filter. Nothing for a table that is not partitioned.
pub fn partitions_sql(c: &CaptureConfig, lock_timeout: Option<&str>) -> [String; 2] {
    let wait = lock_timeout
        .map(|t| {
            format!(
                "\n    PERFORM set_config('lock_timeout', {}, true);",
                literal(t)
            )
        })
        .unwrap_or_default();
    let publication = literal(&c.publication_name());
    let add = match &c.when {
        Some(w) => format!(
            "EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s WHERE (%s)', {publication}, \
             r.rel, {});",
            literal(w)
        ),
        None => "NULL;".to_owned(),
    };
    // The values go in last (the table's name may hold a `$`); the publication's name is
    // `mvrefresh_` and a capture name, which has none.
    let query = UNREADY_PARTITIONS
        .replace("$3", if c.when.is_some() { "true" } else { "false" })
        .replace("$2", &publication)
        .replace(
            "$1::text::regclass",
            &format!("{}::regclass", literal(&c.table.quoted())),
        );
    let block = |body: String| {
        format!(
            r#"DO $mvrefresh_partitions$
DECLARE
    r record;
BEGIN{wait}
{body}
END
$mvrefresh_partitions$;
"#
        )
    };
    [
        block(format!(
            "    FOR r IN SELECT * FROM ({query}) AS u WHERE u.identity LOOP
        EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', r.rel);
    END LOOP;"
        )),
        block(format!(
            "    FOR r IN SELECT * FROM ({query}) AS u WHERE u.stray LOOP
        EXECUTE format('ALTER PUBLICATION %I DROP TABLE %s', {publication}, r.rel);
    END LOOP;
    FOR r IN SELECT * FROM ({query}) AS u WHERE NOT u.identity AND NOT u.stray LOOP
        {add}
    END LOOP;"
        )),
    ]
}

/// The partitions of capture `c`'s table that are not ready for logical capture (see
/// `UNREADY_PARTITIONS`), by name.
pub async fn unready_partitions(
    client: &impl GenericClient,
    c: &CaptureConfig,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!("SELECT rel::text FROM ({UNREADY_PARTITIONS}) AS u ORDER BY 1"),
            &[&c.table.quoted(), &c.publication_name(), &c.when.is_some()],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The partitions of capture `c`'s table whose changes are never decoded: unlogged tables
/// (not in the write-ahead log) and foreign tables (stored elsewhere).
pub async fn undecoded_partitions(
    client: &impl GenericClient,
    c: &CaptureConfig,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT t.relid::regclass::text
             FROM pg_partition_tree($1::text::regclass) AS t
             JOIN pg_class AS k ON k.oid = t.relid
             WHERE t.isleaf AND (k.relkind = 'f' OR k.relpersistence <> 'p')
             ORDER BY 1",
            &[&c.table.quoted()],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
