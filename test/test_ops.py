"""Operational endpoints: on each service instance directly, and what the gateway lets through.

The direct tests are skipped unless SERVICE_URLS lists the instances' direct base URLs, e.g.
SERVICE_URLS=http://127.0.0.1:8101,http://127.0.0.1:8102,...

Through the gateway (GATEWAY_URL), `/metrics` is refused for every service (404 from the
nginx gateways, 403 from the Ingress), while `/health` and `/ready` are still routed.
"""

from __future__ import annotations

import os
import re

import pytest
import requests

SERVICE_URLS = [u.strip().rstrip("/") for u in os.environ.get("SERVICE_URLS", "").split(",") if u.strip()]

direct = pytest.mark.skipif(not SERVICE_URLS, reason="SERVICE_URLS not set (comma list of service base URLs)")

urls = pytest.mark.parametrize("base", SERVICE_URLS or ["unset"])

PREFIXES = ["stock", "payment", "orders"]

# A line only the Prometheus text format has: `# TYPE <family> <type>` or `# HELP <family> ...`.
PROMETHEUS_LINE = re.compile(r"^# (TYPE|HELP) [a-zA-Z_:][a-zA-Z0-9_:]* ", re.M)


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("variant", ["{p}/metrics", "{p}/metrics/", "{p}/metrics?format=text",
                                     "{p}//metrics", "{P}/metrics"])
def test_metrics_is_not_reachable_through_the_gateway(gateway, prefix, variant):
    path = "/" + variant.format(p=prefix, P=prefix.upper())
    r = requests.get(f"{gateway}{path}", timeout=10)
    assert r.status_code in (403, 404), (path, r.status_code, r.text[:200])
    assert not PROMETHEUS_LINE.search(r.text), f"{path}: Prometheus text through the gateway: {r.text[:200]!r}"


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("endpoint", ["health", "ready"])
def test_health_and_ready_are_still_routed(gateway, prefix, endpoint):
    r = requests.get(f"{gateway}/{prefix}/{endpoint}", timeout=10)
    assert r.status_code == 200, (prefix, endpoint, r.status_code, r.text[:200])
    assert r.json().get("status") in ("ok", "ready"), r.text[:200]


@direct
@urls
def test_health_is_200(base):
    r = requests.get(f"{base}/health", timeout=10)
    assert r.status_code == 200, (base, r.status_code, r.text[:200])


@direct
@urls
def test_ready_is_200(base):
    r = requests.get(f"{base}/ready", timeout=10)
    assert r.status_code == 200, (base, r.status_code, r.text[:200])


@direct
@urls
def test_metrics_is_prometheus_text(base):
    # make sure at least one request has been counted
    requests.get(f"{base}/health", timeout=10)
    r = requests.get(f"{base}/metrics", timeout=10)
    assert r.status_code == 200, (base, r.status_code, r.text[:200])
    ctype = r.headers.get("content-type", "")
    assert ctype.startswith("text/plain") or "openmetrics" in ctype, ctype

    lines = r.text.splitlines()
    types = [ln for ln in lines if ln.startswith("# TYPE ")]
    assert types, f"no '# TYPE' line in /metrics of {base}"
    for ln in types:
        parts = ln.split()
        assert len(parts) == 4 and parts[3] in {"counter", "gauge", "histogram", "summary", "untyped"}, ln

    # every sample line is `name{labels} value`
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{.*\})? [-+0-9.eEInfNa]+( \d+)?$')
    samples = [ln for ln in lines if ln and not ln.startswith("#")]
    assert samples, f"no samples in /metrics of {base}"
    bad = [ln for ln in samples if not sample.match(ln)]
    assert not bad, f"malformed sample lines: {bad[:3]}"

    # request counts by route and status (API.md): e.g. http_requests_total
    families = {ln.split()[2] for ln in types}
    assert any("request" in f for f in families), f"no request-count family in {sorted(families)}"
