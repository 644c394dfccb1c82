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

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
