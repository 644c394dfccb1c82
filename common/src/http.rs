//! What every service's HTTP server has besides its business routes:
//! `/health`, `/ready`, `/metrics`, JSON answers for unknown routes and
//! methods, request metrics, and a graceful shutdown.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::error::ApiError;

/// Answers `Ok` when every dependency the service needs is reachable, else says which is not.
/// `/ready` gives it at most [`READY_BOUND`].
pub type ReadinessProbe =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// The longest `/ready` takes to answer: a probe still running then is a 503. Every readiness
/// probe of a deployment (k8s `readinessProbe.timeoutSeconds`, the compose healthcheck) waits
/// longer than this plus a margin (`common/tests/timeout_budget.rs`), so a probe sees an
/// answer, never its own timeout. The services' probe (`service::readiness`) bounds each of
/// its checks by a shorter `READY_CHECK_TIMEOUT`; this is the ceiling for any probe.
pub const READY_BOUND: Duration = Duration::from_millis(1500);

/// Adds the operational endpoints, the JSON fallbacks and request metrics to `business`.
pub fn with_ops(business: Router, ready: ReadinessProbe, metrics: PrometheusHandle) -> Router {
    let ops = Router::new()
        .route(
            "/health",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route(
            "/ready",
            get(move || {
                let ready = ready.clone();
                async move {
                    match tokio::time::timeout(READY_BOUND, ready()).await {
                        Ok(Ok(())) => {
                            (StatusCode::OK, Json(serde_json::json!({"status": "ready"})))
                                .into_response()
                        }
                        Ok(Err(why)) => ApiError::Unavailable(why).into_response(),
                        Err(_) => ApiError::Unavailable(format!(
                            "the readiness checks did not finish within {READY_BOUND:?}"
                        ))
                        .into_response(),
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || std::future::ready(metrics.render())),
        );
    business
        .merge(ops)
        .fallback(unknown_route)
        .method_not_allowed_fallback(|| async {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                Json(serde_json::json!({"error": "method not allowed on this path"})),
            )
        })
        .layer(axum::middleware::from_fn(crate::telemetry::track_http))
}

/// A path with an empty segment (`/add/7/`) is malformed input: 400. Anything else unknown: 404.
async fn unknown_route(uri: Uri) -> Response {
    let path = uri.path();
    let empty_segment = path.len() > 1 && (path.ends_with('/') || path.contains("//"));
    if empty_segment {
        ApiError::BadRequest(format!("{path}: a path segment is empty")).into_response()
    } else {
        ApiError::NotFound(format!("no such endpoint: {path}")).into_response()
    }
}

/// Serves `app` on `bind_addr` until SIGTERM or Ctrl-C, then lets in-flight requests finish.
pub async fn serve(app: Router, bind_addr: &str) -> std::io::Result<()> {
    let addr: std::net::SocketAddr = tokio::net::lookup_host(bind_addr)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{bind_addr} resolves to nothing")))?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    // `TcpListener::bind` queues only 128 pending connections; a burst of a
    // thousand checkouts through the gateway overflows that into connect timeouts.
    let listener = socket.listen(4096)?;
    tracing::info!(addr = %listener.local_addr()?, "listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down");
}
