"""The model behind test_history.py: what the HTTP contract (shared/API.md) allows a
history of concurrent requests to answer, and what the stores must hold at the end.

The driver calls `sent(req)` right before a request goes out and `answered(req)` right
after its answer (or transport error) has been read, both on the event loop's single
thread with no await in between. So when a flag set by `answered(a)` is seen by
`sent(b)`, the fleet had answered `a` before `b` reached it: a real-time order the
contract's read-your-writes and "after the answer arrives, the stores already agree
with it" rules must respect. Request times are monotonic seconds; an answer time is
taken after the body was read, which only ever makes the checks more lenient.

A deliberate repeat (same `Idempotency-Key`, same path, sent after the first answer
arrived) is a `Req` whose `orig` is the first request. It must be answered exactly like
the first and applies nothing: the model counts only first requests (except when the first
was refused, so wrote nothing, and the repeat answered 2xx: a violation by itself, and then
the one time the change was applied). For the bounds that
must hold whatever the fleet does (an upper bound on stock, on an order's quantities)
repeats are counted too, so a repeat that is wrongly applied shows up once, as itself
and in the final conservation check, not again as a broken bound.

Without injected faults (`faults=False`, the plain run) a 5xx or a transport error is a
violation. With faults (the run behind fault proxies, order/tests/history_under_faults.rs)
they are allowed and counted. Either way such a request's outcome is unknown (either way
is allowed in the conservation ranges), so the other checks stay exact, and a repeat of it
(a client's retry with the same key) may answer anything a first request could: a 5xx is
not an answer the fleet records.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# kinds of request; "final_find_*" are the quiet-period snapshot reads (same checks as find_*)
MIX_KINDS = (
    "stock_add", "stock_subtract", "add_funds", "pay", "create_order",
    "add_item", "checkout", "find_item", "find_user", "find_order", "batch_orders", "batch_checkout",
)


@dataclass(slots=True)
class Req:
    rid: int
    kind: str
    method: str
    path: str
    key: str | None
    orig: "Req | None" = None  # first request with this key when this one is a repeat
    target: str = ""  # item, user or order id the request is about
    item: str = ""  # addItem: the item
    amount: int = 0  # amount or quantity in the path
    t0: float = 0.0
    t1: float = 0.0
    status: int | None = None  # None: transport error / timeout
    body: Any = None
    error: str | None = None
    ctx: Any = None  # what the model knew when the request was sent

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def unknown(self) -> bool:
        """Outcome unknown to a client: no answer or a 5xx."""
        return self.status is None or self.status >= 500

    @property
    def refused(self) -> bool:
        return self.status is not None and 400 <= self.status < 500

    def describe(self) -> str:
        body = self.error if self.status is None else json.dumps(self.body, sort_keys=True)
        if body is not None and len(body) > 240:
            body = body[:240] + "..."
        rep = f" (repeat of #{self.orig.rid})" if self.orig is not None else ""
        return (f"#{self.rid}{rep} {self.method} {self.path} key={self.key} -> "
                f"{self.status if self.status is not None else 'transport error'} {body}")


@dataclass(slots=True)
class ItemState:
    price: int
    initial: int
    adds_sent: int = 0  # every add sent, repeats too: upper bound on what was added
    added_ok: int = 0
    add_unknown: int = 0
    subtracted_ok: int = 0
    sub_unknown: int = 0
    repeats_ok: int = 0  # repeats answered 2xx (diagnosis only)


@dataclass(slots=True)
class UserState:
    initial: int
    funds_sent: int = 0
    funds_ok: int = 0
    funds_unknown: int = 0
    paid_ok: int = 0
    pay_unknown: int = 0
    repeats_ok: int = 0


@dataclass(slots=True)
class OrderState:
    user: str
    acked: Counter = field(default_factory=Counter)  # item -> qty of first addItems answered 2xx
    unknown: Counter = field(default_factory=Counter)  # item -> qty of first addItems with unknown outcome
    sent_qty: Counter = field(default_factory=Counter)  # every addItem sent (repeats too)
    refused_qty: Counter = field(default_factory=Counter)  # every addItem answered 4xx (nothing written)
    checkouts_sent: int = 0  # repeats too
    checkout_inflight: int = 0  # repeats too
    last_checkout_t1: float = float("-inf")
    checkout_ok: int = 0  # first requests answered 2xx
    checkout_unknown: int = 0
    checkout_refused: int = 0
    known_paid: bool = False  # a 2xx checkout or a find showing paid:true has been answered
    refused_additems: list = field(default_factory=list)  # non-409 4xx addItems, legal only if paid
    repeats_ok: int = 0


@dataclass(slots=True)
class BatchWorld:
    """The batch_init id range: items and users "0".."n-1" set up once by batch_init and then
    touched only by checkouts of batch orders "0".."n_orders-1", which batch_init overwrites
    (new content, unpaid) again and again while they are being checked out. Every batch order
    is two lines of quantity 1 at `price` each, so every charge takes exactly 2 units and
    2 x price: which content a checkout froze cannot be known, but these totals can."""
    n: int
    n_orders: int
    price: int
    stock: int
    credit: int
    checkout_ok: int = 0  # first requests answered 2xx
    checkout_unknown: int = 0
    checkout_refused: int = 0
    inits_ok: int = 0


def req_category(req: Req) -> str:
    return "409" if req.status == 409 else "status"


def error_body_ok(body: Any) -> bool:
    return isinstance(body, dict) and isinstance(body.get("error"), str) and bool(body["error"].strip())


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_uuid(v: Any) -> bool:
    if not isinstance(v, str) or len(v) != 36:
        return False
    try:
        return str(uuid.UUID(v)) == v.lower()
    except ValueError:
        return False


def summed(items: Any) -> dict[str, int] | None:
    """An order's `items` as {item: total qty}; None when malformed."""
    if not isinstance(items, list):
        return None
    out: Counter = Counter()
    for line in items:
        if not (isinstance(line, list) and len(line) == 2 and isinstance(line[0], str) and is_int(line[1])):
            return None
        out[line[0]] += line[1]
    return dict(out)


