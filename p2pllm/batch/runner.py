"""Sending a batch's tasks to a gateway: at most --max-concurrent requests at once, transient
failures retried, documents too long for the context read in pieces, every finished task
journaled, and a progress line on stderr.

The semaphore guards HTTP requests, not tasks: the pieces of one long document and the templates
of one file go out side by side, so the ring's micro-batches fill even with few documents.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import TextIO

import httpx

from ..errors import P2PError
from ..gateway.chat_cli import base_url
from .documents import BYTES_PER_TOKEN, DocumentError, estimate_tokens, read_document, split_text
from .journal import Journal, task_key
from .prompts import Template

log = logging.getLogger(__name__)

MAX_RETRY_WAIT = 60.0  # seconds: a longer Retry-After is cut to this
NOTE_WAITS_FROM = 5.0  # seconds: a wait this long (or a capped Retry-After) before a retry is said on stderr
CHAT_OVERHEAD_TOKENS = 64  # the chat template's own tokens around a message (SmolLM2's: ~30)
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
MIN_BYTES_PER_TOKEN = 0.25  # below this a re-cut cannot help: the template alone is too long
_PROMPT_TOKENS = re.compile(r"prompt (?:has |\()(\d+)")  # the gateway's context_length_exceeded message


class RequestFailed(Exception):
    """One request that did not give an answer; `transient` ones are worth retrying."""

    def __init__(self, message: str, *, transient: bool = False, retry_after: float | None = None):
        super().__init__(message)
        self.transient = transient
        self.retry_after = retry_after


class TooLong(RequestFailed):
    """A 400 context_length_exceeded; `prompt_tokens` is the real count where the gateway said it."""

    def __init__(self, message: str, prompt_tokens: int | None):
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.rate = BYTES_PER_TOKEN  # set where the caller measured a better one


@dataclass
class Reading:
    """The answer to one template over one document (or one piece of it)."""

    response: str
    prompt_tokens: int
    completion_tokens: int
    chunks: int = 1
    combined: str | None = None  # "merged" (one more request) or "concatenated" (the parts, in order)
    bytes_per_token: float = BYTES_PER_TOKEN  # the rate the text was cut at (lower after a 400)


# --------------------------------------------------------------------------- the gateway


class GatewayClient:
    """The two calls a batch makes: what model and context, and one chat completion."""

    def __init__(self, host: str, api_key: str | None, timeout: float, connections: int,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.host = host
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=base_url(host), headers=headers, trust_env=False, transport=transport,
                                       timeout=httpx.Timeout(timeout, connect=10.0),
                                       limits=httpx.Limits(max_connections=connections + 2))
        self.model: str | None = None

    async def close(self) -> None:
        await self._http.aclose()

    async def model_info(self) -> tuple[str, int | None]:
        """The served model and its context (`max_model_len`); a gateway that is not there or
        refuses the key is the user's problem, said in one line."""
        try:
            reply = await self._http.get("/v1/models", timeout=30.0)
        except httpx.ConnectError as e:
            refused = "refused" in str(e).lower() or "111" in str(e)
            reason = "connection refused" if refused else str(e) or "cannot connect"
            raise P2PError(f"no gateway at {self.host} ({reason})") from None
        except httpx.HTTPError as e:
            raise P2PError(f"the gateway at {self.host} did not answer /v1/models ({type(e).__name__})") from None
        if reply.status_code == 401:
            raise P2PError(f"the gateway at {self.host} refused the API key (HTTP 401): pass --api-key or set "
                           f"P2PLLM_API_KEY")
        if reply.status_code != 200:
            raise P2PError(f"the gateway at {self.host} answered /v1/models with HTTP {reply.status_code}: "
                           f"{_error_message(reply)}")
        try:
            card = reply.json()["data"][0]
            self.model = str(card["id"])
            context = card.get("max_model_len")
        except (ValueError, KeyError, IndexError, TypeError):
            raise P2PError(f"{self.host} answered /v1/models with something that is not a model list") from None
        return self.model, int(context) if isinstance(context, int) and context > 0 else None

    async def chat(self, prompt: str, max_tokens: int, temperature: float) -> Reading:
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": temperature}
        if self.model:
            body["model"] = self.model
        try:
            reply = await self._http.post("/v1/chat/completions", json=body)
        except httpx.TimeoutException:
            raise RequestFailed(f"no answer within {self.timeout:g}s (--timeout)", transient=True) from None
        except httpx.TransportError as e:
            raise RequestFailed(f"connection to {self.host} failed ({type(e).__name__}: {e})", transient=True) from None
        if reply.status_code != 200:
            raise _failure(reply)
        try:
            data = reply.json()
            text = data["choices"][0]["message"]["content"] or ""
            if not isinstance(text, str):
                raise TypeError("content is not a string")
            usage = data.get("usage")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise RequestFailed(f"the gateway's answer is not a chat completion: {reply.text[:120]!r}") from None
        usage = usage if isinstance(usage, dict) else {}  # another server's own idea of usage counts as none
        return Reading(text, _token_count(usage.get("prompt_tokens")), _token_count(usage.get("completion_tokens")))


