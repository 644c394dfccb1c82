//! Asks the stock service for an item's price (for `addItem`). A read, so a
//! direct HTTP call is enough; commands never take this path.

use common::error::ApiError;
use common::types::{Amount, ItemId};
use serde::Deserialize;

pub struct StockClient {
    base_url: String,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct Found {
    price: Amount,
}

impl StockClient {
    pub fn new(base_url: &str) -> Self {
        Self {
            base_url: base_url.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(5))
                .build()
                .expect("an HTTP client without TLS builds"),
        }
    }

    pub async fn price(&self, item: &ItemId) -> Result<Amount, ApiError> {
        let url = format!("{}/find/{item}", self.base_url);
        let unavailable = |e: &dyn std::fmt::Display| {
            ApiError::Unavailable(format!("stock service unreachable: {e}"))
        };
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| unavailable(&e))?;
        match response.status().as_u16() {
            200 => Ok(response
                .json::<Found>()
                .await
                .map_err(|e| unavailable(&e))?
                .price),
            404 => Err(ApiError::NotFound(format!("item {item} not found"))),
            other => Err(unavailable(&format!("status {other}"))),
        }
    }
}
