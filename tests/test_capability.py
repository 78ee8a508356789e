"""Measured capabilities (cached per machine) and the size/rate parsers the CLI uses."""

from __future__ import annotations

import json
import time

import pytest

from p2pllm.cluster import capability as C
from p2pllm.errors import UsageError

GiB = 1 << 30


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    t = time.perf_counter()
    caps = C.probe(cache_dir=cache, reprobe=True)
    return cache, caps, time.perf_counter() - t


def test_probe_measures_positive_numbers_quickly(probed):
    _, caps, seconds = probed
    assert caps.device == "cpu" and caps.device_name
    assert caps.total_memory >= caps.free_memory > 0
    assert caps.flops["f32"] > 1e8 and all(v > 0 for v in caps.flops.values())
    assert caps.mem_bw > 1e8
    assert caps.cpu_count >= 1 and caps.threads >= 1
    assert not caps.cached
    assert seconds < 5  # benchmarks budget about 0.7 s; generous for loaded CI machines


def test_second_probe_reads_the_cache_and_reprobe_measures_again(probed):
    cache, caps, _ = probed
    data = json.loads((cache / C.CACHE_FILE).read_text())
    assert data["version"] == C.CACHE_VERSION and f"cpu|threads={caps.threads}" in data["entries"]
    t = time.perf_counter()
    again = C.probe(cache_dir=cache)
    assert again.cached and time.perf_counter() - t < 0.5
    assert again.flops == caps.flops and again.mem_bw == caps.mem_bw
    fresh = C.probe(cache_dir=cache, reprobe=True)
    assert not fresh.cached


def test_cache_from_another_machine_is_not_used(probed):
    cache, caps, _ = probed
    path = cache / C.CACHE_FILE
    data = json.loads(path.read_text())
    for entry in data["entries"].values():
        entry["machine"] = "someone-else"
        entry["mem_bw"] = 1.0
    path.write_text(json.dumps(data))
    assert C.probe(cache_dir=cache).mem_bw > 1.0


def test_corrupt_cache_is_ignored(tmp_path):
    (tmp_path / C.CACHE_FILE).write_text("{not json")
    caps = C.probe(cache_dir=tmp_path)
    assert not caps.cached and caps.mem_bw > 0
    assert C.probe(cache_dir=tmp_path).cached


def test_max_memory_caps_usable_memory(probed):
    cache, caps, _ = probed
    capped = C.probe(cache_dir=cache, max_memory="1GiB")
    assert capped.max_memory == GiB and capped.usable_memory == min(GiB, capped.free_memory)
    peer = capped.to_peer_caps("me", "laptop", net_bw=125e6, rtt_s=1e-3)
    assert peer.mem_bytes == capped.usable_memory and peer.flops == capped.flops["f32"]
    assert peer.mem_bw == capped.mem_bw and peer.net_bw == 125e6
    roomy = C.probe(cache_dir=cache, max_memory=2 * caps.total_memory)
    assert roomy.usable_memory == roomy.free_memory  # a cap above what is free changes nothing
    with pytest.raises(UsageError):
        C.probe(cache_dir=cache, max_memory="0GiB")
    with pytest.raises(UsageError):
        C.probe(cache_dir=cache, device="tpu")


@pytest.mark.parametrize(
    "text, expect",
    [("8GiB", 8 * GiB), ("8 GiB", 8 * GiB), ("1.5GiB", 3 * GiB // 2), ("512MiB", 512 << 20), ("4KiB", 4096),
     ("1TiB", 1 << 40), ("10GB", 10**10), ("3MB", 3 * 10**6), ("2kb", 2000), ("1TB", 10**12), ("100B", 100),
     ("1234", 1234), (4096, 4096), ("8gib", 8 * GiB)],
)
def test_parse_size(text, expect):
    assert C.parse_size(text) == expect


@pytest.mark.parametrize("text", ["", "GiB", "-1GiB", "8 GiBs", "8 bananas", "8GiB extra", "1e", "8Gb/s", "1e400GiB"])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError):
        C.parse_size(text)


@pytest.mark.parametrize(
    "text, kind, expect",
    [("100GBps", "bandwidth", 100e9), ("60 GB/s", "bandwidth", 60e9), ("1Gbps", "bandwidth", 1e9 / 8),
     ("100Mbps", "bandwidth", 100e6 / 8), ("10 Gbit/s", "bandwidth", 10e9 / 8), ("1GiBps", "bandwidth", 2.0**30),
     ("4 TFLOPS", "flops", 4e12), ("500GFLOPS", "flops", 5e11), ("2.5tflops", "flops", 2.5e12), ("1e9 FLOPS", "flops", 1e9)],
)
def test_parse_rate(text, kind, expect):
    assert C.parse_rate(text) == pytest.approx(expect)
    assert C.parse_rate(text, kind) == pytest.approx(expect)


@pytest.mark.parametrize("text", ["100", "fast", "100 GB", "100 Gbitps", "1 XBps", "", "4 TFLOP", "1e400GBps"])
def test_parse_rate_rejects(text):
    with pytest.raises(UsageError):
        C.parse_rate(text)


def test_parse_rate_kind_mismatch():
    with pytest.raises(UsageError):
        C.parse_rate("4TFLOPS", "bandwidth")
    with pytest.raises(UsageError):
        C.parse_rate("1Gbps", "flops")


def test_parse_duration():
    assert C.parse_duration("2ms") == pytest.approx(2e-3)
    assert C.parse_duration("500us") == pytest.approx(5e-4)
    assert C.parse_duration("0.5 s") == 0.5
    for bad in ("soon", "1e400ms"):  # infinity ("too large") was taken, and named the wrong culprit later
        with pytest.raises(UsageError):
            C.parse_duration(bad)
