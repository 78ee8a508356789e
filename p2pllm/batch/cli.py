"""`p2pllm batch --input DIR --output FILE.json`: the command, its checks and the result file."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path

from ..argtypes import positive_float, positive_int, temperature, utf8_text
from ..errors import P2PError, UsageError
from ..gateway.chat_cli import gateway_address
from .documents import find_documents
from .journal import Journal, journal_path, read_journal
from .prompts import DEFAULT_PRESET, PRESETS, templates
from .runner import GatewayClient, Progress, Reader, Settings, Task, document_room, run_tasks

DEFAULT_GATEWAY = "127.0.0.1:8700"
DEFAULT_MAX_TOKENS = 512
MIN_DOCUMENT_ROOM = 64  # tokens of document per request below which a batch is not worth starting


def _chunk_tokens(text: str) -> int:
    value = positive_int(text)
    if value < MIN_DOCUMENT_ROOM:  # (below it, the template check blamed the template and --max-tokens)
        raise argparse.ArgumentTypeError(f"must be at least {MIN_DOCUMENT_ROOM}, the smallest piece a document is "
                                         f"read in, got {value}")
    return value


def add_batch_parser(sub) -> None:
    p = sub.add_parser("batch", help="run prompt templates over a folder of documents",
                       description="Send every .txt/.md file of a folder (and .pdf where pdftotext is installed) "
                                   "with every prompt template to a gateway, and write the answers to a JSON file. "
                                   "Each finished task is appended to FILE.json.jsonl at once; --resume skips "
                                   "the tasks done there.")
    p.add_argument("--input", required=True, type=Path, metavar="DIR", help="the folder of documents")
    p.add_argument("--output", required=True, type=Path, metavar="FILE.json", help="the result file")
    p.add_argument("--preset", action="append", choices=sorted(PRESETS), default=[],
                   help=f"a set of prompts (repeatable; default {DEFAULT_PRESET} when no --prompt is given): "
                        + "; ".join(f"{k}: {', '.join(v)}" for k, v in PRESETS.items()))
    p.add_argument("--prompt", action="append", default=[], metavar="TEMPLATE", type=utf8_text,
                   help="a prompt template with {content} (the document) and optionally {filename} (repeatable)")
    p.add_argument("--max-concurrent", type=positive_int, default=4, metavar="N",
                   help="requests in flight at once (default 4)")
    p.add_argument("--max-tokens", type=positive_int, default=DEFAULT_MAX_TOKENS, metavar="N",
                   help=f"most tokens per answer (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--temperature", type=temperature, default=0.0, help="0 is greedy (default 0)")
    p.add_argument("--chunk-tokens", type=_chunk_tokens, default=None, metavar="N",
                   help="read documents in pieces of at most about N tokens (default: as much as the context "
                        "holds beside the template and the answer)")
    p.add_argument("--host", default=DEFAULT_GATEWAY, metavar="H:P", type=gateway_address,
                   help=f"a gateway address, HOST:PORT or a URL (default {DEFAULT_GATEWAY})")
    p.add_argument("--api-key", default=None, help="the gateway's API key (default: $P2PLLM_API_KEY)")
    p.add_argument("--timeout", type=positive_float, default=600.0, metavar="SECONDS",
                   help="seconds to wait for one answer (default 600)")
    p.add_argument("--retries", type=int, default=2, choices=range(11), metavar="N",
                   help="extra attempts after a timeout, a lost connection, a 429 or a 5xx (default 2)")
    p.add_argument("--resume", action="store_true",
                   help="continue the batch of FILE.json.jsonl: skip the tasks that succeeded there")
    p.set_defaults(func=cmd_batch)


def cmd_batch(args) -> int:
    chosen = templates(args.preset, args.prompt)
    found = find_documents(args.input)
    for line in found.skipped:
        print(f"p2pllm: skipped {line}", file=sys.stderr)
    if not found.documents:
        raise UsageError(f"--input {args.input}: no .txt, .md or .pdf files to read"
                         + (f" ({'; '.join(found.skipped)})" if found.skipped else ""))
    output = args.output
    journal_file = journal_path(output)
    _check_output(output, journal_file)
    journal = _open_journal(output, journal_file)  # locked from here on: a second batch on it is refused
    try:
        if not args.resume and journal_file.stat().st_size > 0:
            # never start over silently on top of finished work
            raise UsageError(f"{journal_file} holds an earlier batch: pass --resume to continue it, or remove it "
                             f"to start over")
        tasks = [Task(str(path.relative_to(args.input)), path, t) for path in found.documents for t in chosen]
        api_key = args.api_key if args.api_key is not None else os.environ.get("P2PLLM_API_KEY") or None
        try:
            return asyncio.run(_batch(args, tasks, len(found.documents), journal, api_key))
        except KeyboardInterrupt:
            done = len(read_journal(journal_file))
            kept = f"{done} finished task is" if done == 1 else f"{done} finished tasks are"
            print(f"p2pllm: interrupted; {kept} kept in {journal_file}: run the same command with --resume "
                  f"to go on", file=sys.stderr)
            return 130
    finally:
        journal.close()


def _open_journal(output: Path, journal: Path) -> Journal:
    try:  # the journal is where finished work goes: find out now, not after the first task
        return Journal(journal)
    except OSError as e:
        raise UsageError(f"--output {output}: cannot write its journal {journal} ({e.strerror or e})") from None


def _check_output(output: Path, journal: Path) -> None:
    if output.is_dir():
        raise UsageError(f"--output {output} is a directory; name a file, e.g. {output / 'results.json'}")
    if not output.parent.is_dir():
        raise UsageError(f"--output {output}: the folder {output.parent} does not exist")
    if not os.access(output.parent, os.W_OK):
        raise UsageError(f"--output {output}: cannot write in {output.parent}")
    if journal.exists() and not journal.is_file():
        raise UsageError(f"--output {output}: its journal {journal} is not a file")


async def _batch(args, tasks: list[Task], n_files: int, journal: Journal, api_key: str | None) -> int:
    client = GatewayClient(args.host, api_key, args.timeout, args.max_concurrent)
    try:
        model, context = await client.model_info()
        settings = _settings(args, context, tasks)
        kept, todo = _resume(tasks, journal) if args.resume else ({}, tasks)
        progress = Progress(len(tasks), len(kept))
        started = time.monotonic()
        ticker = asyncio.ensure_future(_tick(progress))
        try:
            progress.show()
            records = await run_tasks(Reader(client, settings, progress.note), todo, journal, progress.finished)
        except BaseException:
            progress.end()  # what follows (an error, "interrupted") goes below the progress line
            raise
        finally:
            ticker.cancel()
        seconds = time.monotonic() - started
        progress.show(final=True)
    finally:
        await client.close()
    fresh = {(r["file"], r["prompt_template"]): r for r in records}
    results = [kept.get(t.key) or fresh[t.key] for t in tasks]
    summary = _summary(results, n_files, seconds, len(records), model=model, host=args.host, settings=settings,
                       resumed=len(kept))
    _write_json(args.output, summary)
    failed = summary["failed"]
    print(f"p2pllm: wrote {args.output}: {summary['successful']} of {len(results)} tasks succeeded"
          + (f", {failed} failed (run again with --resume to retry them)" if failed else ""), file=sys.stderr)
    return 0 if not failed else 1


async def _tick(progress: Progress) -> None:
    """Keeps the line's rate and ETA moving while long tasks run (the line throttles itself)."""
    while True:
        await asyncio.sleep(1.0)
        progress.show()


