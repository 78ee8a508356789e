"""/v1/embeddings over real HTTP against the real in-process engine, and the pieces it rides on.

The reference is Hugging Face `transformers`: its LlamaModel's `last_hidden_state` (after the
final norm), mean-pooled over the tokens and L2-normalized, on the same random weights written as
an HF folder and as a GGUF file. Both backends, one stage and split pipelines, inputs longer than
a prefill chunk; the official `openai` client for both encodings; the 4xx of bad inputs; the
result frames and the Embed RPC that carry vectors between peers, checked on arrival.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import time

import httpx
import numpy as np
import openai
import pytest
import torch

from p2pllm.errors import P2PError
from p2pllm.gateway.app import create_app
from p2pllm.gateway.server import serve_gateway
from p2pllm.model.sampling import Sampled, SamplingParams
from p2pllm.model.tokenizer import load_tokenizer
from p2pllm.runtime.api import GenerationRequest
from p2pllm.runtime.frames import Chunk, MicroBatch, Pooled, SeqStart
from p2pllm.runtime.local import LocalPipeline
from p2pllm.runtime.pooling import PoolError
from p2pllm.transport import frames
from p2pllm.transport.frames import FrameError
from conftest import LoopThread

TEXTS = [
    "Hello world, this is a test.",
    "a",
    "The quick brown fox jumps over the lazy dog. " * 30,  # > 256 tokens: two prefill chunks
]


class Served:
    """A pipeline's engine behind a real gateway on loopback."""

    def __init__(self, loop: LoopThread, pipe: LocalPipeline, **engine_kw):
        self.loop, self.pipe = loop, pipe

        async def start():
            engine = pipe.engine(**engine_kw)
            await engine.start()
            return engine, await serve_gateway(create_app(engine), "127.0.0.1", 0)

        self.engine, self.server = loop.run(start())
        self.url = self.server.url
        self.model = self.engine.model_name

    def post(self, body: dict) -> httpx.Response:
        return httpx.post(self.url + "/v1/embeddings", content=json.dumps(body),
                          headers={"content-type": "application/json"}, timeout=120)

    def embed(self, inputs, **extra) -> list[np.ndarray]:
        r = self.post({"model": self.model, "input": inputs, **extra})
        assert r.status_code == 200, r.text
        return [np.array(d["embedding"], dtype=np.float32) for d in r.json()["data"]]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def close(self):
        self.loop.run(self.server.stop())
        self.loop.run(self.engine.stop())
        self.pipe.ring.close()


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    return transformers


