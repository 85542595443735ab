//! Every statement on mvrefresh's own tables (`sql/mvrefresh.sql`). Here: recording dirty keys
//! for the daemon itself (a logical capture's reader, the partition watch), collecting dirty
//! keys into per-view pending keys, reading what is pending, the hand-over guards, consuming
//! pending keys in a refresh; `store/history.rs`: the refresh history (records, last
//! successes, the status report's rows, pruning); `store/schema.rs`: the installed schema,
//! captures, subscriptions and privileges; `store/cursor.rs`: the pg_cron watch's cursor.
//! Every read is bounded: a collect takes at most `limit` dirty rows, a read of a view's
//! pending keys at most `limit + 1` keys.
//!
//! # The hand-over
//!
//! A writer whose key is already dirty writes nothing (that is what makes the capture cheap),
//! so a writer that found key `k` dirty may commit *after* the daemon took `k` and after a
//! refresh of `k` read its snapshot: its change would be in no refresh. The daemon therefore
//! consumes a pending row only once every transaction that could have relied on the taken
//! dirty row has ended:
//!
//! 1. a collect deletes the dirty rows, writes pending rows stamped with its own transaction id
//!    (`pending.xact`), changes the generation, and commits;
//! 2. a **guard** is taken afterwards: the transactions then holding a write lock on a captured
//!    table (every writer that could have looked at the dirty row holds one until it ends) and
//!    the current snapshot;
//! 3. the guard **clears** once none of those transactions is alive any more; the newest
//!    cleared guard is the daemon's **horizon**;
//! 4. a refresh deletes only pending rows whose `xact` is visible in the horizon's snapshot
//!    (written before a guard that has cleared), and reads its own snapshot after that: every
//!    writer that relied on those rows has committed (or rolled back) before it. Rows not
//!    covered yet stay pending; the key is refreshed again once the horizon passes them.
//!
//! Guards are cheap (one statement on `pg_locks`); they usually clear within milliseconds,
//! long before a key is due. A transaction that writes a captured table and stays open delays
//! only the consumption of the keys dirtied while it is open (they are refreshed on time and
//! once more after it ends), never the refreshes themselves.

use std::time::Duration;

use tokio_postgres::{Client, GenericClient};

use crate::debounce::ALL;

mod cursor;
mod history;
mod schema;

pub use cursor::*;
pub use history::*;
pub use schema::*;

/// A key as stored: text that may not be UTF-8 (a `SQL_ASCII` database). Such a key cannot be
/// named in a statement, so it stands for everything ([`ALL`]): a whole refresh covers it.
pub fn key_from_bytes(bytes: Vec<u8>) -> (String, bool) {
    match String::from_utf8(bytes) {
        Ok(key) => (key, true),
        Err(_) => (ALL.to_owned(), false),
    }
}

/// A stored key as bytes, in UTF-8 where the database's encoding allows (so a key is read whatever
/// the client encoding, and an `SQL_ASCII` database's bytes arrive as they are).
const KEY_BYTES: &str =
    "CASE WHEN getdatabaseencoding() = 'SQL_ASCII' THEN convert_to(key, 'SQL_ASCII')
      ELSE convert_to(key, 'UTF8') END";

/// Writes `keys` into the change log (those not pending already), each dirty since its commit
/// (`None`: now; so the debounce counts from the write, not from when it was decoded), and
/// notifies `channel`, in one statement (one transaction).
pub async fn record_dirty(
    client: &impl GenericClient,
    channel: &str,
    keys: &[(String, Option<f64>)],
) -> Result<(), tokio_postgres::Error> {
    let (names, since): (Vec<&str>, Vec<Option<f64>>) =
        keys.iter().map(|(k, t)| (k.as_str(), *t)).unzip();
    client
        .execute(
            "WITH k AS (
                 SELECT CASE WHEN octet_length(x.key) > 1024 THEN '*' ELSE x.key END AS key,
                        least(min(coalesce(to_timestamp(x.since), now())), now()) AS since
                 FROM unnest($2::text[], $3::float8[]) AS x(key, since)
                 GROUP BY 1
             ), added AS (
                 INSERT INTO mvrefresh.dirty (channel, key, since)
                 SELECT $1, k.key, k.since FROM k
                 WHERE NOT EXISTS (SELECT FROM mvrefresh.dirty AS d
                                   WHERE d.channel = $1 AND d.key = k.key AND d.xmax = '0')
             )
             SELECT pg_notify($1, '')",
            &[&channel, &names, &since],
        )
        .await?;
    Ok(())
}

