"""Order service through the gateway: create, find, addItem, batch_init."""

from __future__ import annotations

import random

import pytest

from gateway_client import (
    I64_MAX,
    assert_error,
    assert_is_int,
    assert_uuid,
    describe,
    expect_ok,
    summed_items,
    unknown_id,
    unknown_id_params,
)


def assert_order_shape(order: dict, order_id: str) -> None:
    assert set(order) >= {"order_id", "paid", "items", "user_id", "total_cost"}, order
    assert order["order_id"] == order_id
    assert isinstance(order["paid"], bool), f"paid must be a JSON bool: {order!r}"
    assert isinstance(order["user_id"], str), f"user_id must be a string: {order!r}"
    assert_is_int(order["total_cost"], "total_cost")
    assert isinstance(order["items"], list), f"items must be a list: {order!r}"
    for line in order["items"]:
        assert isinstance(line, list) and len(line) == 2, f"item line must be [item_id, quantity]: {line!r}"
        assert isinstance(line[0], str), f"item id must be a string: {line!r}"
        assert_is_int(line[1], "quantity")
        assert line[1] > 0, f"quantity must be positive: {line!r}"


# --- create / find ----------------------------------------------------------

def test_create_returns_uuid_and_empty_unpaid_order(api, make_user):
    user_id = make_user(credit=0)
    body = expect_ok(api.post(f"/orders/create/{user_id}"))
    assert_uuid(body["order_id"], "order_id")
    order_id = body["order_id"]

    order = expect_ok(api.get(f"/orders/find/{order_id}"), 200)
    assert_order_shape(order, order_id)
    assert order["paid"] is False
    assert order["items"] == []
    assert order["user_id"] == user_id
    assert order["total_cost"] == 0


def test_create_order_ids_are_distinct(api, make_user):
    user_id = make_user(credit=0)
    ids = {api.create_order(user_id) for _ in range(5)}
    assert len(ids) == 5


def test_create_for_batch_user(api):
    api.payment_batch_init(3, 10)
    order_id = api.create_order("2")
    order = api.order(order_id)
    assert order["user_id"] == "2"
    assert order["total_cost"] == 0 and order["paid"] is False


@pytest.mark.parametrize("user_id", unknown_id_params("user"))
def test_create_for_unknown_user_is_404(api, user_id):
    """API.md: an id that does not exist is a 404. The order service asks payment."""
    assert_error(api.post(f"/orders/create/{user_id}"), 404)


def test_create_for_unknown_user_is_recorded_under_its_key(api):
    """The 404 is the key's answer: a repeat after the user came to exist still gets it,
    and a request with a new key creates the order."""
    # A batch id no user has yet (batch rules only grow, so earlier runs may have made some).
    user = next(u for u in (str(random.randrange(1_000_000, 9_000_000)) for _ in range(100))
                if api.get(f"/payment/find_user/{u}").status_code == 404)
    path = f"/orders/create/{user}"
    headers = {"Idempotency-Key": f"create-unknown-{unknown_id()}"}
    assert_error(api.session.post(api.base + path, headers=headers), 404)
    api.payment_batch_init(int(user) + 1, 0)  # now it exists (a batch is one rule: cheap)
    assert_error(api.session.post(api.base + path, headers=headers), 404)
    assert api.order(api.create_order(user))["user_id"] == user


@pytest.mark.parametrize("order_id", unknown_id_params("order"))
def test_unknown_order_is_404(api, order_id, make_item):
    assert_error(api.get(f"/orders/find/{order_id}"), 404)
    item_id = make_item(stock=5)
    assert_error(api.add_item(order_id, item_id, 1), 404)
    assert_error(api.get(f"/orders/find/{order_id}"), 404)


# --- addItem ------------------------------------------------------------------

