"""Layer bytes from peers (--from-peers): sources, chunks, hashes, cache.

Two sides over the cluster's authenticated gRPC channel (docs/fetch.md):

- `PieceSource` serves a model (a GGUF file or a Hugging Face folder, or a partial copy of one: only
  the pieces it holds) to other peers:
  its manifest (`ModelManifest`) and one piece's bytes in chunks of at most 1 MiB (`FetchPiece`),
  at most `max_streams` streams at once (RESOURCE_EXHAUSTED beyond, so the fetcher asks another
  peer). A piece's SHA-256 is computed on its first request, in a thread, and kept.
- `ModelFetcher` assembles a `PartialModel` (model/pieces.py) from several sources: the header
  pieces first (a folder: its small files and shard headers; the tensor tables they give must
  describe exactly the layout the manifests announced), then the
  pieces a layer range needs, spread over the sources (least loaded first), each streamed, written
  at its offset, hashed as it arrives, checked, then journaled. A source that is busy, dies, sends
  garbage or bytes whose hash does not match is logged by address and the piece is fetched from
  another; every source failing a piece is one FetchError naming the piece.

Every size, offset and file name from the network is checked before use; nothing is unpickled.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from ..errors import P2PError, UsageError
from ..model.pieces import (
    HEADER,
    ModelPieces,
    PartialModel,
    Piece,
    default_cache_root,
    header_name,
    hf_file_allowed,
    is_partial,
    layer_of,
    model_root,
    pieces_of,
    safe_file_name,
    safe_fingerprint,
    sha256_of,
)
from ..proto import p2pllm_pb2 as pb
from .model_sources import from_peers_wait
from ..transport.server import RpcRefused

log = logging.getLogger(__name__)

MAX_CHUNK = 1 << 20  # bytes of data in one PieceChunk
DEFAULT_STREAMS = 2  # fetch streams a source serves at once, and a fetcher opens per source
READ_BLOCK = 8 << 20  # a source reads this much per thread hop
MAX_FILE_BYTES = 1 << 50
MAX_PIECES = 1_000_000
MAX_NAME = 1024
MAX_FILES = 100_000  # files of a folder in one manifest
LOG_INTERVAL = 2.0  # seconds between two progress lines
BAD_LIMIT = 3  # a source that sent bad data for this many pieces is dropped from the fetch
BUSY_SERVE_RATE = 4e6  # bytes/s a source serves in all while the ring runs requests through it
BUSY_BACKOFF = (0.05, 2.0)  # seconds before asking a busy source again: first, most
MIN_HASH_RATE = 20e6  # bytes/s a source hashes at least (the wait for a big piece's first chunk)

Progress = Callable[[int, int, float], None]  # (bytes done, bytes total, bytes per second)


class FetchError(P2PError):
    """The model's pieces could not be fetched; says which piece and what each source did."""


# --------------------------------------------------------------------------- manifests


@dataclass(frozen=True)
class SourceManifest:
    """What one source says: the file's layout, the hashes it knows, the pieces it holds."""

    address: str
    layout: ModelPieces
    hashes: dict[str, str]
    held: frozenset[str]


def manifest_message(layout: ModelPieces, hashes: dict[str, str], held) -> pb.Manifest:
    return pb.Manifest(
        model_name=layout.name, fingerprint=layout.fingerprint, format=layout.format, file_name=layout.file_name,
        size=layout.size, n_layers=layout.n_layers,
        pieces=[pb.ModelPiece(name=p.name, offset=p.offset, nbytes=p.nbytes, layer=-1 if p.layer is None else p.layer,
                              sha256=hashes.get(p.name, ""), held=p.name in held, file=p.file) for p in layout.pieces],
        files=[pb.ManifestFile(name=name, size=size) for name, size in layout.files])


