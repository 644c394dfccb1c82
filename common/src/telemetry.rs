//! Logs and traces (tracing, with the trace context of [`crate::trace`]) and
//! metrics (Prometheus text via the `metrics` facade).
//!
//! Request metrics are recorded by one middleware, by route template rather
//! than raw path, so `/find/{item_id}` is one series and not one per item.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Installs the tracing subscriber of `service`: logs (`LOG_FORMAT=json` for
/// machine-read ones; every line inside a checkout carries its `order_id`,
/// `saga_id` and `trace_id`) and trace context (exported over OTLP when
/// configured, see [`crate::trace`]). Keep the returned guard for the life of
/// the process: dropping it flushes the spans not exported yet.
pub fn init_logging(service: &str) -> Telemetry {
    let filter = EnvFilter::try_new(crate::config::var("RUST_LOG").unwrap_or_default())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let json = crate::config::var("LOG_FORMAT").as_deref() == Some("json");
    let logs = if json {
        tracing_subscriber::fmt::layer().json().boxed()
    } else {
        tracing_subscriber::fmt::layer().boxed()
    };
    let provider = crate::trace::provider(service);
    // Tests call this more than once per process: only the first install counts.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(crate::trace::layer(&provider))
        .try_init();
    Telemetry { provider }
}

/// Flushes and stops trace export when dropped (end of `main`).
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

/// Installs the global metrics recorder (once per process) and returns the
/// handle that renders `/metrics`. Tests run several apps in one process:
/// each gets the handle of the recorder that was actually installed.
pub fn init_metrics() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets(&buckets)
                .expect("bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Counts requests and observes their latency by method, route and status.
pub async fn track_http(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = request.method().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status.clone())
        .increment(1);
    metrics::histogram!("http_request_duration_seconds", "method" => method, "route" => route, "status" => status)
        .record(started.elapsed().as_secs_f64());
    response
}
