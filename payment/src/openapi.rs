//! The payment service's part of the gateway's OpenAPI document (`GET /openapi.json`, through
//! the gateway `/payment/openapi.json`): the bodies its routes answer with, and the part
//! itself. The operations are declared on the handlers in [`crate::routes`]; what every service
//! shares is added by [`common::openapi::part`].

use serde::Deserialize;
use utoipa::openapi::OpenApi;
use utoipa::ToSchema;

/// The gateway's prefix for this service.
pub const PREFIX: &str = "payment";

/// A new user (credit 0).
#[derive(ToSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserCreated {
    #[schema(format = Uuid)]
    pub user_id: String,
}

/// A user's credit (after an `add_funds` or a `pay`: the new credit).
#[derive(ToSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credit {
    pub user_id: String,
    #[schema(minimum = 0)]
    pub credit: i64,
}

/// The payment service's part, as its instances serve it.
pub fn document() -> OpenApi {
    let (_, business) = crate::routes::api().split_for_parts();
    common::openapi::part(PREFIX, "payment", business)
}
