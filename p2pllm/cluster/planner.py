"""Partition planner: which peer runs which layers, and how fast that will be.

Pure functions over plain data (no I/O, no clocks, no torch), so `p2pllm plan`, the daemon's
coordinator, the tests and the benchmarks all run exactly this code. docs/planner.md explains
the cost model and the search; the short version:

* memory of a stage = weights of its layers as the stage holds them (a GGUF stage: the file's own
  tensor sizes; + embedding on the first, + final norm and head on the last) + KV cache for
  `context x batch` tokens at the KV dtype + workspace (the backend's activation and logits
  buffers, plus a runtime margin); it must not exceed the peer's limit;
* time of a stage per decode step = max(FLOPs / peer FLOPS, bytes read / peer memory bandwidth);
  a hop costs half the link's RTT plus the activation's bytes over the link's bandwidth, and the
  sampled token ids travel back from the last stage to the first;
* objective "latency" = the sum of stages and hops (one stream); "throughput" = the busiest stage
  or link (the ring kept full of micro-batches);
* search: every subset and order of peers (up to `exhaustive_limit` usable peers), with the layer
  boundaries of each order found by dynamic programming; a multi-start local search beyond.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..errors import UsageError
from ..model.spec import DTYPE_BYTES, ModelSpec

GiB = 1 << 30
MiB = 1 << 20
_INF = math.inf
_REL_TOL = 1e-9
OBJECTIVES = ("latency", "throughput")
STRATEGIES = ("optimal", "proportional", "even")
_FLOAT_DTYPES = ("f32", "f16", "bf16")


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Held:
    """The parts of the model a peer's disk holds when it has a partial copy (docs/fetch.md)."""

    layers: frozenset[int] = frozenset()
    embed: bool = False  # the token embedding
    head: bool = False  # what the last stage needs beyond its layers: the final norm, the output head
    #                    (which is the embedding when tied)