/// One dirty key taken by a collect.
#[derive(Debug, Clone, PartialEq)]
pub struct Collected {
    pub channel: String,
    pub key: String,
    /// The key was not valid UTF-8 and is reported as [`ALL`].
    pub odd: bool,
    /// How long ago it turned dirty (the first writer's transaction start).
    pub age: Duration,
}

/// Moves at most `limit` dirty rows of `channels` into pending rows of their subscribed views,
/// in one transaction (step 1 of the hand-over), and returns the keys taken. Rows another
/// collect is taking are skipped, so replicas never wait for each other. A pending row of the
/// same view and key that no refresh is consuming right now is re-stamped instead of doubled,
/// so a key has about one pending row per view however long it stays pending.
pub async fn collect(
    client: &mut Client,
    channels: &[String],
    limit: i64,
) -> Result<Vec<Collected>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let rows = tx
        .query(
            &format!(
                "WITH taken AS (
                 DELETE FROM mvrefresh.dirty AS d
                 WHERE d.ctid = ANY (ARRAY(
                     SELECT x.ctid FROM mvrefresh.dirty AS x
                     WHERE x.channel = ANY ($1::text[])
                     LIMIT $2
                     FOR UPDATE SKIP LOCKED))
                 RETURNING d.channel, d.key, d.since
             ), keys AS (
                 SELECT channel, key, min(since) AS since FROM taken GROUP BY channel, key
             ), targets AS (
                 SELECT s.view_name, k.key, min(k.since) AS since
                 FROM keys AS k JOIN mvrefresh.subscription AS s ON s.channel = k.channel
                 GROUP BY s.view_name, k.key
             ), restamped AS (
                 UPDATE mvrefresh.pending AS p
                 SET xact = pg_current_xact_id(), since = least(p.since, t.since)
                 FROM targets AS t
                 WHERE p.view_name = t.view_name AND p.key = t.key
                   AND p.ctid = ANY (ARRAY(
                       SELECT q.ctid FROM mvrefresh.pending AS q
                       JOIN targets AS u ON q.view_name = u.view_name AND q.key = u.key
                       FOR UPDATE OF q SKIP LOCKED))
                 RETURNING p.view_name, p.key
             ), added AS (
                 INSERT INTO mvrefresh.pending (view_name, key, since, xact)
                 SELECT t.view_name, t.key, t.since, pg_current_xact_id()
                 FROM targets AS t
                 WHERE NOT EXISTS (SELECT FROM restamped AS r
                                   WHERE r.view_name = t.view_name AND r.key = t.key)
             )
             SELECT channel, {KEY_BYTES},
                    greatest(extract(epoch FROM clock_timestamp() - since), 0)::float8
             FROM keys"
            ),
            &[&channels, &limit],
        )
        .await?;
    if !rows.is_empty() {
        // After the delete, before the commit: every session forgets the keys it remembered as
        // dirty (see `mark` in sql/mvrefresh.sql).
        new_generation(&tx, false).await?;
    }
    tx.commit().await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let (key, utf8) = key_from_bytes(r.get(1));
            Collected {
                channel: r.get(0),
                key,
                odd: !utf8,
                age: Duration::from_secs_f64(r.get(2)),
            }
        })
        .collect())
}

/// Sets the generation to a new random value no writer can read or guess (so every session
/// forgets what it remembered), never below 2, with its lowest bit set when writers must notify
/// again.
async fn new_generation(
    client: &impl GenericClient,
    notify: bool,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "SELECT setval('mvrefresh.generation',
                 (('x' || substr(md5(gen_random_uuid()::text), 1, 15))::bit(60)::bigint + 2)
                 & ~1::bigint | $1::bigint)",
            &[&i64::from(notify)],
        )
        .await
        .map(|_| ())
}

