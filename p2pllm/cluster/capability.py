"""What this machine can do, measured: memory, FLOPS per dtype, memory bandwidth, cores.

exo looked FLOPS up in a chip table (0 for anything unknown); we run short benchmarks instead:
a square matmul per dtype for FLOPS and a GEMV over a matrix larger than any cache for the
bandwidth decode actually gets. The benchmark results are cached per machine, device and thread
count in `~/.cache/p2pllm/capabilities.json` (`reprobe=True` measures again); memory is read
fresh on every call because it changes. The planner consumes `Capabilities.to_peer_caps()`.

Usable memory is the smallest of three bounds, and `memory_bound` says which one applied: what the
device has free, what this process's cgroup still allows (cluster/cgroup_memory.py: a container
sees the host's free memory but is OOM-killed at its own limit), and `--max-memory`.

Also here: the size/rate/duration parsers the CLI uses for `--max-memory 8GiB`,
`--device ...,bw=60GBps,net=1Gbps,tflops=4` and `rtt=2ms`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from ..errors import UsageError
from .cgroup_memory import CgroupMemory, cgroup_memory
from .planner import GiB, PeerCaps

log = logging.getLogger(__name__)

CACHE_VERSION = 1
CACHE_FILE = "capabilities.json"

# --------------------------------------------------------------------------- parsing

_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)"
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}
_DECIMAL = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
_BINARY = {"Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40}


def parse_size(text: str | int) -> int:
    """Bytes from '8GiB', '512 MB', '1.5GiB' or a plain number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise UsageError(f"bad size {text}: must not be negative")
        return text
    m = re.fullmatch(rf"\s*{_NUMBER}\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _SIZE_UNITS:
        raise UsageError(f"bad size {text!r}: expected a number and a unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 8GiB")
    return int(round(_finite(float(m.group(1)) * _SIZE_UNITS[unit], "size", text)))


def _finite(value: float, kind: str, text) -> float:
    """1e400GiB parses as a float: infinity, which no plan or int() survives."""
    if not math.isfinite(value):
        raise UsageError(f"bad {kind} {text!r}: too large")
    return value


def parse_rate(text: str, kind: str | None = None) -> float:
    """A rate in base units: bytes/s for '100GBps', '60 GB/s', '1Gbps' (bits, so /8), '1 Gbit/s';
    FLOP/s for '4 TFLOPS', '500GFLOPS'. `kind` ("bandwidth" or "flops") rejects the other kind."""
    m = re.fullmatch(rf"\s*{_NUMBER}\s*(\S.*?)?\s*", str(text))
    if not m or m.group(2) is None:
        raise UsageError(f"bad rate {text!r}: expected a number and a unit, e.g. 100GBps, 1Gbps or 4TFLOPS")
    value, unit = float(m.group(1)), m.group(2)
    found = None
    u = re.fullmatch(r"([kKMGTP]i?)?(B|b|bit)(ps|/s)", unit)
    if u and not (u.group(2) == "bit" and u.group(3) == "ps"):
        prefix = u.group(1) or ""
        scale = _BINARY.get(prefix) or _DECIMAL.get(prefix)
        if scale is not None:
            found = ("bandwidth", value * scale / (1 if u.group(2) == "B" else 8))
    f = re.fullmatch(r"([kKMGTP])?FLOP/?S", unit, flags=re.IGNORECASE)
    if found is None and f:
        prefix = (f.group(1) or "").upper().replace("K", "k")
        found = ("flops", value * _DECIMAL[prefix])
    if found is None:
        raise UsageError(
            f"bad rate {text!r}: unknown unit {unit!r} (bytes: B/s, MBps, GBps; bits: Mbps, Gbps; compute: GFLOPS, TFLOPS)"
        )
    if kind is not None and found[0] != kind:
        raise UsageError(f"bad rate {text!r}: expected a {kind} rate, got {found[0]}")
    return _finite(found[1], "rate", text)


def parse_duration(text: str) -> float:
    """Seconds from '2ms', '500us', '0.5 s' or a plain number of seconds."""
    m = re.fullmatch(rf"\s*{_NUMBER}\s*(s|ms|us|µs|ns)?\s*", str(text))
    if not m:
        raise UsageError(f"bad duration {text!r}: expected a number and a unit, e.g. 2ms")
    scale = {None: 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}[m.group(2)]
    return _finite(float(m.group(1)) * scale, "duration", text)


# --------------------------------------------------------------------------- capabilities


class BoundedMemory:
    """The memory bounds of a probe (its fields free_memory, cgroup_memory, cgroup_limit,
    cgroup_path, max_memory, total_memory) and which of them applies."""

    @property
    def usable_memory(self) -> int:
        """What a model may use here: the smallest of free memory, the cgroup's room and --max-memory."""
        return _bounds(self)[0][0]

    @property
    def memory_bound(self) -> str:
        """Which bound set usable_memory: "free", "cgroup" or "--max-memory"."""
        return _bounds(self)[0][1]

    def describe_memory(self) -> str:
        """'1.20 GiB usable (bound: cgroup limit 2.00 GiB of /sys/fs/cgroup/..., 0.80 GiB in use)': for logs and errors."""
        return f"{self.usable_memory / GiB:.2f} GiB usable (bound: {describe_bound(self)})"


@dataclass(frozen=True)
class Capabilities(BoundedMemory):
    device: str  # "cpu", "cuda:0", "mps"
    device_name: str  # CPU model or GPU name
    total_memory: int  # bytes on the device
    free_memory: int  # bytes available now
    max_memory: int | None  # the user's cap (--max-memory), if any
    cpu_count: int  # logical cores
    threads: int  # threads the benchmarks (and the runtime) use
    flops: dict[str, float] = field(default_factory=dict)  # FLOP/s per dtype: f32, and f16/bf16 where supported
    mem_bw: float = 0.0  # bytes/s streamed by a GEMV over a matrix larger than cache
    probe_seconds: float = 0.0  # how long the benchmarks took when measured
    cached: bool = False  # benchmarks read from the cache rather than measured now
    cgroup_memory: int | None = None  # bytes this process's cgroup still allows (None: no limit, or a GPU)
    cgroup_limit: int | None = None  # the limit of the cgroup level that binds
    cgroup_path: str | None = None  # that cgroup's directory

    def compute_dtype(self) -> str:
        """The dtype the runtime computes in: f32 on CPU, f16 on GPUs that measured it."""
        if self.device != "cpu" and "f16" in self.flops:
            return "f16"
        return "f32"

    def to_peer_caps(self, id: str, name: str, net_bw: float, rtt_s: float = 0.0, compute_dtype: str | None = None) -> PeerCaps:
        dtype = compute_dtype or self.compute_dtype()
        if dtype not in self.flops:
            raise UsageError(f"no FLOPS measured for {dtype} on {self.device} (measured: {', '.join(self.flops)})")
        return PeerCaps(id, name, int(self.usable_memory), float(self.flops[dtype]), float(self.mem_bw), float(net_bw), float(rtt_s))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["usable_memory"] = self.usable_memory
        d["memory_bound"] = self.memory_bound
        return d


@dataclass(frozen=True)
class MemoryBound(BoundedMemory):
    """Memory alone, without the benchmarks: what `p2pllm run` checks a model against."""

    device: str
    total_memory: int
    free_memory: int
    max_memory: int | None
    cgroup_memory: int | None = None
    cgroup_limit: int | None = None
    cgroup_path: str | None = None


def _bounds(m) -> list[tuple[int, str]]:
    """The bounds that apply, tightest first; on a tie the most deliberate one is named (a cap the
    user gave, then a cgroup someone set up, then what happens to be free)."""
    found = [(int(m.free_memory), 2, "free")]
    if m.cgroup_memory is not None:
        found.append((int(m.cgroup_memory), 1, "cgroup"))
    if m.max_memory is not None:
        found.append((int(m.max_memory), 0, "--max-memory"))
    return [(v, name) for v, _, name in sorted(found)]


def describe_bound(m) -> str:
    """Which bound applied, with its numbers: 'cgroup limit 2.00 GiB of PATH, 0.80 GiB in use'."""
    name = m.memory_bound
    if name == "cgroup":
        used = (m.cgroup_limit or 0) - (m.cgroup_memory or 0)
        return f"cgroup limit {m.cgroup_limit / GiB:.2f} GiB of {m.cgroup_path}, {used / GiB:.2f} GiB in use"
    if name == "--max-memory":
        return f"--max-memory {m.max_memory / GiB:.2f} GiB"
    return f"free memory, {m.free_memory / GiB:.2f} of {m.total_memory / GiB:.2f} GiB"


def memory_bound(device: str = "cpu", max_memory: int | str | None = None) -> MemoryBound:
    """This process's memory bounds now (no benchmarks, nothing cached): `p2pllm run` checks a
    model against them before loading it."""
    import torch

    dev = resolve_device(device)
    cap = max_memory_cap(max_memory)
    total, free = _memory(torch, dev)
    return MemoryBound(dev, int(total), int(free), cap, *_cgroup_fields(dev))


MIN_MEMORY_CAP = 1 << 20  # bytes: no layer of any model fits in less; a smaller --max-memory is a forgotten unit


def max_memory_cap(max_memory: int | str | None) -> int | None:
    """--max-memory in bytes (None: no cap), or a UsageError. `join` calls it before it makes a secret;
    a bare number is bytes, and `--max-memory 8` (meant as 8 GiB) started a daemon that waited forever
    for a plan that could give it no layer."""
    if max_memory is None:
        return None
    cap = parse_size(max_memory)
    if cap <= 0:
        raise UsageError(f"--max-memory must be positive, got {max_memory}")
    if cap < MIN_MEMORY_CAP:
        fix = (f"give a unit, e.g. {str(max_memory).strip()}GiB" if re.fullmatch(r"\s*[0-9.]+\s*", str(max_memory))
               else "give at least 1MiB")
        raise UsageError(f"--max-memory {max_memory} is {cap} bytes, less than any model needs: {fix}")
    return cap


def _cgroup_fields(dev: str) -> tuple[int | None, int | None, str | None]:
    # a cgroup limits host memory; a CUDA stage holds its weights in GPU memory, which no cgroup counts
    cg: CgroupMemory | None = None if dev.startswith("cuda") else cgroup_memory()
    if cg is None:
        return None, None, None
    return cg.available, cg.limit, cg.path


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "p2pllm"


def probe(
    device: str = "cpu",
    threads: int | None = None,
    max_memory: int | str | None = None,
    cache_dir: str | os.PathLike | None = None,
    reprobe: bool = False,
) -> Capabilities:
    """Measure this machine (or read the cached benchmarks) for `device` with `threads` threads."""
    import torch

    dev = resolve_device(device)
    cap = max_memory_cap(max_memory)
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    old_threads = torch.get_num_threads()
    n_threads = threads or old_threads
    total, free = _memory(torch, dev)
    cgroup = _cgroup_fields(dev)
    name = _device_name(torch, dev)
    key = f"{dev}|threads={n_threads}"
    machine = _machine_fingerprint(torch, dev, name, total)
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / CACHE_FILE
    entries = _read_cache(path)
    entry = entries.get(key)
    cached = entry is not None and not reprobe and entry.get("machine") == machine
    if cached:
        flops = {k: float(v) for k, v in entry["flops"].items()}
        bw, seconds = float(entry["mem_bw"]), float(entry.get("probe_seconds", 0.0))
        log.debug("capabilities of %s read from %s", key, path)
    else:
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            t0 = time.perf_counter()
            flops = _measure_flops(torch, dev)
            bw = _measure_bandwidth(torch, dev, free if cgroup[0] is None else min(free, cgroup[0]))
            seconds = time.perf_counter() - t0
        finally:
            torch.set_num_threads(old_threads)
        entries[key] = {"machine": machine, "flops": flops, "mem_bw": bw, "probe_seconds": seconds, "probed_at": time.time()}
        _write_cache(path, entries)
        log.info("probed %s (%s): %s, %.1f GB/s in %.2f s", key, name,
                 ", ".join(f"{k} {v / 1e12:.2f} TFLOPS" for k, v in flops.items()), bw / 1e9, seconds)
    return Capabilities(
        device=dev,
        device_name=name,
        total_memory=int(total),
        free_memory=int(free),
        max_memory=cap,
        cpu_count=os.cpu_count() or 1,
        threads=n_threads,
        flops=flops,
        mem_bw=bw,
        probe_seconds=seconds,
        cached=cached,
        cgroup_memory=cgroup[0],
        cgroup_limit=cgroup[1],
        cgroup_path=cgroup[2],
    )


def available_devices(torch) -> list[str]:
    """The compute devices torch can use on this machine, as --device spells them."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        found.append("mps")
    return found


def resolve_device(device: str) -> str:
    """`device` as torch names it, or a UsageError saying which devices this machine has."""
    if device == "cpu":  # before importing torch (a second): flags checked next fail fast
        return "cpu"
    import torch

    have = available_devices(torch)
    if device.startswith("cuda"):
        index = device.partition(":")[2] or "0"
        if f"cuda:{index}" in have:
            return f"cuda:{index}"
        why = "torch sees no CUDA GPU here" if not torch.cuda.is_available() else "no such CUDA device"
        raise UsageError(f"--device {device}: {why} (this machine has: {', '.join(have)})")
    if device == "mps":
        if "mps" in have:
            return "mps"
        raise UsageError(f"--device mps: Metal (MPS) is not available here (this machine has: {', '.join(have)})")
    raise UsageError(f"--device must be cpu, cuda[:N] or mps, got {device!r}")


def _memory(torch, dev: str) -> tuple[int, int]:
    vm = psutil.virtual_memory()
    if dev.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(int(dev.split(":")[1]))
        return int(total), int(free)
    if dev == "mps":  # unified memory: what Metal recommends, bounded by what the system has free
        total = int(torch.mps.recommended_max_memory())
        free = max(0, min(total - int(torch.mps.driver_allocated_memory()), vm.available))
        return total, int(free)
    return int(vm.total), int(vm.available)


def _device_name(torch, dev: str) -> str:
    if dev.startswith("cuda"):
        return torch.cuda.get_device_name(int(dev.split(":")[1]))
    if dev == "mps":
        return f"Apple {platform.machine()} GPU (MPS)"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _machine_fingerprint(torch, dev: str, name: str, total: int) -> str:
    return f"{socket.gethostname()}|{platform.machine()}|{name}|{total}|torch {torch.__version__}"


def _sync(torch, dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize(dev)
    elif dev == "mps":
        torch.mps.synchronize()


def _measure_flops(torch, dev: str) -> dict[str, float]:
    """FLOP/s per dtype from square matmuls; about 0.5 s in all on CPU."""
    gpu = dev != "cpu"
    plan = [("f32", torch.float32, 0.2), ("bf16", torch.bfloat16, 0.1), ("f16", torch.float16, 0.1)]
    out: dict[str, float] = {}
    for name, dtype, budget in plan:
        try:
            value = _matmul_rate(torch, dev, dtype, 4096 if gpu else 512, budget)
        except (RuntimeError, TypeError) as e:  # dtype not supported by this device's matmul
            log.debug("no %s matmul on %s: %s", name, dev, e)
            continue
        if value > 0:
            out[name] = value
    if "f32" not in out:
        raise RuntimeError(f"matmul benchmark failed on {dev}")
    return out


def _matmul_rate(torch, dev: str, dtype, n: int, budget_s: float) -> float:
    a = torch.ones(n, n, dtype=dtype, device=dev)
    b = torch.ones(n, n, dtype=dtype, device=dev)
    # shrink until one product takes well under the budget (slow emulated dtypes on old CPUs)
    deadline = time.perf_counter() + budget_s
    while True:
        t = time.perf_counter()
        torch.mm(a, b)
        _sync(torch, dev)
        one = time.perf_counter() - t
        if one < budget_s / 8 or n <= 64:
            break
        n = max(64, int(n * min(0.5, (budget_s / 8 / one) ** (1 / 3))))
        a, b = a[:n, :n].contiguous(), b[:n, :n].contiguous()
    best = _best_seconds(lambda: (torch.mm(a, b), _sync(torch, dev)), deadline, min_iters=2)
    return 2.0 * n**3 / best if best > 0 else 0.0


def _measure_bandwidth(torch, dev: str, free: int, budget_s: float = 0.15) -> float:
    """Bytes/s of y = A x over an f32 matrix larger than any cache (what decoding is bound by)."""
    target = (512 if dev != "cpu" else 128) << 20  # several times the largest laptop cache
    nbytes = int(max(16 << 20, min(target, free // 8)))
    cols = 4096
    rows = max(1, nbytes // (4 * cols))
    a = torch.ones(rows, cols, dtype=torch.float32, device=dev)
    x = torch.ones(cols, dtype=torch.float32, device=dev)
    torch.mv(a, x)
    _sync(torch, dev)
    best = _best_seconds(lambda: (torch.mv(a, x), _sync(torch, dev)), time.perf_counter() + budget_s, min_iters=3)
    return a.numel() * a.element_size() / best


def _best_seconds(run, deadline: float, min_iters: int) -> float:
    """The fastest of repeated runs until the deadline (at least min_iters of them)."""
    iters, best = 0, math.inf
    while time.perf_counter() < deadline or iters < min_iters:
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
        iters += 1
    return best


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable capability cache %s (%s); probing again", path, e)
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def _write_cache(path: Path, entries: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not write capability cache %s: %s", path, e)


__all__ = ["Capabilities", "MemoryBound", "default_cache_dir", "max_memory_cap", "memory_bound", "parse_duration",
           "parse_rate", "parse_size", "probe"]
