"""The batch journal, FILE.json.jsonl: one JSON line per finished task, written and fsynced the
moment the task ends, so that Ctrl-C, a crash or a power cut loses at most the tasks in flight.
`--resume` reads it back and skips the tasks that succeeded; failed ones are tried again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)


def task_key(file: str, template_text: str) -> tuple[str, str]:
    """A task is a document and the template's text (a changed template is new work)."""
    return (file, template_text)


def journal_path(output: Path) -> Path:
    return output.with_name(output.name + ".jsonl")


def read_journal(path: Path) -> dict[tuple[str, str], dict]:
    """The last record of each task in the journal. A torn last line (the process died while
    writing it) is ignored: that task simply runs again."""
    records: dict[tuple[str, str], dict] = {}
    if not path.exists():
        return records
    with path.open("r", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = task_key(record["file"], record["prompt_template"])
            except (ValueError, KeyError, TypeError):
                log.warning("%s line %d is not a task record (cut short by a crash?); ignoring it", path, number)
                continue
            records[key] = record
    return records


class Journal:
    """Appends task records; each line is on disk before `append` returns."""

    def __init__(self, path: Path):
        self.path = path
        torn = _ends_mid_line(path)
        self._file: IO[str] = path.open("a", encoding="utf-8")
        if torn:  # after a torn last line, start a new one rather than extend it
            self._file.write("\n")

    def append(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


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
