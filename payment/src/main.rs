//! The payment service binary: configuration from the environment, then serve.

use common::config::{Service, Settings};
use common::messages::PAYMENT_COMMANDS;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _telemetry = common::telemetry::init_logging("payment");
    let settings = Settings::from_env(Service::Payment)?;
    tracing::info!(instance = %settings.instance_id, redis = %settings.redis, "payment service starting");
    let app = payment::build(&settings, PAYMENT_COMMANDS)?;
    app.serve(&settings.bind_addr).await?;
    Ok(())
}
