"""`p2pllm plan`: a dry run of the planner for declared (or this machine's measured) peers.

    p2pllm plan --model llama-3-70b --dtype q4_0 \\
        --device name=a,mem=32GiB,tflops=8,bw=200GBps,net=1Gbps \\
        --device name=b,mem=24GiB,tflops=4,bw=100GBps,net=100Mbps,rtt=4ms

Prints per peer its layers, memory used of its limit and ms per token, marks the bottleneck,
and the predicted speed; `--json` prints Plan.to_json(). Exit 0 when the model fits, 3 when it
cannot (the reason says by how many GiB), 2 on usage errors (raised as UsageError).
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import sys

from ..errors import UsageError
from ..argtypes import non_negative_int
from ..model.kv_dtypes import kv_bytes_per_value
from ..model.spec import BUILTIN_SHAPES, DTYPE_BYTES, ModelSpec, resolve_spec
from ..model.store import ModelRefError, resolve_model
from .capability import max_memory_cap, parse_duration, parse_rate, parse_size, probe
from .planner import GiB, OBJECTIVES, STRATEGIES, Held, PeerCaps, Plan, PlanOptions, plan

DEVICE_KEYS = ("name", "mem", "tflops", "flops", "bw", "net", "rtt", "held")
DEFAULT_NET = "1Gbps"
DEFAULT_RTT = "1ms"
DISCOVER_SECONDS = 3.0


def add_plan_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="dry run: which peer would run which layers, memory used, predicted speed",
        description="Plan a model's layers over declared peers (--device) and/or this machine and the peers "
                    "announced on its network (--discover).",
    )
    p.add_argument("--model", required=True, metavar="PATH|CONFIG.json|NAME", type=plan_model,
                   help="a .gguf file, a Hugging Face folder or config.json, a built-in shape (e.g. llama-3-70b), "
                        "or a model in Ollama / LM Studio / the HF cache (p2pllm models)")
    p.add_argument("--device", action="append", default=[], metavar="name=a,mem=16GiB,tflops=4,bw=60GBps,net=1Gbps",
                   help="a peer: mem (usable memory), tflops (or flops=4TFLOPS), bw (memory bandwidth), "
                        f"net (link, default {DEFAULT_NET}), rtt (to the switch, default {DEFAULT_RTT}), "
                        "held (layers a --from-peers copy holds: none or 0:10+20:end; default the whole file); "
                        "repeatable")
    p.add_argument("--discover", action="store_true",
                   help="plan for this machine (measured) and the p2pllm peers announced on its network (mDNS)")
    p.add_argument("--max-memory", metavar="SIZE", help="with --discover: cap this machine's memory, e.g. 8GiB")
    p.add_argument("--interface", default=None, help="with --discover: network interface or address to browse on")
    p.add_argument("--cluster", default=None, help="with --discover: only peers of this cluster (default: every one)")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), help="dtype the weights are held in (default: the file's)")
    p.add_argument("--kv-dtype", choices=("f16", "q8_0", "f32"), default="f16", help="KV cache precision (default f16)")
    p.add_argument("--context", type=int, default=PlanOptions.context, help="tokens of context per sequence")
    p.add_argument("--batch", type=int, default=PlanOptions.batch, help="sequences decoded together")
    p.add_argument("--prefix-cache", type=non_negative_int, default=0, metavar="TOKENS",
                   help="KV positions kept for the prefix cache (join keeps one context's worth; default here 0)")
    p.add_argument("--objective", choices=OBJECTIVES, default=PlanOptions.objective)
    p.add_argument("--strategy", choices=STRATEGIES, default=PlanOptions.strategy)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)


def plan_model(text: str) -> str:
    """--model: a built-in shape's name first (they name no file), then a path or a store model."""
    if text in BUILTIN_SHAPES:
        return text
    try:
        return resolve_model(text)
    except ModelRefError as e:
        also = f"; no built-in shape {text!r} ({', '.join(BUILTIN_SHAPES)})" if e.not_found else ""
        raise argparse.ArgumentTypeError(f"{e}{also}") from None


