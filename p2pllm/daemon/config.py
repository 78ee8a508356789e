"""What one peer is told (DaemonConfig), and what is made of it before any work: the cluster
secret's security, the compute threads, the request history."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from ..cluster.fetch import BUSY_SERVE_RATE
from ..errors import P2PError
from ..transport.security import Security


@dataclass
class DaemonConfig:
    model: str
    port: int = 7700
    gateway_port: int = 8700
    gateway_host: str = "127.0.0.1"
    name: str = field(default_factory=socket.gethostname)
    cluster: str = "default"
    peers: list[str] = field(default_factory=list)
    mdns: bool = True
    interface: str | None = None
    device: str = "cpu"
    backend: str = "auto"  # auto | ggml | torch (model.backends.choose_backend)
    kv_dtype: str | None = None  # None: f16 on ggml stages, the compute dtype on torch stages
    max_memory: int | None = None
    threads: int | None = None
    micro_batches: int | None = None
    kv_replicas: int = 1
    peer_timeout: float = 2.0
    strategy: str = "optimal"
    objective: str = "latency"
    context: int | None = None
    batch: int = 8
    prefix_cache: int | None = None  # KV positions for the head's prefix cache; None: one context, 0: off
    hysteresis: float = 0.10
    reprobe: bool = False
    wire_dtype: str | None = None  # activations on the wire: None = the compute dtype (exact)
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()  # browser origins besides the gateway's own and loopback (gateway/origins.py)
    allowed_hosts: tuple[str, ...] = ()  # Host names a loopback-bound gateway answers besides local ones
    response_cache: object | None = None  # a gateway.response_cache.CacheSettings; None: off (join: on)
    secret: str | None = None  # the cluster secret (mutual TLS between peers); None needs insecure=True
    insecure: bool = False
    backends: list = field(default_factory=list)  # gateway.backends.BackendConfig: external servers of this gateway
    fetch_from: list[str] = field(default_factory=list)  # --from-peers: `model` is a partial copy; its sources
    model_cache: str | None = None  # where that copy lives (None: model.pieces.default_cache_root())
    fetch_serve_rate: float = BUSY_SERVE_RATE  # bytes/s served to fetching peers while requests run here; 0: no cap
    state_dir: str | None = None  # None: gateway.history.default_state_dir(cluster)
    history: str = "off"  # request history of this gateway: off | meta | full (join: meta)
    history_rows: int = 10_000
    tokenizer: object | None = None  # the model's tokenizer, when the caller loaded it already (join: to check it
    # before it makes a secret); None: loaded from `model`


def _security(cfg: DaemonConfig) -> Security:
    if cfg.secret:
        return Security.from_secret(cfg.secret)
    if not cfg.insecure:
        raise P2PError("no cluster secret: give one (DaemonConfig.secret, --secret) or opt out with insecure=True")
    return Security.insecure()


def _set_compute_threads(threads: int | None) -> int:
    """Leave one core to the event loop and gRPC: torch's spinning worker threads competing with
    them made every hop ten times slower on a 2-core machine (measured: 31 -> 3 ms per token).
    The same count goes to ggml stages."""
    import os

    import torch

    n = threads or max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(n)
    return n


def _open_history(cfg: DaemonConfig):
    """The gateway's request history (gateway/history.py); None with --history off."""
    from ..gateway.history import RequestHistory, default_state_dir

    return RequestHistory.open(cfg.state_dir or default_state_dir(cfg.cluster), cfg.history, cfg.history_rows,
                               port=cfg.port)
