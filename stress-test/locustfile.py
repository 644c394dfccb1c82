"""Locust stress test: checkouts of random batch orders plus a mix of reads.

Run init_orders.py first, then e.g.
    locust -f locustfile.py --host http://127.0.0.1:8000
See README.md for headless runs and the extra options below.

Counting, as the course benchmark's locustfile does: a 4xx is a failure (a
refused checkout, e.g. not enough stock or credit, is a 4xx). A 5xx is a
failure too, reported under its own message, unless --course-rules is given:
then, like the course's file, every answer that is not a 4xx counts as a
success. A transport error (no HTTP answer at all) is always a failure.
"""

from __future__ import annotations

import random

from locust import FastHttpUser, events, task


@events.init_command_line_parser.add_listener
def _add_arguments(parser):
    parser.add_argument("--batch-orders", type=int, env_var="LOCUST_BATCH_ORDERS", default=100_000,
                        help="orders made by batch_init: ids 0..n-1 (default 100000)")
    parser.add_argument("--batch-items", type=int, env_var="LOCUST_BATCH_ITEMS", default=100_000,
                        help="items made by batch_init (default 100000)")
    parser.add_argument("--batch-users", type=int, env_var="LOCUST_BATCH_USERS", default=100_000,
                        help="users made by batch_init (default 100000)")
    parser.add_argument("--wait-max", type=float, env_var="LOCUST_WAIT_MAX", default=0.0,
                        help="each simulated user waits uniform(0, wait_max) seconds between tasks (default 0)")
    parser.add_argument("--reads", type=str, env_var="LOCUST_READS", default="on", choices=["on", "off"],
                        help="mix in reads (find order/item/user) next to checkouts (default on)")
    parser.add_argument("--course-rules", action="store_true", default=False,
                        help="count only 4xx as failures, as the course's locustfile does")


def _opt(env, name, default):
    opts = getattr(env, "parsed_options", None)
    return getattr(opts, name, default) if opts is not None else default


def _judge(resp, course_rules: bool) -> None:
    # Messages carry only the status (no body, no id) so Locust's error table
    # groups them into a few rows.
    code = resp.status_code
    if 400 <= code < 500:
        resp.failure(f"HTTP {code} (refused)")
    elif code == 0:
        resp.failure(f"transport error: {getattr(resp, 'error', None)}")
    elif code >= 500 and not course_rules:
        resp.failure(f"HTTP {code} (server error)")
    else:
        resp.success()


class WebshopUser(FastHttpUser):
    def on_start(self):
        env = self.environment
        self.n_orders = max(1, _opt(env, "batch_orders", 100_000))
        self.n_items = max(1, _opt(env, "batch_items", 100_000))
        self.n_users = max(1, _opt(env, "batch_users", 100_000))
        self.wait_max = _opt(env, "wait_max", 0.0)
        self.reads = _opt(env, "reads", "on") == "on"
        self.course_rules = _opt(env, "course_rules", False)

    def wait_time(self):
        return random.uniform(0, self.wait_max) if self.wait_max > 0 else 0

    @task(10)
    def checkout(self):
        order_id = random.randrange(self.n_orders)
        with self.client.post(f"/orders/checkout/{order_id}", name="/orders/checkout/[order_id]",
                              catch_response=True) as resp:
            _judge(resp, self.course_rules)

    @task(3)
    def find_order(self):
        if not self.reads:
            return self.checkout()
        order_id = random.randrange(self.n_orders)
        with self.client.get(f"/orders/find/{order_id}", name="/orders/find/[order_id]",
                             catch_response=True) as resp:
            _judge(resp, self.course_rules)

    @task(2)
    def find_item(self):
        if not self.reads:
            return self.checkout()
        item_id = random.randrange(self.n_items)
        with self.client.get(f"/stock/find/{item_id}", name="/stock/find/[item_id]",
                             catch_response=True) as resp:
            _judge(resp, self.course_rules)

    @task(2)
    def find_user(self):
        if not self.reads:
            return self.checkout()
        user_id = random.randrange(self.n_users)
        with self.client.get(f"/payment/find_user/{user_id}", name="/payment/find_user/[user_id]",
                             catch_response=True) as resp:
            _judge(resp, self.course_rules)
