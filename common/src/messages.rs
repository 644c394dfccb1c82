//! The checkout protocol between the orchestrator and the participants.
//!
//! Every AMQP message body is a [`Batch`]: one message may carry several
//! sagas' commands (or replies), so the broker's per-message cost can be
//! shared when load is high. The `version` field lets the format evolve: a
//! consumer refuses (dead-letters) a version it does not know.
//!
//! Every command carries its saga id; participants record the outcome per
//! saga beside their data, which is what makes redelivery harmless.

use serde::{Deserialize, Serialize};

use crate::types::{Amount, ItemId, SagaId, UserId};

pub const PROTOCOL_VERSION: u16 = 1;

/// Durable queue of the stock participant's commands.
pub const STOCK_COMMANDS: &str = "stock.commands";
/// Durable queue of the payment participant's commands.
pub const PAYMENT_COMMANDS: &str = "payment.commands";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch<T> {
    pub version: u16,
    pub items: Vec<T>,
}

impl<T: Serialize> Batch<T> {
    pub fn of(items: Vec<T>) -> Self {
        Batch {
            version: PROTOCOL_VERSION,
            items,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("protocol types always serialize")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("unsupported protocol version {0} (this build speaks {PROTOCOL_VERSION})")]
    Version(u16),
}

impl<T: for<'de> Deserialize<'de>> Batch<T> {
    pub fn from_json(body: &[u8]) -> Result<Self, DecodeError> {
        let batch: Batch<T> = serde_json::from_slice(body)?;
        if batch.version != PROTOCOL_VERSION {
            return Err(DecodeError::Version(batch.version));
        }
        Ok(batch)
    }
}

/// One line of a reservation: take (or give back) `quantity` of `item_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub item_id: ItemId,
    pub quantity: Amount,
}

/// What a participant is asked to do for one saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Stock: take every line, or none.
    Reserve { lines: Vec<Line> },
    /// Stock: give back what `Reserve` took for this saga (if anything).
    Release { lines: Vec<Line> },
    /// Payment: take `amount` from the user's credit.
    Charge { user_id: UserId, amount: Amount },
    /// Payment: give back what `Charge` took for this saga (if anything).
    Refund { user_id: UserId, amount: Amount },
    /// Either participant: the saga committed, so what it took will never be
    /// given back. Frees the reserve kept for a give-back and the per-saga
    /// record. Nobody waits for it, and participants answer none; it names the
    /// instance's reply queue all the same, so it travels with the commands.
    Settle,
}

/// The kind of an [`Action`], used to match replies to what was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Reserve,
    Release,
    Charge,
    Refund,
    Settle,
}

impl Action {
    pub fn step(&self) -> Step {
        match self {
            Action::Reserve { .. } => Step::Reserve,
            Action::Release { .. } => Step::Release,
            Action::Charge { .. } => Step::Charge,
            Action::Refund { .. } => Step::Refund,
            Action::Settle => Step::Settle,
        }
    }

    /// A step that takes something (as opposed to giving back or settling).
    pub fn is_forward(&self) -> bool {
        matches!(self, Action::Reserve { .. } | Action::Charge { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub saga_id: SagaId,
    #[serde(flatten)]
    pub action: Action,
    /// Unix time (ms) after which a forward step must not be applied: the
    /// orchestrator has counted it as unanswered by then. Bounding a command's
    /// age is what lets participants forget their per-saga records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
}

/// The result of a command. A compensation ends `Applied` (giving back
/// nothing is a successful give-back) unless it `Failed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Applied,
    Refused {
        reason: String,
    },
    /// The participant could not apply it for a reason retrying does not
    /// cure and dead-lettered it. Whether a forward step took anything is
    /// then unknown; a compensation that failed needs an operator.
    Failed {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub saga_id: SagaId,
    pub step: Step,
    #[serde(flatten)]
    pub outcome: Outcome,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_as_tagged_json() {
        let command = Command {
            saga_id: SagaId::new(),
            action: Action::Reserve {
                lines: vec![Line {
                    item_id: ItemId::parse("7").unwrap(),
                    quantity: Amount::new(2).unwrap(),
                }],
            },
            expires_at_ms: Some(1),
        };
        let body = Batch::of(vec![command.clone()]).to_json();
        let text = String::from_utf8(body.clone()).unwrap();
        assert!(text.contains("\"action\":\"reserve\""), "{text}");
        let back = Batch::<Command>::from_json(&body).unwrap();
        assert_eq!(back.items, vec![command]);
        // A settle has no fields besides the saga; an old command without expiry still decodes.
        let settle = br#"{"version":1,"items":[{"saga_id":"6c1f5b8e-0a4b-4c43-9a53-1f0f2b0d4c11","action":"settle"}]}"#;
        let decoded = Batch::<Command>::from_json(settle).unwrap();
        assert_eq!(decoded.items[0].action, Action::Settle);
        assert_eq!(decoded.items[0].expires_at_ms, None);
    }

    #[test]
    fn unknown_versions_and_bad_values_are_refused() {
        let future = br#"{"version":2,"items":[]}"#;
        assert!(matches!(
            Batch::<Command>::from_json(future),
            Err(DecodeError::Version(2))
        ));
        let negative = br#"{"version":1,"items":[{"saga_id":"6c1f5b8e-0a4b-4c43-9a53-1f0f2b0d4c11","action":"charge","user_id":"1","amount":-5}]}"#;
        assert!(Batch::<Command>::from_json(negative).is_err());
    }

    #[test]
    fn replies_carry_the_reason_of_a_refusal() {
        let reply = Reply {
            saga_id: SagaId::new(),
            step: Step::Charge,
            outcome: Outcome::Refused {
                reason: "not enough credit".into(),
            },
        };
        let body = Batch::of(vec![reply.clone()]).to_json();
        assert_eq!(Batch::<Reply>::from_json(&body).unwrap().items, vec![reply]);
    }
}
