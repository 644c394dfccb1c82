"""Small clients for the HTTP contract in shared/API.md, used by the test suite.

`Api` is synchronous (requests) and asserts on success paths, so a test reads as
the scenario it checks. `AsyncApi` (aiohttp) never raises on an HTTP status: it
returns an `Outcome` so that concurrent scenarios can count 2xx / 4xx / 5xx /
transport errors themselves.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Iterable, Sequence

import pytest
import requests

GATEWAY_URL = os.environ.get("GATEWAY_URL", "http://127.0.0.1:8000").rstrip("/")
HTTP_TIMEOUT = float(os.environ.get("TEST_HTTP_TIMEOUT", "30"))
I64_MAX = 2**63 - 1


# --------------------------------------------------------------------------
# assertions shared by every test module
# --------------------------------------------------------------------------

def describe(resp: requests.Response) -> str:
    body = resp.text
    if len(body) > 300:
        body = body[:300] + "..."
    return f"{resp.request.method} {resp.request.path_url} -> {resp.status_code} {body!r}"


def json_body(resp: requests.Response) -> Any:
    try:
        return resp.json()
    except ValueError as exc:  # requests' JSONDecodeError is a ValueError
        raise AssertionError(f"body is not JSON: {describe(resp)}") from exc


def expect_ok(resp: requests.Response, status: int | None = None) -> Any:
    """Assert a 2xx (or exactly `status`) and return the JSON body."""
    if status is None:
        assert 200 <= resp.status_code < 300, f"expected 2xx: {describe(resp)}"
    else:
        assert resp.status_code == status, f"expected {status}: {describe(resp)}"
    return json_body(resp)


def assert_error(resp: requests.Response, status: int | str) -> str:
    """Assert an error answer: `status` is an exact code or "4xx".

    Every error body must be JSON `{"error": "<non-empty reason>"}`.
    Returns the reason.
    """
    if status == "4xx":
        assert 400 <= resp.status_code < 500, f"expected a 4xx: {describe(resp)}"
    else:
        assert resp.status_code == status, f"expected {status}: {describe(resp)}"
    body = json_body(resp)
    assert isinstance(body, dict), f"error body is not a JSON object: {describe(resp)}"
    assert "error" in body, f"error body has no 'error' field: {describe(resp)}"
    assert isinstance(body["error"], str) and body["error"].strip(), (
        f"'error' must be a non-empty string: {describe(resp)}"
    )
    return body["error"]


def assert_is_int(value: Any, what: str) -> None:
    # bool is a subclass of int in Python; JSON true/false is not a number.
    assert isinstance(value, int) and not isinstance(value, bool), (
        f"{what} must be a JSON integer, got {value!r} ({type(value).__name__})"
    )


def assert_uuid(value: Any, what: str) -> None:
    assert isinstance(value, str), f"{what} must be a string, got {value!r}"
    try:
        parsed = uuid.UUID(value)
    except ValueError as exc:
        raise AssertionError(f"{what} is not a UUID: {value!r}") from exc
    assert str(parsed) == value.lower() and len(value) == 36, (
        f"{what} is not a hyphenated UUID string: {value!r}"
    )


def body_mentions(body: Any, value: int) -> bool:
    """True when the JSON object `body` carries the integer `value` as one of its
    top-level fields ("JSON with the new stock/credit": the field name is not fixed)."""
    if isinstance(body, dict):
        return any(v == value and not isinstance(v, bool) for v in body.values())
    return body == value and not isinstance(body, bool)


def summed_items(items: Iterable[Sequence[Any]]) -> dict[str, int]:
    """`items` of an order as {item_id: total quantity} (lines may be split or summed)."""
    out: dict[str, int] = {}
    for line in items:
        item_id, qty = line
        out[item_id] = out.get(item_id, 0) + qty
    return out


def unknown_id() -> str:
    return str(uuid.uuid4())


def unknown_id_params(kind: str) -> list:
    """Ids that exist nowhere: a fresh UUID, a word, a number far beyond any batch."""
    return [
        pytest.param(unknown_id(), id="uuid"),
        pytest.param(f"no-such-{kind}", id="word"),
        pytest.param("999999999999", id="big-number"),
    ]


# --------------------------------------------------------------------------
# synchronous client
# --------------------------------------------------------------------------

class Api:
    def __init__(self, base_url: str = GATEWAY_URL, timeout: float = HTTP_TIMEOUT):
        self.base = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()

    # raw ------------------------------------------------------------------
    def get(self, path: str) -> requests.Response:
        return self.session.get(self.base + path, timeout=self.timeout)

    def post(self, path: str) -> requests.Response:
        return self.session.post(self.base + path, timeout=self.timeout)

    # stock ----------------------------------------------------------------
    def create_item(self, price: int, stock: int = 0) -> str:
        body = expect_ok(self.post(f"/stock/item/create/{price}"))
        item_id = body["item_id"]
        if stock:
            expect_ok(self.post(f"/stock/add/{item_id}/{stock}"), 200)
        return item_id

    def item(self, item_id: str) -> dict:
        return expect_ok(self.get(f"/stock/find/{item_id}"), 200)

    def stock_of(self, item_id: str) -> int:
        return self.item(item_id)["stock"]

    def add_stock(self, item_id: str, amount: int) -> requests.Response:
        return self.post(f"/stock/add/{item_id}/{amount}")

    def subtract_stock(self, item_id: str, amount: int) -> requests.Response:
        return self.post(f"/stock/subtract/{item_id}/{amount}")

    def stock_batch_init(self, n: int, starting_stock: int, price: int) -> dict:
        return expect_ok(self.post(f"/stock/batch_init/{n}/{starting_stock}/{price}"))

    # payment --------------------------------------------------------------
    def create_user(self, credit: int = 0) -> str:
        body = expect_ok(self.post("/payment/create_user"))
        user_id = body["user_id"]
        if credit:
            expect_ok(self.post(f"/payment/add_funds/{user_id}/{credit}"), 200)
        return user_id

    def user(self, user_id: str) -> dict:
        return expect_ok(self.get(f"/payment/find_user/{user_id}"), 200)

    def credit_of(self, user_id: str) -> int:
        return self.user(user_id)["credit"]

    def add_funds(self, user_id: str, amount: int) -> requests.Response:
        return self.post(f"/payment/add_funds/{user_id}/{amount}")

    def pay(self, user_id: str, amount: int) -> requests.Response:
        return self.post(f"/payment/pay/{user_id}/{amount}")

    def payment_batch_init(self, n: int, starting_money: int) -> dict:
        return expect_ok(self.post(f"/payment/batch_init/{n}/{starting_money}"))

    # orders ---------------------------------------------------------------
    def create_order(self, user_id: str, items: Iterable[tuple[str, int]] = ()) -> str:
        body = expect_ok(self.post(f"/orders/create/{user_id}"))
        order_id = body["order_id"]
        for item_id, qty in items:
            expect_ok(self.add_item(order_id, item_id, qty), 200)
        return order_id

    def order(self, order_id: str) -> dict:
        return expect_ok(self.get(f"/orders/find/{order_id}"), 200)

    def add_item(self, order_id: str, item_id: str, quantity: int) -> requests.Response:
        return self.post(f"/orders/addItem/{order_id}/{item_id}/{quantity}")

    def checkout(self, order_id: str) -> requests.Response:
        return self.post(f"/orders/checkout/{order_id}")

    def orders_batch_init(self, n: int, n_items: int, n_users: int, item_price: int) -> dict:
        return expect_ok(self.post(f"/orders/batch_init/{n}/{n_items}/{n_users}/{item_price}"))


def gateway_reachable(base_url: str = GATEWAY_URL) -> tuple[bool, str]:
    """Any HTTP answer counts as reachable; only a transport failure does not."""
    try:
        resp = requests.get(f"{base_url}/stock/find/{unknown_id()}", timeout=5)
    except requests.RequestException as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, f"HTTP {resp.status_code}"


# --------------------------------------------------------------------------
# asynchronous client for the concurrent scenarios
# --------------------------------------------------------------------------

@dataclass
class Outcome:
    status: int | None  # None: transport error / timeout
    body: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def kind(self) -> str:
        if self.status is None:
            return "error"
        if 200 <= self.status < 300:
            return "2xx"
        if 400 <= self.status < 500:
            return "4xx"
        if 500 <= self.status < 600:
            return "5xx"
        return f"{self.status}"


class AsyncApi:
    def __init__(self, session, base_url: str = GATEWAY_URL):
        self.session = session
        self.base = base_url.rstrip("/")

    async def request(self, method: str, path: str) -> Outcome:
        try:
            async with self.session.request(method, self.base + path) as resp:
                text = await resp.text()
                try:
                    body = json.loads(text) if text else None
                except ValueError:
                    body = text
                return Outcome(resp.status, body)
        except (asyncio.TimeoutError, OSError, Exception) as exc:  # noqa: BLE001
            return Outcome(None, None, f"{type(exc).__name__}: {exc}")

    async def must(self, method: str, path: str) -> Any:
        """Set-up step: must answer 2xx, else the test fails with the reason."""
        out = await self.request(method, path)
        assert out.ok, f"set-up {method} {path} failed: {out}"
        return out.body

    # set-up helpers ---------------------------------------------------------
    async def create_item(self, price: int, stock: int) -> str:
        item_id = (await self.must("POST", f"/stock/item/create/{price}"))["item_id"]
        if stock:
            await self.must("POST", f"/stock/add/{item_id}/{stock}")
        return item_id

    async def create_user(self, credit: int) -> str:
        user_id = (await self.must("POST", "/payment/create_user"))["user_id"]
        if credit:
            await self.must("POST", f"/payment/add_funds/{user_id}/{credit}")
        return user_id

    async def create_order(self, user_id: str, items: Iterable[tuple[str, int]]) -> str:
        order_id = (await self.must("POST", f"/orders/create/{user_id}"))["order_id"]
        for item_id, qty in items:
            await self.must("POST", f"/orders/addItem/{order_id}/{item_id}/{qty}")
        return order_id

    async def checkout(self, order_id: str) -> Outcome:
        return await self.request("POST", f"/orders/checkout/{order_id}")

    async def item(self, item_id: str) -> dict:
        return await self.must("GET", f"/stock/find/{item_id}")

    async def user(self, user_id: str) -> dict:
        return await self.must("GET", f"/payment/find_user/{user_id}")

    async def order(self, order_id: str) -> dict:
        return await self.must("GET", f"/orders/find/{order_id}")


async def gather_limited(aws: Iterable[Awaitable[Any]], limit: int) -> list[Any]:
    """Run awaitables with at most `limit` in flight; results in input order."""
    sem = asyncio.Semaphore(limit)

    async def one(aw: Awaitable[Any]) -> Any:
        async with sem:
            return await aw

    return await asyncio.gather(*(one(aw) for aw in aws))
