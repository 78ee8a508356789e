"""The gateway's Prometheus registry: request counters, token latencies, the engine's own numbers.

Each app has its own registry, so several gateways in one process (tests) do not share counts.
"""

from __future__ import annotations

import logging
import re

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from ..runtime.api import Engine

log = logging.getLogger(__name__)

ENDPOINTS = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/health", "/metrics",
             "/api/chat", "/api/generate", "/api/show", "/api/tags", "/api/ps", "/api/version")  # Ollama's
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


def endpoint_label(path: str) -> str:
    """The route a path belongs to, so that made-up paths cannot grow the label set."""
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


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
            if _is_number(value):
                yield GaugeMetricFamily(name, f"Engine statistic {key!r}.", value=value)
            elif isinstance(value, dict):
                family = GaugeMetricFamily(name, f"Engine statistic {key!r}, by key.", labels=["key"])
                for k, v in sorted(value.items(), key=lambda kv: str(kv[0])):
                    if _is_number(v):
                        family.add_metric([str(k)], v)
                yield family


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
