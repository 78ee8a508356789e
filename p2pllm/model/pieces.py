"""A model file as pieces, and a partial copy of it that holds only some of them.

A GGUF file is cut into pieces that tile it exactly: the header piece `[0, first tensor)` and one
piece per tensor, from its offset to the next tensor's (so the alignment padding after a tensor
belongs to it, and a copy holding every piece is the original byte for byte). Each piece knows the
decoder layer it belongs to (`blk.N.` -> N; None for the header, the embedding, the output head and
norm). `ModelPieces.needed(start, end)` lists what a stage owning layers [start, end) maps.

`PartialModel` is a copy being assembled from pieces: a sparse file of the original's full size at
`<cache>/<fingerprint>/<file name>`, the header and the pieces it holds written at their own offsets
(so the GGUF reader and the mmap-based stages open it unchanged), plus a JSON journal beside it
(`<file name>.pieces.json`) naming each piece held and its SHA-256, rewritten atomically after each
piece is verified. A piece is held once its hash matched, never before. docs/fetch.md has the rest.

Nothing here touches the network (cluster/fetch.py does).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelFileError, UsageError
from .formats import open_model_file

HEADER = "<header>"  # the piece [0, first tensor): GGUF metadata, the tensor table, its padding
JOURNAL_SUFFIX = ".pieces.json"
JOURNAL_FORMAT = "p2pllm-partial/1"
HASH_BLOCK = 8 << 20  # bytes read at a time when hashing
_LAYER = re.compile(r"blk\.(\d+)\.")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Piece:
    name: str  # the tensor's name, or HEADER
    offset: int  # where it starts in the file
    nbytes: int  # up to the next piece (the tensor's bytes and its alignment padding)
    layer: int | None  # the decoder layer; None for the header, embedding, output head, norms


@dataclass(frozen=True)
class ModelPieces:
    """How one model file divides into pieces. Derived from the file's header alone."""

    name: str  # the model's name (general.name)
    fingerprint: str  # ModelSpec.fingerprint: the same for the original and any partial copy
    file_name: str
    size: int  # bytes of the whole file
    n_layers: int
    pieces: tuple[Piece, ...]  # in file order, tiling [0, size)
    format: str = "gguf"

    def __post_init__(self):
        object.__setattr__(self, "_by_name", {p.name: p for p in self.pieces})

    def piece(self, name: str) -> Piece:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no piece {name!r} in {self.file_name}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def needed(self, start: int, end: int) -> list[Piece]:
        """The pieces a stage owning layers [start, end) maps: the header, every `blk.i.` tensor of
        its layers, `rope_freqs` when the file has it, the embedding on the first stage, the final
        norm and output head (the embedding when tied) on the last. The same tensors as
        loader.stored_slice, plus any other tensor of those layers."""
        from .loader import GGUF_NAMES

        if not (0 <= start < end <= self.n_layers):
            raise UsageError(f"layer range [{start}, {end}) is not within the model's {self.n_layers} layers")
        names = {HEADER, GGUF_NAMES["rope_freqs"]}
        if start == 0:
            names.add(GGUF_NAMES["embed"])
        if end == self.n_layers:
            head = GGUF_NAMES["head"] if GGUF_NAMES["head"] in self else GGUF_NAMES["embed"]
            names.update((GGUF_NAMES["norm"], head))
        return [p for p in self.pieces
                if p.name in names or (p.layer is not None and start <= p.layer < end)]

    def table_digest(self) -> str:
        """SHA-256 of the piece table: two layouts are the same file layout iff these match."""
        h = hashlib.sha256(f"{self.format}|{self.fingerprint}|{self.size}|{self.n_layers}|".encode())
        for p in self.pieces:
            h.update(f"{p.name}|{p.offset}|{p.nbytes}|{p.layer};".encode())
        return h.hexdigest()


