//! What the order service reads from the other services: an item's price (for
//! `addItem`) from stock, whether a user exists (for `create`) from payment.
//! Reads, so a direct HTTP call is enough; commands never take this path.

use common::error::ApiError;
use common::types::{Amount, ItemId, UserId};
use serde::de::DeserializeOwned;
use serde::Deserialize;

pub struct Lookups {
    stock_url: String,
    payment_url: String,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct Item {
    price: Amount,
}

#[derive(Deserialize)]
struct User {}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
}

impl Lookups {
    pub fn new(stock_url: &str, payment_url: &str) -> Self {
        Self {
            stock_url: stock_url.trim_end_matches('/').to_string(),
            payment_url: payment_url.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(5))
                .build()
                .expect("an HTTP client without TLS builds"),
        }
    }

    /// The item's price; a 404 if stock has no such item.
    pub async fn price(&self, item: &ItemId) -> Result<Amount, ApiError> {
        let url = format!("{}/find/{item}", self.stock_url);
        let found: Item = self
            .find(&url, "stock", &format!("item {item} not found"))
            .await?;
        Ok(found.price)
    }

    /// Ok if payment knows the user; a 404 if not.
    pub async fn user(&self, user: &UserId) -> Result<(), ApiError> {
        let url = format!("{}/find_user/{user}", self.payment_url);
        let _: User = self
            .find(&url, "payment", &format!("user {user} not found"))
            .await?;
        Ok(())
    }

    /// `GET url`: its JSON on a 200, a 404 when the service says `not_found` (its own
    /// words: a 404 of a route that does not exist, a misconfigured URL, is not an answer
    /// about the id), otherwise a 503 (the other service could not say). A refused
    /// connection or a 5xx is tried once more (a read: always safe), so one instance
    /// dying between two requests is not a failure where no gateway retries (compose and
    /// Kubernetes call the service directly).
    async fn find<T: DeserializeOwned>(
        &self,
        url: &str,
        service: &str,
        not_found: &str,
    ) -> Result<T, ApiError> {
        let unavailable = |e: &dyn std::fmt::Display| {
            ApiError::Unavailable(format!("{service} service unreachable: {e}"))
        };
        let mut tries = 0;
        let response = loop {
            tries += 1;
            match self.http.get(url).send().await {
                Ok(r) if r.status().is_server_error() && tries < 2 => {}
                Ok(r) => break r,
                Err(e) if tries >= 2 => return Err(unavailable(&e)),
                Err(_) => {}
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        match response.status().as_u16() {
            200 => response.json::<T>().await.map_err(|e| unavailable(&e)),
            404 => match response.json::<ErrorBody>().await {
                Ok(body) if body.error == not_found => Err(ApiError::NotFound(body.error)),
                _ => Err(unavailable(&format!("404 from {url}, not about the id"))),
            },
            other => Err(unavailable(&format!("status {other}"))),
        }
    }
}
