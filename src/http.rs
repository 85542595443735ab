//! The admin HTTP server (`[http] listen`, loopback by default):
//!
//! | route | answers |
//! |---|---|
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200 when the listener is connected and the pending keys are readable; 503 otherwise and during shutdown |
//! | `GET /metrics` | Prometheus text exposition |
//! | `GET /status` | the JSON of `mvrefresh status --json`; without the admin token, error texts lose the server's DETAIL (row values) |
//! | `POST /refresh`, `POST /refresh/{view}` | queue a manual refresh of every view / one view (202); needs `Authorization: Bearer <MVREFRESH_ADMIN_TOKEN>`; 404 when no token is configured |
//!
//! # Bounds
//!
//! Every connection holds one of `[http] max_connections` slots; a connection beyond them is
//! answered `503` at once and closed (nothing is read from it, no task is started). A request's
//! headers must arrive within [`HEADER_READ_TIMEOUT`] (also the longest a kept-alive connection
//! waits idle for the next request), a handler must answer within [`REQUEST_TIMEOUT`] (`503`
//! after), and a connection is closed after the request in progress once it is
//! [`CONNECTION_LIFETIME`] old, or dropped [`REQUEST_TIMEOUT`] later whatever it is doing (a
//! client that never reads its answers). A silent or slow client therefore holds a slot for
//! seconds, never for good, and the memory of the server is bounded by the slots.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use deadpool_postgres::Pool;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db;
use crate::stats::Stats;
use crate::status;
use crate::telemetry::Telemetry;

/// How long `/readyz` and `/status` wait for the database.
const DB_PATIENCE: Duration = Duration::from_secs(3);
/// A request's headers must arrive within this (and a kept-alive connection waits no longer for
/// the next request): a client that connects and says nothing is disconnected after it.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A handler must answer within this; `503` after it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection this old is closed after the request in progress (and dropped
/// [`REQUEST_TIMEOUT`] later if that does not end).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Read buffer of a connection: request headers larger than this are refused (431).
const MAX_BUFFER: usize = 16 * 1024;
/// The answer to a connection beyond `[http] max_connections`, written without reading.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: text/plain; charset=utf-8\r\n\
content-length: 42\r\n\
retry-after: 1\r\n\
connection: close\r\n\
\r\n\
too many connections to the admin server\r\n";

/// A manual refresh asked over HTTP, answered by the daemon with the views it queued.
#[derive(Debug)]
pub struct ManualRefresh {
    /// `None`: every view.
    pub view: Option<String>,
    pub reply: oneshot::Sender<Result<Vec<String>, String>>,
}

#[derive(Clone)]
struct AppState {
    stats: Arc<Stats>,
    telemetry: Arc<Telemetry>,
    pool: Pool,
    config: Arc<Config>,
    /// The daemon's main loop holds the receiving end.
    manual: mpsc::Sender<ManualRefresh>,
    /// The last `/status`, computed at most once per [`STATUS_MAX_AGE`].
    status: Arc<tokio::sync::Mutex<Option<(std::time::Instant, status::Status)>>>,
}

/// A `/status` this old is served again instead of asking the database.
const STATUS_MAX_AGE: Duration = Duration::from_secs(2);

/// Serves until `cancel` fires; then lets the requests in progress finish (within
/// [`REQUEST_TIMEOUT`]) and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    stats: Arc<Stats>,
    telemetry: Arc<Telemetry>,
    pool: Pool,
    config: Arc<Config>,
    manual: mpsc::Sender<ManualRefresh>,
    cancel: CancellationToken,
) {
    let max = config.http.max_connections;
    let state = AppState {
        stats: stats.clone(),
        telemetry,
        pool,
        config,
        manual,
        status: Arc::default(),
    };
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status_json))
        .route("/refresh", post(refresh_all))
        .route("/refresh/{view}", post(refresh_one))
        .layer(middleware::from_fn(request_timeout))
        .with_state(state);
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUFFER);
    let slots = Arc::new(Semaphore::new(max));
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(error = %e, "admin HTTP server: cannot accept a connection");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => continue,
                }
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Refused without reading; a fresh socket's send buffer takes this whole.
            stats.http_refused.inc();
            let _ = stream.try_write(BUSY);
            continue;
        };
        let slot = Slot::new(permit, stats.clone());
        tokio::spawn(connection(
            http.clone(),
            stream,
            app.clone(),
            cancel.clone(),
            slot,
        ));
    }
    drop(listener);
    // Every slot back: the connections are gone (each ends within REQUEST_TIMEOUT of `cancel`).
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    if tokio::time::timeout(REQUEST_TIMEOUT * 2, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("admin HTTP server: connections left open at shutdown");
    }
}

/// One of `[http] max_connections`, held by a connection while it lives; counted in
/// [`Stats::http_connections`].
struct Slot {
    _permit: OwnedSemaphorePermit,
    stats: Arc<Stats>,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, stats: Arc<Stats>) -> Slot {
        stats.http_connections.inc();
        Slot {
            _permit: permit,
            stats,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.stats.http_connections.dec();
    }
}

