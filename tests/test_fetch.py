"""Layer bytes from peers (--from-peers): a model file cut into pieces, served by real gRPC servers
with mutual TLS, fetched into a sparse partial copy that the loaders and `check-model` accept for
its layers; busy, dying and lying sources; an interrupted fetch that resumes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from conftest import assert_one_line_error, run_cli

from p2pllm.cluster import fetch as fetch_mod
from p2pllm.cluster.fetch import (
    FetchError,
    ModelFetcher,
    PieceSource,
    fetch_layers,
    parse_manifest,
)
from p2pllm.model.backends import open_stage
from p2pllm.model.batch import BatchMeta, SeqChunk
from p2pllm.model.demo import make_demo_model
from p2pllm.model.loader import stored_slice
from p2pllm.model.pieces import (
    HEADER,
    PartialModel,
    find_cached,
    journal_path,
    pieces_of,
)
from p2pllm.model.spec import read_spec
from p2pllm.proto import p2pllm_pb2 as pb
from p2pllm.transport.client import ClientPool
from p2pllm.transport.security import Security
from p2pllm.transport.server import start_server

SECRET = "fetch-test-secret-" + os.urandom(8).hex()
CHUNK = 16 << 10  # small chunks: every tensor of the tiny model is several of them
MIDDLE = (2, 4)


@pytest.fixture(scope="module")
def security() -> Security:
    return Security.from_secret(SECRET)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """The tiny demo Llama in Q8_0 (quantized blocks, f32 norms: tensors of several sizes and alignments)."""
    return make_demo_model(tmp_path_factory.mktemp("fetch-model") / "tiny-q8.gguf", "gguf", "tiny", qtype="q8_0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def serve(source: PieceSource, security: Security) -> tuple[grpc.aio.Server, str]:
    """A real peer server whose handler is the PieceSource (what the daemon will delegate to)."""
    port = _free_port()
    return await start_server(source, "127.0.0.1", port, security), f"127.0.0.1:{port}"


def _bytes(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def _journal(path: Path) -> dict:
    return json.loads(journal_path(path).read_text())["pieces"]


def _needed_names(layout, start, end) -> set[str]:
    return {p.name for p in layout.needed(start, end)}


class Corrupting(PieceSource):
    """A source whose file reads true but whose sent bytes are garbage for some pieces: its hash is right,
    its data is not (a fault a real server cannot otherwise be made to commit)."""

    def __init__(self, model, corrupt: set[str], **kw):
        super().__init__(model, **kw)
        self.corrupt = {self.layout.piece(n).offset: n for n in corrupt}
        self.corrupted: list[str] = []

    def _read(self, offset: int, nbytes: int) -> bytes:
        data = super()._read(offset, nbytes)
        if offset in self.corrupt:
            self.corrupted.append(self.corrupt[offset])
            data = bytes(b ^ 0x5A for b in data[:64]) + data[64:]
        return data


class Slow(PieceSource):
    """Reads one chunk at a time, slowly, and says when it is in the middle of sending a piece."""

    def __init__(self, model, delay: float, **kw):
        super().__init__(model, **kw)
        self.read_bytes = self.chunk_bytes
        self.delay = delay
        self.starts = {p.offset for p in self.layout.pieces}
        self.mid_piece = threading.Event()
        self.in_the_middle_of: list[str] = []

    def _read(self, offset: int, nbytes: int) -> bytes:
        if offset not in self.starts:  # a chunk after the first of its piece: one went out already
            self.in_the_middle_of.append(next(p.name for p in reversed(self.layout.pieces) if p.offset < offset))
            self.mid_piece.set()
        time.sleep(self.delay)
        return super()._read(offset, nbytes)


# --------------------------------------------------------------------------- pieces and manifests


def test_pieces_tile_the_file_and_each_hash_is_sha256_of_its_bytes(model, security):
    layout = pieces_of(model)
    spec = read_spec(model)
    assert (layout.fingerprint, layout.n_layers, layout.size) == (spec.fingerprint, spec.n_layers, model.stat().st_size)
    assert layout.pieces[0].name == HEADER and layout.pieces[0].offset == 0
    pos = 0
    for p in layout.pieces:  # consecutive, no gap, no overlap, to the end of the file
        assert p.offset == pos and p.nbytes > 0
        pos += p.nbytes
    assert pos == layout.size
    tensors = {p.name for p in layout.pieces} - {HEADER}
    assert len(tensors) == len(layout.pieces) - 1 == 3 + 9 * spec.n_layers
    for p in layout.pieces:
        assert p.layer == (int(p.name.split(".")[1]) if p.name.startswith("blk.") else None)

    async def scenario():
        source = PieceSource(model)
        server, address = await serve(source, security)
        pool = ClientPool(security)
        try:
            before = parse_manifest(await pool.get(address).model_manifest(), address)
            assert before.layout == layout and before.held == {p.name for p in layout.pieces}
            assert before.hashes == {}, "hashed up front"
            for p in layout.pieces:
                assert await source.sha256(p.name) == hashlib.sha256(_bytes(model, p.offset, p.nbytes)).hexdigest()
            after = parse_manifest(await pool.get(address).model_manifest(), address)
            assert after.hashes == {p.name: await source.sha256(p.name) for p in layout.pieces}
        finally:
            await pool.close()
            await server.stop(None)
            source.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("start, end", [(0, 1), MIDDLE, (5, 6), (0, 6)])
def test_needed_pieces_are_what_a_stage_maps_and_its_layers(model, start, end):
    layout = pieces_of(model)
    _spec, stored = stored_slice(model, start, end)
    needed = _needed_names(layout, start, end)
    assert {t.info.name for t in stored} <= needed
    assert HEADER in needed
    assert ("token_embd.weight" in needed) == (start == 0)
    assert ("output.weight" in needed) == ("output_norm.weight" in needed) == (end == layout.n_layers)
    layers = {layout.piece(n).layer for n in needed} - {None}
    assert layers == set(range(start, end))


def test_a_hostile_manifest_is_refused_in_words(model):
    source = PieceSource(model)
    good = source.manifest()

    def mutated(change) -> pb.Manifest:
        m = pb.Manifest()
        m.CopyFrom(good)
        change(m)
        return m

    cases = [
        (lambda m: setattr(m, "file_name", "../../.bashrc"), "file name"),
        (lambda m: setattr(m, "fingerprint", "../x"), "fingerprint"),
        (lambda m: setattr(m.pieces[3], "nbytes", m.pieces[3].nbytes + 1), "does not follow"),
        (lambda m: setattr(m, "size", m.size + 7), "the pieces end at byte"),
        (lambda m: setattr(m.pieces[5], "sha256", "zz"), "sha256"),
        (lambda m: setattr(m.pieces[5], "layer", 4), "claims layer"),
        (lambda m: setattr(m, "format", "ggml"), "GGUF files and Hugging Face folders"),
        (lambda m: setattr(m, "format", "hf"), "0 files"),  # a folder needs its file list
        (lambda m: setattr(m.pieces[4], "file", "x.safetensors"), "lies in another file"),
        (lambda m: m.files.add(name="config.json", size=3), "several files"),
    ]
    assert parse_manifest(good, "peer:1").layout == source.layout
    for change, needle in cases:
        with pytest.raises(FetchError, match=needle):
            parse_manifest(mutated(change), "peer:1")


# --------------------------------------------------------------------------- a middle range from two sources


@pytest.fixture(scope="module")
def middle(model, security, tmp_path_factory):
    """Layers [2, 4) fetched from two sources into a fresh cache, with what the fetch reported."""
    cache = tmp_path_factory.mktemp("fetch-cache")
    served, progress, lines = {}, [], []

    class Lines(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Lines()
    fetch_log = logging.getLogger("p2pllm.cluster.fetch")
    fetch_log.addHandler(handler)
    old_level = fetch_log.level
    fetch_log.setLevel(logging.INFO)

    async def scenario():
        sources = [PieceSource(model, chunk_bytes=CHUNK) for _ in range(2)]
        started = [await serve(s, security) for s in sources]
        pool = ClientPool(security)
        try:
            part = await fetch_layers(pool, [a for _s, a in started], *MIDDLE, cache,
                                      progress=lambda done, total, rate: progress.append((done, total, rate)),
                                      on_piece=lambda name, address: served.__setitem__(name, address))
            return part.path, [a for _s, a in started]
        finally:
            await pool.close()
            for server, _a in started:
                await server.stop(None)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fetch_mod, "LOG_INTERVAL", 0.0)  # a progress line for every chunk: check its words
        try:
            path, addresses = asyncio.run(scenario())
        finally:
            fetch_log.removeHandler(handler)
            fetch_log.setLevel(old_level)
    return {"path": path, "cache": cache, "served": served, "progress": progress, "lines": lines,
            "addresses": addresses}


def test_a_middle_range_holds_exactly_its_tensors_byte_for_byte(model, middle):
    path, layout = middle["path"], pieces_of(model)
    assert path == middle["cache"] / layout.fingerprint / model.name
    assert path.stat().st_size == model.stat().st_size
    needed = _needed_names(layout, *MIDDLE)
    assert set(_journal(path)) == needed
    for p in layout.pieces:
        got = _bytes(path, p.offset, p.nbytes)
        if p.name in needed:
            assert got == _bytes(model, p.offset, p.nbytes), p.name
            assert _journal(path)[p.name] == hashlib.sha256(got).hexdigest()
        else:
            assert got == bytes(p.nbytes), f"{p.name} was written"
    # sparse: the disk holds the needed pieces (rounded to blocks), not the rest of the file
    needed_bytes = sum(layout.piece(n).nbytes for n in needed)
    allocated = path.stat().st_blocks * 512
    assert needed_bytes <= allocated <= needed_bytes + 64 * 4096 < layout.size / 2


def test_pieces_are_spread_over_both_sources_with_progress_in_mib_and_mb_per_s(model, middle):
    layout = pieces_of(model)
    assert set(middle["served"]) == _needed_names(layout, *MIDDLE)
    assert set(middle["served"].values()) == set(middle["addresses"])
    done, total, rate = middle["progress"][-1]
    assert done == total == sum(layout.piece(n).nbytes for n in _needed_names(layout, *MIDDLE)) - \
        layout.piece(HEADER).nbytes and rate > 0
    assert any(line.startswith(f"fetching layers [{MIDDLE[0]}, {MIDDLE[1]}): ") and line.endswith(" MB/s")
               and "/" in line and " MiB, " in line for line in middle["lines"]), middle["lines"]
    assert any(line.startswith(f"fetched layers [{MIDDLE[0]}, {MIDDLE[1]}): ") for line in middle["lines"])


def test_the_partial_copy_opens_like_the_file_and_its_stage_computes_the_same(model, middle):
    path = middle["path"]
    assert read_spec(path).fingerprint == read_spec(model).fingerprint
    spec = read_spec(model)
    x = torch.randn(5, spec.hidden, generator=torch.Generator().manual_seed(0))
    meta = BatchMeta.build([SeqChunk(0, 0, 5)])
    outs = []
    for p in (model, path):
        stage = open_stage(p, *MIDDLE, backend="ggml", kv_dtype="f32", threads=1)
        try:
            stage.kv.allocate(0, 16)
            outs.append(stage.forward(x.clone(), meta))
        finally:
            stage.close()
    assert torch.equal(outs[0], outs[1])


def test_check_model_accepts_the_partial_for_its_range_and_names_a_missing_tensor_otherwise(model, middle,
                                                                                              capsys):
    from p2pllm.cli import main

    path = middle["path"]
    assert main(["check-model", str(path), "--layers", f"{MIDDLE[0]}:{MIDDLE[1]}"]) == 0
    out = capsys.readouterr().out
    assert "partial copy holding layers [2, 4) of 6, without the embedding and without the output head" in out
    assert "layers [2, 4) can run from it" in out
    assert main(["check-model", str(path)]) == 0
    assert "partial copy holding layers [2, 4)" in capsys.readouterr().out
    assert main(["check-model", str(model), "--layers", "1:3"]) == 0
    assert "partial" not in capsys.readouterr().out
    # as users see it: a fresh process, one line, exit 2
    line = assert_one_line_error(run_cli("check-model", path, "--layers", "1:3"), 2, str(path), "blk.1.")
    assert "does not hold" in line


def test_run_refuses_a_partial_copy_instead_of_computing_on_its_holes(middle):
    # its other layers and the output head read as zeros: run answered "" and exited 0
    line = assert_one_line_error(run_cli("run", "--model", middle["path"], "--prompt", "hi", "--max-tokens", "2"),
                                 2, str(middle["path"]), "partial copy holding layers [2, 4) of 6")
    assert "run needs all 6 layers" in line


def test_a_partial_copy_serves_what_it_holds_and_a_source_of_another_model_is_left_out(
        model, middle, security, tmp_path, caplog):
    layout = pieces_of(model)
    other = make_demo_model(tmp_path / "other" / "small.gguf", "gguf", "small")  # another shape: another fingerprint
    assert find_cached(middle["cache"], layout.fingerprint).path == middle["path"]

    async def scenario():
        fetched_before = PieceSource(middle["path"], chunk_bytes=CHUNK)  # a journal beside it: a partial copy
        owner, stranger = PieceSource(model, chunk_bytes=CHUNK), PieceSource(other)
        started = [await serve(s, security) for s in (stranger, fetched_before, owner)]
        (a_stranger, a_partial, a_owner) = [a for _s, a in started]
        pool, served = ClientPool(security), {}
        try:
            held = parse_manifest(await pool.get(a_partial).model_manifest(), a_partial)
            assert held.held == _needed_names(layout, *MIDDLE) and set(held.hashes) == held.held
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await pool.get(a_partial).fetch_piece(layout.fingerprint, "blk.1.attn_q.weight").read()
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            part = await fetch_layers(pool, [a_stranger, a_partial, a_owner], 1, 3, tmp_path / "cache",
                                      fingerprint=layout.fingerprint, on_piece=served.__setitem__)
            return part, served, a_stranger, a_partial, a_owner
        finally:
            await pool.close()
            for server, _a in started:
                await server.stop(None)

    with caplog.at_level(logging.INFO, logger="p2pllm.cluster.fetch"):
        part, served, stranger, partial, owner = asyncio.run(scenario())
    assert part.complete(1, 3) and stranger not in served.values()
    assert all(a == owner for n, a in served.items() if layout.piece(n).layer == 1)
    assert partial in served.values()
    assert any(stranger in r.getMessage() and "another model" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- faults


def test_a_source_sending_garbage_is_logged_and_the_piece_refetched_from_the_other(model, security, tmp_path, caplog):
    layout = pieces_of(model)
    target = max(layout.needed(*MIDDLE), key=lambda p: p.nbytes).name  # the first piece handed out

    async def scenario():
        liar = Corrupting(model, {target}, chunk_bytes=CHUNK)
        honest = PieceSource(model, chunk_bytes=CHUNK)
        (s1, a1), (s2, a2) = await serve(liar, security), await serve(honest, security)
        pool, served = ClientPool(security), {}
        try:
            part = await fetch_layers(pool, [a1, a2], *MIDDLE, tmp_path, on_piece=served.__setitem__)
            return part.path, liar.corrupted, served, a1, a2
        finally:
            await pool.close()
            await s1.stop(None)
            await s2.stop(None)

    with caplog.at_level(logging.INFO, logger="p2pllm.cluster.fetch"):
        path, corrupted, served, liar, honest = asyncio.run(scenario())
    assert corrupted == [target], "the liar was never asked for the piece it corrupts"
    assert served[target] == honest
    assert liar in served.values(), "the liar's good pieces were not kept"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(liar in w and target in w and "hash" in w for w in warnings), warnings
    p = layout.piece(target)
    assert _bytes(path, p.offset, p.nbytes) == _bytes(model, p.offset, p.nbytes)
    assert PartialModel.load(path).complete(*MIDDLE)


def test_a_piece_every_source_garbles_is_one_error_naming_it(model, security, tmp_path):
    target = "blk.3.ffn_down.weight"

    async def scenario():
        liars = [Corrupting(model, {target}, chunk_bytes=CHUNK) for _ in range(2)]
        started = [await serve(s, security) for s in liars]
        pool = ClientPool(security)
        try:
            await fetch_layers(pool, [a for _s, a in started], *MIDDLE, tmp_path)
        finally:
            await pool.close()
            for server, _a in started:
                await server.stop(None)

    with pytest.raises(FetchError) as e:
        asyncio.run(scenario())
    assert f"cannot fetch {target}" in str(e.value) and "every source failed" in str(e.value)
    assert str(e.value).count("hash to") == 2, str(e.value)  # what each source did
    assert "\n" not in str(e.value)
    part = PartialModel.load(next(tmp_path.glob("*/*.gguf")))
    assert not part.holds(target) and part.holds(HEADER)


def test_a_source_stopped_mid_fetch_is_replaced_by_the_other(model, security, tmp_path, caplog):
    async def scenario():
        dying = Slow(model, delay=0.05, chunk_bytes=CHUNK)
        steady = PieceSource(model, chunk_bytes=CHUNK)
        (s1, a1), (s2, a2) = await serve(dying, security), await serve(steady, security)
        pool, served = ClientPool(security), {}
        fetcher = ModelFetcher(pool, [a1, a2], tmp_path, on_piece=served.__setitem__)
        try:
            await fetcher.open()  # the header (it may come from either)
            dying.mid_piece.clear()
            dying.in_the_middle_of.clear()
            job = asyncio.ensure_future(fetcher.fetch(*MIDDLE))
            while not dying.mid_piece.is_set():  # the dying source is in the middle of a piece now
                await asyncio.sleep(0.005)
            await s1.stop(None)
            part = await job
            return part, served, dying.in_the_middle_of[0], a1, a2
        finally:
            fetcher.close()
            await pool.close()
            await s1.stop(None)
            await s2.stop(None)

    with caplog.at_level(logging.INFO, logger="p2pllm.cluster.fetch"):
        part, served, cut, dead, alive = asyncio.run(scenario())
    assert part.complete(*MIDDLE)
    assert served[cut] == alive, "the piece cut short was not fetched again from the other source"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(dead in w and "failed while sending" in w and "another source" in w for w in warnings), warnings
    layout = pieces_of(model)
    for name in _needed_names(layout, *MIDDLE):
        p = layout.piece(name)
        assert _bytes(part.path, p.offset, p.nbytes) == _bytes(model, p.offset, p.nbytes), name


def test_an_interrupted_fetch_resumes_with_only_the_missing_pieces(model, security, tmp_path):
    layout = pieces_of(model)
    needed = _needed_names(layout, *MIDDLE)

    async def run(stop_after: int | None):
        source = PieceSource(model, chunk_bytes=CHUNK)
        server, address = await serve(source, security)
        pool, got = ClientPool(security), []
        job = None

        def on_piece(name, _address):
            got.append(name)
            if stop_after is not None and len(got) == stop_after:
                job.cancel()

        try:
            job = asyncio.ensure_future(fetch_layers(pool, [address], *MIDDLE, tmp_path, on_piece=on_piece))
            try:
                await job
            except asyncio.CancelledError:
                pass
            return got
        finally:
            await pool.close()
            await server.stop(None)

    first = asyncio.run(run(stop_after=4))
    path = tmp_path / layout.fingerprint / model.name
    kept = set(_journal(path))  # what was verified (pieces whose check ended as the fetch stopped too)
    assert HEADER in first and set(first) <= kept and len(kept) < len(needed)
    assert not PartialModel.load(path).complete(*MIDDLE)
    second = asyncio.run(run(stop_after=None))
    assert not kept & set(second), "fetched again what was already verified"
    assert kept | set(second) == needed
    assert PartialModel.load(path).complete(*MIDDLE)
    assert asyncio.run(run(stop_after=None)) == [], "a complete cache fetched something"


def test_a_source_serves_at_most_its_stream_limit_and_a_fetcher_waits_for_it(model, security, tmp_path):
    gate = threading.Event()

    class Gated(PieceSource):
        refused = 0

        async def on_fetch_piece(self, req):
            self.refused += self.streams >= self.max_streams
            async for chunk in super().on_fetch_piece(req):
                yield chunk

        def _read(self, offset, nbytes):
            gate.wait(30)
            return super()._read(offset, nbytes)

    async def scenario():
        source = Gated(model, max_streams=2, chunk_bytes=CHUNK)
        server, address = await serve(source, security)
        pool = ClientPool(security)
        client = pool.get(address)
        fp, piece = source.layout.fingerprint, "blk.0.ffn_up.weight"
        try:
            held = [client.fetch_piece(fp, piece) for _ in range(2)]
            firsts = [asyncio.ensure_future(c.read()) for c in held]
            while source.streams < 2:
                await asyncio.sleep(0.01)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.fetch_piece(fp, piece).read()
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "2 fetch streams" in refused.value.details()
            gate.set()
            for c, first in zip(held, firsts):
                assert (await first).sha256 and await _drain(c) > 0
            while source.streams:
                await asyncio.sleep(0.01)
            # a fetcher asking for more streams than the source serves: refused ones wait their turn
            source.refused = 0
            part = await fetch_layers(pool, [address], *MIDDLE, tmp_path, streams_per_source=4)
            assert part.complete(*MIDDLE)
            assert source.refused > 0 and source.streams == 0
        finally:
            gate.set()
            await pool.close()
            await server.stop(None)

    asyncio.run(scenario())


async def _drain(call) -> int:
    n = 0
    while (msg := await call.read()) is not grpc.aio.EOF:
        n += len(msg.data)
    return n


def test_a_source_whose_ring_is_busy_paces_its_streams_and_stops_when_it_is_idle(model, security, tmp_path):
    """Yielding to the ring: while `busy()` holds, every stream of a source together gets at most
    `busy_rate` bytes/s (a lower bound on the time, which no noise can shorten); idle, no pacing."""
    ring_busy = [True]
    need = sum(p.nbytes for p in pieces_of(model).needed(*MIDDLE))
    rate = need / 1.5  # the range in about 1.5 s

    async def scenario():
        source = PieceSource(model, chunk_bytes=CHUNK, busy=lambda: ring_busy[0], busy_rate=rate)
        server, address = await serve(source, security)
        pool = ClientPool(security)
        try:
            t0 = time.monotonic()
            part = await fetch_layers(pool, [address], *MIDDLE, tmp_path / "busy")
            assert part.complete(*MIDDLE)
            assert time.monotonic() - t0 >= 0.9 * (need - CHUNK) / rate  # the first chunk goes at once
            assert source._next_send > 0
            ring_busy[0] = False  # the ring went idle: the next fetch is not paced
            part = await fetch_layers(pool, [address], *MIDDLE, tmp_path / "idle")
            assert part.complete(*MIDDLE) and source._next_send == 0.0
        finally:
            await pool.close()
            await server.stop(None)

    asyncio.run(scenario())


# --------------------------------------------------------------------------- daemons sharing a cache

# A second daemon on the same --model-cache, as a real process: waits for GO to exist, then fetches
# layers [START, END) from ADDRESS into CACHE (the whole --from-peers path: open, header, range).
_FETCH_PROCESS = r"""
import asyncio, os, sys, time
from p2pllm.cluster.fetch import fetch_layers
from p2pllm.transport.client import ClientPool
from p2pllm.transport.security import Security

