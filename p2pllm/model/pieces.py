"""A model as pieces, and a partial copy of it that holds only some of them.

A GGUF file is cut into pieces that tile it exactly: the header piece `[0, first tensor)` and one
piece per tensor, from its offset to the next tensor's (so the alignment padding after a tensor
belongs to it, and a copy holding every piece is the original byte for byte). Each piece knows the
decoder layer it belongs to (`blk.N.` -> N; None for the header, the embedding, the output head and
norm). `ModelPieces.needed(start, end)` lists what a stage owning layers [start, end) maps.

A Hugging Face folder is cut the same way, file by file (`Piece.file`): each small file the loader
and tokenizer read (config.json, tokenizer.json, ...) is one whole-file piece; each safetensors
shard is a header piece `<header>:<shard>` (the 8-byte length and the JSON header) and one piece
per tensor (`model.layers.N.` -> layer N).

`PartialModel` is a copy being assembled from pieces: a sparse file of the original's full size at
`<cache>/<fingerprint>/<file name>` (for a folder: a folder there, its small files and each shard a
sparse file of its full size), the headers and the pieces it holds written at their own offsets
(so the readers and the mmap-based stages open it unchanged), plus a JSON journal beside it
(`<file name>.pieces.json`) naming each piece held and its SHA-256, rewritten atomically after each
piece is verified. A piece is held once its hash matched, never before. docs/fetch.md has the rest.

Nothing here touches the network (cluster/fetch.py does).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelFileError, UsageError
from .formats import open_model_file

HEADER = "<header>"  # the piece [0, first tensor): GGUF metadata, the tensor table, its padding
JOURNAL_SUFFIX = ".pieces.json"
LOCK_SUFFIX = ".pieces.lock"  # beside the journal: daemons sharing a cache take turns on the journal
JOURNAL_FORMAT = "p2pllm-partial/1"
HASH_BLOCK = 8 << 20  # bytes read at a time when hashing
_LAYER = re.compile(r"blk\.(\d+)\.")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_HEX64 = re.compile(r"[0-9a-f]{64}")

log = logging.getLogger(__name__)

# The small files of a Hugging Face folder that p2pllm reads (spec, loader, tokenizer): each is one
# whole-file piece when the folder has it. Anything else in the folder (README, tokenizer.model, ...)
# is not part of the model as p2pllm sees it and is not fetched.
HF_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
SHARD_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class Piece:
    name: str  # the tensor's name, or HEADER (for a folder: a small file's name, or header_name(shard))
    offset: int  # where it starts in its file
    nbytes: int  # up to the next piece (the tensor's bytes and its alignment padding)
    layer: int | None  # the decoder layer; None for the header, embedding, output head, norms
    file: str = ""  # the file it lies in, within a Hugging Face folder; "" for a GGUF file


def header_name(shard: str) -> str:
    """The name of a safetensors shard's header piece: `<header>:model-00001-of-00002.safetensors`."""
    return f"{HEADER}:{shard}"


def hf_file_allowed(name: str) -> bool:
    """Whether a file of a Hugging Face folder may be a piece's file: one p2pllm reads, a plain name."""
    return safe_file_name(name) and (name in HF_FILES or (name.endswith(SHARD_SUFFIX) and len(name) > len(SHARD_SUFFIX)))


