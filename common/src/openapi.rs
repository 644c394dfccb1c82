//! The OpenAPI 3.1 document of the gateway API (API.md), generated from the code.
//!
//! Why it exists: API.md is the contract in prose; clients and tools (schemathesis, code
//! generators) want it machine-readable, and a hand-written copy drifts. Each service declares
//! its business routes with `utoipa-axum` (`routes!` over handlers that carry
//! `#[utoipa::path]`), so a route and its entry in the document are one declaration. What holds
//! for every route of every service is said once, here, by [`part`]:
//! - every POST takes an optional `Idempotency-Key` header;
//! - every operation may answer 503 with `Retry-After` (a store or the broker unreachable, a
//!   write no replica confirmed: the outcome is unknown, the retry with the same key is safe);
//! - the operational routes of `http.rs` that the gateway routes: `/health`, `/ready` and
//!   `/openapi.json` (`/metrics` is refused by every gateway, so it is not in the document);
//! - paths as the client sees them through the gateway, under the service's prefix
//!   (`/stock/find/{item_id}`), so the three parts merge into one document.
//!
//! Each service serves its part at `GET /openapi.json` ([`serve`]), which the gateway routes as
//! `/<prefix>/openapi.json`; [`gateway`] merges the three parts into the one document of the
//! gateway API, checked in as `gateway/openapi.json` (kept equal by `order/tests/openapi.rs`).

use axum::body::Bytes;
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::openapi::path::{Operation, Parameter, PathItem};
use utoipa::openapi::{Info, OpenApi, Response};
use utoipa::{PartialSchema, ToSchema};

/// Where every service serves its part.
pub const PATH: &str = "/openapi.json";

/// Every error body (API.md): `{"error": "<human readable reason>"}`.
#[derive(ToSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub error: String,
}

/// What a `batch_init` did.
#[derive(ToSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchDone {
    pub msg: String,
}

/// An id in a path: a UUID from a `create`, or a decimal `batch_init` id. The services accept
/// 1-128 characters of `[A-Za-z0-9_.-]`; the document leaves out ids that start with a dot,
/// which no endpoint hands out and which a URL would read as `.` or `..` path segments.
#[derive(ToSchema)]
#[schema(as = Id, example = "0", pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")]
pub struct IdParam(pub String);

/// A non-negative whole number that fits in an i64 (a price, a starting balance).
#[derive(ToSchema)]
#[schema(as = Amount, minimum = 0, maximum = 9223372036854775807_i64)]
pub struct AmountParam(pub i64);

/// A positive whole number that fits in an i64 (an amount added or taken, a quantity).
#[derive(ToSchema)]
#[schema(as = PositiveAmount, minimum = 1, maximum = 9223372036854775807_i64)]
pub struct PositiveAmountParam(pub i64);

/// A `batch_init` size: 0 to 10 000 000.
#[derive(ToSchema)]
#[schema(as = BatchSize, minimum = 0, maximum = 10000000)]
pub struct BatchSizeParam(pub i64);

/// The body of `/health`, and of `/ready` when ready.
#[derive(ToSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceStatus {
    pub status: String,
}

fn from_json<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("a valid OpenAPI fragment")
}

fn error_content(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    })
}

fn idempotency_key() -> Parameter {
    from_json(json!({
        "name": "Idempotency-Key",
        "in": "header",
        "required": false,
        "description": "Makes the POST idempotent: a repeat with the same key on the same path \
            within 24 hours applies nothing again and returns the first answer (status and \
            body). 1-128 printable ASCII characters (an empty one is a 400); without one the \
            gateway stamps a key of its own, which only serves its own retries.",
        "schema": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[ -~]+$"}
    }))
}

fn unavailable() -> Response {
    let mut response = error_content(
        "The system could not finish the request (a store or the broker unreachable, or a \
         write no replica confirmed): the outcome is unknown. Retry with the same \
         Idempotency-Key, which cannot apply anything twice.",
    );
    response["headers"] = json!({
        "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}
    });
    from_json(response)
}