def test_add_item_adds_price_times_quantity(api, make_item, make_order):
    a = make_item(stock=10, price=7)
    b = make_item(stock=10, price=11)
    order_id = make_order()

    expect_ok(api.add_item(order_id, a, 3), 200)
    order = api.order(order_id)
    assert_order_shape(order, order_id)
    assert summed_items(order["items"]) == {a: 3}
    assert order["total_cost"] == 21

    expect_ok(api.add_item(order_id, b, 2), 200)
    order = api.order(order_id)
    assert_order_shape(order, order_id)
    assert summed_items(order["items"]) == {a: 3, b: 2}
    assert order["total_cost"] == 21 + 22
    assert order["paid"] is False
    # addItem reserves nothing: stock is only taken at checkout
    assert api.stock_of(a) == 10 and api.stock_of(b) == 10


def test_add_same_item_twice_sums(api, make_item, make_order):
    a = make_item(stock=10, price=4)
    order_id = make_order()
    expect_ok(api.add_item(order_id, a, 2), 200)
    expect_ok(api.add_item(order_id, a, 3), 200)
    order = api.order(order_id)
    assert_order_shape(order, order_id)
    # two lines [[a,2],[a,3]] or one summed line [[a,5]]: both are fine
    assert sorted(q for _, q in order["items"]) in ([2, 3], [5]), order["items"]
    assert summed_items(order["items"]) == {a: 5}
    assert order["total_cost"] == 20


def test_add_item_with_price_zero(api, make_item, make_order):
    free = make_item(stock=3, price=0)
    paid = make_item(stock=3, price=5)
    order_id = make_order([(paid, 1)])
    expect_ok(api.add_item(order_id, free, 2), 200)
    order = api.order(order_id)
    assert summed_items(order["items"]) == {paid: 1, free: 2}
    assert order["total_cost"] == 5


def test_add_item_uses_current_price(api, make_order):
    # batch_init is the only way to change a price: overwrite item "0".
    api.stock_batch_init(1, 10, 3)
    order_id = make_order()
    expect_ok(api.add_item(order_id, "0", 2), 200)
    assert api.order(order_id)["total_cost"] == 6
    api.stock_batch_init(1, 10, 5)
    expect_ok(api.add_item(order_id, "0", 1), 200)
    order = api.order(order_id)
    assert summed_items(order["items"]) == {"0": 3}
    assert order["total_cost"] == 6 + 5


def test_add_unknown_item_is_4xx_and_changes_nothing(api, make_item, make_order):
    a = make_item(stock=10, price=3)
    order_id = make_order([(a, 1)])
    before = api.order(order_id)
    for missing in (unknown_id(), "no-such-item"):
        r = api.add_item(order_id, missing, 1)
        assert_error(r, "4xx")
    assert api.order(order_id) == before


def test_add_zero_quantity_is_400_and_changes_nothing(api, make_item, make_order):
    a = make_item(stock=10, price=3)
    order_id = make_order([(a, 1)])
    before = api.order(order_id)
    assert_error(api.add_item(order_id, a, 0), 400)
    assert api.order(order_id) == before


def test_add_item_price_times_quantity_overflow_is_400(api, make_item, make_order):
    pricey = make_item(stock=10, price=2**62)
    order_id = make_order()
    assert_error(api.add_item(order_id, pricey, 2), 400)
    order = api.order(order_id)
    assert order["items"] == [] and order["total_cost"] == 0

    max_price = make_item(stock=10, price=I64_MAX)
    assert_error(api.add_item(order_id, max_price, 2), 400)
    order = api.order(order_id)
    assert order["items"] == [] and order["total_cost"] == 0
    # exactly i64::MAX fits
    expect_ok(api.add_item(order_id, max_price, 1), 200)
    assert api.order(order_id)["total_cost"] == I64_MAX


def test_add_item_total_overflow_is_400_and_changes_nothing(api, make_item, make_order):
    a = make_item(stock=10, price=2**62)
    b = make_item(stock=10, price=2**62)
    order_id = make_order([(a, 1)])
    before = api.order(order_id)
    assert before["total_cost"] == 2**62
    assert_error(api.add_item(order_id, b, 1), 400)  # 2^62 + 2^62 = 2^63 > i64::MAX
    assert api.order(order_id) == before
    assert_error(api.add_item(order_id, a, 1), 400)
    assert api.order(order_id) == before