def parse_manifest(msg: pb.Manifest, address: str) -> SourceManifest:
    """A manifest from the network, every field checked: the pieces tile the file (a folder: each of
    its files, named in `files`, plain names p2pllm reads) exactly."""

    def bad(why: str) -> FetchError:
        return FetchError(f"{address} sent a malformed model manifest: {why}")

    if msg.format not in ("gguf", "hf"):
        raise FetchError(f"{address} serves a {msg.format[:40] or 'unnamed'}-format model; fetching from peers "
                         f"supports GGUF files and Hugging Face folders (gguf, hf)")
    folder = msg.format == "hf"
    if not safe_fingerprint(msg.fingerprint):
        raise bad(f"fingerprint {msg.fingerprint[:80]!r}")
    if not safe_file_name(msg.file_name):
        raise bad(f"{'folder' if folder else 'file'} name {msg.file_name[:80]!r}")
    if len(msg.model_name) > MAX_NAME:
        raise bad("a model name of more than 1024 characters")
    if not 0 < msg.size <= MAX_FILE_BYTES:
        raise bad(f"{'folder' if folder else 'file'} size {msg.size}")
    if not 0 < msg.n_layers <= 1_000_000:
        raise bad(f"{msg.n_layers} layers")
    if not 0 < len(msg.pieces) <= MAX_PIECES:
        raise bad(f"{len(msg.pieces)} pieces")
    files = _parse_files(msg, bad) if folder else []
    if not folder and msg.files:
        raise bad("a GGUF model announced as several files")
    sizes = dict(files)
    order = iter(files)
    pieces, hashes, held = [], {}, set()
    file, pos, end = "", 0, msg.size  # the file being tiled, where the next piece starts, where the file ends
    for i, p in enumerate(msg.pieces):
        if not 0 < len(p.name) <= MAX_NAME:
            raise bad(f"piece {i} is named {p.name[:80]!r}")
        if folder:
            if p.file != file:  # the next file begins: the previous one must be tiled to its end
                if file and pos != end:
                    raise bad(f"the pieces of {file} end at byte {pos}, the file at {end}")
                if p.file not in sizes:
                    raise bad(f"piece {p.name[:80]} lies in file {p.file[:80]!r}, which is not one of the folder's files")
                nxt = next(order, None)
                if nxt is None or nxt[0] != p.file:
                    raise bad(f"the pieces of {p.file[:80]} are not together, in the order of the folder's files")
                file, pos, end = p.file, 0, nxt[1]
                whole = file in sizes and not file.endswith(".safetensors")
                first = file if whole else header_name(file)
                if p.name != first:
                    raise bad(f"file {file} begins with piece {p.name[:80]!r}, not {first!r}")
            elif p.offset == 0 or p.name.startswith(HEADER) or p.name in sizes:
                raise bad(f"piece {p.name[:80]} in {file} is named like a file or a header")
            elif not file.endswith(".safetensors"):
                raise bad(f"file {file} is one piece, not several")
        else:
            if p.file:
                raise bad(f"piece {p.name[:80]} of a GGUF file lies in another file ({p.file[:80]!r})")
            if (i == 0) != (p.name == HEADER):
                raise bad(f"piece {i} is named {p.name[:80]!r}")
        if p.offset != pos or p.nbytes == 0 or p.nbytes > end - pos:
            raise bad(f"piece {p.name[:80]} at [{p.offset}, +{p.nbytes}) does not follow the previous one (byte {pos})")
        layer = layer_of(p.name, msg.format) if not p.name.startswith(HEADER) and p.name not in sizes else None
        if p.layer != (-1 if layer is None else layer):
            raise bad(f"piece {p.name[:80]} claims layer {p.layer}")
        if p.sha256 and not _is_sha256(p.sha256):
            raise bad(f"piece {p.name[:80]}: sha256 {p.sha256[:80]!r}")
        pos += p.nbytes
        pieces.append(Piece(p.name, p.offset, p.nbytes, layer, p.file))
        if p.sha256:
            hashes[p.name] = p.sha256
        if p.held:
            held.add(p.name)
    if folder:
        if pos != end:
            raise bad(f"the pieces of {file} end at byte {pos}, the file at {end}")
        if next(order, None) is not None:
            raise bad("a file of the folder has no pieces")
    elif pos != msg.size:
        raise bad(f"the pieces end at byte {pos}, the file at {msg.size}")
    if len({p.name for p in pieces}) != len(pieces):
        raise bad("two pieces have the same name")
    layout = ModelPieces(msg.model_name, msg.fingerprint, msg.file_name, msg.size, msg.n_layers, tuple(pieces),
                         format=msg.format, files=tuple(files))
    return SourceManifest(address, layout, hashes, frozenset(held))


def _parse_files(msg: pb.Manifest, bad) -> list[tuple[str, int]]:
    """A folder's file list: plain names of files p2pllm reads, each once, config.json among them,
    sizes adding up to the folder's."""
    if not 0 < len(msg.files) <= MAX_FILES:
        raise bad(f"{len(msg.files)} files")
    files = []
    for f in msg.files:
        if not hf_file_allowed(f.name):
            raise bad(f"file name {f.name[:80]!r} (a plain name: config.json, tokenizer files or *.safetensors)")
        if not 0 < f.size <= MAX_FILE_BYTES:
            raise bad(f"file {f.name} of {f.size} bytes")
        files.append((f.name, f.size))
    names = [n for n, _s in files]
    if len(set(names)) != len(names):
        raise bad("a file is listed twice")
    if "config.json" not in names:
        raise bad("a folder without config.json")
    if sum(s for _n, s in files) != msg.size:
        raise bad(f"the files add up to {sum(s for _n, s in files)} bytes, the folder to {msg.size}")
    return files


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