/// Tells writers to notify again when a key turns dirty (the generation made odd). Step one of
/// going idle; the daemon then waits for a guard to clear and collects once more before it
/// stops collecting on its own.
pub async fn announce_idle(client: &impl GenericClient) -> Result<(), tokio_postgres::Error> {
    new_generation(client, true).await
}

/// What is pending for one view.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PendingKeys {
    /// Keys and the age of their oldest pending change.
    pub keys: Vec<(String, Duration)>,
    /// More keys are pending than were read (or a key was not UTF-8): the view is due whole;
    /// the age of its oldest pending change.
    pub all: Option<Duration>,
}

/// The pending keys of `view`: at most `limit` of them, else [`PendingKeys::all`]. With
/// `whole` (a whole-view mode), only whether anything is pending and since when.
pub async fn read_pending(
    client: &impl GenericClient,
    view: &str,
    whole: bool,
    limit: i64,
) -> Result<PendingKeys, tokio_postgres::Error> {
    let age = "greatest(extract(epoch FROM clock_timestamp() - min(since)), 0)::float8";
    if whole {
        let row = client
            .query_one(
                &format!("SELECT {age} FROM mvrefresh.pending WHERE view_name = $1"),
                &[&view],
            )
            .await?;
        let age: Option<f64> = row.get(0);
        return Ok(PendingKeys {
            keys: Vec::new(),
            all: age.map(Duration::from_secs_f64),
        });
    }
    let rows = client
        .query(
            &format!(
                "SELECT {KEY_BYTES}, {age} FROM mvrefresh.pending WHERE view_name = $1
                 GROUP BY key ORDER BY key LIMIT $2"
            ),
            &[&view, &(limit + 1)],
        )
        .await?;
    let mut out = PendingKeys::default();
    let mut oldest = Duration::ZERO;
    let overflow = rows.len() as i64 > limit;
    for r in rows {
        let age = Duration::from_secs_f64(r.get(1));
        oldest = oldest.max(age);
        let (key, utf8) = key_from_bytes(r.get(0));
        if !utf8 || key == ALL {
            out.all = Some(out.all.map_or(age, |a| a.max(age)));
        } else {
            out.keys.push((key, age));
        }
    }
    if overflow {
        // The keys beyond the limit are older or younger: the view's oldest change says.
        let row = client
            .query_one(
                &format!("SELECT {age} FROM mvrefresh.pending WHERE view_name = $1"),
                &[&view],
            )
            .await?;
        let all: Option<f64> = row.get(0);
        out.all = Some(all.map_or(oldest, Duration::from_secs_f64));
        out.keys.clear();
    }
    Ok(out)
}

/// A guard (step 2 of the hand-over): the transactions that hold a write lock on a captured
/// table, and the snapshot taken with them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guard {
    pub snapshot: String,
    /// Virtual transaction ids (`pg_locks.virtualtransaction`).
    pub holders: Vec<String>,
}

/// Takes a new guard and tells which of `waiting` (id, guard) have cleared: the largest id
/// whose holders are all gone (a later guard clearing implies every earlier one did).
pub async fn guard(
    client: &impl GenericClient,
    waiting: &[(i64, &Guard)],
) -> Result<(Guard, Option<i64>), tokio_postgres::Error> {
    let ids: Vec<i64> = waiting.iter().map(|(id, _)| *id).collect();
    let (holder_ids, holders): (Vec<i64>, Vec<&str>) = waiting
        .iter()
        .flat_map(|(id, g)| g.holders.iter().map(move |h| (*id, h.as_str())))
        .unzip();
    let row = client
        .query_one(
            "SELECT pg_current_snapshot()::text,
                    ARRAY(SELECT DISTINCT l.virtualtransaction
                          FROM pg_locks AS l
                          WHERE l.locktype = 'relation'
                            AND l.database = (SELECT oid FROM pg_database
                                              WHERE datname = current_database())
                            AND l.relation IN (SELECT c.table_name::oid FROM mvrefresh.capture AS c
                                               UNION ALL
                                               SELECT t.relid
                                               FROM mvrefresh.capture AS c,
                                                    pg_partition_tree(c.table_name) AS t)
                            AND l.mode IN ('RowExclusiveLock', 'AccessExclusiveLock')
                            AND l.pid IS DISTINCT FROM pg_backend_pid()),
                    (SELECT max(g.id) FROM unnest($1::int8[]) AS g(id)
                     WHERE NOT EXISTS (
                         SELECT FROM unnest($2::int8[], $3::text[]) AS e(id, vx)
                         JOIN pg_locks AS v ON v.virtualtransaction = e.vx
                         WHERE e.id = g.id))",
            &[&ids, &holder_ids, &holders],
        )
        .await?;
    Ok((
        Guard {
            snapshot: row.get(0),
            holders: row.get(1),
        },
        row.get(2),
    ))
}

