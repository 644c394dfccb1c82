"""Concurrent checkouts through the gateway (aiohttp): the course benchmark's
consistency scenario and a larger random race. Every entity is made with the
create endpoints, so the ids are fresh UUIDs and nothing collides with other
tests or with batch-initialised data.

Set CONSISTENCY_SEED to replay a random race.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter

import aiohttp
import pytest

from gateway_client import AsyncApi, gather_limited

pytestmark = pytest.mark.consistency

SETUP_CONCURRENCY = int(os.environ.get("SETUP_CONCURRENCY", "64"))
CONNECTOR_LIMIT = 1000
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=300, connect=60, sock_read=240)


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=CONNECTOR_LIMIT, limit_per_host=0),
        timeout=CLIENT_TIMEOUT,
    )


def _kinds(outcomes) -> Counter:
    return Counter(o.kind for o in outcomes)


def _samples(outcomes, kinds=("5xx", "error"), n=5) -> list[str]:
    bad = [o for o in outcomes if o.kind in kinds]
    return [f"status={o.status} body={o.body!r} error={o.error}" for o in bad[:n]]


def _check_refusal_bodies(outcomes) -> None:
    for o in outcomes:
        if o.kind == "4xx":
            assert isinstance(o.body, dict) and isinstance(o.body.get("error"), str), (
                f"a 4xx must carry a JSON error body: {o}"
            )


# ---------------------------------------------------------------------------
# The course benchmark: 1 item with 100 stock, 1000 users with 1 credit,
# 1000 single-unit orders checked out at once.
# ---------------------------------------------------------------------------

N_USERS = 1000
STOCK = 100


async def _benchmark_scenario(gateway: str):
    async with _session() as session:
        api = AsyncApi(session, gateway)
        t_setup = time.perf_counter()
        item_id = await api.create_item(price=1, stock=STOCK)
        users = await gather_limited((api.create_user(1) for _ in range(N_USERS)), SETUP_CONCURRENCY)
        orders = await gather_limited(
            (api.create_order(u, [(item_id, 1)]) for u in users), SETUP_CONCURRENCY
        )
        setup_s = time.perf_counter() - t_setup

        before_item = await api.item(item_id)
        assert before_item["stock"] == STOCK and before_item["price"] == 1, before_item

        t0 = time.perf_counter()
        outcomes = await asyncio.gather(*(api.checkout(o) for o in orders))
        checkout_s = time.perf_counter() - t0

        item_after = await api.item(item_id)
        users_after = await gather_limited((api.user(u) for u in users), SETUP_CONCURRENCY)
        orders_after = await gather_limited((api.order(o) for o in orders), SETUP_CONCURRENCY)
    return setup_s, checkout_s, outcomes, item_after, users_after, orders_after


def test_benchmark_consistency_scenario(gateway, report):
    setup_s, checkout_s, outcomes, item_after, users_after, orders_after = asyncio.run(
        _benchmark_scenario(gateway)
    )
    kinds = _kinds(outcomes)
    report(
        f"benchmark scenario: set-up {setup_s:.2f}s, {N_USERS} concurrent checkouts in "
        f"{checkout_s:.2f}s ({N_USERS / checkout_s:.0f}/s): {dict(kinds)}; "
        f"stock left {item_after['stock']}, credit left {sum(u['credit'] for u in users_after)}"
    )

    assert kinds["error"] == 0, f"transport errors/timeouts: {_samples(outcomes)}"
    assert kinds["5xx"] == 0, f"5xx answers: {_samples(outcomes)}"
    assert kinds["2xx"] == STOCK, dict(kinds)
    assert kinds["4xx"] == N_USERS - STOCK, dict(kinds)
    _check_refusal_bodies(outcomes)

    assert item_after["stock"] == 0
    assert sum(u["credit"] for u in users_after) == N_USERS - STOCK

    mismatches = []
    for outcome, user, order in zip(outcomes, users_after, orders_after):
        if outcome.ok:
            if not (order["paid"] is True and user["credit"] == 0):
                mismatches.append(("2xx", order, user))
        else:
            if not (order["paid"] is False and user["credit"] == 1):
                mismatches.append(("4xx", order, user))
    assert not mismatches, f"{len(mismatches)} answers disagree with the stores, e.g. {mismatches[:3]}"


# ---------------------------------------------------------------------------
# A larger race: several items, random stocks, prices, credits and baskets.
# ---------------------------------------------------------------------------

N_ITEMS = 10
N_RACE_USERS = 300
N_RACE_ORDERS = 600


async def _random_race(gateway: str, rng: random.Random):
    item_specs = [(rng.randint(20, 60), rng.randint(1, 10)) for _ in range(N_ITEMS)]  # (stock, price)
    credits = [rng.randint(0, 60) for _ in range(N_RACE_USERS)]

    async with _session() as session:
        api = AsyncApi(session, gateway)
        t_setup = time.perf_counter()
        items = await gather_limited(
            (api.create_item(price=p, stock=s) for s, p in item_specs), SETUP_CONCURRENCY
        )
        price = {i: p for i, (_, p) in zip(items, item_specs)}
        users = await gather_limited((api.create_user(c) for c in credits), SETUP_CONCURRENCY)

        baskets = []  # (user_id, [(item_id, qty)], total)
        for _ in range(N_RACE_ORDERS):
            user = rng.choice(users)
            chosen = rng.sample(items, rng.randint(1, 3))
            lines = [(i, rng.randint(1, 3)) for i in chosen]
            baskets.append((user, lines, sum(price[i] * q for i, q in lines)))
        orders = await gather_limited(
            (api.create_order(u, lines) for u, lines, _ in baskets), SETUP_CONCURRENCY
        )
        setup_s = time.perf_counter() - t_setup

        # addItem under concurrency priced every order right
        created = await gather_limited((api.order(o) for o in orders), SETUP_CONCURRENCY)
        wrong = [(c, b) for c, b in zip(created, baskets) if c["total_cost"] != b[2] or c["paid"]]
        assert not wrong, f"{len(wrong)} orders set up wrong, e.g. {wrong[:2]}"
        stock_before = {i: (await api.item(i))["stock"] for i in items}
        credit_before = {u: c for u, c in zip(users, credits)}

        t0 = time.perf_counter()
        outcomes = await asyncio.gather(*(api.checkout(o) for o in orders))
        checkout_s = time.perf_counter() - t0

        stock_after = {i: (await api.item(i))["stock"] for i in items}
        users_after = await gather_limited((api.user(u) for u in users), SETUP_CONCURRENCY)
        credit_after = {u["user_id"]: u["credit"] for u in users_after}
        orders_after = await gather_limited((api.order(o) for o in orders), SETUP_CONCURRENCY)

        # checking out the paid orders again changes nothing
        paid_orders = [o for o, out in zip(orders, outcomes) if out.ok]
        again = await asyncio.gather(*(api.checkout(o) for o in paid_orders))
        stock_again = {i: (await api.item(i))["stock"] for i in items}
        credit_again = {u["user_id"]: u["credit"] for u in
                        await gather_limited((api.user(u) for u in users), SETUP_CONCURRENCY)}

    return dict(
        setup_s=setup_s, checkout_s=checkout_s, outcomes=outcomes, baskets=baskets,
        stock_before=stock_before, stock_after=stock_after,
        credit_before=credit_before, credit_after=credit_after,
        orders_after=orders_after, again=again, stock_again=stock_again, credit_again=credit_again,
    )


def test_random_race_conserves_stock_and_credit(gateway, report):
    seed = int(os.environ.get("CONSISTENCY_SEED", random.randrange(1 << 32)))
    r = asyncio.run(_random_race(gateway, random.Random(seed)))
    outcomes, baskets = r["outcomes"], r["baskets"]
    kinds = _kinds(outcomes)
    taken_stock = sum(r["stock_before"].values()) - sum(r["stock_after"].values())
    taken_credit = sum(r["credit_before"].values()) - sum(r["credit_after"].values())
    report(
        f"random race (seed {seed}): {N_ITEMS} items, {N_RACE_USERS} users, set-up {r['setup_s']:.2f}s, "
        f"{len(outcomes)} concurrent checkouts in {r['checkout_s']:.2f}s "
        f"({len(outcomes) / r['checkout_s']:.0f}/s): {dict(kinds)}; "
        f"stock taken {taken_stock} of {sum(r['stock_before'].values())}, credit taken {taken_credit}"
    )

    assert kinds["error"] == 0, f"transport errors/timeouts (seed {seed}): {_samples(outcomes)}"
    assert kinds["5xx"] == 0, f"5xx answers (seed {seed}): {_samples(outcomes)}"
    assert kinds["2xx"] + kinds["4xx"] == len(outcomes), dict(kinds)
    _check_refusal_bodies(outcomes)

    expected_stock_taken = Counter()
    expected_charge = Counter()
    wrong_paid = []
    for outcome, (user, lines, total), order in zip(outcomes, baskets, r["orders_after"]):
        if outcome.ok:
            for item_id, qty in lines:
                expected_stock_taken[item_id] += qty
            expected_charge[user] += total
        if order["paid"] is not outcome.ok:
            wrong_paid.append((outcome.status, order))
    assert not wrong_paid, f"seed {seed}: {len(wrong_paid)} orders' paid flag disagrees with the answer: {wrong_paid[:3]}"

    for item_id, before in r["stock_before"].items():
        after = r["stock_after"][item_id]
        assert after >= 0, (seed, item_id, after)
        assert before - after == expected_stock_taken[item_id], (
            f"seed {seed}: item {item_id} lost {before - after} but 2xx orders hold {expected_stock_taken[item_id]}"
        )
    for user_id, before in r["credit_before"].items():
        after = r["credit_after"][user_id]
        assert after >= 0, (seed, user_id, after)
        assert before - after == expected_charge[user_id], (
            f"seed {seed}: user {user_id} paid {before - after} but 2xx orders cost {expected_charge[user_id]}"
        )

    again_kinds = _kinds(r["again"])
    assert again_kinds["2xx"] == len(r["again"]), f"re-checkout of paid orders: {dict(again_kinds)}"
    assert r["stock_again"] == r["stock_after"], "re-checkout of paid orders took stock again"
    assert r["credit_again"] == r["credit_after"], "re-checkout of paid orders charged again"
