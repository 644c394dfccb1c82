//! The stock service binary: configuration from the environment, then serve.

use common::config::{Service, Settings};
use common::messages::STOCK_COMMANDS;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _telemetry = common::telemetry::init_logging("stock");
    let settings = Settings::from_env(Service::Stock)?;
    tracing::info!(instance = %settings.instance_id, redis = %settings.redis, "stock service starting");
    let app = stock::build(&settings, STOCK_COMMANDS)?;
    app.serve(&settings.bind_addr).await?;
    Ok(())
}