def parse_device(text: str, index: int, n_layers: int) -> PeerCaps:
    """PeerCaps from 'name=a,mem=16GiB,tflops=4,bw=60GBps,net=1Gbps[,rtt=2ms][,held=0:10]'."""
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise UsageError(f"--device {text}: expected key=value pairs, got {part!r}")
        if key not in DEVICE_KEYS:
            raise UsageError(f"--device {text}: unknown key {key!r} (known: {', '.join(DEVICE_KEYS)})")
        if key in fields:
            raise UsageError(f"--device {text}: {key} given twice")
        fields[key] = value
    missing = [k for k in ("mem", "bw") if k not in fields]
    if "tflops" not in fields and "flops" not in fields:
        missing.append("tflops")
    if missing:
        raise UsageError(f"--device {text}: missing {', '.join(missing)}")
    if "tflops" in fields and "flops" in fields:
        raise UsageError(f"--device {text}: give tflops or flops, not both")
    name = fields.get("name", f"peer{index}")
    if "tflops" in fields:
        try:
            flops = float(fields["tflops"]) * 1e12
            if not math.isfinite(flops):
                raise ValueError
        except ValueError:
            raise UsageError(f"--device {text}: tflops must be a finite number, got {fields['tflops']!r}") from None
    else:
        flops = parse_rate(fields["flops"], "flops")
    values = {
        "mem": parse_size(fields["mem"]),
        "flops": flops,
        "bw": parse_rate(fields["bw"], "bandwidth"),
        "net": parse_rate(fields.get("net", DEFAULT_NET), "bandwidth"),
    }
    for key, value in values.items():
        if not value > 0:
            raise UsageError(f"--device {text}: {key} must be positive")
    rtt = parse_duration(fields.get("rtt", DEFAULT_RTT))
    held = parse_held(fields["held"], text, n_layers) if "held" in fields else None
    return PeerCaps(name, name, values["mem"], values["flops"], values["bw"], values["net"], rtt, held)


def parse_held(value: str, text: str, n_layers: int) -> Held:
    """held=none | held=A:B[+C:D...]: what a `join --from-peers` peer's copy holds (default: the
    whole file). A range holds what a stage of it needs: the embedding when it starts at 0, the
    final norm and output head when it ends at the model's last layer (B = n_layers or `end`)."""
    if value == "none":
        return Held()
    layers: set[int] = set()
    embed = head = False
    for part in value.split("+"):
        a, sep, b = part.partition(":")
        try:
            start, end = int(a), (n_layers if b == "end" else int(b))
        except ValueError:
            start = end = -1
        if not sep or not 0 <= start < end <= n_layers:
            raise UsageError(f"--device {text}: held must be none or START:END ranges within the model's "
                             f"{n_layers} layers joined by +, got {part!r}")
        embed, head = embed or start == 0, head or end == n_layers
        layers.update(range(start, end))
    return Held(frozenset(layers), embed, head)


def cmd_plan(args) -> int:
    spec = resolve_spec(args.model)
    if args.context < 1 or args.batch < 1:
        raise UsageError("--context and --batch must be at least 1")
    if args.context > spec.context:
        raise UsageError(f"--context {args.context} is beyond {spec.name}'s {spec.context} tokens")
    for flag in ("max_memory", "interface", "cluster"):
        if getattr(args, flag) is not None and not args.discover:
            raise UsageError(f"--{flag.replace('_', '-')} applies to --discover")
    args.max_memory = max_memory_cap(args.max_memory)  # a bad one is one line, before measuring anything
    peers = [parse_device(text, i, spec.n_layers) for i, text in enumerate(args.device)]
    notes = []
    if args.discover:
        discovered, note = discover_peers(args, {p.id for p in peers})
        peers += discovered
        notes.append(note)
    if not peers:
        raise UsageError("no peers: give --device name=a,mem=16GiB,tflops=4,bw=60GBps (repeatable) or --discover")
    ids = [p.id for p in peers]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise UsageError(f"two --device entries are named {dup[0]}; names must be unique")
    options = PlanOptions(
        context=args.context, batch=args.batch, prefix_cache=args.prefix_cache, dtype=args.dtype, objective=args.objective, strategy=args.strategy,
        kv_dtype_bytes=kv_bytes_per_value(args.kv_dtype), backend=planned_backend(spec, args.dtype),
    )
    result = plan(spec, peers, None, options)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        for note in notes:
            print(note, file=sys.stderr)
    else:
        print(format_plan(spec, peers, result, options))
        for note in notes:
            print(note)
    return 0 if result.feasible else 3