@pytest.fixture(scope="module")
def reference(hf_model, demo_tiny_hf):
    """transformers' embedding of token ids: last_hidden_state (after the final norm), mean, L2."""
    model = hf_model.AutoModel.from_pretrained(str(demo_tiny_hf), torch_dtype=torch.float32).eval()

    def embed(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            states = model(torch.tensor([ids])).last_hidden_state[0]
        return torch.nn.functional.normalize(states.mean(0), dim=0).numpy()

    return embed


@pytest.fixture(scope="module")
def hf_served(loop, demo_tiny_hf):
    served = Served(loop, LocalPipeline(str(demo_tiny_hf)))
    yield served
    served.close()


def _close(a: np.ndarray, b: np.ndarray, tol: float = 1e-4) -> None:
    assert a.shape == b.shape
    assert float(np.abs(a - b).max()) < tol, float(np.abs(a - b).max())
    assert float(a @ b) > 1 - tol


# --------------------------------------------------------------------------- against transformers


def test_embeddings_equal_transformers_on_an_hf_folder(hf_served, reference):
    tok = hf_served.pipe.tokenizer
    ids = [tok.encode(t) for t in TEXTS]
    assert len(ids[2]) > 256 and ids[1][0] == tok.bos_id  # tokenized as completions are: with BOS
    r = hf_served.post({"model": hf_served.model, "input": TEXTS, "user": "someone"})
    assert r.status_code == 200, r.text
    body = r.json()
    n = sum(map(len, ids))
    assert body["object"] == "list" and body["model"] == hf_served.model
    assert body["usage"] == {"prompt_tokens": n, "total_tokens": n}
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", i) for i in range(3)]
    for d, seq in zip(body["data"], ids):
        got = np.array(d["embedding"], dtype=np.float32)
        assert got.shape == (hf_served.pipe.spec.hidden,)
        assert abs(float(np.linalg.norm(got)) - 1) < 1e-5
        _close(got, reference(seq))
    # token ids (one list, or lists) are the same inputs
    by_ids = hf_served.embed(ids)
    for a, b in zip(by_ids, (np.array(d["embedding"], dtype=np.float32) for d in body["data"])):
        _close(a, b, 1e-6)
    _close(hf_served.embed(ids[0])[0], by_ids[0], 1e-6)
    _close(hf_served.embed(TEXTS[0])[0], by_ids[0], 1e-6)


@pytest.mark.parametrize("cuts", [None, [2]], ids=["one-stage", "split"])
def test_a_gguf_of_the_same_weights_on_ggml_equals_transformers(loop, demo_tiny_gguf, demo_tiny_hf, reference, cuts):
    pipe = LocalPipeline(str(demo_tiny_gguf), cuts, kv_dtype="f32")  # f32 KV: like for like with transformers
    assert pipe.backend == "ggml" and len(pipe.stages) == (2 if cuts else 1)
    served = Served(loop, pipe)
    try:
        ids = [pipe.tokenizer.encode(t) for t in TEXTS]
        hf_tokenizer = load_tokenizer(demo_tiny_hf)
        assert ids == [hf_tokenizer.encode(t) for t in TEXTS]  # the reference is fed the same ids
        for got, seq in zip(served.embed(TEXTS), ids):
            _close(got, reference(seq))
    finally:
        served.close()


def test_stories_on_ggml_equals_torch_one_stage_and_split(loop, stories_gguf):
    texts = ["Once upon a time", "Lily and Ben went to the park. " * 12]
    got = {}
    for name, kw in (("ggml", {}), ("ggml-split", {"cuts": [2]}), ("torch", {"backend": "torch"}),
                     ("torch-split", {"backend": "torch", "cuts": [3]})):
        cuts = kw.pop("cuts", None)
        served = Served(loop, LocalPipeline(str(stories_gguf), cuts, kv_dtype="f32", **kw))
        try:
            got[name] = served.embed(texts)
        finally:
            served.close()
    for name in ("ggml-split", "torch", "torch-split"):
        for a, b in zip(got[name], got["ggml"]):
            _close(a, b)


# --------------------------------------------------------------------------- the openai client


def test_the_openai_client_gets_the_same_floats_as_float_and_as_base64(hf_served):
    client = hf_served.client()
    floats = client.embeddings.create(model=hf_served.model, input=TEXTS[:2], encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1] and floats.usage.prompt_tokens > 0
    raw = client.embeddings.create(model=hf_served.model, input=TEXTS[:2], encoding_format="base64")
    for f, b in zip(floats.data, raw.data):
        assert isinstance(b.embedding, str)
        decoded = np.frombuffer(base64.b64decode(b.embedding), dtype="<f4")
        assert np.array_equal(decoded, np.array(f.embedding, dtype=np.float32))
    default = client.embeddings.create(model=hf_served.model, input=TEXTS[:2])  # the client asks base64, decodes
    assert [np.array(d.embedding, dtype=np.float32).tolist() for d in default.data] == \
        [np.array(d.embedding, dtype=np.float32).tolist() for d in floats.data]


# --------------------------------------------------------------------------- chunks and batches


def test_an_input_longer_than_a_prefill_chunk_equals_one_chunk(loop, demo_tiny_hf):
    small = Served(loop, LocalPipeline(str(demo_tiny_hf), [3]), prefill_chunk=16)
    whole = Served(loop, LocalPipeline(str(demo_tiny_hf), [3]), prefill_chunk=1024)
    try:
        text = TEXTS[2]
        assert len(small.pipe.tokenizer.encode(text)) > 16 * 10
        for a, b in zip(small.embed([text, "short"]), whole.embed([text, "short"])):
            _close(a, b, 1e-5)
    finally:
        small.close()
        whole.close()


def test_inputs_share_micro_batches_with_generation_and_free_their_kv(loop, demo_tiny_gguf):
    """Several inputs in one micro-batch beside a generating sequence, whose tokens are unchanged;
    afterwards no stage holds KV, a pool or a sampler for anything."""
    pipe = LocalPipeline(str(demo_tiny_gguf), [3], kv_dtype="f32")
    served = Served(loop, pipe)
    engine, batches = served.engine, []
    try:
        run = pipe.ring.run

        async def recording(mb):  # what each micro-batch carried (the ring itself runs as always)
            batches.append((list(mb.chunks), {s.seq_id for s in mb.starts if s.embed}))
            return await run(mb)

        pipe.ring.run = recording
        prompt = pipe.tokenizer.encode("Once upon a time")

        async def generate():
            events = await engine.generate(GenerationRequest("g", prompt, 24, SamplingParams(), (), True))
            return [e.token_id async for e in events if e.token_id is not None]

        solo = loop.run(generate())
        alone = served.embed(TEXTS[:2] * 3)

        async def both():
            return await asyncio.gather(generate(), engine.embed([pipe.tokenizer.encode(t) for t in TEXTS[:2] * 3]))

        tokens, vectors = loop.run(both())
        assert tokens == solo
        for a, b in zip(vectors, alone):
            _close(a.numpy(), b, 1e-5)
        embedded = set().union(*(e for _, e in batches))
        assert any(len([c for c in chunks if c.seq_id in embedded]) >= 2 for chunks, _ in batches)
        assert any({c.seq_id for c in chunks} & embedded and {c.seq_id for c in chunks} - embedded
                   for chunks, _ in batches)
        loop.run(asyncio.sleep(0.2))  # the frees ride the next micro-batch
        assert engine.stats().running == engine.stats().queued == 0
        for stage in pipe.stages:
            assert stage.kv.sequences() == [] and not stage.pools and not stage.samplers and not stage.embeddings
    finally:
        served.close()


def test_a_chat_after_a_large_embeddings_request_is_not_held_back_for_its_whole_prefill(loop, demo_tiny_gguf):
    """Prompts take turns by request: a chat's prompt goes into the first micro-batch built after it
    arrives, though an earlier embeddings request still has many chunks of prefill to go."""
    pipe = LocalPipeline(str(demo_tiny_gguf), kv_dtype="f32")
    served = Served(loop, pipe)
    engine, batches = served.engine, []
    try:
        run = pipe.ring.run

        async def recording(mb):  # per micro-batch: the generations it starts
            batches.append({st.seq_id for st in mb.starts if not st.embed})
            return await run(mb)

        pipe.ring.run = recording
        inputs = [[(7 * i + j) % 200 + 3 for j in range(300)] for i in range(16)]  # 4,800 tokens: 10 batches

        async def chat_while_embedding():
            embedding = asyncio.ensure_future(engine.embed(inputs))
            while not batches:
                await asyncio.sleep(0.001)
            built = len(batches)
            events = await engine.generate(GenerationRequest("g", pipe.tokenizer.encode("Once upon a time"), 1,
                                                             SamplingParams(), (), True))
            got = [e.token_id async for e in events if e.token_id is not None]
            first = next(i for i, started in enumerate(batches) if started)
            await embedding
            return built, first, got

        built, first, got = loop.run(chat_while_embedding())
        assert len(got) == 1
        # at most the micro-batch in flight when it arrived comes first, then its own
        assert first <= built + 1, (built, first, len(batches))
        assert len(batches) >= first + 5, "the embeddings should still have had most of their prefill to go"
    finally:
        served.close()


def test_an_embedding_caught_by_a_plan_change_is_computed_again_from_its_start(loop, demo_tiny_gguf):
    """Its pooled sum lived on the old last stage: after resume() the sequence is announced again
    (the new last stage pools from position 0) and recomputed, never carried over halfway."""
    pipe = LocalPipeline(str(demo_tiny_gguf), [2], kv_dtype="f32")
    engine = pipe.engine(prefill_chunk=8)
    run, landed, armed = pipe.ring.run, [], []

    async def pausing(mb):  # a plan change begins while the long input is half prefilled
        out = await run(mb)
        landed.append(mb)
        if armed and len(landed) == 2:
            engine.pause("a test's plan change")
        return out

    pipe.ring.run = pausing
    ids = pipe.tokenizer.encode(TEXTS[2])[:60]

    async def go():
        await engine.start()
        try:
            expected = (await engine.embed([ids]))[0]
            landed.clear()
            armed.append(True)
            job = asyncio.ensure_future(engine.embed([ids]))
            while engine.paused is None:
                await asyncio.sleep(0.01)
            await engine.drain(10)
            assert engine.resume_points() == []  # nothing to carry over: it starts again
            engine.resume("the next epoch", {})
            return expected, (await job)[0]
        finally:
            await engine.stop()

    try:
        expected, got = loop.run(go())
        assert torch.allclose(expected, got, atol=1e-6)
        starts = [s for mb in landed for s in mb.starts if s.embed]
        assert len(starts) == 2 and [c.start for c in landed[2].chunks] == [0]  # announced again, from 0
    finally:
        pipe.ring.close()


def test_a_client_that_leaves_cancels_its_inputs_on_every_stage(loop, demo_tiny_gguf):
    pipe = LocalPipeline(str(demo_tiny_gguf), [3])
    served = Served(loop, pipe)
    try:
        body = {"input": [[5 + i % 7] * 200 for i in range(400)]}  # ~20 s of work here; the client waits 1
        with pytest.raises(httpx.TimeoutException):
            httpx.post(served.url + "/v1/embeddings", json=body, timeout=1)
        left = time.monotonic()

        async def idle() -> bool:
            stats = served.engine.stats()
            return stats.running == stats.queued == stats.extra["in_flight"] == 0

        while not loop.run(idle()) and time.monotonic() < left + 10:
            time.sleep(0.1)
        loop.run(asyncio.sleep(0.2))  # the frees ride the next micro-batch
        assert loop.run(idle()), served.engine.stats()
        assert all(stage.kv.sequences() == [] and not stage.embeddings for stage in pipe.stages)
        assert served.embed("still serving")[0].shape == (pipe.spec.hidden,)
    finally:
        served.close()


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("body, param, code", [
    ({"input": []}, "input", "empty_array"),
    ({"input": ""}, "input", "invalid_value"),
    ({"input": ["fine", ""]}, "input", "invalid_value"),
    ({"input": [[]]}, "input", "invalid_value"),
    ({"input": [1, 2, 99999]}, "input", "invalid_value"),
    ({"input": [[1, 2], [-1]]}, "input", "invalid_value"),
    ({"input": "word " * 3000}, "input", "context_length_exceeded"),
    ({"input": [[1] * 2049]}, "input", "context_length_exceeded"),
    ({"input": "x", "model": "gpt-4"}, "model", "model_not_found"),
    ({"input": "x", "model": 3}, "model", "invalid_type"),
    ({"input": "x", "dimensions": 64}, "dimensions", "unsupported_parameter"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "invalid_value"),
    ({"input": 5}, "input", "invalid_type"),
    ({"input": [1.5]}, "input", "invalid_type"),
    ({"input": [True]}, "input", "invalid_type"),
    ({"input": ["a", 1]}, "input", "invalid_type"),
    ({"input": [{"text": "a"}]}, "input", "invalid_type"),
    ({"input": ["a"] * 2049}, "input", "invalid_value"),
    ({"input": [[1] * 2000] * 151}, "input", "invalid_value"),  # 302,000 tokens: OpenAI's cap is 300,000
    ({}, "input", "missing_required_parameter"),
], ids=lambda v: json.dumps(v)[:40] if isinstance(v, dict) else str(v))
def test_bad_inputs_are_a_400_naming_the_param(hf_served, body, param, code):
    r = hf_served.post(body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error"), err
    assert err["message"]


def test_every_field_of_openais_request_is_handled():
    from openai.types.embedding_create_params import EmbeddingCreateParams

    from p2pllm.gateway.embeddings import FIELDS

    assert set(EmbeddingCreateParams.__annotations__) == set(FIELDS)


def test_malformed_bodies_and_methods(hf_served):
    assert httpx.post(hf_served.url + "/v1/embeddings", content=b"{nope").status_code == 400
    assert httpx.post(hf_served.url + "/v1/embeddings", content=b'{"input": NaN}').status_code == 400
    assert httpx.get(hf_served.url + "/v1/embeddings").status_code == 405
    assert hf_served.post({"input": ["ok"] * 2048, "encoding_format": "base64"}).status_code == 200


# --------------------------------------------------------------------------- on the wire


def _vector(hidden: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(hidden, generator=torch.Generator().manual_seed(seed)), dim=0)


def test_result_frames_carry_vectors_beside_tokens_and_check_them():
    hidden, vocab = 16, 100
    answers = [Sampled(5), Pooled(7, _vector(hidden, 1)), Sampled(9, -0.5, ((9, -0.5), (3, -2.0))),
               Pooled(11, _vector(hidden, 2))]
    frame = frames.result_frame(4, 12, answers)
    got = frames.decode_result(frame, vocab, [1, 7, 3, 11], hidden)
    assert [type(a) for a in got] == [Sampled, Pooled, Sampled, Pooled]
    assert got[0] == Sampled(5) and got[2] == answers[2]
    assert got[1].seq_id == 7 and torch.equal(got[1].vector, answers[1].vector)
    # a frame of tokens only decodes as before
    assert frames.decode_result(frames.result_frame(4, 13, [Sampled(1)]), vocab, [2], hidden) == [Sampled(1)]

    def refused(mutate, answering=(1, 7, 3, 11), size=hidden):
        f = frames.result_frame(4, 12, answers)
        mutate(f)
        with pytest.raises(FrameError):
            frames.decode_result(f, vocab, list(answering), size)

    refused(lambda f: None, answering=(1, 7, 3))  # one answer too many
    refused(lambda f: None, answering=(1, 7, 3, 12))  # 11 does not answer in this micro-batch
    refused(lambda f: None, size=hidden + 1)  # the model's hidden size differs
    refused(lambda f: f.pooled_seqs.__setitem__(1, 7))  # a sequence twice
    refused(lambda f: f.pooled.__setattr__("dtype", "float16"))
    refused(lambda f: f.pooled.__setattr__("data", f.pooled.data[:-4]))
    refused(lambda f: f.pooled.__setattr__("data", f.pooled.data[:-4] + np.float32(math.nan).tobytes()))
    refused(lambda f: f.pooled.__setattr__("data", f.pooled.data[:-4] + np.float32(math.inf).tobytes()))
    refused(lambda f: f.pooled.__setattr__("data", (np.frombuffer(f.pooled.data, "<f4") * 2).tobytes()))  # not unit
    unpooled = frames.result_frame(4, 12, [Sampled(5)])
    unpooled.pooled.CopyFrom(frame.pooled)
    with pytest.raises(FrameError):
        frames.decode_result(unpooled, vocab, [1], hidden)


def test_the_embed_flag_travels_with_a_sequence_start(demo_tiny_gguf):
    from p2pllm.model.spec import read_spec

    spec = read_spec(demo_tiny_gguf)
    mb = MicroBatch(1, 1, [Chunk(3, 0, 2, True)], [1, 2], [SeqStart(3, 2, SamplingParams(), (), True)])
    got, _ = frames.decode(frames.encode(mb), spec, 1, spec.context, True)
    assert got.starts[0].embed and got.starts == mb.starts
    # a result frame's fields are refused on the way to a stage
    wrong = frames.encode(mb)
    wrong.pooled_seqs.append(3)
    with pytest.raises(FrameError):
        frames.decode(wrong, spec, 1, spec.context, True)


def test_a_pooled_chunk_that_skips_positions_is_refused_before_any_work(demo_tiny_gguf):
    pipe = LocalPipeline(str(demo_tiny_gguf), kv_dtype="f32")
    stage = pipe.stages[0]
    try:
        start = SeqStart(5, 12, SamplingParams(), (), True)
        assert stage.process(MicroBatch(0, 1, [Chunk(5, 0, 4, False)], [1, 2, 3, 4], [start])) == []
        with pytest.raises(PoolError):
            stage.process(MicroBatch(0, 2, [Chunk(5, 6, 2, True)], [5, 6]))
        assert stage.kv.length(5) == 4 and stage.pools[5].count == 4
        (answer,) = stage.process(MicroBatch(0, 3, [Chunk(5, 4, 2, True)], [5, 6], finished=[5]))
        assert isinstance(answer, Pooled) and answer.seq_id == 5 and 5 not in stage.kv and not stage.pools
        assert issubclass(PoolError, P2PError)  # the ring refuses the frame, the daemon goes on
    finally:
        pipe.ring.close()


def test_the_embed_rpc_forwards_to_the_coordinators_engine(loop, demo_tiny_gguf):
    """A gateway on a peer that is not the coordinator: its ClusterEngine calls Embed on a real gRPC
    server whose handler is the coordinator's side (serve_embed over a real scheduler)."""
    import socket

    from p2pllm.runtime.api import EngineError, EngineStats
    from p2pllm.runtime.cluster_engine import ClusterEngine, serve_embed
    from p2pllm.transport.client import ClientPool
    from p2pllm.transport.security import Security
    from p2pllm.transport.server import start_server

    pipe = LocalPipeline(str(demo_tiny_gguf), kv_dtype="f32")
    scheduler = pipe.engine()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"

    class Coordinator:  # the daemon's handler, as far as Embed goes
        async def on_embed(self, req):
            return await serve_embed(scheduler, req, pipe.spec.hidden)

    clients = ClientPool(Security.insecure())
    remote = ClusterEngine(model_name="tiny.gguf", context=pipe.spec.context, tokenizer=pipe.tokenizer,
                           clients=clients, local=lambda: None, coordinator_address=lambda: address,
                           not_ready=lambda: "", stats=EngineStats, spec=pipe.spec)

    async def setup():
        await scheduler.start()
        return await start_server(Coordinator(), "127.0.0.1", int(address.rsplit(":", 1)[1]), Security.insecure()), \
            await serve_gateway(create_app(remote), "127.0.0.1", 0)

    server, gateway = loop.run(setup())
    try:
        ids = [pipe.tokenizer.encode(t) for t in TEXTS]
        direct = loop.run(scheduler.embed(ids))
        forwarded = loop.run(remote.embed(ids))
        assert all(torch.equal(a, b) for a, b in zip(direct, forwarded))
        r = httpx.post(gateway.url + "/v1/embeddings", json={"input": TEXTS, "model": "tiny.gguf"}, timeout=60)
        assert r.status_code == 200, r.text
        for d, v in zip(r.json()["data"], direct):
            assert d["embedding"] == v.tolist()
        # the coordinator's refusals come back as the engine's errors (the gateway's 4xx)
        with pytest.raises(EngineError) as e:
            loop.run(remote.embed([[1] * (pipe.spec.context + 1)]))
        assert (e.value.status, e.value.code) == (400, "context_length_exceeded")
        with pytest.raises(EngineError) as e:
            loop.run(remote.embed([[1, 2], []]))
        assert e.value.status == 400 and "input 1" in str(e.value)
    finally:
        loop.run(gateway.stop())
        loop.run(server.stop(None))
        loop.run(clients.close())
        loop.run(scheduler.stop())
        pipe.ring.close()


def test_the_openai_client_embeds_through_a_live_two_peer_cluster(smol_cluster):
    client = smol_cluster.client()
    texts = ["The capital of France is Paris.", "Paris is France's capital.", "Bananas are yellow."]
    data = client.embeddings.create(model=smol_cluster.model, input=texts).data
    vectors = [np.array(d.embedding, dtype=np.float64) for d in data]
    assert [d.index for d in data] == [0, 1, 2] and all(abs(np.linalg.norm(v) - 1) < 1e-4 for v in vectors)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]  # the paraphrase is nearer than the banana
