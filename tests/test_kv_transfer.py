"""KV moves between stages in every KV precision, through the wire's checks: from a replica held by
the ring successor, from the previous owner over FetchKV, and from a stage's own previous cache.
A stage rebuilt that way continues with exactly the tokens of an uninterrupted run; KV in another
format is refused (those positions are replayed instead)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from p2pllm.model.backends import open_stage
from p2pllm.model.batch import SeqChunk
from p2pllm.model.spec import read_spec
from p2pllm.proto import p2pllm_pb2 as pb
from p2pllm.runtime.recovery import restore_kv, serve_fetch
from p2pllm.runtime.replica import ReplicaStore, exported
from p2pllm.runtime.stage import Stage
from p2pllm.transport import frames

PROMPT = [1, 17, 300, 42, 99, 5, 61, 400]
CUT, SEQ, BEFORE, AFTER = 3, 7, 6, 10  # stages [0, 3) and [3, 6); the fault after 6 decoded tokens


def stage(model, a, b, kv, backend="ggml"):
    return Stage(open_stage(model, a, b, kv_dtype=kv, backend=backend))


def decode(stages: list[Stage], ids: list[int], pos: int, n: int) -> tuple[list[int], int]:
    """n greedy tokens continuing a sequence whose next input is `ids` at position `pos`."""
    out = []
    for _ in range(n):
        h = torch.tensor(ids)
        for st in stages:
            h = st.step(h, [SeqChunk(SEQ, pos, len(ids))])
        pos += len(ids)
        ids = [int(h[-1].argmax())]
        out.append(ids[0])
    return out, pos


def wire(kv) -> pb.KVDelta:
    """Through the bytes the network carries, and back through the receiver's checks."""
    return pb.KVDelta.FromString(frames.encode_kv(kv).SerializeToString())


@pytest.fixture(scope="module")
def model(demo_tiny_gguf):
    return demo_tiny_gguf  # head size 32: every KV precision applies


@pytest.mark.parametrize("source", ["replica", "previous owner", "own cache"])
@pytest.mark.parametrize("kv", ["f16", "q8_0", "f32"])
def test_a_rebuilt_stage_continues_with_identical_tokens(model, kv, source):
    spec = read_spec(model)
    reference, _ = decode([stage(model, 0, spec.n_layers, kv)], PROMPT, 0, BEFORE + AFTER)

    first, lost = stage(model, 0, CUT, kv), stage(model, CUT, spec.n_layers, kv)
    got, pos = decode([first, lost], PROMPT, 0, BEFORE)
    replicas = ReplicaStore(spec, spec.context)
    previous = None
    if source == "replica":  # streamed to the successor step by step; here: the whole history at once
        replicas.add(wire(exported(lost.kv, lost.start, SEQ, 0, pos)))
    elif source == "own cache":  # the same peer keeps these layers in the new plan
        previous = lost

    async def fetch(address: str, req: pb.FetchKVRequest) -> list[pb.KVDelta]:
        assert address == "owner:1"
        return [pb.KVDelta.FromString(d.SerializeToString()) for d in serve_fetch(req, lost, replicas)]

    sources = [pb.KVSource(start=CUT, end=spec.n_layers, owner_address="owner:1")] if source == "previous owner" else []
    fresh = stage(model, CUT, spec.n_layers, kv)
    rebuilt = asyncio.run(restore_kv(fresh, previous, replicas, [pb.ResumeSeq(seq_id=SEQ, positions=pos)], sources,
                                     fetch, spec, spec.context, "me:1"))
    assert rebuilt == {SEQ: pos}
    more, _ = decode([first, fresh], [got[-1]], pos, AFTER)
    assert got + more == reference


def test_kv_of_another_format_is_refused_and_left_to_replay(model):
    spec = read_spec(model)
    lost = stage(model, CUT, spec.n_layers, "q8_0")
    h = torch.randn(len(PROMPT), spec.hidden)
    lost.step(h, [SeqChunk(SEQ, 0, len(PROMPT))])
    replicas = ReplicaStore(spec, spec.context)
    replicas.add(wire(exported(lost.kv, lost.start, SEQ, 0, len(PROMPT))))
    fresh = stage(model, CUT, spec.n_layers, "f16")
    rebuilt = asyncio.run(restore_kv(fresh, None, replicas, [pb.ResumeSeq(seq_id=SEQ, positions=len(PROMPT))], [],
                                     None, spec, spec.context, "me:1"))
    assert rebuilt == {SEQ: 0} and SEQ not in fresh.kv


def test_torch_and_ggml_stages_do_not_mix_kv_layouts(model):
    """Same model, both backends, both f32: K rows differ in rope layout, so nothing is imported."""
    spec = read_spec(model)
    ggml_stage, torch_stage = stage(model, 0, CUT, "f32"), stage(model, 0, CUT, "f32", backend="torch")
    assert ggml_stage.kv.format != torch_stage.kv.format
    ggml_stage.step(torch.tensor(PROMPT), [SeqChunk(SEQ, 0, len(PROMPT))])
    replicas = ReplicaStore(spec, spec.context)
    replicas.add(wire(exported(ggml_stage.kv, 0, SEQ, 0, len(PROMPT))))
    rebuilt = asyncio.run(restore_kv(torch_stage, None, replicas, [pb.ResumeSeq(seq_id=SEQ, positions=len(PROMPT))],
                                     [], None, spec, spec.context, "me:1"))
    assert rebuilt == {SEQ: 0}


@pytest.mark.parametrize("corrupt", ["format", "row bytes", "layers"])
def test_malformed_kv_deltas_are_refused_by_the_checks(model, corrupt):
    spec = read_spec(model)
    st = stage(model, 0, CUT, "q8_0")
    st.step(torch.tensor(PROMPT), [SeqChunk(SEQ, 0, len(PROMPT))])
    delta = wire(exported(st.kv, 0, SEQ, 0, len(PROMPT)))
    if corrupt == "format":
        delta.format = "q4_0/pairs"
    elif corrupt == "row bytes":
        delta.data.shape[3] += 1
    else:
        delta.first_layer = spec.n_layers - 1
    with pytest.raises(frames.FrameError):
        frames.decode_kv(delta, spec, spec.context)
