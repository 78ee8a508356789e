"""The batch journal, FILE.json.jsonl: one JSON line per finished task, written and fsynced the
moment the task ends, so that Ctrl-C, a crash or a power cut loses at most the tasks in flight.
`--resume` reads it back and skips the tasks that succeeded; failed ones are tried again.

A batch holds an exclusive lock on its journal (flock) from before its checks until it ends, so a
second batch on the same journal is refused instead of running every task a second time.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

from ..errors import P2PError, UsageError

try:
    import fcntl
except ImportError:  # (not on Windows: no lock there)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


class JournalWriteError(P2PError):
    """The journal cannot take the next record (a full disk): the batch stops, what it holds is kept."""


def task_key(file: str, template_text: str) -> tuple[str, str]:
    """A task is a document and the template's text (a changed template is new work)."""
    return (file, template_text)


def journal_path(output: Path) -> Path:
    return output.with_name(output.name + ".jsonl")


def read_journal(path: Path) -> dict[tuple[str, str], dict]:
    """The last record of each task in the journal. A line that is not a task record is ignored
    with a warning: a torn last line (the process died while writing it, maybe inside a character)
    or a hand-edited one; that task simply runs again."""
    records: dict[tuple[str, str], dict] = {}
    if not path.exists():
        return records
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
                why = _not_a_record(record)
            except ValueError:  # UnicodeDecodeError included
                why = "cut short by a crash?"
            if why:
                log.warning("%s line %d is not a task record (%s); ignoring it", path, number, why)
                continue
            records[task_key(record["file"], record["prompt_template"])] = record
    return records


def _not_a_record(record) -> str | None:
    """Why a parsed line cannot be a task record, or None when it can."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for name in ("file", "prompt_template"):
        if not isinstance(record.get(name), str):
            return f"{name!r} is not a string"
    if not isinstance(record.get("success"), bool):
        return "'success' is not true or false"
    return None


class Journal:
    """Appends task records; each line is on disk before `append` returns. Opening it takes the
    journal's lock (UsageError when another batch holds it; OSError when it cannot be opened to
    write); a journal this batch created and never wrote to is removed again on `close`."""

    def __init__(self, path: Path):
        self.path = path
        self._written = False
        self._torn_checked = False
        for _ in range(10):
            self._created = not path.exists()
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            if self._lock():
                return
            os.close(self._fd)  # another batch removed the empty journal we opened: open the path again
        raise UsageError(f"cannot lock the journal {path}: another p2pllm batch keeps replacing it")

    def _lock(self) -> bool:
        """The journal's lock; False when the file we hold is no longer the one at the path."""
        if fcntl is None:
            return True
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(self._fd)
                raise UsageError(f"another p2pllm batch is writing {self.path}: wait for it to end (or stop it) "
                                 f"before running this one") from None
            log.debug("cannot lock %s (%s); going on without a lock", self.path, e)
            return True
        try:
            here, held = os.stat(self.path), os.fstat(self._fd)
        except FileNotFoundError:
            return False
        return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)

    def append(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False)
        try:
            data = (line + "\n").encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (a file name that is not UTF-8): \udcff keeps it exact
            data = (json.dumps(record) + "\n").encode("ascii")
        try:
            if not self._torn_checked:  # after a torn last line, start a new one rather than extend it
                self._torn_checked = True
                if _ends_mid_line(self.path):
                    data = b"\n" + data
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError as e:
            raise JournalWriteError(f"cannot write the journal {self.path}: {e.strerror or e} (the tasks it holds "
                                    f"are kept: make room and run the same command with --resume)") from None
        self._written = True

    @property
    def created(self) -> bool:
        """Whether this batch made the journal (there was no earlier one)."""
        return self._created

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            if self._created and not self._written and os.fstat(self._fd).st_size == 0:
                self.path.unlink(missing_ok=True)  # (still locked: no other batch has it open to write)
        except OSError:
            pass
        os.close(self._fd)  # (the lock goes with it)
        self._fd = -1


def _ends_mid_line(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False
