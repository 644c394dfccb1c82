//! One trace per checkout, across the three services.
//!
//! Spans are ordinary `tracing` spans; the `tracing-opentelemetry` layer gives
//! each one a W3C trace context. That context crosses the broker in AMQP
//! message headers (`traceparent`, `tracestate`): every publish carries the
//! context of the span it is made in ([`inject_current`]), and whoever takes
//! the message opens its span as a child of it ([`follow`]). So a checkout's
//! span in the order service, the stock and payment spans that applied its
//! commands, and the order service's handling of their replies are one trace.
//!
//! Export: over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the
//! standard OpenTelemetry variables apply: `OTEL_SERVICE_NAME`, headers,
//! timeouts), batched on a thread of its own. Without it the ids are still
//! made, propagated and written into the logs (`trace_id` on the spans that
//! start work), and no span leaves the process.

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// The W3C header that carries a trace context.
pub const TRACEPARENT: &str = "traceparent";

/// The variable that switches export on (the OpenTelemetry SDKs' own name).
pub const OTLP_ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// The tracer provider of a service: exporting over OTLP/HTTP when
/// [`OTLP_ENDPOINT_VAR`] is set, else making ids only.
pub fn provider(service: &str) -> SdkTracerProvider {
    let service = crate::config::var("OTEL_SERVICE_NAME").unwrap_or_else(|| service.to_string());
    let builder = SdkTracerProvider::builder()
        .with_resource(Resource::builder().with_service_name(service).build());
    if crate::config::var(OTLP_ENDPOINT_VAR).is_none() {
        return builder.build();
    }
    match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
    {
        Ok(exporter) => builder.with_batch_exporter(exporter).build(),
        Err(e) => {
            eprintln!("{OTLP_ENDPOINT_VAR} is set but no OTLP exporter could be built ({e}); traces stay in the process");
            builder.build()
        }
    }
}

/// The `tracing` layer that gives spans their trace context, from `provider`.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("checkout"))
}

/// Writes the current span's trace context into `headers`.
pub fn inject_current(headers: &mut FieldTable) {
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(headers));
}

/// The current span's trace context as AMQP headers (empty outside any trace).
pub fn current_headers() -> FieldTable {
    let mut headers = FieldTable::default();
    inject_current(&mut headers);
    headers
}

/// Makes `span` a child of the trace context carried in `headers` (if any),
/// and records its trace id on it (the `trace_id` field, when it declares one).
pub fn follow(span: &tracing::Span, headers: Option<&FieldTable>) {
    if let Some(headers) = headers {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        if parent.span().span_context().is_valid() {
            // Fails only when no OpenTelemetry layer is installed: nothing to join then.
            let _ = span.set_parent(parent);
        }
    }
    record_trace_id(span);
}

/// Records the span's trace id in its `trace_id` field, so logs carry it.
pub fn record_trace_id(span: &tracing::Span) {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        span.record("trace_id", span_context.trace_id().to_string());
    }
}

struct HeaderInjector<'a>(&'a mut FieldTable);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(
            ShortString::from(key),
            AMQPValue::LongString(LongString::from(value)),
        );
    }
}

struct HeaderExtractor<'a>(&'a FieldTable);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0.inner().get(key) {
            Some(AMQPValue::LongString(s)) => std::str::from_utf8(s.as_bytes()).ok(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.inner().keys().map(|k| k.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn a_context_survives_the_trip_through_message_headers() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry().with(layer(&provider));
        tracing::subscriber::with_default(subscriber, || {
            let sender = tracing::info_span!("saga.step");
            let headers = sender.in_scope(current_headers);
            let traceparent = match headers.inner().get(TRACEPARENT) {
                Some(AMQPValue::LongString(s)) => String::from_utf8(s.as_bytes().to_vec()).unwrap(),
                other => panic!("no traceparent header: {other:?}"),
            };
            let sent = sender.context().span().span_context().clone();
            // W3C: version-traceid-spanid-flags.
            assert_eq!(
                traceparent,
                format!("00-{}-{}-01", sent.trace_id(), sent.span_id())
            );

            let receiver =
                tracing::info_span!("participant.apply", trace_id = tracing::field::Empty);
            follow(&receiver, Some(&headers));
            let received = receiver.context().span().span_context().clone();
            assert_eq!(received.trace_id(), sent.trace_id());
            assert_ne!(received.span_id(), sent.span_id());
        });
    }

    #[test]
    fn a_message_without_headers_starts_no_trace_of_its_own_making() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry().with(layer(&provider));
        tracing::subscriber::with_default(subscriber, || {
            let a = tracing::info_span!("participant.apply", trace_id = tracing::field::Empty);
            follow(&a, None);
            let b = tracing::info_span!("participant.apply", trace_id = tracing::field::Empty);
            follow(&b, Some(&FieldTable::default()));
            let id = |s: &tracing::Span| s.context().span().span_context().trace_id();
            assert_ne!(id(&a), id(&b), "two untraced messages share a trace");
        });
    }
}