def discover_peers(args, taken: set[str]) -> tuple[list[PeerCaps], str]:
    """This machine (measured, or from the capability cache) and the daemons its network announces
    over mDNS (their advertised memory, FLOPS and bandwidth), with a note saying what was found."""
    import asyncio

    import psutil

    from .discovery import browse, pick_interface_address

    address = pick_interface_address(args.interface)
    print(f"measuring this machine and browsing mDNS on {address} for {DISCOVER_SECONDS:g} s ...", file=sys.stderr)
    caps = probe(max_memory=args.max_memory)
    announced = asyncio.run(browse(address, DISCOVER_SECONDS))
    local = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET}
    net, rtt = parse_rate(DEFAULT_NET), parse_duration(DEFAULT_RTT)
    host = socket.gethostname() or "this-machine"
    me = caps.to_peer_caps(_unique(host, taken), host, net, rtt)
    peers, skipped = [me], []
    for ann in sorted(announced, key=lambda a: a.name):
        if ann.host in local:
            skipped.append(f"{ann.name} (a daemon on this machine, measured above)")
        elif args.cluster is not None and ann.cluster != args.cluster:
            skipped.append(f"{ann.name} (cluster {ann.cluster})")
        else:
            name = _unique(ann.name, taken | {p.id for p in peers})
            peers.append(PeerCaps(name, name, ann.mem_bytes, ann.flops, ann.mem_bw, net, rtt))
    note = (f"note: --discover planned for this machine and {len(peers) - 1} peer(s) announced on {address} "
            f"(their advertised memory, FLOPS and bandwidth; links assumed {DEFAULT_NET}, {DEFAULT_RTT} RTT)")
    if skipped:
        note += "; not counted: " + ", ".join(skipped)
    return peers, note


