//! The admin HTTP server (`[http] listen`, loopback by default):
//!
//! | route | answers |
//! |---|---|
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200 when the listener is connected and the pending keys are readable; 503 otherwise and during shutdown |
//! | `GET /metrics` | Prometheus text exposition |
//! | `GET /status` | the JSON of `mvrefresh status --json` |
//! | `POST /refresh`, `POST /refresh/{view}` | queue a manual refresh of every view / one view (202); needs `Authorization: Bearer <MVREFRESH_ADMIN_TOKEN>`; 404 when no token is configured |

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::stats::Stats;
use crate::status;
use crate::telemetry::Telemetry;

/// How long `/readyz` and `/status` wait for the database.
const DB_PATIENCE: Duration = Duration::from_secs(3);

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
}

/// Serves until `cancel` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    stats: Arc<Stats>,
    telemetry: Arc<Telemetry>,
    pool: Pool,
    config: Arc<Config>,
    manual: mpsc::Sender<ManualRefresh>,
    cancel: CancellationToken,
) {
    let state = AppState {
        stats,
        telemetry,
        pool,
        config,
        manual,
    };
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status_json))
        .route("/refresh", post(refresh_all))
        .route("/refresh/{view}", post(refresh_one))
        .with_state(state);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "admin HTTP server stopped");
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
        let client = s.pool.get().await.map_err(|e| e.to_string())?;
        client
            .query_opt("SELECT 1 FROM mvrefresh.pending LIMIT 1", &[])
            .await
            .map_err(|e| e.to_string())
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

async fn status_json(State(s): State<AppState>) -> Response {
    let work = async {
        let client = s.pool.get().await.map_err(|e| e.to_string())?;
        status::status(&**client, &s.config)
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(DB_PATIENCE, work).await {
        Ok(Ok(st)) => Json(st).into_response(),
        Ok(Err(e)) => problem(StatusCode::SERVICE_UNAVAILABLE, e),
        Err(_) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "the database did not answer in time",
        ),
    }
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
    let Some(token) = s.config.http.admin_token.as_ref().map(|t| t.expose()) else {
        return problem(
            StatusCode::NOT_FOUND,
            "manual refresh is off: set MVREFRESH_ADMIN_TOKEN to enable it",
        );
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
        return problem(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
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
    use super::constant_time_eq;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }
}
