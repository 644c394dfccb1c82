//! Domain value types shared by the services and the message protocol.
//!
//! Amounts are never negative and ids are never empty: both are checked once,
//! where text from a URL or a message becomes a value, so the code behind can
//! rely on them.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// A non-negative quantity of stock, credit or money that fits in an i64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct Amount(i64);

impl Amount {
    pub const ZERO: Amount = Amount(0);

    pub fn new(value: i64) -> Option<Amount> {
        (value >= 0).then_some(Amount(value))
    }

    pub fn get(self) -> i64 {
        self.0
    }

    pub fn checked_add(self, other: Amount) -> Option<Amount> {
        self.0.checked_add(other.0).map(Amount)
    }

    /// `None` when the result would be negative.
    pub fn checked_sub(self, other: Amount) -> Option<Amount> {
        Amount::new(self.0 - other.0)
    }

    pub fn checked_mul(self, other: Amount) -> Option<Amount> {
        self.0.checked_mul(other.0).map(Amount)
    }

    /// Parses a path segment: decimal digits only, within i64.
    pub fn parse(what: &str, text: &str) -> Result<Amount, ApiError> {
        if text.is_empty() {
            return Err(ApiError::BadRequest(format!("{what} is missing")));
        }
        if !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ApiError::BadRequest(format!(
                "{what} must be a non-negative whole number, got {text:?}"
            )));
        }
        text.parse::<i64>().map(Amount).map_err(|_| {
            ApiError::BadRequest(format!("{what} {text} is too large (at most {})", i64::MAX))
        })
    }

    /// Like [`Amount::parse`], but 0 is refused too (adding or taking nothing is a client mistake).
    pub fn parse_positive(what: &str, text: &str) -> Result<Amount, ApiError> {
        let amount = Amount::parse(what, text)?;
        if amount == Amount::ZERO {
            return Err(ApiError::BadRequest(format!("{what} must be at least 1")));
        }
        Ok(amount)
    }
}

impl TryFrom<i64> for Amount {
    type Error = String;
    fn try_from(value: i64) -> Result<Self, Self::Error> {
        Amount::new(value).ok_or_else(|| format!("negative amount {value}"))
    }
}

impl From<Amount> for i64 {
    fn from(a: Amount) -> i64 {
        a.0
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Declares a string id type: 1 to 128 characters of `[A-Za-z0-9_.-]`.
macro_rules! string_id {
    ($name:ident, $what:literal) => {
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn parse(text: &str) -> Result<Self, ApiError> {
                // UUIDs and decimal batch ids fit; nothing that needs escaping in a URL or a key.
                let allowed = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
                if text.is_empty() || text.len() > 128 || !text.chars().all(allowed) {
                    return Err(ApiError::BadRequest(format!(
                        concat!("malformed ", $what, " {:?}"),
                        text
                    )));
                }
                Ok(Self(text.to_string()))
            }

            pub fn new_random() -> Self {
                Self(uuid::Uuid::new_v4().to_string())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::parse(&value).map_err(|e| e.to_string())
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_id!(ItemId, "item id");
string_id!(UserId, "user id");
string_id!(OrderId, "order id");

/// Identifies one checkout attempt across the three services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SagaId(pub uuid::Uuid);

impl SagaId {
    pub fn new() -> Self {
        SagaId(uuid::Uuid::new_v4())
    }
}

impl Default for SagaId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for SagaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for SagaId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(SagaId)
    }
}

/// The largest batch_init a request may ask for: larger is refused rather than run for minutes.
pub const MAX_BATCH: i64 = 10_000_000;

/// Parses a batch size for `batch_init` (0 allowed, at most [`MAX_BATCH`]).
pub fn parse_batch_size(what: &str, text: &str) -> Result<i64, ApiError> {
    let n = Amount::parse(what, text)?.get();
    if n > MAX_BATCH {
        return Err(ApiError::BadRequest(format!(
            "{what} {n} is too large (at most {MAX_BATCH})"
        )));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_accept_only_plain_non_negative_integers() {
        assert_eq!(Amount::parse("x", "0").unwrap().get(), 0);
        assert_eq!(Amount::parse("x", "42").unwrap().get(), 42);
        assert_eq!(
            Amount::parse("x", "9223372036854775807").unwrap().get(),
            i64::MAX
        );
        for bad in [
            "",
            "-1",
            "1.5",
            "abc",
            "+1",
            " 1",
            "99999999999999999999",
            "1e3",
        ] {
            assert!(Amount::parse("x", bad).is_err(), "{bad:?} accepted");
        }
        assert!(Amount::parse_positive("x", "0").is_err());
    }

    #[test]
    fn amount_arithmetic_never_goes_negative_or_overflows() {
        let one = Amount::new(1).unwrap();
        assert_eq!(Amount::ZERO.checked_sub(one), None);
        assert_eq!(Amount::new(i64::MAX).unwrap().checked_add(one), None);
        assert_eq!(
            Amount::new(i64::MAX)
                .unwrap()
                .checked_mul(Amount::new(2).unwrap()),
            None
        );
        assert!(Amount::new(-1).is_none());
        assert!(serde_json::from_str::<Amount>("-5").is_err());
    }

    #[test]
    fn ids_reject_empty_and_odd_text() {
        assert!(ItemId::parse("7").is_ok());
        assert!(ItemId::parse("").is_err());
        assert!(ItemId::parse("a b").is_err());
        assert!(ItemId::parse("a/b").is_err());
        assert!(ItemId::parse("6c1f5b8e-0a4b-4c43-9a53-1f0f2b0d4c11").is_ok());
        assert!(ItemId::parse(&"x".repeat(129)).is_err());
        assert!(serde_json::from_str::<UserId>("\"\"").is_err());
    }

    #[test]
    fn batch_sizes_are_bounded() {
        assert_eq!(parse_batch_size("n", "0").unwrap(), 0);
        assert!(parse_batch_size("n", "10000001").is_err());
    }
}
