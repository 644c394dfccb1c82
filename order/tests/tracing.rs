//! One checkout is one trace across the three services (issue 9, item 3).
//!
//! The apps run in this process (see `support/mod.rs`) and talk only through
//! the real RabbitMQ broker, so a participant's span can be a child of the
//! order service's step span only through the `traceparent` header of the
//! message between them. The test installs the same tracing layer the
//! services install, with an in-memory exporter instead of OTLP, and reads
//! the finished spans.

mod support;

use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().to_string())
}

fn in_trace<'a>(spans: &'a [SpanData], trace: TraceId, name: &str) -> Vec<&'a SpanData> {
    spans
        .iter()
        .filter(|s| s.span_context.trace_id() == trace && s.name == name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkout_is_one_trace_across_order_stock_and_payment() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new("info"))
        .with(common::trace::layer(&provider))
        .init();

    let broker = support::test_broker("tracing-test");
    let f = support::fleet(&broker.url).await;
    let item = f.item(10, 5).await;
    let user = f.user(100).await;
    let order = f.order(&user, &[(&item, 2)]).await;
    assert_eq!(f.checkout(&order).await, 200);

    // The checkout span ends with its saga (after settle), not with the request.
    let mut spans = Vec::new();
    let mut checkout = None;
    for _ in 0..100 {
        spans = exporter.get_finished_spans().unwrap();
        checkout = spans
            .iter()
            .find(|s| s.name == "checkout" && attribute(s, "order_id").as_deref() == Some(&order))
            .cloned();
        if checkout.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let checkout = checkout.expect("no checkout span for the order");
    let trace = checkout.span_context.trace_id();
    let saga = attribute(&checkout, "saga_id").expect("the checkout span names its saga");
    assert_eq!(
        attribute(&checkout, "trace_id").as_deref(),
        Some(trace.to_string().as_str()),
        "logs carry the trace id"
    );

    let steps = in_trace(&spans, trace, "saga.step");
    assert_eq!(steps.len(), 2, "reserve and charge: {steps:?}");
    for step in &steps {
        assert_eq!(step.parent_span_id, checkout.span_context.span_id());
        assert_eq!(attribute(step, "saga_id").as_deref(), Some(saga.as_str()));
    }
    let step_ids: Vec<SpanId> = steps.iter().map(|s| s.span_context.span_id()).collect();

    // Each participant's span hangs off the step that sent it the command:
    // the only link between them is the message's traceparent header.
    let applied = in_trace(&spans, trace, "participant.apply");
    for queue in [&f.stock_queue, &f.payment_queue] {
        let by_queue: Vec<_> = applied
            .iter()
            .filter(|s| attribute(s, "queue").as_deref() == Some(queue.as_str()))
            .collect();
        assert!(
            by_queue
                .iter()
                .any(|s| step_ids.contains(&s.parent_span_id)),
            "no span of {queue} under a step of the checkout: {applied:?}"
        );
        assert!(by_queue
            .iter()
            .all(|s| attribute(s, "saga_id").as_deref() == Some(saga.as_str())));
    }

    // And back: the replies are handled in spans under the participants' spans.
    let participant_ids: Vec<SpanId> = applied.iter().map(|s| s.span_context.span_id()).collect();
    let replies = in_trace(&spans, trace, "saga.reply");
    assert!(
        replies.len() >= 2
            && replies
                .iter()
                .all(|r| participant_ids.contains(&r.parent_span_id)),
        "replies not under the participants' spans: {replies:?}"
    );
}