@dataclass(frozen=True)
class ModelPieces:
    """How one model file divides into pieces. Derived from the file's header alone."""

    name: str  # the model's name (general.name)
    fingerprint: str  # ModelSpec.fingerprint: the same for the original and any partial copy
    file_name: str
    size: int  # bytes of the whole file
    n_layers: int
    pieces: tuple[Piece, ...]  # in file order, tiling [0, size) (a folder: file by file, each file tiled)
    format: str = "gguf"  # "gguf" | "hf"
    files: tuple[tuple[str, int], ...] = ()  # a folder's files (name, bytes), in piece order; () for GGUF
    tied: bool | None = None  # hf: the output head is the embedding (from config.json); None: not known

    def __post_init__(self):
        object.__setattr__(self, "_by_name", {p.name: p for p in self.pieces})
        object.__setattr__(self, "_file_sizes", dict(self.files))

    def file_size(self, file: str = "") -> int:
        """Bytes of one file of the model ("" : the GGUF file)."""
        if not file and not self.files:
            return self.size
        try:
            return self._file_sizes[file]
        except KeyError:
            raise KeyError(f"no file {file!r} in {self.file_name}") from None

    def path_of(self, root: str | os.PathLike, piece: Piece) -> Path:
        """The file a piece lies in, for a model at `root` (a GGUF file, or a folder)."""
        return Path(root) / piece.file if piece.file else Path(root)

    def header_pieces(self) -> list[Piece]:
        """What describes the model and every stage needs: the GGUF header; a folder's small files and
        every shard's header (the loader opens them all). Fetched first; a partial copy holds them all."""
        if self.format != "hf":
            return [self._by_name[HEADER]] if HEADER in self._by_name else []
        return [p for p in self.pieces if p.offset == 0 and p.name in (p.file, header_name(p.file))]

    def embed_name(self) -> str:
        return _names(self.format)["embed"]

    def head_names(self) -> list[str]:
        """The final norm and the output head the last stage maps (the embedding when tied)."""
        names = _names(self.format)
        if self.format != "hf":
            return [names["norm"], names["head"] if names["head"] in self else names["embed"]]
        if names["head"] not in self or self.tied:
            return [names["norm"], names["embed"]]
        if self.tied is None:  # not known yet (a layout from a manifest): both, to be safe
            return [names["norm"], names["head"], names["embed"]]
        return [names["norm"], names["head"]]

    def piece(self, name: str) -> Piece:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no piece {name!r} in {self.file_name}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def needed(self, start: int, end: int) -> list[Piece]:
        """The pieces a stage owning layers [start, end) maps: the header pieces (a folder: its small
        files and every shard header), every tensor of its layers, `rope_freqs` when a GGUF file has
        it, the embedding on the first stage, the final norm and output head (the embedding when tied)
        on the last. The same tensors as the loader's plan for the stage, plus any other tensor of
        those layers."""
        if not (0 <= start < end <= self.n_layers):
            raise UsageError(f"layer range [{start}, {end}) is not within the model's {self.n_layers} layers")
        names = {p.name for p in self.header_pieces()}
        if self.format != "hf":
            names.add(_names(self.format)["rope_freqs"])
        if start == 0:
            names.add(self.embed_name())
        if end == self.n_layers:
            names.update(self.head_names())
        return [p for p in self.pieces
                if p.name in names or (p.layer is not None and start <= p.layer < end)]

    def table_digest(self) -> str:
        """SHA-256 of the piece table: two layouts are the same file layout iff these match."""
        h = hashlib.sha256(f"{self.format}|{self.fingerprint}|{self.size}|{self.n_layers}|".encode())
        for p in self.pieces:
            h.update(f"{p.name}|{p.offset}|{p.nbytes}|{p.layer}{f'|{p.file}' if p.file else ''};".encode())
        for name, size in self.files:
            h.update(f"file|{name}|{size};".encode())
        return h.hexdigest()


def _names(fmt: str) -> dict[str, str]:
    from .loader import GGUF_NAMES, HF_NAMES

    return HF_NAMES if fmt == "hf" else GGUF_NAMES


def layer_of(tensor_name: str, format: str = "gguf") -> int | None:
    """The decoder layer of a tensor: GGUF `blk.N.`, Hugging Face `model.layers.N.` (format "hf")."""
    m = (_HF_LAYER if format == "hf" else _LAYER).match(tensor_name)
    return int(m.group(1)) if m else None


def model_root(path: str | os.PathLike) -> Path:
    """The model at `path`: a GGUF file, or a folder (given as the folder or its config.json)."""
    p = Path(os.path.abspath(path))
    if p.name == "config.json" and p.is_file():
        return p.parent
    return p


def pieces_of(path: str | os.PathLike) -> ModelPieces:
    """The pieces of a GGUF file or a Hugging Face folder (or of a partial copy holding at least its
    header pieces)."""
    from .spec import read_spec

    path = Path(path)
    if model_root(path).is_dir():
        return _hf_pieces(model_root(path))
    mf = open_model_file(path)
    try:
        if mf.format != "gguf":
            return _hf_pieces(model_root(path))
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


