"""Layer bytes from peers for Hugging Face folders: a sharded safetensors folder cut into pieces
(small files whole, each shard's header, each tensor), served by real gRPC servers with mutual TLS,
fetched into a partial folder of sparse shards that the loader, the tokenizer and `check-model`
accept for its layers; hostile manifests and lying sources."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from pathlib import Path

import grpc
import pytest
import torch
from conftest import assert_one_line_error, run_cli
from test_fetch import CHUNK, SECRET, _bytes, _journal, _needed_names, serve

from p2pllm.cluster.fetch import (
    FetchError,
    ModelFetcher,
    PieceSource,
    fetch_layers,
    parse_manifest,
)
from p2pllm.model import formats
from p2pllm.model.backends import open_stage
from p2pllm.model.batch import BatchMeta, SeqChunk
from p2pllm.model.demo import DEMO_SHAPES, demo_weights, hf_config
from p2pllm.model.demo_tokenizer import write_demo_tokenizer_hf
from p2pllm.model.loader import load_slice
from p2pllm.model.pieces import (
    HEADER,
    PartialModel,
    check_partial,
    find_cached,
    header_name,
    is_partial,
    pieces_of,
)
from p2pllm.model.spec import read_spec
from p2pllm.model.tokenizer import load_tokenizer
from p2pllm.model.writer import write_hf
from p2pllm.proto import p2pllm_pb2 as pb
from p2pllm.transport.client import ClientPool
from p2pllm.transport.security import Security

MIDDLE = (2, 4)
SHAPE = DEMO_SHAPES["tiny"]  # 6 layers


def make_hf(folder: Path, *, tied: bool = False, shard_bytes: int | None = 1_200_000, seed: int = 0) -> Path:
    """A small random Llama folder: config, tokenizer, generation config, safetensors shards and
    their index (one model.safetensors when shard_bytes is None), plus a README that is no piece."""
    weights = demo_weights(SHAPE, seed)
    if tied:
        weights.pop("head")
    write_hf(folder, hf_config(SHAPE, tied=tied), weights, max_shard_bytes=shard_bytes)
    write_demo_tokenizer_hf(folder, SHAPE.vocab)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}) + "\n")
    (folder / "README.md").write_text("not read by p2pllm\n")
    return folder


@pytest.fixture(scope="module")
def security() -> Security:
    return Security.from_secret(SECRET)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = make_hf(tmp_path_factory.mktemp("fetch-hf") / "tiny-hf")
    assert len(list(folder.glob("*.safetensors"))) >= 4, "the test wants a sharded folder"
    return folder


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> Path:
    return make_hf(tmp_path_factory.mktemp("fetch-hf-tied") / "tiny-tied", tied=True, shard_bytes=None)


def _file(folder: Path, piece) -> Path:
    return folder / piece.file


def _piece_bytes(folder: Path, piece) -> bytes:
    return _bytes(_file(folder, piece), piece.offset, piece.nbytes)


# --------------------------------------------------------------------------- pieces and manifests


def test_pieces_tile_each_file_and_each_hash_is_sha256_of_its_bytes(model, security):
    layout = pieces_of(model)
    spec = read_spec(model)
    assert (layout.format, layout.fingerprint, layout.n_layers) == ("hf", spec.fingerprint, spec.n_layers)
    assert layout.file_name == model.name and layout.tied is False
    names = [n for n, _s in layout.files]
    assert names[:5] == ["config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
                         "tokenizer_config.json"]
    assert sorted(names[5:]) == sorted(p.name for p in model.glob("*.safetensors")) == names[5:]
    assert "README.md" not in names
    assert layout.size == sum(s for _n, s in layout.files) == sum((model / n).stat().st_size for n in names)
    for name, size in layout.files:  # each file tiled, in order, no gap, no overlap
        mine = [p for p in layout.pieces if p.file == name]
        assert mine[0].name == (name if not name.endswith(".safetensors") else header_name(name))
        pos = 0
        for p in mine:
            assert p.offset == pos and p.nbytes > 0
            pos += p.nbytes
        assert pos == size == (model / name).stat().st_size
    tensors = {p.name for p in layout.pieces if p.file.endswith(".safetensors") and not p.name.startswith(HEADER)}
    mf = formats.open_model_file(model)
    assert tensors == set(mf.tensors) and len(tensors) == 3 + 9 * SHAPE.n_layers
    for p in layout.pieces:
        want = int(p.name.split(".")[2]) if p.name.startswith("model.layers.") else None
        assert p.layer == want, p
        if p.name in mf.tensors:  # a tensor piece starts where its data does
            assert p.offset == mf._where[p.name][1]
    mf.close()

    async def scenario():
        source = PieceSource(model / "config.json")  # the folder, or its config.json: the same model
        server, address = await serve(source, security)
        pool = ClientPool(security)
        try:
            before = parse_manifest(await pool.get(address).model_manifest(), address)
            assert before.layout.table_digest() == layout.table_digest()
            assert (before.layout.pieces, before.layout.files) == (layout.pieces, layout.files)
            assert before.held == {p.name for p in layout.pieces} and before.hashes == {}
            for p in layout.pieces:
                assert await source.sha256(p.name) == hashlib.sha256(_piece_bytes(model, p)).hexdigest()
            after = parse_manifest(await pool.get(address).model_manifest(), address)
            assert after.hashes == {p.name: await source.sha256(p.name) for p in layout.pieces}
            chunks = [c async for c in _stream(pool.get(address).fetch_piece(layout.fingerprint, "config.json"))]
            assert b"".join(c.data for c in chunks) == (model / "config.json").read_bytes()
        finally:
            await pool.close()
            await server.stop(None)
            source.close()

    asyncio.run(scenario())


async def _stream(call):
    while (msg := await call.read()) is not grpc.aio.EOF:
        yield msg


@pytest.mark.parametrize("which, start, end", [("model", 0, 1), ("model", *MIDDLE), ("model", 5, 6),
                                               ("model", 0, 6), ("tied", 5, 6), ("tied", 0, 2)])
def test_needed_pieces_are_what_the_loader_reads_for_the_stage(request, monkeypatch, which, start, end):
    folder = request.getfixturevalue(which)
    layout = pieces_of(folder)
    read: list[str] = []
    real = formats.SafetensorsModelFile.read
    monkeypatch.setattr(formats.SafetensorsModelFile, "read", lambda self, name: read.append(name) or real(self, name))
    load_slice(folder, start, end)
    needed = _needed_names(layout, start, end)
    heads = {p.name for p in layout.header_pieces()}
    assert heads <= needed and len(heads) == len(layout.files)  # every small file and shard header
    assert needed - heads == set(read), "needed tensors are exactly those the loader reads"
    assert ("model.embed_tokens.weight" in needed) == (start == 0 or (which == "tied" and end == 6))
    assert ("model.norm.weight" in needed) == (end == 6)
    assert ("lm_head.weight" in needed) == (which == "model" and end == 6)
    assert {layout.piece(n).layer for n in needed} - {None} == set(range(start, end))


def _hostile_cases():
    def setf(i, field, value):
        return lambda m: setattr(m.files[i], field, value)

    def rename_file(old, new):
        def change(m):
            for f in m.files:
                if f.name == old:
                    f.name = new
            for p in m.pieces:
                if p.file == old:
                    p.file = new
        return change

    def swap_first_two(m):
        a, b = pb.ModelPiece(), pb.ModelPiece()
        a.CopyFrom(m.pieces[0])
        b.CopyFrom(m.pieces[1])
        m.pieces[0].CopyFrom(b)
        m.pieces[1].CopyFrom(a)

    def extra_file(m):
        m.files.add(name="tokenizer_config.json", size=5)
        m.size += 5

    def drop_piece_file(m):
        m.pieces[-1].file = "config.json"

    def shard_piece(i, field, value):
        def change(m):
            p = [p for p in m.pieces if p.file.endswith(".safetensors")][i]
            setattr(p, field, value)
        return change

    return [
        (rename_file("config.json", "../config.json"), "file name '../config.json'"),
        (rename_file("tokenizer.json", "/etc/passwd"), "file name '/etc/passwd'"),
        (rename_file("tokenizer.json", ".."), "file name '..'"),
        (rename_file("tokenizer.json", "sub/model.safetensors"), "file name 'sub/model.safetensors'"),
        (rename_file("tokenizer.json", "evil.py"), "file name 'evil.py'"),
        (rename_file("tokenizer.json", ""), "file name ''"),
        (rename_file("config.json", "generation_config.json"), "listed twice"),
        (rename_file("config.json", "chat_template.jinja"), "without config.json"),
        (lambda m: setattr(m.pieces[3], "file", "../x.safetensors"), "not one of the folder's files"),
        (lambda m: setattr(m.pieces[3], "file", "/abs.safetensors"), "not one of the folder's files"),
        (setf(0, "size", 10), "add up to"),
        (lambda m: setattr(m, "file_name", "../up"), "folder name"),
        (swap_first_two, "not together|begins with"),
        (extra_file, "listed twice"),
        (drop_piece_file, "pieces of model-.* end at byte"),  # the last shard left short
        (shard_piece(0, "name", "model.layers.0.mlp.up_proj.weight"), "begins with piece"),
        (shard_piece(1, "name", "<header>:model.safetensors"), "named like a file or a header"),
        (shard_piece(1, "nbytes", 1 << 40), "does not follow"),
        (shard_piece(2, "layer", 5), "claims layer"),
        (shard_piece(2, "sha256", "../"), "sha256"),
        (lambda m: setattr(m.pieces[0], "nbytes", m.pieces[0].nbytes - 1), "end at byte"),
        (lambda m: setattr(m, "format", "safetensors"), "GGUF files and Hugging Face folders"),
    ]


@pytest.mark.parametrize("change, needle", _hostile_cases())
def test_a_hostile_folder_manifest_is_refused_in_words(model, change, needle):
    source = PieceSource(model)
    good = source.manifest()
    source.close()
    assert parse_manifest(good, "peer:1").layout.table_digest() == source.layout.table_digest()
    m = pb.Manifest()
    m.CopyFrom(good)
    change(m)
    with pytest.raises(FetchError, match=needle) as e:
        parse_manifest(m, "peer:1")
    assert str(e.value).startswith("peer:1 ") and "\n" not in str(e.value)


# --------------------------------------------------------------------------- a middle range from two sources


@pytest.fixture(scope="module")
def middle(model, security, tmp_path_factory):
    """Layers [2, 4) fetched from two sources into a fresh cache."""
    cache = tmp_path_factory.mktemp("fetch-hf-cache")
    served = {}

    async def scenario():
        sources = [PieceSource(model, chunk_bytes=CHUNK) for _ in range(2)]
        started = [await serve(s, security) for s in sources]
        pool = ClientPool(security)
        try:
            part = await fetch_layers(pool, [a for _s, a in started], *MIDDLE, cache,
                                      on_piece=lambda name, address: served.__setitem__(name, address))
            part.close()
            return part.path, [a for _s, a in started]
        finally:
            await pool.close()
            for server, _a in started:
                await server.stop(None)
            for s in sources:
                s.close()

    path, addresses = asyncio.run(scenario())
    return {"path": path, "cache": cache, "served": served, "addresses": addresses}


def test_a_middle_range_holds_exactly_its_tensors_byte_for_byte(model, middle):
    path, layout = middle["path"], pieces_of(model)
    assert path == middle["cache"] / layout.fingerprint / model.name and path.is_dir()
    assert (path.parent / f"{model.name}.pieces.json").is_file() and is_partial(path)
    assert sorted(p.name for p in path.iterdir()) == sorted(n for n, _s in layout.files)  # no README
    for name, size in layout.files:
        assert (path / name).stat().st_size == size
    needed = _needed_names(layout, *MIDDLE)
    assert set(_journal(path)) == needed == set(middle["served"])
    assert set(middle["served"].values()) == set(middle["addresses"])  # spread over both sources
    for p in layout.pieces:
        got = _piece_bytes(path, p)
        if p.name in needed:
            assert got == _piece_bytes(model, p), p.name
            assert _journal(path)[p.name] == hashlib.sha256(got).hexdigest()
        else:
            assert got == bytes(p.nbytes), f"{p.name} was written"
    for name, _size in layout.files:
        if not name.endswith(".safetensors"):  # small files whole
            assert (path / name).read_bytes() == (model / name).read_bytes()
    needed_bytes = sum(layout.piece(n).nbytes for n in needed)
    allocated = sum((path / n).stat().st_blocks * 512 for n, _s in layout.files)
    assert needed_bytes <= allocated <= needed_bytes + 64 * 4096 < layout.size / 2  # sparse shards


def test_the_partial_folder_opens_like_the_original_and_its_stage_computes_the_same(model, middle):
    path = middle["path"]
    assert read_spec(path).fingerprint == read_spec(model).fingerprint
    assert read_spec(path / "config.json").fingerprint == read_spec(model).fingerprint
    text = "the partial copy tokenizes alike"
    assert load_tokenizer(path).encode(text) == load_tokenizer(model).encode(text)
    spec = read_spec(model)
    original, copy = stage_outputs((model, path), *MIDDLE, spec.hidden, tokens=5, seed=0)
    assert torch.equal(original, copy)


def test_check_model_accepts_the_partial_folder_for_its_range_and_names_a_missing_tensor_otherwise(
        model, middle, capsys, tmp_path):
    from p2pllm.cli import main

    path = middle["path"]
    for given in (path, path / "config.json"):
        assert main(["check-model", str(given), "--layers", f"{MIDDLE[0]}:{MIDDLE[1]}"]) == 0
        out = capsys.readouterr().out
        assert "partial copy holding layers [2, 4) of 6, without the embedding and without the output head" in out
        assert "layers [2, 4) can run from it" in out
    assert main(["check-model", str(model), "--layers", "1:3"]) == 0
    assert "partial" not in capsys.readouterr().out
    line = assert_one_line_error(run_cli("check-model", path, "--layers", "1:3"), 2, str(path), "model.layers.1.")
    assert "does not hold" in line
    # a held tensor whose bytes changed on disk: named
    copy = tmp_path / "copy" / path.name
    shutil.copytree(path, copy)
    shutil.copy(path.parent / f"{path.name}.pieces.json", copy.parent)
    victim = pieces_of(model).piece("model.layers.3.mlp.down_proj.weight")
    with open(copy / victim.file, "r+b") as f:
        f.seek(victim.offset + 10)
        f.write(b"\x7f")
    with pytest.raises(Exception, match="model.layers.3.mlp.down_proj.weight: its bytes do not match"):
        check_partial(copy, MIDDLE)


def test_a_partial_folder_serves_what_it_holds_and_a_later_range_fetches_only_what_it_lacks(
        model, middle, security, tmp_path):
    layout = pieces_of(model)
    assert find_cached(middle["cache"], layout.fingerprint).path == middle["path"]
    cache = tmp_path / "cache"
    shutil.copytree(middle["cache"], cache)  # this peer's own copy, resumed

    async def scenario():
        fetched_before = PieceSource(middle["path"], chunk_bytes=CHUNK)
        owner = PieceSource(model, chunk_bytes=CHUNK)
        started = [await serve(s, security) for s in (fetched_before, owner)]
        a_partial, a_owner = [a for _s, a in started]
        pool, served = ClientPool(security), {}
        try:
            held = parse_manifest(await pool.get(a_partial).model_manifest(), a_partial)
            assert held.held == _needed_names(layout, *MIDDLE) and set(held.hashes) == held.held
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await pool.get(a_partial).fetch_piece(layout.fingerprint, "model.layers.1.mlp.up_proj.weight").read()
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            part = await fetch_layers(pool, [a_partial, a_owner], 3, 6, cache, on_piece=served.__setitem__)
            part.close()
            return part, served, a_partial, a_owner
        finally:
            await pool.close()
            for server, _a in started:
                await server.stop(None)
            fetched_before.close()
            owner.close()

    part, served, _a_partial, a_owner = asyncio.run(scenario())
    assert part.complete(3, 6) and part.complete(*MIDDLE)
    assert set(served) == _needed_names(layout, 3, 6) - _needed_names(layout, *MIDDLE)  # only what it lacked
    assert set(served.values()) == {a_owner}  # the partial source holds none of it
    assert PartialModel.load(part.path).describe() == "layers [2, 6) of 6, without the embedding and with the output head"
    assert check_partial(part.path, (3, 6))[0].fingerprint == layout.fingerprint


def test_a_tied_folder_gives_its_last_stage_the_embedding(tied, security, tmp_path):
    layout = pieces_of(tied)
    assert layout.tied and "lm_head.weight" not in layout and layout.files[-1][0] == "model.safetensors"

    async def scenario():
        source = PieceSource(tied, chunk_bytes=CHUNK)
        server, address = await serve(source, security)
        pool = ClientPool(security)
        try:
            part = await fetch_layers(pool, [address], 5, 6, tmp_path)
            part.close()
            return part
        finally:
            await pool.close()
            await server.stop(None)
            source.close()

    part = asyncio.run(scenario())
    assert part.holds("model.embed_tokens.weight") and part.holds("model.norm.weight")
    original, copy = stage_outputs((tied, part.path), 5, 6, SHAPE.hidden, tokens=3, seed=1)
    assert torch.equal(original, copy)


# --------------------------------------------------------------------------- lying sources


class Corrupting(PieceSource):
    """Sends garbage for some pieces of a folder (their hash is right, their bytes are not)."""

    def __init__(self, model, corrupt: set[str], **kw):
        super().__init__(model, **kw)
        self.corrupt = {(self.layout.piece(n).file, self.layout.piece(n).offset): n for n in corrupt}
        self.corrupted: list[str] = []

    def _read(self, offset: int, nbytes: int, file: str = "") -> bytes:
        data = super()._read(offset, nbytes, file)
        if (file, offset) in self.corrupt:
            self.corrupted.append(self.corrupt[(file, offset)])
            data = bytes(b ^ 0x5A for b in data[:64]) + data[64:]
        return data


def test_a_source_sending_garbage_for_a_tensor_is_replaced_by_the_other(model, security, tmp_path):
    layout = pieces_of(model)
    target = max(layout.needed(*MIDDLE), key=lambda p: p.nbytes).name  # the first piece handed out

    async def scenario():
        liar, honest = Corrupting(model, {target}, chunk_bytes=CHUNK), PieceSource(model, chunk_bytes=CHUNK)
        (s1, a1), (s2, a2) = await serve(liar, security), await serve(honest, security)
        pool, served = ClientPool(security), {}
        try:
            part = await fetch_layers(pool, [a1, a2], *MIDDLE, tmp_path, on_piece=served.__setitem__)
            part.close()
            return part.path, liar.corrupted, served, a2
        finally:
            await pool.close()
            await s1.stop(None)
            await s2.stop(None)
            liar.close()
            honest.close()

    path, corrupted, served, honest = asyncio.run(scenario())
    assert corrupted == [target] and served[target] == honest
    assert _piece_bytes(path, layout.piece(target)) == _piece_bytes(model, layout.piece(target))
    assert PartialModel.load(path).complete(*MIDDLE)


def test_headers_that_contradict_the_manifest_are_refused_and_forgotten(model, security, tmp_path):
    """A source whose config.json (hashed and served as its own) says 5 layers where its manifest
    said 6: the fetched folder describes another model; nothing of it is kept as held."""
    liar_folder = tmp_path / "liar" / model.name
    shutil.copytree(model, liar_folder)
    config = (liar_folder / "config.json").read_text()
    assert '"num_hidden_layers": 6' in config
    (liar_folder / "config.json").write_text(config.replace('"num_hidden_layers": 6', '"num_hidden_layers": 5'))

    class Liar(PieceSource):
        def __init__(self):
            super().__init__(model)
            self.path = liar_folder  # the honest layout, the other bytes
            self.close()
            self._fds = {n: os.open(liar_folder / n, os.O_RDONLY) for n, _s in self.layout.files}

    async def scenario():
        liar = Liar()
        server, address = await serve(liar, security)
        pool = ClientPool(security)
        fetcher = ModelFetcher(pool, [address], tmp_path / "cache")
        try:
            await fetcher.open()
        finally:
            fetcher.close()
            await pool.close()
            await server.stop(None)
            liar.close()
        return fetcher

    # (a tensor of a layer beyond the 5 it claims gives it away before the layouts are compared)
    with pytest.raises(FetchError, match="describes another layout than their manifests|is of layer 5, but the "
                                         "metadata says 5 layers"):
        asyncio.run(scenario())
    journal = next((tmp_path / "cache").glob("*/*.pieces.json"))
    assert json.loads(journal.read_text())["pieces"] == {}


def test_a_fresh_copy_leaves_no_stale_shard_behind(model, tmp_path):
    layout = pieces_of(model)
    folder = tmp_path / layout.fingerprint / model.name
    folder.mkdir(parents=True)
    (folder / "model-00099-of-00099.safetensors").write_bytes(b"stale")
    (tmp_path / layout.fingerprint / f"{model.name}.pieces.json").write_text('{"format": "other"}')
    part = PartialModel.create(tmp_path, layout)
    assert sorted(p.name for p in folder.iterdir()) == sorted(n for n, _s in layout.files)
    assert part.held == {} and not is_partial(model)
    with pytest.raises(Exception, match="header has not been fetched"):
        PartialModel.load(folder)


def test_what_a_daemon_killed_mid_create_left_is_removed_by_the_next(model, tmp_path):
    layout = pieces_of(model)
    root = tmp_path / layout.fingerprint
    root.mkdir()
    orphans = [root / f".{model.name}.new-4242-deadbeef", root / f".{model.name}.old-4242-cafef00d",
               root / f".{model.name}.pieces.json.tmp-4242-0badf00d"]
    orphans[2].write_text("{")
    orphans[0].mkdir()
    (orphans[0] / "model.safetensors").write_bytes(b"x" * 1000)
    orphans[1].write_bytes(b"y")
    kept = root / f".{model.name}x.new-1-0"  # another model's name: not ours to remove
    kept.write_bytes(b"z")
    PartialModel.create(tmp_path, layout)
    assert not any(o.exists() for o in orphans) and kept.exists()
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == [kept.name]


def stage_outputs(paths, start: int, end: int, hidden: int, tokens: int, seed: int) -> list:
    """The torch stage [start, end) of each model path on the same random hidden states."""
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed))
    meta = BatchMeta.build([SeqChunk(0, 0, tokens)])
    outs = []
    for p in paths:
        stage = open_stage(p, start, end, backend="torch", kv_dtype="f32")
        try:
            stage.kv.allocate(0, tokens + 8)
            outs.append(stage.forward(x.clone(), meta))
        finally:
            stage.close()
    return outs
