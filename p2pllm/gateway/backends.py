"""External OpenAI-compatible servers (LM Studio, Ollama's /v1, llama-server, vLLM) serving the
same model as the ring: their configuration (`--backend URL[,key=value...]`, `--workers FILE.json`),
their health, and how busy each one is. Which of them serves a request is `routing.py`'s decision;
talking to one is `proxy.py`'s.

A backend is in rotation while its last health check (GET {url}/v1/models) passed and no request
has failed on it since; a failing one is re-checked every interval and comes back when it answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from ..errors import UsageError

log = logging.getLogger(__name__)

# the port each kind of server listens on by default, for a URL or worker that names none
TYPES = {"openai": None, "lm_studio": 1234, "ollama": 11434, "llama_server": 8080, "vllm": 8000}
CHECK_SECONDS = 30.0  # between health checks; P2PLLM_BACKEND_CHECK_SECONDS overrides it (tests)
CHECK_TIMEOUT = 5.0
RESERVED_IDS = ("ring",)  # the label the ring has in metrics, headers and status
_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,64}$")
_SPEC_KEYS = ("max_concurrent", "type", "model", "id", "api_key")
_WORKER_KEYS = {"id", "host", "port", "url", "type", "model", "max_concurrent_requests", "max_concurrent",
                "api_key"}


@dataclass(frozen=True)
class BackendConfig:
    """One external server: where it is and how much it may be given at once."""

    id: str
    url: str  # scheme://host:port[/prefix], without a trailing /v1
    type: str = "openai"
    model: str | None = None  # the model name to ask it for; None: learned from its /v1/models
    max_concurrent: int = 1  # requests in flight on it at most (its parallel slots)
    api_key: str | None = None


# --------------------------------------------------------------------------- configuration


def parse_backend_spec(text: str) -> BackendConfig:
    """`URL[,max_concurrent=N][,type=T][,model=NAME][,id=ID][,api_key=KEY]`, or a UsageError."""
    url, *options = [part.strip() for part in text.split(",")]
    if "://" not in url and not re.match(r"^[^:/]+:\d+(/|$)|^\[[0-9a-fA-F:]+\]:\d+(/|$)", url):
        raise UsageError(f"--backend {text}: expected auto, ggml, torch, or an OpenAI-compatible server's URL "
                         f"(http://HOST:PORT[,max_concurrent=N])")
    fields: dict[str, str] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in _SPEC_KEYS or not value:
            raise UsageError(f"--backend {text}: expected URL[,max_concurrent=N][,type=T][,model=NAME][,id=ID], "
                             f"got {option!r}")
        fields[key] = value
    where = f"--backend {text}"
    limit = fields.get("max_concurrent", "1")
    if not limit.isdigit() or int(limit) < 1:
        raise UsageError(f"{where}: max_concurrent must be a whole number of at least 1, got {limit!r}")
    return _config(where, url, fields.get("type", "openai"), fields.get("model"), int(limit), fields.get("id"),
                   fields.get("api_key"))


def load_workers(path: str) -> list[BackendConfig]:
    """The backends of a workers file: a JSON list (or {"workers": [...]}) of objects with `id`, `host`,
    `port` (or `url`), `type`, `model`, `max_concurrent_requests`; a UsageError names what is wrong."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"--workers {path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise UsageError(f"--workers {path}: not valid JSON ({e})") from None
    if isinstance(data, dict) and set(data) == {"workers"}:
        data = data["workers"]
    if not isinstance(data, list) or not data:
        raise UsageError(f"--workers {path}: expected a non-empty JSON list of workers")
    return [_worker(path, i, w) for i, w in enumerate(data)]


def _worker(path: str, index: int, w: object) -> BackendConfig:
    where = f"--workers {path}: worker {index}"
    if not isinstance(w, dict):
        raise UsageError(f"{where}: expected an object")
    unknown = sorted(set(w) - _WORKER_KEYS)
    if unknown:
        raise UsageError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(_WORKER_KEYS))})")
    for key in ("id", "host", "url", "type", "model", "api_key"):
        if key in w and not (isinstance(w[key], str) and w[key]):
            raise UsageError(f"{where}: {key!r} must be a non-empty string")
    limit = w.get("max_concurrent_requests", w.get("max_concurrent", 1))
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise UsageError(f"{where}: 'max_concurrent_requests' must be a whole number of at least 1, got {limit!r}")
    if "url" in w:
        url = w["url"]
    elif "host" in w:
        port = w.get("port")
        if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
            raise UsageError(f"{where}: 'port' must be a port number, got {port!r}")
        host = f"[{w['host']}]" if ":" in w["host"] else w["host"]
        url = host if port is None else f"{host}:{port}"
    else:
        raise UsageError(f"{where}: give 'host' (and 'port') or 'url'")
    return _config(where, url, w.get("type", "openai"), w.get("model"), limit, w.get("id"), w.get("api_key"))