# --------------------------------------------------------------------------- serving


class PieceSource:
    """Serves one model file's pieces to peers: the daemon holds one and its gRPC handler delegates
    `on_manifest` and `on_fetch_piece` here. `model`: a GGUF file or a Hugging Face folder, or a
    partial copy of one (a path with a journal beside it, or a PartialModel being fetched: what it
    holds grows as pieces land)."""

    def __init__(self, model: str | os.PathLike | PartialModel, *, max_streams: int = DEFAULT_STREAMS,
                 chunk_bytes: int = MAX_CHUNK, busy: Callable[[], bool] | None = None,
                 busy_rate: float = BUSY_SERVE_RATE):
        if not 1 <= chunk_bytes <= MAX_CHUNK:
            raise ValueError(f"chunk_bytes must be within [1, {MAX_CHUNK}]")
        if isinstance(model, PartialModel):
            self.partial: PartialModel | None = model
        elif is_partial(model):
            self.partial = PartialModel.load(model)
        else:
            self.partial = None
        if self.partial is not None:
            self.path = Path(self.partial.path)
        else:
            self.path = model_root(model) if Path(model).is_dir() or Path(model).name == "config.json" else Path(model)
        self.layout = self.partial.layout if self.partial is not None else pieces_of(self.path)
        self.max_streams = max_streams
        self.chunk_bytes = chunk_bytes
        self.read_bytes = READ_BLOCK // chunk_bytes * chunk_bytes  # per thread hop, whole chunks
        self.streams = 0  # fetch streams being served now
        # yielding to the ring: while `busy()` says requests run here, all streams together send at
        # most `busy_rate` bytes/s (docs/performance.md: unpaced serving cost running streams 15% of
        # their median inter-token time and 49% of the p90 on one machine; at 4 MB/s per source, none)
        self.busy, self.busy_rate = busy, busy_rate
        self._next_send = 0.0  # when the paced streams may send their next byte
        self._hashes: dict[str, str] = {}
        self._hashing: dict[str, asyncio.Future] = {}
        self._fds: dict[str, int] = {}  # file within the model ("" for a GGUF file) -> fd for reading
        try:
            for file in [name for name, _size in self.layout.files] or [""]:
                self._fds[file] = os.open(self.path / file if file else self.path, os.O_RDONLY)
        except OSError:
            self.close()
            raise

    def holds(self, name: str) -> bool:
        return name in self.layout if self.partial is None else self.partial.holds(name)

    def known_hashes(self) -> dict[str, str]:
        known = dict(self._hashes)
        if self.partial is not None:
            known.update(self.partial.held)
        return known

    async def sha256(self, name: str) -> str:
        """The piece's hex SHA-256: computed once (in a thread, even when asked by several streams), kept."""
        known = self.known_hashes().get(name)
        if known is not None:
            return known
        job = self._hashing.get(name)
        if job is None:
            job = self._hashing[name] = asyncio.ensure_future(
                asyncio.to_thread(sha256_of, self.layout.path_of(self.path, self.layout.piece(name)),
                                  self.layout.piece(name)))
        try:
            digest = await asyncio.shield(job)
        finally:
            if job.done():
                self._hashing.pop(name, None)
        self._hashes[name] = digest
        return digest

    def manifest(self) -> pb.Manifest:
        held = [p.name for p in self.layout.pieces if self.holds(p.name)]
        return manifest_message(self.layout, self.known_hashes(), held)

    async def on_manifest(self, req: pb.ManifestRequest) -> pb.Manifest:
        return self.manifest()

    async def on_fetch_piece(self, req: pb.FetchPieceRequest) -> AsyncIterator[pb.PieceChunk]:
        """The piece's bytes [offset, offset + length) in chunks; the first carries the piece's hash."""
        if self.streams >= self.max_streams:
            raise RpcRefused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"serving {self.max_streams} fetch streams already: ask another peer or later")
        self.streams += 1
        try:
            if req.fingerprint != self.layout.fingerprint:
                raise RpcRefused(grpc.StatusCode.FAILED_PRECONDITION, f"this peer serves model {self.layout.fingerprint}, "
                                                                      f"not {req.fingerprint[:64]}")
            if req.piece not in self.layout or not self.holds(req.piece):
                raise RpcRefused(grpc.StatusCode.NOT_FOUND, f"this peer does not hold piece {req.piece[:MAX_NAME]}")
            piece = self.layout.piece(req.piece)
            start = req.offset
            end = piece.nbytes if req.length == 0 else start + req.length
            if not start < end <= piece.nbytes:
                raise RpcRefused(grpc.StatusCode.OUT_OF_RANGE,
                                 f"bytes [{start}, {end}) are not within piece {piece.name} ({piece.nbytes} bytes)")
            try:
                digest = await self.sha256(piece.name)
            except (OSError, P2PError) as e:
                log.warning("cannot hash piece %s of %s: %s", piece.name, self.path, e)
                raise RpcRefused(grpc.StatusCode.DATA_LOSS, f"this peer cannot read piece {piece.name}") from None
            pos, first = start, True
            while pos < end:
                want = min(self.read_bytes, end - pos)
                try:
                    # (a GGUF file: two arguments, as subclasses that override _read expect)
                    where = (piece.offset + pos, want) + ((piece.file,) if piece.file else ())
                    block = await asyncio.to_thread(self._read, *where)
                except OSError as e:
                    log.warning("cannot read piece %s of %s: %s", piece.name, self.path, e)
                    block = b""
                if len(block) != want:
                    raise RpcRefused(grpc.StatusCode.DATA_LOSS, f"this peer cannot read piece {piece.name}")
                i = 0
                while i < want:
                    paced = self.busy is not None and self.busy()
                    n = self._paced_chunk() if paced else self.chunk_bytes
                    msg = pb.PieceChunk(offset=pos + i, data=block[i:i + n])
                    if first:
                        msg.sha256, msg.piece_nbytes, first = digest, piece.nbytes, False
                    await self._pace(len(msg.data), paced)
                    yield msg
                    i += len(msg.data)
                pos += want
        finally:
            self.streams -= 1

    def _paced_chunk(self) -> int:
        """Bytes in one chunk while paced: at most a second's worth of the rate, so that a slow rate still
        sends a chunk every second or so (a fetcher gives up on a stream silent for 30 s)."""
        return max(1, min(self.chunk_bytes, int(self.busy_rate)))

    async def _pace(self, nbytes: int, paced: bool | None = None) -> None:
        """While the ring is busy, wait for this chunk's turn in one bucket shared by every stream."""
        if paced is None:
            paced = self.busy is not None and self.busy()
        if not paced:
            self._next_send = 0.0
            return
        now = time.monotonic()
        start = max(now, self._next_send)
        self._next_send = start + nbytes / self.busy_rate
        if start > now:
            await asyncio.sleep(start - now)

    def _read(self, offset: int, nbytes: int, file: str = "") -> bytes:
        """`nbytes` of the file (`file` of a folder) at `offset` (in a worker thread)."""
        fd = self._fds.get(file)
        if fd is None:
            raise OSError(f"{self.path}: the piece source is closed")
        out = bytearray()
        while len(out) < nbytes:
            block = os.pread(fd, nbytes - len(out), offset + len(out))
            if not block:
                break
            out += block
        return bytes(out)

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


