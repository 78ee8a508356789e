"""The dashboard in a real browser: Debian's chromium, driven by Playwright, against a live 3-peer
cluster of `p2pllm join` daemons on SmolLM2, started with --api-key so that the page has to ask for it.

The tests run in file order on one signed-in page: what the page shows is checked against
`p2pllm status --json` of the same peer and against the gateway's own answers. Before them, a
2-peer cluster whose peers share one name (TestTwoPeersNamedAlike) checks that the page keys its
rows, plan segments and actions by peer id, and shows the cluster's in-flight numbers on a peer
that does not coordinate.
P2PLLM_SCREENSHOTS=1 also saves docs/img/dashboard.png (1366x900) and docs/img/dashboard-phone.png.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import httpx
import pytest

from conftest import REPO, live_smol_cluster, run_cli

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package drives the browser "
                                                             "(pip install -e '.[test]')")
expect = sync_api.expect

GRPC = (7851, 7852, 7853)
GATEWAYS = (8851, 8852, 8853)
KEY = "dashboard-test-key-0123456789"
QUESTION = "Write a haiku about the sea."  # SmolLM2's greedy answer ends by itself, in about 25 tokens
MAX_TOKENS = 64
PLAN_CHANGE_MS = 30_000  # a drain or an admit: the page shows the new plan within this
LAPTOP = {"width": 1366, "height": 900}
PHONE = {"width": 390, "height": 844}
SCREENSHOTS = os.environ.get("P2PLLM_SCREENSHOTS") == "1"
# an external backend where nothing listens: its health check fails, so it is listed as down and out of rotation
# (the ring serves every request); live_smol_cluster gives every peer the same flags, the page's included
DOWN_BACKEND = "http://127.0.0.1:9"


def chromium_path() -> str | None:
    for candidate in (os.environ.get("P2PLLM_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                      "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


CHROMIUM = chromium_path()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/test-deps.sh installs "
                                                         "Debian's; P2PLLM_CHROMIUM names another)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("dashboard-cluster")
    # prefix cache off: the page's chat and the reference request must not share rounding paths
    for c in live_smol_cluster(logs, "dash", GRPC + GATEWAYS, "--api-key", KEY, "--response-cache", "off",
                               "--prefix-cache", "0", "--backend", DOWN_BACKEND):
        c.grpc = GRPC[GATEWAYS.index(int(c.url.rsplit(":", 1)[1]))]  # the gRPC port of the page's peer
        yield c


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def open_page(browser, url: str, viewport: dict):
    page = browser.new_page(viewport=viewport)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors
    page.goto(url + "/")
    return page


def sign_in(page, key: str = KEY) -> None:
    expect(page.locator("#login")).to_be_visible()
    page.fill("#api-key", key)
    page.click("#login-submit")


@pytest.fixture(scope="module")
def page(cluster, browser):
    page = open_page(browser, cluster.url, LAPTOP)
    yield page
    assert not page.errors, page.errors
    page.close()


def status(cluster) -> dict:
    proc = run_cli("status", "--json", "--host", f"127.0.0.1:{cluster.grpc}", "--secret", cluster.secret)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def fmt_layers(layers) -> str:
    return f"[{layers[0]}, {layers[1]})" if layers else "–"


def peer_row(page, peer_id: str):
    """A peer's row: rows are keyed by the peer's id (two peers may share a name), which it shows as its title."""
    return page.locator(f'#peer-rows tr[data-peer="{peer_id}"]')


def segment(page, peer_id: str):
    """A stage's segment of the plan bar, keyed by its peer's id (the stage's `peer`)."""
    return page.locator(f'#plan-bar [data-plan-peer="{peer_id}"]')


def drain_on_the_page(page, peer_id: str, name: str, segments_left: int) -> None:
    """Click a peer's Drain: its segment leaves the plan bar, the result says so, its row says drained."""
    peer_row(page, peer_id).locator("button[data-action=drain]").click()
    expect(segment(page, peer_id)).to_have_count(0, timeout=PLAN_CHANGE_MS)
    expect(page.locator("#plan-bar [data-plan-peer]")).to_have_count(segments_left)
    expect(page.locator("#manage-result")).to_have_attribute("data-kind", "ok", timeout=PLAN_CHANGE_MS)
    expect(page.locator("#manage-result")).to_contain_text(f"drained {name}")
    expect(peer_row(page, peer_id).locator("td").nth(5)).to_have_attribute("data-state", "drained")


TWIN_GRPC = (21851, 21852)
TWIN_GATEWAYS = (21861, 21862)
TWIN_NAME = "alpha"  # both peers': the default --name is the hostname, so cloned containers share one


@pytest.fixture(scope="class")
def twins(tmp_path_factory):
    logs = tmp_path_factory.mktemp("dashboard-twins")
    # the last --name wins: both peers are TWIN_NAME; the response cache stays on (the history test)
    yield from live_smol_cluster(logs, "twin", TWIN_GRPC + TWIN_GATEWAYS, "--api-key", KEY, "--prefix-cache", "0",
                                 "--name", TWIN_NAME)


@pytest.fixture(scope="class")
def twin_browser(twins):
    """A browser of the class's own, started after its cluster (Playwright's sync API keeps an event loop
    running, and the cluster's start-up runs one of its own)."""
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="class")
def twin_page(twins, twin_browser):
    page = open_page(twin_browser, twins.url, LAPTOP)
    sign_in(page)
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    yield page
    assert not page.errors, page.errors
    page.close()


