"""Discovery over real mDNS between network-namespace hosts, TXT parsing, and interface choice."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import subprocess
import sys
import time

import pytest

from netns import Hosts, hosts, netns_available  # noqa: F401  (hosts is a fixture)
from p2pllm.cluster.discovery import SERVICE_TYPE, Announcement, Discovery, pick_interface_address
from p2pllm.errors import P2PError, UsageError

# One discovery peer: announce argv[1] (an Announcement as JSON), print found/lost events as JSON
# lines. SIGUSR1 re-announces with mem_bytes + 1; SIGTERM stops gracefully (goodbye packets).
PEER = r"""
import asyncio, dataclasses, json, logging, signal, sys
from p2pllm.cluster.discovery import Announcement, Discovery

logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(message)s")
logging.getLogger("p2pllm").setLevel(logging.DEBUG)

def emit(**fields):
    print(json.dumps(fields), flush=True)

async def main():
    me = Announcement(**json.loads(sys.argv[1]))
    loop = asyncio.get_running_loop()
    events = asyncio.Queue()
    loop.add_signal_handler(signal.SIGTERM, events.put_nowait, "stop")
    loop.add_signal_handler(signal.SIGUSR1, events.put_nowait, "update")
    discovery = Discovery(
        me,
        on_found=lambda ann: emit(event="found", **dataclasses.asdict(ann)),
        on_lost=lambda peer_id: emit(event="lost", id=peer_id),
        interface_address=me.host,
    )
    await discovery.start()
    emit(event="ready")
    while await events.get() == "update":
        me = dataclasses.replace(me, mem_bytes=me.mem_bytes + 1)
        await discovery.update(me)
        emit(event="updated")
    await discovery.stop()
    emit(event="stopped")

asyncio.run(main())
"""

# Registers services whose TXT records are malformed in every way we could think of.
HOSTILE = r"""
import asyncio, socket, sys
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