def _token_count(value) -> int:
    """A usage count; 0 (unknown) for anything that is not a number of tokens."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return 0
    return int(value)


def _failure(reply: httpx.Response) -> RequestFailed:
    message = f"{_error_message(reply)} (HTTP {reply.status_code})"
    code = None
    try:
        code = (reply.json().get("error") or {}).get("code")
    except (ValueError, AttributeError):
        pass
    if reply.status_code == 400 and code == "context_length_exceeded":
        found = _PROMPT_TOKENS.search(message)
        return TooLong(message, int(found.group(1)) if found else None)
    retry_after = None
    try:
        retry_after = float(reply.headers.get("retry-after", ""))
    except ValueError:  # (an HTTP date, or nothing)
        pass
    if retry_after is not None and not (math.isfinite(retry_after) and retry_after >= 0):
        retry_after = None
    return RequestFailed(message, transient=reply.status_code in TRANSIENT_STATUS, retry_after=retry_after)


def _error_message(reply: httpx.Response) -> str:
    try:
        error = reply.json().get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if error:
            return str(error)
    except (ValueError, AttributeError):
        pass
    return reply.text.strip()[:200] or reply.reason_phrase


# --------------------------------------------------------------------------- one task


@dataclass(frozen=True)
class Settings:
    context: int  # tokens: the model's, from /v1/models
    max_tokens: int  # per answer
    temperature: float = 0.0
    max_concurrent: int = 4
    retries: int = 2  # extra attempts after a transient failure
    chunk_tokens: int | None = None  # cap on a piece's tokens, below what the context allows
    max_retry_wait: float = MAX_RETRY_WAIT  # the longest Retry-After obeyed


def document_room(s: Settings, template: Template, filename: str, bytes_per_token: float = BYTES_PER_TOKEN) -> int:
    """Estimated tokens of document that fit beside the template, the chat template and the answer."""
    room = s.context - s.max_tokens - CHAT_OVERHEAD_TOKENS - estimate_tokens(template.render("", filename),
                                                                             bytes_per_token)
    return min(room, s.chunk_tokens) if s.chunk_tokens else room


class Reader:
    """Answers one template over one document, in pieces when it does not fit."""

    def __init__(self, client: GatewayClient, settings: Settings, note: Callable[[str], None] | None = None):
        self.client = client
        self.settings = settings
        self.note = note or (lambda line: None)  # one line for the user: a long wait before a retry
        self._slots = asyncio.Semaphore(settings.max_concurrent)

    def room(self, template: Template, filename: str, bytes_per_token: float = BYTES_PER_TOKEN) -> int:
        return document_room(self.settings, template, filename, bytes_per_token)

    async def read(self, text: str, filename: str, template: Template,
                   bytes_per_token: float = BYTES_PER_TOKEN) -> Reading:
        room = self.room(template, filename, bytes_per_token)
        if room < 1:
            raise RequestFailed(f"the template alone leaves no room for the document in the context of "
                                f"{self.settings.context} tokens with --max-tokens {self.settings.max_tokens}")
        pieces = split_text(text, room, bytes_per_token)
        if len(pieces) == 1:
            prompt = template.render(text, filename)
            try:
                reading = await self.ask(prompt)
            except TooLong as e:  # denser text than estimated: cut again at the measured rate
                rate = _measured_rate(prompt, e, bytes_per_token)
                if self.room(template, filename, rate) < 1:
                    raise TooLong(f"{e}; the template alone does not fit", e.prompt_tokens) from None
                return await self.read(text, filename, template, rate)
            reading.bytes_per_token = bytes_per_token
            return reading
        n = len(pieces)
        parts = await _all(self.read(piece, f"{filename} (part {i} of {n})", template, bytes_per_token)
                           for i, piece in enumerate(pieces, 1))
        return await self.combine(parts, filename, template, min(p.bytes_per_token for p in parts))

    async def combine(self, parts: list[Reading], filename: str, template: Template,
                      bytes_per_token: float = BYTES_PER_TOKEN) -> Reading:
        """One answer from the answers of the pieces: merged by the model in as few requests as fit,
        or, where even two answers do not fit together, the answers one after the other."""
        total = Reading("", sum(p.prompt_tokens for p in parts), sum(p.completion_tokens for p in parts),
                        sum(p.chunks for p in parts), bytes_per_token=bytes_per_token)
        answers = [p.response for p in parts]
        while len(answers) > 1:
            room = self.room(Template("combine", _combine_prompt(filename, template, ["{content}"])), filename,
                             total.bytes_per_token)
            groups = _pack(answers, room, total.bytes_per_token)
            if all(len(g) == 1 for g in groups):
                total.response = "\n\n".join(f"[part {i} of {len(answers)}]\n{a}" for i, a in enumerate(answers, 1))
                total.combined = "concatenated"
                return total
            try:
                merged = await _all(self._merge(filename, template, g, total.bytes_per_token) for g in groups)
            except TooLong as e:  # answers denser than estimated: pack again at the measured rate
                total.bytes_per_token = e.rate
                continue
            total.prompt_tokens += sum(m.prompt_tokens for m in merged)
            total.completion_tokens += sum(m.completion_tokens for m in merged)
            answers = [m.response for m in merged]
        total.response, total.combined = answers[0], "merged"
        return total

    async def _merge(self, filename: str, template: Template, answers: list[str], bytes_per_token: float) -> Reading:
        if len(answers) == 1:
            return Reading(answers[0], 0, 0)
        prompt = _combine_prompt(filename, template, answers)
        try:
            return await self.ask(prompt)
        except TooLong as e:
            try:
                e.rate = _measured_rate(prompt, e, bytes_per_token)  # always below bytes_per_token
            except TooLong:  # cutting cannot help: a plain failure, which ends the combining
                raise RequestFailed(str(e)) from None
            raise

    async def ask(self, prompt: str) -> Reading:
        """One request, retried after transient failures (timeouts, lost connections, 429, 5xx)."""
        s = self.settings
        for attempt in range(s.retries + 1):
            try:
                async with self._slots:
                    return await self.client.chat(prompt, s.max_tokens, s.temperature)
            except RequestFailed as e:
                if not e.transient or attempt == s.retries:
                    raise
                if e.retry_after is not None:  # obeyed up to a point: 28 hours of it would be no batch at all
                    delay = min(e.retry_after, s.max_retry_wait)
                else:
                    delay = min(30.0, 2.0 ** attempt)
                log.debug("request failed (%s); attempt %d of %d in %.1fs", e, attempt + 2, s.retries + 1, delay)
                capped = e.retry_after is not None and e.retry_after > delay
                if delay >= NOTE_WAITS_FROM or capped:
                    asked = f" (Retry-After {e.retry_after:g}s, capped at {s.max_retry_wait:g}s)" if capped else ""
                    self.note(f"p2pllm: {e}; trying again in {delay:g}s{asked}")
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")


async def _all(coros) -> list:
    """asyncio.gather, but the first failure cancels the rest (their answers would be thrown away)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # ended before the caller closes their client
        raise


