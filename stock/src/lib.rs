//! The stock service: items with a stock count and a price, and the stock
//! participant of the checkout saga (reserve / release).
//!
//! Read top-down: `main.rs` wires it, [`routes`] is the HTTP API,
//! [`items`] is the store logic.

pub mod items;
pub mod openapi;
pub mod routes;

use common::config::Settings;
use common::redis_store::StoreError;
use common::service::{build_participant, App};

/// Builds the service and starts consuming `command_queue` in the background.
pub fn build(settings: &Settings, command_queue: &str) -> Result<App, StoreError> {
    build_participant(settings, command_queue, items::Items::new, routes::router)
}
