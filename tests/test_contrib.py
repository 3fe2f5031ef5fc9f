"""contrib/: the Grafana dashboard and the Prometheus scrape example stay true to the proxy.

Every metric a panel or a variable queries must exist in a live ``/metrics/raw`` after
traffic of every kind, with the labels the query groups and filters by; the PromQL is read
loosely (string literals dropped, identifiers and ``by (…)`` lists picked out), which is
enough to catch a renamed metric or label. The dashboard must import anywhere (its data
source is the ``DS_PROMETHEUS`` input, never a fixed uid); the Prometheus example must
scrape ``/metrics/raw`` with the access key read from a file, as Prometheus would.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)

from orproxy.app import App
from tests.conftest import ACCESS_KEY
from tests.fakeor import FakeOpenRouter
from tests.test_accounting import Scrape, get, scrape
from tests.test_observability import traffic

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "contrib" / "grafana" / "orproxy.json"
PROMETHEUS = REPO / "contrib" / "prometheus" / "prometheus.yml"
DS = "${DS_PROMETHEUS}"
# labels Prometheus adds to every series of a target; le is a histogram bucket's bound
TARGET_LABELS = {"job", "instance"}
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
METRIC = re.compile(r"(?<![\w$:])((?:orproxy|process)_[A-Za-z0-9_]*)")
SELECTOR = re.compile(r"((?:orproxy|process)_[A-Za-z0-9_]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
CALL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(")
FUNCTIONS = {"sum", "max", "min", "avg", "count", "rate", "increase", "irate", "delta",
             "histogram_quantile", "clamp_min", "clamp_max", "topk", "bottomk", "by",
             "without", "label_values", "time", "abs", "round", "sort_desc", "vector"}
HISTOGRAM_PARTS = ("_bucket", "_sum", "_count")
# what the board must show, and the series it must read for it
REQUIRED = {
    "request rate by status": "orproxy_requests_total",
    "latency": "orproxy_request_duration_seconds_bucket",
    "time to first byte": "orproxy_upstream_first_byte_seconds_bucket",
    "attempts by outcome": "orproxy_upstream_attempts_total",
    "keys by state": "orproxy_keys",
    "rest-until per key": "orproxy_key_rest_until_timestamp_seconds",
    "429s per key": "orproxy_key_rate_limited_total",
    "tokens by key": "orproxy_key_tokens_total",
    "cost by key": "orproxy_key_cost_usd_total",
    "tokens by model": "orproxy_model_tokens_total",
    "cost by model": "orproxy_model_cost_usd_total",
    "open connections": "orproxy_client_connections",
    "upstream pool": "orproxy_upstream_connections",
    "process cpu": "process_cpu_seconds_total",
    "process memory": "process_resident_memory_bytes",
}


def dashboard() -> dict[str, Any]:
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    out = []
    for panel in doc["panels"]:
        out.append(panel)
        out += panel.get("panels", [])
    return out


def queries(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    found = [(panel["title"], target["expr"]) for panel in panels(doc)
             for target in panel.get("targets", [])]
    for var in doc.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]
            found.append((f"${var['name']}", query["query"] if isinstance(query, dict)
                          else query))
    return found


def series_labels(scraped: Scrape) -> dict[str, set[str]]:
    """Sample name → every label name its series carry."""
    labels: dict[str, set[str]] = {}
    for name, label_set in scraped.samples:
        labels.setdefault(name, set()).update(k for k, _ in label_set)
    return labels


def resolve(name: str, scraped: Scrape, labels: dict[str, set[str]]) -> set[str] | None:
    """The labels of the series ``name`` reads, or None if no such series exists. A
    histogram's ``_bucket``/``_sum``/``_count`` resolve to its family, even with no sample
    yet (a histogram with labels has none before its first observation)."""
    if name in labels:
        return labels[name]
    for part in HISTOGRAM_PARTS:
        base = name.removesuffix(part)
        family = scraped.families.get(base)
        if base != name and family is not None and family.type == "histogram":
            return {"le"} | labels.get(f"{base}_bucket", set())
    return None


def balanced(expr: str) -> bool:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for ch in expr:
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack


# --- the dashboard ----------------------------------------------------------------------------


def test_dashboard_is_importable_with_a_prometheus_input() -> None:
    doc = dashboard()
    assert doc["schemaVersion"] >= 36
    assert doc["title"] and doc["uid"]
    [source] = [i for i in doc["__inputs"] if i["name"] == "DS_PROMETHEUS"]
    assert (source["type"], source["pluginId"]) == ("datasource", "prometheus")
    ids = [p["id"] for p in panels(doc)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(doc):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["title"].strip(), panel
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": DS}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": DS}, panel["title"]
            assert target["expr"].strip(), panel["title"]

    def sources(node: Any) -> list[Any]:
        if isinstance(node, dict):
            return ([node["datasource"]] if "datasource" in node else []) + [
                s for v in node.values() for s in sources(v)]
        if isinstance(node, list):
            return [s for v in node for s in sources(v)]
        return []

    # no data source but the input (and Grafana's own, for annotations)
    for source_ref in sources(doc):
        uid = source_ref.get("uid") if isinstance(source_ref, dict) else source_ref
        assert uid in (DS, "-- Grafana --"), source_ref


def test_dashboard_shows_what_an_operator_needs() -> None:
    doc = dashboard()
    exprs = [expr for _, expr in queries(doc)]
    used = {m for expr in exprs for m in METRIC.findall(STRING.sub('""', expr))}
    missing = {what: name for what, name in REQUIRED.items() if name not in used}
    assert missing == {}
    for hist in ("orproxy_request_duration_seconds_bucket",
                 "orproxy_upstream_first_byte_seconds_bucket"):
        for q in ("0.5", "0.95"):
            assert any(re.search(rf"histogram_quantile\(\s*{q}\s*,.*by \(le\).*{hist}", e)
                       for e in exprs), (hist, q)
    grouped = {label for expr in exprs for match in GROUPING.findall(expr)
               for label in (x.strip() for x in match.split(","))}
    assert {"status", "outcome", "state", "key_id", "model", "kind"} <= grouped


def test_every_query_parses_loosely() -> None:
    for where, expr in queries(dashboard()):
        bare = STRING.sub('""', expr)
        assert balanced(bare), (where, expr)
        assert bare.count('"') % 2 == 0, (where, expr)
        calls = set(CALL.findall(bare)) - set(METRIC.findall(bare))
        assert calls <= FUNCTIONS, (where, calls - FUNCTIONS)
        for match in re.finditer(r"\[([^\]]*)\]", bare):
            assert re.fullmatch(r"\d+[smhdw]|\$__(rate_interval|interval|range)",
                                match.group(1)), (where, match.group(0))


@pytest.mark.anyio
async def test_every_metric_and_label_the_dashboard_uses_exists_live(
    proxy: App, fake: FakeOpenRouter,
) -> None:
    await traffic(proxy, fake)
    scraped = await scrape(proxy.port)
    labels = series_labels(scraped)
    problems = []
    for where, expr in queries(dashboard()):
        bare = STRING.sub('""', expr)
        names = set(METRIC.findall(bare))
        assert names, (where, expr)
        available = set(TARGET_LABELS)
        for name in sorted(names):
            have = resolve(name, scraped, labels)
            if have is None:
                problems.append(f"{where}: no series {name}")
                continue
            available |= have
        for name, matchers in SELECTOR.findall(bare):
            have = (resolve(name, scraped, labels) or set()) | TARGET_LABELS
            for label in MATCHER.findall(matchers):
                if label not in have:
                    problems.append(f"{where}: {name} has no label {label}")
        for group in GROUPING.findall(bare):
            for label in (x.strip() for x in group.split(",") if x.strip()):
                if label not in available:
                    problems.append(f"{where}: nothing to group by {label}")
    assert problems == []


# --- the Prometheus example -------------------------------------------------------------------


def scrape_job() -> dict[str, Any]:
    doc = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    [job] = doc["scrape_configs"]
    assert isinstance(job, dict)
    return job


def test_prometheus_example_scrapes_metrics_raw_with_a_key_file() -> None:
    job = scrape_job()
    assert job["job_name"] == "orproxy"
    assert job["metrics_path"] == "/metrics/raw"
    assert job.get("scheme", "http") == "http"
    assert job["authorization"] == {"type": "Bearer",
                                    "credentials_file": "/etc/prometheus/orproxy_access_key"}
    # the key itself is never in the config
    assert not {"bearer_token", "basic_auth", "credentials"} & set(job)
    assert "credentials" not in job["authorization"]
    [static] = job["static_configs"]
    for target in static["targets"]:
        host, _, port = target.rpartition(":")
        assert host and port.isdigit(), target


@pytest.mark.anyio
async def test_prometheus_example_works_against_a_live_proxy(
    proxy: App, fake: FakeOpenRouter, tmp_path: Path,
) -> None:
    """Scrape as Prometheus would with this job: its path, its Authorization built from the
    credentials file (Prometheus trims the file's whitespace), its Accept header."""
    job = scrape_job()
    await traffic(proxy, fake)
    key_file = tmp_path / "orproxy_access_key"
    key_file.write_text(ACCESS_KEY + "\n")
    auth = job["authorization"]
    header = (b"Authorization", f"{auth['type']} {key_file.read_text().strip()}".encode())
    accept = (b"Accept", b"application/openmetrics-text;version=1.0.0,application/"
              b"openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
    path = job["metrics_path"].encode()
    refused = await get(proxy.port, path, [accept])
    assert refused.status == 401
    resp = await get(proxy.port, path, [header, accept])
    assert resp.status == 200
    ctype = resp.header(b"content-type")
    assert ctype is not None and ctype.startswith(b"application/openmetrics-text")
    families = {f.name for f in openmetrics_families(resp.body.decode())}  # type: ignore[no-untyped-call]
    used = {family_of(name, families) for _, expr in queries(dashboard())
            for name in METRIC.findall(STRING.sub('""', expr))}
    assert used <= families, used - families


def family_of(name: str, families: set[str]) -> str:
    """The OpenMetrics family a sample name belongs to."""
    for part in HISTOGRAM_PARTS:
        if name.endswith(part) and name.removesuffix(part) in families:
            return name.removesuffix(part)
    return name.removesuffix("_total")