def test_add_item_to_paid_order_is_4xx_and_changes_nothing(api, make_item, make_order):
    a = make_item(stock=10, price=2)
    b = make_item(stock=10, price=3)
    order_id = make_order([(a, 1)], credit=100)
    r = api.checkout(order_id)
    assert r.status_code == 200, f"checkout needed for this test failed: {describe(r)}"
    before = api.order(order_id)
    assert before["paid"] is True
    assert_error(api.add_item(order_id, b, 1), "4xx")
    assert_error(api.add_item(order_id, a, 1), "4xx")
    assert api.order(order_id) == before
    assert api.stock_of(a) == 9 and api.stock_of(b) == 10


def test_mixed_batch_and_uuid_ids(api, make_order):
    api.stock_batch_init(3, 50, 4)
    api.payment_batch_init(3, 100)
    api.orders_batch_init(3, 3, 3, 4)

    # uuid order, batch item
    order_id = make_order()
    expect_ok(api.add_item(order_id, "1", 2), 200)
    order = api.order(order_id)
    assert summed_items(order["items"]) == {"1": 2} and order["total_cost"] == 8

    # batch order, uuid item
    uuid_item = api.create_item(price=10, stock=5)
    before = api.order("0")
    expect_ok(api.add_item("0", uuid_item, 1), 200)
    after = api.order("0")
    assert after["total_cost"] == before["total_cost"] + 10
    expected = summed_items(before["items"])
    expected[uuid_item] = 1
    assert summed_items(after["items"]) == expected


# --- batch_init -----------------------------------------------------------------

def check_batch_orders(api, n: int, n_items: int, n_users: int, price: int) -> None:
    valid_items = {str(i) for i in range(n_items)}
    valid_users = {str(i) for i in range(n_users)}
    for i in range(n):
        order = api.order(str(i))
        assert_order_shape(order, str(i))
        assert order["paid"] is False, order
        assert order["user_id"] in valid_users, order
        summed = summed_items(order["items"])
        assert sum(summed.values()) == 2, f"two items of quantity 1 expected: {order!r}"
        # two lines of quantity 1, or one line of quantity 2 when both picks are the same item
        assert sorted(q for _, q in order["items"]) in ([1, 1], [2]), order
        assert set(summed) <= valid_items, order
        assert order["total_cost"] == 2 * price, order


def test_batch_init_creates_orders(api):
    body = api.orders_batch_init(20, 5, 7, 3)
    assert isinstance(body, dict) and isinstance(body.get("msg"), str), body
    check_batch_orders(api, 20, 5, 7, 3)


def test_batch_init_overwrites(api, make_item):
    api.orders_batch_init(5, 4, 4, 3)
    extra = make_item(stock=5, price=100)
    expect_ok(api.add_item("0", extra, 1), 200)
    assert api.order("0")["total_cost"] == 106

    api.orders_batch_init(5, 2, 3, 8)
    check_batch_orders(api, 5, 2, 3, 8)
    assert extra not in summed_items(api.order("0")["items"])


def test_batch_init_orders_with_one_item_and_one_user(api):
    # every pick is item "0" and user "0": two lines of "0" or one line of 2
    api.orders_batch_init(3, 1, 1, 5)
    for i in range(3):
        order = api.order(str(i))
        assert order["user_id"] == "0"
        assert summed_items(order["items"]) == {"0": 2}
        assert order["total_cost"] == 10


def test_batch_init_of_zero_orders_is_allowed(api):
    body = expect_ok(api.post("/orders/batch_init/0/10/10/1"))
    assert isinstance(body.get("msg"), str), body


def test_batch_init_with_price_zero_is_allowed(api):
    api.orders_batch_init(2, 3, 3, 0)
    assert api.order("1")["total_cost"] == 0