def _config(where: str, url: str, kind: str, model: str | None, limit: int, id: str | None,
            api_key: str | None) -> BackendConfig:
    if kind not in TYPES:
        raise UsageError(f"{where}: type must be one of {', '.join(TYPES)}, got {kind!r}")
    base = _base_url(where, url, TYPES[kind])
    id = id or urlsplit(base).netloc
    if not _ID_RE.match(id) or id in RESERVED_IDS:
        raise UsageError(f"{where}: id {id!r} must be 1-64 letters, digits or ._:- and not {RESERVED_IDS[0]!r}")
    return BackendConfig(id=id, url=base, type=kind, model=model, max_concurrent=limit, api_key=api_key)


def _base_url(where: str, url: str, default_port: int | None) -> str:
    """http(s)://host[:port][/prefix] without /v1 (Ollama's own docs give .../v1; users paste either)."""
    if not url:
        raise UsageError(f"{where}: the URL is missing")
    if "://" not in url:
        url = "http://" + url
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise UsageError(f"{where}: {url!r} is not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{where}: expected an http:// or https:// URL with a host, got {url!r}")
    if parts.query or parts.fragment:
        raise UsageError(f"{where}: the URL may not have a query or fragment, got {url!r}")
    netloc = parts.netloc
    if port is None and default_port is not None:
        netloc = f"{netloc}:{default_port}"
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[:-3]
    return f"{parts.scheme}://{netloc}{path}"


def check_unique(configs: list[BackendConfig]) -> list[BackendConfig]:
    seen: set[str] = set()
    for c in configs:
        if c.id in seen:
            raise UsageError(f"two backends have the id {c.id!r}; give each its own (id=NAME)")
        seen.add(c.id)
    return configs


# --------------------------------------------------------------------------- state


class Backend:
    """One backend's live state: in rotation or not (and why), requests in flight, counts."""

    def __init__(self, config: BackendConfig):
        self.config = config
        self.healthy: bool | None = None  # None: not checked yet (not in rotation)
        self.reason = "not checked yet"
        self.model: str | None = config.model  # what requests to it name
        self.in_flight = 0
        self.served = 0  # requests it started answering
        self.failed = 0  # requests that failed on it (before or after their first token)

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def free(self) -> int:
        return self.config.max_concurrent - self.in_flight if self.healthy else 0

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}

    def mark_down(self, reason: str) -> None:
        if self.healthy is not False or reason != self.reason:
            log.warning("backend %s (%s) is out of rotation: %s", self.id, self.config.url, reason)
        self.healthy, self.reason = False, reason

    def mark_up(self, model: str) -> None:
        if self.healthy is not True:
            log.info("backend %s (%s) is in rotation, serving %s", self.id, self.config.url, model)
        self.healthy, self.reason, self.model = True, "", model

    def snapshot(self) -> dict:
        c = self.config
        return {"id": c.id, "url": c.url, "type": c.type, "model": self.model, "healthy": self.healthy,
                "reason": self.reason or None, "in_flight": self.in_flight, "max_concurrent": c.max_concurrent,
                "served": self.served, "failed": self.failed}


