//! Orders in the order store: `order:<id>` holds the order as JSON. Every
//! change is a WATCH/MULTI/EXEC transaction on that one key, serialised per
//! order inside the process.

use std::sync::Arc;

use common::error::ApiError;
use common::keylock::KeyLocks;
use common::messages::Line;
use common::redis_store::{Conn, Store, StoreError, Tx};
use common::types::{Amount, ItemId, OrderId, UserId};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub user_id: UserId,
    pub paid: bool,
    /// One line per item: adding an item that is already there sums the quantities.
    pub items: Vec<(ItemId, Amount)>,
    pub total_cost: Amount,
    /// New each time the order is (re)created: `batch_init` may overwrite a
    /// paid order with an unpaid one, and its checkout must then be a new
    /// checkout, not a replay of the old one (see `saga_store`).
    pub incarnation: String,
}

impl Order {
    fn new(user_id: UserId) -> Self {
        Order {
            user_id,
            paid: false,
            items: Vec::new(),
            total_cost: Amount::ZERO,
            incarnation: uuid::Uuid::new_v4().simple().to_string(),
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
    locks: KeyLocks,
}

fn key(id: &OrderId) -> String {
    format!("order:{id}")
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
    raw.map(|r| serde_json::from_str(&r).map_err(|e| StoreError::corrupt(key, e)))
        .transpose()
}

impl Orders {
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            store,
            locks: KeyLocks::default(),
        }
    }

    pub async fn create(&self, user_id: UserId) -> Result<OrderId, ApiError> {
        let id = OrderId::new_random();
        let mut writes = redis::pipe();
        writes.set(key(&id), encode(&Order::new(user_id))).ignore();
        self.store.write(&writes).await?;
        Ok(id)
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
        self.store
            .write_batch(n, |writes, i| {
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
                writes.set(key(&id), encode(&order)).ignore();
            })
            .await?;
        Ok(())
    }

    pub async fn find(&self, id: &OrderId) -> Result<Order, ApiError> {
        let key = key(id);
        let raw: Option<String> = self.store.query(redis::cmd("GET").arg(&key)).await?;
        let raw = raw.ok_or_else(|| ApiError::NotFound(format!("order {id} not found")))?;
        Ok(serde_json::from_str(&raw).map_err(|e| StoreError::corrupt(&key, e))?)
    }

    /// Changes an order in one transaction; `change` may refuse with an error.
    async fn update(
        &self,
        id: &OrderId,
        change: impl Fn(Order) -> Result<Option<Order>, ApiError>,
    ) -> Result<Order, ApiError> {
        let key = key(id);
        let _guard = self.locks.lock([key.as_str()]).await;
        let (key, change) = (&key, &change);
        self.store
            .transact(std::slice::from_ref(key), |mut conn| async move {
                let decision = async {
                    let Some(order) = read(&mut conn, key).await? else {
                        return Ok(Tx::Abort(Err(ApiError::NotFound(format!(
                            "order {id} not found"
                        )))));
                    };
                    Ok(match change(order.clone()) {
                        Err(refusal) => Tx::Abort(Err(refusal)),
                        Ok(None) => Tx::Abort(Ok(order)),
                        Ok(Some(new)) => {
                            let mut writes = redis::pipe();
                            writes.set(key, encode(&new)).ignore();
                            Tx::Commit(writes, Ok(new))
                        }
                    })
                }
                .await;
                (conn, decision)
            })
            .await?
    }

    /// Adds an item at `price` each; refused when the order is paid or a sum overflows.
    pub async fn add_item(
        &self,
        id: &OrderId,
        item: &ItemId,
        quantity: Amount,
        price: Amount,
    ) -> Result<Order, ApiError> {
        self.update(id, |order| {
            if order.paid {
                return Err(ApiError::BadRequest(format!(
                    "order {id} is already paid: no items can be added"
                )));
            }
            order
                .with_item(item.clone(), quantity, price)
                .map(Some)
                .ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "adding {quantity} x {price} to order {id} would overflow its total"
                    ))
                })
        })
        .await
    }

    /// Marks the order paid (idempotent), unless it was re-created since
    /// `incarnation` (then the saga paid for an order that no longer exists).
    pub async fn mark_paid(&self, id: &OrderId, incarnation: &str) -> Result<(), ApiError> {
        self.update(id, |order| {
            let current = order.incarnation == incarnation;
            Ok((current && !order.paid).then_some(Order {
                paid: true,
                ..order
            }))
        })
        .await
        .map(|_| ())
    }
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
