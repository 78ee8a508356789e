"""Where a token's time goes in a ring: per-frame timestamps, off unless asked for.

With P2PLLM_TIMELINE=FILE each process appends lines "<seconds> <pid> <event>" to FILE (buffered:
written at the first event a second after the last write, every 256 events, and at exit). The
seconds are time.perf_counter(), CLOCK_MONOTONIC on Linux: one clock for every process of the
machine, so the daemons' lines merge into one timeline (benchmarks/ring.py reads them). Events, in
the order a token meets them:

    launch      the head sends a micro-batch to the first stage
    recv        a stage's frame handler starts
    decoded     the frame is checked and decoded
    stepped     the stage's layers ran
    computed    the outgoing frame is encoded
    sent        the outgoing frame is written (gRPC took it)
    done        the stage's replica of the step's KV is sent too; the handler returns
    result      the head has the last stage's answers
    answers     the head's scheduler takes them
"""

from __future__ import annotations

import atexit
import os
import time

_PATH = os.environ.get("P2PLLM_TIMELINE") or None
_lines: list[str] = []
_written = 0.0  # when _lines were last written


def mark(event: str) -> None:
    if _PATH is None:
        return
    now = time.perf_counter()
    _lines.append(f"{now:.6f} {os.getpid()} {event}\n")
    if len(_lines) >= 256 or now - _written > 1.0:
        _write()


def _write() -> None:
    global _written
    with open(_PATH, "a") as f:
        f.writelines(_lines)
    _lines.clear()
    _written = time.perf_counter()


if _PATH is not None:
    atexit.register(_write)