def _hf_pieces(folder: Path) -> ModelPieces:
    """A Hugging Face folder's pieces: its small files whole, then each shard's header and tensors."""
    from .spec import read_spec

    mf = open_model_file(folder)  # checks config.json, the index and every shard header
    try:
        spec = read_spec(folder, mf)
    finally:
        mf.close()
    if not safe_file_name(folder.name):
        raise ModelFileError(folder, "a folder of this name cannot be fetched from peers (a plain name is needed)")
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _load_json(index).get("weight_map")
        shards = sorted(set(weight_map.values()))  # what the loader opens (open_model_file checked it)
    else:
        shards = sorted(p.name for p in folder.glob("*" + SHARD_SUFFIX))
    files, pieces = [], []
    for name in HF_FILES:
        f = folder / name
        if f.is_file() and f.stat().st_size > 0:
            files.append((name, f.stat().st_size))
            pieces.append(Piece(name, 0, f.stat().st_size, None, name))
    for shard in shards:
        if not isinstance(shard, str) or not hf_file_allowed(shard):
            raise ModelFileError(folder, f"shard {shard!r} is not a plain file name ending in .safetensors: "
                                         f"this folder cannot be fetched from peers")
        size = (folder / shard).stat().st_size
        files.append((shard, size))
        pieces += _shard_pieces(folder / shard, size)
    names = [p.name for p in pieces]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ModelFileError(folder, f"two pieces would be named {dup!r}: the folder cannot be cut into pieces")
    return ModelPieces(spec.name, spec.fingerprint, folder.name, sum(s for _n, s in files), spec.n_layers,
                       tuple(pieces), format="hf", files=tuple(files), tied=spec.tied_embeddings)


