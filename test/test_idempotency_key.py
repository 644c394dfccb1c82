"""The `Idempotency-Key` header through the gateway (API.md: every POST accepts an
optional key of 1-128 printable ASCII characters; a repeat with the same key and
path applies nothing again and returns the first answer).

A key the contract does not allow is bad input: a 400 with a JSON error, and
nothing written. That holds through the gateway too, for an empty or blank key
(which nginx cannot tell from a missing one, so the gateway stamps its own key
in a header of its own and passes the client's on as sent) and for a key with a
control character (refused by the gateway itself, in JSON, before a service's
HTTP parser would refuse it with an empty body).
"""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import pytest

from gateway_client import Api, assert_error, expect_ok


def raw_post(api: Api, path: str, key: bytes) -> tuple[int, str, bytes]:
    """POST with the key's bytes sent as they are (requests refuses some of them)."""
    url = urlsplit(api.base)
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=30)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Idempotency-Key", key)
        conn.putheader("Content-Length", "0")
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type", ""), r.read()
    finally:
        conn.close()


def test_a_repeated_key_applies_once_and_returns_the_first_answer(api: Api):
    item = api.create_item(price=1, stock=0)
    first = api.session.post(f"{api.base}/stock/add/{item}/5", headers={"Idempotency-Key": "k-1"})
    body = expect_ok(first)
    again = api.session.post(f"{api.base}/stock/add/{item}/5", headers={"Idempotency-Key": "k-1"})
    assert again.status_code == 200 and again.json() == body
    # The same key on another path is another request.
    other = api.session.post(f"{api.base}/stock/add/{item}/2", headers={"Idempotency-Key": "k-1"})
    expect_ok(other)
    assert api.stock_of(item) == 7


@pytest.mark.parametrize("key", [b"", b"   ", b"a\x01b", b"a\x7fb", b"k" * 129, "é".encode()],
                         ids=["empty", "blank", "control", "delete", "too-long", "non-ascii"])
def test_a_key_the_contract_does_not_allow_is_a_json_400_and_writes_nothing(api: Api, key: bytes):
    item = api.create_item(price=1, stock=3)
    for _ in range(2):
        status, content_type, body = raw_post(api, f"/stock/add/{item}/1", key)
        assert status == 400, (status, body)
        assert content_type.startswith("application/json"), (content_type, body)
        assert "error" in json.loads(body), body
    assert api.stock_of(item) == 3


def test_a_post_without_a_key_applies_each_time(api: Api):
    """The gateway stamps a key of its own per request: two requests, two changes."""
    item = api.create_item(price=1, stock=0)
    expect_ok(api.post(f"/stock/add/{item}/1"))
    expect_ok(api.post(f"/stock/add/{item}/1"))
    assert api.stock_of(item) == 2


def test_a_client_cannot_pass_its_key_off_as_the_gateways(api: Api):
    """The gateway overwrites `Idempotency-Gateway-Key`: a client that sets it gets no
    idempotency from it (each request stamped anew), and no error either."""
    item = api.create_item(price=1, stock=0)
    for _ in range(2):
        r = api.session.post(f"{api.base}/stock/add/{item}/1",
                             headers={"Idempotency-Gateway-Key": "forged"})
        expect_ok(r)
    assert api.stock_of(item) == 2
    assert_error(api.session.post(f"{api.base}/stock/add/{item}/1",
                                  headers={"Idempotency-Key": ""}), 400)
