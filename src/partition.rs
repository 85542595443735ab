//! Mode `partitioned`: a table kept equal to a source view by recomputing only the dirty keys.
//!
//! A view is *partitioned by* a column `key` when each of its rows depends only on the source
//! rows with the same `key` (a per-challenge distribution, a per-tenant ranking, …): then the
//! source restricted to keys K, whatever SQL it runs (percentiles, window functions partitioned
//! by the key, HAVING, joins, CTEs), is exactly the part of the whole result with keys K.
//!
//! A refresh of keys K computes `source WHERE key = ANY(K)` and `source WHERE key IS NULL` once
//! (a `MATERIALIZED` CTE), deletes the table's rows of those keys whose unique columns no computed
//! row has, and upserts the computed rows that no table row equals (`ON CONFLICT` on the unique
//! columns: a changed row is updated in place, HOT when no indexed column changed), in one
//! statement of the refresh's transaction: rows that did not change are not rewritten (no WAL,
//! no bloat), readers see the old rows until commit. Rows are matched on the table's unique
//! columns (hash joins) and compared whole by binary image (`*=`, the comparison
//! `REFRESH … CONCURRENTLY` uses; it works for every type, `json` included). A source that
//! yields two rows with the same unique columns makes the refresh fail, saying so. Everything (`*`) is the same without the restriction.
//! Rows whose key is NULL are recomputed with every refresh (the capture marks no key for them).
//!
//! [`resolve`] checks what this needs, each problem with its fix: a table, a source whose
//! columns (names and types, in order) are the table's, the key column, a usable unique index,
//! and that PostgreSQL can push the key restriction into the source: otherwise each refresh
//! would compute the whole source and filter afterwards (see [`pushdown_problem`]).

use tokio_postgres::GenericClient;

use crate::config::ViewConfig;
use crate::sql::{ident, Relation};

/// What a partitioned view's refresh needs, resolved once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// The source, quoted and schema-qualified.
    pub source: String,
    /// The source's oid (the views it reads are the ones this view waits for).
    pub source_oid: u32,
    /// The key column's name.
    pub key: String,
    /// The key column's type (`format_type`), to cast the keys to.
    pub key_type: String,
    /// The columns of the table's unique index.
    pub unique: Vec<String>,
    /// Every column of the table, in order.
    pub columns: Vec<String>,
}

/// A problem with a partitioned view, and its fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unfit {
    pub message: String,
    pub fix: String,
}

fn unfit(message: impl Into<String>, fix: impl Into<String>) -> Unfit {
    Unfit {
        message: message.into(),
        fix: fix.into(),
    }
}

/// Resolves view `v` (the table `table_oid`, quoted `target`) in mode `partitioned`.
pub async fn resolve(
    client: &impl GenericClient,
    v: &ViewConfig,
    table_oid: u32,
    target: &str,
) -> Result<Result<Partition, Vec<Unfit>>, tokio_postgres::Error> {
    let (Some(source), Some(key)) = (&v.source, &v.key) else {
        // Validated at load.
        return Ok(Err(vec![unfit(
            "mode `partitioned` needs `source` and `key`",
            "set them",
        )]));
    };
    let Some((source_oid, source_q)) = relation(client, source).await? else {
        return Ok(Err(vec![unfit(
            format!("source {source} does not exist"),
            "create the view, or fix `source`",
        )]));
    };
    let table_cols = columns(client, table_oid).await?;
    let source_cols = columns(client, source_oid).await?;
    let Some((_, key_type)) = source_cols.iter().find(|(n, _)| n == key) else {
        return Ok(Err(vec![unfit(
            format!("key column `{key}` is not a column of source {source}"),
            "fix `key`, or add the column to the source",
        )]));
    };
    let key_type = key_type.clone();
    let mut problems = Vec::new();
    if table_cols != source_cols {
        problems.push(unfit(
            format!(
                "its columns ({}) are not those of its source {source} ({})",
                describe(&table_cols),
                describe(&source_cols)
            ),
            format!(
                "recreate the table from the source (DROP TABLE {target}; then `mvrefresh \
                 install` creates it), or change the source"
            ),
        ));
    }
    let unique = unique_columns(client, table_oid).await?;
    if unique.is_none() {
        problems.push(unfit(
            "has no usable unique index (a UNIQUE index on plain columns, without WHERE): the \
             difference is applied by the columns that identify a row",
            format!(
                "set `unique = [...]` on the view and run `mvrefresh install`, or CREATE UNIQUE \
                 INDEX ON {target} (<columns that identify a row>)"
            ),
        ));
    }
    let privileged: bool = client
        .query_one(
            "SELECT has_table_privilege($1::oid, 'SELECT,INSERT,DELETE')
                    AND has_table_privilege($2::oid, 'SELECT')",
            &[&table_oid, &source_oid],
        )
        .await?
        .get(0);
    if !privileged {
        problems.push(unfit(
            format!("the connecting role cannot read {source} and write {target}"),
            format!("GRANT SELECT, INSERT, DELETE ON {target} and SELECT ON {source} to this role"),
        ));
    }
    if let Some(p) = pushdown(client, &source_q, key, &key_type).await? {
        problems.push(p);
    }
    if !problems.is_empty() {
        return Ok(Err(problems));
    }
    Ok(Ok(Partition {
        source: source_q,
        source_oid,
        key: key.clone(),
        key_type,
        unique: unique.unwrap_or_default(),
        columns: table_cols.into_iter().map(|(n, _)| n).collect(),
    }))
}

