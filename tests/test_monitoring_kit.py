"""The monitoring kit (docs/monitoring/): every metric its alert rules and dashboard name exists on
a live cluster's /metrics, promtool accepts its files, each alert fires on the series it watches,
and the gauges the alerts read (peers, plan, KV, memory) tell the truth on a real two-peer cluster."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO, live_smol_cluster

yaml = pytest.importorskip("yaml", reason="pyyaml reads docs/monitoring/ (pip install -e .[test])")

KIT = REPO / "docs" / "monitoring"
GRPC_PORTS, GATEWAY_PORTS = (7841, 7842), (8841, 8842)
METRIC_NAME = re.compile(r"\bp2pllm_[a-zA-Z0-9_]+")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is missing (scripts/test-deps.sh installs "
                                                              "Debian's prometheus package)")


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load((KIT / "alerts.yml").read_text())["groups"] for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads((KIT / "grafana-dashboard.json").read_text())


def dashboard_queries() -> list[str]:
    d = dashboard()
    queries = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    return queries + [v["definition"] for v in d["templating"]["list"] if v["type"] == "query"]


def names_in(queries: list[str]) -> set[str]:
    return {name for q in queries for name in METRIC_NAME.findall(q)}


def series_names(text: str) -> set[str]:
    """The names PromQL can select: a counter family `x` is exposed as `x_total` (and `x_created`),
    a histogram as `x_bucket`, `x_sum`, `x_count`; the parser's family names drop those suffixes."""
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def gauges(text: str) -> dict[str, float]:
    return {s.name: s.value for f in text_string_to_metric_families(text) if f.type == "gauge"
            for s in f.samples if not s.labels}


# ---------------------------------------------------------------------------------------- the files


