//! Start-up shared by the three services: logging, metrics, the readiness
//! probe over their dependencies, and serving the router.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use futures::future::join_all;

use crate::broker::Broker;
use crate::http::ReadinessProbe;
use crate::redis_store::Store;

/// How long `/ready` waits for any one dependency (a store's PING, the broker link). A check
/// that takes longer fails: the probe must not wait out the store pool's wait timeout (5 s)
/// or a broker reconnect, which are longer than a readiness probe's own timeout, so under
/// load the probe would time out instead of answering (and flap). A master that cannot
/// answer a PING within a second is not one to send traffic to. Shorter than
/// [`crate::http::READY_BOUND`], so the answer can still name what is missing.
pub const READY_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
const _: () = assert!(READY_CHECK_TIMEOUT.as_millis() < crate::http::READY_BOUND.as_millis());

/// Ready when every store's master answers and the broker connection is up. The checks run
/// concurrently, each bounded by [`READY_CHECK_TIMEOUT`], so the answer comes within it
/// whatever hangs; the error names every dependency that failed.
pub fn readiness(stores: Vec<Arc<Store>>, broker: Arc<Broker>) -> ReadinessProbe {
    Arc::new(move || {
        let stores = stores.clone();
        let broker = broker.clone();
        Box::pin(async move {
            let store_checks = stores.iter().map(|store| async move {
                match tokio::time::timeout(READY_CHECK_TIMEOUT, store.ping()).await {
                    Ok(true) => None,
                    Ok(false) => Some(format!("{} is not reachable", store.target())),
                    Err(_) => Some(format!(
                        "{} did not answer within {READY_CHECK_TIMEOUT:?}",
                        store.target()
                    )),
                }
            });
            let broker_check = async {
                match tokio::time::timeout(READY_CHECK_TIMEOUT, broker.is_ready()).await {
                    Ok(true) => None,
                    Ok(false) => Some("the broker is not reachable".to_string()),
                    Err(_) => Some(format!(
                        "the broker did not answer within {READY_CHECK_TIMEOUT:?}"
                    )),
                }
            };
            let (stores_failed, broker_failed) = tokio::join!(join_all(store_checks), broker_check);
            let failed: Vec<String> = stores_failed
                .into_iter()
                .chain(std::iter::once(broker_failed))
                .flatten()
                .collect();
            if failed.is_empty() {
                Ok(())
            } else {
                Err(failed.join("; "))
            }
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
pub fn build_participant<L: crate::group_commit::Ledger>(
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