/// The oid and quoted name of `rel`, when it is a relation rows can be read from.
async fn relation(
    client: &impl GenericClient,
    rel: &Relation,
) -> Result<Option<(u32, String)>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT c.oid, quote_ident(n.nspname) || '.' || quote_ident(c.relname)
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
            &[&rel.quoted()],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// A relation's columns: name and type, in order.
async fn columns(
    client: &impl GenericClient,
    oid: u32,
) -> Result<Vec<(String, String)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&oid],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

fn describe(cols: &[(String, String)]) -> String {
    cols.iter()
        .map(|(n, t)| format!("{n} {t}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The columns of the relation's unique index on plain columns, without WHERE (its primary key
/// first, else the narrowest); `None` when it has none.
pub(crate) async fn unique_columns(
    client: &impl GenericClient,
    oid: u32,
) -> Result<Option<Vec<String>>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT array_agg(a.attname::text ORDER BY k.n)
             FROM pg_index i
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = $1 AND i.indisunique AND i.indisvalid
               AND i.indpred IS NULL AND i.indexprs IS NULL
             GROUP BY i.indexrelid, i.indisprimary
             ORDER BY i.indisprimary DESC, count(*), i.indexrelid
             LIMIT 1",
            &[&oid],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// The marker the restriction carries in `EXPLAIN`: an array no real key list looks like.
const MARKER: &str = "'{NULL,NULL}'";

/// Plan nodes that read a relation: a restriction applied there reads only what it keeps.
const SCANS: [&str; 10] = [
    "Seq Scan",
    "Index Scan",
    "Index Only Scan",
    "Bitmap Heap Scan",
    "Bitmap Index Scan",
    "Tid Scan",
    "Tid Range Scan",
    "Foreign Scan",
    "Sample Scan",
    "Custom Scan",
];

/// Whether PostgreSQL pushes `key = ANY(…)` into `source`: the plan of the restricted source
/// must apply the restriction only where rows are read, not above an aggregate, a window, a
/// materialized CTE, a function or a join.
async fn pushdown(
    client: &impl GenericClient,
    source: &str,
    key: &str,
    key_type: &str,
) -> Result<Option<Unfit>, tokio_postgres::Error> {
    let sql = format!(
        "EXPLAIN (FORMAT JSON, COSTS OFF) SELECT * FROM {source} AS s WHERE s.{} = ANY ({MARKER}::{key_type}[])",
        ident(key)
    );
    let rows = client.simple_query(&sql).await?;
    let plan = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    });
    let Some(plan) = plan.and_then(|p| serde_json::from_str::<serde_json::Value>(&p).ok()) else {
        return Ok(None);
    };
    Ok(pushdown_problem(&plan[0]["Plan"], key))
}

/// The problem when the restriction (recognised by its marker array) is applied above a node that
/// reads rows, in an `EXPLAIN (FORMAT JSON)` plan.
pub fn pushdown_problem(node: &serde_json::Value, key: &str) -> Option<Unfit> {
    let kind = node["Node Type"].as_str().unwrap_or("?");
    let marker = MARKER.trim_matches('\'');
    for field in ["Filter", "Join Filter", "Hash Cond", "Merge Cond"] {
        let applied = node[field].as_str().is_some_and(|f| f.contains(marker));
        if applied && !SCANS.contains(&kind) {
            let above = node["Plans"][0]["Node Type"]
                .as_str()
                .unwrap_or("its input");
            return Some(unfit(
                format!(
                    "PostgreSQL cannot push `{key} = …` into the source: it is applied at a \
                     {kind} node above {above}, so every refresh would compute the whole source"
                ),
                format!(
                    "make `{key}` a GROUP BY column (or window PARTITION BY column) of every \
                     part of the source, without MATERIALIZED CTEs in between; or use mode = \
                     \"concurrently\""
                ),
            ));
        }
    }
    node["Plans"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|p| pushdown_problem(p, key))
}

/// How many lock buckets a partitioned view's keys fall into (see [`bucket`]).
pub const BUCKETS: u32 = 32;

/// The lock bucket of the rows whose key is NULL (recomputed by one refresh of keys at a time).
pub const NULL_BUCKET: i32 = BUCKETS as i32;

/// The lock bucket of `key`: a refresh of keys K holds the view's lock shared and the locks of
/// K's buckets exclusively, so refreshes of disjoint buckets (the parallel chunks of one batch,
/// or two replicas) run at once while no two ever write the same key, and a whole refresh
/// (the view's lock exclusive) waits for all of them. FNV-1a: the same in every replica and
/// version, and every key of a bucket goes to the same chunk.
pub fn bucket(key: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    (h % BUCKETS) as i32
}

/// What a refresh of `view` recomputes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything.
    All,
    /// The keys `$1` (`text[]`), and the rows whose key is NULL when `nulls`.
    Keys { nulls: bool },
}

