"""Schemathesis hooks for the run of `order/tests/openapi.rs` against the gateway.

Loaded with `SCHEMATHESIS_HOOKS=test/schemathesis_hooks.py` (not a pytest module: pytest
never collects it). It adds the one check schemathesis cannot know on its own:

`nothing_written_by_a_refused_request` -- API.md: a refused request (any 4xx) writes
nothing. The stores' keyspace notifications name every key any command wrote, so the
check keeps a mirror of what clients can see of the business keys and compares it around
each request:

- `before_call` drains the notifications (a PUBLISH on a channel of our own, received
  on the same subscription, marks the end of what happened so far: Redis delivers in
  order) and brings the mirror up to date, so writes that land between requests (a
  settle after a checkout's answer) are not blamed on the next one;
- after the answer, the keys written during the request are read again; for a 4xx,
  any key whose client-visible value differs from the mirror is a failure, naming
  the key and both values.

Client-visible means: `item:<id>` and `user:<id>` hashes without `held` (what saga steps
hold until they settle, asynchronously) -- for a batch id, what the batch rule covering it
says unless the hash is of the rule's epoch (`common/src/counters/batches.rs`: a batch
counter gets a hash of its own on its first change, which changes nothing visible), `order:<id>` JSON without `checkout` (a
checkout's freeze, lifted before it answers); any other key whole. Left out on purpose:
`idem:*` (a refusal decided from the stored state is recorded so a repeat gets the same
answer: the contract), `itemsaga:*` / `usersaga:*` (per-saga step records and tombstones),
`outbox:*` (a refused checkout's `order.checkout_failed` event, written with its decision and
relayed to the broker), `fence:*` / `paid:*` (a checkout's marks beside its order, which
expire on their own, whatever request is running then) and `durability:mark`. The saga store is not watched (a refused checkout logs its saga).

Also `before_call`: a `batch_init` size between `BATCH_CAP` and the documented maximum
(10 000 000) is brought below `BATCH_CAP`, so the run writes thousands of keys, not
millions; the request stays valid.

Env: `NOTHING_WRITTEN_REDIS` (`redis://127.0.0.1:<port>`), `NOTHING_WRITTEN_DBS`
(`1,2,3`: stock, payment, order), `NOTHING_WRITTEN_REPORT` (a JSON file with the counts,
written at exit, so the Rust test can tell the check ran), `BATCH_CAP` (default 50).
"""

from __future__ import annotations

import atexit
import json
import os
import time
import uuid
from typing import Any

import redis
import schemathesis

MAX_BATCH = 10_000_000
BATCH_CAP = int(os.environ.get("BATCH_CAP", "50"))

IGNORED_PREFIXES = (
    "idem:",
    "itemsaga:",
    "usersaga:",
    "outbox:",
    "durability:mark",
    # A checkout's marks beside the order (fenced, paid): written only by checkouts that
    # went through, but they expire whenever their time is up, also during a refused request.
    "fence:",
    "paid:",
)
IGNORED_HASH_FIELDS = {"held"}
IGNORED_ORDER_FIELDS = {"checkout"}
# Counter families whose batch_init is a rule (key prefix -> rules key, count field, others).
BATCH_FAMILIES = {
    "item:": ("itembatches", "stock", ["price"]),
    "user:": ("userbatches", "credit", []),
}


def covering_rule(rules: list[tuple[str, float]], index: int) -> dict[str, Any] | None:
    """The rule for batch id `index`: the one with the smallest n above it (see batches.rs)."""
    covering = [(n, member) for member, n in rules if n > index]
    return json.loads(min(covering)[1]) if covering else None


def resolved(key: str, raw: Any, rules_of: Any) -> Any:
    """What a client sees of `key` whose stored value is `raw`, given the batch rules."""
    for prefix, (rules_key, field, others) in BATCH_FAMILIES.items():
        ident = key[len(prefix) :]
        if key.startswith(prefix) and ident.isascii() and ident.isdigit() and str(int(ident)) == ident:
            rule = covering_rule(rules_of(rules_key), int(ident))
            if rule is not None and (raw is None or raw.get("epoch") != rule["epoch"]):
                shown = {field: str(rule["count"]), "epoch": rule["epoch"]}
                shown.update({f: str(v) for f, v in zip(others, rule["others"])})
                return shown
    return raw