def layer_of(tensor_name: str) -> int | None:
    m = _LAYER.match(tensor_name)
    return int(m.group(1)) if m else None


def pieces_of(path: str | os.PathLike) -> ModelPieces:
    """The pieces of a GGUF file (or of a partial copy holding at least its header)."""
    from .spec import read_spec

    path = Path(path)
    mf = open_model_file(path)
    try:
        if mf.format != "gguf":
            raise UsageError(f"{path}: fetching Hugging Face folders from peers is not supported yet (GGUF only)")
        spec = read_spec(path, mf)
        size = path.stat().st_size
        tensors = sorted((i for i in mf.tensors.values() if i.nbytes), key=lambda i: i.offset)
    finally:
        mf.close()
    for a, b in itertools.pairwise(tensors):
        if b.offset < a.offset + a.nbytes:
            raise ModelFileError(path, f"tensors {a.name} and {b.name} overlap: the file cannot be cut into pieces")
    starts = [(HEADER, 0, None)] + [(t.name, t.offset, layer_of(t.name)) for t in tensors]
    pieces = []
    for k, (name, offset, layer) in enumerate(starts):
        stop = starts[k + 1][1] if k + 1 < len(starts) else size
        if stop <= offset:
            raise ModelFileError(path, f"piece {name} is empty (it starts at byte {offset}, the next at {stop})")
        pieces.append(Piece(name, offset, stop - offset, layer))
    return ModelPieces(spec.name, spec.fingerprint, path.name, size, spec.n_layers, tuple(pieces))