/// The refresh statement of `scope`. It returns the rows deleted and the rows inserted or
/// updated.
pub fn refresh_sql(p: &Partition, target: &str, scope: Scope) -> String {
    let key = ident(&p.key);
    let (keyed, nulls) = match scope {
        Scope::All => (false, false),
        Scope::Keys { nulls } => (true, nulls),
    };
    let restrict = |alias: &str| match (keyed, nulls) {
        (false, _) => "true".to_owned(),
        (true, true) => format!(
            "({alias}.{key} = ANY ($1::text[]::{}[]) OR {alias}.{key} IS NULL)",
            p.key_type
        ),
        (true, false) => format!("{alias}.{key} = ANY ($1::text[]::{}[])", p.key_type),
    };
    let same_key = |a: &str, b: &str| {
        p.unique
            .iter()
            .map(|c| format!("{a}.{c} = {b}.{c}", c = ident(c)))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    let conflict: Vec<String> = p.unique.iter().map(|c| ident(c)).collect();
    let set: Vec<String> = p
        .columns
        .iter()
        .filter(|c| !p.unique.contains(c))
        .map(|c| format!("{c} = EXCLUDED.{c}", c = ident(c)))
        .collect();
    let on_conflict = if set.is_empty() {
        format!("ON CONFLICT ({}) DO NOTHING", conflict.join(", "))
    } else {
        format!(
            "ON CONFLICT ({}) DO UPDATE SET {}",
            conflict.join(", "),
            set.join(", ")
        )
    };
    // Whole-row references: `ROW(a.*) op ROW(b.*)` would be compared column by column.
    // Two branches, each pushed into the source on its own: `key = ANY(…) OR key IS NULL` in
    // one would keep an index on the key from being used.
    let fresh = if keyed {
        let null_rows = if nulls {
            format!(
                "UNION ALL SELECT * FROM {source} AS s WHERE s.{key} IS NULL",
                source = p.source
            )
        } else {
            String::new()
        };
        format!(
            "SELECT * FROM {source} AS s WHERE s.{key} = ANY ($1::text[]::{kt}[])
             {null_rows}",
            source = p.source,
            kt = p.key_type
        )
    } else {
        format!("SELECT * FROM {}", p.source)
    };
    format!(
        "WITH fresh AS MATERIALIZED (
             {fresh}
         ), gone AS (
             DELETE FROM {target} AS t
             WHERE {rt} AND NOT EXISTS (SELECT FROM fresh AS f WHERE {ft})
             RETURNING 1
         ), merged AS (
             INSERT INTO {target} AS t
             SELECT f.* FROM fresh AS f
             WHERE NOT EXISTS (SELECT FROM {target} AS o
                               WHERE {ro} AND {of} AND o OPERATOR(pg_catalog.*=) f)
             {on_conflict}
             RETURNING 1
         )
         SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM merged)",
        rt = restrict("t"),
        ro = restrict("o"),
        ft = same_key("f", "t"),
        of = same_key("o", "f"),
    )
}