def _unique(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    return next(f"{name}-{i}" for i in range(2, len(taken) + 3) if f"{name}-{i}" not in taken)


_KV_NAMES = {kv_bytes_per_value(d): d for d in ("f16", "q8_0", "f32")}


def planned_backend(spec: ModelSpec, dtype: str | None) -> str:
    """The backend a CPU peer would run this model with: ggml for GGUF files and quantized weights
    (held as stored), torch for Hugging Face folders held in a float dtype."""
    held = dtype or spec.file_dtype
    if spec.format == "gguf" and dtype is None:
        return "ggml"
    return "torch" if held in ("f32", "f16", "bf16") else "ggml"


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def _gib_up(n: float) -> str:
    return f"{max(math.ceil(n / GiB * 100), 1) / 100:.2f}"


def prediction_line(plan: dict, names: dict[str, str] | None = None) -> str:
    """What a plan predicts, in words: per decode step, per sequence and for the whole batch
    (`names`: peer id -> name, to name the bottleneck)."""
    pred, micro = plan["predicted"], plan.get("micro_batches") or 1
    batch = pred.get("batch", 1)
    if pred["ms_per_token"] is None:
        return "predicted: no estimate (a stage's speed is unknown)"
    step = f"{pred['ms_per_token']:.2f} ms per decode step"
    single = pred["tokens_per_s_single"] or 0.0
    if batch == 1:
        text = f"predicted: {step} = {single:.1f} tokens/s for one sequence"
    else:
        text = (f"predicted: {step} of a batch of {batch} sequences = {single / batch:.1f} tokens/s per sequence, "
                f"{single:.1f} tokens/s for the batch")
    if micro > 1 and pred["tokens_per_s_pipelined"]:
        text += f"; {pred['tokens_per_s_pipelined']:.1f} tokens/s with {micro} micro-batches in flight"
    if plan.get("bottleneck"):
        text += "; bottleneck " + "->".join((names or {}).get(p, p) for p in plan["bottleneck"].split("->"))
    return text


def fetch_lines(plan: dict, names: dict[str, str] | None = None) -> list[str]:
    """What peers holding part of the model (`join --from-peers`) must fetch before the plan can
    run: bytes and seconds at their link's bandwidth, per stage that needs any."""
    lines = []
    for s in plan["stages"]:
        fetch = s.get("fetch") or {}
        if fetch.get("bytes"):
            seconds = fetch.get("seconds")
            lines.append(f"fetch before serving: {(names or {}).get(s['peer'], s['name'] or s['peer'])} lacks "
                         f"{fetch['bytes'] / 2**20:.1f} MiB for layers [{s['layers'][0]}, {s['layers'][1]})"
                         + (f", ~{seconds:.1f} s at its link's speed" if seconds else ""))
    return lines


def format_plan(spec: ModelSpec, peers, result: Plan, options: PlanOptions) -> str:
    """The human-readable table `p2pllm plan` prints."""
    dtype = options.dtype or (f"the file's own encodings (mostly {spec.file_dtype})" if spec.format == "gguf"
                              else spec.file_dtype)
    lines = [
        f"{spec.name}: {spec.n_layers} layers, weights in {dtype} ({options.backend} backend), KV in "
        f"{_KV_NAMES.get(options.kv_dtype_bytes, f'{options.kv_dtype_bytes:g} B/value')}, "
        f"context {options.context} x batch {options.batch}; "
        f"strategy {result.strategy}, objective {result.objective}"
    ]
    if result.stages:
        header = ("peer", "layers", "n", "weights", "kv", "workspace", "used / limit GiB", "ms/step", "")
        rows = []
        for s in result.stages:
            m = s.memory
            mark = "<- bottleneck" if s.peer == result.bottleneck else ""
            if m.total > m.limit:
                mark = (mark + " " if mark else "") + f"OVER by {_gib_up(m.total - m.limit)} GiB"
            rows.append((s.peer, f"[{s.start}, {s.end})", str(s.n_layers), _gib(m.weights), _gib(m.kv),
                         _gib(m.workspace), f"{_gib(m.total)} / {_gib(m.limit)}", f"{s.ms_per_token:.2f}", mark))
        used = sum(s.memory.total for s in result.stages)
        limit = sum(s.memory.limit for s in result.stages)
        rows.append(("total", f"[0, {spec.n_layers})", str(spec.n_layers),
                     _gib(sum(s.memory.weights for s in result.stages)), _gib(sum(s.memory.kv for s in result.stages)),
                     _gib(sum(s.memory.workspace for s in result.stages)), f"{_gib(used)} / {_gib(limit)}",
                     f"{sum(s.ms_per_token for s in result.stages):.2f}", ""))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows]:
            lines.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        for h in result.hops:
            mark = "  <- bottleneck" if f"{h.src}->{h.dst}" == result.bottleneck else ""
            lines.append(f"hop {h.src} -> {h.dst} ({h.payload}): {h.ms:.2f} ms{mark}")
    if result.feasible:
        lines.append(prediction_line(result.to_json()))
        lines += fetch_lines(result.to_json())
    else:
        lines.append(f"cannot fit: {result.reason}")
    for peer, why in result.excluded:
        lines.append(f"unused: {peer}: {why}")
    return "\n".join(lines)


__all__ = ["add_plan_parser", "cmd_plan", "fetch_lines", "format_plan", "parse_device", "prediction_line"]
