//! Start-up shared by the three services: logging, metrics, the readiness
//! probe over their dependencies, and serving the router.

use std::sync::Arc;

use axum::Router;

use crate::broker::Broker;
use crate::http::ReadinessProbe;
use crate::redis_store::Store;

/// Ready when every store's master answers and the broker connection is up.
pub fn readiness(stores: Vec<Arc<Store>>, broker: Arc<Broker>) -> ReadinessProbe {
    Arc::new(move || {
        let stores = stores.clone();
        let broker = broker.clone();
        Box::pin(async move {
            for store in &stores {
                if !store.ping().await {
                    return Err(format!("{} is not reachable", store.target()));
                }
            }
            if !broker.is_ready().await {
                return Err("the broker is not reachable".into());
            }
            Ok(())
        })
    })
}

/// A built service: its full router (business + ops routes), ready to serve.
pub struct App {
    pub router: Router,
}

impl App {
    /// Serves on `bind_addr` until SIGTERM/Ctrl-C.
    pub async fn serve(self, bind_addr: &str) -> std::io::Result<()> {
        crate::http::serve(self.router, bind_addr).await
    }

    /// Serves on an ephemeral port in the background (tests); returns the base URL.
    pub async fn spawn(self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind an ephemeral port");
        let addr = listener.local_addr().expect("bound address");
        tokio::spawn(async move {
            let _ = axum::serve(listener, self.router).await;
        });
        format!("http://{addr}")
    }
}

/// Builds a participant service (stock, payment): its store, the consumer of
/// `command_queue` (started in the background) and its router.
pub fn build_participant<L: crate::participant::Ledger>(
    settings: &crate::config::Settings,
    command_queue: &str,
    ledger: impl FnOnce(Arc<Store>) -> L,
    routes: impl FnOnce(Arc<L>) -> Router,
) -> Result<App, crate::redis_store::StoreError> {
    let store = Arc::new(Store::new(&settings.redis, settings.wait_timeout)?);
    let ledger = Arc::new(ledger(store.clone()));
    let broker = Broker::new(&settings.amqp_url, settings.queue_type, &[command_queue]);
    broker.expect_consumer(command_queue);
    tokio::spawn(crate::participant::serve_commands(
        broker.clone(),
        command_queue.to_string(),
        settings.prefetch,
        ledger.clone(),
    ));
    let ready = readiness(vec![store], broker);
    let metrics = crate::telemetry::init_metrics();
    Ok(App {
        router: crate::http::with_ops(routes(ledger), ready, metrics),
    })
}