/// The operational routes (`http.rs`) that the gateway routes under each prefix.
fn ops_paths(tag: &str) -> Vec<(&'static str, PathItem)> {
    let status = json!({"$ref": "#/components/schemas/ServiceStatus"});
    let get = |summary: &str, responses: Value| -> PathItem {
        from_json(json!({"get": {"tags": [tag], "summary": summary, "responses": responses}}))
    };
    vec![
        (
            "/health",
            get(
                "Liveness: 200 while the process runs",
                json!({"200": {"description": "alive",
                    "content": {"application/json": {"schema": status}}}}),
            ),
        ),
        (
            "/ready",
            get(
                "Readiness: 200 only while the service's stores and the broker are reachable",
                json!({
                    "200": {"description": "ready",
                        "content": {"application/json": {"schema": status}}},
                    "503": error_content("a store or the broker is not reachable")
                }),
            ),
        ),
        (
            PATH,
            get(
                "This service's part of the gateway's OpenAPI 3.1 document",
                json!({"200": {"description": "the document",
                    "content": {"application/json": {"schema": {"type": "object"}}}}}),
            ),
        ),
    ]
}

fn operations_mut(item: &mut PathItem) -> impl Iterator<Item = (bool, &mut Operation)> {
    [
        (false, &mut item.get),
        (false, &mut item.put),
        (true, &mut item.post),
        (false, &mut item.delete),
        (false, &mut item.patch),
    ]
    .into_iter()
    .filter_map(|(is_post, op)| op.as_mut().map(|op| (is_post, op)))
}

/// A service's part of the gateway's document: its business routes (`business`, from
/// `utoipa-axum`), the contract-wide parameters and answers, and its operational routes, every
/// path under `/<prefix>` as the gateway routes it.
pub fn part(prefix: &str, service: &str, business: OpenApi) -> OpenApi {
    let mut doc = business;
    for (path, item) in ops_paths(service) {
        doc.paths.paths.insert(path.to_string(), item);
    }
    for item in doc.paths.paths.values_mut() {
        for (is_post, op) in operations_mut(item) {
            // Unique across the gateway's document: `stock_find`, `order_find`.
            if let Some(id) = &mut op.operation_id {
                *id = format!("{service}_{id}");
            }
            if is_post {
                op.parameters
                    .get_or_insert_with(Vec::new)
                    .push(idempotency_key().into());
            }
            op.responses
                .responses
                .entry("503".to_string())
                .or_insert_with(|| unavailable().into());
        }
    }
    // `routes!` collects the bodies the handlers name, not the schemas their parameters name.
    let components = doc.components.get_or_insert_with(Default::default);
    for (name, schema) in [
        (ErrorBody::name(), ErrorBody::schema()),
        (ServiceStatus::name(), ServiceStatus::schema()),
        (IdParam::name(), IdParam::schema()),
        (AmountParam::name(), AmountParam::schema()),
        (PositiveAmountParam::name(), PositiveAmountParam::schema()),
        (BatchSizeParam::name(), BatchSizeParam::schema()),
    ] {
        components
            .schemas
            .entry(name.into_owned())
            .or_insert(schema);
    }
    OpenApi::new(
        info(
            &format!("Webshop checkout: the {service} service"),
            &format!(
                "The {service} service's part of the gateway API (shared/API.md), with paths \
                 as the gateway routes them. Served by each {service} instance at \
                 `GET {PATH}`, through the gateway at `GET /{prefix}{PATH}`."
            ),
        ),
        utoipa::openapi::Paths::new(),
    )
    .nest(format!("/{prefix}"), doc)
}

fn info(title: &str, description: &str) -> Info {
    let mut info = Info::new(title, env!("CARGO_PKG_VERSION"));
    info.description = Some(description.to_string());
    info
}

