"""`POST /v1/embeddings` in OpenAI's shape, computed by the cluster.

Each input is tokenized as a completion prompt is (the model's BOS default), prefilled through
every stage as a sequence of its own, and answered by the last stage with its final hidden
states after the final norm, mean-pooled over its tokens and L2-normalized (`Engine.embed`).
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..runtime.api import MAX_EMBED_INPUTS, MAX_EMBED_TOKENS, Engine, EngineError
from .generation import refuse_text_beyond_context
from .responses import CLIENT_GONE, JSON
from .schema import ApiError, bad, parse_json_object, short

ENCODING_FORMATS = ("float", "base64")
# every field of OpenAI's request, each checked below (a test compares it with the openai package's)
FIELDS = ("input", "model", "encoding_format", "dimensions", "user")
_TEXT_IN_THREAD = 16_384  # characters in all: more are tokenized off the event loop


@dataclass(frozen=True)
class EmbeddingRequest:
    """A checked /v1/embeddings body: texts, or token id lists inside the vocabulary (not empty)."""

    inputs: list[str] | list[list[int]]
    encoding_format: str = "float"


def parse_embedding_request(body: dict, *, model_name: str, vocab_size: int | None) -> EmbeddingRequest:
    """Check `body` against the served model; the first field at fault is the ApiError raised."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("Invalid type for 'model': expected a string.", "model", "invalid_type")
    if model is not None and model != model_name:
        raise bad(f"The model '{short(model)}' does not exist; this server serves '{model_name}'.", "model",
                  "model_not_found")
    if body.get("dimensions") is not None:  # the vector is the model's hidden state: it has one size
        raise bad("'dimensions' is not supported by this server: embeddings have the model's hidden size.",
                  "dimensions", "unsupported_parameter")
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ENCODING_FORMATS:
        raise bad(f"Invalid value for 'encoding_format': {short(repr(fmt))}; supported values are 'float' and "
                  "'base64'.", "encoding_format", "invalid_value")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("Invalid type for 'user': expected a string.", "user", "invalid_type")
    return EmbeddingRequest(_inputs(body.get("input"), vocab_size), fmt or "float")


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _inputs(value: Any, vocab_size: int | None) -> list[str] | list[list[int]]:
    """OpenAI's four forms: a string, strings, token ids, lists of token ids; none empty."""
    if value is None:
        raise bad("Missing required parameter: 'input'.", "input", "missing_required_parameter")
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, list) and value and all(_is_id(t) for t in value):
        value = [value]  # one input given as token ids
    if not isinstance(value, list):
        raise bad("Invalid type for 'input': expected a string, an array of strings, an array of token ids or an "
                  "array of arrays of token ids.", "input", "invalid_type")
    if not value:
        raise bad("'input' must not be an empty array.", "input", "empty_array")
    if len(value) > MAX_EMBED_INPUTS:
        raise bad(f"'input' may hold at most {MAX_EMBED_INPUTS} inputs, got {len(value)}.", "input",
                  "invalid_value")
    if all(isinstance(v, str) for v in value):
        empty = next((i for i, v in enumerate(value) if not v), None)
        if empty is not None:
            raise bad(f"'input[{empty}]' is an empty string; every input must have some text.", "input",
                      "invalid_value")
        return value
    if all(isinstance(v, list) and all(_is_id(t) for t in v) for v in value):
        for i, ids in enumerate(value):
            if not ids:
                raise bad(f"'input[{i}]' is an empty array of token ids.", "input", "invalid_value")
            outside = next((t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)), None)
            if outside is not None:
                raise bad(f"Token id {outside} in 'input[{i}]' is outside the vocabulary "
                          f"(0 to {vocab_size - 1 if vocab_size else '?'}).", "input", "invalid_value")
        return value
    raise bad("Invalid type for 'input': expected a string, an array of strings, an array of token ids or an array "
              "of arrays of token ids (not a mix).", "input", "invalid_type")