def test_alert_rules_have_the_shape_prometheus_loads():
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {"P2pllmPeerDown", "P2pllmPeerLost", "P2pllmNoPlan",
                                           "P2pllmQueueDepthHigh", "P2pllmErrorRateHigh", "P2pllmKVMemoryHigh"}
    for rule in rules:
        assert rule["expr"].strip() and rule["labels"]["severity"] in ("warning", "critical"), rule
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule
    config = yaml.safe_load((KIT / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    [job] = config["scrape_configs"]
    assert job["job_name"] == "p2pllm" and job["metrics_path"] == "/metrics"
    assert all(t.endswith(":8700") for c in job["static_configs"] for t in c["targets"])


def test_dashboard_is_grafana_json_with_a_datasource_variable_and_queries_in_every_panel():
    d = dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = [p for p in d["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in d["panels"]}) == len(d["panels"])
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"] and all(t["expr"].strip() and t["refId"] for t in p["targets"]), p["title"]
    titles = " ".join(p["title"] for p in panels).lower()
    for wanted in ("tokens/s", "time to first token", "inter-token", "queued", "kv", "memory", "peers live",
                   "epoch", "status", "backends"):
        assert wanted in titles, wanted


@needs_promtool
def test_promtool_accepts_the_rules_and_the_scrape_config():
    for args in (["check", "rules", "alerts.yml"], ["check", "config", "prometheus.yml"]):
        proc = subprocess.run([PROMTOOL, *args], cwd=KIT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "SUCCESS" in proc.stdout + proc.stderr


# each case: input series (1-minute samples), when to evaluate, the alerts expected then (labels
# beside alertname and severity, and what `$value` renders as in the annotations)
CLUSTER = {"job": "p2pllm", "cluster": "lab"}
ALERT_CASES = {
    "P2pllmPeerDown": (
        {'up{job="p2pllm", cluster="lab", instance="a:8700"}': "1 1 0x10",
         'up{job="p2pllm", cluster="lab", instance="b:8700"}': "1x12"},
        "5m", [({**CLUSTER, "instance": "a:8700"}, "0")]),
    # lost for two minutes, then forgotten: the drop in live peers keeps the alert up
    "P2pllmPeerLost": (
        {'p2pllm_engine_peers_lost{job="p2pllm", cluster="lab", instance="a:8700"}': "0x5 1 1 0x18",
         'p2pllm_engine_peers_lost{job="p2pllm", cluster="lab", instance="b:8700"}': "0x5 1 1 0x18",
         'p2pllm_engine_peers_live{job="p2pllm", cluster="lab", instance="a:8700"}': "3x5 2x20",
         'p2pllm_engine_peers_live{job="p2pllm", cluster="lab", instance="b:8700"}': "3x5 2x20"},
        "15m", [(CLUSTER, "1")]),
    # cluster "lab" has no plan anywhere; in "other" one peer still has one
    "P2pllmNoPlan": (
        {'p2pllm_engine_plan_committed{job="p2pllm", cluster="lab", instance="a:8700"}': "0x10",
         'p2pllm_engine_plan_committed{job="p2pllm", cluster="lab", instance="b:8700"}': "0x10",
         'p2pllm_engine_plan_committed{job="p2pllm", cluster="other", instance="c:8700"}': "0x10",
         'p2pllm_engine_plan_committed{job="p2pllm", cluster="other", instance="d:8700"}': "1x10"},
        "6m", [(CLUSTER, "0")]),
    "P2pllmQueueDepthHigh": (
        {'p2pllm_engine_queued_requests{job="p2pllm", cluster="lab", instance="a:8700"}': "40x10",
         'p2pllm_engine_queued_requests{job="p2pllm", cluster="lab", instance="b:8700"}': "0x10"},
        "6m", [({**CLUSTER, "instance": "a:8700"}, "40")]),
    # a: 1 of 5 completions fails; b: 503s only on /health (a load balancer probing while it loads)
    "P2pllmErrorRateHigh": (
        {'p2pllm_gateway_requests_total{job="p2pllm", cluster="lab", instance="a:8700", '
         'endpoint="/v1/chat/completions", status="200"}': "0+4x20",
         'p2pllm_gateway_requests_total{job="p2pllm", cluster="lab", instance="a:8700", '
         'endpoint="/v1/chat/completions", status="500"}': "0+1x20",
         'p2pllm_gateway_requests_total{job="p2pllm", cluster="lab", instance="b:8700", '
         'endpoint="/health", status="503"}': "0+100x20",
         'p2pllm_gateway_requests_total{job="p2pllm", cluster="lab", instance="b:8700", '
         'endpoint="/v1/completions", status="200"}': "0+1x20"},
        "15m", [({**CLUSTER, "instance": "a:8700"}, "20%")]),
    # a: 95% full; b: half full; c: holds no layers (no room, no KV)
    "P2pllmKVMemoryHigh": (
        {'p2pllm_engine_kv_bytes{job="p2pllm", cluster="lab", instance="a:8700"}': "95x10",
         'p2pllm_engine_kv_capacity_bytes{job="p2pllm", cluster="lab", instance="a:8700"}': "100x10",
         'p2pllm_engine_kv_bytes{job="p2pllm", cluster="lab", instance="b:8700"}': "50x10",
         'p2pllm_engine_kv_capacity_bytes{job="p2pllm", cluster="lab", instance="b:8700"}': "100x10",
         'p2pllm_engine_kv_bytes{job="p2pllm", cluster="lab", instance="c:8700"}': "0x10",
         'p2pllm_engine_kv_capacity_bytes{job="p2pllm", cluster="lab", instance="c:8700"}': "0x10"},
        "6m", [({**CLUSTER, "instance": "a:8700"}, "95%")]),
}


def _render(template: str, labels: dict, value: str) -> str:
    """The few template forms alerts.yml uses, as Prometheus renders them."""
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], template)
    return re.sub(r"\{\{ \$value( \| humanizePercentage)? \}\}", value, text)


@needs_promtool
@pytest.mark.parametrize("alert", sorted(ALERT_CASES))
def test_alert_fires_on_the_series_it_watches(alert, tmp_path):
    series, eval_time, expected = ALERT_CASES[alert]
    rule = next(r for r in alert_rules() if r["alert"] == alert)
    exp_alerts = []
    for labels, value in expected:
        exp_alerts.append({
            "exp_labels": {**labels, **rule["labels"]},
            "exp_annotations": {k: _render(v, labels, value) for k, v in rule["annotations"].items()},
        })
    unit_test = {
        "rule_files": [str(KIT / "alerts.yml")],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in series.items()],
            "alert_rule_test": [{"eval_time": "1m", "alertname": alert, "exp_alerts": []},  # not at once
                                {"eval_time": eval_time, "alertname": alert, "exp_alerts": exp_alerts}],
        }],
    }
    path = tmp_path / "alerts-test.yml"
    path.write_text(json.dumps(unit_test, indent=1))  # JSON is YAML
    proc = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------- the KV gauges