/// The one document of the gateway API: the three services' parts together.
pub fn gateway(parts: impl IntoIterator<Item = OpenApi>) -> OpenApi {
    let mut doc = OpenApi::new(
        info(
            "Webshop checkout: the gateway API",
            "The HTTP contract of the fleet (shared/API.md) as the gateway serves it. Each \
             service serves its part at `GET /<prefix>/openapi.json` (`/stock`, `/payment`, \
             `/orders`); this is their union.",
        ),
        utoipa::openapi::Paths::new(),
    );
    for part in parts {
        doc.merge(part);
    }
    doc
}

/// `GET /openapi.json`, answering `doc` (rendered once).
pub fn serve<S: Clone + Send + Sync + 'static>(doc: &OpenApi) -> Router<S> {
    let body = Bytes::from(doc.to_pretty_json().expect("the document serialises"));
    Router::new().route(
        PATH,
        get(move || {
            let body = body.clone();
            async move { ([(CONTENT_TYPE, "application/json")], body) }
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to_value<T: serde::Serialize>(t: &T) -> Value {
        serde_json::to_value(t).unwrap()
    }

    #[test]
    fn parameter_bounds_are_the_parsers_bounds() {
        let batch = to_value(&BatchSizeParam::schema());
        assert_eq!(batch["maximum"], crate::types::MAX_BATCH);
        assert_eq!(batch["minimum"], 0);
        assert_eq!(to_value(&AmountParam::schema())["maximum"], i64::MAX);
        assert_eq!(to_value(&PositiveAmountParam::schema())["minimum"], 1);
        let id = to_value(&IdParam::schema());
        assert_eq!(id["pattern"], "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$");
    }

    #[test]
    fn a_part_is_under_its_prefix_with_what_every_route_shares() {
        let business: OpenApi = from_json(json!({
            "openapi": "3.1.0",
            "info": {"title": "t", "version": "0"},
            "paths": {
                "/find/{id}": {"get": {"operationId": "find", "responses": {}}},
                "/add/{id}": {"post": {"operationId": "add", "responses": {}}}
            }
        }));
        let part = to_value(&part("stock", "stock", business));
        let paths = part["paths"].as_object().unwrap();
        let mut names: Vec<&str> = paths.keys().map(String::as_str).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "/stock/add/{id}",
                "/stock/find/{id}",
                "/stock/health",
                "/stock/openapi.json",
                "/stock/ready"
            ]
        );
        let add = &paths["/stock/add/{id}"]["post"];
        assert_eq!(add["operationId"], "stock_add");
        assert_eq!(add["parameters"][0]["name"], "Idempotency-Key");
        assert_eq!(add["parameters"][0]["in"], "header");
        let find = &paths["/stock/find/{id}"]["get"];
        assert!(find.get("parameters").is_none(), "a GET takes no key");
        for op in [add, find, &paths["/stock/ready"]["get"]] {
            assert!(op["responses"]["503"].is_object(), "{op}");
        }
        assert!(add["responses"]["503"]["headers"]["Retry-After"].is_object());
        let schemas = part["components"]["schemas"].as_object().unwrap();
        for name in ["ErrorBody", "Id", "Amount", "PositiveAmount", "BatchSize"] {
            assert!(schemas.contains_key(name), "{name} missing");
        }
        assert_eq!(part["openapi"], "3.1.0");
    }

    #[test]
    fn the_gateway_document_is_the_union_of_the_parts() {
        let one = |path: &str| -> OpenApi {
            from_json(json!({
                "openapi": "3.1.0",
                "info": {"title": "t", "version": "0"},
                "paths": {path: {"get": {"responses": {}}}}
            }))
        };
        let doc = to_value(&gateway([
            part("stock", "stock", one("/a")),
            part("orders", "order", one("/b")),
        ]));
        let paths = doc["paths"].as_object().unwrap();
        assert!(paths.contains_key("/stock/a") && paths.contains_key("/orders/b"));
        assert!(paths.contains_key("/stock/ready") && paths.contains_key("/orders/ready"));
        assert_eq!(paths.len(), 8);
    }
}
