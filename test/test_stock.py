"""Stock service through the gateway: success paths, bodies, failures."""

from __future__ import annotations

import pytest

from gateway_client import (
    I64_MAX,
    assert_error,
    assert_is_int,
    assert_uuid,
    body_mentions,
    expect_ok,
    json_body,
    unknown_id,
    unknown_id_params,
)


def test_create_item_returns_uuid_and_starts_with_zero_stock(api):
    body = expect_ok(api.post("/stock/item/create/17"))
    assert set(body) >= {"item_id"}
    assert_uuid(body["item_id"], "item_id")

    found = expect_ok(api.get(f"/stock/find/{body['item_id']}"), 200)
    assert set(found) >= {"stock", "price"}
    assert_is_int(found["stock"], "stock")
    assert_is_int(found["price"], "price")
    assert found == {**found, "stock": 0, "price": 17}


def test_create_item_ids_are_distinct(api):
    ids = {api.create_item(price=1) for _ in range(5)}
    assert len(ids) == 5


def test_price_zero_is_allowed(api):
    item_id = api.create_item(price=0)
    assert api.item(item_id)["price"] == 0
    assert api.item(item_id)["stock"] == 0


def test_price_i64_max_is_allowed(api):
    item_id = api.create_item(price=I64_MAX)
    assert api.item(item_id)["price"] == I64_MAX


def test_add_returns_new_stock_and_persists(api, make_item):
    item_id = make_item(stock=0, price=3)
    r = api.add_stock(item_id, 5)
    body = expect_ok(r, 200)
    assert body_mentions(body, 5), f"add answer should carry the new stock 5: {body!r}"
    assert api.item(item_id) == {**api.item(item_id), "stock": 5, "price": 3}

    body = expect_ok(api.add_stock(item_id, 7), 200)
    assert body_mentions(body, 12), body
    assert api.stock_of(item_id) == 12


def test_subtract_returns_new_stock_and_persists(api, make_item):
    item_id = make_item(stock=10, price=3)
    body = expect_ok(api.subtract_stock(item_id, 4), 200)
    assert body_mentions(body, 6), f"subtract answer should carry the new stock 6: {body!r}"
    assert api.stock_of(item_id) == 6
    # price is untouched by stock changes
    assert api.item(item_id)["price"] == 3


def test_subtract_down_to_exactly_zero(api, make_item):
    item_id = make_item(stock=4)
    body = expect_ok(api.subtract_stock(item_id, 4), 200)
    assert body_mentions(body, 0), body
    assert api.stock_of(item_id) == 0


def test_subtract_below_zero_is_400_and_changes_nothing(api, make_item):
    item_id = make_item(stock=5, price=2)
    assert_error(api.subtract_stock(item_id, 6), 400)
    assert api.item(item_id) == {**api.item(item_id), "stock": 5, "price": 2}
    # and a huge (but valid i64) amount too
    assert_error(api.subtract_stock(item_id, I64_MAX), 400)
    assert api.stock_of(item_id) == 5


def test_subtract_from_zero_stock_is_400(api, make_item):
    item_id = make_item(stock=0)
    assert_error(api.subtract_stock(item_id, 1), 400)
    assert api.stock_of(item_id) == 0


def test_add_i64_max_to_empty_stock_is_allowed(api, make_item):
    item_id = make_item(stock=0)
    expect_ok(api.add_stock(item_id, I64_MAX), 200)
    assert api.stock_of(item_id) == I64_MAX
    expect_ok(api.subtract_stock(item_id, I64_MAX), 200)
    assert api.stock_of(item_id) == 0


def test_add_that_would_overflow_is_400_and_changes_nothing(api, make_item):
    item_id = make_item(stock=5)
    assert_error(api.add_stock(item_id, I64_MAX), 400)
    assert api.stock_of(item_id) == 5
    assert_error(api.add_stock(item_id, I64_MAX - 4), 400)
    assert api.stock_of(item_id) == 5
    # the largest amount that still fits is fine
    expect_ok(api.add_stock(item_id, I64_MAX - 5), 200)
    assert api.stock_of(item_id) == I64_MAX


@pytest.mark.parametrize("op", ["add", "subtract"])
def test_zero_amount_is_400_and_changes_nothing(api, make_item, op):
    item_id = make_item(stock=5)
    assert_error(api.post(f"/stock/{op}/{item_id}/0"), 400)
    assert api.stock_of(item_id) == 5


@pytest.mark.parametrize("item_id", unknown_id_params("item"))
def test_unknown_item_is_404_everywhere(api, item_id):
    assert_error(api.get(f"/stock/find/{item_id}"), 404)
    assert_error(api.add_stock(item_id, 1), 404)
    assert_error(api.subtract_stock(item_id, 1), 404)
    # a 404 must not create the item as a side effect
    assert_error(api.get(f"/stock/find/{item_id}"), 404)


def test_batch_init_creates_items_zero_to_n_minus_one(api):
    body = api.stock_batch_init(4, 10, 5)
    assert isinstance(body, dict) and isinstance(body.get("msg"), str), body
    for i in range(4):
        item = api.item(str(i))
        assert_is_int(item["stock"], "stock")
        assert_is_int(item["price"], "price")
        assert (item["stock"], item["price"]) == (10, 5), (i, item)


def test_batch_init_overwrites(api):
    api.stock_batch_init(4, 10, 5)
    expect_ok(api.subtract_stock("0", 3), 200)
    expect_ok(api.add_stock("3", 9), 200)
    assert api.stock_of("0") == 7 and api.stock_of("3") == 19

    api.stock_batch_init(4, 20, 7)
    for i in range(4):
        item = api.item(str(i))
        assert (item["stock"], item["price"]) == (20, 7), (i, item)


def test_batch_ids_work_with_add_and_subtract(api):
    api.stock_batch_init(3, 10, 2)
    body = expect_ok(api.add_stock("1", 5), 200)
    assert body_mentions(body, 15), body
    body = expect_ok(api.subtract_stock("2", 10), 200)
    assert body_mentions(body, 0), body
    assert_error(api.subtract_stock("2", 1), 400)
    assert [api.stock_of(str(i)) for i in range(3)] == [10, 15, 0]


def test_batch_init_of_zero_items_is_allowed(api):
    r = api.post("/stock/batch_init/0/10/1")
    body = expect_ok(r)
    assert isinstance(body.get("msg"), str), body


def test_batch_init_with_price_zero_is_allowed(api):
    api.stock_batch_init(2, 5, 0)
    assert api.item("1") == {**api.item("1"), "stock": 5, "price": 0}


def test_error_body_is_json_object(api):
    r = api.get(f"/stock/find/{unknown_id()}")
    assert r.status_code == 404
    assert "json" in r.headers.get("content-type", ""), r.headers
    body = json_body(r)
    assert isinstance(body, dict) and isinstance(body["error"], str)
