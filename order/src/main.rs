//! The order service binary: configuration from the environment, then serve.

use common::config::{OrderSettings, Service, Settings};
use common::messages::{PAYMENT_COMMANDS, STOCK_COMMANDS};
use order::Queues;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _telemetry = common::telemetry::init_logging("order");
    let settings = Settings::from_env(Service::Order)?;
    let order_settings = OrderSettings::from_env()?;
    tracing::info!(
        instance = %settings.instance_id,
        redis = %settings.redis,
        saga_redis = %order_settings.saga_redis,
        "order service starting"
    );
    let queues = Queues {
        stock: STOCK_COMMANDS.to_string(),
        payment: PAYMENT_COMMANDS.to_string(),
    };
    let app = order::build(&settings, &order_settings, queues)?;
    app.serve(&settings.bind_addr).await?;
    Ok(())
}