class BackendPool:
    """The backends of this peer's gateway and the loop that health-checks them."""

    def __init__(self, configs: list[BackendConfig], our_model: str, *, check_seconds: float | None = None):
        self.backends = [Backend(c) for c in check_unique(list(configs))]
        self.our_model = our_model
        self.check_seconds = check_seconds or (_env_seconds("P2PLLM_BACKEND_CHECK_SECONDS", CHECK_SECONDS)
                                               if self.backends else CHECK_SECONDS)
        self.client: httpx.AsyncClient | None = None
        self._task: asyncio.Task | None = None

    def __bool__(self) -> bool:
        return bool(self.backends)

    def in_flight(self) -> int:
        """Requests this gateway has on its backends now."""
        return sum(b.in_flight for b in self.backends)

    async def start(self) -> None:
        """Check every backend once (so the gateway starts knowing which are up), then keep checking."""
        if not self.backends or self.client is not None:
            return
        # no pool limit: each backend's own max_concurrent bounds what we open to it; no proxy from the
        # environment: backends are usually on this machine or the LAN, where a proxy only gets in the way
        self.client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
                                        trust_env=False)
        await self.check_all()
        self._task = asyncio.create_task(self._loop(), name="backend-checks")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.check_seconds)
            await self.check_all()

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(b) for b in self.backends))

    async def check(self, backend: Backend) -> None:
        """GET /v1/models: up when it answers with a list naming the model we will ask it for."""
        assert self.client is not None
        try:
            reply = await self.client.get(backend.config.url + "/v1/models", headers=backend.headers(),
                                          timeout=CHECK_TIMEOUT)
        except httpx.HTTPError as e:
            backend.mark_down(f"health check failed: {describe(e)}")
            return
        if reply.status_code != 200:
            backend.mark_down(f"health check: /v1/models answered HTTP {reply.status_code}")
            return
        try:
            names = [m["id"] for m in reply.json()["data"] if isinstance(m.get("id"), str)]
        except (ValueError, KeyError, TypeError, AttributeError):
            backend.mark_down("health check: /v1/models is not an OpenAI model list")
            return
        model, problem = self._model_for(backend, names)
        if problem:
            backend.mark_down(problem)
        else:
            backend.mark_up(model)

    def _model_for(self, backend: Backend, names: list[str]) -> tuple[str, str]:
        """The model to ask `backend` for, or why none fits: the configured one must be listed; without
        one, ours where listed, else the only one it serves."""
        wanted = backend.config.model
        if wanted is not None:
            if wanted in names or not names:  # an empty list: servers that load on demand list nothing
                return wanted, ""
            return "", f"it does not list model {wanted!r} (it lists {_some(names)})"
        if self.our_model in names:
            return self.our_model, ""
        if len(names) == 1:
            return names[0], ""
        return "", (f"it lists {_some(names)}, none named {self.our_model!r}; say which one serves this model "
                    f"with model=NAME")

    def rows(self) -> list[dict]:
        return [b.snapshot() for b in self.backends]


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 3600:
        raise UsageError(f"{name} must be a number of seconds between 0 and 3600, got {text!r}")
    return value


def describe(e: BaseException) -> str:
    """An httpx error in a few words (its str() is often empty)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    kind = {httpx.ConnectError: "connection failed", httpx.ConnectTimeout: "connection timed out",
            httpx.ReadTimeout: "timed out waiting for it", httpx.RemoteProtocolError: "it closed the connection"}
    name = next((v for k, v in kind.items() if isinstance(e, k)), type(e).__name__)
    return f"{name} ({text})" if text and text not in name else name


def _some(names: list[str], n: int = 3) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return (shown + f" and {len(names) - n} more") if len(names) > n else (shown or "no models")
