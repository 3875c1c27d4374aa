"""deploy/: the Grafana dashboard, the alerting rules and the KEDA trigger ask only for metrics, labels
and label values that Conveyor's /metrics shows."""

from __future__ import annotations

import collections
import re
from pathlib import Path

import orjson
import yaml

from conveyor.backends import BLOB_MAX_AGE
from conveyor.log.claim_check import blob_name
from tests.conftest import NodeFactory

DEPLOY = Path(__file__).parents[2] / "deploy"
METRIC = re.compile(r"\b((?:conveyor|process)_[a-z_]+)\b(?:\{([^}]*)\})?")
GROUPING = re.compile(r"\bby \(([^)]*)\)")
SAMPLE = re.compile(r"^((?:conveyor|process)_[a-z_]+)(?:\{([^}]*)\})? ")
# Labels a series has only on some backends (Kafka's partitions), or that Prometheus adds to every
# series it scrapes.
OPTIONAL = {"partition", "instance", "job"}


def queries() -> list[str]:
    dashboard = orjson.loads((DEPLOY / "grafana" / "conveyor.json").read_bytes())
    found = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    found += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    scaler = yaml.safe_load((DEPLOY / "kubernetes" / "keda-generate.yaml").read_text())
    found += [trigger["metadata"]["query"] for trigger in scaler["spec"]["triggers"]]
    return found


def test_every_alert_says_what_and_how_bad() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for rule in (rule for group in rules["groups"] for rule in group["rules"]):
        assert rule["alert"].startswith("Conveyor")
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]


def test_the_buckets_lifecycle_rule_expires_event_payloads_with_the_log() -> None:
    (rule,) = orjson.loads((DEPLOY / "s3" / "lifecycle.json").read_bytes())["Rules"]
    assert rule["Status"] == "Enabled"
    assert rule["Expiration"]["Days"] * 86_400 == BLOB_MAX_AGE
    # The blob URL s3://BUCKET/conveyor puts each payload at conveyor/events/<event id>.
    assert rule["Filter"]["Prefix"] == "conveyor/" + blob_name("")


async def test_what_deploy_asks_for_is_what_metrics_shows(node: NodeFactory) -> None:
    async with node() as http:
        done = await http.post("/v1/requests", params={"wait": 30}, json={"prompt": "hi"})
        assert done.json()["status"] == "completed"
        refused = await http.post("/v1/requests", json={"prompt": "hi", "model": "nobody"})
        assert refused.status_code == 404  # a refusal, counted by its code
        page = (await http.get("/metrics")).text
    declared = set(re.findall(r"^# TYPE (\S+) (\S+)", page, re.MULTILINE))
    kinds = dict(declared)
    labels: dict[str, set[str]] = collections.defaultdict(set)  # metric -> its label names
    values: set[tuple[str, str, str]] = set()  # (metric, label, value)
    for line in page.splitlines():
        if found := SAMPLE.match(line):
            name = (
                re.sub(r"_(bucket|sum|count)$", "", found.group(1))
                if found.group(1) not in kinds
                else found.group(1)
            )
            for label, value in re.findall(r'(\w+)="([^"]*)"', found.group(2) or ""):
                labels[name].add(label)
                values.add((name, label, value))
    checked = 0
    for query in queries():
        used = [(m, re.sub(r"_bucket$", "", m), selector) for m, selector in METRIC.findall(query)]
        grouped = {label.strip() for by in GROUPING.findall(query) for label in by.split(",")} - {"le"}
        for metric, base, selector in used:
            assert base in kinds, f"{metric} in {query!r} is not a metric Conveyor exports"
            assert metric == base or kinds[base] == "histogram", f"{metric}: {base} is no histogram"
            for label, value in re.findall(r'(\w+)="([^"]*)"', selector):
                assert (base, label, value) in values, f"no {base} series has {label}={value!r}"
        # Each label a query groups by is one of the series it reads (if this run made any).
        shown = set().union(*(labels[base] for _, base, _ in used)) | OPTIONAL
        if any(labels[base] for _, base, _ in used):
            assert grouped <= shown, f"{query!r} groups by {grouped - shown}, which its series lack"
            checked += 1
    assert checked >= 10  # most queries read series this run made
