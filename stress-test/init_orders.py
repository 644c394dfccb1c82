#!/usr/bin/env python3
"""Batch-initialise the fleet through the gateway for the stress test.

Defaults are the course benchmark's:
    POST /stock/batch_init/100000/1000000/1
    POST /payment/batch_init/100000/1000000
    POST /orders/batch_init/100000/100000/100000/1

Exits non-zero when any step fails (transport error or non-2xx answer) or when
the spot checks afterwards do not find what was initialised.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import requests


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gateway", default=os.environ.get("GATEWAY_URL", "http://127.0.0.1:8000"),
                   help="gateway base URL (default: env GATEWAY_URL or http://127.0.0.1:8000)")
    p.add_argument("--items", type=int, default=100_000, help="number of items (default 100000)")
    p.add_argument("--item-stock", type=int, default=1_000_000, help="starting stock per item (default 1000000)")
    p.add_argument("--item-price", type=int, default=1, help="price per item (default 1)")
    p.add_argument("--users", type=int, default=100_000, help="number of users (default 100000)")
    p.add_argument("--user-credit", type=int, default=1_000_000, help="starting credit per user (default 1000000)")
    p.add_argument("--orders", type=int, default=100_000, help="number of orders (default 100000)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for each batch_init (default 600)")
    p.add_argument("--no-verify", action="store_true", help="skip the spot checks after initialising")
    args = p.parse_args(argv)
    for name in ("items", "item_stock", "item_price", "users", "user_credit", "orders"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.orders and (args.items == 0 or args.users == 0):
        p.error("orders need at least one item and one user")
    args.gateway = args.gateway.rstrip("/")
    return args


def post(session: requests.Session, url: str, timeout: float) -> tuple[bool, str]:
    try:
        r = session.post(url, timeout=timeout)
    except requests.RequestException as exc:
        return False, f"{type(exc).__name__}: {exc}"
    text = r.text.strip().replace("\n", " ")
    if len(text) > 200:
        text = text[:200] + "..."
    return 200 <= r.status_code < 300, f"HTTP {r.status_code} {text}"


def spot_check(session: requests.Session, args: argparse.Namespace) -> list[str]:
    """Read the first and last id of each kind back; return the problems found."""
    problems = []
    checks = []
    for n, path in ((args.items, "/stock/find/"), (args.users, "/payment/find_user/"),
                    (args.orders, "/orders/find/")):
        if n:
            checks += [path + "0", path + str(n - 1)]
    for path in checks:
        try:
            r = session.get(args.gateway + path, timeout=30)
        except requests.RequestException as exc:
            problems.append(f"GET {path}: {type(exc).__name__}: {exc}")
            continue
        if r.status_code != 200:
            problems.append(f"GET {path}: HTTP {r.status_code} {r.text[:200]}")
            continue
        body = r.json()
        if path.startswith("/stock/") and (body.get("stock"), body.get("price")) != (args.item_stock, args.item_price):
            problems.append(f"GET {path}: {body} (expected stock {args.item_stock}, price {args.item_price})")
        if path.startswith("/payment/") and body.get("credit") != args.user_credit:
            problems.append(f"GET {path}: {body} (expected credit {args.user_credit})")
        if path.startswith("/orders/") and (body.get("paid"), body.get("total_cost")) != (False, 2 * args.item_price):
            problems.append(f"GET {path}: {body} (expected unpaid, total {2 * args.item_price})")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    steps = [
        ("stock", f"/stock/batch_init/{args.items}/{args.item_stock}/{args.item_price}"),
        ("payment", f"/payment/batch_init/{args.users}/{args.user_credit}"),
        ("orders", f"/orders/batch_init/{args.orders}/{args.items}/{args.users}/{args.item_price}"),
    ]
    print(f"initialising through {args.gateway}", flush=True)
    start = time.perf_counter()
    with requests.Session() as session:
        for n, (name, path) in enumerate(steps, 1):
            print(f"[{n}/{len(steps)}] POST {path} ...", end=" ", flush=True)
            t0 = time.perf_counter()
            ok, detail = post(session, args.gateway + path, args.timeout)
            print(f"{time.perf_counter() - t0:.2f}s {detail}", flush=True)
            if not ok:
                print(f"FAILED: {name} batch_init did not succeed", file=sys.stderr)
                return 1
        if not args.no_verify:
            problems = spot_check(session, args)
            if problems:
                for line in problems:
                    print(f"spot check failed: {line}", file=sys.stderr)
                return 1
            print("spot checks passed (first and last id of each kind)", flush=True)
    print(f"done in {time.perf_counter() - start:.2f}s: {args.items} items, {args.users} users, "
          f"{args.orders} orders", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