def _measured_rate(prompt: str, e: TooLong, was: float) -> float:
    """Bytes per token of this prompt as the gateway counted them, with a margin; the original
    error when cutting again cannot help."""
    rate = len(prompt.encode("utf-8")) / e.prompt_tokens * 0.9 if e.prompt_tokens else was / 2
    if rate >= was or rate < MIN_BYTES_PER_TOKEN:
        raise e
    return rate


def _combine_prompt(filename: str, template: Template, answers: list[str]) -> str:
    parts = "\n\n".join(f"--- answer for part {i} ---\n{a}" for i, a in enumerate(answers, 1))
    return (f"Combine the answers below into one answer to this request about the whole document {filename}:\n\n"
            f"{template.render('[the document]', filename)}\n\nThe document was too long to read at once, so the "
            f"request was answered for each of its parts in turn:\n\n{parts}\n\n--- end of the answers ---")


def _pack(answers: list[str], room: int, bytes_per_token: float) -> list[list[str]]:
    """Consecutive answers in groups whose estimated tokens fit in `room`."""
    groups: list[list[str]] = [[]]
    size = 0
    for a in answers:
        n = estimate_tokens(a, bytes_per_token) + 8  # the part header
        if groups[-1] and size + n > room:
            groups.append([])
            size = 0
        groups[-1].append(a)
        size += n
    return groups


# --------------------------------------------------------------------------- the batch


@dataclass(frozen=True)
class Task:
    file: str  # relative to --input
    path: Path
    template: Template

    @property
    def key(self) -> tuple[str, str]:
        return task_key(self.file, self.template.text)


