//! The payment service: users with a credit, and the payment participant of
//! the checkout saga (charge / refund).
//!
//! Read top-down: `main.rs` wires it, [`routes`] is the HTTP API,
//! [`users`] is the store logic.

pub mod openapi;
pub mod routes;
pub mod users;

use common::config::Settings;
use common::redis_store::StoreError;
use common::service::{build_participant, App};

/// Builds the service and starts consuming `command_queue` in the background.
pub fn build(settings: &Settings, command_queue: &str) -> Result<App, StoreError> {
    build_participant(settings, command_queue, users::Users::new, routes::router)
}