address, start, end, cache, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]

async def main():
    pool = ClientPool(Security.from_secret(os.environ["FETCH_TEST_SECRET"]))
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(go) and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        part = await fetch_layers(pool, [address], start, end, cache)
        print("complete" if part.complete(start, end) else "incomplete", len(part.held))
    finally:
        await pool.close()

asyncio.run(main())
"""


async def _fetch_processes(address: str, cache: Path, ranges, go: Path) -> list[tuple[int, str, str]]:
    """Each range fetched by its own process at once (they all start when `go` appears)."""
    env = dict(os.environ, FETCH_TEST_SECRET=SECRET, PYTHONUNBUFFERED="1")
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", _FETCH_PROCESS, address, str(a), str(b), str(cache), str(go),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env) for a, b in ranges]
    await asyncio.sleep(1.0)  # every process imported and waiting (they poll `go`)
    go.touch()
    out = []
    for p in procs:
        stdout, stderr = await asyncio.wait_for(p.communicate(), 120)
        out.append((p.returncode, stdout.decode(), stderr.decode()))
    return out


def test_daemons_fetching_at_once_into_one_cache_all_have_their_pieces_journaled(model, security, tmp_path):
    """Two processes fetching different ranges into one fresh cache at the same moment (two daemons of a
    user share ~/.cache/p2pllm/models): both finish, and the journal lists every piece of both ranges,
    each of whose bytes match its hash (no journal write lost, no copy created twice)."""
    layout = pieces_of(model)

    async def scenario(cache: Path):
        source = PieceSource(model, chunk_bytes=CHUNK, max_streams=8)
        server, address = await serve(source, security)
        try:
            return await _fetch_processes(address, cache, [(0, 3), (3, 6), (1, 5)], cache / "go")
        finally:
            await server.stop(None)

    for attempt in range(3):  # a race: several rounds, each on a fresh cache
        cache = tmp_path / f"cache{attempt}"
        cache.mkdir()
        results = asyncio.run(scenario(cache))
        for rc, out, err in results:
            assert rc == 0 and out.startswith("complete"), (rc, out, err[-2000:])
        part = PartialModel.load(cache / layout.fingerprint / model.name)
        assert part.complete(0, 6), f"the journal lost pieces: it holds {part.describe()}"
        assert all(part.verify(name) for name in part.held)
        assert sorted(p.name for p in (cache / layout.fingerprint).iterdir()) == sorted(
            [model.name, model.name + ".pieces.json", model.name + ".pieces.lock"])  # no temp file left
        part.close()


def test_a_copy_started_afresh_by_another_daemon_leaves_the_mapped_one_its_bytes(model, security, tmp_path, caplog):
    """p2 serves from its partial copy (mmapped by its stage); its journal goes; p3, on the same cache,
    starts the copy afresh. p2's mapping and what it serves keep their bytes (the new copy is a new file
    renamed into place, never the old one truncated); p2's next fetch goes on in p3's copy."""
    import mmap

    layout = pieces_of(model)
    cache = tmp_path / "shared"
    piece = layout.piece("blk.2.ffn_down.weight")
    want = _bytes(model, piece.offset, piece.nbytes)

    async def scenario():
        owner = PieceSource(model, chunk_bytes=CHUNK)
        owner_server, owner_address = await serve(owner, security)
        pool = ClientPool(security)
        try:
            fetcher = ModelFetcher(pool, [owner_address], cache)  # p2: fetches [2, 4), serves it, maps it
            p2 = await fetcher.fetch(*MIDDLE)
            p2_source = PieceSource(p2, chunk_bytes=CHUNK)
            p2_server, p2_address = await serve(p2_source, security)
            with open(p2.path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            try:
                journal_path(p2.path).unlink()
                (rc, out, err), = await _fetch_processes(owner_address, cache, [(0, 2)], tmp_path / "go")  # p3
                assert rc == 0 and out.startswith("complete"), (rc, out, err[-2000:])
                assert mapped[piece.offset:piece.offset + piece.nbytes] == want, "the mapped copy lost its bytes"
                # p2 still serves [2, 4) byte for byte: a fourth peer fetches it from p2 alone
                p4 = await fetch_layers(pool, [p2_address], *MIDDLE, tmp_path / "p4")
                assert p4.complete(*MIDDLE) and _bytes(p4.path, piece.offset, piece.nbytes) == want
                # p2 fetches again: it notices the new copy and goes on in it (its old pieces are not in
                # p3's file, so they are not recorded there: [2, 4) is fetched again when p2 loads it)
                more = await fetcher.fetch(4, 6)
                assert p2.replaced and more is not p2 and more.path == p2.path
                assert more.complete(0, 2) and more.complete(4, 6) and not more.complete(*MIDDLE)
                again = await fetcher.fetch(*MIDDLE)
                journaled = PartialModel.load(cache / layout.fingerprint / model.name)
                assert again.complete(0, 6) and journaled.complete(0, 6)
                assert all(journaled.verify(name) for name in journaled.held)
                assert mapped[piece.offset:piece.offset + piece.nbytes] == want
            finally:
                mapped.close()
                fetcher.close()
                p2_source.close()
                await p2_server.stop(None)
        finally:
            await pool.close()
            await owner_server.stop(None)

    with caplog.at_level(logging.WARNING, logger="p2pllm.model.pieces"):
        asyncio.run(scenario())
    assert any("replaced by another process" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- a corrupted cached piece


class _Members:
    """What PeerPieces reads of the membership when it fetches before a load (no other live peers)."""

    def __init__(self, me: str):
        from types import SimpleNamespace

        self.members = {me: SimpleNamespace(holds=None)}

    def live_compatible(self):
        return []


def test_a_corrupted_cached_piece_is_found_before_its_stage_loads_and_fetched_again(model, security, tmp_path,
                                                                                     caplog):
    """16 bytes flipped in a held piece of the cache; the peer restarts and is assigned that range: before
    the load, the held pieces are hashed, the bad one forgotten (one WARNING naming it) and fetched
    again, so the stage loads the original bytes."""
    from p2pllm.daemon.pieces import PeerPieces

    layout = pieces_of(model)
    name = "blk.2.ffn_down.weight"
    piece = layout.piece(name)

    async def scenario():
        source = PieceSource(model, chunk_bytes=CHUNK)
        server, address = await serve(source, security)
        pool = ClientPool(security)
        try:
            part = await fetch_layers(pool, [address], *MIDDLE, tmp_path)
            with open(part.path, "r+b") as f:  # the disk flips 16 bytes of a held piece
                f.seek(piece.offset + 100)
                good = f.read(16)
                f.seek(piece.offset + 100)
                f.write(bytes(b ^ 0xFF for b in good))
            # the restart: a new process state, the same cache
            spec = read_spec(part.path)
            peer = PeerPieces(part.path, spec, "me", _Members("me"), None, pool, [address], str(tmp_path),
                              on_change=lambda: None)
            try:
                await peer.open()
                assert peer.fetcher.partial.holds(name)  # trusted until a stage is about to load it
                await peer.fetch_missing(MIDDLE)
                assert peer.fetcher.partial.complete(*MIDDLE)
            finally:
                peer.close()
        finally:
            await pool.close()
            await server.stop(None)

    with caplog.at_level(logging.INFO, logger="p2pllm.cluster.fetch"):
        asyncio.run(scenario())
    path = tmp_path / layout.fingerprint / model.name
    assert _bytes(path, piece.offset, piece.nbytes) == _bytes(model, piece.offset, piece.nbytes)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and name in warnings[0] and "SHA-256" in warnings[0], warnings
    part = PartialModel.load(path)
    assert part.complete(*MIDDLE) and all(part.verify(n) for n in part.held)


# --------------------------------------------------------------------------- disk space after an interruption


def test_bytes_an_interrupted_fetch_left_on_disk_count_as_free_for_its_pieces(model, security, tmp_path):
    """An interrupted fetch (ENOSPC, killed) left pieces written but not journaled: they are overwritten
    in place, so the free-disk check counts them as available; a fetch that fits finishes."""
    layout = pieces_of(model)

    async def scenario():
        source = PieceSource(model, chunk_bytes=CHUNK)
        server, address = await serve(source, security)
        pool = ClientPool(security)
        fetcher = ModelFetcher(pool, [address], tmp_path)
        try:
            part = await fetcher.open()
            missing = part.missing(*MIDDLE)
            need = sum(p.nbytes for p in missing)
            written = 0
            for p in sorted(missing, key=lambda p: -p.nbytes)[:len(missing) // 2]:  # written, never journaled
                part.write(p.offset, _bytes(model, p.offset, p.nbytes))
                written += p.nbytes
            part.close()
            assert written > need // 3
            free = need - written + (64 << 10)  # what is left fits, all of it would not
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(fetch_mod.shutil, "disk_usage", lambda _path: shutil_usage(free))
                done = await fetcher.fetch(*MIDDLE)
                assert done.complete(*MIDDLE)
                # a fresh copy of another range that does not fit is still refused in words
                with pytest.raises(FetchError, match=r"needs .* only .* are free"):
                    await fetcher.fetch(0, 2)
        finally:
            fetcher.close()
            await pool.close()
            await server.stop(None)

    asyncio.run(scenario())
    path = tmp_path / layout.fingerprint / model.name
    part = PartialModel.load(path)
    assert part.complete(*MIDDLE) and all(part.verify(n) for n in part.held)


def shutil_usage(free: int):
    import shutil

    return shutil._ntuple_diskusage(1 << 30, (1 << 30) - free, free)


# --------------------------------------------------------------------------- a slow serve rate


def test_a_slow_serve_rate_sends_chunks_of_a_second_each_so_the_fetcher_never_times_out(model, security, tmp_path):
    """--fetch-serve-rate below a chunk per second: while paced, chunks hold about a second's worth
    (at most the rate), so a fetcher's no-data timeout never fires on a stream that is only slow."""
    ring_busy = [False]
    rate = 48_000.0  # bytes/s; pieces of the range are up to 52 KiB, the embedding 136 KiB

    async def scenario():
        source = PieceSource(model, busy=lambda: ring_busy[0], busy_rate=rate)  # 1 MiB chunks unpaced
        server, address = await serve(source, security)
        pool = ClientPool(security)
        fetcher = ModelFetcher(pool, [address], tmp_path, streams_per_source=1, chunk_timeout=2.2)
        try:
            await fetcher.open()  # the header, unpaced
            ring_busy[0] = True
            # one piece straight off the wire: chunks of at most a second's worth, about a second apart
            client = pool.get(address)
            call = client.fetch_piece(source.layout.fingerprint, "token_embd.weight")
            sizes, stamps = [], []
            while (msg := await call.read()) is not grpc.aio.EOF:
                sizes.append(len(msg.data))
                stamps.append(time.monotonic())
            assert sum(sizes) == source.layout.piece("token_embd.weight").nbytes
            assert max(sizes) <= rate and len(sizes) >= 3, sizes
            assert max(b - a for a, b in zip(stamps, stamps[1:])) < 2.0
            # a fetcher whose no-data timeout is 2.2 s gets layer 2 (pieces one after another on one stream)
            part = await fetcher.fetch(2, 3)
            assert part.complete(2, 3)
        finally:
            fetcher.close()
            await pool.close()
            await server.stop(None)

    asyncio.run(scenario())


def test_fetch_serve_rate_refuses_a_rate_too_slow_to_serve_and_speaks_of_bandwidth():
    import argparse

    from p2pllm.argtypes import serve_rate

    assert serve_rate("4MB/s") == 4e6 and serve_rate("10kB/s") == 1e4 and serve_rate("0") == 0.0
    for text in ("1e-9B/s", "0.5B/s", "999B/s"):
        with pytest.raises(argparse.ArgumentTypeError, match="1kB/s"):
            serve_rate(text)
    for text in ("4TFLOPS", "fast", "4MB"):
        with pytest.raises(argparse.ArgumentTypeError) as e:
            serve_rate(text)
        why = str(e.value).split(f"{text!r}", 1)[-1]  # past the echoed text
        assert "FLOP" not in why and "MB/s" in why, why
