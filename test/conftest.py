"""Fixtures for the end-to-end suite.

Every test talks to the gateway (env GATEWAY_URL, default http://127.0.0.1:8000).
If the gateway cannot be reached the run stops at the first test that needs it
with a clear message and exit code 1: an unreachable gateway always fails the
run, it never skips tests.

Entities are made through the `create` endpoints (UUID ids) so tests never
collide; only the tests of `batch_init` itself use the ids "0".."n-1", and each
of them initialises what it reads first.
"""

from __future__ import annotations

from typing import Callable, Iterable

import pytest

from gateway_client import GATEWAY_URL, Api, gateway_reachable

_FIGURES: list[str] = []


@pytest.fixture(scope="session")
def gateway() -> str:
    ok, detail = gateway_reachable(GATEWAY_URL)
    if not ok:
        msg = f"gateway {GATEWAY_URL} is not reachable ({detail}); start the fleet or set GATEWAY_URL"
        pytest.exit(msg, returncode=1)
    return GATEWAY_URL


@pytest.fixture(scope="session")
def api(gateway: str) -> Api:
    return Api(gateway)


@pytest.fixture
def make_item(api: Api) -> Callable[..., str]:
    """make_item(stock=10, price=1) -> item_id (UUID), stock added through /stock/add."""

    def make(stock: int = 10, price: int = 1) -> str:
        return api.create_item(price=price, stock=stock)

    return make


@pytest.fixture
def make_user(api: Api) -> Callable[..., str]:
    """make_user(credit=100) -> user_id (UUID), credit added through /payment/add_funds."""

    def make(credit: int = 100) -> str:
        return api.create_user(credit=credit)

    return make


@pytest.fixture
def make_order(api: Api, make_user) -> Callable[..., str]:
    """make_order(items=[(item_id, qty), ...], user_id=None, credit=100) -> order_id.

    Creates a user with `credit` when no user_id is given.
    """

    def make(items: Iterable[tuple[str, int]] = (), user_id: str | None = None,
             credit: int = 100) -> str:
        if user_id is None:
            user_id = make_user(credit)
        return api.create_order(user_id, list(items))

    return make


@pytest.fixture
def report() -> Callable[[str], None]:
    """report(line): print now (visible with -s) and again in the terminal summary."""

    def add(line: str) -> None:
        print(line)
        _FIGURES.append(line)

    return add


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001
    if _FIGURES:
        terminalreporter.section("figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)