def _resume(tasks: list[Task], journal: Journal) -> tuple[dict, list[Task]]:
    """The records of the tasks that succeeded in the journal, and the tasks still to run."""
    done = {key: r for key, r in read_journal(journal.path).items() if r.get("success")}
    kept = {t.key: done[t.key] for t in tasks if t.key in done}
    todo = [t for t in tasks if t.key not in kept]
    if not journal.created:  # (opening it made an empty one where there was none)
        print(f"p2pllm: resuming: {len(kept)} of {len(tasks)} tasks done in {journal.path}, {len(todo)} to run",
              file=sys.stderr)
    return kept, todo


def _settings(args, context: int | None, tasks: list[Task]) -> Settings:
    if context is None:
        context = 2048  # a gateway that does not say: assume a small context rather than a 400 on every piece
        logging.getLogger(__name__).warning("the gateway does not report max_model_len; assuming %d tokens", context)
    settings = Settings(context=context, max_tokens=args.max_tokens, temperature=args.temperature,
                        max_concurrent=args.max_concurrent, retries=args.retries, chunk_tokens=args.chunk_tokens)
    if args.max_tokens >= context:
        raise UsageError(f"--max-tokens {args.max_tokens} leaves no room for a prompt in the model's context of "
                         f"{context} tokens")
    for template in {t.template.text: t.template for t in tasks}.values():
        if document_room(settings, template, "document.txt") < MIN_DOCUMENT_ROOM:
            raise UsageError(f"template {template.name!r} with --max-tokens {args.max_tokens} leaves too little "
                             f"of the {context}-token context for the document; use a shorter template or a "
                             f"smaller --max-tokens")
    return settings


def _summary(results: list[dict], n_files: int, seconds: float, ran: int, *, model: str, host: str,
             settings: Settings, resumed: int) -> dict:
    successful = sum(1 for r in results if r["success"])
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "files_processed": n_files,
        "total_tasks": len(results),
        "successful": successful,
        "failed": len(results) - successful,
        "success_rate": round(successful / len(results), 4) if results else 0.0,
        "total_time_seconds": round(seconds, 3),  # this run's; tasks taken from the journal are not in it
        "tasks_per_second": round(ran / seconds, 4) if seconds > 0 else 0.0,
        "resumed_tasks": resumed,
        "model": model,
        "host": host,
        "context": settings.context,
        "max_tokens": settings.max_tokens,
        "max_concurrent": settings.max_concurrent,
        "results": results,
    }


def _write_json(path: Path, data: dict) -> None:
    """Written beside and renamed over, so that a reader never sees half a result file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        text = json.dumps(data, indent=2, ensure_ascii=False)
        try:
            encoded = (text + "\n").encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate somewhere: escaped, it is still the same JSON
            encoded = (json.dumps(data, indent=2) + "\n").encode("ascii")
        tmp.write_bytes(encoded)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise P2PError(f"cannot write {path}: {e.strerror or e} (the answers are in {path}.jsonl)") from None


