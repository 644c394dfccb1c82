//! The stock service's part of the gateway's OpenAPI document (`GET /openapi.json`, through
//! the gateway `/stock/openapi.json`): the bodies its routes answer with, and the part itself.
//! The operations are declared on the handlers in [`crate::routes`]; what every service shares
//! is added by [`common::openapi::part`].

use serde::Deserialize;
use utoipa::openapi::OpenApi;
use utoipa::ToSchema;

/// The gateway's prefix for this service.
pub const PREFIX: &str = "stock";

/// A new item (stock 0).
#[derive(ToSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemCreated {
    #[schema(format = Uuid)]
    pub item_id: String,
}

/// An item: its stock and price.
#[derive(ToSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemFound {
    #[schema(minimum = 0)]
    pub stock: i64,
    #[schema(minimum = 0)]
    pub price: i64,
}

/// An item's stock after an `add` or a `subtract`.
#[derive(ToSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StockLevel {
    pub item_id: String,
    #[schema(minimum = 0)]
    pub stock: i64,
}

/// The stock service's part, as its instances serve it.
pub fn document() -> OpenApi {
    let (_, business) = crate::routes::api().split_for_parts();
    common::openapi::part(PREFIX, "stock", business)
}