# --------------------------------------------------------------------------- fetching


@dataclass
class _Source:
    address: str
    order: int
    manifest: SourceManifest | None = None
    inflight: int = 0
    busy_until: float = 0.0
    busy_backoff: float = BUSY_BACKOFF[0]
    out: str = ""  # why it takes no more part in this fetch ('' while it does)
    bad: int = 0  # pieces it sent bad data for
    disagrees: set[str] = field(default_factory=set)  # pieces whose hash it reports differently
    served: int = 0  # bytes verified from it

    def offers(self, name: str) -> bool:
        return not self.out and self.manifest is not None and name in self.manifest.held \
            and name not in self.disagrees


@dataclass
class _Outcome:
    kind: str  # "ok" | "busy" | "down" | "bad" | "refused"
    why: str = ""


class ModelFetcher:
    """Fetches a model's pieces from peers into a partial copy under `cache_root/<fingerprint>/`.

    `sources`: peers' gRPC addresses, the file's owner first (a piece's hash is pinned from the first
    source that knows it). `fingerprint`: the cluster's model (default: the first source's).
    `open()` learns the model and fetches its header; `fetch(start, end)` the pieces a stage owning
    those layers needs. Both resume: verified pieces are never fetched again."""

    def __init__(self, pool, sources: Sequence[str], cache_root: str | os.PathLike | None = None, *,
                 fingerprint: str | None = None, streams_per_source: int = DEFAULT_STREAMS,
                 chunk_timeout: float = 30.0, progress: Progress | None = None,
                 on_piece: Callable[[str, str], None] | None = None):
        self.pool = pool
        self.cache_root = Path(cache_root) if cache_root is not None else default_cache_root()
        self.fingerprint = fingerprint
        self.streams_per_source = streams_per_source
        self.chunk_timeout = chunk_timeout
        self.progress = progress
        self.on_piece = on_piece
        self._sources: list[_Source] = []
        self.add_sources(sources)
        self.layout: ModelPieces | None = None
        self.partial: PartialModel | None = None
        self._pins: dict[str, tuple[str, str]] = {}  # piece -> (sha256, who said so)
        self._io: set[asyncio.Future] = set()
        self._received = 0  # bytes of the current run, pieces in flight included

    def add_sources(self, addresses: Sequence[str]) -> None:
        known = {s.address for s in self._sources}
        for a in addresses:
            if a not in known:
                self._sources.append(_Source(a, len(self._sources)))
                known.add(a)

    # ---- learning the model
    async def open(self) -> PartialModel:
        """Ask every source for its manifest, open the cache (resuming what it holds) and fetch the header."""
        await self._survey()
        if self.partial is None:
            self.partial = PartialModel.create(self.cache_root, self.layout)
            for name, digest in self.partial.held.items():
                self._pins[name] = (digest, "the cache")
            self._pin_from_manifests()
        heads = self.layout.header_pieces()
        what = "the model header" if self.layout.format != "hf" else "the model's config, tokenizer and shard headers"
        lacking = [p for p in heads if not self.partial.holds(p.name)]
        if lacking:
            self._check_disk(lacking, what)
            await self._run(lacking, what)
        try:
            derived = pieces_of(self.partial.path)
        except (P2PError, OSError, ValueError, TypeError, KeyError) as e:  # a hostile header or index
            self._forget(heads)
            raise FetchError(f"{what} fetched from peers is not usable: {e}") from None
        if derived.table_digest() != self.layout.table_digest():
            self._forget(heads)
            raise FetchError(f"the header of {self.layout.file_name} fetched from peers describes another layout than "
                             f"their manifests (fingerprint {derived.fingerprint} vs {self.layout.fingerprint})")
        if derived.format == "hf":  # what the config says (a tied head) decides what the last stage needs
            self.layout = self.partial.layout = derived
        return self.partial

    def _forget(self, pieces: list[Piece]) -> None:
        for p in pieces:
            self.partial.forget(p.name)

    async def fetch(self, start: int, end: int) -> PartialModel:
        """The pieces layers [start, end) need, fetched into the cache; the partial copy holding them."""
        if self.partial is None:
            await self.open()
        else:
            for s in self._sources:  # a source that failed a previous fetch gets another chance
                s.out = ""
            await self._survey()  # who holds what now (peers that fetched pieces since)
            self._pin_from_manifests()
        await self.verify(start, end)
        missing = self.partial.missing(start, end)
        label = f"layers [{start}, {end})"
        if not missing:
            log.info("%s of %s: all in the cache (%s)", label, self.layout.name, self.partial.path)
            return self.partial
        self._check_disk(missing, label)
        await self._run(missing, label)
        return self.partial

    async def verify(self, start: int, end: int) -> list[str]:
        """Before a stage of [start, end) loads from the copy: its held pieces that this process has not
        hashed yet are hashed against the journal (in a thread); those that do not match are forgotten,
        to be fetched again, in one WARNING line. Their names. (A copy another daemon replaced is left
        for the one now at its path first: a stage loading would map that one.)"""
        if self.partial.was_replaced():  # another daemon on the cache started it afresh: go on with its copy
            self.partial.close()
            self.partial = await asyncio.to_thread(PartialModel.create, self.cache_root, self.layout)
            for name, digest in self.partial.held.items():
                self._pins.setdefault(name, (digest, "the cache"))
            log.info("continuing with the new copy %s, which holds %s", self.partial.path, self.partial.describe())
        t0 = time.monotonic()
        bad = await asyncio.to_thread(self.partial.verify_range, start, end)
        if bad:
            log.warning("layers [%d, %d): %d piece%s of %s in the cache do%s not match the SHA-256 in its journal "
                        "(checked in %.1f s): %s; fetching %s again", start, end, len(bad), "" if len(bad) == 1 else "s",
                        self.partial.path, "es" if len(bad) == 1 else "", time.monotonic() - t0, ", ".join(bad),
                        "it" if len(bad) == 1 else "them")
        return bad

    def _check_disk(self, pieces: list[Piece], label: str) -> None:
        # bytes already on disk in a missing piece's range (an interrupted fetch wrote them, they were
        # not journaled yet) are overwritten in place: they need no more disk
        need = sum(max(0, p.nbytes - self.partial.allocated(p)) for p in pieces)
        free = shutil.disk_usage(self.partial.path.parent).free
        if free < need:
            raise FetchError(f"fetching {label} needs {_size(need)} in {self.partial.path.parent}, "
                             f"only {_size(free)} are free")

    async def _survey(self) -> None:
        """Every live source's manifest; the sources of another model or layout are left out."""
        live = [s for s in self._sources if not s.out]
        answers = await asyncio.gather(*(self._ask_manifest(s) for s in live))
        for s, m in zip(live, answers):
            if m is None:
                continue
            if self.fingerprint is None:
                self.fingerprint = m.layout.fingerprint
            if m.layout.fingerprint != self.fingerprint:
                self._drop(s, f"serves another model (fingerprint {m.layout.fingerprint}, not {self.fingerprint})")
                continue
            if self.layout is None:
                self.layout = m.layout
            if m.layout.table_digest() != self.layout.table_digest():
                self._drop(s, "announces another layout of the same model")
                continue
            s.manifest = m
        if self.layout is None:
            why = "; ".join(f"{s.address}: {s.out}" for s in self._sources) or "no peers given"
            raise FetchError(f"no peer serves the model{f' {self.fingerprint}' if self.fingerprint else ''} ({why})")

    async def _ask_manifest(self, s: _Source) -> SourceManifest | None:
        try:
            return parse_manifest(await self.pool.get(s.address).model_manifest(), s.address)
        except grpc.aio.AioRpcError as e:
            self._drop(s, f"no manifest ({e.code().name.lower()}: {e.details()})")
        except FetchError as e:
            self._drop(s, str(e))
        return None

    def _pin_from_manifests(self) -> None:
        for s in sorted(self._sources, key=lambda s: s.order):
            if s.manifest is None:
                continue
            for name, digest in s.manifest.hashes.items():
                pinned = self._pins.setdefault(name, (digest, s.address))
                if pinned[0] != digest and name not in s.disagrees:
                    s.disagrees.add(name)
                    log.warning("source %s reports another SHA-256 for %s than %s (%s, not %s): not fetching it there",
                                s.address, name, pinned[1], digest[:12], pinned[0][:12])

    def _drop(self, s: _Source, why: str) -> None:
        if not s.out:
            s.out = why
            log.warning("source %s left out of the fetch: %s", s.address, why)

    # ---- the fetch loop
    async def _run(self, pieces: list[Piece], label: str) -> None:
        pending = deque(sorted(pieces, key=lambda p: -p.nbytes))  # largest first: the tail is short
        tried: dict[str, dict[str, str]] = {p.name: {} for p in pieces}  # piece -> source -> what happened
        running: dict[asyncio.Task, tuple[Piece, _Source]] = {}
        total = sum(p.nbytes for p in pieces)
        self._received, t0, turn = 0, time.monotonic(), 0
        self._log_state = [t0, label, total, t0]  # last line, label, total, start
        by_source: dict[str, int] = {}
        try:
            while pending or running:
                now, waits = time.monotonic(), []
                for piece in list(pending):
                    if self.partial.holds(piece.name):  # journaled meanwhile by another daemon on this cache
                        pending.remove(piece)
                        continue
                    able = [s for s in self._sources if s.offers(piece.name) and s.address not in tried[piece.name]]
                    if not able:  # sources only ever drop out: nobody is left for this piece
                        raise self._give_up(piece, tried[piece.name])
                    free = [s for s in able if s.inflight < self.streams_per_source and s.busy_until <= now]
                    if not free:
                        waits += [s.busy_until for s in able if s.busy_until > now]
                        continue
                    n = len(self._sources)
                    s = min(free, key=lambda s: (s.inflight, (s.order - turn) % n))  # least loaded, then in turn
                    turn += 1
                    s.inflight += 1
                    pending.remove(piece)
                    running[asyncio.ensure_future(self._fetch_piece(piece, s))] = (piece, s)
                timeout = max(0.0, min(waits) - time.monotonic()) if waits else None
                if not running:
                    await asyncio.sleep(timeout if timeout is not None else 0.05)
                    continue
                done, _ = await asyncio.wait(running, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    piece, s = running.pop(task)
                    s.inflight -= 1
                    try:
                        outcome = task.result()
                    except OSError as e:  # the cache's disk, not the source
                        raise FetchError(f"cannot write {self.partial.path}: {e.strerror or e}") from None
                    if outcome.kind == "ok":
                        s.busy_backoff = BUSY_BACKOFF[0]
                        s.served += piece.nbytes
                        by_source[s.address] = by_source.get(s.address, 0) + piece.nbytes
                        if self.on_piece is not None:
                            self.on_piece(piece.name, s.address)
                        continue
                    pending.appendleft(piece)
                    self._judge(piece, s, outcome, tried[piece.name])
            self._progress()
            elapsed = max(time.monotonic() - t0, 1e-9)
            sources = ", ".join(f"{a} ({_mib(n)} MiB)" for a, n in sorted(by_source.items()))
            log.info("fetched %s: %d piece%s, %s MiB in %.1f s, %.1f MB/s, from %s", label, len(pieces),
                     "" if len(pieces) == 1 else "s", _mib(total), elapsed, total / elapsed / 1e6, sources)
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            for _piece, s in running.values():
                s.inflight -= 1
            # a write or journal update already in a thread finishes before anything else touches the file
            await asyncio.gather(*list(self._io), return_exceptions=True)

    def _judge(self, piece: Piece, s: _Source, outcome: _Outcome, tried: dict[str, str]) -> None:
        """Log what a source did with a piece and decide whether it may be asked again."""
        if outcome.kind == "busy":
            s.busy_until = time.monotonic() + s.busy_backoff
            s.busy_backoff = min(s.busy_backoff * 2, BUSY_BACKOFF[1])
            log.debug("source %s is busy (%s): %s waits or goes elsewhere", s.address, outcome.why, piece.name)
            return
        tried[s.address] = outcome.why
        if outcome.kind == "down":
            s.out = f"failed while sending {piece.name} ({outcome.why})"
            log.warning("source %s failed while sending %s (%s): left out of this fetch, the piece comes from "
                        "another source", s.address, piece.name, outcome.why)
        elif outcome.kind == "bad":
            s.bad += 1
            log.warning("source %s sent bad data for %s: %s; fetching it from another source",
                        s.address, piece.name, outcome.why)
            if self._pins.get(piece.name, ("", ""))[1] == s.address:
                del self._pins[piece.name]  # its word on the hash is worth no more than its bytes
            if s.bad >= BAD_LIMIT:
                self._drop(s, f"sent bad data for {s.bad} pieces")
        else:
            log.info("source %s refused %s: %s; fetching it from another source", s.address, piece.name, outcome.why)

    def _give_up(self, piece: Piece, tried: dict[str, str]) -> FetchError:
        what = "; ".join(f"{a}: {why}" for a, why in tried.items())
        others = "; ".join(f"{s.address}: {s.out}" for s in self._sources if s.out and s.address not in tried)
        unheld = [s.address for s in self._sources if not s.out and s.manifest and piece.name not in s.manifest.held]
        parts = [p for p in (what, others, f"not held by {', '.join(unheld)}" if unheld else "") if p]
        return FetchError(f"cannot fetch {piece.name} of {self.layout.name} ({_size(piece.nbytes)}): every source "
                          f"failed ({'; '.join(parts) or 'no sources'})")

    async def _fetch_piece(self, piece: Piece, s: _Source) -> _Outcome:
        """One piece from one source: streamed, written at its offset, hashed, checked, journaled."""
        call = self.pool.get(s.address).fetch_piece(self.fingerprint, piece.name)
        got, ok = 0, False
        h = hashlib.sha256()
        timeout = self.chunk_timeout + piece.nbytes / MIN_HASH_RATE  # the source may hash it first
        try:
            while True:
                try:
                    msg = await asyncio.wait_for(call.read(), timeout)
                except asyncio.TimeoutError:
                    return _Outcome("down", f"no data for {timeout:.0f} s")
                if msg is grpc.aio.EOF:
                    break
                timeout = self.chunk_timeout
                if got == 0:
                    if msg.piece_nbytes != piece.nbytes:
                        return _Outcome("bad", f"says the piece has {msg.piece_nbytes} bytes, not {piece.nbytes}")
                    if not _is_sha256(msg.sha256):
                        return _Outcome("bad", f"a malformed SHA-256 {msg.sha256[:80]!r}")
                    pinned = self._pins.setdefault(piece.name, (msg.sha256, s.address))
                    if pinned[0] != msg.sha256:
                        s.disagrees.add(piece.name)
                        return _Outcome("refused", f"holds another {piece.name} (SHA-256 {msg.sha256[:12]}, "
                                                   f"{pinned[1]} said {pinned[0][:12]})")
                n = len(msg.data)
                if msg.offset != got:
                    return _Outcome("bad", f"a chunk at byte {msg.offset} where byte {got} was due")
                if not 0 < n <= MAX_CHUNK or got + n > piece.nbytes:
                    return _Outcome("bad", f"a chunk of {n} bytes at byte {got} of {piece.nbytes}")
                await self._in_thread(self._write, piece.offset + got, msg.data, h, piece.file)
                got += n
                self._received += n
                self._progress()
            if got != piece.nbytes:
                return _Outcome("bad", f"the stream ended after {got} of {piece.nbytes} bytes")
            digest, (expected, who) = h.hexdigest(), self._pins[piece.name]
            if digest != expected:
                return _Outcome("bad", f"its bytes hash to {digest[:12]}, not {expected[:12]} (SHA-256 from {who})")
            await self._in_thread(self.partial.mark_held, piece.name, digest)
            ok = True
            return _Outcome("ok")
        except grpc.aio.AioRpcError as e:
            return _classify(e)
        finally:
            call.cancel()
            if not ok:
                self._received -= got

    def _write(self, offset: int, data: bytes, h, file: str = "") -> None:
        self.partial.write(offset, data, file)
        h.update(data)

    async def _in_thread(self, fn, *args):
        """fn(*args) in a worker thread; a cancelled caller does not abandon it (the run waits for it)."""
        job = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._io.add(job)
        job.add_done_callback(self._io.discard)
        return await asyncio.shield(job)

    def _progress(self) -> None:
        last, label, total, t0 = self._log_state
        now = time.monotonic()
        rate = self._received / max(now - t0, 1e-9)
        if self.progress is not None:
            self.progress(self._received, total, rate)
        if now - last >= LOG_INTERVAL:
            self._log_state[0] = now
            log.info("fetching %s: %s/%s MiB, %.1f MB/s", label, _mib(self._received), _mib(total), rate / 1e6)

    def close(self) -> None:
        if self.partial is not None:
            self.partial.close()


def _classify(e: grpc.aio.AioRpcError) -> _Outcome:
    code, why = e.code(), f"{e.code().name.lower()}: {e.details() or ''}".rstrip(": ")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return _Outcome("busy", why)
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
                grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS):
        return _Outcome("refused", why)
    return _Outcome("down", why)  # unavailable, cancelled, deadline, unimplemented, internal, ...


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}" if n < 10 << 20 else f"{n >> 20}"


