//! Orders in the order store: `order:<id>` holds the order as JSON. Every
//! change is a WATCH/MULTI/EXEC transaction on that one key, serialised per
//! order inside the process.
//!
//! An order under checkout is frozen: `checkout` names the saga that froze
//! it, and nothing but that saga's decision may change it. The decision
//! itself is a compare-and-set here, on the order, because this is the one
//! record that says what was bought:
//! - [`Orders::commit`] marks it paid only if that saga still holds it, so
//!   a paid order was charged and reserved for exactly what it shows;
//! - [`Orders::fence`] (abort, or recovery of a saga whose owner died)
//!   removes the saga's hold, after which that saga can never commit.
//!
//! `batch_init` overwriting an order removes the hold as well, so a saga whose
//! order was reset under it aborts and gives everything back.
//!
//! Each of these returns only once a replica has what it decided on (the
//! store's WAIT, also when nothing had to be written: a repeated commit finds
//! the order already paid, and that must be on two nodes before anyone is told).

use std::sync::Arc;

use common::error::ApiError;
use common::idempotency::{self, Answer, IdemKey};
use common::keylock::KeyLocks;
use common::messages::Line;
use common::redis_store::{next_reply, Conn, Plan, Planned, Store, StoreError, Tx};
use common::types::{Amount, ItemId, OrderId, SagaId, UserId};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::outbox::{self, Event, EventType};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub user_id: UserId,
    pub paid: bool,
    /// One line per item: adding an item that is already there sums the quantities.
    pub items: Vec<(ItemId, Amount)>,
    pub total_cost: Amount,
    /// The saga whose checkout froze the order (while it may still run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkout: Option<SagaId>,
    /// The saga that paid the order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paid_by: Option<SagaId>,
}

/// What [`Orders::freeze`] found.
#[derive(Debug, PartialEq)]
pub enum Freeze {
    /// The order is now held by the saga, with this content.
    Frozen(Order),
    Paid,
    /// Another saga holds it, one that has not ended.
    Held(SagaId),
    /// This saga was fenced (aborted by recovery or an operator) before it
    /// ever held the order: it must not take it now.
    Fenced,
    NotFound,
}

impl Order {
    fn new(user_id: UserId) -> Self {
        Order {
            user_id,
            paid: false,
            items: Vec::new(),
            total_cost: Amount::ZERO,
            checkout: None,
            paid_by: None,
        }
    }

    /// The reservation a checkout asks of the stock service.
    pub fn lines(&self) -> Vec<Line> {
        self.items
            .iter()
            .map(|(item_id, quantity)| Line {
                item_id: item_id.clone(),
                quantity: *quantity,
            })
            .collect()
    }

    /// Adds `quantity` of an item costing `price` each; `None` when a sum would overflow.
    fn with_item(mut self, item: ItemId, quantity: Amount, price: Amount) -> Option<Order> {
        let cost = price.checked_mul(quantity)?;
        self.total_cost = self.total_cost.checked_add(cost)?;
        match self.items.iter_mut().find(|(id, _)| *id == item) {
            Some((_, q)) => *q = q.checked_add(quantity)?,
            None => self.items.push((item, quantity)),
        }
        Some(self)
    }
}

pub struct Orders {
    store: Arc<Store>,
    /// Decisions and freezes go through it: see `change`.
    planned: Planned,
    locks: KeyLocks,
    /// Told when a decision appended an event to the outbox.
    relay: Arc<outbox::Wake>,
}

fn key(id: &OrderId) -> String {
    format!("order:{id}")
}

/// The mark a fence leaves for a saga that did not hold the order (yet): a
/// later freeze for that saga is refused. Kept far longer than a checkout can
/// take between beginning its saga and freezing the order.
fn fence_key(saga: SagaId) -> String {
    format!("fence:{saga}")
}

const FENCE_TTL_SECS: u64 = 3600;

