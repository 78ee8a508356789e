"""Request history: one row per completion this gateway answered, in SQLite under the state dir.

The gateway that took a request writes its row when the request ends, however it ends (an answer,
an error, a client that left): `app.py`'s middleware holds a `RequestRecord` for each completion,
the parts that serve it note what they learn (the checked request, the target, the Job that
generated it or a backend's answer), and the record becomes a row just before the answer's last
byte goes out (so a client that has its answer finds it in the history) or when the request
ends without one. The database is in WAL mode with synchronous=NORMAL: a committed row survives
a SIGKILL of the process (not a power loss); a kill loses only the requests in flight.

Modes: "meta" keeps counts, timings and a SHA-256 of the prompt; "full" also the prompt and the
answer's text; "off" keeps nothing (the gateway has no RequestHistory). Bounded by rows and by
the bytes of stored text, oldest dropped first.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..errors import UsageError
from .responses import JSON
from .schema import ApiError, CompletionRequest, short

log = logging.getLogger(__name__)

MODES = ("off", "meta", "full")
DEFAULT_ROWS = 10_000
DEFAULT_TEXT_BYTES = 256 * 1024 * 1024  # --history full: prompts and answers kept at most (oldest rows dropped)
DEFAULT_PAGE, MAX_PAGE = 20, 1000
FILE_NAME = "history.sqlite3"
COMPLETION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/api/chat", "/api/generate"})
STATE_KEY = "history"  # a request's RequestRecord in its ASGI scope["state"]
CLIENT_GONE = "the client disconnected before the answer ended"

# each entry brings a database of user_version i to i + 1; a database newer than the last is refused
_MIGRATIONS = [
    ["""CREATE TABLE requests (
        seq INTEGER PRIMARY KEY,  -- insertion order: newest has the largest
        id TEXT NOT NULL, request_id TEXT NOT NULL, created INTEGER NOT NULL, model TEXT NOT NULL,
        endpoint TEXT NOT NULL, backend TEXT, stream INTEGER NOT NULL, status INTEGER NOT NULL,
        prompt_tokens INTEGER, completion_tokens INTEGER, cached_tokens INTEGER,
        ttft_ms REAL, tokens_per_s REAL, duration_ms REAL, finish_reason TEXT, error TEXT, epoch INTEGER,
        prompt_sha256 TEXT, prompt TEXT, completion TEXT, text_bytes INTEGER NOT NULL DEFAULT 0)""",
     "CREATE INDEX requests_id ON requests(id)"],
]
_COLUMNS = ("id", "request_id", "created", "model", "endpoint", "backend", "stream", "status", "prompt_tokens",
            "completion_tokens", "cached_tokens", "ttft_ms", "tokens_per_s", "duration_ms", "finish_reason", "error",
            "epoch", "prompt_sha256", "prompt", "completion", "text_bytes")
_SHOWN = _COLUMNS[:-1]  # text_bytes is bookkeeping


def default_state_dir(cluster: str) -> Path:
    """`$XDG_STATE_HOME/p2pllm/CLUSTER` (default `~/.local/state/p2pllm/CLUSTER`); odd names are hashed."""
    from ..transport.security import secret_path

    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    stem = secret_path(cluster).name.removeprefix("secret-")  # the same safe file name the secret gets
    return base / "p2pllm" / stem


class UnknownId(LookupError):
    """`after` names no row of the history."""


class RequestHistory:
    """The rows of one gateway's finished requests. Writes are inline (one small INSERT, no fsync in
    WAL mode); reads for /v1/history run in a thread on their own connection."""

    def __init__(self, path: Path, *, mode: str = "meta", max_rows: int = DEFAULT_ROWS,
                 max_text_bytes: int = DEFAULT_TEXT_BYTES):
        if mode not in ("meta", "full"):
            raise ValueError(f"history mode must be meta or full, got {mode!r}")
        self.path, self.mode = Path(path), mode
        self.max_rows, self.max_text_bytes = max_rows, max_text_bytes
        self._lock = threading.Lock()  # writes come from the event loop, which need not be the opener's thread
        self._read_lock = threading.Lock()
        self._warned = self._failed = False  # a write that failed has been logged (sqlite's error, a bug)
        self._db = self._reader = None
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.path.touch(mode=0o600)  # prompts may be in it: only this user reads it (its -wal/-shm follow)
            self._db = _connect(self.path)
            _use_wal(self._db)
            self._migrate()
            problem = self._db.execute("PRAGMA quick_check").fetchone()[0]
            if problem != "ok":
                raise sqlite3.DatabaseError(problem)
            with _transaction(self._db):
                forgotten = 0
                if mode == "meta":  # meta keeps no text: forget what an earlier --history full stored
                    forgotten = self._db.execute("UPDATE requests SET prompt = NULL, completion = NULL, "
                                                 "text_bytes = 0 WHERE text_bytes > 0").rowcount
                self.text_bytes = self._db.execute("SELECT COALESCE(SUM(text_bytes), 0) FROM requests").fetchone()[0]
                self._trim()  # --history-rows may have shrunk since the last run
                _unique_ids(self._db)  # an earlier p2pllm stored a repeated id (a retried x-request-id) as it was
            if forgotten:  # and from the log too (secure_delete has zeroed the freed pages)
                self._checkpoint()
            self._reader = _connect(self.path)
        except (OSError, sqlite3.Error) as e:
            self.close()
            raise UsageError(f"cannot keep the request history in {self.path}: {_reason(e)} (pass another "
                             f"--state-dir, or --history off)") from None

    @classmethod
    def open(cls, state_dir: str | Path, mode: str = "meta", max_rows: int = DEFAULT_ROWS,
             port: int | None = None) -> RequestHistory | None:
        """The history under `state_dir`; None for mode "off". `port`: the peer's gRPC port names
        the file (history-PORT.sqlite3), so peers sharing a state dir on one machine (`p2pllm demo`)
        each keep their own gateway's requests; a port is one daemon's at a time."""
        if mode == "off":
            return None
        name = f"history-{port}.sqlite3" if port else FILE_NAME
        return cls(Path(state_dir).expanduser() / name, mode=mode, max_rows=max_rows)

    def _migrate(self) -> None:
        with _transaction(self._db):  # write-locked: peers started together on one state dir migrate once
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(_MIGRATIONS):
                raise sqlite3.DatabaseError(f"it was made by a newer p2pllm (schema {version}, this one knows "
                                            f"{len(_MIGRATIONS)})")
            for statements in _MIGRATIONS[version:]:
                for statement in statements:
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {len(_MIGRATIONS)}")

    def _checkpoint(self) -> None:
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as e:  # another process on this state dir is busy with it: its text goes later
            log.info("request history: the log of %s is not truncated yet (%s)", self.path, _reason(e))

    def close(self) -> None:
        for con in (self._db, self._reader):
            if con is not None:
                con.close()
        self._db = self._reader = None

    # ------------------------------------------------------------------ writing
    def add(self, row: dict) -> None:
        """Store one finished request's row (from `RequestRecord.end`); a failure is logged, never raised:
        the request it describes is already answered. Text that UTF-8 cannot carry (a lone surrogate a
        client sent as a JSON escape) is stored: escaped in the prompt's JSON, U+FFFD elsewhere. An id
        another row has gets `~2`, `~3`, ... appended, so that `after` names one row."""
        if self._db is None:  # closed at shutdown
            return
        try:
            row = _storable(row, full=self.mode == "full")
            with self._lock, _transaction(self._db):
                row["id"] = _free_id(self._db, row["id"])
                seq = self._db.execute(f"INSERT INTO requests ({', '.join(_COLUMNS)}) VALUES "
                                       f"({', '.join('?' * len(_COLUMNS))})", [row[c] for c in _COLUMNS]).lastrowid
                self.text_bytes += row["text_bytes"]
                self._trim(seq)
        except sqlite3.Error as e:
            self._recount()
            if not self._warned:
                log.warning("request history: cannot write to %s: %s (requests go unrecorded)", self.path, _reason(e))
                self._warned = True
        except Exception:  # a bug: the answer has gone out all the same
            self._recount()
            if not self._failed:
                log.exception("request history: a request's row could not be recorded in %s (such rows go "
                              "unrecorded)", self.path)
                self._failed = True

    def _recount(self) -> None:
        """The stored text's size again, after a write that failed half-way."""
        try:
            self.text_bytes = self._db.execute("SELECT COALESCE(SUM(text_bytes), 0) FROM requests").fetchone()[0]
        except sqlite3.Error:
            pass

    def _trim(self, newest: int | None = None) -> None:
        """Drop the oldest rows beyond max_rows, then while the stored text is over max_text_bytes."""
        if newest is None:
            newest = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM requests").fetchone()[0]
        self._drop_through(newest - self.max_rows)
        while self.text_bytes > self.max_text_bytes:
            oldest = self._db.execute("SELECT seq, text_bytes FROM requests ORDER BY seq LIMIT 256").fetchall()
            if not oldest:
                break
            excess, cut = self.text_bytes - self.max_text_bytes, oldest[-1][0]
            for seq, size in oldest:
                excess -= size
                if excess <= 0:
                    cut = seq
                    break
            self._drop_through(cut)

    def _drop_through(self, seq: int) -> None:
        freed = self._db.execute("SELECT COUNT(*), COALESCE(SUM(text_bytes), 0) FROM requests WHERE seq <= ?",
                                 (seq,)).fetchone()
        if freed[0]:
            self._db.execute("DELETE FROM requests WHERE seq <= ?", (seq,))
            self.text_bytes -= freed[1]

    # ------------------------------------------------------------------ reading
    def page(self, limit: int = DEFAULT_PAGE, after: str | None = None) -> dict:
        """Rows newest first, at most `limit`, older than the row `after` names (UnknownId if none does).
        Ids are unique (`add`), so paging with each page's last_id visits every row once."""
        with self._read_lock:
            con = self._reader
            below = None
            if after is not None:
                found = con.execute("SELECT seq FROM requests WHERE id = ? ORDER BY seq DESC LIMIT 1",
                                    (after,)).fetchone()
                if found is None:
                    raise UnknownId(after)
                below = found[0]
            rows = con.execute(f"SELECT {', '.join(_SHOWN)} FROM requests "
                               f"{'WHERE seq < ?' if below is not None else ''} ORDER BY seq DESC LIMIT ?",
                               ((below,) if below is not None else ()) + (limit + 1,)).fetchall()
        data = [_shown(row) for row in rows[:limit]]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}

    def count(self) -> int:
        with self._read_lock:
            return self._reader.execute("SELECT COUNT(*) FROM requests").fetchone()[0]


