//! Plumbing shared by the three services: configuration, Sentinel-aware
//! Redis access, the broker connection, the checkout protocol, the
//! participant side of a saga step, errors and telemetry.

pub mod broker;
pub mod config;
pub mod counters;
pub mod error;
pub mod group_commit;
pub mod grouped;
pub mod http;
pub mod idempotency;
pub mod keylock;
pub mod messages;
pub mod openapi;
pub mod participant;
pub mod redis_store;
pub mod service;
pub mod telemetry;
pub mod trace;
pub mod types;

/// mimalloc, not glibc's malloc, for every binary that links `common` (the services, and
/// the tests that run them). A checkout allocates and frees many small buffers (requests,
/// Redis replies, AMQP frames, JSON); under load glibc's allocator was about a fifth of the
/// order service's CPU in `perf` (`_int_malloc`, `_int_free`, `malloc_consolidate`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