address, good = sys.argv[1], dict(
    id="ab" * 16, name="evil", cluster="default", proto="1", grpc="7700", gw="8700",
    fp="f" * 16, mem="1000", flops="1e9", bw="1e9",
)
bad = [
    {},                                               # empty TXT
    {**good, "grpc": "http"},                         # not a number
    {**good, "grpc": "70000"},                        # port out of range
    {k: v for k, v in good.items() if k != "id"},     # missing id
    {**good, "id": "../../etc/passwd"},               # not hex
    {**good, "flops": "nan"},                         # not finite
    {**good, "mem": "-5"},                            # negative
    {**good, "name": b"\xff\xfe\x00"},                # not UTF-8
    {**good, "id": None},                             # key without value
    {**good, "cluster": "a b\n c"},                   # not a token
    {**good, "bw": "1" * 250},                        # absurdly long
]
async def main():
    azc = AsyncZeroconf(interfaces=[address], ip_version=IPVersion.V4Only)
    infos = [
        AsyncServiceInfo(
            "_p2pllm._tcp.local.", f"hostile-{n}._p2pllm._tcp.local.", port=7700, properties=props,
            server=f"hostile-{n}.local.", addresses=[socket.inet_aton(address)],
        )
        for n, props in enumerate(bad)
    ]
    announced = await asyncio.gather(*(azc.async_register_service(info) for info in infos))
    await asyncio.gather(*announced)
    print("registered", len(infos), flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def announcement(hosts: Hosts, i: int, **changes) -> Announcement:
    base = Announcement(
        id=f"{i:02x}" * 16,
        name=f"host {i} (ünïcode)",
        cluster="default",
        protocol=1,
        host=hosts.addr(i),
        grpc_port=7700 + i,
        gateway_port=8700 + i,
        fingerprint=f"sha256:{i:x}" * 4,
        mem_bytes=(8 << 30) + i,
        flops=1.5e12 * i,
        mem_bw=6.4e10 + i,
    )
    return dataclasses.replace(base, **changes)


def start_peer(hosts: Hosts, ann: Announcement) -> subprocess.Popen:
    i = int(ann.host.rsplit(".", 1)[1])
    return hosts.popen(i, [sys.executable, "-c", PEER, json.dumps(dataclasses.asdict(ann))])


def events(proc: subprocess.Popen) -> list[dict]:
    out = []
    with open(proc.log_path) as f:
        for line in f:
            if line.startswith("{"):
                out.append(json.loads(line))
    return out


def wait_for(hosts: Hosts, what: str, predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"not within {timeout} s: {what}\n{hosts.logs()}")


def found(proc: subprocess.Popen) -> dict[str, dict]:
    """The latest announcement each peer id was found with, ignoring ones lost since."""
    seen: dict[str, dict] = {}
    for ev in events(proc):
        if ev["event"] == "found":
            seen[ev["id"]] = {k: v for k, v in ev.items() if k != "event"}
        elif ev["event"] == "lost":
            seen.pop(ev["id"], None)
    return seen


def test_peers_find_each_other_with_exact_fields_then_update_and_goodbye(hosts):
    anns = {i: announcement(hosts, i) for i in hosts.indices}
    procs = {i: start_peer(hosts, anns[i]) for i in hosts.indices}
    wait_for(hosts, "every peer ready", lambda: all(
        any(e["event"] == "ready" for e in events(p)) for p in procs.values()), timeout=10)

    own_ids = {i: a.id for i, a in anns.items()}

    def sees_all_others() -> bool:
        return all(
            found(procs[i]) == {a.id: dataclasses.asdict(a) for j, a in anns.items() if j != i}
            for i in anns
        )

    wait_for(hosts, "every peer finds the others with their exact fields", sees_all_others, timeout=5)

    procs[2].send_signal(signal.SIGUSR1)  # re-announce with one more byte of free memory
    anns[2] = dataclasses.replace(anns[2], mem_bytes=anns[2].mem_bytes + 1)
    wait_for(hosts, "the changed announcement reaches the others", sees_all_others, timeout=5)

    procs[3].send_signal(signal.SIGTERM)  # graceful stop: goodbye packets
    assert procs[3].wait(timeout=10) == 0, hosts.logs()
    assert events(procs[3])[-1]["event"] == "stopped"
    gone = anns.pop(3).id
    wait_for(hosts, "the others see the goodbye", lambda: all(
        {"event": "lost", "id": gone} in events(procs[i]) for i in (1, 2)), timeout=5)
    assert sees_all_others()
    for i, proc in procs.items():
        assert all(e.get("id") != own_ids[i] for e in events(proc)), "a peer reported itself"
        assert "Traceback" not in open(proc.log_path).read(), hosts.logs()


@pytest.mark.parametrize("hosts", [2], indirect=True)
def test_malformed_txt_from_a_hostile_peer_is_ignored_without_crashing(hosts):
    browser = start_peer(hosts, announcement(hosts, 1))
    hostile = hosts.popen(2, [sys.executable, "-c", HOSTILE, hosts.addr(2)])
    wait_for(hosts, "hostile services registered", lambda: "registered" in open(hostile.log_path).read(),
             timeout=10)
    wait_for(hosts, "the browser looked at every hostile service", lambda: open(
        browser.log_path).read().count("ignoring malformed announcement") >= 11, timeout=8)

    good = announcement(hosts, 2)
    peer = start_peer(hosts, good)
    wait_for(hosts, "a well-formed peer is still found afterwards",
             lambda: found(browser) == {good.id: dataclasses.asdict(good)}, timeout=5)
    assert browser.poll() is None and peer.poll() is None
    log = open(browser.log_path).read()
    assert "Traceback" not in log, log
    assert [e["id"] for e in events(browser) if e["event"] == "found"] == [good.id]


def test_txt_round_trip_has_exactly_the_documented_keys():
    ann = Announcement("0123456789abcdef", "büro-pc", "lab", 1, "10.0.0.5", 7700, 8700,
                       "sha256:abc", 123, 1.25e12, 5e10)
    txt = ann.to_txt()
    assert set(txt) == {"id", "name", "cluster", "proto", "grpc", "gw", "fp", "mem", "flops", "bw"}
    assert all(isinstance(v, str) for v in txt.values())
    encoded = {k.encode(): v.encode() for k, v in txt.items()}
    assert Announcement.from_txt(encoded, "10.0.0.5") == ann
    assert ann.address == "10.0.0.5:7700"
    assert ann.instance_name == f"büro-pc-01234567.{SERVICE_TYPE}"


@pytest.mark.parametrize("change", [
    {"grpc": "0"}, {"gw": "65536"}, {"proto": "1.5"}, {"mem": "1e9"}, {"flops": "inf"},
    {"bw": "-1"}, {"id": "0123"}, {"id": "0123456789ABCDEF"}, {"name": ""}, {"fp": "a b"},
    {"name": "x" * 201}, {"mem": "٣"},  # Arabic-Indic digit: isdigit() but not ASCII
])
def test_malformed_txt_values_are_rejected(change):
    txt = Announcement("0123456789abcdef", "pc", "lab", 1, "10.0.0.5", 7700, 8700, "fp", 1, 1.0,
                       1.0).to_txt()
    txt.update(change)
    with pytest.raises(ValueError):
        Announcement.from_txt(txt, "10.0.0.5")


def test_pick_interface_address_forced_and_unknown():
    assert pick_interface_address("192.0.2.7") == "192.0.2.7"
    assert pick_interface_address("lo") == "127.0.0.1"
    with pytest.raises(UsageError, match=r"^no interface eth9 \(have: .*lo.*\)$"):
        pick_interface_address("eth9")
    with pytest.raises(UsageError, match="IPv4"):
        pick_interface_address("::1")
    default = pick_interface_address(None)
    assert default.count(".") == 3


def test_discovery_on_an_address_this_machine_lacks_fails_with_a_clear_error():
    ann = Announcement("0123456789abcdef", "pc", "lab", 1, "192.0.2.7", 7700, 8700, "fp", 1, 1.0, 1.0)
    discovery = Discovery(ann, on_found=print, on_lost=print)

    async def start_and_stop():
        try:
            await discovery.start()
        finally:
            await discovery.stop()

    with pytest.raises(P2PError, match=r"cannot run mDNS on 192\.0\.2\.7: .*--no-mdns"):
        asyncio.run(start_and_stop())


def test_pick_interface_address_in_a_host_without_default_route(hosts):
    # A namespace host has no default route: the first non-loopback interface that is up wins.
    out = hosts.run(1, [sys.executable, "-c",
                        "from p2pllm.cluster.discovery import pick_interface_address as p; print(p())"],
                    timeout=20)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == hosts.addr(1)
    hosts.run(2, ["ip", "route", "add", "default", "via", hosts.addr(1)], timeout=5, check=True)
    out = hosts.run(2, [sys.executable, "-c",
                        "from p2pllm.cluster.discovery import pick_interface_address as p; print(p())"],
                    timeout=20)
    assert out.stdout.strip() == hosts.addr(2), out.stderr


def test_hosts_harness_cuts_links_and_leaves_nothing_behind():
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    with Hosts(2) as h:
        names = [h.ns(1), h.ns(2)]
        sleeper = h.popen(1, ["sleep", "60"])
        h.link_down(2)
        assert "NO-CARRIER" in h.run(2, ["ip", "link", "show", "eth0"], timeout=5).stdout
        h.link_up(2)
        assert h.add_host() == 3 and h.addr(3).endswith(".3")
        names.append(h.ns(3))
    assert sleeper.poll() == -signal.SIGKILL
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed.split() for name in names), listed
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert h.bridge not in links