@pytest.mark.parametrize("backend", ["ggml", "torch"])
def test_stage_kv_memory_counts_rows_held_apart_from_what_the_cache_allocated(backend, demo_tiny_gguf):
    import torch

    from p2pllm.model.backends import open_stage
    from p2pllm.model.kvcache import KVEntries
    from p2pllm.model.spec import read_spec
    from p2pllm.runtime.stage import Stage

    spec = read_spec(demo_tiny_gguf)
    stage = Stage(open_stage(demo_tiny_gguf, 0, spec.n_layers, spec=spec, backend=backend, kv_dtype="f16"))
    per_position = 2 * spec.n_layers * spec.n_kv_heads * spec.head_dim * 2  # k and v rows of f16
    assert stage.kv_memory()[0] == 0
    stage.begin(1, 64)
    rows = torch.zeros((spec.n_layers, 2, 10, per_position // (2 * spec.n_layers)), dtype=torch.uint8)
    stage.kv.import_entries(KVEntries(1, 0, rows, stage.kv.format))
    held, allocated = stage.kv_memory()
    assert held == 10 * per_position
    if backend == "torch":
        assert allocated >= 64 * per_position  # a buffer sized for the 64 positions reserved
    else:  # the ggml pool's memory is committed as cells are written: 10, of 256 reserved cells
        assert held <= allocated < 64 * per_position and stage.kv.capacity_bytes() >= 64 * per_position
    stage.keep(1)  # the prefix cache's copy of exactly its rows
    assert stage.kv_memory()[0] == 10 * per_position
    stage.free(1)
    assert stage.kv_memory()[0] == 0
    stage.close()


# ---------------------------------------------------------------------------------------- a live cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two `p2pllm join` daemons on SmolLM2, half the layers each; yields their processes once both
    gateways serve the two-stage plan and each has answered one completion."""
    logs = tmp_path_factory.mktemp("monitoring-cluster")
    for live in live_smol_cluster(logs, "monitoring", (*GRPC_PORTS, *GATEWAY_PORTS)):
        for port in GATEWAY_PORTS:  # counters and histograms get series; each gateway routes one
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                           json={"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
        yield live.procs


def _health(port: int) -> dict:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return {}


def scrape(port: int) -> str:
    r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert r.status_code == 200
    return r.text


def test_every_metric_the_alerts_name_exists_on_every_peer(cluster):
    wanted = names_in([r["expr"] for r in alert_rules()])
    assert {"p2pllm_engine_peers_lost", "p2pllm_engine_plan_committed", "p2pllm_engine_queued_requests",
            "p2pllm_gateway_requests_total", "p2pllm_engine_kv_bytes", "p2pllm_engine_kv_capacity_bytes"} <= wanted
    for port in GATEWAY_PORTS:
        missing = wanted - series_names(scrape(port))
        assert not missing, f"alerts.yml names {sorted(missing)}, absent from the peer on :{port}"


def test_every_metric_the_dashboard_names_exists_on_the_cluster(cluster):
    """Some series live only on the head (the prefix cache's), so: on one peer or the other."""
    wanted = names_in(dashboard_queries())
    assert {"p2pllm_gateway_completion_tokens_total", "p2pllm_gateway_time_to_first_token_seconds_bucket",
            "p2pllm_gateway_inter_token_latency_seconds_bucket", "p2pllm_engine_peers_live"} <= wanted
    exposed = set().union(*(series_names(scrape(port)) for port in GATEWAY_PORTS))
    missing = wanted - exposed
    assert not missing, f"grafana-dashboard.json names {sorted(missing)}, absent from the live cluster"


def test_health_gauges_are_each_peers_own_view(cluster):
    for port in GATEWAY_PORTS:
        g = gauges(scrape(port))
        assert (g["p2pllm_engine_peers_known"], g["p2pllm_engine_peers_live"], g["p2pllm_engine_peers_lost"],
                g["p2pllm_engine_peers_excluded"]) == (2, 2, 0, 0), port
        assert (g["p2pllm_engine_plan_committed"], g["p2pllm_engine_serving"], g["p2pllm_engine_stages"]) == (1, 1, 2)
        assert g["p2pllm_engine_plan_epoch"] >= 1
        # each peer holds half the layers: room for KV beside its weights, within its memory
        assert 0 < g["p2pllm_engine_kv_capacity_bytes"] < g["p2pllm_engine_memory_limit_bytes"]
        assert 0 <= g["p2pllm_engine_kv_bytes"] <= g["p2pllm_engine_kv_allocated_bytes"]
        assert g["p2pllm_engine_kv_bytes"] <= g["p2pllm_engine_kv_capacity_bytes"]
        # a 135M model: tens of MiB of weights, some hundred MiB of interpreter and torch
        assert 50 * 2**20 < g["p2pllm_engine_memory_used_bytes"] < g["p2pllm_engine_memory_limit_bytes"]


def test_kv_bytes_count_the_positions_a_running_stream_holds_on_every_stage(cluster):
    body = {"prompt": "Once upon a time, in a land far away, there lived a", "max_tokens": 200, "stream": True,
            "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", f"http://127.0.0.1:{GATEWAY_PORTS[0]}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        lines, chunks = r.iter_lines(), 0  # (a dropped iterator closes the connection: the request ends)
        while chunks < 4:
            chunks += next(lines).startswith("data: {")
        during = [gauges(scrape(port)) for port in GATEWAY_PORTS]
    assert sum(g["p2pllm_engine_running_requests"] for g in during) == 1  # only the head counts it
    for g in during:
        assert 0 < g["p2pllm_engine_kv_bytes"] <= g["p2pllm_engine_kv_allocated_bytes"]
        assert g["p2pllm_engine_kv_bytes"] < g["p2pllm_engine_kv_capacity_bytes"]


def test_a_killed_peer_shows_as_lost_on_the_survivor(cluster):
    """Last in this module: it takes the cluster down to one peer."""
    survivor = GATEWAY_PORTS[0]
    os.killpg(cluster[1].pid, 9)  # no goodbye: the survivor notices by silence
    cluster[1].wait(10)
    deadline, g = time.monotonic() + 30, {}
    while time.monotonic() < deadline:
        g = gauges(scrape(survivor))
        if g.get("p2pllm_engine_peers_lost") == 1 and g.get("p2pllm_engine_stages") == 1:
            break
        time.sleep(0.5)
    assert (g["p2pllm_engine_peers_known"], g["p2pllm_engine_peers_live"], g["p2pllm_engine_peers_lost"]) == (2, 1, 1)
    assert (g["p2pllm_engine_plan_committed"], g["p2pllm_engine_stages"]) == (1, 1), g  # replanned alone
