"""Operational endpoints of each service instance (not routed by the gateway).

Skipped unless SERVICE_URLS lists the instances' direct base URLs, e.g.
SERVICE_URLS=http://127.0.0.1:8101,http://127.0.0.1:8102,...
"""

from __future__ import annotations

import os
import re

import pytest
import requests

SERVICE_URLS = [u.strip().rstrip("/") for u in os.environ.get("SERVICE_URLS", "").split(",") if u.strip()]

pytestmark = pytest.mark.skipif(not SERVICE_URLS, reason="SERVICE_URLS not set (comma list of service base URLs)")

urls = pytest.mark.parametrize("base", SERVICE_URLS or ["unset"])


@urls
def test_health_is_200(base):
    r = requests.get(f"{base}/health", timeout=10)
    assert r.status_code == 200, (base, r.status_code, r.text[:200])


@urls
def test_ready_is_200(base):
    r = requests.get(f"{base}/ready", timeout=10)
    assert r.status_code == 200, (base, r.status_code, r.text[:200])


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