@contextlib.contextmanager
def _transaction(con: sqlite3.Connection) -> Iterator[None]:
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def _use_wal(con: sqlite3.Connection, wait: float = 5.0) -> None:
    """WAL mode, waiting for peers that open the same file at the same moment (switching the mode is
    refused at once while another connection holds the file, whatever the busy timeout)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            break
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    if mode.lower() != "wal":
        raise sqlite3.DatabaseError("its file system does not support SQLite's WAL mode")


def _connect(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(path, timeout=5, check_same_thread=False, isolation_level=None)
    con.execute("PRAGMA synchronous=NORMAL")  # in WAL mode: durable against a process kill, no fsync per row
    con.execute("PRAGMA secure_delete=ON")  # dropped rows' text is overwritten, not left in free pages
    return con


def _reason(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower() + (f": {e.filename}" if e.filename else "")
    text = str(e) or type(e).__name__
    return text[0].lower() + text[1:] if text else text


_SURROGATE = re.compile("[\ud800-\udfff]")


def _storable(row: dict, *, full: bool) -> dict:
    """A copy of `row` that SQLite takes (its text in UTF-8), with the bytes of its text counted. A
    string with surrogates (only a JSON escape makes them: a lone one, or a pair split between two
    chunks of a stream) has each pair joined and each lone one replaced by U+FFFD, except in the
    prompt, which is JSON: there each becomes its escape again, so the prompt reads back as sent."""
    row = {**row} if full else {**row, "prompt": None, "completion": None}
    for key, value in row.items():
        if isinstance(value, str) and _SURROGATE.search(value):
            row[key] = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", value) if key == "prompt" \
                else value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    row["text_bytes"] = len((row["prompt"] or "").encode()) + len((row["completion"] or "").encode())
    return row


def _free_id(con: sqlite3.Connection, rid: str) -> str:
    """`rid`, or where a row has it already `rid~N` with N past every such suffix in use (`~` is in no
    x-request-id the gateway takes, so no client's id looks like it). In the writer's transaction."""
    if con.execute("SELECT 1 FROM requests WHERE id = ?", (rid,)).fetchone() is None:
        return rid
    at = len(rid) + 2  # where the digits start (SQLite counts characters from 1)
    n = con.execute("SELECT MAX(CAST(substr(id, ?) AS INTEGER)) FROM requests WHERE id > ? AND id < ? "
                    "AND substr(id, ?) NOT GLOB '*[^0-9]*'", (at, rid + "~", rid + "\x7f", at)).fetchone()[0]
    n = max(n or 0, 1) + 1
    while con.execute("SELECT 1 FROM requests WHERE id = ?", (f"{rid}~{n}",)).fetchone() is not None:
        n += 1
    return f"{rid}~{n}"


def _unique_ids(con: sqlite3.Connection) -> None:
    """Give each row whose id an older row has an id of its own, as `add` now does."""
    for (rid,) in con.execute("SELECT id FROM requests GROUP BY id HAVING COUNT(*) > 1").fetchall():
        for (seq,) in con.execute("SELECT seq FROM requests WHERE id = ? ORDER BY seq", (rid,)).fetchall()[1:]:
            con.execute("UPDATE requests SET id = ? WHERE seq = ?", (_free_id(con, rid), seq))


def _shown(row: tuple) -> dict:
    out = dict(zip(_SHOWN, row))
    out["stream"] = bool(out["stream"])
    if out["prompt"] is not None:
        out["prompt"] = json.loads(out["prompt"])
    return out


# --------------------------------------------------------------------------- one request's record


@dataclass
class RequestRecord:
    """What one completion's row will say, filled in as the request goes. Only a request whose body
    was checked (`begin`) gets a row; `end` gives it once."""

    request_id: str
    endpoint: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))
    arrived: float = field(default_factory=time.perf_counter)
    begun: bool = False
    ended: bool = False
    stream: bool = False
    prompt: Any = None  # the checked messages or prompt
    backend: str = "ring"  # who served it: "ring", an external backend's id, or "cache"
    job: Any = None  # the generation.Job of the ring (or a cache replay): counts and timings are read from it
    id: str | None = None  # the answer's id, where a backend said it
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finish_reason: str | None = None
    completion: str = ""
    error: str | None = None

    def begin(self, req: CompletionRequest) -> None:
        self.begun, self.stream = True, req.stream
        self.prompt = req.messages if req.messages is not None else req.prompt

    def attempt(self, backend: str) -> None:
        """A target takes the request (again, after another failed before its first token): what the
        one before learned is dropped."""
        self.backend, self.job, self.id = backend, None, None
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = None
        self.first_token_at = self.last_token_at = self.finish_reason = self.error = None
        self.completion = ""

    def fail(self, message: str) -> None:
        self.error = self.error or message

    def note_answer(self, chunk: dict, *, streamed: bool = True) -> None:
        """An external backend's whole answer (`streamed` False: no token timings) or one of its stream's
        chunks, in OpenAI's shapes."""
        if isinstance(chunk.get("id"), str) and self.id is None:
            self.id = chunk["id"]
        error = chunk.get("error")
        if error:
            self.fail(str(error.get("message") if isinstance(error, dict) else error))
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = _count(usage.get("prompt_tokens"), self.prompt_tokens)
            self.completion_tokens = _count(usage.get("completion_tokens"), self.completion_tokens)
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict):
                self.cached_tokens = _count(details.get("cached_tokens"), self.cached_tokens)
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            parts = [choice.get("text"), *(choice.get(k, {}).get("content") for k in ("delta", "message")
                                           if isinstance(choice.get(k), dict))]
            text = "".join(p for p in parts if isinstance(p, str))
            if text:
                self.completion += text
                if streamed:
                    now = time.perf_counter()
                    self.first_token_at = self.first_token_at or now
                    self.last_token_at = now
            if isinstance(choice.get("finish_reason"), str):
                self.finish_reason = choice["finish_reason"]

    def end(self, status: int, epoch: int | None, *, cut: bool = False) -> dict | None:
        """The row, once (None after the first call, or for a request never begun). `cut`: the answer
        started but its end was never sent."""
        if not self.begun or self.ended:
            return None
        self.ended = True
        job = self.job
        if job is not None:
            self.id = job.answer.cid
            self.prompt_tokens, self.completion_tokens = job.n_prompt, job.n_tokens
            self.cached_tokens = job.cached_tokens
            self.first_token_at, self.last_token_at = job.first_token_at, job.last_token_at
            self.finish_reason = job.choices[0].finish_reason
            self.completion = job.text
            if job.error:
                self.fail(job.error)
            if job.outcome == "client gone":
                self.fail(CLIENT_GONE)
        if status == 499 or cut:
            self.fail(CLIENT_GONE)
        now = time.perf_counter()
        first, last, n = self.first_token_at, self.last_token_at, self.completion_tokens
        rate = (n - 1) / (last - first) if first is not None and last is not None and n and n > 1 and last > first \
            and self.backend != "cache" else None  # a cache replay generates nothing: it has no decode rate
        prompt = None if self.prompt is None else json.dumps(self.prompt, ensure_ascii=False, separators=(",", ":"))
        return {
            "id": self.id or self.request_id, "request_id": self.request_id, "created": self.created,
            "model": self.model, "endpoint": self.endpoint, "backend": self.backend, "stream": int(self.stream),
            "status": status, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "ttft_ms": None if first is None else round((first - self.arrived) * 1000, 1),
            "tokens_per_s": None if rate is None else round(rate, 2),
            "duration_ms": round((now - self.arrived) * 1000, 1), "finish_reason": self.finish_reason,
            "error": self.error, "epoch": epoch,
            "prompt_sha256": None if prompt is None else hashlib.sha256(prompt.encode("utf-8", "replace")).hexdigest(),
            # the first choice's, when n > 1; an answer that finished empty is "", not null (no answer)
            "prompt": prompt,
            "completion": self.completion if self.completion or (self.finish_reason and not self.error) else None,
        }