/// The mark a commit leaves beside the order it paid: the checkout's decision, kept where
/// `batch_init` does not reach. A commit answers 200 and settles before the saga store logs
/// it; should `batch_init` overwrite the order meanwhile and the owner die, recovery's fence
/// still finds the saga committed (and a retried commit finds its own). Kept as long as a
/// finished saga's record: far longer than a saga takes from its commit to its log.
fn paid_key(saga: SagaId) -> String {
    format!("paid:{saga}")
}

const PAID_TTL_SECS: u64 = 600;

/// What the order store holds about a saga besides the order: its fence mark and its paid
/// mark, read (and watched) with the order by every change.
#[derive(Debug, Clone, Copy)]
struct Marks {
    /// Fenced before it ever held the order.
    fenced: bool,
    /// Committed (it paid the order, whatever the order says now).
    paid: bool,
}

/// A mark a change leaves for its saga.
#[derive(Debug, Clone, Copy)]
enum Leave {
    Fence,
    Paid,
}

fn encode(order: &Order) -> String {
    serde_json::to_string(order).expect("orders always serialize")
}

async fn read(conn: &mut Conn, key: &str) -> Result<Option<Order>, StoreError> {
    let raw: Option<String> = redis::cmd("GET")
        .arg(key)
        .query_async(conn)
        .await
        .map_err(StoreError::Redis)?;
    decode(key, raw)
}

fn decode(key: &str, raw: Option<String>) -> Result<Option<Order>, StoreError> {
    raw.map(|r| serde_json::from_str(&r).map_err(|e| StoreError::corrupt(key, e)))
        .transpose()
}

