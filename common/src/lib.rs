//! Plumbing shared by the three services: configuration, Sentinel-aware
//! Redis access, the broker connection, the checkout protocol, the
//! participant side of a saga step, errors and telemetry.

pub mod broker;
pub mod config;
pub mod counters;
pub mod error;
pub mod http;
pub mod keylock;
pub mod messages;
pub mod participant;
pub mod redis_store;
pub mod service;
pub mod telemetry;
pub mod types;