def _count(value: Any, default: int | None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def record_of(request: Request) -> RequestRecord | None:
    """The request's record; None when the gateway keeps no history (or it is not a completion)."""
    return request.scope.get("state", {}).get(STATE_KEY)


def epoch_of(engine: Any) -> int | None:
    try:
        return int(engine.stats().epoch)
    except Exception:  # between plans
        return None


# --------------------------------------------------------------------------- GET /v1/history


def history_route(gateway: Any) -> Route:
    """GET /v1/history?limit=&after=: the gateway's request history, newest first."""

    async def history(request: Request) -> Response:
        store: RequestHistory | None = gateway.history
        if store is None:
            raise ApiError(404, "Request history is off on this gateway (p2pllm join --history off); start it with "
                                "--history meta or --history full to keep one.", code="history_off")
        limit = _limit(request.query_params.get("limit"))
        after = request.query_params.get("after") or None
        try:
            page = await asyncio.to_thread(store.page, limit, after)
        except UnknownId:
            raise ApiError(400, f"'after' names no request in the history: {short(after)!r} (pass the last_id of a "
                                f"previous page).", param="after", code="invalid_value") from None
        return JSON(page)

    return Route("/v1/history", history, methods=["GET"])


def _limit(text: str | None) -> int:
    if text is None or text == "":
        return DEFAULT_PAGE
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_PAGE:
        raise ApiError(400, f"'limit' must be a whole number from 1 to {MAX_PAGE}, got {short(text)!r}.",
                       param="limit", code="invalid_value")
    return value
