//! The order service's part of the gateway's OpenAPI document (`GET /openapi.json`, through
//! the gateway `/orders/openapi.json`): the bodies its routes answer with, and the part itself.
//! The operations are declared on the handlers in [`crate::routes`]; what every service shares
//! is added by [`common::openapi::part`].

use serde::Deserialize;
use utoipa::openapi::schema::{AnyOfBuilder, Array, ArrayBuilder, ObjectBuilder, Type};
use utoipa::openapi::OpenApi;
use utoipa::ToSchema;

/// The gateway's prefix for this service.
pub const PREFIX: &str = "orders";

/// A new order (unpaid, no items, total 0).
#[derive(ToSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderCreated {
    #[schema(format = Uuid)]
    pub order_id: String,
}

/// An order (after an `addItem`: with the item added).
#[derive(ToSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderView {
    pub order_id: String,
    pub paid: bool,
    /// One `[item_id, quantity]` line per item.
    #[schema(schema_with = lines)]
    pub items: Vec<(String, i64)>,
    pub user_id: String,
    #[schema(minimum = 0)]
    pub total_cost: i64,
}

/// A checked-out order: paid.
#[derive(ToSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckedOut {
    pub order_id: String,
    pub paid: bool,
}

/// `[[item_id, quantity], ...]`: each line a pair. Said loosely (two elements, each an id or a
/// quantity): the exact tuple schema (`prefixItems`) is refused by schemathesis 4, which turns
/// it into the draft-4 array form of `items` and then checks that against OpenAPI 3.1.
fn lines() -> Array {
    let item_id = ObjectBuilder::new().schema_type(Type::String);
    let quantity = ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(1));
    let line = ArrayBuilder::new()
        .items(AnyOfBuilder::new().item(item_id).item(quantity))
        .min_items(Some(2))
        .max_items(Some(2));
    ArrayBuilder::new()
        .description(Some("One `[item_id, quantity]` line per item."))
        .items(line)
        .build()
}

/// The order service's part, as its instances serve it.
pub fn document() -> OpenApi {
    let (_, business) = crate::routes::api().split_for_parts();
    common::openapi::part(PREFIX, "order", business)
}