/// Serves one connection within the bounds of the module doc.
async fn connection(
    http: http1::Builder,
    stream: TcpStream,
    app: Router,
    cancel: CancellationToken,
    _slot: Slot,
) {
    let conn = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "admin HTTP connection ended");
            }
            return;
        }
        _ = cancel.cancelled() => {}
        _ = tokio::time::sleep(CONNECTION_LIFETIME) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, conn).await;
}

/// `503` when a handler takes longer than [`REQUEST_TIMEOUT`].
async fn request_timeout(request: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "no answer in time; try again",
        ),
    }
}

fn problem(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

async fn readyz(State(s): State<AppState>) -> Response {
    if !s.stats.ready.get() {
        return problem(StatusCode::SERVICE_UNAVAILABLE, "starting or shutting down");
    }
    if !s.stats.listener_connected.get() {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "the LISTEN connection is down",
        );
    }
    let probe = async {
        let client = s.pool.get().await.map_err(|e| db::pool_error_text(&e))?;
        client
            .query_opt("SELECT 1 FROM mvrefresh.pending LIMIT 1", &[])
            .await
            .map_err(|e| db::without_detail(&db::error_text(&e)).into_owned())
    };
    match tokio::time::timeout(DB_PATIENCE, probe).await {
        Ok(Ok(_)) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Err(e)) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the change log is not readable: {e}"),
        ),
        Err(_) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "the database did not answer in time",
        ),
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.telemetry.prometheus_text(),
    )
        .into_response()
}

/// `/status`: error texts keep the server's DETAIL (where PostgreSQL quotes row values, e.g.
/// `Key (id)=(42) already exists`) only for a request with the admin token.
/// `/status`: from the database at most once per [`STATUS_MAX_AGE`], by one query at a time
/// whatever the number of requests (they wait for it and share it). The query runs in a task of
/// its own to its end (bounded by the pool's `statement_timeout`): a request that stops
/// waiting leaves no query behind on a connection handed back to the pool.
async fn status_json(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let slot = s.status.clone();
    let (pool, config) = (s.pool.clone(), s.config.clone());
    let work = tokio::spawn(async move {
        let mut slot = slot.lock().await;
        if let Some((at, st)) = slot.as_ref() {
            if at.elapsed() < STATUS_MAX_AGE {
                return Ok(st.clone());
            }
        }
        let client = pool.get().await.map_err(|e| db::pool_error_text(&e))?;
        let st = status::status(&**client, &config)
            .await
            .map_err(|e| db::without_detail(&db::error_text(&e)).into_owned())?;
        *slot = Some((std::time::Instant::now(), st.clone()));
        Ok::<_, String>(st)
    });
    match tokio::time::timeout(DB_PATIENCE, work).await {
        Ok(Ok(Ok(mut st))) => {
            if authorised(&s.config, &headers) != Some(true) {
                for v in &mut st.views {
                    if let Some(e) = &mut v.recorded.last_error {
                        *e = db::without_detail(e).into_owned();
                    }
                }
            }
            Json(st).into_response()
        }
        Ok(Ok(Err(e))) => problem(StatusCode::SERVICE_UNAVAILABLE, e),
        Ok(Err(_)) => problem(StatusCode::SERVICE_UNAVAILABLE, "the status query failed"),
        Err(_) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "the database did not answer in time",
        ),
    }
}

/// Whether `headers` carry `Authorization: Bearer <MVREFRESH_ADMIN_TOKEN>`; `None` when no token
/// is configured.
fn authorised(config: &Config, headers: &HeaderMap) -> Option<bool> {
    let token = config.http.admin_token.as_ref()?.expose();
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    Some(constant_time_eq(given.as_bytes(), token.as_bytes()))
}

async fn refresh_all(State(s): State<AppState>, headers: HeaderMap) -> Response {
    manual(s, headers, None).await
}

async fn refresh_one(
    State(s): State<AppState>,
    Path(view): Path<String>,
    headers: HeaderMap,
) -> Response {
    manual(s, headers, Some(view)).await
}

async fn manual(s: AppState, headers: HeaderMap, view: Option<String>) -> Response {
    match authorised(&s.config, &headers) {
        None => {
            return problem(
                StatusCode::NOT_FOUND,
                "manual refresh is off: set MVREFRESH_ADMIN_TOKEN to enable it",
            )
        }
        Some(false) => {
            return problem(StatusCode::UNAUTHORIZED, "a valid bearer token is required")
        }
        Some(true) => {}
    }
    let (reply, answer) = oneshot::channel();
    if s.manual.send(ManualRefresh { view, reply }).await.is_err() {
        return problem(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    match answer.await {
        Ok(Ok(views)) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "queued": views })),
        )
            .into_response(),
        Ok(Err(e)) => problem(StatusCode::NOT_FOUND, e),
        Err(_) => problem(StatusCode::SERVICE_UNAVAILABLE, "shutting down"),
    }
}

/// Compares without an early exit, so the time taken does not reveal how much matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0));
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::{constant_time_eq, BUSY};

    #[test]
    fn the_busy_answer_is_well_formed() {
        let text = std::str::from_utf8(BUSY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(length, body.len());
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }
}
