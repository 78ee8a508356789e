"""Command-line value parsers shared by every subcommand: a bad value is one argparse line, exit 2."""

from __future__ import annotations

import argparse
import os


def _parse(kind: type, text: str, expected: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _parse(int, text, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def is_utf8(text: str) -> bool:
    """Whether text can be sent: a command line or stdin that is not UTF-8 reaches Python as lone
    surrogates, which no tokenizer or JSON body can carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def utf8_text(text: str) -> str:
    if not is_utf8(text):
        raise argparse.ArgumentTypeError("not valid UTF-8 text")
    return text


def thread_count(text: str) -> int:
    """--threads: more threads than 4 per core only slow a step down (each barrier waits for all of
    them), and torch crashes outright on very large counts (set_num_threads(100000) segfaults)."""
    value = positive_int(text)
    most = 4 * (os.cpu_count() or 1)
    if value > most:
        raise argparse.ArgumentTypeError(f"at most {most} on this machine (4 per core), got {value}")
    return value


def seed(text: str) -> int:
    """A random seed: what torch's generators and the sampling wire (int64) carry."""
    value = _parse(int, text, "a whole number")
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2^63-1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _parse(int, text, "a whole number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _parse(float, text, "a number")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def temperature(text: str) -> float:
    value = _parse(float, text, "a number")
    if not 0.0 <= value <= 2.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2, got {text}")
    return value


def port(text: str) -> int:
    value = _parse(int, text, "a port number")
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port must be between 1 and 65535, got {value}")
    return value


def host_port(text: str) -> str:
    host, sep, p = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    bracketed = host.startswith("[") and host.endswith("]")
    if (not bracketed and ("[" in host or "]" in host or ":" in host)) or any(c.isspace() for c in host):
        # "[::1" or "::1" (an IPv6 address goes in brackets: [::1]:7700) reached gRPC as an address
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (an IPv6 address in brackets, [::1]:7700), got {text!r}")
    port(p)
    return text


def seconds(text: str) -> float:
    value = _parse(float, text, "seconds")
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 3600 seconds, got {text}")
    return value


MIN_SERVE_RATE = 1000.0  # bytes/s: below, a source's paced chunks (a second's worth each) are tiny, a fetch takes days


def serve_rate(text: str) -> float:
    """--fetch-serve-rate: bytes/s from '8MB/s', '64Mbps'; '0' for no cap; at least 1 kB/s."""
    from .cluster.capability import parse_rate
    from .errors import UsageError

    if text.strip() == "0":
        return 0.0
    try:
        value = parse_rate(text, "bandwidth")
    except UsageError:
        raise argparse.ArgumentTypeError(
            f"bad rate {text!r}: expected a bandwidth, a number and a unit, e.g. 4MB/s, 500kB/s, 32Mbps "
            f"(bytes: B/s, kB/s, MB/s, GB/s or kBps, MBps, ...; bits: kbps, Mbps, Gbps), or 0 for no cap") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, or 0 for no cap, got {text}")
    if value < MIN_SERVE_RATE:
        raise argparse.ArgumentTypeError(
            f"{text} is below the least rate, 1kB/s (a fetch from this peer would never end): give at least "
            f"1kB/s, or 0 for no cap")
    return value


def model_ref(text: str) -> str:
    """--model: a .gguf file or Hugging Face folder, else a model in Ollama, LM Studio or the HF cache
    (p2pllm/model/store.py); the path it resolves to."""
    from .model.store import ModelRefError, resolve_model

    try:
        return resolve_model(text)
    except ModelRefError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class PeerModel(str):
    """`join --model NAME` where NAME is no model here and no path: the cluster's peers may serve
    it (cluster/model_sources.py). `local_error` says why it is not a local model."""

    local_error: str

    def __new__(cls, name: str, local_error: str):
        s = super().__new__(cls, name)
        s.local_error = local_error
        return s


def model_ref_or_peer_model(text: str) -> str:
    """join's --model: model_ref, else (a name, not a path, found nowhere here) a PeerModel."""
    from .cluster.model_sources import looks_like_a_path
    from .model.store import ModelRefError, resolve_model

    try:
        return resolve_model(text)
    except ModelRefError as e:
        if e.not_found and not looks_like_a_path(text):
            return PeerModel(text, str(e))
        raise argparse.ArgumentTypeError(str(e)) from None


def cache_entries(text: str) -> int:
    """--response-cache: how many answers the gateway keeps; 'off' (or 0) for none."""
    if text.strip().lower() == "off":
        return 0
    value = _parse(int, text, "a number of answers or 'off'")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (off) or more, got {value}")
    return value


def size_bytes(text: str) -> int:
    """A positive size: 64MiB, 1GB, 512kB."""
    from .cluster.capability import parse_size
    from .errors import UsageError

    try:
        value = parse_size(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be more than 0 bytes, got {text!r}")
    return value


def ttl_seconds(text: str) -> float:
    value = _parse(float, text, "seconds")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def similarity(text: str) -> float:
    """A cosine similarity threshold in (0, 1]."""
    value = _parse(float, text, "a similarity between 0 and 1")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be greater than 0 and at most 1, got {text}")
    return value


def web_origin(text: str) -> str:
    """A browser origin: scheme://host[:port] (what an Origin header carries), or * for any."""
    import re

    if text == "*" or re.fullmatch(r"https?://[^/\s?#@]+", text.rstrip("/")):
        return text
    raise argparse.ArgumentTypeError(f"expected scheme://host[:port] such as https://app.example.com (or *), "
                                     f"got {text!r}")
