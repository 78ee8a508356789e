"""`p2pllm` entry point. Errors users can cause end here as one line and an exit code."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from . import __version__
from .argparser import Parser
from .argtypes import (PeerModel, host_port, model_ref, model_ref_or_peer_model, non_negative_int, port, positive_int,
                       seconds, seed, serve_rate, thread_count, utf8_text, web_origin)
from .cluster.peers_cli import add_peers_parser
from .cluster.plan_cli import add_plan_parser
from .demo_cluster import add_demo_parser
from .model.models_cli import add_models_parser
from .errors import ModelFileError, P2PError
from .gateway.chat_cli import add_chat_parser
from .batch.cli import add_batch_parser

log = logging.getLogger("p2pllm")
BUSY_SERVE_RATE_TEXT = "4MB/s"  # cluster/fetch.py BUSY_SERVE_RATE, as typed

def _progress_printer(label: str):
    """A one-line progress bar on stderr when it is a terminal; silent otherwise."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        width = 30
        filled = int(width * done / max(total, 1))
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {100 * done // max(total, 1)}%")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def _set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- run


def _refuse_partial_copy(path, n_layers: int, command: str) -> None:
    """A partial copy (`join --from-peers` fetches only its stage's pieces; the rest are holes that
    read as zeros) is no model for a command that needs every layer."""
    from .model.pieces import PartialModel, is_partial

    if is_partial(path):
        part = PartialModel.load(path)
        if not part.complete(0, n_layers):
            raise ModelFileError(path, f"a partial copy holding {part.describe()} (what `join --from-peers` "
                                       f"fetched for its stage): {command} needs all {n_layers} layers and the "
                                       "embedding and output head; give the whole model file")


def cmd_run(args) -> int:
    from .cluster.capability import resolve_device
    from .model.sampling import SamplingParams
    from .model.spec import read_spec

    resolve_device(args.device)  # before loading anything: a missing GPU is a usage error, not a crash
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed).validate()
    spec = read_spec(args.model)
    _refuse_partial_copy(args.model, spec.n_layers, "run")
    # imported only now: it brings torch (a second), and the flags and the file above are refused without it
    from .runtime.local import LocalPipeline, parse_split

    _set_threads(args.threads)
    cuts = parse_split(args.split, spec.n_layers)
    _check_run_fits(args, spec, cuts)
    t0 = time.perf_counter()
    pipe = LocalPipeline(args.model, cuts, backend=args.backend, dtype=None if args.dtype == "auto" else args.dtype,
                         kv_dtype=args.kv_dtype, device=args.device, threads=args.threads, spec=spec,
                         progress=_progress_printer("loading"))
    load_seconds = time.perf_counter() - t0
    log.info("loaded %s (%s backend, %d stage%s) in %.1fs", args.model, pipe.backend, len(pipe.stages),
             "" if len(pipe.stages) == 1 else "s", load_seconds)
    if args.chat:
        prompt_ids = pipe.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = pipe.tokenizer.encode(args.prompt)
    stream = None if args.json else (lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    res = pipe.generate(prompt_ids, max_tokens=args.max_tokens, sampling=sampling, on_text=stream)
    if args.json:
        print(json.dumps({**res.to_json(), "backend": pipe.backend, "load_seconds": round(load_seconds, 3)}))
    else:
        sys.stdout.write("\n")
        print(
            f"[{len(res.prompt_ids)} prompt tokens at {res.prefill_tokens_per_s:.1f} tok/s, "
            f"{len(res.ids)} generated at {res.decode_tokens_per_s:.1f} tok/s, finish: {res.finish_reason}]",
            file=sys.stderr,
        )
    return 0


def _check_run_fits(args, spec, cuts: list[int]) -> None:
    """Refuse, in one line, a model this process may not hold (free memory, its cgroup's limit or
    --max-memory) before loading it: past a cgroup's limit the kernel OOM-kills the process, without
    a word; without one it swaps or thrashes. Sized with the planner's own memory model."""
    from .cluster.capability import memory_bound
    from .cluster.planner import GiB, PlanOptions, peers_needed, stage_memory
    from .errors import InfeasiblePlanError
    from .model.backends import choose_backend, held_dtype, stage_kv_dtype
    from .model.kvcache import kv_bytes_per_value
    from .runtime.local import stage_ranges

    dtype = None if args.dtype == "auto" else args.dtype
    backend = choose_backend(spec, args.backend, args.device, dtype)
    kv = stage_kv_dtype(spec, backend, args.device, args.kv_dtype)
    if backend == "torch" and args.kv_dtype is None and dtype is not None:
        kv = dtype  # a torch stage keeps its KV in the dtype it computes in
    held = held_dtype(spec, backend, args.device, dtype)
    # the KV cache holds the prompt and the answer, not the whole context; a token is at least one
    # byte of the prompt, and a chat template adds its own tokens around it
    tokens = min(spec.context, len(args.prompt.encode("utf-8")) + (256 if args.chat else 8) + args.max_tokens)
    options = PlanOptions(context=tokens, batch=1, dtype=held, kv_dtype_bytes=kv_bytes_per_value(kv), backend=backend)
    parts = [stage_memory(spec, a, b, options) for a, b in stage_ranges(cuts, spec.n_layers)]
    # one process: its runtime margin is paid once, however many in-process stages
    need = sum(p.total for p in parts) - (len(parts) - 1) * options.margin_bytes
    mem = memory_bound(args.device, args.max_memory)
    if need <= mem.usable_memory:
        return
    weights, kv_bytes = sum(p.weights for p in parts), sum(p.kv for p in parts)
    model = _typed_model(args)
    # the cluster a plain `join` makes plans for its default batch (DaemonConfig.batch, 8) and the whole context
    join_options = PlanOptions(context=spec.context, batch=8, prefix_cache=spec.context, dtype=held,
                               kv_dtype_bytes=kv_bytes_per_value(kv), backend=backend)
    n = peers_needed(spec, mem.usable_memory, join_options)
    where = (f"on {n} machines with {mem.usable_memory / GiB:.2f} GiB like this one" if n and n > 1
             else "on several machines with more memory than this one")
    raise InfeasiblePlanError(
        f"{os.path.basename(model.rstrip('/')) or model} needs {need / GiB:.2f} GiB (weights {weights / GiB:.2f}, "
        f"KV {kv_bytes / GiB:.2f}, workspace {(need - weights - kv_bytes) / GiB:.2f}) but this process has "
        f"{mem.describe_memory()}; "
        f"a cluster can serve it: run `p2pllm join --model {model}` {where}"
    )


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="generate text in one process (no network)",
                       description="Run a model in one process; --split cuts it into in-process stages.")
    p.add_argument("--model", required=True, type=model_ref, metavar="PATH|NAME",
                   help=".gguf file, Hugging Face folder, or a model in Ollama / LM Studio / the HF cache (p2pllm models)")
    p.add_argument("--prompt", required=True, type=utf8_text)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=positive_int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=seed, default=None)
    p.add_argument("--split", default=None, help="cut before these layers, e.g. 2,4")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    _add_backend_flags(p)
    p.add_argument("--dtype", default="auto", choices=["auto", "f32", "f16", "bf16"],
                   help="torch backend weights (auto: a bf16/f16 checkpoint stays so where this device computes it "
                        "well, else f32); a float dtype on a GGUF file selects the torch backend")
    p.add_argument("--threads", type=thread_count, default=None, help="compute threads (default: every core)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="refuse (exit 3) a model that needs more than this, e.g. 8GiB (default: free memory, "
                        "or the cgroup's limit where smaller)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_run)


def _add_backend_flags(p, urls: bool = False) -> None:
    if urls:  # join: --backend URL adds an external server (the DESIGN's join contract) beside auto|ggml|torch
        p.add_argument("--backend", default="auto", action=_BackendFlag,
                       metavar="auto|ggml|torch|URL[,max_concurrent=N]",
                       help="auto (default): ggml on a GGUF file's own encodings on the CPU, torch otherwise; a URL "
                            "(repeatable) adds an OpenAI-compatible server of the same model that shares this "
                            "gateway's requests: URL[,max_concurrent=N][,type=lm_studio|ollama|llama_server|vllm|"
                            "openai][,model=NAME][,id=ID][,api_key=KEY]")
        p.set_defaults(backend_urls=[])
    else:
        p.add_argument("--backend", default="auto", choices=["auto", "ggml", "torch"],
                       help="auto (default): ggml on a GGUF file's own encodings on the CPU, torch otherwise")
    p.add_argument("--kv-dtype", default=None, choices=["f16", "q8_0", "f32"],
                   help="KV cache precision (default: f16 for ggml stages, the compute dtype for torch)")



class _BackendFlag(argparse.Action):
    """join's --backend: auto|ggml|torch says how this peer computes; anything else is an external server
    (checked in cmd_join, so that a bad one is one line)."""

    def __call__(self, parser, namespace, value, option_string=None):
        if value in ("auto", "ggml", "torch"):
            namespace.backend = value
        else:
            namespace.backend_urls = [*namespace.backend_urls, value]


def _external_backends(args) -> list:
    from .gateway.backends import check_unique, load_workers, parse_backend_spec

    configs = [parse_backend_spec(text) for text in args.backend_urls]
    if args.workers:
        configs += load_workers(args.workers)
    return check_unique(configs)

# --------------------------------------------------------------------------- models


def cmd_make_demo_model(args) -> int:
    from .errors import UsageError
    from .model.demo import make_demo_model

    if os.path.lexists(args.path) and not os.path.isdir(args.path) and not args.force:
        raise UsageError(f"{args.path} exists; pass --force to replace it")
    try:
        path = make_demo_model(args.path, args.format, args.size, args.seed, args.qtype)
    except OSError as e:  # a folder that cannot be made or written (a file in the way, no permission, a full disk):
        # it was "internal error: FileExistsError ..."
        raise UsageError(f"cannot write {args.path}: {e.strerror or e}"
                         + (f" ({e.filename})" if e.filename and str(e.filename) != str(args.path) else "")) from None
    print(f"wrote {args.size} demo model ({args.format}) to {path} (random weights: its output is random text)")
    return 0


def _add_make_demo_model(sub) -> None:
    p = sub.add_parser("make-demo-model", help="write a seeded-random Llama with a real tokenizer",
                       description="Write a deterministic random-weight Llama model (no download). "
                                   "Its output is random text.")
    p.add_argument("path", help="output .gguf file (or folder with --format hf)")
    p.add_argument("--format", default="gguf", choices=["gguf", "hf"])
    p.add_argument("--size", default="tiny", choices=["tiny", "small", "125m", "1b", "3b"],
                   help="tiny: 6 layers, hidden 128; small: 8 layers, hidden 256; 125m: 12 layers, hidden 768; "
                        "1b: 16 layers, hidden 2048 (1.1B parameters); 3b: 30 layers, hidden 3072 (3.2B parameters)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--qtype", default="f32", choices=["f32", "f16", "q8_0", "q4_0"], help="GGUF weight type")
    p.add_argument("--force", action="store_true", help="replace an existing file at PATH")
    p.set_defaults(func=cmd_make_demo_model)


def cmd_check_model(args) -> int:
    from .errors import UsageError
    from .model.pieces import check_partial, is_partial
    from .model.spec import read_spec
    from .model.tokenizer import load_tokenizer

    layers = getattr(args, "layers", None)
    if is_partial(args.path):  # a copy fetched from peers (docs/fetch.md): only the layers it holds
        spec, part = check_partial(args.path, layers)
        held = f"partial copy holding {part.describe()}"
    else:
        read_spec(args.path)  # a bad header or metadata is refused before torch is imported (a second)
        from .model.loader import check_model

        spec, held = check_model(args.path), ""
        if layers is not None and not 0 <= layers[0] < layers[1] <= spec.n_layers:
            raise UsageError(f"--layers {layers[0]}:{layers[1]} is not within the model's {spec.n_layers} layers")
    load_tokenizer(args.path)  # the vocabulary and merges a head needs (a corrupt token refuses the file)
    print(
        f"{args.path}: ok{', ' + held if held else ''} ({spec.arch}, {spec.n_layers} layers, hidden {spec.hidden}, "
        f"{spec.n_heads}/{spec.n_kv_heads} heads, vocab {spec.vocab}, {spec.file_dtype})"
        + (f"; layers [{layers[0]}, {layers[1]}) can run from it" if layers is not None else "")
    )
    return 0


def _layer_range(text: str) -> tuple[int, int]:
    """--layers START:END, a stage's layers [START, END)."""
    start, sep, end = text.partition(":")
    try:
        rng = (int(start), int(end)) if sep else None
    except ValueError:
        rng = None
    if rng is None or not 0 <= rng[0] < rng[1]:
        raise argparse.ArgumentTypeError(f"expected START:END with 0 <= START < END, got {text!r}")
    return rng


def _add_check_model(sub) -> None:
    p = sub.add_parser("check-model", help="validate a model file",
                       description="Check a .gguf file or HF folder: headers, tensors, shapes, values.")
    p.add_argument("path", type=model_ref, help="a .gguf file, Hugging Face folder, or store model name")
    p.add_argument("--layers", type=_layer_range, metavar="START:END",
                   help="also require what a stage of layers [START, END) needs (a partial copy fetched from "
                        "peers holds only some layers)")
    p.set_defaults(func=cmd_check_model)


# --------------------------------------------------------------------------- cluster


def cmd_join(args) -> int:
    import asyncio

    from .cluster.capability import max_memory_cap, resolve_device
    from .cluster.discovery import pick_interface_address
    from .errors import UsageError
    from .model.spec import read_spec
    from .model.tokenizer import load_tokenizer
    from .transport.security import resolve_secret

    if args.port == args.gateway_port and (args.interface is None or args.gateway_host in (
            "127.0.0.1", "localhost", "0.0.0.0", "::", args.interface)):
        # the gRPC server binds that port on 127.0.0.1 (and --interface's address, or every one) first: the gateway
        # then failed with "address already in use", after a secret was made, as if another program held the port
        raise UsageError(f"--gateway-port {args.gateway_port} is this peer's gRPC --port too: give them different ports "
                         f"(defaults 7700 and 8700)")
    if args.api_key is not None and not args.api_key.strip():
        # `--api-key "$KEY"` with KEY unset started a gateway that any local program could use, without a word
        raise UsageError("--api-key is empty: give the key clients must send (or leave the flag out for a gateway "
                         "without one)")
    response_cache = _response_cache(args)
    backends = _external_backends(args)
    resolve_device(args.device)  # a bad model file, device or flag is reported before any secret is made
    max_memory = max_memory_cap(args.max_memory)
    host = pick_interface_address(args.interface)
    model, sources = args.model, []  # args.model stays as typed: the command for other machines names it
    if args.from_peers or isinstance(args.model, PeerModel):
        model, sources = _model_from_peers(args)  # the partial copy in this machine's cache
    spec = read_spec(model)
    if args.context is not None and args.context > spec.context:
        # the daemon clamped it to the model's context without a word (`plan` refuses it so)
        raise UsageError(f"--context {args.context} is beyond {spec.name}'s {spec.context} tokens")
    # imported only now: they bring torch (a second), and the flags and the file above are refused without it
    from .daemon import Daemon, DaemonConfig, peer_listen_hosts
    from .model.backends import choose_backend, stage_kv_dtype

    stage_kv_dtype(spec, choose_backend(spec, args.backend, args.device), args.device, args.kv_dtype)
    # the daemon's first use of the tokenizer: a folder without tokenizer.json (or a corrupt vocabulary) was
    # refused only after the secret was made and the join command printed
    tokenizer = load_tokenizer(model)
    state_dir = _check_history(args)
    _check_ports_free(args, peer_listen_hosts(args.interface, host))
    resolved = resolve_secret(args.cluster, args.secret, args.insecure, create=True)
    _announce_secret(args, resolved)
    cfg = DaemonConfig(
        model=model, port=args.port, gateway_port=args.gateway_port, gateway_host=args.gateway_host,
        cluster=args.cluster, peers=list(args.peer or []), mdns=not args.no_mdns, interface=args.interface,
        device=args.device, backend=args.backend, kv_dtype=args.kv_dtype,
        max_memory=max_memory, threads=args.threads, peer_timeout=args.peer_timeout, strategy=args.strategy,
        objective=args.objective,
        context=args.context, prefix_cache=args.prefix_cache, reprobe=args.reprobe,
        micro_batches=args.micro_batches, kv_replicas=args.kv_replicas,
        wire_dtype=None if args.wire_dtype == "f32" else {"f16": "float16", "bf16": "bfloat16"}[args.wire_dtype],
        api_key=args.api_key or os.environ.get("P2PLLM_API_KEY") or None, response_cache=response_cache,
        allowed_origins=tuple(args.allowed_origin or os.environ.get("P2PLLM_ORIGINS", "").split(",")),
        allowed_hosts=tuple(args.allowed_host or ()),
        secret=resolved.secret, insecure=resolved.secret is None, backends=backends,
        state_dir=str(state_dir), history=args.history, history_rows=args.history_rows,
        fetch_from=sources, model_cache=args.model_cache, fetch_serve_rate=args.fetch_serve_rate, tokenizer=tokenizer,
    )
    if args.name:
        cfg.name = args.name
    daemon = Daemon(cfg)
    asyncio.run(daemon.run())
    return 0


def _model_from_peers(args) -> tuple[str, list[str]]:
    """--from-peers (or --model NAME that only peers have): the model's header from the --peer
    addresses or the cluster's peers found by mDNS into a partial copy in the cache (its layers come
    once the peer knows which it will hold); the copy's path and the peers to fetch from."""
    import asyncio

    from .cluster.fetch import learn_model
    from .cluster.model_sources import find_sources
    from .errors import P2PError
    from .transport.security import resolve_secret, security_for

    name = args.model if isinstance(args.model, PeerModel) else None
    security = security_for(resolve_secret(args.cluster, args.secret, args.insecure, create=False))

    async def learn():
        try:
            found = await find_sources(security, peers=args.peer or (), cluster=args.cluster, mdns=not args.no_mdns,
                                       interface=args.interface, name=name)
        except P2PError as e:
            if name is None:
                raise
            raise type(e)(f"{name.local_error}; {e}") from None  # why not here, then why not from peers
        log.info("learning the model from %s (%s)", ", ".join(found.addresses), found.how)
        return str(await learn_model(found.addresses, security, args.model_cache)), found.addresses

    return asyncio.run(learn())


def _add_history_flags(p) -> None:
    from .gateway.history import DEFAULT_ROWS, MODES

    p.add_argument("--state-dir", default=None, metavar="DIR",
                   help="where this peer keeps its state, the request history among it (default: "
                        "$XDG_STATE_HOME/p2pllm/CLUSTER, else ~/.local/state/p2pllm/CLUSTER)")
    p.add_argument("--history", default="meta", choices=MODES,
                   help="record each request this gateway answers (GET /v1/history): meta (default) keeps counts, "
                        "timings and a hash of the prompt; full also the prompt and answer text; off: nothing")
    p.add_argument("--history-rows", type=positive_int, default=DEFAULT_ROWS, metavar="N",
                   help=f"requests the history keeps, the oldest dropped first (default {DEFAULT_ROWS})")


def _check_history(args):
    """The state dir; with the history on, its database opened once here so that an unusable one is
    one line before any secret is made (the daemon opens it again)."""
    from .gateway.history import RequestHistory, default_state_dir

    state_dir = args.state_dir or default_state_dir(args.cluster)
    history = RequestHistory.open(state_dir, args.history, args.history_rows, port=args.port)
    if history is not None:
        history.close()
    return state_dir


def _add_response_cache_flags(p) -> None:
    from .argtypes import cache_entries, similarity, size_bytes, ttl_seconds
    from .gateway.response_cache import DEFAULT_SEMANTIC_THRESHOLD, CacheSettings

    d = CacheSettings()
    p.add_argument("--response-cache", type=cache_entries, default=d.max_entries, metavar="ENTRIES|off",
                   help=f"answers of deterministic requests (temperature 0 or a seed) the gateway keeps and serves "
                        f"again without the cluster (default {d.max_entries}; off: none)")
    p.add_argument("--response-cache-memory", type=size_bytes, default=d.max_bytes, metavar="SIZE",
                   help=f"most memory those answers take (default {d.max_bytes >> 20}MiB)")
    p.add_argument("--response-cache-ttl", type=ttl_seconds, default=d.ttl, metavar="SECONDS",
                   help=f"how long an answer is served from the cache (default {d.ttl:g})")
    p.add_argument("--semantic-cache", type=similarity, nargs="?", const=DEFAULT_SEMANTIC_THRESHOLD, default=None,
                   metavar="THRESHOLD",
                   help=f"also serve an answer to a request whose last user message is this close (cosine of the "
                        f"served model's embeddings; bare: {DEFAULT_SEMANTIC_THRESHOLD}) and that is otherwise the "
                        f"same (default: off)")


def _response_cache(args):
    """The gateway's CacheSettings from the join flags; None when the cache is off."""
    from .errors import UsageError
    from .gateway.response_cache import CacheSettings

    if not args.response_cache:
        if args.semantic_cache is not None:
            raise UsageError("--semantic-cache needs the response cache: drop --response-cache off")
        return None
    return CacheSettings(args.response_cache, args.response_cache_memory, args.response_cache_ttl,
                         args.semantic_cache)


def _typed_model(args) -> str:
    """--model as the user typed it: a store name works on the other machines too, a resolved path may not."""
    return getattr(args.model, "ref", None) or str(args.model)


def _announce_secret(args, resolved) -> None:
    """Tell the user how other machines join (the secret was made or read here), or warn loudly."""
    import shlex

    if resolved.source == "insecure":
        for line in ("WARNING: --insecure: peers do not authenticate each other and all peer traffic (prompts, "
                     "activations, tokens) is plaintext.",
                     "WARNING: anyone on this network can join this cluster, read its traffic or send it frames. "
                     "Use it only on a network you fully trust."):
            print(line, file=sys.stderr, flush=True)
        return
    if resolved.source not in ("new", "file"):
        return
    what = "made a new cluster secret" if resolved.source == "new" else "using the cluster secret"
    model_args = (["--from-peers", *(["--peer", args.peer[0]] if args.peer else [])] if args.from_peers
                  else ["--model", _typed_model(args)])
    # --secret=S: a secret of the user's own may start with "-", which `--secret S` reads as a flag
    command = shlex.join(["p2pllm", "join", *model_args, "--cluster", args.cluster, f"--secret={resolved.secret}"])
    print(f"p2pllm: {what} of cluster {args.cluster!r} kept in {resolved.path} (mode 0600)\n"
          f"p2pllm: to add another machine to this cluster, run there:\n\n    {command}\n", flush=True)


def _add_security_flags(p, what: str) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--secret", default=None,
                   help=f"the cluster secret {what} (or P2PLLM_SECRET; default: the one stored for --cluster)")
    g.add_argument("--insecure", action="store_true",
                   help="no secret: plaintext, unauthenticated peer traffic (only on a network you fully trust)")


def _add_join(sub) -> None:
    p = sub.add_parser("join", help="run a peer daemon in the foreground",
                       description="Start a peer: find the others, agree on a plan, serve its layers.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=model_ref_or_peer_model, metavar="PATH|NAME",
                        help=".gguf file, Hugging Face folder, or a model in Ollama / LM Studio / the HF cache "
                             "(p2pllm models); a NAME found nowhere here is fetched from the cluster's peers that serve "
                             "it (its name, file name or fingerprint), as with --from-peers")
    source.add_argument("--from-peers", action="store_true",
                        help="no model file here: learn the cluster's model from its peers (--peer, else mDNS) and "
                             "fetch only the layers this peer will hold, verified (docs/fetch.md)")
    p.add_argument("--model-cache", default=None, metavar="DIR",
                   help="where --from-peers keeps what it fetched (default ~/.cache/p2pllm/models; reused next time)")
    p.add_argument("--fetch-serve-rate", type=serve_rate, default=BUSY_SERVE_RATE_TEXT, metavar="RATE",
                   help="what this peer serves to peers fetching layers from it while requests run through it, "
                        f"in all (default {BUSY_SERVE_RATE_TEXT}; 0: no cap); idle, it serves at full speed")
    p.add_argument("--port", type=port, default=7700, help="gRPC port (default 7700)")
    p.add_argument("--gateway-port", type=port, default=8700, help="HTTP gateway port (default 8700)")
    p.add_argument("--gateway-host", default="127.0.0.1", help="address the gateway binds (default 127.0.0.1)")
    p.add_argument("--name", default=None, help="this peer's name (default: the hostname)")
    p.add_argument("--cluster", default="default", help="only peers of the same cluster name join together")
    p.add_argument("--peer", action="append", type=host_port, metavar="HOST:PORT",
                   help="a peer to contact directly (repeatable; for networks without multicast)")
    p.add_argument("--no-mdns", action="store_true", help="do not advertise or browse with mDNS")
    p.add_argument("--interface", default=None, help="network interface or address to use (default: automatic)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    _add_backend_flags(p, urls=True)
    p.add_argument("--workers", default=None, metavar="FILE.json",
                   help="external backends from a JSON list of {id, host, port, type, model, max_concurrent_requests}")
    p.add_argument("--max-memory", default=None, help="cap the memory this peer offers, e.g. 8GiB")
    p.add_argument("--threads", type=thread_count, default=None,
                   help="compute threads (default: every core for a GGUF stage of the whole model, else cores - 1); "
                        "several daemons on one machine should split the cores between them: OpenMP threads "
                        "spinning on shared cores slow every stage")
    p.add_argument("--peer-timeout", type=seconds, default=2.0, help="seconds of silence before a peer is lost")
    p.add_argument("--strategy", default="optimal", choices=["optimal", "proportional", "even"])
    p.add_argument("--objective", default="latency", choices=["latency", "throughput"])
    p.add_argument("--context", type=positive_int, default=None,
                   help="tokens of context to plan KV memory for (default and most: the model's)")
    p.add_argument("--prefix-cache", type=non_negative_int, default=None, metavar="TOKENS",
                   help="KV positions kept for prompts that start like recent ones (default: the context; 0: off)")
    p.add_argument("--reprobe", action="store_true", help="measure this machine again instead of using the cache")
    p.add_argument("--kv-replicas", type=int, default=1, choices=[0, 1],
                   help="1: stream KV deltas to the ring successor for warm failover (default); 0: replay instead")
    p.add_argument("--micro-batches", type=positive_int, default=None,
                   help="micro-batches in flight on the ring (default: the number of stages)")
    p.add_argument("--wire-dtype", default="f32", choices=["f32", "f16", "bf16"],
                   help="activations on the wire (f16/bf16 halve the bytes; f32 keeps tokens exact)")
    p.add_argument("--api-key", default=None, help="require this bearer key on the gateway (or P2PLLM_API_KEY)")
    p.add_argument("--allowed-origin", action="append", type=web_origin, default=None, metavar="ORIGIN",
                   help="a web page origin (https://app.example.com; *: any) whose browser requests the gateway "
                        "answers, besides its own and loopback ones (repeatable; or P2PLLM_ORIGINS, comma-separated)")
    p.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                   help="a Host name a loopback-bound gateway answers besides local ones, e.g. behind a proxy "
                        "that keeps the client's Host (repeatable; *: any)")
    _add_response_cache_flags(p)
    _add_history_flags(p)
    _add_security_flags(p, "that peers authenticate each other with; made and stored on first use")
    p.set_defaults(func=cmd_join)


def _check_ports_free(args, grpc_hosts: list[str]) -> None:
    """A port in use is refused before a secret is made and the join command printed (the daemon
    binds them again a moment later; one taken in between is still its one-line error)."""
    from .sockets import bind_tcp

    for host in grpc_hosts:
        bind_tcp(host, args.port, "the gRPC server").close()
    bind_tcp(args.gateway_host, args.gateway_port, "the gateway").close()


def cmd_status(args) -> int:
    import asyncio

    from .transport.client import fetch_status
    from .transport.security import resolve_secret, security_for

    security = security_for(resolve_secret(args.cluster, args.secret, args.insecure, create=False))
    status = asyncio.run(fetch_status(args.host, security))
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"coordinator {status['coordinator'][:8]}  epoch {status['epoch']}")
    if status.get("not_serving"):
        print(f"not serving: {status['not_serving']}")
    print(f"{'peer':<20} {'id':<10} {'address':<22} {'layers':<10} {'health':<8} note")
    for peer in status["peers"]:
        layers = f"[{peer['layers'][0]}, {peer['layers'][1]})" if peer["layers"] else "-"
        health = "ok" if peer["healthy"] else "LOST"
        note = f"excluded: {peer['excluded_reason']}" if peer["excluded_reason"] else peer.get("state", "")
        if peer.get("fetch"):
            note = _fetch_note(peer["fetch"])
        print(f"{peer['name'][:20]:<20} {peer['id'][:8]:<10} {peer['address']:<22} {layers:<10} {health:<8} {note}")
    plan = status.get("plan")
    if plan and plan.get("predicted"):
        from .cluster.plan_cli import fetch_lines, prediction_line

        print(prediction_line(plan, {p["id"]: p["name"] for p in status["peers"]}))
        for line in fetch_lines(plan, {p["id"]: p["name"] for p in status["peers"]}):
            print(line.replace("fetch before serving:", "fetched for this plan:", 1))
    if status.get("backends"):
        _print_backends(status["backends"])
    return 0


