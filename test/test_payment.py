"""Payment service through the gateway: success paths, bodies, failures."""

from __future__ import annotations

import pytest

from gateway_client import (
    I64_MAX,
    assert_error,
    assert_is_int,
    assert_uuid,
    body_mentions,
    expect_ok,
    unknown_id,
    unknown_id_params,
)


def test_create_user_returns_uuid_and_zero_credit(api):
    body = expect_ok(api.post("/payment/create_user"))
    assert_uuid(body["user_id"], "user_id")
    user_id = body["user_id"]

    found = expect_ok(api.get(f"/payment/find_user/{user_id}"), 200)
    assert set(found) >= {"user_id", "credit"}
    assert isinstance(found["user_id"], str)
    assert_is_int(found["credit"], "credit")
    assert found["user_id"] == user_id
    assert found["credit"] == 0


def test_create_user_ids_are_distinct(api):
    ids = {api.create_user() for _ in range(5)}
    assert len(ids) == 5


def test_add_funds_returns_new_credit_and_persists(api, make_user):
    user_id = make_user(credit=0)
    body = expect_ok(api.add_funds(user_id, 50), 200)
    assert body_mentions(body, 50), f"add_funds answer should carry the new credit 50: {body!r}"
    body = expect_ok(api.add_funds(user_id, 25), 200)
    assert body_mentions(body, 75), body
    assert api.user(user_id) == {**api.user(user_id), "user_id": user_id, "credit": 75}


def test_pay_returns_new_credit_and_persists(api, make_user):
    user_id = make_user(credit=100)
    body = expect_ok(api.pay(user_id, 30), 200)
    assert body_mentions(body, 70), f"pay answer should carry the new credit 70: {body!r}"
    assert api.credit_of(user_id) == 70


def test_pay_down_to_exactly_zero(api, make_user):
    user_id = make_user(credit=12)
    body = expect_ok(api.pay(user_id, 12), 200)
    assert body_mentions(body, 0), body
    assert api.credit_of(user_id) == 0


def test_pay_below_zero_is_400_and_changes_nothing(api, make_user):
    user_id = make_user(credit=10)
    assert_error(api.pay(user_id, 11), 400)
    assert api.credit_of(user_id) == 10
    assert_error(api.pay(user_id, I64_MAX), 400)
    assert api.credit_of(user_id) == 10


def test_pay_with_no_credit_is_400(api, make_user):
    user_id = make_user(credit=0)
    assert_error(api.pay(user_id, 1), 400)
    assert api.credit_of(user_id) == 0


def test_add_funds_i64_max_to_empty_account_is_allowed(api, make_user):
    user_id = make_user(credit=0)
    expect_ok(api.add_funds(user_id, I64_MAX), 200)
    assert api.credit_of(user_id) == I64_MAX
    expect_ok(api.pay(user_id, I64_MAX), 200)
    assert api.credit_of(user_id) == 0


def test_add_funds_that_would_overflow_is_400_and_changes_nothing(api, make_user):
    user_id = make_user(credit=5)
    assert_error(api.add_funds(user_id, I64_MAX), 400)
    assert api.credit_of(user_id) == 5
    assert_error(api.add_funds(user_id, I64_MAX - 4), 400)
    assert api.credit_of(user_id) == 5
    expect_ok(api.add_funds(user_id, I64_MAX - 5), 200)
    assert api.credit_of(user_id) == I64_MAX


@pytest.mark.parametrize("op", ["add_funds", "pay"])
def test_zero_amount_is_400_and_changes_nothing(api, make_user, op):
    user_id = make_user(credit=5)
    assert_error(api.post(f"/payment/{op}/{user_id}/0"), 400)
    assert api.credit_of(user_id) == 5


@pytest.mark.parametrize("user_id", unknown_id_params("user"))
def test_unknown_user_is_404_everywhere(api, user_id):
    assert_error(api.get(f"/payment/find_user/{user_id}"), 404)
    assert_error(api.add_funds(user_id, 1), 404)
    assert_error(api.pay(user_id, 1), 404)
    assert_error(api.get(f"/payment/find_user/{user_id}"), 404)


def test_batch_init_creates_users_zero_to_n_minus_one(api):
    body = api.payment_batch_init(4, 100)
    assert isinstance(body, dict) and isinstance(body.get("msg"), str), body
    for i in range(4):
        user = api.user(str(i))
        assert user["user_id"] == str(i)
        assert_is_int(user["credit"], "credit")
        assert user["credit"] == 100


def test_batch_init_overwrites(api):
    api.payment_batch_init(3, 100)
    expect_ok(api.pay("0", 40), 200)
    expect_ok(api.add_funds("2", 5), 200)
    assert [api.credit_of(str(i)) for i in range(3)] == [60, 100, 105]

    api.payment_batch_init(3, 33)
    assert [api.credit_of(str(i)) for i in range(3)] == [33, 33, 33]


def test_batch_ids_work_with_add_funds_and_pay(api):
    api.payment_batch_init(2, 10)
    expect_ok(api.add_funds("0", 5), 200)
    expect_ok(api.pay("1", 10), 200)
    assert_error(api.pay("1", 1), 400)
    assert [api.credit_of("0"), api.credit_of("1")] == [15, 0]


def test_batch_init_of_zero_users_is_allowed(api):
    body = expect_ok(api.post("/payment/batch_init/0/10"))
    assert isinstance(body.get("msg"), str), body