def _shard_pieces(path: Path, size: int) -> list[Piece]:
    """One safetensors shard: `<header>:<shard>` is [0, first tensor), then a piece per tensor to the
    next tensor's start (the last one to the end of the file). The loader checked the header."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data_start = 8 + header_len
    tensors = sorted(((name, *(int(x) for x in e["data_offsets"])) for name, e in header.items()
                      if name != "__metadata__"), key=lambda t: t[1])
    tensors = [t for t in tensors if t[2] > t[1]]
    for (a, _ab, ae), (b, bb, _be) in itertools.pairwise(tensors):
        if bb < ae:
            raise ModelFileError(path, f"tensors {a} and {b} overlap: the file cannot be cut into pieces")
    starts = [(header_name(path.name), 0, None)]
    starts += [(name, data_start + begin, layer_of(name, "hf")) for name, begin, _end in tensors]
    pieces = []
    for k, (name, offset, layer) in enumerate(starts):
        stop = starts[k + 1][1] if k + 1 < len(starts) else size
        if stop <= offset:
            raise ModelFileError(path, f"piece {name} is empty (it starts at byte {offset}, the next at {stop})")
        pieces.append(Piece(name, offset, stop - offset, layer, path.name))
    return pieces


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
    """`<file name>.pieces.json` beside the model (a folder's: beside the folder)."""
    p = model_root(model_path)
    return p.with_name(p.name + JOURNAL_SUFFIX)


def is_partial(model_path: str | os.PathLike) -> bool:
    """Whether a model file or folder is a partial copy (it has a journal beside it)."""
    try:
        return journal_path(model_path).is_file()
    except ValueError:  # "/": no name, no journal
        return False


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
        except (ModelFileError, UsageError, OSError, ValueError, TypeError, KeyError):
            continue
        if part.layout.fingerprint == fingerprint:
            return part
    return None


# --------------------------------------------------------------------------- partial copy


class PartialModel:
    """A sparse copy of a model file (or folder) and the journal of the pieces it holds (verified)."""

    def __init__(self, path: Path, layout: ModelPieces, held: dict[str, str], ident: tuple[int, int] | None = None):
        self.path = path
        self.layout = layout
        self._held = dict(held)  # piece name -> sha256
        self._lock = threading.RLock()
        self._fds: dict[str, int] = {}  # file within the model ("" for a GGUF file) -> fd for writing
        # the file (folder) this copy is: another daemon sharing the cache that starts it afresh puts a
        # new one at `path`; this one then stops journaling (its pieces are not in the new file)
        self._ident = ident if ident is not None else _identity(path)
        self.replaced = False
        self._verified: set[str] = set()  # pieces this process hashed (fetched or checked) since it opened the copy

    # ---- opening
    @classmethod
    def create(cls, cache_root: str | os.PathLike, layout: ModelPieces) -> PartialModel:
        """The copy of `layout`'s model under `cache_root/<fingerprint>/`: the one already there when
        its journal describes the same layout (a resumed fetch), else a new empty sparse file (for a
        folder: a folder of sparse files, one per file of the model, each of its full size)."""
        if not safe_fingerprint(layout.fingerprint):
            raise ModelFileError(cache_root, f"refusing model fingerprint {layout.fingerprint!r} as a folder name")
        if not safe_file_name(layout.file_name):
            raise ModelFileError(cache_root, f"refusing model file name {layout.file_name!r}")
        if layout.files and not all(hf_file_allowed(name) for name, _size in layout.files):
            raise ModelFileError(cache_root, "refusing a model folder with files of unexpected names")
        folder = Path(cache_root) / layout.fingerprint
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / layout.file_name
        with _journal_lock(path):  # another daemon on this cache may be creating or journaling it now
            _remove_leftovers(folder, layout.file_name)
            if layout.files:
                there = path.is_dir() and not path.is_symlink()
                same = there and all((path / name).is_file() and (path / name).stat().st_size == size
                                     for name, size in layout.files)
            else:
                same = path.is_file() and path.stat().st_size == layout.size
            ident = _identity(path) if same else None
            held = _read_journal(path, layout) if same else None
            if held is not None:
                return cls(path, layout, held, ident)
            # afresh: built under a new name, then renamed into place. Never truncated in place: another
            # daemon may map the file there (it keeps the bytes it maps; its journal writes stop, _write_journal)
            tmp = folder / f".{layout.file_name}.new-{os.getpid()}-{os.urandom(4).hex()}"
            try:
                if layout.files:  # a folder: nothing stale (an old shard) for the loader to find
                    tmp.mkdir()
                    for name, size in layout.files:
                        with open(tmp / name, "xb") as f:  # sparse: nothing is allocated until written
                            f.truncate(size)
                    old = None
                    if path.is_symlink() or path.exists():
                        old = folder / f".{layout.file_name}.old-{os.getpid()}-{os.urandom(4).hex()}"
                        os.rename(path, old)
                    os.rename(tmp, path)
                    if old is not None:
                        _remove_quietly(old)
                else:
                    with open(tmp, "xb") as f:
                        f.truncate(layout.size)
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    os.replace(tmp, path)
            except BaseException:
                _remove_quietly(tmp)
                raise
            part = cls(path, layout, {}, _identity(path))
            part._store_journal(dict(part._held))
        return part

    @classmethod
    def load(cls, path: str | os.PathLike) -> PartialModel:
        """An existing partial copy (check-model, a peer serving the pieces it fetched)."""
        path = model_root(path) if Path(path).is_dir() or Path(path).name == "config.json" else Path(path)
        jpath = journal_path(path)
        data = _load_json(jpath)
        held = data.get("pieces")
        described = isinstance(held, dict) and (HEADER in held or (path.is_dir() and "config.json" in held))
        if not described:
            raise ModelFileError(path, "partial model whose header has not been fetched yet")
        ident = _identity(path)  # before the journal: a copy replaced after this is noticed (_write_journal)
        layout = pieces_of(path)
        checked = _read_journal(path, layout)
        if checked is None:
            raise ModelFileError(jpath, "the journal does not describe this file (another model or layout)")
        lacking = [p.name for p in layout.header_pieces() if p.name not in checked]
        if lacking:
            raise ModelFileError(path, f"partial model whose header has not been fetched yet ({lacking[0]} is missing)")
        return cls(path, layout, checked, ident)

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
        """Layers all of whose tensors (`blk.i.`, `model.layers.i.`) are held."""
        by_layer: dict[int, bool] = {}
        for p in self.layout.pieces:
            if p.layer is not None:
                by_layer[p.layer] = by_layer.get(p.layer, True) and p.name in self._held
        return sorted(i for i, ok in by_layer.items() if ok)

    def holds_embedding(self) -> bool:
        """Whether the first stage's token embedding is here."""
        return self.holds(self.layout.embed_name())

    def holds_head(self) -> bool:
        """Whether the last stage's final norm and output head (the embedding when tied) are here."""
        return all(self.holds(n) for n in self.layout.head_names() if n in self.layout)

    def describe(self) -> str:
        """'layers [2, 4) of 6, without the embedding and output head', for people."""
        ranges = layer_ranges(self.held_layers())
        text = "layers " + ", ".join(f"[{a}, {b})" for a, b in ranges) if ranges else "no layers"
        extra = [("with" if self.holds_embedding() else "without") + " the embedding",
                 ("with" if self.holds_head() else "without") + " the output head"]
        return f"{text} of {self.layout.n_layers}, " + " and ".join(extra)

    # ---- writing (the fetcher)
    def write(self, offset: int, data: bytes, file: str = "") -> None:
        """Bytes at their offset in the file (`file`: which file of a folder), thread-safe: positioned writes."""
        size = self.layout.file_size(file)
        if offset < 0 or offset + len(data) > size:
            raise ValueError(f"write of {len(data)} bytes at {offset} outside {file or 'the file'} ({size} bytes)")
        fd = self._writer(file)
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n

    def mark_held(self, name: str, sha256: str) -> None:
        """Record a verified piece: its bytes made durable first, then the journal replaced atomically."""
        piece = self.layout.piece(name)
        if not _HEX64.fullmatch(sha256):
            raise ValueError(f"not a SHA-256: {sha256!r}")
        os.fsync(self._writer(piece.file))
        with self._lock:
            self._verified.add(name)
            self._write_journal(add={name: sha256})

    def forget(self, name: str) -> None:
        """No longer hold a piece (its bytes failed a check)."""
        with self._lock:
            self._verified.discard(name)
            if name in self._held:
                self._write_journal(drop={name})

    def verify(self, name: str) -> bool:
        """Whether a held piece's bytes still match its journaled hash (reads the piece)."""
        expected = self._held.get(name)
        if expected is None:
            return False
        piece = self.layout.piece(name)
        ok = sha256_of(self.layout.path_of(self.path, piece), piece) == expected
        if ok:
            self._verified.add(name)
        return ok

    def verify_range(self, start: int, end: int) -> list[str]:
        """Before a stage of [start, end) loads from this copy: hash every held piece it needs that this
        process has not hashed yet (a piece fetched here was hashed as it arrived); forget those whose
        bytes do not match the journal (a disk error, a hand edit) so they are fetched again. Their names."""
        bad = []
        for p in self.layout.needed(start, end):
            if p.name in self._held and p.name not in self._verified:
                try:
                    ok = self.verify(p.name)
                except (OSError, ModelFileError):
                    ok = False
                if not ok:
                    bad.append(p.name)
        for name in bad:
            self.forget(name)
        return bad

    def allocated(self, piece: Piece) -> int:
        """Bytes of the piece's range that already take disk (written, not journaled: an interrupted
        fetch), from the file's data extents (SEEK_DATA/SEEK_HOLE), never more than the blocks the file
        has beyond its held pieces (a file system without SEEK_DATA reports the whole file as data)."""
        path = self.layout.path_of(self.path, piece)
        end = piece.offset + piece.nbytes
        found, pos = 0, piece.offset
        fd = os.open(path, os.O_RDONLY)
        try:
            blocks = os.fstat(fd).st_blocks * 512
            while pos < end:
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:  # no data after pos
                        break
                    raise
                if data >= end:
                    break
                hole = os.lseek(fd, data, os.SEEK_HOLE)
                found += min(hole, end) - data
                pos = hole
        finally:
            os.close(fd)
        held = sum(p.nbytes for p in self.layout.pieces if p.file == piece.file and p.name in self._held)
        return max(0, min(found, blocks - held))

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _writer(self, file: str = "") -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                self.layout.file_size(file)  # a file of this model, or KeyError
                fd = self._fds[file] = os.open(self.path / file if file else self.path, os.O_RDWR)
            return fd

    def _write_journal(self, add: dict[str, str] | None = None, drop: set[str] = frozenset()) -> None:
        """Apply a change to the journal on disk, under the lock that daemons sharing the cache take
        (the pieces another daemon journaled since are kept, and adopted here: they are in this file).
        A copy another daemon replaced (started afresh) is not journaled any more."""
        with self._lock, _journal_lock(self.path):
            if self.was_replaced():
                self._held.update(add or {})
                for name in drop:
                    self._held.pop(name, None)
                return
            on_disk = _read_journal(self.path, self.layout)
            held = dict(self._held if on_disk is None else on_disk)  # no journal there (deleted): what this one knows
            held.update(add or {})
            for name in drop:
                held.pop(name, None)
            self._store_journal(held)
            self._held = held

    def was_replaced(self) -> bool:
        """Whether another process sharing the cache started the copy afresh (a new file or folder at
        `path`): this object's pieces are in the old one, which its open files and mappings keep."""
        if not self.replaced and _identity(self.path) != self._ident:
            self.replaced = True
            log.warning("%s was replaced by another process sharing the cache (it started the copy afresh): "
                        "this copy's pieces are no longer recorded; what maps or serves them keeps the old "
                        "file's bytes", self.path)
        return self.replaced

    def _store_journal(self, held: dict[str, str]) -> None:
        """Write the journal atomically (a temp file of its own, fsync, rename); the caller holds the lock."""
        lay = self.layout
        data = {"format": JOURNAL_FORMAT, "model": lay.name, "fingerprint": lay.fingerprint, "file": lay.file_name,
                "size": lay.size, "layout": lay.table_digest(), "pieces": dict(sorted(held.items()))}
        jpath = journal_path(self.path)
        tmp = jpath.with_name(f".{jpath.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
        try:
            with open(tmp, "x", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, jpath)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file or folder at `path`; None when nothing is there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


@contextlib.contextmanager
def _journal_lock(path: Path):
    """The lock beside the journal (`<name>.pieces.lock`, fcntl.flock, never removed): held while a copy
    is created or its journal rewritten, so daemons sharing a cache neither clobber each other's file
    nor lose each other's pieces. Threads of one process take it in turn too (one open per holder)."""
    root = model_root(path)
    fd = os.open(root.with_name(root.name + LOCK_SUFFIX), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove_leftovers(folder: Path, file_name: str) -> None:
    """The `.NAME.new-*` / `.NAME.old-*` copies and `.NAME.pieces.json.tmp-*` journals of a daemon
    killed while it wrote them: they are made and renamed only under the journal lock, so with the
    lock held any that exist are orphans."""
    name = glob.escape(file_name)
    for leftover in [*folder.glob(f".{name}.new-*"), *folder.glob(f".{name}.old-*"),
                     *folder.glob(f".{name}{JOURNAL_SUFFIX}.tmp-*")]:
        _remove_quietly(leftover)


def _remove_quietly(path: Path) -> None:
    """A file, link or folder gone (a folder with what it holds; never what a link points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


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


def layer_ranges(layers) -> list[tuple[int, int]]:
    """Sorted layer numbers as [start, end) runs: [0, 1, 2, 5] -> [(0, 3), (5, 6)]."""
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

    from .loader import _checked_plan, stored_slice
    from .spec import read_spec

    part = PartialModel.load(path)
    spec = read_spec(part.path)
    if layers is not None:
        start, end = layers
        if not 0 <= start < end <= spec.n_layers:
            raise UsageError(f"--layers {start}:{end} is not within the model's {spec.n_layers} layers")
        missing = part.missing(start, end)
        if missing:
            raise ModelFileError(path, f"layers [{start}, {end}) need tensor {missing[0].name}, which this partial "
                                       f"model does not hold ({len(missing)} pieces missing; it holds {part.describe()})")
        if part.layout.format == "hf":  # shapes against the metadata
            mf = open_model_file(part.path)
            try:
                _checked_plan(part.path, mf, spec, start, end)
            finally:
                mf.close()
        else:
            stored_slice(path, start, end, spec=spec)
    for name in sorted(part.held):
        if not part.verify(name):
            raise ModelFileError(path, f"piece {name}: its bytes do not match the SHA-256 in the journal "
                                       f"(fetch it again)")
    if decode:
        mf = open_model_file(part.path)
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
