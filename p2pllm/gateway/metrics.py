"""The gateway's Prometheus registry: request counters, token latencies, the engine's own numbers.

Each app has its own registry, so several gateways in one process (tests) do not share counts.
"""

from __future__ import annotations

import logging
import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..runtime.api import Engine

log = logging.getLogger(__name__)

ENDPOINTS = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings",
             "/health", "/metrics",
             "/api/chat", "/api/generate", "/api/show", "/api/tags", "/api/ps", "/api/version",  # Ollama's
             "/", "/v1/cluster", "/v1/cluster/events", "/v1/peers", "/v1/history")  # the dashboard's
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class GatewayMetrics:
    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("p2pllm_gateway_requests", "HTTP requests answered, by endpoint and status.",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("p2pllm_gateway_prompt_tokens", "Prompt tokens of accepted requests.", registry=r)
        self.completion_tokens = Counter("p2pllm_gateway_completion_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram("p2pllm_gateway_time_to_first_token_seconds",
                              "From the request's arrival to its first generated token.", buckets=_TTFT_BUCKETS,
                              registry=r)
        self.itl = Histogram("p2pllm_gateway_inter_token_latency_seconds",
                             "Time between two consecutive tokens of one request.", buckets=_ITL_BUCKETS, registry=r)
        r.register(_EngineCollector(engine))

    def track_response_cache(self, cache) -> None:
        """The response cache's counters, and its size read at scrape time (gateway/caching.py)."""
        r = self.registry
        self.cache_hits = Counter("p2pllm_gateway_response_cache_hits", "Answers served from the response cache, "
                                  "by match (exact or semantic).", ["kind"], registry=r)
        for kind in ("exact", "semantic"):
            self.cache_hits.labels(kind)
        self.cache_misses = Counter("p2pllm_gateway_response_cache_misses",
                                    "Cacheable requests the response cache did not have.", registry=r)
        self.cache_bypassed = Counter("p2pllm_gateway_response_cache_bypassed", "Requests the response cache "
                                      "does not take (temperature above 0 and no seed).", registry=r)
        self.cache_evictions = Counter("p2pllm_gateway_response_cache_evictions", "Answers dropped from the "
                                       "response cache: lru (its bounds) or expired (its TTL).", ["reason"],
                                       registry=r)
        for reason in ("lru", "expired"):
            self.cache_evictions.labels(reason)
        Gauge("p2pllm_gateway_response_cache_entries", "Answers in the response cache.",
              registry=r).set_function(lambda: cache.size()[0])
        Gauge("p2pllm_gateway_response_cache_bytes", "Estimated bytes of the answers in the response cache.",
              registry=r).set_function(lambda: cache.size()[1])

    def track_routes(self, rows) -> None:
        """Where completions went (the ring or an external backend, gateway/routing.py), and each one's
        health and requests in flight read at scrape time from `rows()`."""
        self.routed = Counter("p2pllm_gateway_routed_requests", "Completions by target (ring or a backend id) and "
                              "outcome: served, failed (before the first token; tried elsewhere) or broken (after "
                              "it).", ["backend", "outcome"], registry=self.registry)
        self.registry.register(_RoutesCollector(rows))


def endpoint_label(path: str) -> str:
    """The route a path belongs to, so that made-up paths cannot grow the label set."""
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    if path.startswith("/v1/peers/"):
        return "/v1/peers/{name}/{action}"
    if path.startswith("/dashboard/"):
        return "/dashboard/{file}"
    return "other"


# the engine's statistics that only grow (a restarted daemon or a new head starts them again at 0,
# which rate() reads as a counter reset); the rest are levels, exported as gauges
ENGINE_COUNTERS = frozenset({"tokens_generated", "stage_compute_seconds", "stage_frames", "ring_bytes_sent",
                             "kv_replica_bytes_sent", "prefix_cache_hits", "prefix_cache_misses",
                             "prefix_cache_reused_tokens"})


class _EngineCollector:
    """Queue depth, running sequences and the engine's own numbers, read at scrape time."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def describe(self):
        return []

    def collect(self):
        try:
            stats = self.engine.stats()
        except Exception:  # a scrape must not fail because the engine is between plans
            log.debug("engine stats unavailable for /metrics", exc_info=True)
            return
        for name, doc, value in (
            ("p2pllm_engine_queued_requests", "Requests waiting for admission.", stats.queued),
            ("p2pllm_engine_running_requests", "Sequences being generated.", stats.running),
            ("p2pllm_engine_stages", "Pipeline stages in the current plan.", stats.stages),
            ("p2pllm_engine_plan_epoch", "Epoch of the plan being served.", stats.epoch),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        for key, value in sorted((stats.extra or {}).items()):
            name = "p2pllm_engine_" + re.sub(r"[^a-zA-Z0-9_]", "_", str(key))
            if _is_number(value) and key in ENGINE_COUNTERS:  # exposed as NAME_total, for rate()
                yield CounterMetricFamily(name, f"Engine statistic {key!r} (since the engine started).", value=value)
            elif _is_number(value):
                yield GaugeMetricFamily(name, f"Engine statistic {key!r}.", value=value)
            elif isinstance(value, dict):
                family = GaugeMetricFamily(name, f"Engine statistic {key!r}, by key.", labels=["key"])
                for k, v in sorted(value.items(), key=lambda kv: str(kv[0])):
                    if _is_number(v):
                        family.add_metric([str(k)], v)
                yield family


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _RoutesCollector:
    """The ring's and each backend's health, requests in flight and limit, read at scrape time."""

    def __init__(self, rows):
        self.rows = rows

    def describe(self):
        return []

    def collect(self):
        families = [
            (GaugeMetricFamily("p2pllm_backend_up", "1 while a target is in rotation (the ring: while it can "
                               "serve).", labels=["backend"]), lambda r: 1 if r["healthy"] else 0),
            (GaugeMetricFamily("p2pllm_backend_in_flight", "Requests in flight on a target.", labels=["backend"]),
             lambda r: r["in_flight"]),
            (GaugeMetricFamily("p2pllm_backend_max_concurrent", "Requests a target is given at most at once (the "
                               "ring queues beyond it).", labels=["backend"]), lambda r: r["max_concurrent"]),
        ]
        rows = self.rows()
        for family, value in families:
            for row in rows:
                family.add_metric([row["id"]], value(row))
            yield family