/// What `install` runs for a partitioned view: its table, made from the source when missing
/// (empty: the daemon's first refresh fills it), and the unique index `unique` names.
pub fn install_sql(v: &ViewConfig) -> Option<String> {
    let source = v.source.as_ref()?;
    let target = v.name.quoted();
    let mut sql = format!(
        "CREATE TABLE IF NOT EXISTS {target} AS SELECT * FROM {} WITH NO DATA;\n",
        source.quoted()
    );
    if let Some(cols) = &v.unique {
        let index = ident(&format!("{}_mvrefresh_unique", v.name.name));
        let cols: Vec<String> = cols.iter().map(|c| ident(c)).collect();
        // An index lives in its table's schema.
        sql.push_str(&format!(
            "CREATE UNIQUE INDEX IF NOT EXISTS {index} ON {target} ({});\n",
            cols.join(", ")
        ));
    }
    Some(sql)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_restriction_at_a_scan_is_pushed_down() {
        let plan = json!({"Node Type": "HashAggregate", "Plans": [
            {"Node Type": "Bitmap Heap Scan", "Recheck Cond": "(k = ANY ('{NULL,NULL}'::integer[]))",
             "Plans": [{"Node Type": "Bitmap Index Scan", "Index Cond": "(k = ANY ('{NULL,NULL}'::integer[]))"}]}
        ]});
        assert_eq!(pushdown_problem(&plan, "k"), None);
    }

    #[test]
    fn a_restriction_above_an_aggregate_is_refused_naming_the_node() {
        let plan = json!({"Node Type": "Subquery Scan", "Filter": "(s.k = ANY ('{NULL,NULL}'::integer[]))",
            "Plans": [{"Node Type": "Aggregate", "Plans": [{"Node Type": "Seq Scan"}]}]});
        let p = pushdown_problem(&plan, "k").unwrap();
        assert!(
            p.message.contains("Subquery Scan node above Aggregate"),
            "{}",
            p.message
        );
        assert!(p.fix.contains("GROUP BY"), "{}", p.fix);
    }

    #[test]
    fn buckets_are_stable_and_spread() {
        // Pinned: replicas of different versions must agree on a key's bucket.
        assert_eq!(bucket(""), (0x811c_9dc5_u32 % BUCKETS) as i32);
        assert_eq!(bucket("a"), (0xe40c_292c_u32 % BUCKETS) as i32);
        let used: std::collections::BTreeSet<i32> =
            (1..=200).map(|k| bucket(&k.to_string())).collect();
        assert_eq!(used.len(), BUCKETS as usize, "200 keys use every bucket");
        assert!(used.iter().all(|b| (0..NULL_BUCKET).contains(b)));
    }

    #[test]
    fn the_refresh_statement_matches_on_the_unique_columns_and_upserts_what_differs() {
        let p = Partition {
            source: "\"public\".\"src\"".into(),
            source_oid: 1,
            key: "challenge_id".into(),
            key_type: "integer".into(),
            unique: vec!["challenge_id".into(), "lane".into()],
            columns: vec!["challenge_id".into(), "lane".into(), "n".into()],
        };
        let sql = refresh_sql(&p, "\"public\".\"t\"", Scope::Keys { nulls: true });
        assert!(
            sql.contains(
                "WHERE s.\"challenge_id\" = ANY ($1::text[]::integer[])\n             UNION ALL SELECT * FROM \"public\".\"src\" AS s WHERE s.\"challenge_id\" IS NULL"
            ),
            "{sql}"
        );
        assert!(
            sql.contains(
                "(t.\"challenge_id\" = ANY ($1::text[]::integer[]) OR t.\"challenge_id\" IS NULL)"
            ),
            "{sql}"
        );
        // A chunk that leaves the NULL rows to another touches its keys only.
        let chunk = refresh_sql(&p, "\"public\".\"t\"", Scope::Keys { nulls: false });
        assert!(!chunk.contains("IS NULL"), "{chunk}");
        assert!(
            sql.contains("o.\"lane\" = f.\"lane\" AND o OPERATOR(pg_catalog.*=) f"),
            "{sql}"
        );
        assert!(
            sql.contains(
                "ON CONFLICT (\"challenge_id\", \"lane\") DO UPDATE SET \"n\" = EXCLUDED.\"n\""
            ),
            "{sql}"
        );
        let all = refresh_sql(&p, "\"public\".\"t\"", Scope::All);
        assert!(!all.contains("$1"), "{all}");
    }
}