def _size(n: int) -> str:
    return f"{n} bytes" if n < 1 << 10 else f"{n / 1024:.0f} KiB" if n < 1 << 20 else f"{_mib(n)} MiB"


async def learn_model(sources: Sequence[str], security, cache_root: str | os.PathLike | None = None) -> Path:
    """`join --from-peers` before its daemon starts: the model's header (a folder: its config, tokenizer
    and shard headers) from `sources` into a partial copy under the cache (resuming one there); the
    copy's path (a file or a folder), which reads as the model."""
    from ..transport.client import ClientPool

    pool = ClientPool(security)
    wait = from_peers_wait()
    deadline = time.monotonic() + wait
    try:
        while True:  # peers started together: the file's owner may not listen yet
            fetcher = ModelFetcher(pool, sources, cache_root)
            try:
                partial = await fetcher.open()
                break
            except FetchError as e:
                fetcher.close()
                if fetcher.layout is not None or time.monotonic() >= deadline:
                    raise
                if time.monotonic() + wait - deadline < 1.5:  # the first failure: say why we wait
                    log.info("waiting up to %.0f s for a peer to serve the model: %s", wait, e)
                await asyncio.sleep(1.0)
            except OSError as e:  # the cache cannot be made or written (--model-cache a file, no room, no permission):
                fetcher.close()  # it was "internal error: NotADirectoryError ..."
                where = f" ({e.filename})" if e.filename else ""
                raise UsageError(f"cannot keep the fetched model under {fetcher.cache_root}: {e.strerror or e}{where} "
                                 f"(pass another --model-cache)") from None
        log.info("model %s (fingerprint %s) learned from %s: %s", fetcher.layout.name, fetcher.layout.fingerprint,
                 ", ".join(sources), partial.describe())
        fetcher.close()
        return partial.path
    finally:
        await pool.close()


async def fetch_layers(pool, sources: Sequence[str], start: int, end: int, cache_root: str | os.PathLike | None = None,
                       **options) -> PartialModel:
    """One call: the pieces layers [start, end) need, from `sources`, into the cache (see ModelFetcher)."""
    fetcher = ModelFetcher(pool, sources, cache_root, **options)
    try:
        return await fetcher.fetch(start, end)
    finally:
        fetcher.close()