def sha256_of(path: str | os.PathLike, piece: Piece) -> str:
    """The hex SHA-256 of one piece's bytes in a file (read in blocks; the GIL is released while hashing)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < piece.nbytes:
            block = os.pread(fd, min(HASH_BLOCK, piece.nbytes - done), piece.offset + done)
            if not block:
                raise ModelFileError(path, f"piece {piece.name}: the file ends at byte {piece.offset + done}")
            h.update(block)
            done += len(block)
    finally:
        os.close(fd)
    return h.hexdigest()


def journal_path(model_path: str | os.PathLike) -> Path:
    p = Path(model_path)
    return p.with_name(p.name + JOURNAL_SUFFIX)


def is_partial(model_path: str | os.PathLike) -> bool:
    """Whether a model file is a partial copy (it has a journal beside it)."""
    return journal_path(model_path).is_file()


def safe_file_name(name: str) -> bool:
    """A plain file name (from a peer's manifest): no folders, nothing hidden, nothing odd."""
    return (0 < len(name) <= 255 and name == Path(name).name and not name.startswith(".")
            and not any(c in name for c in "/\\\x00"))


def safe_fingerprint(fp: str) -> bool:
    return re.fullmatch(r"[0-9a-f]{8,64}", fp) is not None


def default_cache_root() -> Path:
    """~/.cache/p2pllm/models (or $XDG_CACHE_HOME/p2pllm/models)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "p2pllm" / "models"


def find_cached(cache_root: str | os.PathLike, fingerprint: str) -> PartialModel | None:
    """The partial copy of model `fingerprint` in the cache, if one holds at least its header
    (a daemon restarting with --from-peers reuses it, even before any peer answers)."""
    if not safe_fingerprint(fingerprint):
        return None
    for journal in sorted((Path(cache_root) / fingerprint).glob("*" + JOURNAL_SUFFIX)):
        try:
            part = PartialModel.load(journal.with_name(journal.name[:-len(JOURNAL_SUFFIX)]))
        except (ModelFileError, UsageError, OSError):
            continue
        if part.layout.fingerprint == fingerprint:
            return part
    return None


# --------------------------------------------------------------------------- partial copy


class PartialModel:
    """A sparse copy of a model file and the journal of the pieces it holds (verified)."""

    def __init__(self, path: Path, layout: ModelPieces, held: dict[str, str]):
        self.path = path
        self.layout = layout
        self._held = dict(held)  # piece name -> sha256
        self._lock = threading.RLock()
        self._fd: int | None = None

    # ---- opening
    @classmethod
    def create(cls, cache_root: str | os.PathLike, layout: ModelPieces) -> PartialModel:
        """The copy of `layout`'s file under `cache_root/<fingerprint>/`: the one already there when
        its journal describes the same layout (a resumed fetch), else a new empty sparse file."""
        if not safe_fingerprint(layout.fingerprint):
            raise ModelFileError(cache_root, f"refusing model fingerprint {layout.fingerprint!r} as a folder name")
        if not safe_file_name(layout.file_name):
            raise ModelFileError(cache_root, f"refusing model file name {layout.file_name!r}")
        folder = Path(cache_root) / layout.fingerprint
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / layout.file_name
        held = _read_journal(path, layout) if path.is_file() else None
        if held is None or path.stat().st_size != layout.size:
            with open(path, "wb") as f:  # sparse: nothing is allocated until written
                f.truncate(layout.size)
            held = {}
            part = cls(path, layout, held)
            part._write_journal()
            return part
        return cls(path, layout, held)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PartialModel:
        """An existing partial copy (check-model, a peer serving the pieces it fetched)."""
        path = Path(path)
        jpath = journal_path(path)
        data = _load_json(jpath)
        held = data.get("pieces")
        if not isinstance(held, dict) or HEADER not in held:
            raise ModelFileError(path, "partial model whose header has not been fetched yet")
        layout = pieces_of(path)
        checked = _read_journal(path, layout)
        if checked is None:
            raise ModelFileError(jpath, "the journal does not describe this file (another model or layout)")
        return cls(path, layout, checked)

    # ---- what it holds
    @property
    def held(self) -> dict[str, str]:
        """piece name -> sha256 of every piece held (verified)."""
        return dict(self._held)

    def holds(self, name: str) -> bool:
        return name in self._held

    def missing(self, start: int, end: int) -> list[Piece]:
        """The pieces a stage owning [start, end) needs that are not held yet."""
        return [p for p in self.layout.needed(start, end) if p.name not in self._held]

    def complete(self, start: int, end: int) -> bool:
        return not self.missing(start, end)

    def held_layers(self) -> list[int]:
        """Layers all of whose `blk.i.` pieces are held."""
        by_layer: dict[int, bool] = {}
        for p in self.layout.pieces:
            if p.layer is not None:
                by_layer[p.layer] = by_layer.get(p.layer, True) and p.name in self._held
        return sorted(i for i, ok in by_layer.items() if ok)

    def describe(self) -> str:
        """'layers [2, 4) of 6, without the embedding and output head', for people."""
        ranges = _ranges(self.held_layers())
        text = "layers " + ", ".join(f"[{a}, {b})" for a, b in ranges) if ranges else "no layers"
        extra = []
        from .loader import GGUF_NAMES

        has_embed = self.holds(GGUF_NAMES["embed"])
        head = GGUF_NAMES["head"] if GGUF_NAMES["head"] in self.layout else GGUF_NAMES["embed"]
        has_head = self.holds(head) and self.holds(GGUF_NAMES["norm"])
        extra.append(("with" if has_embed else "without") + " the embedding")
        extra.append(("with" if has_head else "without") + " the output head")
        return f"{text} of {self.layout.n_layers}, " + " and ".join(extra)

    # ---- writing (the fetcher)
    def write(self, offset: int, data: bytes) -> None:
        """Bytes at their offset in the file (thread-safe: positioned writes)."""
        if offset < 0 or offset + len(data) > self.layout.size:
            raise ValueError(f"write of {len(data)} bytes at {offset} outside the file ({self.layout.size} bytes)")
        fd = self._writer()
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n

    def mark_held(self, name: str, sha256: str) -> None:
        """Record a verified piece: its bytes made durable first, then the journal replaced atomically."""
        self.layout.piece(name)
        if not _HEX64.fullmatch(sha256):
            raise ValueError(f"not a SHA-256: {sha256!r}")
        os.fsync(self._writer())
        with self._lock:
            self._held[name] = sha256
            self._write_journal()

    def forget(self, name: str) -> None:
        """No longer hold a piece (its bytes failed a check)."""
        with self._lock:
            if self._held.pop(name, None) is not None:
                self._write_journal()

    def verify(self, name: str) -> bool:
        """Whether a held piece's bytes still match its journaled hash (reads the piece)."""
        expected = self._held.get(name)
        return expected is not None and sha256_of(self.path, self.layout.piece(name)) == expected

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _writer(self) -> int:
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR)
            return self._fd

    def _write_journal(self) -> None:
        lay = self.layout
        data = {"format": JOURNAL_FORMAT, "model": lay.name, "fingerprint": lay.fingerprint, "file": lay.file_name,
                "size": lay.size, "layout": lay.table_digest(), "pieces": dict(sorted(self._held.items()))}
        jpath = journal_path(self.path)
        tmp = jpath.with_name(jpath.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, jpath)


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(path, "missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(path, f"unreadable journal ({e})") from None
    if not isinstance(data, dict):
        raise ModelFileError(path, "unreadable journal (not a JSON object)")
    return data


def _read_journal(path: Path, layout: ModelPieces) -> dict[str, str] | None:
    """The held pieces the journal beside `path` lists, if it describes `layout`; else None."""
    try:
        data = _load_json(journal_path(path))
    except ModelFileError:
        return None
    same = (data.get("format") == JOURNAL_FORMAT and data.get("fingerprint") == layout.fingerprint
            and data.get("size") == layout.size and data.get("layout") == layout.table_digest())
    pieces = data.get("pieces")
    if not same or not isinstance(pieces, dict):
        return None
    return {name: sha for name, sha in pieces.items()
            if name in layout and isinstance(sha, str) and _HEX64.fullmatch(sha)}


def _ranges(layers: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in layers:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


# --------------------------------------------------------------------------- check-model


def check_partial(path: str | os.PathLike, layers: tuple[int, int] | None = None, *, decode: bool = True):
    """`p2pllm check-model` on a partial copy: the journal matches the file, every held piece's bytes
    match their hash, held tensors have the shapes the metadata implies and decode to finite numbers;
    with `layers`, every piece that stage needs is held. (spec, PartialModel), or a ModelFileError
    naming the first problem (a missing tensor, a piece whose bytes changed)."""
    import torch

    from .loader import stored_slice
    from .spec import read_spec

    part = PartialModel.load(path)
    spec = read_spec(path)
    if layers is not None:
        start, end = layers
        if not 0 <= start < end <= spec.n_layers:
            raise UsageError(f"--layers {start}:{end} is not within the model's {spec.n_layers} layers")
        missing = part.missing(start, end)
        if missing:
            raise ModelFileError(path, f"layers [{start}, {end}) need tensor {missing[0].name}, which this partial "
                                       f"model does not hold ({len(missing)} pieces missing; it holds {part.describe()})")
        stored_slice(path, start, end, spec=spec)  # shapes against the metadata
    for name in sorted(part.held):
        if not part.verify(name):
            raise ModelFileError(path, f"piece {name}: its bytes do not match the SHA-256 in the journal "
                                       f"(fetch it again)")
    if decode:
        mf = open_model_file(path)
        try:
            for name in sorted(part.held):
                if name == HEADER or name not in mf.tensors:
                    continue
                t = mf.read(name)
                if t.is_floating_point():
                    bad = int((~torch.isfinite(t)).sum())
                    if bad:
                        raise ModelFileError(path, f"tensor {name}: {bad} of {t.numel()} values are NaN or infinite")
        finally:
            mf.close()
    part.close()
    return spec, part
