//! The pg_cron watch's cursor (`mvrefresh.pg_cron_cursor`): the last run reported per pg_cron
//! database, the failed runs already alerted beyond it, and a version for replicas to take
//! turns.

use tokio_postgres::GenericClient;

/// `(last_runid, alerted, version)` of the cursor of `database`, when there is one.
pub async fn read_cursor(
    client: &impl GenericClient,
    database: &str,
) -> Result<Option<(i64, Vec<i64>, i64)>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT last_runid, alerted, version FROM mvrefresh.pg_cron_cursor
             WHERE cron_database = $1",
            &[&database],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
}

/// Creates the cursor of `database` at `start`, unless another replica just did.
pub async fn create_cursor(
    client: &impl GenericClient,
    database: &str,
    start: i64,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO mvrefresh.pg_cron_cursor (cron_database, last_runid) VALUES ($1, $2)
             ON CONFLICT (cron_database) DO NOTHING",
            &[&database, &start],
        )
        .await
}

/// Moves the cursor of `database` to `last_runid` with `alerted`, if it is still at `version`;
/// `false` when another replica moved it first (it reports those runs).
pub async fn move_cursor(
    client: &impl GenericClient,
    database: &str,
    last_runid: i64,
    alerted: &[i64],
    version: i64,
) -> Result<bool, tokio_postgres::Error> {
    let moved = client
        .execute(
            "UPDATE mvrefresh.pg_cron_cursor
             SET last_runid = $2, alerted = $3, version = version + 1,
                 updated_at = clock_timestamp()
             WHERE cron_database = $1 AND version = $4",
            &[&database, &last_runid, &alerted, &version],
        )
        .await?;
    Ok(moved > 0)
}
