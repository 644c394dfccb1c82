"""A randomized concurrent history through the gateway, checked against a model
(history_model.py) of the HTTP contract in shared/API.md.

HISTORY_CLIENTS clients (default 32) run a random mix for HISTORY_SECONDS (default 20;
600 works) on entities of their own made with the create endpoints (UUID ids): stock
add/subtract (some subtracts too large), add_funds/pay (some pays too large), new orders,
addItem to random orders (also while they are being checked out or after they are paid),
checkouts (also of paid orders, and several at once of one order, and one racing an
addItem), finds, and repeats of earlier POSTs with the same Idempotency-Key. Every POST
carries an Idempotency-Key: a fresh UUID per logical request, the same one for a repeat.

Every request and its answer go to a gzipped JSON-lines log (HISTORY_LOG, default in the
temp dir). After the last answer the stores are read until two snapshots agree (at most
30 s more) and checked: conservation of stock and credit, paid flags against the checkout
answers, total_cost against the items, the items against the acknowledged addItems. All
violations are listed with the seed; HISTORY_SEED=<seed> replays the same set-up and the
same random choices as far as timing allows (the interleaving differs from run to run).

With HISTORY_FAULTS=1 (set by order/tests/history_under_faults.rs, which runs this test
against a fleet whose links to Redis and the broker go through fault proxies) a 5xx or a
lost answer is allowed; a client then retries the POST with the same key, as the contract
tells it to, and the set-up retries until it has an answer. HISTORY_PHASE_FILE, when set,
is written "clients" when the random mix starts and "settle" when it ends, so the fault
injector hurts the mix and not the final reads.

batch_init runs on a range of its own: the set-up batch-initialises BATCH_N items and users
("0".."n-1", plenty of stock and credit) and BATCH_ORDERS orders; the mix then keeps
batch-initialising the orders again while it checks them out, and the model checks the
range's totals (history_model.BatchWorld). It overwrites the global ids that other test
modules and stress tests use: run the history alone (pytest runs modules one at a time).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import random
import tempfile
import time
import uuid
from collections import deque

import aiohttp
import pytest

from history_model import BatchWorld, Model, Req

pytestmark = pytest.mark.history

SECONDS = float(os.environ.get("HISTORY_SECONDS", "20"))
CLIENTS = int(os.environ.get("HISTORY_CLIENTS", "32"))
N_ITEMS = 8
N_USERS = 16
BATCH_N = 10  # batch items and users "0".."BATCH_N-1"
BATCH_ORDERS = 40
BATCH_STOCK = 1_000_000
BATCH_CREDIT = 1_000_000_000
QUIET_LIMIT_S = 30.0
SHOWN_VIOLATIONS = 300  # in the failure message; the log file has all of them
OPEN_ORDERS = 24  # about this many orders are open (not known paid, not full) at any time
FULL_ORDER = 12  # units after which an order gets no more addItems on purpose (it may never be paid)
POOL_SIZE = 4000  # earlier POSTs kept for same-key repeats
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=120, connect=30)
FAULTS = os.environ.get("HISTORY_FAULTS") == "1"
PHASE_FILE = os.environ.get("HISTORY_PHASE_FILE")
RETRIES = 3  # with faults: how often a client retries a POST whose answer was unknown
SETUP_RETRIES = 60  # with faults: how often the set-up retries one of its requests


def phase(name: str) -> None:
    if PHASE_FILE:
        with open(PHASE_FILE, "w") as f:
            f.write(name)


class History:
    def __init__(self, base: str, seed: int, session: aiohttp.ClientSession, log):
        self.base = base.rstrip("/")
        self.seed = seed
        self.session = session
        self.log = log
        self.model = Model(seed, faults=FAULTS)
        self.next_rid = 0
        self.pool: list[Req] = []  # reservoir of answered POSTs
        self.recent: deque[Req] = deque(maxlen=200)
        self.pool_seen = 0
        self.deadline = 0.0
        self.open_orders: list[str] = []  # orders maybe unpaid (pruned lazily)

    # -- one request ------------------------------------------------------------
    async def send(self, kind: str, method: str, path: str, *, target: str = "", item: str = "",
                   amount: int = 0, orig: Req | None = None, rng: random.Random | None = None) -> Req:
        self.next_rid += 1
        key = orig.key if orig is not None else (str(uuid.uuid4()) if method == "POST" else None)
        req = Req(self.next_rid, kind, method, path, key, orig, target, item, amount)
        headers = {"Idempotency-Key": key} if key else None
        req.t0 = time.monotonic()
        self.model.sent(req)
        try:
            async with self.session.request(method, self.base + path, headers=headers) as resp:
                text = await resp.text()
                req.status = resp.status
                try:
                    req.body = json.loads(text) if text else None
                except ValueError:
                    req.body = text
        except Exception as exc:  # noqa: BLE001 - any failure to get an answer is recorded
            req.error = f"{type(exc).__name__}: {exc}"
        req.t1 = time.monotonic()
        self.model.answered(req)
        self.log.write(json.dumps({
            "rid": req.rid, "kind": kind, "method": method, "path": path, "key": key,
            "repeat_of": orig.rid if orig else None, "t0": round(req.t0, 6), "t1": round(req.t1, 6),
            "status": req.status, "body": req.body, "error": req.error,
        }) + "\n")
        if method == "POST" and orig is None and not req.unknown and rng is not None:
            self.remember(req, rng)
        if FAULTS and method == "POST" and orig is None and req.unknown and rng is not None:
            # what the contract tells a client to do after a 5xx or a lost answer
            for _ in range(RETRIES):
                await asyncio.sleep(rng.random() * 0.5)
                again = await self.send(kind, method, path, target=target, item=item, amount=amount, orig=req)
                if not again.unknown:
                    return again
        return req

    def remember(self, req: Req, rng: random.Random) -> None:
        self.recent.append(req)
        self.pool_seen += 1
        if len(self.pool) < POOL_SIZE:
            self.pool.append(req)
        else:
            j = rng.randrange(self.pool_seen)
            if j < POOL_SIZE:
                self.pool[j] = req

    async def must(self, kind: str, method: str, path: str) -> object:
        req = first = await self.send(kind, method, path)
        for _ in range(SETUP_RETRIES if FAULTS else 0):
            if not req.unknown:
                break
            await asyncio.sleep(0.25)
            req = await self.send(kind, method, path, orig=first if method == "POST" else None)
        assert req.ok, f"[seed {self.seed}] set-up failed: {req.describe()}"
        return req.body

    # -- set-up -------------------------------------------------------------------
    async def setup(self, rng: random.Random) -> None:
        specs = [(rng.randint(1, 25), rng.randint(0, 60)) for _ in range(N_ITEMS)]  # (price, stock)
        credits = [rng.randint(0, 400) for _ in range(N_USERS)]

        async def item(price: int, stock: int) -> tuple[str, int, int]:
            iid = (await self.must("setup", "POST", f"/stock/item/create/{price}"))["item_id"]
            if stock:
                await self.must("setup", "POST", f"/stock/add/{iid}/{stock}")
            found = await self.must("setup", "GET", f"/stock/find/{iid}")
            assert (found.get("stock"), found.get("price")) == (stock, price), (
                f"[seed {self.seed}] item set up wrong: {found}")
            return iid, price, stock

        async def user(credit: int) -> tuple[str, int]:
            uid = (await self.must("setup", "POST", "/payment/create_user"))["user_id"]
            if credit:
                await self.must("setup", "POST", f"/payment/add_funds/{uid}/{credit}")
            found = await self.must("setup", "GET", f"/payment/find_user/{uid}")
            assert found.get("credit") == credit, f"[seed {self.seed}] user set up wrong: {found}"
            return uid, credit

        made = await asyncio.gather(*(item(p, s) for p, s in specs), *(user(c) for c in credits))
        for iid, price, stock in made[:N_ITEMS]:  # in spec order, so that a seed replays the same choices
            self.model.add_item(iid, price, stock)
        for uid, credit in made[N_ITEMS:]:
            self.model.add_user(uid, credit)
        self.item_ids = list(self.model.items)
        price = rng.randint(1, 20)
        await self.must("setup", "POST", f"/stock/batch_init/{BATCH_N}/{BATCH_STOCK}/{price}")
        await self.must("setup", "POST", f"/payment/batch_init/{BATCH_N}/{BATCH_CREDIT}")
        await self.must("setup", "POST", self.batch_orders_path(price))
        self.model.batch = BatchWorld(BATCH_N, BATCH_ORDERS, price, BATCH_STOCK, BATCH_CREDIT)
        self.user_ids = list(self.model.users)
        for _ in range(OPEN_ORDERS):
            await self.op_create_order(rng)
        assert self.model.order_ids, f"[seed {self.seed}] no order could be created"

    # -- the random mix -------------------------------------------------------------
    def pick_order(self, rng: random.Random, open_share: float, filled: bool = False) -> str:
        """An open order (not known paid, not full) with probability `open_share` (when there is one;
        `filled`: preferably one with items), else any order, mostly a recent one."""
        if rng.random() < open_share:
            oid = self.pick_open(rng)
            for _ in range(3 if filled else 0):
                if oid is None or self.model.orders[oid].acked:
                    break
                oid = self.pick_open(rng)
            if oid is not None:
                return oid
        ids = self.model.order_ids
        return rng.choice(ids[-64:]) if rng.random() < 0.75 else rng.choice(ids)

    def pick_open(self, rng: random.Random) -> str | None:
        open_ = self.open_orders
        while open_:
            j = rng.randrange(len(open_))
            oid = open_[j]
            o = self.model.orders[oid]
            if not o.known_paid and sum(o.acked.values()) < FULL_ORDER:
                return oid
            open_[j] = open_[-1]
            open_.pop()
        return None

    async def op_stock_add(self, rng):
        iid = rng.choice(self.item_ids)
        amt = rng.randint(1, 20)
        await self.send("stock_add", "POST", f"/stock/add/{iid}/{amt}", target=iid, amount=amt, rng=rng)

    async def op_stock_subtract(self, rng):
        iid = rng.choice(self.item_ids)
        it = self.model.items[iid]
        amt = it.initial + it.adds_sent + rng.randint(1, 1000) if rng.random() < 0.15 else rng.randint(1, 8)
        await self.send("stock_subtract", "POST", f"/stock/subtract/{iid}/{amt}", target=iid, amount=amt, rng=rng)

    async def op_add_funds(self, rng):
        uid = rng.choice(self.user_ids)
        amt = rng.randint(1, 150)
        await self.send("add_funds", "POST", f"/payment/add_funds/{uid}/{amt}", target=uid, amount=amt, rng=rng)

    async def op_pay(self, rng):
        uid = rng.choice(self.user_ids)
        u = self.model.users[uid]
        amt = u.initial + u.funds_sent + rng.randint(1, 1000) if rng.random() < 0.15 else rng.randint(1, 30)
        await self.send("pay", "POST", f"/payment/pay/{uid}/{amt}", target=uid, amount=amt, rng=rng)

    async def op_create_order(self, rng):
        uid = rng.choice(self.user_ids)
        req = await self.send("create_order", "POST", f"/orders/create/{uid}", target=uid, rng=rng)
        if req.ok and req.body.get("order_id") in self.model.orders:
            self.open_orders.append(req.body["order_id"])

    async def add_item(self, rng, oid):
        iid = rng.choice(self.item_ids)
        qty = rng.randint(1, 3)
        await self.send("add_item", "POST", f"/orders/addItem/{oid}/{iid}/{qty}",
                        target=oid, item=iid, amount=qty, rng=rng)

    async def checkout(self, rng, oid):
        await self.send("checkout", "POST", f"/orders/checkout/{oid}", target=oid, rng=rng)

    async def op_add_item(self, rng):
        if len(self.open_orders) < OPEN_ORDERS:
            await self.op_create_order(rng)
        await self.add_item(rng, self.pick_order(rng, 0.85))

    async def op_checkout(self, rng):
        await self.checkout(rng, self.pick_order(rng, 0.75, filled=True))

    async def op_duplicate_checkouts(self, rng):
        oid = self.pick_order(rng, 0.9, filled=True)
        await asyncio.gather(*(self.checkout(rng, oid) for _ in range(rng.randint(2, 4))))

    async def op_add_item_during_checkout(self, rng):
        oid = self.pick_order(rng, 0.9, filled=True)
        delay = rng.random() * 0.01

        async def late_add():
            await asyncio.sleep(delay)
            await self.add_item(rng, oid)

        await asyncio.gather(self.checkout(rng, oid), late_add(), *(late_add() for _ in range(rng.randint(0, 1))))

    async def op_find(self, rng):
        r = rng.random()
        if r < 0.25:
            iid = rng.choice(self.item_ids)
            await self.send("find_item", "GET", f"/stock/find/{iid}", target=iid)
        elif r < 0.45:
            uid = rng.choice(self.user_ids)
            await self.send("find_user", "GET", f"/payment/find_user/{uid}", target=uid)
        else:
            oid = self.pick_order(rng, 0.5)
            await self.send("find_order", "GET", f"/orders/find/{oid}", target=oid)

    def batch_orders_path(self, price: int) -> str:
        return f"/orders/batch_init/{BATCH_ORDERS}/{BATCH_N}/{BATCH_N}/{price}"

    async def op_batch_orders(self, rng):
        await self.send("batch_orders", "POST", self.batch_orders_path(self.model.batch.price), rng=rng)

    async def op_batch_checkout(self, rng):
        oid = str(rng.randrange(BATCH_ORDERS))
        await self.send("batch_checkout", "POST", f"/orders/checkout/{oid}", target=oid, rng=rng)

    async def op_repeat(self, rng):
        source = self.recent if self.recent and rng.random() < 0.5 else self.pool
        if not source:
            return
        first = source[rng.randrange(len(source))]
        await self.send(first.kind, "POST", first.path, target=first.target, item=first.item,
                        amount=first.amount, orig=first)

    OPS = (
        ("op_stock_add", 7), ("op_stock_subtract", 7), ("op_add_funds", 7), ("op_pay", 7),
        ("op_create_order", 2), ("op_add_item", 26), ("op_checkout", 7),
        ("op_duplicate_checkouts", 2), ("op_add_item_during_checkout", 4),
        ("op_find", 15), ("op_repeat", 12), ("op_batch_orders", 1), ("op_batch_checkout", 4),
    )

    async def client(self, rng: random.Random) -> None:
        names = [n for n, _ in self.OPS]
        weights = [w for _, w in self.OPS]
        while time.monotonic() < self.deadline:
            await getattr(self, rng.choices(names, weights)[0])(rng)

    # -- the quiet period ---------------------------------------------------------------
    async def snapshot(self) -> tuple[dict, dict, dict, tuple]:
        sem = asyncio.Semaphore(max(CLIENTS, 16))

        async def find(kind, path, target):
            async with sem:
                req = await self.send(kind, "GET", path, target=target)
            return target, (req.body if req.status == 200 else None)

        found = await asyncio.gather(
            *(find("final_find_item", f"/stock/find/{i}", i) for i in self.item_ids),
            *(find("final_find_user", f"/payment/find_user/{u}", u) for u in self.user_ids),
            *(find("final_find_order", f"/orders/find/{o}", o) for o in list(self.model.order_ids)),
        )
        batch = await asyncio.gather(
            *(find("final_find_batch", f"/stock/find/{i}", str(i)) for i in range(BATCH_N)),
            *(find("final_find_batch", f"/payment/find_user/{u}", str(u)) for u in range(BATCH_N)),
            *(find("final_find_batch", f"/orders/find/{o}", str(o)) for o in range(BATCH_ORDERS)),
        )
        n_i, n_u = len(self.item_ids), len(self.user_ids)
        return (dict(found[:n_i]), dict(found[n_i:n_i + n_u]), dict(found[n_i + n_u:]),
                (dict(batch[:BATCH_N]), dict(batch[BATCH_N:2 * BATCH_N]), dict(batch[2 * BATCH_N:])))

    async def settle(self) -> tuple[dict, dict, dict, tuple]:
        start = time.monotonic()
        snap = await self.snapshot()
        while True:
            again = await self.snapshot()
            if again == snap:
                return again
            if time.monotonic() - start > QUIET_LIMIT_S:
                self.model.violation("quiet", f"the stores still change {QUIET_LIMIT_S:.0f} s after the last answer")
                return again
            snap = again


async def run_history(base: str, seed: int, log) -> tuple[History, float]:
    rng = random.Random(seed)
    connector = aiohttp.TCPConnector(limit=max(4 * CLIENTS, 100), limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector, timeout=CLIENT_TIMEOUT) as session:
        h = History(base, seed, session, log)
        await h.setup(rng)
        t0 = time.monotonic()
        h.deadline = t0 + SECONDS
        phase("clients")
        try:
            await asyncio.gather(*(h.client(random.Random(f"{seed}:{i}")) for i in range(CLIENTS)))
        finally:
            phase("settle")
        duration = time.monotonic() - t0
        assert h.model.inflight == 0, f"[seed {seed}] {h.model.inflight} requests still unanswered"
        items, users, orders, batch = await h.settle()
        h.model.final_check(items, users, orders)
        h.model.batch_check(*batch)
    return h, duration


def test_random_history_matches_model(gateway, report):
    seed = int(os.environ.get("HISTORY_SEED") or random.randrange(1 << 32))
    log_path = os.environ.get("HISTORY_LOG") or os.path.join(
        tempfile.gettempdir(), f"history-{seed}-{os.getpid()}.jsonl.gz")
    print(f"\nhistory: HISTORY_SEED={seed}, {CLIENTS} clients for {SECONDS:g} s, "
          f"{'faults injected, ' if FAULTS else ''}log {log_path}", flush=True)

    with gzip.open(log_path, "wt", compresslevel=1) as log:
        h, duration = asyncio.run(run_history(gateway, seed, log))
        m = h.model
        for v in m.violations:
            log.write(json.dumps({"violation": v}) + "\n")

    mix = {k: n for k, n in m.kinds.items() if not k.startswith(("final_", "setup"))}
    total = sum(mix.values())
    paid = sum(1 for o in m.orders.values() if o.known_paid)
    report(
        f"history (seed {seed}): {CLIENTS} clients, {total} requests in {duration:.1f} s "
        f"({total / duration:.0f}/s), {m.repeats} same-key repeats; per kind {dict(sorted(mix.items()))}; "
        f"answers per status {dict(sorted(m.statuses.items()))} ({m.faulted} unknown outcomes"
        f"{', faults injected' if FAULTS else ''}); {len(m.orders)} orders, {paid} paid; "
        f"batch range: {m.batch.checkout_ok} checkouts 2xx, {m.batch.checkout_refused} refused, "
        f"{m.batch.inits_ok} batch_inits of its orders; {len(m.violations)} violations {dict(m.categories)}"
    )

    if m.violations:
        pytest.fail(
            f"history seed {seed} (replay with HISTORY_SEED={seed}): {len(m.violations)} contract violations "
            f"{dict(m.categories)}; every request, answer and violation is in {log_path}\n"
            + "\n".join(shown_violations(m.violations, seed, log_path)),
            pytrace=False,
        )


def shown_violations(violations: list[str], seed: int, log_path: str) -> list[str]:
    """All violations when there are at most SHOWN_VIOLATIONS, else an even share of each
    category (in order of first occurrence) and how many more of it are in the log."""
    if len(violations) <= SHOWN_VIOLATIONS:
        return violations
    by_cat: dict[str, list[str]] = {}
    for v in violations:
        by_cat.setdefault(v.split("] ", 1)[1].split(":", 1)[0], []).append(v)
    share = max(10, SHOWN_VIOLATIONS // len(by_cat))
    out = []
    for cat, vs in by_cat.items():
        out += vs[:share]
        if len(vs) > share:
            out.append(f"[seed {seed}] ... and {len(vs) - share} more {cat} violations in {log_path}")
    return out
