"""`p2pllm chat`: talk to a gateway (any peer's) over its OpenAI API, streaming the answer.

With --prompt: one answer on stdout, exit 0. Without: a conversation with history; `/reset`
forgets it, `/exit` or Ctrl-D leaves, Ctrl-C during an answer stops that answer (the gateway
then frees the sequence on every stage).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator

import httpx

from ..argtypes import is_utf8, positive_float, positive_int, seed, temperature, utf8_text
from ..errors import P2PError
from ..wording import counted

DEFAULT_GATEWAY = "127.0.0.1:8700"
HELP = "commands: /reset forgets the conversation, /exit (or Ctrl-D) leaves, Ctrl-C stops an answer"


def add_chat_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with the cluster through a gateway",
                       description="Chat with the model through a p2pllm gateway (any peer's). With --prompt, "
                                   "print one answer and exit; otherwise start a conversation.")
    p.add_argument("--host", default=DEFAULT_GATEWAY, metavar="H:P", type=gateway_address,
                   help=f"a gateway address, HOST:PORT or a URL (default {DEFAULT_GATEWAY})")
    p.add_argument("--prompt", default=None, type=utf8_text, help="ask this, print the answer, exit")
    p.add_argument("--system", default=None, type=utf8_text, help="a system message to start the conversation with")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="most tokens per answer (default: the server's, up to 256)")
    p.add_argument("--temperature", type=temperature, default=0.7, help="0 is greedy (default 0.7)")
    p.add_argument("--seed", type=seed, default=None)
    p.add_argument("--api-key", default=None, help="the gateway's API key (default: $P2PLLM_API_KEY)")
    p.add_argument("--timeout", type=positive_float, default=600.0, help="seconds to wait for an answer (default 600)")
    p.set_defaults(func=cmd_chat)


FIRST_CONTACT_SECONDS = 10.0


def base_url(host: str) -> str:
    """'127.0.0.1:8700', 'http://host:8700/' or the OpenAI base URL 'http://host:8700/v1' (as a
    daemon's ready: line prints it) -> 'http://host:8700'; the paths asked are /v1/..."""
    host = host.strip().rstrip("/")
    if host.endswith("/v1"):
        host = host[: -len("/v1")].rstrip("/")
    if host.startswith(("http://", "https://")):
        return host
    return f"http://{host}"


def gateway_address(text: str) -> str:
    """--host of `chat` and `batch`: `text` when base_url makes a usable URL of it; else argparse's
    one-line error (a port that is no number was "internal error: InvalidURL")."""
    import argparse

    try:
        url = httpx.URL(base_url(text))
        port = url.port  # None: the scheme's own
    except (httpx.InvalidURL, ValueError) as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT or a URL ({e})") from None
    if not url.host:
        raise argparse.ArgumentTypeError(f"{text!r} names no host (HOST:PORT, e.g. 127.0.0.1:8700)")
    if port is not None and not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: port {port} is outside 1-65535")
    return text


@dataclass
class ChatClient:
    """A conversation with one gateway."""

    host: str
    api_key: str | None = None
    max_tokens: int | None = None
    temperature: float = 0.7
    seed: int | None = None
    timeout: float = 600.0
    history: list[dict] = field(default_factory=list)
    model: str | None = None
    usage: dict | None = None

    def __post_init__(self) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = httpx.Client(base_url=base_url(self.host), headers=headers, trust_env=False,
                                  timeout=httpx.Timeout(self.timeout, connect=5.0))

    def close(self) -> None:
        self._http.close()

    def connect(self) -> str:
        """The model the gateway serves; the first sign of life of the gateway."""
        with self._errors():  # a gateway lists its models at once: a port that accepts and says nothing is no gateway
            reply = self._http.get("/v1/models", timeout=min(self.timeout, FIRST_CONTACT_SECONDS))
            _check(reply)
        try:
            self.model = reply.json()["data"][0]["id"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise P2PError(f"{self.host} answered /v1/models with something that is not a model list") from None
        return self.model

    def ask(self, text: str) -> Iterator[str]:
        """Stream the answer to `text`. The conversation keeps the question and the answer when one
        came, also an answer stopped early (as far as it got); a failed question is forgotten."""
        messages = [*self.history, {"role": "user", "content": text}]
        reply: list[str] = []
        failed = False
        try:
            for piece in self._stream(messages):
                reply.append(piece)
                yield piece
        except P2PError:
            failed = True
            raise
        finally:
            if not failed:
                self.history = [*messages, {"role": "assistant", "content": "".join(reply)}]

    def reset(self, system: str | None = None) -> None:
        self.history = [{"role": "system", "content": system}] if system else []

    def _stream(self, messages: list[dict]) -> Iterator[str]:
        body: dict = {"messages": messages, "stream": True, "temperature": self.temperature,
                      "stream_options": {"include_usage": True}}
        if self.model:
            body["model"] = self.model
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        if self.seed is not None:
            body["seed"] = self.seed
        self.usage = None
        with self._errors():
            with self._http.stream("POST", "/v1/chat/completions", json=body) as reply:
                if reply.status_code != 200:
                    reply.read()
                    _check(reply)
                for line in reply.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        raise P2PError(f"{self.host} sent a malformed event: {data[:80]!r}") from None
                    if chunk.get("error"):
                        raise P2PError(_error_message(chunk))
                    if chunk.get("usage"):
                        self.usage = chunk["usage"]
                    for choice in chunk.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            yield piece

    def _errors(self):
        return _translate_errors(self.host)


class _translate_errors:
    """httpx's connection errors -> one line a user understands."""

    def __init__(self, host: str):
        self.host = host

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or not isinstance(exc, httpx.HTTPError):
            return False
        if isinstance(exc, httpx.ConnectError):
            reason = "connection refused" if "refused" in str(exc).lower() or "111" in str(exc) else str(exc) or "cannot connect"
            raise P2PError(f"no gateway at {self.host} ({reason})") from None
        if isinstance(exc, httpx.TimeoutException):
            raise P2PError(f"the gateway at {self.host} did not answer in time ({type(exc).__name__})") from None
        raise P2PError(f"the connection to the gateway at {self.host} failed ({type(exc).__name__}: {exc})") from None


def _error_message(data: dict) -> str:
    error = data.get("error")
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return str(error)


def _check(reply: httpx.Response) -> None:
    if reply.status_code < 400:
        return
    try:
        message = _error_message(reply.json())
    except ValueError:
        message = reply.text.strip()[:200] or reply.reason_phrase
    raise P2PError(f"{message} (HTTP {reply.status_code})")


def cmd_chat(args) -> int:
    if not logging.getLogger().isEnabledFor(logging.DEBUG):  # httpx logs every request at INFO
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)
    api_key = args.api_key if args.api_key is not None else os.environ.get("P2PLLM_API_KEY") or None
    client = ChatClient(args.host, api_key=api_key, max_tokens=args.max_tokens, temperature=args.temperature,
                        seed=getattr(args, "seed", None), timeout=getattr(args, "timeout", 600.0))
    client.reset(getattr(args, "system", None))
    try:
        model = client.connect()
        if args.prompt is not None:
            for piece in client.ask(args.prompt):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
            return 0
        return _repl(client, model, getattr(args, "system", None))
    finally:
        client.close()


def _repl(client: ChatClient, model: str, system: str | None) -> int:
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(f"connected to {model} at {client.host}; {HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D to leave)", file=sys.stderr)
            continue
        except UnicodeDecodeError:  # a strict stdin; a surrogate-escaping one gives lone surrogates
            line = None
        if line is None or not is_utf8(line):  # another encoding: no JSON body can carry it
            print("(that line is not valid UTF-8; nothing was sent)", file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            client.reset(system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text in ("/help", "/?"):
            print(HELP, file=sys.stderr)
            continue
        started = time.perf_counter()
        answer = client.ask(text)
        try:
            for piece in answer:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
            usage = client.usage
            tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
            if interactive and isinstance(tokens, int) and not isinstance(tokens, bool):  # (another server's usage)
                seconds = time.perf_counter() - started
                print(f"[{counted(tokens, 'token')}, {tokens / max(seconds, 1e-9):.1f} tok/s]", file=sys.stderr)
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            print("(stopped)", file=sys.stderr)
        except P2PError as e:  # one failed turn does not end the conversation
            sys.stdout.write("\n")
            print(f"p2pllm: error: {e}", file=sys.stderr)
        finally:
            answer.close()  # a stopped answer closes its connection: the gateway frees the sequence
