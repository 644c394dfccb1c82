"""Checkout through the gateway: all or nothing across stock, payment and order."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import requests

from gateway_client import GATEWAY_URL, HTTP_TIMEOUT, assert_error, describe, expect_ok, unknown_id


def snapshot(api, items, users, orders=()):
    return (
        {i: api.item(i) for i in items},
        {u: api.credit_of(u) for u in users},
        {o: api.order(o) for o in orders},
    )


def test_checkout_success_takes_exact_amounts(api, make_item, make_user):
    a = make_item(stock=10, price=3)
    b = make_item(stock=5, price=7)
    user = make_user(credit=100)
    order_id = api.create_order(user, [(a, 2), (b, 1)])
    assert api.order(order_id)["total_cost"] == 13

    r = api.checkout(order_id)
    expect_ok(r, 200)

    assert api.stock_of(a) == 8
    assert api.stock_of(b) == 4
    assert api.credit_of(user) == 87
    order = api.order(order_id)
    assert order["paid"] is True
    assert order["total_cost"] == 13
    # prices are untouched
    assert api.item(a)["price"] == 3 and api.item(b)["price"] == 7


def test_checkout_takes_everything_down_to_zero(api, make_item, make_user):
    a = make_item(stock=3, price=4)
    user = make_user(credit=12)
    order_id = api.create_order(user, [(a, 3)])
    expect_ok(api.checkout(order_id), 200)
    assert api.stock_of(a) == 0
    assert api.credit_of(user) == 0
    assert api.order(order_id)["paid"] is True


def test_checkout_same_item_on_two_lines_takes_the_sum(api, make_item, make_user):
    a = make_item(stock=10, price=2)
    user = make_user(credit=50)
    order_id = api.create_order(user, [(a, 3), (a, 4)])
    expect_ok(api.checkout(order_id), 200)
    assert api.stock_of(a) == 3
    assert api.credit_of(user) == 36


def test_checkout_same_item_summed_beyond_stock_is_refused(api, make_item, make_user):
    # 3 + 3 = 6 > 5 although each line alone would fit
    a = make_item(stock=5, price=1)
    user = make_user(credit=50)
    order_id = api.create_order(user, [(a, 3), (a, 3)])
    assert_error(api.checkout(order_id), 400)
    assert api.stock_of(a) == 5
    assert api.credit_of(user) == 50
    assert api.order(order_id)["paid"] is False


def test_not_enough_stock_is_400_and_nothing_taken(api, make_item, make_user):
    plenty = make_item(stock=10, price=3)
    scarce = make_item(stock=1, price=7)
    user = make_user(credit=100)
    order_id = api.create_order(user, [(plenty, 2), (scarce, 2)])
    before = snapshot(api, [plenty, scarce], [user], [order_id])

    assert_error(api.checkout(order_id), 400)

    assert snapshot(api, [plenty, scarce], [user], [order_id]) == before
    assert api.order(order_id)["paid"] is False


def test_not_enough_credit_is_400_and_nothing_taken(api, make_item, make_user):
    a = make_item(stock=10, price=3)
    b = make_item(stock=5, price=7)
    user = make_user(credit=12)  # total is 13
    order_id = api.create_order(user, [(a, 2), (b, 1)])
    before = snapshot(api, [a, b], [user], [order_id])

    assert_error(api.checkout(order_id), 400)

    assert snapshot(api, [a, b], [user], [order_id]) == before
    assert api.order(order_id)["paid"] is False


def test_refused_checkout_can_succeed_later(api, make_item, make_user):
    a = make_item(stock=5, price=10)
    user = make_user(credit=5)
    order_id = api.create_order(user, [(a, 1)])
    assert_error(api.checkout(order_id), 400)
    assert api.stock_of(a) == 5 and api.credit_of(user) == 5

    expect_ok(api.add_funds(user, 5), 200)
    expect_ok(api.checkout(order_id), 200)
    assert api.stock_of(a) == 4
    assert api.credit_of(user) == 0
    assert api.order(order_id)["paid"] is True


def test_refused_for_stock_then_restocked_succeeds(api, make_item, make_user):
    a = make_item(stock=1, price=2)
    user = make_user(credit=20)
    order_id = api.create_order(user, [(a, 3)])
    assert_error(api.checkout(order_id), 400)
    assert api.stock_of(a) == 1 and api.credit_of(user) == 20

    expect_ok(api.add_stock(a, 2), 200)
    expect_ok(api.checkout(order_id), 200)
    assert api.stock_of(a) == 0
    assert api.credit_of(user) == 14


def test_checkout_of_paid_order_is_200_and_charges_nothing(api, make_item, make_user):
    a = make_item(stock=10, price=5)
    user = make_user(credit=100)
    order_id = api.create_order(user, [(a, 2)])
    expect_ok(api.checkout(order_id), 200)
    assert api.stock_of(a) == 8 and api.credit_of(user) == 90

    for _ in range(3):
        expect_ok(api.checkout(order_id), 200)
    assert api.stock_of(a) == 8
    assert api.credit_of(user) == 90
    assert api.order(order_id)["paid"] is True


def test_checkout_of_unknown_order_is_404(api):
    for order_id in (unknown_id(), "no-such-order", "999999999999"):
        assert_error(api.checkout(order_id), 404)


def test_checkout_of_empty_order_is_200_and_takes_nothing(api, make_user):
    user = make_user(credit=10)
    order_id = api.create_order(user)
    expect_ok(api.checkout(order_id), 200)
    assert api.credit_of(user) == 10
    order = api.order(order_id)
    assert order["paid"] is True
    assert order["total_cost"] == 0


def test_checkout_of_free_items_takes_stock_but_no_credit(api, make_item, make_user):
    free = make_item(stock=4, price=0)
    user = make_user(credit=0)
    order_id = api.create_order(user, [(free, 3)])
    expect_ok(api.checkout(order_id), 200)
    assert api.stock_of(free) == 1
    assert api.credit_of(user) == 0
    assert api.order(order_id)["paid"] is True


def _concurrent_checkouts(order_id: str, n: int) -> list[requests.Response]:
    def one(_):
        # one session per request: requests.Session is not thread-safe
        with requests.Session() as s:
            return s.post(f"{GATEWAY_URL}/orders/checkout/{order_id}", timeout=HTTP_TIMEOUT * 2)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, range(n)))


def test_concurrent_checkouts_of_same_order_charge_once(api, make_item, make_user):
    a = make_item(stock=50, price=3)
    b = make_item(stock=50, price=5)
    user = make_user(credit=1000)  # enough for many charges: a double charge would show
    order_id = api.create_order(user, [(a, 2), (b, 1)])  # total 11

    answers = _concurrent_checkouts(order_id, 2)
    statuses = [r.status_code for r in answers]
    assert all(s < 500 for s in statuses), [describe(r) for r in answers]
    assert 200 in statuses, [describe(r) for r in answers]
    for r in answers:
        if r.status_code != 200:
            assert_error(r, "4xx")

    assert api.credit_of(user) == 1000 - 11
    assert api.stock_of(a) == 48
    assert api.stock_of(b) == 49
    assert api.order(order_id)["paid"] is True


def test_many_concurrent_checkouts_of_same_order_charge_once(api, make_item, make_user):
    a = make_item(stock=100, price=7)
    user = make_user(credit=1000)
    order_id = api.create_order(user, [(a, 3)])  # total 21

    answers = _concurrent_checkouts(order_id, 16)
    statuses = [r.status_code for r in answers]
    assert all(s < 500 for s in statuses), [describe(r) for r in answers]
    assert 200 in statuses, statuses

    assert api.credit_of(user) == 1000 - 21
    assert api.stock_of(a) == 97
    assert api.order(order_id)["paid"] is True
    # and afterwards it stays charged once
    expect_ok(api.checkout(order_id), 200)
    assert api.credit_of(user) == 1000 - 21 and api.stock_of(a) == 97


def test_concurrent_checkouts_of_refused_order_take_nothing(api, make_item, make_user):
    a = make_item(stock=10, price=3)
    user = make_user(credit=5)  # total 6: refused
    order_id = api.create_order(user, [(a, 2)])

    answers = _concurrent_checkouts(order_id, 8)
    for r in answers:
        assert_error(r, 400)
    assert api.stock_of(a) == 10
    assert api.credit_of(user) == 5
    assert api.order(order_id)["paid"] is False


def test_checkout_with_batch_ids(api):
    api.stock_batch_init(4, 10, 3)
    api.payment_batch_init(4, 100)
    api.orders_batch_init(4, 4, 4, 3)

    order = api.order("0")
    qty = {}
    for item_id, q in order["items"]:
        qty[item_id] = qty.get(item_id, 0) + q
    user = order["user_id"]
    credit_before = api.credit_of(user)
    stock_before = {i: api.stock_of(i) for i in qty}

    expect_ok(api.checkout("0"), 200)

    assert api.order("0")["paid"] is True
    assert api.credit_of(user) == credit_before - 6
    for item_id, q in qty.items():
        assert api.stock_of(item_id) == stock_before[item_id] - q


def test_batch_init_again_resets_a_paid_order(api):
    """The benchmark re-runs batch_init between runs: a re-initialised order "0"
    is a new unpaid order and its checkout charges again (no stale idempotency)."""
    api.stock_batch_init(2, 10, 1)
    api.payment_batch_init(2, 100)
    api.orders_batch_init(1, 2, 2, 1)
    expect_ok(api.checkout("0"), 200)
    assert api.order("0")["paid"] is True

    api.stock_batch_init(2, 10, 1)
    api.payment_batch_init(2, 100)
    api.orders_batch_init(1, 2, 2, 1)
    order = api.order("0")
    assert order["paid"] is False
    user = order["user_id"]
    assert api.credit_of(user) == 100

    expect_ok(api.checkout("0"), 200)
    assert api.order("0")["paid"] is True
    assert api.credit_of(user) == 98
    assert api.stock_of("0") + api.stock_of("1") == 18
