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
        .layer(axum::middleware::map_response(json_error_body))
        .layer(axum::middleware::from_fn(crate::telemetry::track_http))
}

/// The longest error text [`json_error_body`] carries over; axum's own are one line.
const ERROR_TEXT_LIMIT: usize = 16 * 1024;

/// Every error body is JSON (API.md). Ours are ([`ApiError`]), but axum answers a few
/// malformed requests itself before any handler runs, in plain text: a path parameter that
/// is not UTF-8 (`/find/%FF`), for one. Any error answer that is not JSON becomes
/// `{"error": "<its text>"}` with the same status and headers.
async fn json_error_body(response: Response) -> Response {
    use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
    use axum::http::HeaderValue;
    let status = response.status();
    let is_json = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, ERROR_TEXT_LIMIT)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let reason = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        text
    };
    parts.headers.remove(CONTENT_LENGTH);
    parts
        .headers
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let body = serde_json::json!({ "error": reason }).to_string();
    Response::from_parts(parts, axum::body::Body::from(body))
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::Path;

    /// A real server with the ops layers around one route that takes a `Path<String>`.
    async fn serve_test_app() -> String {
        let business = Router::new().route(
            "/find/{id}",
            get(|Path(id): Path<String>| async move { id }),
        );
        let ready: ReadinessProbe = Arc::new(|| Box::pin(async { Ok(()) }));
        let app = with_ops(business, ready, crate::telemetry::init_metrics());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        base
    }

    async fn get_text(url: String) -> (u16, String) {
        tokio::task::spawn_blocking(move || {
            let r = xtask::http_get(&url, Duration::from_secs(5)).unwrap();
            (r.status, r.body)
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn axums_own_rejections_answer_json_errors() {
        let base = serve_test_app().await;
        // A path parameter that is not UTF-8: axum refuses it before the handler, in text.
        let (status, body) = get_text(format!("{base}/find/%FF")).await;
        assert_eq!(status, 400);
        let body: serde_json::Value = serde_json::from_str(&body).expect("a JSON body");
        let reason = body["error"].as_str().unwrap();
        assert!(reason.contains("UTF-8"), "{reason}");
        // Unknown routes and empty segments were JSON already; success is left alone.
        let (status, body) = get_text(format!("{base}/find//x")).await;
        assert_eq!(status, 400);
        assert!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"].is_string());
        assert_eq!(
            get_text(format!("{base}/find/abc")).await,
            (200, "abc".into())
        );
    }
}