impl Orders {
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            planned: Planned::start(store.clone()),
            store,
            locks: KeyLocks::default(),
            relay: Arc::default(),
        }
    }

    /// What wakes the outbox relay of this instance (see [`outbox::relay_forever`]).
    pub fn relay_wake(&self) -> Arc<outbox::Wake> {
        self.relay.clone()
    }

    /// Creates an empty order, once per idempotency key.
    /// `create`: a new empty order for `user_id`, once per idempotency key; `known` carries
    /// the refusal of the user look-up (an unknown user), which is recorded like an order.
    pub async fn create(
        &self,
        user_id: UserId,
        known: Result<(), ApiError>,
        idem: &IdemKey,
    ) -> Result<Answer, ApiError> {
        idempotency::once(&self.store, idem, || {
            let mut writes = redis::pipe();
            if let Err(e) = &known {
                return (writes, Answer::refusal(e));
            }
            let id = OrderId::new_random();
            writes
                .set(key(&id), encode(&Order::new(user_id.clone())))
                .ignore();
            (writes, Answer::ok(json!({ "order_id": id })))
        })
        .await
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Creates (or overwrites) orders `"0"`..`"n-1"`, each for a random user
    /// with two random items of quantity 1.
    pub async fn batch_init(
        &self,
        n: i64,
        n_items: i64,
        n_users: i64,
        price: Amount,
    ) -> Result<(), ApiError> {
        if n > 0 && (n_items == 0 || n_users == 0) {
            return Err(ApiError::BadRequest(
                "n_items and n_users must be at least 1 when n is".into(),
            ));
        }
        let one = Amount::new(1).expect("1 is an amount");
        if price
            .checked_mul(Amount::new(2).expect("2 is an amount"))
            .is_none()
        {
            return Err(ApiError::BadRequest(format!(
                "item_price {price} makes a total overflow"
            )));
        }
        let decimal_id = |i: i64| i.to_string();
        // Seeded from the thread RNG: `ThreadRng` cannot be held across an await.
        let mut rng = rand::rngs::StdRng::from_rng(&mut rand::rng());
        // One MSET per chunk: a command per order would cost Redis (and its AOF and
        // replicas) the per-command overhead a thousand times for the same bytes.
        self.store
            .write_batch(n, |writes, ids| {
                let mset = writes.cmd("MSET");
                for i in ids {
                    let user = UserId::parse(&decimal_id(rng.random_range(0..n_users)))
                        .expect("decimal ids are valid");
                    let mut order = Order::new(user);
                    for _ in 0..2 {
                        let item = ItemId::parse(&decimal_id(rng.random_range(0..n_items)))
                            .expect("decimal ids are valid");
                        order = order
                            .with_item(item, one, price)
                            .expect("2 x price was checked not to overflow");
                    }
                    let id = OrderId::parse(&decimal_id(i)).expect("decimal ids are valid");
                    mset.arg(key(&id)).arg(encode(&order));
                }
                mset.ignore();
            })
            .await?;
        Ok(())
    }

    /// The order as the master has it now (a read: `GET /find`).
    pub async fn find(&self, id: &OrderId) -> Result<Order, ApiError> {
        self.get(id, false).await
    }

    /// As [`Orders::find`], for a checkout: a paid order (which it answers 200)
    /// is confirmed on a replica first, since the commit that paid it may be
    /// one whose own confirmation failed.
    pub async fn find_for_checkout(&self, id: &OrderId) -> Result<Order, ApiError> {
        self.get(id, true).await
    }

    async fn get(&self, id: &OrderId, confirm_paid: bool) -> Result<Order, ApiError> {
        let key = key(id);
        let paid = |raw: &Option<String>| {
            confirm_paid
                && raw
                    .as_deref()
                    .and_then(|r| serde_json::from_str::<Order>(r).ok())
                    .is_some_and(|o| o.paid)
        };
        let raw: Option<String> = self
            .store
            .query_confirmed(redis::cmd("GET").arg(&key), paid)
            .await?;
        let raw = raw.ok_or_else(|| ApiError::NotFound(format!("order {id} not found")))?;
        Ok(serde_json::from_str(&raw).map_err(|e| StoreError::corrupt(&key, e))?)
    }

    /// The one transaction every change of an order runs in. `change` sees
    /// the order and `saga`'s marks (`fence:<saga>`: fenced before it ever
    /// held the order; `paid:<saga>`: it committed), watched with the order.
    /// It returns the order to write (if any), the mark to leave, and the
    /// result. When the order is written, the event `announce` names (built
    /// from the order written) goes to the outbox in the same transaction; a
    /// change that writes no order (a repeat finding its decision made)
    /// announces nothing.
    async fn change<T: Send + 'static>(
        &self,
        id: &OrderId,
        saga: SagaId,
        announce: Option<EventType>,
        change: impl Fn(Option<Order>, Marks) -> (Option<Order>, Option<Leave>, T)
            + Send
            + Sync
            + 'static,
    ) -> Result<T, StoreError> {
        let key = key(id);
        let _guard = self.locks.lock([key.as_str()]).await;
        let (fence_mark, paid_mark) = (fence_key(saga), paid_key(saga));
        let mut reads = redis::pipe();
        reads.get(&key).exists(&fence_mark).exists(&paid_mark);
        let watch = vec![key.clone(), fence_mark.clone(), paid_mark.clone()];
        let id = id.clone();
        // A plan: concurrent checkouts' changes share their round trips and WAIT.
        let plan = Plan {
            watch,
            also_touches: Vec::new(),
            reads,
            decide: Box::new(move |replies| {
                let mut replies = replies.into_iter();
                let raw: Option<String> = next_reply(&mut replies, &key)?;
                let order = decode(&key, raw)?;
                let marks = Marks {
                    fenced: next_reply(&mut replies, &fence_mark)?,
                    paid: next_reply(&mut replies, &paid_mark)?,
                };
                let (new, leave, value) = change(order, marks);
                let mut writes = redis::pipe();
                if let Some(new) = &new {
                    writes.set(&key, encode(new)).ignore();
                    if let Some(event_type) = announce {
                        Event::new(event_type, &id, saga, &new.user_id, new.total_cost)
                            .append_to(&mut writes);
                    }
                }
                match leave {
                    Some(Leave::Fence) => writes.set_ex(&fence_mark, 1, FENCE_TTL_SECS).ignore(),
                    Some(Leave::Paid) => writes.set_ex(&paid_mark, 1, PAID_TTL_SECS).ignore(),
                    None => &mut writes,
                };
                Ok(if new.is_none() && leave.is_none() {
                    Tx::Abort(value)
                } else {
                    Tx::Commit(writes, value)
                })
            }),
        };
        self.planned.run(plan).await.inspect(|_| {
            if announce.is_some() {
                self.relay.event_added();
            }
        })
    }

    /// `addItem`: adds an item at `price` each, once per idempotency key;
    /// every answer is recorded and a repeat gets the first one. Refused
    /// while a checkout holds the order (409), unless that hold is `stale`
    /// (its saga has ended), which is then cleared; refused (400) when the
    /// order is paid or a sum overflows; `price` may carry the refusal of the
    /// price look-up (an unknown item).
    #[allow(clippy::too_many_arguments)]
    pub async fn add_item(
        &self,
        id: &OrderId,
        item: &ItemId,
        quantity: Amount,
        price: Result<Amount, ApiError>,
        stale: Option<SagaId>,
        idem: &IdemKey,
        render: impl Fn(&Order) -> Value,
    ) -> Result<Answer, ApiError> {
        let key = key(id);
        let _guard = self.locks.lock([key.as_str()]).await;
        let (key_ref, render, price) = (&key, &render, &price);
        idempotency::transact_once(&self.store, idem, std::slice::from_ref(&key), |mut conn| async move {
            let decided = async {
                let mut writes = redis::pipe();
                let refusal = |e: ApiError| Answer::refusal(&e);
                let answer = match read(&mut conn, key_ref).await? {
                    None => refusal(ApiError::NotFound(format!("order {id} not found"))),
                    Some(order) if order.paid => refusal(ApiError::BadRequest(format!(
                        "order {id} is already paid: no items can be added"
                    ))),
                    Some(order) if order.checkout.is_some() && order.checkout != stale => {
                        refusal(under_checkout(id))
                    }
                    Some(order) => match price {
                        Err(e) => Answer::refusal(e),
                        Ok(price) => {
                            let thawed = Order {
                                checkout: None,
                                ..order
                            };
                            match thawed.with_item(item.clone(), quantity, *price) {
                                Some(new) => {
                                    writes.set(key_ref, encode(&new)).ignore();
                                    Answer::ok(render(&new))
                                }
                                None => refusal(ApiError::BadRequest(format!(
                                    "adding {quantity} x {price} to order {id} would overflow its total"
                                ))),
                            }
                        }
                    },
                };
                Ok((writes, answer))
            }
            .await;
            (conn, decided)
        })
        .await
    }

    /// Freezes the order for `saga` as it is now, unless it is paid or held
    /// by another saga (a hold by `stale`, a saga that has ended, is taken
    /// over). The content it froze is returned: the saga charges and
    /// reserves exactly that, whatever `addItem`s landed since it looked.
    pub async fn freeze(
        &self,
        id: &OrderId,
        saga: SagaId,
        stale: Option<SagaId>,
    ) -> Result<Freeze, StoreError> {
        self.change(id, saga, None, move |order, marks| match order {
            None => (None, None, Freeze::NotFound),
            Some(order) if order.paid => (None, None, Freeze::Paid),
            // A retry after a lost EXEC reply (or an unconfirmed one) finds its own hold.
            Some(order) if order.checkout == Some(saga) => (None, None, Freeze::Frozen(order)),
            _ if marks.fenced => (None, None, Freeze::Fenced),
            Some(Order {
                checkout: Some(other),
                ..
            }) if Some(other) != stale => (None, None, Freeze::Held(other)),
            Some(order) => {
                let frozen = Order {
                    checkout: Some(saga),
                    ..order
                };
                (Some(frozen.clone()), None, Freeze::Frozen(frozen))
            }
        })
        .await
    }

    /// The commit point of a checkout: marks the order paid by `saga` if
    /// `saga` still holds it, and leaves `saga`'s paid mark. True when `saga`
    /// has committed (also on a repeat, even once `batch_init` overwrote the
    /// order). Announces `order.paid` with the change.
    pub async fn commit(&self, id: &OrderId, saga: SagaId) -> Result<bool, StoreError> {
        self.change(
            id,
            saga,
            Some(EventType::Paid),
            move |order, marks| match order {
                _ if marks.paid => (None, None, true),
                Some(o) if o.paid_by == Some(saga) => (None, None, true),
                Some(o) if o.checkout == Some(saga) => (
                    Some(Order {
                        paid: true,
                        paid_by: Some(saga),
                        checkout: None,
                        ..o
                    }),
                    Some(Leave::Paid),
                    true,
                ),
                _ => (None, None, false),
            },
        )
        .await
    }

    /// The abort point, for recovery and operators: takes `saga`'s hold off the
    /// order, so it can never commit; announces `order.checkout_failed` with the
    /// change. True if it had committed already (then nothing changes): its paid
    /// mark says so even once `batch_init` overwrote the order. Otherwise the saga
    /// gets a fence mark, which its freeze finds: fenced means fenced, whatever the
    /// order. A slow owner may still be about to freeze the order (before its
    /// freeze, or while a freeze whose EXEC reply was lost is retried): without the
    /// mark it would find the order free and freeze it again.
    pub async fn fence(&self, id: &OrderId, saga: SagaId) -> Result<bool, StoreError> {
        self.fence_marking(id, saga, true).await
    }

    /// [`Orders::fence`] by the saga's owner, whose freeze has returned: no freeze of
    /// this saga can come any more, so taking its hold off leaves no mark (a key per
    /// refused checkout otherwise). A saga that does not hold the order is still marked.
    pub async fn fence_own(&self, id: &OrderId, saga: SagaId) -> Result<bool, StoreError> {
        self.fence_marking(id, saga, false).await
    }

    async fn fence_marking(
        &self,
        id: &OrderId,
        saga: SagaId,
        mark_held: bool,
    ) -> Result<bool, StoreError> {
        let announce = Some(EventType::CheckoutFailed);
        self.change(id, saga, announce, move |order, marks| match order {
            _ if marks.paid => (None, None, true),
            Some(o) if o.paid_by == Some(saga) => (None, None, true),
            Some(o) if o.checkout == Some(saga) => (
                Some(Order {
                    checkout: None,
                    ..o
                }),
                mark_held.then_some(Leave::Fence),
                false,
            ),
            // Marked once; a repeat writes nothing.
            _ if marks.fenced => (None, None, false),
            _ => (None, Some(Leave::Fence), false),
        })
        .await
    }
}

/// The refusal of a change to an order a checkout holds.
pub fn under_checkout(id: &OrderId) -> ApiError {
    ApiError::Conflict(format!(
        "order {id} is being checked out; items can be added once the checkout has ended"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amount(n: i64) -> Amount {
        Amount::new(n).unwrap()
    }

    #[test]
    fn adding_the_same_item_twice_sums_one_line() {
        let item = ItemId::parse("7").unwrap();
        let order = Order::new(UserId::parse("1").unwrap())
            .with_item(item.clone(), amount(2), amount(5))
            .unwrap()
            .with_item(item.clone(), amount(1), amount(5))
            .unwrap();
        assert_eq!(order.items, vec![(item, amount(3))]);
        assert_eq!(order.total_cost, amount(15));
    }

    #[test]
    fn overflowing_totals_are_refused() {
        let order = Order::new(UserId::parse("1").unwrap());
        let item = ItemId::parse("7").unwrap();
        assert!(order
            .clone()
            .with_item(item.clone(), amount(2), amount(i64::MAX))
            .is_none());
        let big = order
            .with_item(item.clone(), amount(1), amount(i64::MAX))
            .unwrap();
        assert!(big.with_item(item, amount(1), amount(1)).is_none());
    }
}