def task_record(task: Task, reading: Reading | None, error: str | None, seconds: float) -> dict:
    """One result as the output file and the journal carry it."""
    record = {"file": task.file, "prompt_template": task.template.text, "prompt_name": task.template.name,
              "success": reading is not None, "response": reading.response if reading else None, "error": error,
              "prompt_tokens": reading.prompt_tokens if reading else 0,
              "completion_tokens": reading.completion_tokens if reading else 0,
              "seconds": round(seconds, 3), "chunks": reading.chunks if reading else None}
    if reading and reading.chunks > 1:
        record["note"] = (f"longer than the context: read in {reading.chunks} pieces and the answers "
                          f"{'merged by the model' if reading.combined == 'merged' else 'concatenated in order'}")
    return record


class Progress:
    """`batch: 12/40 done, 1 failed | 35.2 tok/s | ETA 1m20s` on stderr: rewritten in place on a
    terminal, a line every few seconds (and at the end) in a log."""

    def __init__(self, total: int, already: int, stream: TextIO = sys.stderr, every: float = 5.0):
        self.total, self.done, self.failed = total, already, 0
        self.stream, self.every = stream, every
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self._this_run = 0
        self._tokens = 0
        self._last = 0.0
        self._shown = -1
        self._open = False  # a terminal's line is on screen, not yet ended
        self._notes: dict[str, float] = {}

    def finished(self, record: dict) -> None:
        self.done += 1
        self._this_run += 1
        self.failed += not record["success"]
        self._tokens += record["completion_tokens"]
        self.show()

    def show(self, final: bool = False) -> None:
        now = time.monotonic()
        if not (final or self.tty or now - self._last >= self.every or self.done == self.total):
            return
        if final and not self.tty and self._shown == self.done:  # the last line said it already
            return
        self._last, self._shown = now, self.done
        line = self.line(now)
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
            self._open = not final
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A line of its own above the progress line; the same note at most once every 30 s (the
        tasks in flight all meet the same busy gateway)."""
        now = time.monotonic()
        if now - self._notes.get(text, -1e9) < 30.0:
            return
        self._notes[text] = now
        if self.tty:
            self.stream.write("\r\033[K" + text + "\n")
            self._open = False
            self.stream.flush()
            if self._shown >= 0:
                self._last = 0.0
                self.show()
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def end(self) -> None:
        """Ends a terminal's progress line, so that what is printed next goes below it."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        failed = f", {self.failed} failed" if self.failed else ""
        rate = self._this_run / elapsed
        eta = _duration((self.total - self.done) / rate) if rate > 0 and self.done < self.total else (
            "-" if self.done < self.total else "0s")
        return (f"batch: {self.done}/{self.total} done{failed} | {self._tokens / elapsed:.1f} tok/s | "
                f"ETA {eta}")


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


async def run_tasks(reader: Reader, tasks: list[Task], journal: Journal,
                    on_finished: Callable[[dict], None]) -> list[dict]:
    """Every task, at most `max_concurrent` requests in flight; each record is journaled as its task
    ends. A document that cannot be read, or any error in one task, fails those tasks only; a journal
    that cannot be written ends the batch (JournalWriteError), its requests in flight cancelled."""
    by_file: dict[Path, list[Task]] = {}
    for task in tasks:
        by_file.setdefault(task.path, []).append(task)
    queue: asyncio.Queue[tuple[Path, list[Task]]] = asyncio.Queue()
    for item in by_file.items():
        queue.put_nowait(item)
    records: list[dict] = []

    def finish(record: dict) -> None:
        journal.append(record)
        records.append(record)
        on_finished(record)

    async def one(task: Task, text: str | None, unreadable: str | None) -> None:
        started = time.monotonic()
        reading, error = None, unreadable
        if text is not None:
            try:
                reading = await reader.read(text, task.file, task.template)
            except RequestFailed as e:
                error = str(e)
            except Exception as e:  # a bug or a surprise in one task is that task's failure, not the batch's
                log.debug("task %s failed", task.key, exc_info=True)
                error = f"{type(e).__name__}: {e}"
        finish(task_record(task, reading, error, time.monotonic() - started))

    async def worker() -> None:
        # a document is read once for all its templates; documents are read only as workers reach them
        while not queue.empty():
            path, file_tasks = queue.get_nowait()
            text, unreadable = None, None
            try:
                text = await asyncio.to_thread(read_document, path)
            except DocumentError as e:
                unreadable = str(e)
            except Exception as e:  # (a read that fails otherwise fails this document's tasks too)
                unreadable = f"cannot read {path.name}: {type(e).__name__}: {e}"
            await _all(one(t, text, unreadable) for t in file_tasks)

    # _all: a journal that cannot be written (a full disk) stops every worker, requests in flight included
    workers = min(len(by_file), max(1, reader.settings.max_concurrent))
    await _all(worker() for _ in range(workers))
    return records