/// A horizon for a one-shot refresh (`mvrefresh refresh`): a guard taken now, once it has
/// cleared; `None` if it has not within `patience` (the refresh then consumes only rows no
/// writer relied on, and leaves the rest to the daemon).
pub async fn settled_horizon(
    client: &impl GenericClient,
    patience: Duration,
) -> Result<Option<String>, tokio_postgres::Error> {
    let (g, _) = guard(client, &[]).await?;
    let deadline = std::time::Instant::now() + patience;
    let mut cleared = g.holders.is_empty();
    while !cleared && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        cleared = guard(client, &[(1, &g)]).await?.1 == Some(1);
    }
    Ok(cleared.then_some(g.snapshot))
}

/// Consumes `view`'s pending rows for `keys` (`None`: all) that the hand-over `horizon` (a
/// `pg_snapshot` as text; `None`: only rows recorded without a writer's transaction) shows
/// committed; how many, and the keys still pending (rows of writers
/// the horizon does not cover yet; `*` when a whole refresh leaves any).
pub async fn consume_pending(
    client: &impl GenericClient,
    view: &str,
    keys: Option<&[String]>,
    horizon: &Option<String>,
) -> Result<(u64, Vec<String>), tokio_postgres::Error> {
    let Some(keys) = keys else {
        let consumed = client
            .execute(
                "DELETE FROM mvrefresh.pending
                 WHERE view_name = $1
                   AND (xact IS NULL OR pg_visible_in_snapshot(xact, $2::text::pg_snapshot))",
                &[&view, &horizon],
            )
            .await?;
        let left: bool = client
            .query_one(
                "SELECT EXISTS (SELECT FROM mvrefresh.pending WHERE view_name = $1)",
                &[&view],
            )
            .await?
            .get(0);
        let leftover = if left {
            vec![ALL.to_owned()]
        } else {
            Vec::new()
        };
        return Ok((consumed, leftover));
    };
    let consumed = client
        .execute(
            "DELETE FROM mvrefresh.pending
             WHERE view_name = $1 AND key = ANY ($2)
               AND (xact IS NULL OR pg_visible_in_snapshot(xact, $3::text::pg_snapshot))",
            &[&view, &keys, &horizon],
        )
        .await?;
    let left = client
        .query(
            "SELECT DISTINCT key FROM mvrefresh.pending WHERE view_name = $1 AND key = ANY ($2)",
            &[&view, &keys],
        )
        .await?;
    Ok((consumed, left.iter().map(|r| r.get(0)).collect()))
}

/// Makes `keys` pending for each of `views` (the dependents of a view just refreshed), as of
/// when the refresh started.
pub async fn pend_for(
    client: &impl GenericClient,
    views: &[String],
    keys: &[&str],
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO mvrefresh.pending (view_name, key, since)
             SELECT d, k, current_setting('mvrefresh.started_at')::timestamptz
             FROM unnest($1::text[]) AS d, unnest($2::text[]) AS k",
            &[&views, &keys],
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_keys_stand_for_everything() {
        assert_eq!(key_from_bytes(b"42".to_vec()), ("42".to_owned(), true));
        assert_eq!(key_from_bytes(vec![0xff, 0x41]), (ALL.to_owned(), false));
    }
}