class TestTwoPeersNamedAlike:
    """A 2-peer cluster whose peers share a name, the page on the peer that does not coordinate: rows and
    plan segments are one per peer id, Drain/Admit name the peer by id, the in-flight numbers are the
    cluster's. Its daemons and browser are class-scoped and the class comes first, so they are stopped
    before the 3-peer cluster of the tests below starts."""

    @staticmethod
    def snapshot(twins) -> dict:
        reply = httpx.get(twins.url + "/v1/cluster", timeout=10, headers={"Authorization": f"Bearer {KEY}"})
        assert reply.status_code == 200, reply.text
        return reply.json()

    def test_one_row_and_one_plan_segment_per_peer_id(self, twins, twin_page):
        page = twin_page
        s = self.snapshot(twins)["status"]
        assert [p["name"] for p in s["peers"]] == [TWIN_NAME, TWIN_NAME] and len({p["id"] for p in s["peers"]}) == 2
        samples = int(page.locator("#chart-tps").get_attribute("data-samples"))
        # a row keyed by name was made again at every snapshot: 2 rows at first, then more each second
        page.wait_for_function("(n) => Number(document.querySelector('#chart-tps').dataset.samples) >= n",
                               arg=samples + 4)
        expect(page.locator("#peer-rows tr")).to_have_count(2)
        for p in s["peers"]:
            row = peer_row(page, p["id"])
            expect(row.locator("td").first).to_contain_text(TWIN_NAME)  # the name is what is shown
            expect(row.locator("td").nth(1)).to_have_text(p["address"])
            expect(row.locator("td").nth(4)).to_have_text(fmt_layers(p["layers"]))
        stages = s["plan"]["stages"]
        assert len(stages) == 2
        expect(page.locator("#plan-bar [data-plan-peer]")).to_have_count(2)
        for stage in stages:
            expect(segment(page, stage["peer"])).to_have_attribute("data-start", str(stage["layers"][0]))
            expect(segment(page, stage["peer"])).to_have_attribute("data-end", str(stage["layers"][1]))
            expect(segment(page, stage["peer"])).to_contain_text(TWIN_NAME)

    def test_in_flight_and_queued_are_the_clusters_on_a_peer_that_does_not_coordinate(self, twins, twin_page):
        page = twin_page
        s = self.snapshot(twins)["status"]
        assert s["coordinator"] != s["id"]  # the page's peer has no scheduler of its own at work
        expect(page.locator("#chart-running-value")).to_have_text("0")
        body = {"model": twins.model, "prompt": "Once upon a time", "max_tokens": 1000, "temperature": 0.8,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", twins.url + "/v1/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"}) as reply:
            assert reply.status_code == 200, reply.read()
            lines = reply.iter_lines()  # kept: a dropped iterator closes the connection, which cancels the request
            next(line for line in lines if line.startswith("data: {"))  # it is being generated
            expect(page.locator("#chart-running-value")).to_have_text("1", timeout=10_000)
            expect(page.locator("#chart-queue-value")).to_have_text("0")
            snap = self.snapshot(twins)  # the snapshot's numbers are the ring's (the head's), not this peer's 0
            assert snap["metrics"]["running"] == snap["status"]["ring"]["running"] == 1, snap["status"]["ring"]
        # the client left: the head cancels the sequence, and the page sees the ring idle again
        expect(page.locator("#chart-running-value")).to_have_text("0", timeout=30_000)

    def test_a_peer_named_like_another_is_drained_and_admitted_by_id(self, twins, twin_page):
        page = twin_page
        s = self.snapshot(twins)["status"]
        # the page's own peer, which does not coordinate: its name alone is refused (409, two peers have it)
        refused = httpx.post(f"{twins.url}/v1/peers/{TWIN_NAME}/drain", timeout=30,
                             headers={"Authorization": f"Bearer {KEY}"})
        assert refused.status_code == 409 and "give its id" in refused.json()["error"]["message"], refused.text
        unknown = httpx.post(f"{twins.url}/v1/peers/nobody/drain", timeout=30, headers={"Authorization": f"Bearer {KEY}"})
        ids = sorted(p["id"][:8] for p in s["peers"])
        assert unknown.status_code == 404 and f"{TWIN_NAME} (id {ids[0]}), {TWIN_NAME} (id {ids[1]})" in \
            unknown.json()["error"]["message"], unknown.text  # the names alike, told apart
        peer_id = s["id"]
        drain_on_the_page(page, peer_id, TWIN_NAME, segments_left=1)
        other = next(p["id"] for p in s["peers"] if p["id"] != peer_id)
        expect(peer_row(page, other).locator("td").nth(5)).not_to_have_attribute("data-state", "drained")
        expect(page.locator("#peer-rows tr")).to_have_count(2)

        peer_row(page, peer_id).locator("button[data-action=admit]").click()
        expect(segment(page, peer_id)).to_have_count(1, timeout=PLAN_CHANGE_MS)
        expect(page.locator("#plan-bar [data-plan-peer]")).to_have_count(2)
        expect(page.locator("#manage-result")).to_have_attribute("data-kind", "ok", timeout=PLAN_CHANGE_MS)
        expect(peer_row(page, peer_id).locator("td").nth(5)).not_to_have_attribute("data-state", "drained")
        assert not any(p["drained"] for p in self.snapshot(twins)["status"]["peers"])

    def test_the_last_requests_rate_is_not_a_cache_replays(self, twins, twin_page):
        page = twin_page
        body = {"model": twins.model, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
                "max_tokens": MAX_TOKENS}
        with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as http:
            miss = http.post(twins.url + "/v1/chat/completions", json=body)
            hit = http.post(twins.url + "/v1/chat/completions", json=body)
        assert (miss.headers["x-p2pllm-cache"], hit.headers["x-p2pllm-cache"]) == ("miss", "hit")
        expect(page.locator(f'#history-rows tr[data-request-id="{hit.json()["id"]}"]')).to_have_count(
            1, timeout=10_000)
        rows = httpx.get(twins.url + "/v1/history?limit=2", timeout=10,
                         headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
        assert [(r["id"], r["backend"]) for r in rows] == [(hit.json()["id"], "cache"), (miss.json()["id"], "ring")]
        assert rows[0]["tokens_per_s"] is None and rows[1]["tokens_per_s"] > 0  # a replay measures no rate
        rate = page.evaluate(f"({rows[1]['tokens_per_s']}).toFixed(1)")  # as the page formats it
        expect(page.locator("#plan-measured")).to_contain_text(f", {rate} tokens/s in the last request")

    def test_the_page_skips_cache_rows_that_have_a_rate(self, twins, twin_browser):
        """Rows written before replays were given no rate may still have one: the page looks past them."""
        history = {"object": "list", "has_more": False, "data": [
            {"id": "chatcmpl-replay", "created": int(time.time()), "endpoint": "/v1/chat/completions",
             "backend": "cache", "prompt_tokens": 9, "completion_tokens": 25, "tokens_per_s": 28788.4,
             "finish_reason": "stop", "epoch": 1},
            {"id": "chatcmpl-ring", "created": int(time.time()) - 5, "endpoint": "/v1/chat/completions",
             "backend": "ring", "prompt_tokens": 9, "completion_tokens": 25, "tokens_per_s": 31.4,
             "finish_reason": "stop", "epoch": 1}]}
        page = twin_browser.new_page(viewport=LAPTOP)
        try:
            page.route("**/v1/history*", lambda route: route.fulfill(status=200, content_type="application/json",
                                                                      body=json.dumps(history)))
            page.goto(twins.url + "/")
            sign_in(page)
            expect(page.locator('#history-rows tr[data-request-id="chatcmpl-replay"]')).to_have_count(1)
            expect(page.locator("#plan-measured")).to_contain_text(", 31.4 tokens/s in the last request")
            expect(page.locator("#plan-measured")).not_to_contain_text("28788")
        finally:
            page.close()


def test_the_page_asks_for_the_api_key_and_refuses_a_wrong_one(cluster, page):
    assert httpx.get(cluster.url + "/v1/cluster", timeout=10).status_code == 401  # its data needs the key
    sign_in(page, "not-the-key")
    expect(page.locator("#login-error")).to_contain_text("refused")
    expect(page.locator("#dashboard")).to_be_hidden()
    sign_in(page)
    expect(page.locator("#login")).to_be_hidden()
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    assert page.evaluate("sessionStorage.getItem('p2pllm.apiKey')") == KEY


def test_the_peers_and_the_plan_are_those_of_status_json(cluster, page):
    expect(page.locator("#peer-rows tr")).to_have_count(3)
    s = status(cluster)
    expect(page.locator("#plan-epoch")).to_have_text(str(s["epoch"]))
    names = [p["name"] for p in s["peers"]]
    assert sorted(names) == ["dash-1", "dash-2", "dash-3"]
    for p in s["peers"]:
        row = peer_row(page, p["id"])
        expect(row).to_have_attribute("data-name", p["name"])
        expect(row.locator("td").nth(1)).to_have_text(p["address"])
        expect(row.locator("td").nth(2)).to_have_text(p["device"])
        expect(row.locator("td").nth(3)).to_have_attribute("data-mem-limit", str(p["mem_limit"]))
        expect(row.locator("td").nth(4)).to_have_text(fmt_layers(p["layers"]))
        expect(row.locator("td").nth(5)).to_have_attribute("data-state", p["state"])
        if p["coordinator"]:
            expect(row.locator("td").first).to_contain_text("coordinator")
        if p["rtt_ms"] is not None:
            expect(row.locator("td").nth(6)).to_contain_text(" ms")
    segments = page.locator("#plan-bar [data-plan-peer]")
    expect(segments).to_have_count(3)
    for stage in s["plan"]["stages"]:
        expect(segment(page, stage["peer"])).to_have_attribute("data-start", str(stage["layers"][0]))
        expect(segment(page, stage["peer"])).to_have_attribute("data-end", str(stage["layers"][1]))
        expect(segment(page, stage["peer"])).to_contain_text(stage["name"])
    predicted = s["plan"]["predicted"]
    expect(page.locator("#plan-predicted")).to_contain_text(f"{predicted['tokens_per_s_single']:.1f} tokens/s")


def test_the_backends_panel_lists_the_down_backend(cluster, page):
    reply = httpx.get(cluster.url + "/v1/cluster", timeout=10, headers={"Authorization": f"Bearer {KEY}"})
    assert reply.status_code == 200, reply.text
    backends = reply.json()["status"]["backends"]
    assert [(b["url"], b["healthy"]) for b in backends] == [(DOWN_BACKEND, False)], backends
    b = backends[0]
    assert b["reason"], b
    expect(page.locator("#backends-panel")).to_be_visible()
    expect(page.locator("#backend-rows tr")).to_have_count(1)
    row = page.locator(f'#backend-rows tr[data-backend="{b["id"]}"]')
    expect(row.locator("td").nth(0)).to_contain_text(b["id"])
    expect(row.locator("td").nth(1)).to_have_text(b["url"])
    expect(row.locator("td").nth(3)).to_have_attribute("data-healthy", "false")
    expect(row.locator("td").nth(3).locator(".state")).to_have_text("DOWN")
    expect(row.locator("td").nth(3).locator(".reason")).to_have_text(b["reason"])
    expect(row.locator("td").nth(4)).to_have_text(f"{b['in_flight']} / {b['max_concurrent']}")
    expect(row.locator("td").nth(5)).to_have_text(str(b["served"]))
    expect(row.locator("td").nth(6)).to_have_text(str(b["failed"]))
    expect(page.locator("#backend-count")).to_have_text("1 backend, 0 in rotation")


def test_the_chat_streams_the_gateways_greedy_answer(cluster, page):
    # the answer's text lengths, as the page changes it
    page.evaluate("""() => {
        window.lengths = [];
        new MutationObserver(() => {
            const answer = [...document.querySelectorAll('#chat-log [data-role=assistant]')].pop();
            if (answer && answer.dataset.state === 'streaming') window.lengths.push(answer.textContent.length);
        }).observe(document.querySelector('#chat-log'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#chat-temperature", "0")
    page.fill("#chat-max-tokens", str(MAX_TOKENS))
    page.fill("#chat-input", QUESTION)
    page.click("#chat-send")
    answer = page.locator("#chat-log [data-role=assistant]").last
    expect(answer).to_have_attribute("data-state", "done", timeout=60_000)
    text = answer.text_content()
    lengths = page.evaluate("window.lengths")
    assert len(set(lengths)) >= 3 and lengths == sorted(lengths) and lengths[-1] == len(text), lengths  # it grew

    reply = httpx.post(cluster.url + "/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": cluster.model, "messages": [{"role": "user", "content": QUESTION}],
                             "temperature": 0, "max_tokens": MAX_TOKENS})
    assert reply.status_code == 200, reply.text
    assert text == reply.json()["choices"][0]["message"]["content"]
    expect(page.locator("#chat-stats")).to_contain_text("tokens")


def test_the_history_lists_the_chat_request(page):
    answer = page.locator("#chat-log [data-role=assistant]").last
    completion_id = answer.get_attribute("data-completion-id")
    assert completion_id and completion_id.startswith("chatcmpl-")
    row = page.locator(f'#history-rows tr[data-request-id="{completion_id}"]')
    expect(row).to_have_count(1, timeout=10_000)
    expect(row.locator("td").nth(1)).to_have_text("chat/completions")
    expect(row.locator("td").nth(5)).to_have_text(re.compile(r"^(stop|length)$"))
    expect(row.locator("td").nth(6)).to_have_text(re.compile(r"^\d+$"))  # the plan epoch that served it
    expect(row.locator("td").nth(7)).to_have_text("ring")  # not the down --backend


def test_the_charts_take_a_sample_every_second(page):
    canvases = ["#chart-tps", "#chart-queue", "#chart-running", "#chart-memory"]
    before = [int(page.locator(c).get_attribute("data-samples")) for c in canvases]
    time.sleep(5)
    after = [int(page.locator(c).get_attribute("data-samples")) for c in canvases]
    # one snapshot a second, give or take the time a busy 2-core machine takes to make one
    assert all(a - b >= 4 for a, b in zip(after, before)), (before, after)
    assert page.evaluate("""() => {  // something is drawn
        const c = document.querySelector('#chart-tps');
        return c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some((v) => v !== 0);
    }""")


def test_a_drained_peer_leaves_the_plan_bar_and_an_admitted_one_returns(cluster, page):
    s = status(cluster)
    # neither the page's own peer nor the coordinator: the plain case
    peer_id, name = next((p["id"], p["name"]) for p in s["peers"] if not p["coordinator"] and p["id"] != s["id"])
    drain_on_the_page(page, peer_id, name, segments_left=2)
    expect(peer_row(page, peer_id).locator("td").nth(4)).to_have_text("–")
    drained = status(cluster)
    assert next(p for p in drained["peers"] if p["id"] == peer_id)["drained"]
    expect(page.locator("#plan-epoch")).to_have_text(str(drained["epoch"]))
    assert drained["epoch"] > s["epoch"]

    peer_row(page, peer_id).locator("button[data-action=admit]").click()
    expect(segment(page, peer_id)).to_have_count(1, timeout=PLAN_CHANGE_MS)
    expect(page.locator("#plan-bar [data-plan-peer]")).to_have_count(3)
    expect(page.locator("#manage-result")).to_have_attribute("data-kind", "ok", timeout=PLAN_CHANGE_MS)
    expect(peer_row(page, peer_id).locator("td").nth(5)).not_to_have_attribute("data-state", "drained")
    admitted = status(cluster)
    row = next(p for p in admitted["peers"] if p["id"] == peer_id)
    assert not row["drained"] and row["layers"]
    expect(peer_row(page, peer_id).locator("td").nth(4)).to_have_text(fmt_layers(row["layers"]))
    expect(page.locator("#plan-epoch")).to_have_text(str(admitted["epoch"]))


def test_a_peer_address_is_tested_from_the_page(cluster, page):
    other = next(port for port in GRPC if port != cluster.grpc)  # a member, not the page's peer
    page.fill("#peer-address", f"127.0.0.1:{other}")
    page.click("#peer-test")
    result = page.locator("#peer-result")
    expect(result).to_have_attribute("data-kind", "ok", timeout=15_000)
    expect(result).to_have_attribute("data-compatible", "true")
    expect(result).to_contain_text(f"dash-{GRPC.index(other) + 1}")
    page.fill("#peer-address", "127.0.0.1:7859")  # nothing listens there
    page.click("#peer-test")
    expect(result).to_have_attribute("data-reachable", "false", timeout=15_000)
    expect(result).to_have_attribute("data-kind", "error")


def test_a_phone_sees_the_page_without_sideways_scrolling(cluster, browser, page):
    if SCREENSHOTS:
        expect(page.locator("#history-rows tr").first).to_be_visible()
        page.fill("#peer-address", "")
        page.evaluate("document.querySelector('#peer-result').replaceChildren(); document.activeElement.blur()")
        page.screenshot(path=str(REPO / "docs" / "img" / "dashboard.png"), full_page=True)
    phone = open_page(browser, cluster.url, PHONE)
    try:
        sign_in(phone)
        expect(phone.locator("#peer-rows tr")).to_have_count(3)
        expect(phone.locator("#plan-bar [data-plan-peer]")).to_have_count(3)
        expect(phone.locator("#history-rows tr").first).to_be_visible()
        expect(phone.locator("#backend-rows tr[data-backend] td").nth(3)).to_contain_text("DOWN")
        widths = phone.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert widths[0] <= widths[1], widths
        wider = phone.evaluate("""() => [...document.querySelectorAll('main *')]
            .filter((e) => e.getBoundingClientRect().right > window.innerWidth + 0.5).map((e) => e.id || e.tagName)""")
        assert not wider, wider
        if SCREENSHOTS:
            # a function, not an expression: the page's CSP refuses the eval an expression would need
            phone.wait_for_function("() => Number(document.querySelector('#chart-tps').dataset.samples) >= 3")
            phone.screenshot(path=str(REPO / "docs" / "img" / "dashboard-phone.png"), full_page=True)
        assert not phone.errors, phone.errors
    finally:
        phone.close()
