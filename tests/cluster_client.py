"""A client run inside a namespace host: the official openai client against the host's gateway.

Reads one JSON job on stdin, prints one JSON answer. Jobs: complete, chat, concurrent,
disconnect, raw (an httpx request, for error shapes).
"""

import json
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai

job = json.loads(sys.argv[1]) if len(sys.argv) > 1 else json.load(sys.stdin)
base = job.get("base", "http://127.0.0.1:8700/v1")
api = openai.OpenAI(base_url=base, api_key=job.get("api_key", "none"), timeout=120, max_retries=0)


def complete(prompt, stream=False, max_tokens=32):
    if not stream:
        r = api.completions.create(model=job["model"], prompt=prompt, max_tokens=max_tokens, temperature=0)
        return {"text": r.choices[0].text, "finish_reason": r.choices[0].finish_reason,
                "usage": r.usage.model_dump()}
    parts = [c.choices[0].text for c in api.completions.create(model=job["model"], prompt=prompt,
                                                                max_tokens=max_tokens, temperature=0, stream=True)
             if c.choices]
    return {"text": "".join(parts), "chunks": len(parts)}


def chat(messages, stream=False, max_tokens=32):
    if not stream:
        r = api.chat.completions.create(model=job["model"], messages=messages, max_tokens=max_tokens, temperature=0)
        return {"text": r.choices[0].message.content, "role": r.choices[0].message.role,
                "finish_reason": r.choices[0].finish_reason}
    parts = [c.choices[0].delta.content or "" for c in api.chat.completions.create(
        model=job["model"], messages=messages, max_tokens=max_tokens, temperature=0, stream=True) if c.choices]
    return {"text": "".join(parts)}


kind = job["kind"]
if kind == "complete":
    out = [complete(p, job.get("stream", False), job.get("max_tokens", 32)) for p in job["prompts"]]
elif kind == "chat":
    out = chat(job["messages"], job.get("stream", False), job.get("max_tokens", 32))
elif kind == "concurrent":
    with ThreadPoolExecutor(len(job["prompts"])) as pool:
        out = list(pool.map(lambda p: complete(p, False, job.get("max_tokens", 32))["text"], job["prompts"]))
elif kind == "disconnect":
    stream = api.completions.create(model=job["model"], prompt=job["prompt"], max_tokens=job["max_tokens"],
                                    temperature=0, stream=True)
    got = 0
    for chunk in stream:
        got += 1
        if got >= job["after_chunks"]:
            break
    stream.close()
    out = {"chunks": got}
elif kind == "streams":  # concurrent streams, with the longest pause between two tokens of each
    import time

    import threading

    started = threading.Barrier(len(job["prompts"]), action=lambda: print('{"streaming": true}', flush=True))

    def stream(prompt):
        pieces, times, finish, error = [], [], None, None
        tokens, margins = [], []  # with "logprobs": each token and its lead over the runner-up
        extra = {"logprobs": 2} if job.get("logprobs") else {}
        try:
            for c in api.completions.create(model=job["model"], prompt=prompt, max_tokens=job["max_tokens"],
                                            temperature=0, stream=True, extra_body={"ignore_eos": True}, **extra):
                if c.choices:
                    pieces.append(c.choices[0].text)
                    times.append(time.monotonic())
                    finish = c.choices[0].finish_reason or finish
                    if extra and c.choices[0].logprobs:
                        tokens += c.choices[0].logprobs.tokens
                        for top in c.choices[0].logprobs.top_logprobs:
                            best = sorted(top.values(), reverse=True) + [float("-inf")]
                            margins.append(best[0] - best[1])
                if len(times) == 10:  # every stream is under way: say so (tests fault the cluster now)
                    started.wait(timeout=60)
        except openai.APIError as e:
            error = str(e)
        gaps = [b - a for a, b in zip(times, times[1:])]
        return {"text": "".join(pieces), "finish_reason": finish, "error": error, "max_gap": max(gaps, default=0),
                **({"tokens": tokens, "margins": margins} if extra else {})}

    with ThreadPoolExecutor(len(job["prompts"])) as pool:
        out = list(pool.map(stream, job["prompts"]))
elif kind == "raw":
    r = httpx.request(job["method"], base + job["path"], content=job.get("body"),
                      headers=job.get("headers", {}), timeout=60)
    out = {"status": r.status_code, "json": r.json() if r.headers.get("content-type", "").startswith(
        "application/json") else None}
else:
    raise SystemExit(f"unknown job {kind}")
print(json.dumps(out))
