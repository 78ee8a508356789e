"""`p2pllm batch`: a folder of documents x prompt templates through a real 2-peer cluster, journaled
and resumable; plus fast checks of the pieces (chunking, templates, journal, retries) alone."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import REPO, assert_one_line_error, run_cli
from p2pllm.batch.documents import estimate_tokens, find_documents, read_document, split_text
from p2pllm.batch.journal import Journal, read_journal
from p2pllm.batch.prompts import PRESETS, Template, templates
from p2pllm.batch.runner import GatewayClient, Progress, Reader, Settings, Task, run_tasks
from p2pllm.errors import UsageError

OUTPUT_FIELDS = {"timestamp", "files_processed", "total_tasks", "successful", "failed", "success_rate",
                 "total_time_seconds", "tasks_per_second", "results"}
RESULT_FIELDS = {"file", "prompt_template", "success", "response", "error", "prompt_tokens", "completion_tokens",
                 "seconds"}
# digits are one token each for SmolLM2's tokenizer, 2.5 times the batch's estimate: a template the
# gateway itself refuses (400 context_length_exceeded) while the batch's estimate lets it through
DENSE_TEMPLATE = "0123456789" * 1800 + "\n{content}"


def write_docs(folder: Path, n: int, prefix: str = "doc") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"{prefix}{i}.txt").write_text(f"Note {i}: the meeting about item {i} moved to room {i + 100}.\n")
    return folder


def batch(cluster, folder: Path, output: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_cli("batch", "--input", folder, "--output", output, "--host", cluster.url, "--max-tokens", "8",
                   *extra, timeout=timeout)


def journal_lines(output: Path) -> list[dict]:
    return [json.loads(line) for line in Path(str(output) + ".jsonl").read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- against a real cluster


def test_a_folder_becomes_a_result_file_with_every_field_and_a_journal_line_per_task(smol_cluster, tmp_path):
    docs = write_docs(tmp_path / "docs", 2)
    (docs / "readme.md").write_text("# Kettles\n\nA kettle boils water for tea.\n")
    (docs / "ignored.csv").write_text("a,b\n")
    out = tmp_path / "out.json"
    proc = batch(smol_cluster, docs, out, "--prompt", "Summarize {filename}: {content}",
                 "--prompt", "In one word, what is {filename} about? {content}", "--max-concurrent", "4")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert OUTPUT_FIELDS <= set(result)
    assert (result["files_processed"], result["total_tasks"], result["successful"], result["failed"]) == (3, 6, 6, 0)
    assert result["success_rate"] == 1.0 and result["total_time_seconds"] > 0 and result["tasks_per_second"] > 0
    assert {r["file"] for r in result["results"]} == {"doc0.txt", "doc1.txt", "readme.md"}
    for r in result["results"]:
        assert RESULT_FIELDS <= set(r), r
        assert r["success"] and r["error"] is None and r["response"], r
        assert r["prompt_tokens"] > 0 and 0 < r["completion_tokens"] <= 8 and r["seconds"] > 0 and r["chunks"] == 1
    assert sorted((r["file"], r["prompt_template"]) for r in journal_lines(out)) == sorted(
        (r["file"], r["prompt_template"]) for r in result["results"])
    progress = [line for line in proc.stderr.splitlines() if line.startswith("batch: ")]
    assert progress and progress[-1].startswith("batch: 6/6 done |"), proc.stderr
    assert "tok/s" in progress[-1] and "ETA" in progress[-1]


def test_a_task_the_gateway_rejects_is_recorded_failed_and_the_rest_of_the_batch_goes_on(smol_cluster, tmp_path):
    docs = write_docs(tmp_path / "docs", 2)
    out = tmp_path / "out.json"
    proc = batch(smol_cluster, docs, out, "--prompt", "Repeat: {content}", "--prompt", DENSE_TEMPLATE,
                 "--max-concurrent", "4")
    assert proc.returncode == 1, proc.stderr  # some tasks failed; the result file is written all the same
    assert "Traceback" not in proc.stderr and "2 failed" in proc.stderr
    result = json.loads(out.read_text())
    assert (result["total_tasks"], result["successful"], result["failed"], result["success_rate"]) == (4, 2, 2, 0.5)
    for r in result["results"]:
        if r["prompt_template"] == DENSE_TEMPLATE:
            assert not r["success"] and r["response"] is None
            assert "maximum context length is 8192 tokens" in r["error"] and "HTTP 400" in r["error"], r["error"]
        else:
            assert r["success"] and r["response"], r
    # --resume tries the failed tasks again and leaves the successful ones alone
    again = batch(smol_cluster, docs, out, "--prompt", "Repeat: {content}", "--prompt", DENSE_TEMPLATE, "--resume")
    assert again.returncode == 1, again.stderr
    lines = journal_lines(out)
    assert len(lines) == 6 and sum(1 for r in lines if r["success"]) == 2
    assert json.loads(out.read_text())["resumed_tasks"] == 2


def test_a_document_longer_than_a_piece_is_read_in_pieces_and_the_answers_combined(smol_cluster, tmp_path):
    """--chunk-tokens stands in for a small context (a prefill of SmolLM2's whole 8,192 tokens takes
    minutes on a test machine's CPU); the pieces come from the same code that cuts at the context."""
    docs = tmp_path / "docs"
    docs.mkdir()
    paragraphs = [f"Section {i}. The village council discussed repairs to bridge {i}, and agreed to spend "
                  f"{i * 10} coins on stone and rope before the spring floods." for i in range(8)]
    (docs / "minutes.txt").write_text("\n\n".join(paragraphs) + "\n")
    (docs / "short.txt").write_text("Bridges need stone.\n")
    out = tmp_path / "out.json"
    proc = batch(smol_cluster, docs, out, "--prompt", "Summarize {filename}: {content}", "--chunk-tokens", "120",
                 "--max-concurrent", "8")
    assert proc.returncode == 0, proc.stderr
    by_file = {r["file"]: r for r in json.loads(out.read_text())["results"]}
    long, short = by_file["minutes.txt"], by_file["short.txt"]
    assert long["success"] and long["response"]
    assert long["chunks"] >= 3 and "read in" in long["note"] and "pieces" in long["note"], long
    # the pieces' prompts and the combining request are all counted
    assert long["prompt_tokens"] > estimate_tokens((docs / "minutes.txt").read_text()) / 3
    assert short["chunks"] == 1 and "note" not in short


def test_ctrl_c_mid_batch_loses_no_finished_task_and_resume_skips_them(smol_cluster, tmp_path):
    docs = write_docs(tmp_path / "docs", 6)
    out = tmp_path / "out.json"
    argv = ["batch", "--input", str(docs), "--output", str(out), "--host", smol_cluster.url, "--max-tokens", "8",
            "--max-concurrent", "1", "--prompt", "Repeat: {content}"]
    first = subprocess.Popen([sys.executable, "-m", "p2pllm", *argv], cwd=REPO, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
    journal = Path(str(out) + ".jsonl")
    deadline = time.monotonic() + 120
    while not (journal.exists() and len(journal.read_text().splitlines()) >= 2):
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.stderr else ""
        time.sleep(0.1)
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 130 and "Traceback" not in err and "--resume" in err, err
    done = journal_lines(out)
    assert 2 <= len(done) < 6 and all(r["success"] for r in done)
    assert not out.exists()

    refused = run_cli(*argv, timeout=60)  # without --resume, the journal is not overwritten
    assert_one_line_error(refused, 2, "--resume")
    second = run_cli(*argv, "--resume", timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"resuming: {len(done)} of 6 tasks done" in second.stderr
    lines = journal_lines(out)
    assert len(lines) == 6 and lines[: len(done)] == done  # nothing done was run again
    result = json.loads(out.read_text())
    assert result["successful"] == 6 and result["resumed_tasks"] == len(done)
    assert {r["file"] for r in result["results"]} == {f"doc{i}.txt" for i in range(6)}


def test_a_wrong_api_key_is_one_line_before_any_work(smol_cluster, tmp_path):
    """The test cluster has no key, so a key cannot be wrong there: a gateway of our own with a key."""
    pytest.importorskip("uvicorn")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-c", _KEYED_GATEWAY, str(port)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port)
        docs = write_docs(tmp_path / "docs", 1)
        proc = run_cli("batch", "--input", docs, "--output", tmp_path / "out.json", "--host", f"127.0.0.1:{port}",
                       "--api-key", "wrong", timeout=60)
        assert_one_line_error(proc, 1, "refused the API key", "--api-key")
        assert not Path(str(tmp_path / "out.json") + ".jsonl").exists()
    finally:
        server.kill()
        server.wait()


# a real gateway app (p2pllm's own) over an engine that never runs: only its API-key check matters here
_KEYED_GATEWAY = """
import sys, uvicorn
from types import SimpleNamespace
from p2pllm.gateway.app import create_app
engine = SimpleNamespace(model_name="m", context=512, tokenizer=None)
uvicorn.run(create_app(engine, api_key="right"), host="127.0.0.1", port=int(sys.argv[1]), log_level="error")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


# --------------------------------------------------------------------------- bad input: one line, no traceback


@pytest.mark.parametrize("setup, extra, code, needle", [
    ("missing", [], 2, "no such directory"),
    ("empty", [], 2, "no .txt, .md or .pdf files"),
    ("docs", ["--prompt", "Summarize this"], 2, "no {content} placeholder"),
    ("docs", ["--host", "127.0.0.1:1"], 1, "no gateway at 127.0.0.1:1"),
    ("journal", [], 2, "pass --resume"),
    ("journal-dir", ["--resume"], 2, "out.json.jsonl is not a file"),  # was "internal error: IsADirectoryError"
])
def test_bad_input_is_one_clear_line(tmp_path, setup, extra, code, needle):
    folder = tmp_path / "in"
    if setup != "missing":
        folder.mkdir()
    if setup in ("docs", "journal", "journal-dir"):
        write_docs(folder, 1)
    out = tmp_path / "out.json"
    if setup == "journal-dir":
        Path(str(out) + ".jsonl").mkdir()
    if setup == "journal":
        Path(str(out) + ".jsonl").write_text('{"file": "doc0.txt", "prompt_template": "x", "success": true}\n')
    proc = run_cli("batch", "--input", folder, "--output", out, "--host", "127.0.0.1:1", *extra, timeout=60)
    assert_one_line_error(proc, code, needle)


# --------------------------------------------------------------------------- the pieces alone


@pytest.mark.parametrize("text", [
    "\n\n".join(f"Paragraph {i}. " + "A sentence here. " * (i % 7 + 1) for i in range(40)),
    "word " * 2000,
    "x" * 5000,  # no boundary at all
    "日本語の文章です。" * 300,  # multi-byte characters are never cut in half
])
def test_split_text_gives_pieces_that_fit_and_join_back_to_the_document(text):
    pieces = split_text(text, 100)
    assert "".join(pieces) == text
    assert len(pieces) > 1 and all(0 < estimate_tokens(p) <= 100 for p in pieces)


def test_split_text_prefers_paragraph_boundaries():
    paragraphs = [f"Paragraph {i} " + "x" * 100 for i in range(10)]
    pieces = split_text("\n\n".join(paragraphs), 100)  # 250 bytes a piece: two paragraphs each
    assert all(p.rstrip("\n").endswith("x") for p in pieces)


def test_a_template_fills_only_content_and_filename():
    t = Template("t", 'Answer as {"key": "..."} about {filename}:\n{content}')
    rendered = t.render("text with {filename} inside", "a.md")
    assert rendered == 'Answer as {"key": "..."} about a.md:\ntext with {filename} inside'


def test_presets_carry_the_research_summary_and_critical_prompts():
    assert list(PRESETS["research"]) == ["question", "methodology", "findings", "limitations", "future-work"]
    assert PRESETS["summary"] and PRESETS["critical"]
    assert all("{content}" in text for preset in PRESETS.values() for text in preset.values())
    chosen = templates(["research", "summary"], ["Mine: {content}"])
    assert [t.name for t in chosen][:5] == [f"research/{n}" for n in PRESETS["research"]]
    assert chosen[-1].name == "prompt-1" and len(chosen) == 5 + len(PRESETS["summary"]) + 1
    assert [t.name for t in templates([], [])] == [f"summary/{n}" for n in PRESETS["summary"]]
    with pytest.raises(UsageError, match="no {content}"):
        templates([], ["no placeholder"])


def test_find_documents_reads_txt_and_md_skips_hidden_empty_and_other_files(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("b")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / ".hidden.txt").write_text("h")
    (tmp_path / "c.csv").write_text("c")
    found = find_documents(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found.documents] == ["a.txt", "sub/b.md"]
    assert any("empty" in s for s in found.skipped)


def test_pdfs_are_read_with_pdftotext_where_it_is_installed_and_skipped_with_a_note_where_not(tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "paper.pdf").write_bytes(b"%PDF-1.4 not really")
    (docs / "a.txt").write_text("a")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no pdftotext
    found = find_documents(docs)
    assert [p.name for p in found.documents] == ["a.txt"] and "pdftotext is not installed" in found.skipped[0]
    # a stand-in pdftotext with poppler's command line: `pdftotext -layout -enc UTF-8 FILE -`
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "pdftotext"
    fake.write_text(f"#!{sys.executable}\nimport sys\nprint('text of', sys.argv[-2].rsplit('/', 1)[-1])\n")
    fake.chmod(0o755)
    found = find_documents(docs)
    assert [p.name for p in found.documents] == ["a.txt", "paper.pdf"]
    assert read_document(docs / "paper.pdf").strip() == "text of paper.pdf"


def test_the_journal_keeps_the_last_record_per_task_and_survives_a_torn_line(tmp_path):
    path = tmp_path / "out.json.jsonl"
    j = Journal(path)
    j.append({"file": "a", "prompt_template": "t", "success": False})
    j.append({"file": "a", "prompt_template": "t", "success": True})
    j.close()
    with path.open("a") as f:
        f.write('{"file": "b", "prompt_te')  # the process died mid-write
    assert read_journal(path) == {("a", "t"): {"file": "a", "prompt_template": "t", "success": True}}
    j = Journal(path)  # appending after a torn line starts a new line
    j.append({"file": "c", "prompt_template": "t", "success": True})
    j.close()
    assert set(read_journal(path)) == {("a", "t"), ("c", "t")}


def test_progress_line_shows_done_total_tokens_per_second_and_eta():
    class Stream(list):
        def write(self, s):
            self.append(s)

        def flush(self):
            pass

        def isatty(self):
            return False

    stream = Stream()
    p = Progress(total=4, already=1, stream=stream, every=0)
    p.finished({"success": True, "completion_tokens": 10})
    p.finished({"success": False, "completion_tokens": 0})
    line = stream[-1]
    assert line.startswith("batch: 3/4 done, 1 failed | ") and "tok/s" in line and "ETA " in line, line


# a fake gateway for what a real one will not do on demand: fail now and then, or have a small context

def _fake_gateway(handler, context: int = 8192) -> httpx.MockTransport:
    def route(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m", "max_model_len": context}]})
        return handler(json.loads(request.content)["messages"][0]["content"])

    return httpx.MockTransport(route)


def _answer(text: str, prompt_tokens: int = 5) -> httpx.Response:
    return httpx.Response(200, json={"choices": [{"message": {"content": text}}],
                                     "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 2}})


def _run(transport, tmp_path, texts: dict[str, str], template: str, **settings) -> list[dict]:
    for name, text in texts.items():
        (tmp_path / name).write_text(text)

    async def go():
        client = GatewayClient("fake", None, timeout=5, connections=4, transport=transport)
        _, context = await client.model_info()
        s = Settings(context=context, **{"max_tokens": 8, **settings})
        tasks = [Task(name, tmp_path / name, Template("t", template)) for name in texts]
        journal = Journal(tmp_path / "j.jsonl")
        try:
            return await run_tasks(Reader(client, s), tasks, journal, lambda r: None)
        finally:
            journal.close()
            await client.close()

    return asyncio.run(go())


def test_transient_failures_are_retried_then_the_task_is_recorded_failed(tmp_path):
    calls: dict[str, int] = {}

    def handler(prompt: str) -> httpx.Response:
        calls[prompt] = calls.get(prompt, 0) + 1
        if "flaky" in prompt and calls[prompt] == 1:
            return httpx.Response(503, json={"error": {"message": "busy"}}, headers={"Retry-After": "0"})
        if "broken" in prompt:
            return httpx.Response(500, json={"error": {"message": "engine failed"}}, headers={"Retry-After": "0"})
        return _answer("ok")

    records = _run(_fake_gateway(handler), tmp_path, {"flaky.txt": "flaky", "broken.txt": "broken"}, "{content}",
                   retries=2)
    by_file = {r["file"]: r for r in records}
    assert by_file["flaky.txt"]["success"] and calls["flaky"] == 2
    assert not by_file["broken.txt"]["success"] and calls["broken"] == 3
    assert by_file["broken.txt"]["error"] == "engine failed (HTTP 500)"
    assert len(read_journal(tmp_path / "j.jsonl")) == 2


def test_a_document_longer_than_the_context_is_cut_to_fit_and_cut_again_on_a_400(tmp_path):
    """A model with a 400-token context, whose tokenizer makes one token of each byte (2.5 times the
    estimate): the first pieces are refused with the real count, and cut again at that rate."""
    seen: list[int] = []
    refused: list[int] = []

    def handler(prompt: str) -> httpx.Response:
        n = len(prompt.encode())
        if n + 8 > 400:
            refused.append(n)
            return httpx.Response(400, json={"error": {
                "message": f"This model's maximum context length is 400 tokens; the prompt has {n} tokens.",
                "code": "context_length_exceeded"}})
        seen.append(n)
        return _answer(f"answer {len(seen)}", prompt_tokens=n)

    text = "\n\n".join(f"Paragraph {i}: " + "some words here " * 8 for i in range(12))
    records = _run(_fake_gateway(handler, context=400), tmp_path, {"long.txt": text}, "Summarize {content}")
    (r,) = records
    assert r["success"] and r["chunks"] >= 6 and "read in" in r["note"], r
    assert refused and all(n + 8 <= 400 for n in seen)


# --------------------------------------------------------------------------- a small real OpenAI server
# For what a real gateway will not do on demand (a non-UTF-8 world, Retry-After of a day, odd usage,
# an answer held back): a real HTTP server on loopback, in a thread of the test, that `p2pllm batch`
# and `p2pllm chat` reach over TCP like any other.


def _completion(text: str = "ok", usage=None) -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2} if usage is None else usage}


class _OpenAIServer:
    """/v1/models and /v1/chat/completions (whole or streamed) at `url`; `answer(body)` gives each
    chat completion's (status, headers, JSON body) and may block; `requests` has the bodies seen."""

    def __init__(self, answer=None, context: int = 4096):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.answer = answer or (lambda body: (200, {}, _completion()))
        self.requests: list[dict] = []
        self.paths: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, payload, headers: dict | None = None, content_type="application/json"):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _unknown(self):
                self._send(404, {"error": {"message": f"Invalid URL ({self.command} {self.path})"}})

            def do_GET(self):
                server.paths.append(self.path)
                if self.path != "/v1/models":
                    return self._unknown()
                self._send(200, {"object": "list", "data": [{"id": "m", "object": "model", "max_model_len": context}]})

            def do_POST(self):
                server.paths.append(self.path)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if self.path != "/v1/chat/completions":
                    return self._unknown()
                server.requests.append(body)
                if body.get("stream"):
                    events = [{"choices": [{"index": 0, "delta": {"content": "streamed ok"}}]},
                              {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}]
                    data = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
                    return self._send(200, data.encode(), content_type="text/event-stream")
                status, headers, payload = server.answer(body)
                self._send(status, payload, headers)

        import random

        for port in random.sample(range(23000, 24000), 50):
            try:
                self._http = ThreadingHTTPServer(("127.0.0.1", port), Handler)
                break
            except OSError:
                continue
        else:
            raise AssertionError("no free port in 23000-23999")
        self._http.daemon_threads = True
        self.url = f"http://127.0.0.1:{port}"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._http.shutdown()
        self._http.server_close()


def _run_over_http(server: _OpenAIServer, tmp_path: Path, tasks: list[Task], journal_path: Path | None = None,
                   notes: list | None = None, **settings) -> list[dict]:
    async def go():
        client = GatewayClient(server.url, None, timeout=30, connections=4)
        _, context = await client.model_info()
        s = Settings(context=context, **{"max_tokens": 8, **settings})
        journal = Journal(journal_path or tmp_path / "j.jsonl")
        try:
            reader = Reader(client, s) if notes is None else Reader(client, s, notes.append)
            return await run_tasks(reader, tasks, journal, lambda r: None)
        finally:
            journal.close()
            await client.close()

    return asyncio.run(go())


def _stderr_without_progress(proc) -> str:
    return "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("batch: "))


def test_a_file_name_that_is_not_utf8_is_skipped_with_a_note_and_the_batch_goes_on(tmp_path):
    """Was: `internal error: UnicodeEncodeError ... surrogates not allowed`, no result file, and
    --resume crashing the same way for ever."""
    docs = write_docs(tmp_path / "docs", 2)
    with open(os.fsencode(docs) + b"/bad\xffname.txt", "wb") as f:
        f.write(b"a document whose name is not UTF-8\n")
    found = find_documents(docs)
    assert [p.name for p in found.documents] == ["doc0.txt", "doc1.txt"]
    assert found.skipped == ["bad\\xffname.txt: the file name is not valid UTF-8 (rename it to read it)"]
    out = tmp_path / "out.json"
    with _OpenAIServer() as server:
        for extra in ((), ("--resume",)):
            proc = run_cli("batch", "--input", docs, "--output", out, "--host", server.url, "--prompt",
                           "{filename}: {content}", *extra, timeout=120)
            assert proc.returncode == 0, proc.stderr
            assert "p2pllm: skipped bad\\xffname.txt: the file name is not valid UTF-8" in proc.stderr
            assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr
            result = json.loads(out.read_text())
            assert (result["total_tasks"], result["successful"]) == (2, 2)
        assert "resuming: 2 of 2 tasks done" in proc.stderr


def test_an_unexpected_error_in_one_task_fails_that_task_only_and_the_journal_keeps_it(tmp_path):
    """A task whose request cannot even be encoded (a lone surrogate in its file name: httpx raises
    UnicodeEncodeError, no RequestFailed) used to end the whole batch."""
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "b.txt").write_text("beta\n")
    template = Template("t", "{filename}: {content}")
    tasks = [Task("a\udcffb.txt", tmp_path / "a.txt", template), Task("b.txt", tmp_path / "b.txt", template)]
    with _OpenAIServer() as server:
        records = _run_over_http(server, tmp_path, tasks)
    by_file = {r["file"]: r for r in records}
    assert by_file["b.txt"]["success"] and by_file["b.txt"]["response"] == "ok"
    bad = by_file["a\udcffb.txt"]
    assert not bad["success"] and bad["error"].startswith("UnicodeEncodeError"), bad
    # the journal takes the record all the same (escaped), and gives the same key back
    assert set(read_journal(tmp_path / "j.jsonl")) == {("a\udcffb.txt", template.text), ("b.txt", template.text)}


def test_a_journal_torn_inside_a_character_or_edited_by_hand_is_read_with_those_lines_skipped(tmp_path, caplog):
    path = tmp_path / "out.json.jsonl"
    good = {"file": "doc0.txt", "prompt_template": "{content}", "success": True, "response": "ok",
            "completion_tokens": 2}
    lines = [json.dumps(good).encode(),
             b'{"file": ["d1.txt"], "prompt_template": "x", "success": true}',  # was TypeError: unhashable
             b'{"file": "d2.txt", "prompt_template": 7, "success": true}',
             b'{"file": "d3.txt", "prompt_template": "x", "success": "yes"}',
             b'["not", "a", "record"]',
             b'"neither"']
    torn = json.dumps({"file": "caf\u00e9.txt", "prompt_template": "x"}, ensure_ascii=False).encode()
    torn = torn[: torn.index("\u00e9".encode()) + 1]  # cut inside the two bytes of é: was UnicodeDecodeError
    path.write_bytes(b"\n".join(lines) + b"\n" + torn)
    with caplog.at_level("WARNING"):
        assert read_journal(path) == {("doc0.txt", "{content}"): good}
    warned = [r.getMessage() for r in caplog.records if "is not a task record" in r.getMessage()]
    assert len(warned) == 6 and any("line 7" in w for w in warned), warned
    # --resume over it: the good record is kept, the rest runs
    docs = write_docs(tmp_path / "docs", 2)
    with _OpenAIServer() as server:
        proc = run_cli("batch", "--input", docs, "--output", tmp_path / "out.json", "--host", server.url,
                       "--prompt", "{content}", "--resume", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "internal error" not in proc.stderr and "resuming: 1 of 2 tasks done" in proc.stderr
    result = json.loads((tmp_path / "out.json").read_text())
    assert (result["successful"], result["resumed_tasks"]) == (2, 1)
    assert len(read_journal(path)) == 2  # the new record went on a line of its own after the torn one


def test_a_journal_that_cannot_be_written_stops_the_batch_with_one_line_and_keeps_what_it_holds(tmp_path):
    """A full disk (ENOSPC) while appending used to print an asyncio traceback ('Cannot send a
    request, as the client has been closed') and `internal error: OSError`."""
    (tmp_path / "a.txt").write_text("alpha\n")
    template = Template("t", "{content}")
    tasks = [Task(f"a{i}.txt", tmp_path / "a.txt", template) for i in range(8)]
    with _OpenAIServer() as server:
        with pytest.raises(Exception) as raised:  # /dev/full: every write is ENOSPC
            _run_over_http(server, tmp_path, tasks, journal_path=Path("/dev/full"), max_concurrent=2)
    assert type(raised.value).__name__ == "JournalWriteError", raised.value
    assert str(raised.value).startswith("cannot write the journal /dev/full: No space left on device")

    # the command: a journal that fills up after two records (a file size limit stands in for the
    # full disk: the same failed write, EFBIG instead of ENOSPC), then --resume once there is room
    import resource

    docs = write_docs(tmp_path / "docs", 6)
    out = tmp_path / "out.json"
    argv = ["batch", "--input", str(docs), "--output", str(out), "--max-concurrent", "1", "--prompt", "{content}"]
    record_size = len(json.dumps({"file": "doc0.txt", "prompt_template": "{content}", "prompt_name": "prompt-1",
                                  "success": True, "response": "ok", "error": None, "prompt_tokens": 5,
                                  "completion_tokens": 2, "seconds": 0.001, "chunks": 1})) + 1
    limit = record_size * 2 + record_size // 2

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("P2PLLM_DEBUG", None)
    with _OpenAIServer() as server:
        proc = subprocess.run([sys.executable, "-m", "p2pllm", *argv, "--host", server.url], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120, preexec_fn=small_files)
        err = _stderr_without_progress(proc)
        assert proc.returncode == 1, proc.stderr
        assert err.count("\n") == 0 and "Traceback" not in err and "unhandled" not in err, proc.stderr
        assert err.startswith(f"p2pllm: error: cannot write the journal {out}.jsonl: File too large"), err
        assert not out.exists()
        kept = read_journal(Path(f"{out}.jsonl"))
        assert len(kept) == 2 and all(r["success"] for r in kept.values())
        again = run_cli(*argv, "--host", server.url, "--resume", timeout=120)
    assert again.returncode == 0, again.stderr
    assert "resuming: 2 of 6 tasks done" in again.stderr
    assert json.loads(out.read_text())["successful"] == 6


def test_a_retry_after_of_a_day_is_cut_short_and_said(tmp_path):
    """A 503 with Retry-After: 100000 used to put each task to sleep for 28 hours."""
    assert Settings(context=4096, max_tokens=8).max_retry_wait == 60.0
    calls: list[str] = []

    def answer(body):
        calls.append(body["messages"][0]["content"])
        if len(calls) == 1:
            return 503, {"Retry-After": "100000"}, {"error": {"message": "busy"}}
        return 200, {}, _completion()

    (tmp_path / "a.txt").write_text("alpha\n")
    notes: list[str] = []
    with _OpenAIServer(answer) as server:
        started = time.monotonic()
        records = _run_over_http(server, tmp_path, [Task("a.txt", tmp_path / "a.txt", Template("t", "{content}"))],
                                 notes=notes, retries=1, max_retry_wait=0.5)
    assert time.monotonic() - started < 20
    assert records[0]["success"] and len(calls) == 2
    assert notes == ["p2pllm: busy (HTTP 503); trying again in 0.5s (Retry-After 100000s, capped at 0.5s)"]


def test_a_long_wait_before_a_retry_is_a_line_on_stderr(tmp_path):
    calls: list[int] = []

    def answer(body):
        calls.append(1)
        if len(calls) == 1:
            return 429, {"Retry-After": "5"}, {"error": {"message": "too many requests waiting"}}
        return 200, {}, _completion()

    docs = write_docs(tmp_path / "docs", 1)
    with _OpenAIServer(answer) as server:
        proc = run_cli("batch", "--input", docs, "--output", tmp_path / "out.json", "--host", server.url,
                       "--prompt", "{content}", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "p2pllm: too many requests waiting (HTTP 429); trying again in 5s" in proc.stderr


def test_a_second_batch_on_the_same_journal_is_refused_while_the_first_runs(tmp_path):
    """Two batches on one journal used to both run every task (60 records for 30 tasks)."""
    import threading

    release = threading.Event()

    def answer(body):
        release.wait(60)
        return 200, {}, _completion()

    docs = write_docs(tmp_path / "docs", 3)
    out = tmp_path / "out.json"
    with _OpenAIServer(answer) as server:
        argv = [sys.executable, "-m", "p2pllm", "batch", "--input", str(docs), "--output", str(out),
                "--host", server.url, "--prompt", "{content}", "--max-concurrent", "1"]
        first = subprocess.Popen(argv, cwd=REPO, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while not server.requests:  # the first batch is under way
                assert first.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            results = {}
            for extra in ((), ("--resume",)):
                second = subprocess.Popen([*argv, *extra], cwd=REPO, stderr=subprocess.PIPE, text=True)
                try:
                    _, err = second.communicate(timeout=30)
                except subprocess.TimeoutExpired:  # (it runs: let both end)
                    release.set()
                    _, err = second.communicate(timeout=60)
                results[extra] = (second.returncode, err)
            release.set()
            _, first_err = first.communicate(timeout=60)
        finally:
            release.set()
            for p in (first,):
                if p.poll() is None:
                    p.kill()
    for code, err in results.values():
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, err
        assert lines[0] == (f"p2pllm: error: another p2pllm batch is writing {out}.jsonl: wait for it to end "
                            f"(or stop it) before running this one"), err
    assert first.returncode == 0, first_err
    assert len(journal_lines(out)) == 3 and json.loads(out.read_text())["successful"] == 3


def test_host_may_be_the_openai_base_url_with_v1_for_batch_and_chat(tmp_path):
    """`--host http://127.0.0.1:PORT/v1` (what a daemon's ready: line prints) used to ask /v1/v1/models."""
    from p2pllm.gateway.chat_cli import base_url

    assert base_url("http://127.0.0.1:8700/v1") == base_url("http://127.0.0.1:8700/v1/") == "http://127.0.0.1:8700"
    assert base_url("127.0.0.1:8700/v1") == base_url("127.0.0.1:8700") == "http://127.0.0.1:8700"
    assert base_url("https://example.com/") == "https://example.com"
    docs = write_docs(tmp_path / "docs", 1)
    with _OpenAIServer() as server:
        for i, host in enumerate((f"{server.url}/v1", f"{server.url}/v1/")):
            out = tmp_path / f"out{i}.json"
            proc = run_cli("batch", "--input", docs, "--output", out, "--host", host, "--prompt", "{content}",
                           timeout=120)
            assert proc.returncode == 0, proc.stderr
            assert json.loads(out.read_text())["successful"] == 1
            chat = run_cli("chat", "--host", host, "--prompt", "hi", timeout=120)
            assert chat.returncode == 0, chat.stderr
            assert chat.stdout == "streamed ok\n"
        assert not [p for p in server.paths if p.startswith("/v1/v1")], server.paths


@pytest.mark.parametrize("usage", [{"prompt_tokens": "many", "completion_tokens": 2}, "lots", [1, 2],
                                   {"prompt_tokens": 5.0, "completion_tokens": -3}, {"prompt_tokens": None}])
def test_a_usage_of_another_shape_counts_as_unknown_and_never_ends_the_batch(tmp_path, usage):
    """Another OpenAI-compatible server's `"usage": {"prompt_tokens": "many"}` used to be
    `internal error: ValueError`."""
    (tmp_path / "a.txt").write_text("alpha\n")
    with _OpenAIServer(lambda body: (200, {}, _completion("fine", usage=usage))) as server:
        (r,) = _run_over_http(server, tmp_path, [Task("a.txt", tmp_path / "a.txt", Template("t", "{content}"))])
    assert r["success"] and r["response"] == "fine", r
    expected = {"prompt_tokens": 5 if isinstance(usage, dict) and usage.get("prompt_tokens") == 5.0 else 0,
                "completion_tokens": 2 if isinstance(usage, dict) and usage.get("completion_tokens") == 2 else 0}
    assert {k: r[k] for k in expected} == expected


def test_ctrl_c_after_one_task_says_one_finished_task_is_kept(tmp_path):
    import threading

    release = threading.Event()

    def answer(body):
        if "Note 0:" not in body["messages"][0]["content"]:
            release.wait(60)
        return 200, {}, _completion()

    docs = write_docs(tmp_path / "docs", 3)
    out = tmp_path / "out.json"
    with _OpenAIServer(answer) as server:
        proc = subprocess.Popen([sys.executable, "-m", "p2pllm", "batch", "--input", str(docs), "--output", str(out),
                                 "--host", server.url, "--prompt", "{content}", "--max-concurrent", "1"],
                                cwd=REPO, stderr=subprocess.PIPE, text=True)
        try:
            journal = Path(f"{out}.jsonl")
            deadline = time.monotonic() + 60
            while not (journal.exists() and journal.read_text().count("\n") >= 1 and len(server.requests) >= 2):
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            release.set()
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130, err
    assert f"p2pllm: interrupted; 1 finished task is kept in {out}.jsonl" in err, err
    assert "Traceback" not in err


def test_a_document_of_only_whitespace_is_left_out_like_an_empty_one(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "blank.md").write_text("  \n\t\r\n\n")
    (tmp_path / "empty.txt").write_text("")
    found = find_documents(tmp_path)
    assert [p.name for p in found.documents] == ["a.txt"]
    assert found.skipped == ["blank.md: empty (only whitespace)", "empty.txt: empty"]


def test_resume_without_a_journal_runs_everything_and_a_batch_that_never_starts_leaves_no_journal(tmp_path):
    """The journal is opened (and locked) before the gateway is asked: one made for nothing is removed."""
    docs = write_docs(tmp_path / "docs", 2)
    out = tmp_path / "out.json"
    refused = run_cli("batch", "--input", docs, "--output", out, "--host", "127.0.0.1:1", "--prompt", "{content}",
                      timeout=60)
    assert_one_line_error(refused, 1, "no gateway at 127.0.0.1:1")
    assert not Path(f"{out}.jsonl").exists()
    with _OpenAIServer() as server:
        proc = run_cli("batch", "--input", docs, "--output", out, "--host", server.url, "--prompt", "{content}",
                       "--resume", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "resuming" not in proc.stderr and len(journal_lines(out)) == 2