def _fetch_note(f: dict) -> str:
    """'fetching [10, 20): 12.0/21.1 MiB at 40.2 MB/s, ~0.2 s left'"""
    eta = f", ~{f['eta_s']:.0f} s left" if f.get("eta_s") is not None else ""
    return (f"fetching [{f['layers'][0]}, {f['layers'][1]}): {f['done'] / 2**20:.1f}/{f['total'] / 2**20:.1f} MiB "
            f"at {f['mb_s']:.1f} MB/s{eta}")


def _print_backends(backends: list[dict]) -> None:
    """The external servers of the asked peer's gateway (`--backend`, `--workers`)."""
    print(f"{'backend':<20} {'url':<30} {'health':<8} {'in flight':<10} {'served':>7} {'failed':>7}  model / note")
    for b in backends:
        health = {True: "ok", False: "DOWN", None: "unknown"}[b["healthy"]]
        note = b["reason"] or b["model"] or ""
        print(f"{b['id'][:20]:<20} {b['url'][:30]:<30} {health:<8} {b['in_flight']}/{b['max_concurrent']:<8} "
              f"{b['served']:>7} {b['failed']:>7}  {note}")


def _add_status(sub) -> None:
    p = sub.add_parser("status", help="show the cluster as one peer sees it",
                       description="Peers, plan epoch, layers, health.")
    p.add_argument("--host", type=host_port, default="127.0.0.1:7700", help="a peer's gRPC address")
    p.add_argument("--json", action="store_true")
    p.add_argument("--cluster", default="default", help="whose stored secret to use (default: default)")
    _add_security_flags(p, "of the peer's cluster")
    p.set_defaults(func=cmd_status)


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="p2pllm", description="Peer-to-peer pipeline-parallel LLM serving.")
    parser.add_argument("--version", action="version", version=f"p2pllm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_run(sub)
    _add_make_demo_model(sub)
    _add_check_model(sub)
    _add_join(sub)
    _add_status(sub)
    add_plan_parser(sub)
    add_peers_parser(sub, _add_security_flags)
    add_chat_parser(sub)
    add_batch_parser(sub)
    add_demo_parser(sub)
    add_models_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verbose:  # gRPC's own INFO lines (a refused handshake on every redial) break one-line errors and
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # flood daemon logs; our refusal warning says it once a minute
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("gguf", "httpx", "httpcore"):  # their per-file / per-request INFO lines are not ours to print
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except P2PError as e:
        print(f"p2pllm: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("p2pllm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug of ours: one line, the traceback only on request
        if os.environ.get("P2PLLM_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"p2pllm: internal error: {type(e).__name__}: {first} (set P2PLLM_DEBUG=1 for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
