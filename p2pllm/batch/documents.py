"""The documents of a folder, read as text, and cut into pieces that fit in the model's context.

The gateway has no tokenize endpoint, so sizes are estimated from UTF-8 bytes at a rate that
overestimates tokens for prose, Markdown and code (BPE tokenizers average 3-4.5 bytes a token on
those). Digits or CJK text can be denser; there the gateway's 400 (which names the real count)
makes the runner cut again at the measured rate.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError

TEXT_SUFFIXES = (".txt", ".md")
BYTES_PER_TOKEN = 2.5  # conservative: more tokens than most text really has
PDFTOTEXT_TIMEOUT = 120.0


@dataclass
class Found:
    documents: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one line each, for stderr


class DocumentError(Exception):
    """A document that cannot be read as text: its task fails, the batch goes on."""


def find_documents(root: Path) -> Found:
    """Every .txt/.md file under `root` (and .pdf when pdftotext is installed), hidden ones aside,
    in a stable order so that task numbers and resumes agree between runs."""
    if not root.exists():
        raise UsageError(f"--input {root}: no such directory")
    if not root.is_dir():
        raise UsageError(f"--input {root}: not a directory")
    found = Found()
    pdfs = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        suffix = path.suffix.lower()
        if suffix not in TEXT_SUFFIXES and suffix != ".pdf":
            continue
        if not _is_utf8(str(rel)):  # its name could go in no JSON result (nor --resume find it again)
            found.skipped.append(f"{escaped_name(rel)}: the file name is not valid UTF-8 (rename it to read it)")
        elif suffix == ".pdf":
            pdfs.append(path)
        elif path.stat().st_size == 0:
            found.skipped.append(f"{rel}: empty")
        elif _blank(path):
            found.skipped.append(f"{rel}: empty (only whitespace)")
        else:
            found.documents.append(path)
    if pdfs and shutil.which("pdftotext") is None:
        found.skipped.append(f"{len(pdfs)} .pdf file{'s' if len(pdfs) != 1 else ''}: pdftotext is not installed "
                             f"(poppler-utils)")
    else:
        found.documents += pdfs
    found.documents.sort()
    return found


def escaped_name(path: Path | str) -> str:
    """A file name as printable text: the bytes that are not UTF-8 as \\xNN."""
    return os.fsencode(str(path)).decode("utf-8", errors="backslashreplace")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")  # a name that is not UTF-8 on disk comes back with lone surrogates
    except UnicodeEncodeError:
        return False
    return True


def _blank(path: Path) -> bool:
    """Whether the file holds nothing but whitespace (read until its first other byte)."""
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 16):
                if chunk.strip():
                    return False
    except OSError:  # unreadable: its tasks fail with the reason when it is read
        return False
    return True


def read_document(path: Path) -> str:
    """The text of a document; invalid UTF-8 is replaced rather than refused (a stray byte in a
    scraped file should not cost its answers)."""
    try:
        if path.suffix.lower() == ".pdf":
            return _pdf_text(path)
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise DocumentError(f"cannot read {path.name}: {e.strerror or e}") from None


def _pdf_text(path: Path) -> str:
    try:
        done = subprocess.run(["pdftotext", "-layout", "-enc", "UTF-8", str(path), "-"], capture_output=True,
                              timeout=PDFTOTEXT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise DocumentError(f"pdftotext took more than {PDFTOTEXT_TIMEOUT:.0f}s on {path.name}") from None
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip().splitlines()
        raise DocumentError(f"pdftotext could not read {path.name}: {why[-1] if why else f'exit {done.returncode}'}")
    text = done.stdout.decode("utf-8", errors="replace")
    if not text.strip():
        raise DocumentError(f"{path.name} has no text layer (a scanned PDF?)")
    return text


def estimate_tokens(text: str, bytes_per_token: float = BYTES_PER_TOKEN) -> int:
    return math.ceil(len(text.encode("utf-8")) / bytes_per_token)


# where to cut, best first: between paragraphs, lines, sentences, words
_SEPARATORS = ("\n\n", "\n", ". ", " ")


def split_text(text: str, max_tokens: int, bytes_per_token: float = BYTES_PER_TOKEN) -> list[str]:
    """`text` in pieces of at most `max_tokens` (estimated), cut at the coarsest boundary that
    makes them fit; the pieces joined again are `text`."""
    if max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    limit = max(1, int(max_tokens * bytes_per_token))  # in UTF-8 bytes
    return _split(text, limit, 0)


def _split(text: str, limit: int, level: int) -> list[str]:
    if _size(text) <= limit:
        return [text]
    if level == len(_SEPARATORS):
        return _hard_cut(text, limit)
    sep = _SEPARATORS[level]
    parts = text.split(sep)
    units = [p + sep for p in parts[:-1]] + [parts[-1]]  # the separator stays with the piece before it
    pieces, current = [], ""
    for unit in units:
        if _size(current) + _size(unit) <= limit:
            current += unit
            continue
        if current:
            pieces.append(current)
        if _size(unit) <= limit:
            current = unit
        else:  # one paragraph longer than a piece: cut it at a finer boundary
            pieces += _split(unit, limit, level + 1)
            current = ""
    if current:
        pieces.append(current)
    return [p for p in pieces if p]


def _hard_cut(text: str, limit: int) -> list[str]:
    """No boundary at all (a very long word): cut by bytes, never inside a character."""
    pieces, current, size = [], [], 0
    for ch in text:
        n = _size(ch)
        if size + n > limit and current:
            pieces.append("".join(current))
            current, size = [], 0
        current.append(ch)
        size += n
    if current:
        pieces.append("".join(current))
    return pieces


def _size(text: str) -> int:
    return len(text.encode("utf-8"))
