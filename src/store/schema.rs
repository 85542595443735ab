//! The installed schema and what is installed in it: its version, the names views are
//! recorded under, captures, subscriptions, this role's privileges.

use tokio_postgres::GenericClient;

use crate::config::{Config, ViewConfig};

/// The version of mvrefresh's schema installed in this database (`mvrefresh.meta`): `None` when
/// it is not installed, `"?"` when its version row is missing.
pub async fn installed_version(
    client: &impl GenericClient,
) -> Result<Option<String>, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT to_regclass('mvrefresh.meta') IS NOT NULL", &[])
        .await?;
    if !row.get::<_, bool>(0) {
        return Ok(None);
    }
    let version = client
        .query_opt(
            "SELECT value FROM mvrefresh.meta WHERE key = 'schema_version'",
            &[],
        )
        .await?;
    Ok(Some(version.map_or_else(|| "?".to_owned(), |r| r.get(0))))
}

/// The names `views` are recorded under (subscriptions, pending keys, history; see
/// `mvrefresh.view_name`), in their order; a view the catalog does not know keeps its configured
/// spelling.
pub async fn recorded_names(
    client: &impl GenericClient,
    views: &[ViewConfig],
) -> Result<Vec<String>, tokio_postgres::Error> {
    let quoted: Vec<String> = views.iter().map(|v| v.relation().quoted()).collect();
    let rows = client
        .query(
            "SELECT mvrefresh.view_name(q) FROM unnest($1::text[]) WITH ORDINALITY AS u(q, i)
             ORDER BY i",
            &[&quoted],
        )
        .await?;
    Ok(rows
        .iter()
        .zip(views)
        .map(|(r, v)| {
            r.get::<_, Option<String>>(0)
                .unwrap_or_else(|| v.relation().to_string())
        })
        .collect())
}

/// The channels whose keys a capture records in `dirty` (their notifications are wake-ups).
pub async fn captured_channels(
    client: &impl GenericClient,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT DISTINCT channel FROM mvrefresh.capture ORDER BY channel",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Adds the (channel, view) subscriptions that are missing. A newly subscribed view gets a
/// pending `*`: it may have missed changes, so it is refreshed whole once.
pub async fn ensure_subscriptions(
    client: &impl GenericClient,
    pairs: &[(String, String)],
) -> Result<u64, tokio_postgres::Error> {
    let channels: Vec<&str> = pairs.iter().map(|(c, _)| c.as_str()).collect();
    let views: Vec<&str> = pairs.iter().map(|(_, v)| v.as_str()).collect();
    let row = client
        .query_one(
            "SELECT mvrefresh.subscribe($1::text[], $2::text[])",
            &[&channels, &views],
        )
        .await?;
    Ok(row.get::<_, i64>(0) as u64)
}

/// Whether `mvrefresh.view_name` exists (the names views are recorded under).
pub async fn names_views(client: &impl GenericClient) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT to_regprocedure('mvrefresh.view_name(text)') IS NOT NULL",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// The privileges on mvrefresh's tables the daemon needs and this role lacks (`table (privs)`).
pub async fn missing_privileges(
    client: &impl GenericClient,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT t.name || ' (' || t.privs || ')' FROM (VALUES
                 ('mvrefresh.dirty', 'SELECT,UPDATE,DELETE'),
                 ('mvrefresh.pending', 'SELECT,INSERT,UPDATE,DELETE'),
                 ('mvrefresh.refresh_history', 'SELECT,INSERT,DELETE'),
                 ('mvrefresh.subscription', 'SELECT,INSERT'),
                 ('mvrefresh.capture', 'SELECT')) AS t(name, privs)
             WHERE NOT has_table_privilege(t.name, t.privs)
             UNION ALL
             SELECT 'mvrefresh.generation (UPDATE)'
             WHERE NOT has_sequence_privilege('mvrefresh.generation', 'UPDATE')",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Whether capture `name` was installed from the configuration whose fingerprint is
/// `fingerprint`.
pub async fn capture_is_current(
    client: &impl GenericClient,
    name: &str,
    fingerprint: &str,
) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT coalesce((SELECT fingerprint = $2 FROM mvrefresh.capture WHERE name = $1), false)",
            &[&name, &fingerprint],
        )
        .await?;
    Ok(row.get(0))
}

/// Captures and subscribed views installed in this database that `config` does not name
/// (`capture <name>`, `view <name>`), sorted.
pub async fn not_configured(
    client: &impl GenericClient,
    config: &Config,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let captures: Vec<&str> = config.captures.iter().map(|c| c.name.as_str()).collect();
    let views: Vec<String> = config.views.iter().map(|v| v.name.to_string()).collect();
    let rows = client
        .query(
            "SELECT 'capture ' || name FROM mvrefresh.capture
             WHERE name <> ALL ($1) AND name <> 'bout_results'
             UNION ALL
             SELECT DISTINCT 'view ' || view_name FROM mvrefresh.subscription
             WHERE view_name <> ALL ($2)
             ORDER BY 1",
            &[&captures, &views],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
