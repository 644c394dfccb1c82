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
            .find(&url, "stock", || format!("item {item} not found"))
            .await?;
        Ok(found.price)
    }

    /// Ok if payment knows the user; a 404 if not.
    pub async fn user(&self, user: &UserId) -> Result<(), ApiError> {
        let url = format!("{}/find_user/{user}", self.payment_url);
        let _: User = self
            .find(&url, "payment", || format!("user {user} not found"))
            .await?;
        Ok(())
    }

    /// `GET url`: its JSON on a 200, a 404 on a 404, and otherwise a 503 (the other
    /// service could not say).
    async fn find<T: DeserializeOwned>(
        &self,
        url: &str,
        service: &str,
        not_found: impl FnOnce() -> String,
    ) -> Result<T, ApiError> {
        let unavailable = |e: &dyn std::fmt::Display| {
            ApiError::Unavailable(format!("{service} service unreachable: {e}"))
        };
        let response = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| unavailable(&e))?;
        match response.status().as_u16() {
            200 => response.json::<T>().await.map_err(|e| unavailable(&e)),
            404 => Err(ApiError::NotFound(not_found())),
            other => Err(unavailable(&format!("status {other}"))),
        }
    }
}