class StoreWatch:
    """A mirror of the client-visible business keys, kept current by keyspace notifications."""

    def __init__(self, url: str, dbs: list[int]) -> None:
        self.clients = {db: redis.Redis.from_url(url, db=db, decode_responses=True) for db in dbs}
        any_client = next(iter(self.clients.values()))
        # Keyspace events (K) for every class of command (A): the key named in the channel.
        any_client.config_set("notify-keyspace-events", "KA")
        self.marker = f"nothing-written:{uuid.uuid4().hex}"
        self.pubsub = any_client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe(*[f"__keyspace@{db}__:*" for db in dbs])
        self.pubsub.subscribe(self.marker)
        self.publisher = any_client
        self.mirror: dict[tuple[int, str], Any] = {}
        self.counts: dict[str, Any] = {"requests": 0, "refused": 0, "violations": 0}
        # "POST /stock/add/{item_id}/{amount}" -> {"404": 120, ...}: what the run reached.
        self.by_operation: dict[str, dict[str, int]] = {}
        self.sync()  # the subscription is in place before the mirror is read
        for db, client in self.clients.items():
            for key in client.scan_iter(count=1000):
                if not key.startswith(IGNORED_PREFIXES):
                    self.mirror[(db, key)] = self.project(db, key)

    def sync(self) -> set[tuple[int, str]]:
        """The keys written since the last call (every write before this call included)."""
        token = uuid.uuid4().hex
        self.publisher.publish(self.marker, token)
        touched: set[tuple[int, str]] = set()
        deadline = time.monotonic() + 10.0
        while True:
            # None: nothing yet, or a subscription confirmation (ignored).
            message = self.pubsub.get_message(timeout=1.0)
            if message is None:
                if time.monotonic() > deadline:
                    raise RuntimeError("no keyspace notification marker within 10 s")
                continue
            channel = message["channel"]
            if channel == self.marker:
                if message["data"] == token:
                    return touched
                continue
            if message["type"] != "pmessage" or not channel.startswith("__keyspace@"):
                continue
            prefix, key = channel.split("__:", 1)
            if not key.startswith(IGNORED_PREFIXES):
                touched.add((int(prefix[len("__keyspace@") :]), key))

    def project(self, db: int, key: str) -> Any:
        """What a client can see of `key` (None: it does not exist)."""
        client = self.clients[db]
        kind = client.type(key)
        if kind == "none":
            return None
        if kind == "hash":
            fields = client.hgetall(key)
            return {f: v for f, v in fields.items() if f not in IGNORED_HASH_FIELDS}
        if kind == "string":
            value = client.get(key)
            if key.startswith("order:") and value is not None:
                order = json.loads(value)
                return {f: v for f, v in order.items() if f not in IGNORED_ORDER_FIELDS}
            return value
        if kind == "set":
            return sorted(client.smembers(key))
        if kind == "list":
            return client.lrange(key, 0, -1)
        if kind == "zset":
            return client.zrange(key, 0, -1, withscores=True)
        return (kind, client.dump(key))

    def refresh(self, touched: set[tuple[int, str]]) -> list[tuple[str, Any, Any]]:
        """Reads the touched keys into the mirror; returns those whose visible value changed."""
        changed = []
        rules_key_list = [rules_key for rules_key, _, _ in BATCH_FAMILIES.values()]
        rules_before = {
            (db, k): self.mirror.get((db, k)) or [] for db in self.clients for k in rules_key_list
        }
        rules_now = {
            (db, k): self.project(db, k) or [] for db in self.clients for k in rules_key_list
        }
        for db, key in sorted(touched):
            now = self.project(db, key)
            before = self.mirror.get((db, key))
            seen_now = resolved(key, now, lambda k, db=db: rules_now[(db, k)])
            seen_before = resolved(key, before, lambda k, db=db: rules_before[(db, k)])
            if seen_now != seen_before:
                changed.append((f"db {db} {key}", seen_before, seen_now))
            if now is None:
                self.mirror.pop((db, key), None)
            else:
                self.mirror[(db, key)] = now
        return changed

    def report(self) -> None:
        path = os.environ.get("NOTHING_WRITTEN_REPORT")
        if path:
            with open(path, "w") as f:
                json.dump({**self.counts, "by_operation": self.by_operation}, f, indent=1)


_WATCH: StoreWatch | None = None


def watch() -> StoreWatch:
    global _WATCH
    if _WATCH is None:
        url = os.environ["NOTHING_WRITTEN_REDIS"]
        dbs = [int(d) for d in os.environ.get("NOTHING_WRITTEN_DBS", "1,2,3").split(",")]
        _WATCH = StoreWatch(url, dbs)
        atexit.register(_WATCH.report)
    return _WATCH


def _cap_batch(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and BATCH_CAP < value <= MAX_BATCH:
        return value % (BATCH_CAP + 1)
    if isinstance(value, str) and value.isascii() and value.isdigit():
        number = int(value)
        if BATCH_CAP < number <= MAX_BATCH:
            return str(number % (BATCH_CAP + 1))
    return value


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    if "/batch_init/" in case.operation.path and case.path_parameters:
        if "n" in case.path_parameters:
            case.path_parameters["n"] = _cap_batch(case.path_parameters["n"])
    w = watch()
    w.refresh(w.sync())


@schemathesis.check
def nothing_written_by_a_refused_request(ctx: Any, response: Any, case: Any) -> bool | None:
    w = watch()
    changed = w.refresh(w.sync())
    w.counts["requests"] += 1
    statuses = w.by_operation.setdefault(f"{case.operation.method.upper()} {case.operation.path}", {})
    statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
    if not 400 <= response.status_code < 500:
        return None
    w.counts["refused"] += 1
    if changed:
        w.counts["violations"] += 1
        shown = "; ".join(f"{key}: {before!r} -> {after!r}" for key, before, after in changed[:5])
        raise AssertionError(
            f"answered {response.status_code}, yet wrote {len(changed)} key(s): {shown}"
        )
    return True