async def _token_ids(engine: Engine, inputs: list[str] | list[list[int]]) -> list[list[int]]:
    if not inputs or not isinstance(inputs[0], str):
        return [list(ids) for ids in inputs]
    encode = engine.tokenizer.encode

    def tokenize() -> list[list[int]]:
        return [encode(text) for text in inputs]

    return await asyncio.to_thread(tokenize) if sum(map(len, inputs)) > _TEXT_IN_THREAD else tokenize()


async def embedding_of(engine: Engine, text: str | list[int], request_id: str = "embed"):
    """One text's (or token ids') vector, as /v1/embeddings computes it (float32 numpy, unit length);
    EngineError when the engine cannot (an input beyond the context: 400)."""
    ids = (await _token_ids(engine, [text] if isinstance(text, str) else [list(text)]))[0]
    if not ids:
        raise EngineError("the input has no tokens")
    return (await engine.embed([ids], request_id))[0].numpy()


async def embeddings(engine: Engine, metrics: Any, request: Request, body: dict) -> Response:
    """The answer to one /v1/embeddings body."""
    request_id = request.scope.get("state", {}).get("request_id", "embed")
    req = parse_embedding_request(body, model_name=engine.model_name,
                                  vocab_size=getattr(engine.tokenizer, "vocab_size", None))
    for i, text in enumerate(req.inputs):  # text that cannot fit is refused before the GIL-holding tokenizer
        if isinstance(text, str):
            refuse_text_beyond_context(engine, len(text), "input", what=f"input[{i}]")
    ids = await _token_ids(engine, req.inputs)
    for i, seq in enumerate(ids):  # the whole input is embedded or none of it: never truncated
        if not seq:
            raise bad(f"'input[{i}]' has no tokens.", "input", "invalid_value")
        if len(seq) > engine.context:
            raise ApiError(400, f"This model's maximum context length is {engine.context} tokens; input[{i}] has "
                                f"{len(seq)} tokens.", param="input", code="context_length_exceeded")
    if sum(map(len, ids)) > MAX_EMBED_TOKENS:
        raise bad(f"The inputs have {sum(map(len, ids))} tokens in all; at most {MAX_EMBED_TOKENS} may be embedded "
                  "in one request.", "input", "invalid_value")
    try:
        vectors = await unless_client_leaves(request, engine.embed(ids, request_id))
    except EngineError as e:
        raise ApiError(e.status, str(e), code=e.code, param="input" if e.status < 500 else None) from None
    if vectors is None:
        return Response(status_code=CLIENT_GONE)
    n_tokens = sum(map(len, ids))
    metrics.prompt_tokens.inc(n_tokens)
    data = [{"object": "embedding", "index": i, "embedding": _encoded(v, req.encoding_format)}
            for i, v in enumerate(vectors)]
    return JSON({"object": "list", "data": data, "model": engine.model_name,
                 "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})


async def unless_client_leaves(request: Request, work: Awaitable[Any]) -> Any:
    """`work`'s result; None when the HTTP client leaves first (the work is cancelled: a large
    request's inputs stop running on the cluster)."""
    job = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({job, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        job.cancel()  # (a no-op once it is done)
        await asyncio.gather(watch, job, return_exceptions=True)
    return job.result() if not job.cancelled() else None


def _encoded(vector, fmt: str) -> list[float] | str:
    """A float32 vector as JSON numbers, or (base64, as OpenAI) its little-endian float32 bytes."""
    if fmt == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
    return vector.tolist()


def embeddings_route(gateway: Any, read_body: Callable[[Request, int], Awaitable[bytes]]) -> Route:
    """POST /v1/embeddings for a gateway (its engine, metrics and body limit)."""

    async def endpoint(request: Request) -> Response:
        body = parse_json_object(await read_body(request, gateway.max_body_bytes))
        return await embeddings(gateway.engine, gateway.metrics, request, body)

    return Route("/v1/embeddings", endpoint, methods=["POST"])
