"""A web page from another site, or a DNS-rebinding name, gets nothing from the gateway; the
dashboard, local tools and clients that are not browsers are unaffected (gateway/origins.py).
Real HTTP against an in-process gateway; the headers are what a browser sends."""

from __future__ import annotations

import httpx
import pytest

from p2pllm.gateway.origins import RequestOrigins
from p2pllm.runtime.local import build_local_engine
from test_gateway import Served, _error, _serve

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def engine(loop, tmp_path_factory):
    from p2pllm.model.demo import make_demo_model

    path = make_demo_model(tmp_path_factory.mktemp("origins") / "tiny.gguf", "gguf", "tiny")
    engine = loop.run(build_local_engine(str(path)))
    yield engine
    loop.run(engine.stop())


@pytest.fixture(scope="module")
def local_only(loop, engine):
    """As `join` serves it on 127.0.0.1 (the default), with one extra origin allowed."""
    server = _serve(loop, engine, origins=RequestOrigins(("https://app.example.com",), local_only=True))
    yield Served(loop, engine, server)
    loop.run(server.stop())


def _generated(served: Served) -> float:
    """Completion tokens the gateway has answered with (its /metrics, read as a client that is not a browser)."""
    text = httpx.get(served.url + "/metrics", timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("p2pllm_gateway_completion_tokens_total"))


def test_a_page_from_another_site_is_refused_before_anything_runs(local_only):
    before = _generated(local_only)
    with httpx.Client(base_url=local_only.url, timeout=30) as http:
        # what a form-like no-cors fetch sends: no preflight, a text/plain body the gateway would read as JSON
        evil = {"origin": "https://evil.example", "content-type": "text/plain"}
        err = _error(http.post("/v1/chat/completions", content=httpx.Request("POST", "/", json=CHAT).content,
                               headers=evil), 403, code="forbidden_origin")
        assert "https://evil.example" in err["message"] and "--allowed-origin" in err["message"]
        for path in ("/v1/history", "/v1/cluster", "/metrics"):
            assert http.get(path, headers=evil).status_code == 403
        assert http.post("/v1/peers/anyone/drain", headers=evil).status_code == 403
        assert http.post("/v1/chat/completions", json=CHAT, headers={"origin": "null"}).status_code == 403
        # Ollama's API answers in its own shape
        reply = http.post("/api/chat", json={"model": "m", "messages": []}, headers=evil)
        assert reply.status_code == 403 and set(reply.json()) == {"error"}
        # a preflight from it is not granted either
        pre = http.options("/v1/chat/completions", headers={"origin": "https://evil.example",
                                                            "access-control-request-method": "POST"})
        assert "access-control-allow-origin" not in pre.headers
        assert http.get("/health", headers=evil).status_code == 200  # tells nothing
    assert _generated(local_only) == before
    with httpx.Client(base_url=local_only.url, timeout=30) as http:  # (the count does move for one that runs)
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert _generated(local_only) > before


@pytest.mark.parametrize("origin", ["SAME", "http://localhost:3000", "http://127.0.0.1:5173",
                                    "https://app.example.com"])
def test_the_dashboard_local_tools_and_allowed_sites_are_answered_and_may_read(local_only, origin):
    origin = local_only.url if origin == "SAME" else origin
    with httpx.Client(base_url=local_only.url, timeout=30) as http:
        reply = http.post("/v1/chat/completions", json=CHAT, headers={"origin": origin})
        assert reply.status_code == 200, reply.text
        if origin != local_only.url:  # cross-origin: the browser may read it
            assert reply.headers["access-control-allow-origin"] == origin
            pre = http.options("/v1/chat/completions", headers={
                "origin": origin, "access-control-request-method": "POST",
                "access-control-request-headers": "authorization, content-type"})
            assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == origin


def test_clients_that_are_not_browsers_are_unaffected(local_only):
    assert local_only.client().chat.completions.create(model=local_only.engine.model_name, **CHAT).choices[0].message.content is not None
    with httpx.Client(base_url=local_only.url, timeout=30) as http:
        assert http.get("/v1/models").status_code == 200


@pytest.mark.parametrize("host,status", [("attacker.example", 403), ("attacker.example:8700", 403),
                                         ("localhost:8700", 200), ("127.0.0.1", 200), ("[::1]:8700", 200),
                                         ("dev.localhost", 200)])
def test_a_loopback_gateway_answers_only_local_host_names(local_only, host, status):
    """DNS rebinding: attacker.example resolves to 127.0.0.1, and its page reads the answers
    (same origin for the browser); only the Host header tells it apart."""
    with httpx.Client(base_url=local_only.url, timeout=30) as http:
        reply = http.get("/v1/history", headers={"host": host})
        assert reply.status_code in ((403,) if status == 403 else (200, 404)), reply.text
        if status == 403:
            assert "--allowed-host" in reply.json()["error"]["message"]


def test_allowed_hosts_and_a_gateway_bound_to_other_addresses_answer_any_host(loop, engine):
    for origins in (RequestOrigins(allowed_hosts=("proxy.example",), local_only=True), RequestOrigins()):
        server = _serve(loop, engine, origins=origins)
        try:
            with httpx.Client(base_url=server.url, timeout=30) as http:
                assert http.get("/v1/models", headers={"host": "proxy.example"}).status_code == 200
        finally:
            loop.run(server.stop())