@dataclass(frozen=True)
class PeerCaps:
    """What one peer can do, as measured (cluster/capability.py) or declared (`p2pllm plan`)."""

    id: str
    name: str
    mem_bytes: int  # usable memory limit for this model (after --max-memory)
    flops: float  # FLOP/s in the compute dtype
    mem_bw: float  # bytes/s the weights stream at (GEMV)
    net_bw: float  # bytes/s of the peer's network link
    rtt_s: float = 0.0  # round trip from the peer to the LAN's switch / access point
    held: Held | None = None  # what its partial copy holds (`join --from-peers`); None: the whole file
    serving: tuple[int, int] | None = None  # the layers it has loaded (its stage in the running plan)

    def __post_init__(self):
        for name in ("mem_bytes", "flops", "mem_bw", "net_bw", "rtt_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
                raise UsageError(f"peer {self.id}: {name} must be a non-negative number, got {value!r}")


@dataclass(frozen=True)
class Link:
    """A directed-or-not measured link: bandwidth in bytes/s and round-trip time in seconds."""

    bw: float
    rtt_s: float


class Links:
    """Measured pairwise links (symmetric unless both directions are given).

    A pair never measured falls back to the slower of the two peers' own links, with a round
    trip of the sum of both peers' RTTs (one leg through the switch for each).
    """

    def __init__(self, measured: Mapping[tuple[str, str], Link | tuple[float, float]] | None = None):
        self._links: dict[tuple[str, str], Link] = {}
        for (a, b), link in (measured or {}).items():
            if not isinstance(link, Link):
                link = Link(float(link[0]), float(link[1]))
            self.set(a, b, link.bw, link.rtt_s)

    def set(self, a: str, b: str, bw: float, rtt_s: float, symmetric: bool = True) -> None:
        if bw < 0 or rtt_s < 0:
            raise UsageError(f"link {a}->{b}: bandwidth and RTT must be non-negative")
        self._links[(a, b)] = Link(float(bw), float(rtt_s))
        if symmetric and (b, a) not in self._links:
            self._links[(b, a)] = Link(float(bw), float(rtt_s))

    def get(self, a: PeerCaps, b: PeerCaps) -> Link:
        found = self._links.get((a.id, b.id))
        if found is not None:
            return found
        return Link(min(a.net_bw, b.net_bw), a.rtt_s + b.rtt_s)

    def to_dict(self) -> dict:
        return {f"{a}->{b}": {"bw": l.bw, "rtt_s": l.rtt_s} for (a, b), l in sorted(self._links.items())}


@dataclass(frozen=True)
class PlanOptions:
    """What to plan for. Defaults size a chat session of 2048 tokens, one sequence."""

    context: int = 2048  # tokens of KV cache per sequence
    batch: int = 1  # sequences decoded together (KV for context x batch tokens on every stage)
    prefix_cache: int = 0  # KV positions kept for the head's prefix cache, beside context x batch
    dtype: str | None = None  # dtype the weights are held in; None = the file's dtype
    kv_dtype_bytes: float = 2.0  # bytes per cached K or V value (f16 2, q8_0 34/32, f32 4)
    backend: str = "ggml"  # "ggml" (GGUF on the CPU: flash attention, one shared compute buffer) | "torch"
    objective: str = "latency"  # "latency" | "throughput"
    strategy: str = "optimal"  # "optimal" | "proportional" | "even"
    prefill_chunk: int = 512  # tokens prefilled at once (sizes the activation buffers)
    activation_bytes: int = 4  # activations and logits are computed in f32
    margin_bytes: int = 256 * MiB  # per process: interpreter, torch runtime, allocator slack
    margin_fraction: float = 0.05  # of weights + kv + buffers, for allocator fragmentation
    hysteresis: float = 0.10
    fetch_tolerance: float = 0.05  # a plan this much slower is taken if its peers fetch less (--from-peers)
    wire_dtype_bytes: int = 2  # activations travel as f16/bf16
    token_id_bytes: int = 4
    exhaustive_limit: int = 8  # exact search over all subsets and orders up to this many peers

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise UsageError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.strategy not in STRATEGIES:
            raise UsageError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.dtype is not None and self.dtype not in DTYPE_BYTES:
            raise UsageError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.backend not in ("ggml", "torch"):
            raise UsageError(f"backend must be ggml or torch, got {self.backend!r}")
        for name in ("context", "batch", "prefill_chunk", "activation_bytes", "kv_dtype_bytes", "wire_dtype_bytes"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.prefix_cache < 0:
            raise UsageError(f"prefix_cache must be non-negative, got {self.prefix_cache}")
        if self.margin_bytes < 0 or self.margin_fraction < 0 or self.hysteresis < 0 or self.token_id_bytes < 0 \
                or self.fetch_tolerance < 0:
            raise UsageError("margin, hysteresis, fetch tolerance and token id size must be non-negative")
        if self.exhaustive_limit < 0:
            raise UsageError("exhaustive_limit must be non-negative")

    @property
    def kv_positions(self) -> int:
        """KV positions every stage reserves room for: `batch` sequences of `context`, and the prefix cache."""
        return self.batch * self.context + self.prefix_cache


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class StageMemory:
    """Bytes a stage holds. `workspace` = activation/logits/dequant buffers + runtime margin."""

    weights: int
    kv: int
    workspace: int
    total: int
    limit: int

    @property
    def fits(self) -> bool:
        return self.total <= self.limit

    def to_json(self) -> dict:
        return {"weights": self.weights, "kv": self.kv, "workspace": self.workspace, "total": self.total, "limit": self.limit}


@dataclass(frozen=True)
class Stage:
    peer: str  # peer id
    start: int
    end: int  # exclusive
    memory: StageMemory
    ms_per_token: float  # this stage's compute time per decode step
    name: str = ""
    fetch_bytes: int = 0  # what its peer must fetch from others before it can load the stage
    fetch_s: float = 0.0  # that over the peer's link bandwidth

    @property
    def n_layers(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Hop:
    src: str
    dst: str
    ms: float  # latency: RTT/2 + bytes/bandwidth
    busy_ms: float  # how long the link is occupied (bytes/bandwidth)
    payload: str  # "activation" | "token"


@dataclass(frozen=True)
class Plan:
    feasible: bool
    reason: str
    strategy: str
    objective: str
    stages: tuple[Stage, ...] = ()
    ms_per_token: float | None = None  # one decode step through the ring, hops included
    tokens_per_s_single: float | None = None  # one micro-batch in flight
    tokens_per_s_pipelined: float | None = None  # ring kept full: the busiest stage or link sets the pace
    bottleneck: str | None = None  # peer id, or "a->b" for a link
    excluded: tuple[tuple[str, str], ...] = ()  # (peer id, why it has no layers)
    hops: tuple[Hop, ...] = ()
    bottleneck_ms: float | None = None
    micro_batches: int | None = None  # in flight needed to reach tokens_per_s_pipelined
    batch: int = 1
    context: int = 0  # tokens of context per sequence it sizes KV for (the coordinator's --context)

    @property
    def fetch_s(self) -> float:
        """Seconds until every stage's bytes are on its peer's disk (the fetches run in parallel)."""
        return max((s.fetch_s for s in self.stages), default=0.0)

    @property
    def fetch_bytes(self) -> int:
        return sum(s.fetch_bytes for s in self.stages)

    @property
    def objective_ms(self) -> float:
        """The cost the objective minimises (ms); infinite for an infeasible plan."""
        if not self.feasible:
            return _INF
        value = self.ms_per_token if self.objective == "latency" else self.bottleneck_ms
        return _INF if value is None else value

    @property
    def assignment(self) -> list[tuple[str, int, int]]:
        return [(s.peer, s.start, s.end) for s in self.stages]

    def layers_of(self, peer_id: str) -> tuple[int, int] | None:
        for s in self.stages:
            if s.peer == peer_id:
                return (s.start, s.end)
        return None

    def to_json(self) -> dict:
        def num(x):
            return None if x is None or not math.isfinite(x) else round(float(x), 6)

        return {
            "feasible": self.feasible,
            "reason": self.reason,
            "strategy": self.strategy,
            "objective": self.objective,
            "stages": [
                {
                    "peer": s.peer,
                    "name": s.name,
                    "layers": [s.start, s.end],
                    "memory": s.memory.to_json(),
                    "ms_per_token": num(s.ms_per_token),
                    "fetch": {"bytes": s.fetch_bytes, "seconds": num(s.fetch_s)},
                }
                for s in self.stages
            ],
            "predicted": {
                "ms_per_token": num(self.ms_per_token),
                "tokens_per_s_single": num(self.tokens_per_s_single),
                "tokens_per_s_pipelined": num(self.tokens_per_s_pipelined),
                "batch": self.batch,  # sequences per decode step: the tokens/s above are for all of them
            },
            "bottleneck": self.bottleneck,
            "hops": [{"from": h.src, "to": h.dst, "ms": num(h.ms), "payload": h.payload} for h in self.hops],
            "micro_batches": self.micro_batches,
            "context": self.context,
            "fetch": {"bytes": self.fetch_bytes, "seconds": num(self.fetch_s)},
            "unused_peers": [{"peer": p, "reason": r} for p, r in self.excluded],
        }


# --------------------------------------------------------------------------- cost model


def _dtype(spec: ModelSpec, options: PlanOptions) -> str:
    return options.dtype or spec.file_dtype


def _embedding_bytes(spec: ModelSpec, options: PlanOptions) -> int:
    if options.dtype is None:
        return spec.embedding_bytes
    return int(spec.embedding_params * DTYPE_BYTES[options.dtype])


def _check_range(spec: ModelSpec, start: int, end: int) -> None:
    if not 0 <= start < end <= spec.n_layers:
        raise UsageError(f"layer range [{start}, {end}) is not within the model's {spec.n_layers} layers")


def workspace_buffers(spec: ModelSpec, start: int, end: int, options: PlanOptions) -> int:
    """Activation, logits and mask buffers of a stage (bytes), before the margin.

    ggml (measured: equal to ggml's graph allocator within 1%): one compute buffer sized by the
    largest step, a micro-batch of `prefill_chunk` tokens: at the FFN, the residual and norm
    output (2 x hidden) beside gate, up and their product (3 x ffn) in f32 per token; the
    attention mask (f16, chunk x every cached token of the batch); flash attention keeps no
    score matrix. The last stage adds the logits of the sampled rows and a softmax copy.

    torch: one layer runs at a time, sized for one layer prefilling a chunk: hidden states,
    residual and norm output (3 x hidden), q and attention output (2 x q_dim), k and v
    (2 x kv_dim), MLP gate, up and activation (3 x ffn), and the attention scores of the chunk
    against the whole context (heads x chunk x context); all for `batch` sequences. Weights held
    quantized need one layer matrix dequantized at a time (hidden x ffn).
    """
    _check_range(spec, start, end)
    a = options.activation_bytes
    chunk = min(options.prefill_chunk, options.context)
    if options.backend == "ggml":
        total = chunk * a * (2 * spec.hidden + 3 * spec.ffn) + chunk * options.batch * options.context * 2
        if end == spec.n_layers:
            total += 2 * options.batch * spec.vocab * a
        return int(total)
    q_dim, kv_dim = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    per_token = 3 * spec.hidden + 2 * q_dim + 2 * kv_dim + 3 * spec.ffn
    total = options.batch * a * (chunk * per_token + spec.n_heads * chunk * options.context)
    if end == spec.n_layers:
        total += 2 * options.batch * spec.vocab * a
    if _dtype(spec, options) not in _FLOAT_DTYPES:
        total += spec.hidden * spec.ffn * a
    return int(total)


def stage_memory(spec: ModelSpec, start: int, end: int, options: PlanOptions, limit: int = 0,
                 exact: bool = True) -> StageMemory:
    """Memory a stage owning layers [start, end) needs; the same on every peer. `exact=False`
    sizes every layer as the largest (the search's uniform-layer bound, never below the truth)."""
    _check_range(spec, start, end)
    weights = spec.weight_bytes(start, end, options.dtype, exact)
    kv = options.kv_positions * spec.kv_bytes_per_token(end - start, options.kv_dtype_bytes)
    buffers = workspace_buffers(spec, start, end, options)
    margin = options.margin_bytes + math.ceil(options.margin_fraction * (weights + kv + buffers))
    workspace = buffers + margin
    return StageMemory(int(weights), int(kv), int(workspace), int(weights + kv + workspace), int(limit))


def stage_work(spec: ModelSpec, start: int, end: int, options: PlanOptions) -> tuple[float, float]:
    """(FLOPs, bytes read) of one decode step of `batch` sequences through layers [start, end).

    FLOPs: 2 per weight per sequence (matmuls, the head's included on the last stage) plus
    attention over the full context (4 x q_dim x context per layer per sequence).
    Bytes: every weight once per step (the embedding table only by the rows looked up) plus the
    whole KV cache of the batch.
    """
    _check_range(spec, start, end)
    n = end - start
    b = options.batch
    q_dim = spec.n_heads * spec.head_dim
    params = n * spec.layer_params + (spec.embedding_params if end == spec.n_layers else 0)
    flops = b * (2.0 * params + 4.0 * n * q_dim * options.context)
    weights = spec.weight_bytes(start, end, options.dtype)
    if start == 0:
        emb = _embedding_bytes(spec, options)
        weights = weights - emb + b * emb / spec.vocab
    kv = b * options.context * spec.kv_bytes_per_token(n, options.kv_dtype_bytes)
    return flops, float(weights + kv)


def stage_ms(spec: ModelSpec, peer: PeerCaps, start: int, end: int, options: PlanOptions) -> float:
    """Roofline time of one decode step on `peer`: compute- or bandwidth-bound, whichever is slower."""
    flops, nbytes = stage_work(spec, start, end, options)
    if peer.flops <= 0 or peer.mem_bw <= 0:
        return _INF
    return 1000.0 * max(flops / peer.flops, nbytes / peer.mem_bw)


def _activation_bytes(spec: ModelSpec, options: PlanOptions) -> int:
    return options.batch * spec.hidden * options.wire_dtype_bytes


def _token_bytes(options: PlanOptions) -> int:
    return options.batch * options.token_id_bytes


def fetch_bytes(spec: ModelSpec, held: Held | None, start: int, end: int) -> int:
    """Bytes (as stored in the file) a peer holding `held` lacks for a stage of layers [start, end)."""
    if held is None:
        return 0
    sizes = spec.layer_sizes if len(spec.layer_sizes) == spec.n_layers else (spec.layer_bytes,) * spec.n_layers
    total = sum(sizes[i] for i in range(start, end) if i not in held.layers)
    first, last = start == 0, end == spec.n_layers
    if first and not held.embed:
        total += spec.embedding_bytes
    if last and not held.head:
        total += spec.norm_bytes
        if not spec.tied_embeddings:
            total += spec.head_bytes
        elif not (first or held.embed):
            total += spec.embedding_bytes  # a tied head is the embedding
    return total


def hop(links: Links, a: PeerCaps, b: PeerCaps, nbytes: int, payload: str) -> Hop:
    link = links.get(a, b)
    busy = _INF if link.bw <= 0 else 1000.0 * nbytes / link.bw
    return Hop(a.id, b.id, 1000.0 * link.rtt_s / 2 + busy, busy, payload)


# --------------------------------------------------------------------------- pricing an assignment


def evaluate(
    spec: ModelSpec,
    peers: Sequence[PeerCaps],
    assignment: Sequence[tuple[str, int, int]],
    links: Links | None = None,
    options: PlanOptions = PlanOptions(),
    strategy: str | None = None,
    excluded: Iterable[tuple[str, str]] = (),
) -> Plan:
    """The Plan of a given assignment [(peer id, start, end), ...] in ring order.

    The layer ranges must tile [0, n_layers) in order; a stage over its peer's memory limit makes
    the plan infeasible, with the shortfall in the reason.
    """
    links = links or Links()
    strategy = strategy or options.strategy
    by_id = {p.id: p for p in peers}
    if not assignment:
        raise UsageError("an assignment needs at least one stage")
    expect = 0
    seen = set()
    for pid, start, end in assignment:
        if pid not in by_id:
            raise UsageError(f"assignment names unknown peer {pid}")
        if pid in seen:
            raise UsageError(f"assignment gives peer {pid} two stages")
        if start != expect or end <= start:
            raise UsageError(f"assignment is not contiguous at layer {expect}: got [{start}, {end})")
        seen.add(pid)
        expect = end
    if expect != spec.n_layers:
        raise UsageError(f"assignment covers {expect} of {spec.n_layers} layers")

    stages = []
    for pid, start, end in assignment:
        p = by_id[pid]
        mem = stage_memory(spec, start, end, options, p.mem_bytes)
        fetch = fetch_bytes(spec, p.held, start, end)
        stages.append(Stage(pid, start, end, mem, stage_ms(spec, p, start, end, options), p.name,
                            fetch, fetch / p.net_bw if fetch and p.net_bw > 0 else 0.0))
    hops: list[Hop] = []
    for s, t in zip(stages, stages[1:]):
        hops.append(hop(links, by_id[s.peer], by_id[t.peer], _activation_bytes(spec, options), "activation"))
    if len(stages) > 1:
        hops.append(hop(links, by_id[stages[-1].peer], by_id[stages[0].peer], _token_bytes(options), "token"))

    ms = sum(s.ms_per_token for s in stages) + sum(h.ms for h in hops)
    busiest = max(
        [(s.ms_per_token, s.peer) for s in stages] + [(h.busy_ms, f"{h.src}->{h.dst}") for h in hops],
        key=lambda x: x[0],
    )
    over = [s for s in stages if not s.memory.fits]
    reason = ""
    feasible = not over and math.isfinite(ms)
    if over:
        worst = max(over, key=lambda s: s.memory.total - s.memory.limit)
        short = worst.memory.total - worst.memory.limit
        reason = (
            f"needs {_gib_up(short)} GiB more memory: peer {peer_label(peers, worst.peer)} would use "
            f"{_gib(worst.memory.total)} GiB for layers [{worst.start}, {worst.end}), "
            f"it has {_gib(worst.memory.limit)} GiB"
        )
    elif not feasible:
        slow = [peer_label(peers, s.peer) for s in stages if not math.isfinite(s.ms_per_token)]
        reason = f"peer {slow[0] if slow else '?'} has no measured compute or bandwidth"
    unused = [(p.id, r) for p, r in _unused_reasons(spec, [p for p in peers if p.id not in seen], options, dict(excluded))]
    return Plan(
        feasible=feasible,
        reason=reason,
        strategy=strategy,
        objective=options.objective,
        stages=tuple(stages),
        ms_per_token=ms,
        tokens_per_s_single=1000.0 * options.batch / ms if ms > 0 else _INF,
        tokens_per_s_pipelined=1000.0 * options.batch / busiest[0] if busiest[0] > 0 else _INF,
        bottleneck=busiest[1],
        excluded=tuple(unused),
        hops=tuple(hops),
        bottleneck_ms=busiest[0],
        micro_batches=max(1, math.ceil(ms / busiest[0] - 1e-9)) if busiest[0] > 0 and math.isfinite(ms) else 1,
        batch=options.batch,
        context=options.context,
    )


def _unused_reasons(spec, peers, options, known: dict[str, str]):
    L = spec.n_layers
    one = stage_memory(spec, 1, 2, options) if L >= 3 else stage_memory(spec, 0, 1, options)
    smallest = min(one.total, stage_memory(spec, 0, 1, options).total, stage_memory(spec, L - 1, L, options).total)
    for p in peers:
        if p.id in known:
            yield p, known[p.id]
        elif p.mem_bytes < smallest:
            yield p, f"not enough memory for one layer: needs {_gib(smallest)} GiB, has {_gib(p.mem_bytes)} GiB"
        elif p.flops <= 0 or p.mem_bw <= 0:
            yield p, "no measured compute or memory bandwidth"
        else:
            yield p, "not used: every plan that gives it layers is predicted slower"


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def _gib_up(n: float) -> str:
    return f"{max(math.ceil(n / GiB * 100), 1) / 100:.2f}"


# --------------------------------------------------------------------------- search


class _Costs:
    """Per-peer stage costs by layer count and role, and pairwise hop costs, as arrays.

    Layers are identical in size, so a stage's memory and time depend only on how many layers it
    has and whether it is first (embedding), last (head) or both; memory does not even depend on
    the peer. Arrays are indexed by layer count 0..L and hold inf where the stage does not fit.
    """

    def __init__(self, spec: ModelSpec, peers: Sequence[PeerCaps], links: Links, options: PlanOptions):
        L = spec.n_layers
        self.L, self.peers, self.n = L, list(peers), len(peers)
        self.latency = options.objective == "latency"
        ranges = {
            "first": lambda k: (0, k) if k < L else None,
            "mid": lambda k: (1, 1 + k) if k <= L - 2 else None,
            "last": lambda k: (L - k, L) if k < L else None,
            "solo": lambda k: (0, L) if k == L else None,
        }
        self.mem = {r: np.full(L + 1, _INF) for r in ranges}
        work = {r: [None] * (L + 1) for r in ranges}
        for role, rng in ranges.items():
            for k in range(1, L + 1):
                se = rng(k)
                if se is not None:
                    self.mem[role][k] = stage_memory(spec, *se, options, exact=False).total
                    work[role][k] = stage_work(spec, *se, options)
        self.cost = {r: [] for r in ranges}
        for p in self.peers:
            for role in ranges:
                arr = np.full(L + 1, _INF)
                for k in range(1, L + 1):
                    if work[role][k] is not None and self.mem[role][k] <= p.mem_bytes and p.flops > 0 and p.mem_bw > 0:
                        f, b = work[role][k]
                        arr[k] = 1000.0 * max(f / p.flops, b / p.mem_bw)
                self.cost[role].append(arr)
        act, tok = _activation_bytes(spec, options), _token_bytes(options)
        self.hop = np.zeros((self.n, self.n))
        self.ret = np.zeros((self.n, self.n))
        for i, a in enumerate(self.peers):
            for j, b in enumerate(self.peers):
                if i != j:
                    h, r = hop(links, a, b, act, "activation"), hop(links, a, b, tok, "token")
                    self.hop[i, j] = h.ms if self.latency else h.busy_ms
                    self.ret[i, j] = r.ms if self.latency else r.busy_ms
        # idx[j, k] = j - k where k <= j, else L + 1 (an appended inf)
        j, k = np.meshgrid(np.arange(L + 1), np.arange(L + 1), indexing="ij")
        self.idx = np.where(k <= j, j - k, L + 1)
        self.op = np.add if self.latency else np.maximum

        # per-layer rate: cost[r][k] >= k * rate[i] for every role r and count k (bounds the search)
        self.rate = np.zeros(self.n)
        for i in range(self.n):
            ratios = [self.cost[r][i][1:] / np.arange(1, L + 1) for r in self.cost]
            self.rate[i] = float(np.min(np.concatenate(ratios)))
        self.left = np.arange(L, 0, -1, dtype=float)  # layers still to place after j = 0..L-1

    def bound(self, f: np.ndarray, rest: Sequence[int]) -> float:
        """Lower bound on any completion of a prefix with row f using peers from `rest`."""
        L = self.L
        if not rest:
            return _INF
        rates = self.rate[list(rest)]
        if self.latency:
            tail = self.left * float(rates.min())
        else:
            with np.errstate(divide="ignore"):
                tail = self.left / float(np.sum(1.0 / rates))
        return float(self.op(f[:L], tail).min())

    def usable(self, i: int) -> bool:
        return any(np.isfinite(self.cost[r][i]).any() for r in self.cost)

    def conv(self, f: np.ndarray, c: np.ndarray) -> np.ndarray:
        """g[j] = min over k of f[j - k] (+ or max) c[k]: one more stage after a prefix."""
        return self.op(np.append(f, _INF)[self.idx], c[None, :]).min(axis=1)

    def close(self, f: np.ndarray, c_last: np.ndarray) -> float:
        return float(self.op(f[::-1], c_last).min())

    def value(self, order: Sequence[int]) -> float:
        """Best objective of this ring order (every peer in it gets at least one layer)."""
        if len(order) == 1:
            return float(self.cost["solo"][order[0]][self.L])
        if len(order) > self.L:
            return _INF
        f = self.cost["first"][order[0]]
        for prev, q in zip(order, order[1:-1]):
            f = self.op(self.conv(f, self.cost["mid"][q]), self.hop[prev, q])
        v = self.close(f, self.cost["last"][order[-1]])
        return float(self.op(self.op(v, self.hop[order[-2], order[-1]]), self.ret[order[-1], order[0]]))

    def split(self, order: Sequence[int]) -> list[int]:
        """Layer counts per peer of `order` achieving value(order) (dynamic programming + backtrack)."""
        L = self.L
        if len(order) == 1:
            return [L]
        f = self.cost["first"][order[0]]
        choices = []
        for prev, q in zip(order, order[1:-1]):
            m = self.op(np.append(f, _INF)[self.idx], self.cost["mid"][q][None, :])
            choices.append(m.argmin(axis=1))
            f = self.op(m.min(axis=1), self.hop[prev, q])
        last = int(self.op(f[::-1], self.cost["last"][order[-1]]).argmin())
        counts = [last]
        j = L - last
        for arg in reversed(choices):
            k = int(arg[j])
            counts.append(k)
            j -= k
        counts.append(j)
        return counts[::-1]


def _better(v: float, k: int, best_v: float, best_k: int) -> bool:
    if not math.isfinite(best_v):
        return math.isfinite(v)
    if v < best_v - _REL_TOL * max(abs(best_v), 1e-12):
        return True
    return abs(v - best_v) <= _REL_TOL * max(abs(best_v), 1e-12) and k < best_k


def _exhaustive(c: _Costs, usable: list[int], start: tuple[float, tuple[int, ...]]) -> tuple[float, tuple[int, ...]]:
    """Exact minimum over every subset and order of `usable` (branch and bound on prefixes).

    A prefix's DP row f[j] is the best cost of placing layers [0, j) on it. Two prunings, both
    exact: a lower bound on every completion (each remaining layer costs at least the fastest
    remaining peer's per-layer time; for throughput, the layers spread perfectly over the
    remaining peers) against the best plan so far; and dominance: prefixes over the same peer set
    with the same first and last peer have identical completions, so a row no better anywhere
    than the rows already explored for that key is dropped.
    """
    L = c.L
    best = [start[0], start[1]]
    seen: dict[tuple[frozenset, int, int], np.ndarray] = {}

    def offer(v: float, order: tuple[int, ...]):
        if _better(v, len(order), best[0], len(best[1]) if best[1] else 1 << 30):
            best[0], best[1] = v, order

    def extend(order: tuple[int, ...], f: np.ndarray, remaining: list[int]):
        prev = order[-1]
        for q in remaining:
            h = c.hop[prev, q]
            v = c.op(c.op(c.close(f, c.cost["last"][q]), h), c.ret[q, order[0]])
            offer(float(v), order + (q,))
            rest = [r for r in remaining if r != q]
            if rest and len(order) + 2 <= L:
                g = c.op(c.conv(f, c.cost["mid"][q]), h)
                if c.bound(g, rest) >= best[0]:
                    continue
                # prefixes with the same peers, first and last peer have the same completions:
                # one whose row is nowhere better than those already explored cannot win
                key = (frozenset(order) | {q}, order[0], q)
                seen_row = seen.get(key)
                if seen_row is not None:
                    if np.all(g >= seen_row):
                        continue
                    seen[key] = np.minimum(seen_row, g)
                else:
                    seen[key] = g
                extend(order + (q,), g, rest)

    usable = sorted(usable, key=lambda i: (c.rate[i], i))  # strong peers first: good plans early
    for first in usable:
        offer(float(c.cost["solo"][first][L]), (first,))
    for first in usable:
        f = c.cost["first"][first]
        rest = [q for q in usable if q != first]
        if L >= 2 and c.bound(f, rest) < best[0]:
            extend((first,), f, rest)
    return best[0], best[1]


def _heuristic(c: _Costs, usable: list[int], rounds: int = 200) -> tuple[float, tuple[int, ...]]:
    """Multi-start local search over ring orders (for clusters beyond the exhaustive limit).

    Starts: for each k, the k fastest peers (per-layer time) and the k largest (memory), chained
    greedily along the cheapest links from the first. Then best-improvement moves until none
    helps: swap two stages, move one, drop one, insert an unused peer anywhere, replace a stage's
    peer by an unused one. Each candidate order is priced exactly by the same DP.
    """
    memo: dict[tuple[int, ...], float] = {}

    def value(order: tuple[int, ...]) -> float:
        if order not in memo:
            memo[order] = c.value(order)
        return memo[order]

    def per_layer(i: int) -> float:
        arr = c.cost["mid"][i] if c.L >= 3 else c.cost["solo"][i]
        finite = arr[np.isfinite(arr)]
        return float(finite[0]) if finite.size else _INF

    by_speed = sorted(usable, key=lambda i: (per_layer(i), -c.peers[i].mem_bytes, i))
    by_mem = sorted(usable, key=lambda i: (-c.peers[i].mem_bytes, per_layer(i), i))

    def chain(chosen: list[int]) -> tuple[int, ...]:
        order, left = [chosen[0]], list(chosen[1:])
        while left:
            nxt = min(left, key=lambda q: (c.hop[order[-1], q], chosen.index(q)))
            order.append(nxt)
            left.remove(nxt)
        return tuple(order)

    starts = [o for ranking in (by_speed, by_mem) for k in range(1, len(ranking) + 1)
              for o in (tuple(ranking[:k]), chain(ranking[:k]))]
    starts += _fitting_orders(c, usable)
    best_v, best = _INF, ()
    for order in starts:
        v = value(order)
        if _better(v, len(order), best_v, len(best) or 1 << 30):
            best_v, best = v, order
    if not math.isfinite(best_v):
        return best_v, best

    for _ in range(rounds):
        cur = list(best)
        unused = [u for u in usable if u not in cur]
        moves: list[tuple[int, ...]] = []
        n = len(cur)
        for i in range(n):
            for j in range(i + 1, n):
                s = cur[:]
                s[i], s[j] = s[j], s[i]
                moves.append(tuple(s))
            for j in range(n):
                if j != i:
                    s = cur[:i] + cur[i + 1 :]
                    s.insert(j, cur[i])
                    moves.append(tuple(s))
            if n > 1:
                moves.append(tuple(cur[:i] + cur[i + 1 :]))
            for u in unused:
                moves.append(tuple(cur[:i] + [u] + cur[i + 1 :]))
        for u in unused:
            for j in range(n + 1):
                moves.append(tuple(cur[:j] + [u] + cur[j:]))
        improved = False
        for order in moves:
            v = value(order)
            if _better(v, len(order), best_v, len(best)):
                best_v, best, improved = v, order, True
        if not improved:
            break
    return best_v, best


def _fitting_orders(c: _Costs, usable: list[int]) -> list[tuple[int, ...]]:
    """For every (first, last) pair, the fewest peers that hold the model, by memory alone.

    Memory decides feasibility, so if any plan fits, one of these orders does: the heuristic
    therefore never reports "does not fit" for a model that fits.
    """
    L = c.L

    def cap(role: str, i: int) -> int:
        finite = np.nonzero(np.isfinite(c.cost[role][i]))[0]
        return int(finite.max()) if finite.size else 0

    orders = [(i,) for i in usable if math.isfinite(c.cost["solo"][i][L])]
    caps = {r: {i: cap(r, i) for i in usable} for r in ("first", "mid", "last")}
    for f in usable:
        for l in usable:
            if f == l or not caps["first"][f] or not caps["last"][l]:
                continue
            total, mids = caps["first"][f] + caps["last"][l], []
            for m in sorted((m for m in usable if m not in (f, l) and caps["mid"][m]), key=lambda m: (-caps["mid"][m], m)):
                if total >= L:
                    break
                mids.append(m)
                total += caps["mid"][m]
            if total >= L:
                orders.append((f, *mids, l))
    return orders


def plan(spec: ModelSpec, peers: Sequence[PeerCaps], links: Links | None = None, options: PlanOptions = PlanOptions(),
         head: str | None = None) -> Plan:
    """The plan for `spec` on `peers` under `options.strategy` and `options.objective`; `head`: the
    peer that will run the scheduler (the coordinator), put at an end of the ring where it costs
    little (see _head_at_an_end)."""
    links = links or Links()
    ids = [p.id for p in peers]
    if len(set(ids)) != len(ids):
        raise UsageError("peer ids must be unique")
    if options.strategy == "proportional":
        chosen = _proportional(spec, peers, links, options)
    elif options.strategy == "even":
        chosen = _even(spec, peers, links, options)
    else:
        chosen = _optimal(spec, peers, links, options)
    return _head_at_an_end(spec, peers, links, options, _prefer_held(spec, peers, links, options, chosen), head)


def _head_at_an_end(spec, peers, links, options, chosen: Plan, head: str | None) -> Plan:
    """The same layer ranges with the head moved to the first or the last stage, if that costs at
    most `options.fetch_tolerance` more and fetches no longer. A token goes head -> first stage ->
    ... -> last stage -> head: from a middle stage the head sends and receives two messages over
    the network, from an end one of them is a call to itself (one network message per token fewer;
    the cost model's ring closes last -> first, exact only then)."""
    ids = [s.peer for s in chosen.stages]
    if not chosen.feasible or head not in ids[1:-1]:
        return chosen
    ranges = [(s.start, s.end) for s in chosen.stages]
    limit = chosen.objective_ms * (1.0 + options.fetch_tolerance)
    best = None
    for end in (0, len(ids) - 1):
        order = ids.copy()
        i = order.index(head)
        order[i], order[end] = order[end], order[i]
        p = evaluate(spec, peers, [(pid, a, b) for pid, (a, b) in zip(order, ranges)], links, options,
                     chosen.strategy, chosen.excluded)
        if p.feasible and p.objective_ms <= limit and p.fetch_s <= chosen.fetch_s and \
                (best is None or p.objective_ms < best.objective_ms):
            best = p
    return best or chosen


def _prefer_held(spec, peers, links, options, chosen: Plan) -> Plan:
    """The same layer ranges with the peers permuted so that the least has to be fetched and then
    loaded first (peers that joined with --from-peers hold only some layers on disk; a replan's
    peers have their running stage's layers in memory): among permutations that stay feasible and
    within `options.fetch_tolerance` of the chosen plan's cost, the one whose slowest fetch ends
    first, then the fewest bytes, then the fewest layers to load, then the cheapest. Exhaustive up
    to 5 stages, pairwise swaps beyond."""
    serving = {p.id: p.serving for p in peers if p.serving is not None}
    if not chosen.feasible or len(chosen.stages) < 2 or (chosen.fetch_bytes == 0 and not serving):
        return chosen
    ranges = [(s.start, s.end) for s in chosen.stages]
    ids = [s.peer for s in chosen.stages]
    limit = chosen.objective_ms * (1.0 + options.fetch_tolerance)
    excluded = chosen.excluded

    def price(order) -> Plan:
        return evaluate(spec, peers, [(pid, a, b) for pid, (a, b) in zip(order, ranges)], links, options,
                        chosen.strategy, excluded)

    def to_load(p: Plan) -> int:
        """Layers the plan's peers do not have loaded now."""
        kept = 0
        for s in p.stages:
            a, b = serving.get(s.peer, (0, 0))
            kept += max(0, min(b, s.end) - max(a, s.start))
        return sum(s.end - s.start for s in p.stages) - kept

    def rank(p: Plan):
        return (round(p.fetch_s, 3), p.fetch_bytes, to_load(p), p.objective_ms)

    def acceptable(p: Plan) -> bool:
        return p.feasible and p.objective_ms <= limit

    best = chosen
    if len(ids) <= 5:
        for order in itertools.permutations(ids):
            p = price(order)
            if acceptable(p) and rank(p) < rank(best):
                best = p
        return best
    order, improved = list(ids), True
    while improved:
        improved = False
        for i, j in itertools.combinations(range(len(order)), 2):
            trial = order.copy()
            trial[i], trial[j] = trial[j], trial[i]
            p = price(trial)
            if acceptable(p) and rank(p) < rank(best):
                best, order, improved = p, trial, True
    return best


def _optimal(spec, peers, links, options) -> Plan:
    peers = sorted(peers, key=lambda p: p.id)  # every peer computes the same plan from the same table
    if not peers:
        return _infeasible(spec, [], options, "optimal", "no peers")
    c = _Costs(spec, peers, links, options)
    usable = [i for i in range(c.n) if c.usable(i)]
    if not usable:
        return _infeasible(spec, peers, options, "optimal", "")
    heuristic = _heuristic(c, usable)
    if len(usable) <= options.exhaustive_limit:
        value, order = _exhaustive(c, usable, heuristic)
    else:
        value, order = heuristic
    if not order or not math.isfinite(value):
        return _infeasible(spec, peers, options, "optimal", "")
    counts = c.split(order)
    assignment, start = [], 0
    for i, k in zip(order, counts):
        assignment.append((peers[i].id, start, start + k))
        start += k
    known = {}
    if len(usable) > options.exhaustive_limit:
        why = "not used: the local search found no faster plan that gives it layers"
        known = {peers[i].id: why for i in usable if i not in order}
    return evaluate(spec, peers, assignment, links, options, "optimal", known.items())


def _ring_order(peers: Sequence[PeerCaps]) -> list[PeerCaps]:
    """exo's ring order: by memory, largest first (ties by id)."""
    return sorted(peers, key=lambda p: (-p.mem_bytes, p.id))


def _largest_remainder(weights: Sequence[float], total: int) -> list[int]:
    s = float(sum(weights))
    if s <= 0:
        return [0] * len(weights)
    quotas = [w / s * total for w in weights]
    counts = [int(math.floor(q)) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _from_counts(spec, ordered, counts, links, options, strategy, why_zero: str) -> Plan:
    assignment, start, excluded = [], 0, []
    for p, k in zip(ordered, counts):
        if k > 0:
            assignment.append((p.id, start, start + k))
            start += k
        else:
            excluded.append((p.id, why_zero))
    return evaluate(spec, ordered, assignment, links, options, strategy, excluded)


def _proportional(spec, peers, links, options) -> Plan:
    """exo's memory-weighted ring: layers in proportion to memory (largest-remainder rounding)."""
    if not peers:
        return _infeasible(spec, [], options, "proportional", "no peers")
    ordered = _ring_order(peers)
    counts = _largest_remainder([p.mem_bytes for p in ordered], spec.n_layers)
    if sum(counts) != spec.n_layers:
        return _infeasible(spec, ordered, options, "proportional", "")
    return _from_counts(spec, ordered, counts, links, options, "proportional", "its memory share rounds to zero layers")


def _even(spec, peers, links, options) -> Plan:
    """The same number of layers on every peer (the first ones take the remainder)."""
    if not peers:
        return _infeasible(spec, [], options, "even", "no peers")
    ordered = _ring_order(peers)
    q, r = divmod(spec.n_layers, len(ordered))
    counts = [q + (1 if i < r else 0) for i in range(len(ordered))]
    return _from_counts(spec, ordered, counts, links, options, "even", "more peers than layers")


# --------------------------------------------------------------------------- infeasible


def _feasible_with(mem: dict[str, np.ndarray], limits: list[float], L: int) -> bool:
    """Can the layers be placed at all with these memory limits (times ignored)?"""
    if any(mem["solo"][L] <= lim for lim in limits):
        return True
    if L < 2 or len(limits) < 2:
        return False
    # mem[r] is non-decreasing in the layer count (inf where the role cannot have that many)
    caps = {r: [int(np.searchsorted(mem[r], lim, side="right")) - 1 for lim in limits] for r in ("first", "mid", "last")}
    mid_total = sum(caps["mid"])
    for f in range(len(limits)):
        for l in range(len(limits)):
            if f != l and caps["first"][f] >= 1 and caps["last"][l] >= 1:
                if caps["first"][f] + caps["last"][l] + mid_total - caps["mid"][f] - caps["mid"][l] >= L:
                    return True
    return False


def _memory_arrays(spec: ModelSpec, options: PlanOptions) -> dict[str, np.ndarray]:
    L = spec.n_layers
    mem = {r: np.full(L + 1, _INF) for r in ("first", "mid", "last", "solo")}
    mem["first"][0] = mem["mid"][0] = mem["last"][0] = 0.0
    for k in range(1, L):
        mem["first"][k] = stage_memory(spec, 0, k, options, exact=False).total
        mem["last"][k] = stage_memory(spec, L - k, L, options, exact=False).total
        if k <= L - 2:
            mem["mid"][k] = stage_memory(spec, 1, 1 + k, options, exact=False).total
    mem["solo"][L] = stage_memory(spec, 0, L, options).total
    return mem


def shortfall(spec: ModelSpec, peers: Sequence[PeerCaps], options: PlanOptions) -> tuple[int, str | None]:
    """Least extra memory (bytes) one peer needs for the model to fit, and which peer (None: a new one)."""
    L = spec.n_layers
    mem = _memory_arrays(spec, options)
    usable = [p for p in peers if p.flops > 0 and p.mem_bw > 0]
    limits = [float(p.mem_bytes) for p in usable]
    if _feasible_with(mem, limits, L):
        return 0, None
    best, who = int(mem["solo"][L]), None  # a new machine holding everything always works
    needs = sorted({float(v) for arr in mem.values() for v in arr if math.isfinite(v) and v > 0})
    for i, p in enumerate(usable):
        cands = [v - p.mem_bytes for v in needs if v > p.mem_bytes and v - p.mem_bytes < best]
        lo, hi = 0, len(cands) - 1
        found = None
        while lo <= hi:
            mid = (lo + hi) // 2
            trial = list(limits)
            trial[i] = p.mem_bytes + cands[mid]
            if _feasible_with(mem, trial, L):
                found, hi = cands[mid], mid - 1
            else:
                lo = mid + 1
        if found is not None and found < best:
            best, who = int(math.ceil(found)), p.id
    return best, who


def peers_needed(spec: ModelSpec, mem_bytes: int, options: PlanOptions, most: int = 64) -> int | None:
    """The fewest peers with `mem_bytes` each that can hold the model (memory alone: what `p2pllm run`
    suggests when a model does not fit one machine); None when even `most` (or one per layer) cannot."""
    L = spec.n_layers
    mem = _memory_arrays(spec, options)
    for n in range(1, min(most, L) + 1):
        if _feasible_with(mem, [float(mem_bytes)] * n, L):
            return n
    return None


def peer_label(peers: Sequence[PeerCaps], peer_id: str) -> str:
    """A peer as a reason names it: by its name (a daemon's id is 32 hex digits that tell a person
    nothing), with the start of its id where another peer has the same name."""
    named = [p.name for p in peers if p.id == peer_id and p.name]
    if not named:
        return peer_id
    twins = sum(1 for p in peers if p.name == named[0])
    return named[0] if twins == 1 or named[0] == peer_id else f"{named[0]} [{peer_id[:8]}]"


def _infeasible(spec: ModelSpec, peers: Sequence[PeerCaps], options: PlanOptions, strategy: str, prefix: str) -> Plan:
    need = stage_memory(spec, 0, spec.n_layers, options).total
    have = sum(p.mem_bytes for p in peers)
    extra, who = shortfall(spec, peers, options)
    if peers and not any(p.flops > 0 and p.mem_bw > 0 for p in peers) or extra <= 0:
        reason = "no peer has measured compute and memory bandwidth"
    else:
        if who:
            short = next(p for p in peers if p.id == who)
            owned = short.mem_bytes
            reason = (f"needs {_gib_up(extra)} GiB more memory on peer {peer_label(peers, who)} ({_gib(owned)} GiB -> "
                      f"{_gib_up(owned + extra)} GiB), or one machine with {_gib_up(need)} GiB for all of it")
        else:
            reason = f"needs one machine with {_gib_up(need)} GiB for all of it"
        reason += f": the peers have {_gib(have)} GiB in all"
        if extra > need - have:  # the numbers must add up: say where the difference goes
            reason += ", and every stage a split adds needs its own KV and buffers"
    if prefix:
        reason = f"{prefix}: {reason}"
    unused = tuple((p.id, "the model does not fit") for p in peers)
    return Plan(False, reason, strategy, options.objective, excluded=unused, batch=options.batch)


# --------------------------------------------------------------------------- replanning


def should_replace(current: Plan | None, candidate: Plan, hysteresis: float = 0.10) -> bool:
    """Replace a running plan only if it is infeasible or the candidate is >= hysteresis better.

    "Better" is on the candidate's objective: latency compares ms per token, throughput the
    bottleneck; `hysteresis=0.10` asks for at least 10% more tokens/s (cost ratio >= 1.10).
    """
    if not candidate.feasible:
        return False
    if current is None or not current.feasible:
        return True
    cur = current.ms_per_token if candidate.objective == "latency" else current.bottleneck_ms
    new = candidate.objective_ms
    if cur is None or not math.isfinite(cur):
        return True
    if new <= 0:
        return cur > 0
    return cur / new >= (1.0 + hysteresis) * (1 - 1e-12)


__all__ = [
    "GiB",
    "Held",
    "Hop",
    "Link",
    "Links",
    "PeerCaps",
    "Plan",
    "PlanOptions",
    "Stage",
    "StageMemory",
    "evaluate",
    "fetch_bytes",
    "peers_needed",
    "plan",
    "shortfall",
    "should_replace",
    "stage_memory",
    "stage_ms",
    "stage_work",
    "workspace_buffers",
]