class Model:
    def __init__(self, seed: int, faults: bool = False):
        self.seed = seed
        self.faults = faults
        self.faulted = 0  # answers that were a 5xx or no answer (allowed only with faults)
        self.items: dict[str, ItemState] = {}
        self.users: dict[str, UserState] = {}
        self.orders: dict[str, OrderState] = {}
        self.order_ids: list[str] = []
        self.violations: list[str] = []
        self.categories: Counter = Counter()
        self.kinds: Counter = Counter()
        self.statuses: Counter = Counter()
        self.repeats = 0
        self.applied_by_repeat: set[int] = set()  # first requests refused whose repeat answered 2xx
        self.inflight = 0
        self.batch: BatchWorld | None = None

    # -- bookkeeping ------------------------------------------------------
    def violation(self, category: str, text: str) -> None:
        self.categories[category] += 1
        self.violations.append(f"[seed {self.seed}] {category}: {text}")

    def add_item(self, item_id: str, price: int, stock: int) -> None:
        self.items[item_id] = ItemState(price=price, initial=stock)

    def add_user(self, user_id: str, credit: int) -> None:
        self.users[user_id] = UserState(initial=credit)

    def add_order(self, order_id: str, user_id: str) -> None:
        if order_id in self.orders:
            self.violation("create", f"create_order returned the id of an existing order {order_id}")
            return
        self.orders[order_id] = OrderState(user=user_id)
        self.order_ids.append(order_id)

    # -- a request goes out -------------------------------------------------
    def sent(self, req: Req) -> None:
        self.inflight += 1
        self.kinds[req.kind] += 1
        if req.orig is not None:
            self.repeats += 1
        kind = req.kind.removeprefix("final_")
        if kind == "stock_add":
            self.items[req.target].adds_sent += req.amount
        elif kind == "add_funds":
            self.users[req.target].funds_sent += req.amount
        elif kind == "add_item":
            o = self.orders[req.target]
            o.sent_qty[req.item] += req.amount
            req.ctx = o.known_paid
        elif kind == "checkout":
            o = self.orders[req.target]
            o.checkouts_sent += 1
            o.checkout_inflight += 1
            req.ctx = o.known_paid
        elif kind == "find_order":
            o = self.orders[req.target]
            req.ctx = (dict(o.acked), o.known_paid)

    # -- its answer arrives ---------------------------------------------------
    def answered(self, req: Req) -> None:
        self.inflight -= 1
        st = req.status
        self.statuses["error" if st is None else str(st)] += 1
        if req.unknown:
            self.faulted += 1
        if self.faults and req.unknown:
            pass
        elif st is None:
            self.violation("transport", f"no answer: {req.describe()}")
        elif st >= 500:
            self.violation("5xx", f"a 5xx although no fault is injected: {req.describe()}")
        elif not (200 <= st < 300 or 400 <= st < 500):
            self.violation("status", f"neither 2xx, 4xx nor 5xx: {req.describe()}")
        if st is not None and st >= 400 and not error_body_ok(req.body):
            self.violation("error-body", f"error body is not JSON {{\"error\": \"...\"}}: {req.describe()}")
        if st == 409 and req.kind != "add_item":
            self.violation("409", f"409 is only for addItem during a checkout: {req.describe()}")
        kind = req.kind.removeprefix("final_")
        if req.orig is not None:
            self._repeat(req, kind)
            return
        handler = getattr(self, "_" + kind, None)
        if handler is not None:
            handler(req)

    def _bad_status(self, req: Req, allowed: str) -> None:
        self.violation("status", f"expected {allowed}: {req.describe()}")

    def _number_body(self, req: Req, what: str) -> None:
        if not (isinstance(req.body, dict) and any(is_int(v) for v in req.body.values())):
            self.violation("body", f"2xx body should be JSON with the new {what}: {req.describe()}")

    def _repeat(self, req: Req, kind: str) -> None:
        first = req.orig
        assert first is not None
        if not req.unknown and not first.unknown and (req.status != first.status or req.body != first.body):
            self.violation(
                "idempotency",
                f"a repeat with the same Idempotency-Key answered differently: first {first.describe()}; "
                f"repeat {req.describe()}",
            )
        if req.ok and first.refused and first.rid not in self.applied_by_repeat:
            # the first answer wrote nothing, so this repeat's 2xx (already reported above as a
            # different answer) is the one time the change was applied: count it once
            self.applied_by_repeat.add(first.rid)
            self._applied_late(req, kind)
        if kind == "create_order" and req.ok and first.unknown and first.rid not in self.applied_by_repeat:
            # a retry of a create whose first answer was lost: the order it names exists
            self.applied_by_repeat.add(first.rid)
            self._create_order(req)
        if kind in ("stock_add", "stock_subtract"):
            if req.ok:
                self.items[req.target].repeats_ok += 1
        elif kind in ("add_funds", "pay"):
            if req.ok:
                self.users[req.target].repeats_ok += 1
        elif kind == "add_item":
            o = self.orders[req.target]
            if req.refused:
                o.refused_qty[req.item] += req.amount
            elif req.ok:
                o.repeats_ok += 1
        elif kind == "checkout":
            o = self.orders[req.target]
            o.checkout_inflight -= 1
            o.last_checkout_t1 = max(o.last_checkout_t1, req.t1)
            if req.ok:
                o.repeats_ok += 1

    def _applied_late(self, req: Req, kind: str) -> None:
        if kind == "stock_add":
            self.items[req.target].added_ok += req.amount
        elif kind == "stock_subtract":
            self.items[req.target].subtracted_ok += req.amount
        elif kind == "add_funds":
            self.users[req.target].funds_ok += req.amount
        elif kind == "pay":
            self.users[req.target].paid_ok += req.amount
        elif kind == "add_item":
            self.orders[req.target].acked[req.item] += req.amount
        elif kind == "checkout":
            o = self.orders[req.target]
            o.checkout_ok += 1
            o.known_paid = True
        elif kind == "create_order":
            oid = req.body.get("order_id") if isinstance(req.body, dict) else None
            if is_uuid(oid):
                self.add_order(oid, req.target)
        elif kind == "batch_checkout" and self.batch is not None:
            self.batch.checkout_ok += 1

    # stock ------------------------------------------------------------------
    def _stock_add(self, req: Req) -> None:
        it = self.items[req.target]
        if req.ok:
            it.added_ok += req.amount
            self._number_body(req, "stock")
        elif req.unknown:
            it.add_unknown += req.amount
        else:
            self._bad_status(req, "2xx (the item exists, the amount is small)")

    def _stock_subtract(self, req: Req) -> None:
        it = self.items[req.target]
        if req.ok:
            it.subtracted_ok += req.amount
            self._number_body(req, "stock")
            bound = it.initial + it.adds_sent
            if req.amount > bound:
                self.violation("below-zero", f"subtract of {req.amount} succeeded although the stock "
                                             f"can never have exceeded {bound}: {req.describe()}")
        elif req.unknown:
            it.sub_unknown += req.amount
        elif req.status != 400:
            self._bad_status(req, "2xx or 400")

    def _find_item(self, req: Req) -> None:
        if req.status != 200:
            self._bad_status(req, "200")
            return
        it = self.items[req.target]
        b = req.body
        if not (isinstance(b, dict) and is_int(b.get("stock")) and is_int(b.get("price"))):
            self.violation("body", f"find body should be {{stock, price}}: {req.describe()}")
            return
        if b["stock"] < 0:
            self.violation("negative", f"negative stock: {req.describe()}")
        if b["price"] != it.price:
            self.violation("price", f"price changed from {it.price}: {req.describe()}")

    # payment -----------------------------------------------------------------
    def _add_funds(self, req: Req) -> None:
        u = self.users[req.target]
        if req.ok:
            u.funds_ok += req.amount
            self._number_body(req, "credit")
        elif req.unknown:
            u.funds_unknown += req.amount
        else:
            self._bad_status(req, "2xx (the user exists, the amount is small)")

    def _pay(self, req: Req) -> None:
        u = self.users[req.target]
        if req.ok:
            u.paid_ok += req.amount
            self._number_body(req, "credit")
            bound = u.initial + u.funds_sent
            if req.amount > bound:
                self.violation("below-zero", f"pay of {req.amount} succeeded although the credit "
                                             f"can never have exceeded {bound}: {req.describe()}")
        elif req.unknown:
            u.pay_unknown += req.amount
        elif req.status != 400:
            self._bad_status(req, "2xx or 400")

    def _find_user(self, req: Req) -> None:
        if req.status != 200:
            self._bad_status(req, "200")
            return
        b = req.body
        if not (isinstance(b, dict) and is_int(b.get("credit"))):
            self.violation("body", f"find_user body should be {{user_id, credit}}: {req.describe()}")
            return
        if b.get("user_id") != req.target:
            self.violation("body", f"find_user names another user: {req.describe()}")
        if b["credit"] < 0:
            self.violation("negative", f"negative credit: {req.describe()}")

    # orders ------------------------------------------------------------------
    def _batch_checkout(self, req: Req) -> None:
        b = self.batch
        assert b is not None
        if req.ok:
            b.checkout_ok += 1
        elif req.unknown:
            b.checkout_unknown += 1
        elif req.status == 400:
            b.checkout_refused += 1  # legal only when a batch_init overwrote the order meanwhile
        else:
            self._bad_status(req, "2xx or 400 (a batch order always exists)")

    def _batch_orders(self, req: Req) -> None:
        if req.ok:
            assert self.batch is not None
            self.batch.inits_ok += 1
        elif not req.unknown:
            self._bad_status(req, "2xx (batch_init of orders with valid numbers)")

    def batch_check(self, items: dict[str, Any], users: dict[str, Any], orders: dict[str, Any]) -> None:
        """The batch range's totals: every unit taken was charged at its price, in pairs, by no
        more checkouts than answered 2xx (or had an unknown outcome), and by at least one per
        order paid now. A checkout refused because batch_init overwrote its order left nothing."""
        b = self.batch
        if b is None:
            return
        stocks = [items.get(str(i)) for i in range(b.n)]
        credits = [users.get(str(u)) for u in range(b.n)]
        finds = [orders.get(str(o)) for o in range(b.n_orders)]
        if not all(isinstance(x, dict) and is_int(x.get("stock")) for x in stocks) or \
                not all(isinstance(x, dict) and is_int(x.get("credit")) for x in credits) or \
                not all(isinstance(x, dict) and isinstance(x.get("paid"), bool) for x in finds):
            self.violation("final", "batch range: no usable final find of every item, user and order")
            return
        units = sum(b.stock - x["stock"] for x in stocks)
        charged = sum(b.credit - x["credit"] for x in credits)
        paid_now = sum(1 for x in finds if x["paid"])
        where = (f"batch range (price {b.price}; {b.checkout_ok} checkouts 2xx, {b.checkout_unknown} unknown, "
                 f"{b.checkout_refused} refused; {b.inits_ok} batch_inits of the orders; {paid_now} orders paid now)")
        if charged != units * b.price:
            self.violation("batch", f"{where}: {units} units taken but {charged} credit charged "
                                    f"(every unit costs {b.price})")
        if units % 2:
            self.violation("batch", f"{where}: {units} units taken, not a multiple of an order's 2")
        if not paid_now <= units // 2 <= b.checkout_ok + b.checkout_unknown:
            self.violation("batch", f"{where}: {units // 2} orders' worth taken; allowed {paid_now}.."
                                    f"{b.checkout_ok + b.checkout_unknown}")
        for i, x in enumerate(stocks):
            if x["stock"] < 0 or x["stock"] > b.stock:
                self.violation("batch", f"batch item {i}: stock {x['stock']} outside 0..{b.stock}")
        for u, x in enumerate(credits):
            if x["credit"] < 0 or x["credit"] > b.credit:
                self.violation("batch", f"batch user {u}: credit {x['credit']} outside 0..{b.credit}")

    def _create_order(self, req: Req) -> None:
        if not req.ok:
            if not req.unknown:
                self._bad_status(req, "2xx (the user exists)")
            return
        oid = req.body.get("order_id") if isinstance(req.body, dict) else None
        if not is_uuid(oid):
            self.violation("body", f"create_order should answer {{order_id: <uuid>}}: {req.describe()}")
            return
        self.add_order(oid, req.target)

    def _add_item(self, req: Req) -> None:
        o = self.orders[req.target]
        paid_before = req.ctx
        if req.ok:
            o.acked[req.item] += req.amount
            if paid_before:
                self.violation("frozen", f"addItem succeeded on an order already known paid "
                                         f"(a 2xx checkout or a paid find was answered before it was sent): "
                                         f"{req.describe()}")
        elif req.unknown:
            o.unknown[req.item] += req.amount
        else:
            o.refused_qty[req.item] += req.amount
            in_flight = o.checkout_inflight > 0 or o.last_checkout_t1 >= req.t0
            if req.status == 409 and in_flight:
                pass  # a checkout of the order was sent before this answer and answered after it was sent
            elif o.checkouts_sent == 0:
                self.violation(req_category(req), f"addItem refused although no checkout of the order was "
                                                  f"ever sent: {req.describe()}")
            else:
                # "4xx if the order is already paid" (a 409 too): legal only if it ends up paid
                req.ctx = req.t0 - o.last_checkout_t1
                o.refused_additems.append(req)

    def _checkout(self, req: Req) -> None:
        o = self.orders[req.target]
        o.checkout_inflight -= 1
        o.last_checkout_t1 = max(o.last_checkout_t1, req.t1)
        if req.ok:
            o.checkout_ok += 1
            o.known_paid = True
        elif req.unknown:
            o.checkout_unknown += 1
        else:
            o.checkout_refused += 1
            if req.status != 400:
                self._bad_status(req, "2xx or 400")
            elif req.ctx:
                self.violation("recheckout", f"checkout of an order already known paid must answer 200: "
                                             f"{req.describe()}")

    def _find_order(self, req: Req) -> None:
        if req.status != 200:
            self._bad_status(req, "200")
            return
        o = self.orders[req.target]
        b = req.body
        items = summed(b.get("items")) if isinstance(b, dict) else None
        if (items is None or not isinstance(b.get("paid"), bool) or not is_int(b.get("total_cost"))
                or b.get("order_id") != req.target):
            self.violation("body", f"find body should be {{order_id, paid, items, user_id, total_cost}}: "
                                   f"{req.describe()}")
            return
        if b.get("user_id") != o.user:
            self.violation("body", f"order's user_id should be {o.user}: {req.describe()}")
        acked_before, paid_before = req.ctx
        if b["paid"]:
            if o.checkouts_sent == 0:
                self.violation("paid", f"order shows paid but no checkout of it was ever sent: {req.describe()}")
            o.known_paid = True
        elif paid_before:
            self.violation("paid", f"order shows unpaid after a 2xx checkout (or a paid find) of it had been "
                                   f"answered: {req.describe()}")
        for item in set(items) | set(acked_before):
            got = items.get(item, 0)
            low = acked_before.get(item, 0)
            high = o.sent_qty[item] - o.refused_qty[item]
            if got < low:
                self.violation("lost-write", f"order holds {got} of item {item} although addItems of {low} had "
                                             f"been answered 2xx before this find was sent: {req.describe()}")
            elif got > high:
                self.violation("phantom-write", f"order holds {got} of item {item} but at most {high} were ever "
                                                f"added (every addItem sent, minus the refused): {req.describe()}")

    # -- the end -----------------------------------------------------------------
    def final_check(self, items: dict[str, dict], users: dict[str, dict], orders: dict[str, dict]) -> None:
        """`items`, `users`, `orders`: the settled snapshot (find bodies by id; missing when the find
        failed, which was already reported)."""
        taken: Counter = Counter()
        charged: Counter = Counter()
        for oid, o in self.orders.items():
            b = orders.get(oid)
            lines = summed(b.get("items")) if isinstance(b, dict) else None
            if lines is None or not isinstance(b.get("paid"), bool) or not is_int(b.get("total_cost")):
                self.violation("final", f"order {oid}: no usable final find ({b!r})")
                continue
            paid = b["paid"]
            where = (f"order {oid} (user {o.user}; final paid={paid} total_cost={b['total_cost']} "
                     f"items={json.dumps(lines, sort_keys=True)})")
            if o.checkout_ok and not paid:
                self.violation("paid", f"{where}: {o.checkout_ok} checkout(s) answered 2xx but it is unpaid")
            if paid and not o.checkout_ok and not o.checkout_unknown:
                why = (f"{o.checkout_refused} checkout(s), all refused"
                       + (f"; {o.repeats_ok} same-key repeat(s) answered 2xx" if o.repeats_ok else ""))
                self.violation("paid", f"{where}: paid although no checkout answered 2xx ({why})")
            cost = sum(q * self.items[i].price for i, q in lines.items() if i in self.items)
            if any(i not in self.items for i in lines):
                self.violation("final", f"{where}: holds an item this history never added")
            elif b["total_cost"] != cost:
                self.violation("total", f"{where}: total_cost {b['total_cost']} != sum of quantity x price {cost}")
            for i in set(lines) | set(o.acked) | set(o.unknown):
                got, low = lines.get(i, 0), o.acked[i]
                high = low + o.unknown[i]
                if not low <= got <= high:
                    exp = f"{low}" if low == high else f"{low}..{high}"
                    rep = f"; {o.repeats_ok} same-key repeat(s) answered 2xx" if o.repeats_ok else ""
                    self.violation("items", f"{where}: holds {got} of item {i}, but the addItems answered "
                                            f"2xx add up to {exp}{rep}")
            for req in o.refused_additems:
                if not paid:
                    why = (f"no checkout of the order in flight, the last one answered {req.ctx * 1000:.1f} ms "
                           f"before it was sent" if req.status == 409 else "not 409")
                    self.violation(req_category(req), f"addItem refused with {req.status} ({why}) although the "
                                                      f"order never got paid: {req.describe()}")
            if paid:
                for i, q in lines.items():
                    taken[i] += q
                charged[o.user] += b["total_cost"]

        for iid, it in self.items.items():
            b = items.get(iid)
            if not (isinstance(b, dict) and is_int(b.get("stock"))):
                self.violation("final", f"item {iid}: no usable final find ({b!r})")
                continue
            exp = it.initial + it.added_ok - it.subtracted_ok - taken[iid]
            low, high = exp - it.sub_unknown, exp + it.add_unknown
            if not low <= b["stock"] <= high:
                self.violation(
                    "stock", f"item {iid}: final stock {b['stock']} but initial {it.initial} + 2xx adds "
                             f"{it.added_ok} - 2xx subtracts {it.subtracted_ok} - taken by paid orders "
                             f"{taken[iid]} = {exp}" + (f" (unknown outcomes allow {low}..{high})" if low != high else "")
                             + (f"; {it.repeats_ok} same-key repeat(s) answered 2xx" if it.repeats_ok else ""))
            if b["stock"] < 0:
                self.violation("negative", f"item {iid}: final stock {b['stock']}")
        for uid, u in self.users.items():
            b = users.get(uid)
            if not (isinstance(b, dict) and is_int(b.get("credit"))):
                self.violation("final", f"user {uid}: no usable final find ({b!r})")
                continue
            exp = u.initial + u.funds_ok - u.paid_ok - charged[uid]
            low, high = exp - u.pay_unknown, exp + u.funds_unknown
            if not low <= b["credit"] <= high:
                self.violation(
                    "credit", f"user {uid}: final credit {b['credit']} but initial {u.initial} + 2xx add_funds "
                              f"{u.funds_ok} - 2xx pays {u.paid_ok} - total_cost of paid orders {charged[uid]} "
                              f"= {exp}" + (f" (unknown outcomes allow {low}..{high})" if low != high else "")
                              + (f"; {u.repeats_ok} same-key repeat(s) answered 2xx" if u.repeats_ok else ""))
            if b["credit"] < 0:
                self.violation("negative", f"user {uid}: final credit {b['credit']}")
