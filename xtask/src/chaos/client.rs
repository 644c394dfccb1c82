//! The load's HTTP client: one pooled reqwest client to the gateway, and what an answer means
//! to the checks (2xx, a refusal, a system failure, or no answer at all).
//!
//! Every POST carries an `Idempotency-Key` (API.md): a retry with the same key gets the first
//! answer, which is how the end of the run resolves the writes whose outcome stayed unknown.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

/// Longer than the gateway's own read timeout (60 s): the gateway, not the client, says when a
/// request took too long, so "no answer" means a connection that broke.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(75);

/// One answer, or none.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Status(u16, Value),
    /// Transport error or client timeout: the request may or may not have been applied.
    NoAnswer(String),
}

/// What an answer tells a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    Ok,
    /// A 4xx: refused, nothing applied.
    Refused,
    /// A 5xx: the system failed; the outcome is unknown.
    Failed,
    NoAnswer,
}

impl Reply {
    pub fn class(&self) -> Class {
        match self {
            Reply::Status(s, _) if (200..300).contains(s) => Class::Ok,
            Reply::Status(s, _) if (400..500).contains(s) => Class::Refused,
            Reply::Status(..) => Class::Failed,
            Reply::NoAnswer(_) => Class::NoAnswer,
        }
    }

    /// Outcome known to the client: applied (2xx) or not (4xx).
    pub fn definite(&self) -> bool {
        matches!(self.class(), Class::Ok | Class::Refused)
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Reply::Status(s, _) => Some(*s),
            Reply::NoAnswer(_) => None,
        }
    }

    pub fn body(&self) -> Option<&Value> {
        match self {
            Reply::Status(_, b) => Some(b),
            Reply::NoAnswer(_) => None,
        }
    }

    /// The `error` text of an error body (API.md: every error body is `{"error": ...}`).
    pub fn error_text(&self) -> Option<&str> {
        self.body()?.get("error")?.as_str()
    }

    /// A field of the body as i64 (`stock`, `credit`, ...).
    pub fn int(&self, field: &str) -> Option<i64> {
        self.body()?.get(field)?.as_i64()
    }

    /// A field of the body as a string (`item_id`, `order_id`, ...).
    pub fn text(&self, field: &str) -> Option<String> {
        Some(self.body()?.get(field)?.as_str()?.to_string())
    }

    /// Short form for messages.
    pub fn describe(&self) -> String {
        match self {
            Reply::Status(s, b) => {
                let body = b.to_string();
                let cut: String = body.chars().take(200).collect();
                format!("{s} {cut}")
            }
            Reply::NoAnswer(why) => format!("no answer ({why})"),
        }
    }
}

/// The gateway, seen by the load.
#[derive(Clone)]
pub struct Http {
    client: reqwest::Client,
    base: String,
}

impl Http {
    pub fn new(base: &str) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()?;
        Ok(Http {
            client,
            base: base.trim_end_matches('/').to_string(),
        })
    }

    pub async fn post(&self, path: &str, key: &str) -> Reply {
        let req = self
            .client
            .post(format!("{}{path}", self.base))
            .header("Idempotency-Key", key);
        Self::send(req).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        Self::send(self.client.get(format!("{}{path}", self.base))).await
    }

    async fn send(req: reqwest::RequestBuilder) -> Reply {
        match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                match resp.bytes().await {
                    // A body that is not JSON (an nginx error page) is kept as a string.
                    Ok(bytes) => Reply::Status(
                        status,
                        serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                            Value::String(String::from_utf8_lossy(&bytes).into_owned())
                        }),
                    ),
                    Err(e) => Reply::NoAnswer(format!("body: {e}")),
                }
            }
            Err(e) => Reply::NoAnswer(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn classes_follow_the_status() {
        assert_eq!(Reply::Status(200, json!({})).class(), Class::Ok);
        assert_eq!(Reply::Status(400, json!({})).class(), Class::Refused);
        assert_eq!(Reply::Status(503, json!({})).class(), Class::Failed);
        assert_eq!(Reply::NoAnswer("reset".into()).class(), Class::NoAnswer);
        assert!(Reply::Status(404, json!({})).definite());
        assert!(!Reply::Status(502, json!({})).definite());
    }

    #[test]
    fn bodies_are_read() {
        let r = Reply::Status(400, json!({"error": "checkout refused: x", "stock": 3}));
        assert_eq!(r.error_text(), Some("checkout refused: x"));
        assert_eq!(r.int("stock"), Some(3));
        assert_eq!(Reply::NoAnswer("x".into()).int("stock"), None);
    }
}
