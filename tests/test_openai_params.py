"""Every parameter of OpenAI's request schemas is honoured with an observable effect, documented as
having none on the text, or refused with a 400 naming it: never accepted and silently ignored."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
import torch

from p2pllm.model.sampling import Sampler, SamplingParams
from p2pllm.model.spec import resolve_spec
from p2pllm.runtime.api import GenerationRequest
from p2pllm.runtime.frames import MicroBatch, SeqStart
from p2pllm.transport import frames as wire_frames
from p2pllm.gateway.schema import NO_EFFECT_FIELDS, UNSUPPORTED_FIELDS, ignored_fields
from test_gateway import _error, _key, demo, stories  # noqa: F401  (fixtures)



def _ids(served, prompt_ids, max_tokens, sampling=SamplingParams()) -> list[int]:
    """The engine's own token ids for a request, without HTTP."""

    async def go():
        it = await served.engine.generate(GenerationRequest("ids", prompt_ids, max_tokens, sampling))
        return [e.token_id async for e in it if e.token_id is not None]

    return served.loop.run(go())


def _prompt(served) -> list[int]:
    return served.engine.tokenizer.encode("Once upon a time")


def _complete(served, **body) -> dict:
    with httpx.Client(base_url=served.url, timeout=60) as http:
        reply = http.post("/v1/completions", json={"prompt": _prompt(served), "temperature": 0, **body},
                          headers=_key(served))
    assert reply.status_code == 200, reply.text
    return reply.json()


# --------------------------------------------------------------------------- the sampler's arithmetic


def test_penalties_and_bias_follow_openais_formula():
    logits = torch.tensor([1.0, 3.0, 2.9, 0.5])
    s = Sampler(SamplingParams(frequency_penalty=0.5, presence_penalty=0.2, logit_bias=((3, 1.0),)), generated=(1, 1))
    # token 1 was generated twice: 3.0 - 2 * 0.5 - 0.2 = 1.8 < 2.9; token 3: 0.5 + 1.0 = 1.5
    assert s.sample(logits) == 2
    # now token 2 counts once: 2.9 - 0.5 - 0.2 = 2.2 > 1.8
    assert s.sample(logits) == 2
    # twice: 1.7 < 1.8
    assert s.sample(logits) == 1
    forced = Sampler(SamplingParams(logit_bias=((0, 100.0),)))
    assert [forced.sample(logits) for _ in range(3)] == [0, 0, 0]
    assert Sampler(SamplingParams()).sample(logits) == 1  # untouched without them


@pytest.mark.parametrize("bad", [dict(presence_penalty=2.5), dict(frequency_penalty=float("nan")),
                                 dict(logit_bias=((5, 101.0),)), dict(logit_bias=((5, 1.0), (5, 2.0))),
                                 dict(logit_bias=tuple((i, 1.0) for i in range(301)))])
def test_out_of_range_sampling_values_are_refused(bad):
    with pytest.raises(Exception, match="penalty|logit_bias"):
        SamplingParams(**bad).validate(vocab=512)


def test_penalties_cross_the_wire_with_the_tokens_they_count():
    spec = resolve_spec("llama-2-7b")
    params = SamplingParams(0.75, 5, 0.5, 42, presence_penalty=0.25, frequency_penalty=-1.5,
                            logit_bias=((3, -100.0), (17, 2.5)))
    mb = MicroBatch(1, 7, [], [], [SeqStart(9, 32, params, (3, 3, 17))], [])
    back, _ = wire_frames.decode(wire_frames.encode(mb), spec, epoch=1, context=64, first=True)
    assert back.starts == mb.starts
    frame = wire_frames.encode(mb)
    frame.starts[0].bias_ids[0] = spec.vocab  # outside the vocabulary
    with pytest.raises(wire_frames.FrameError, match=f"logit_bias token {spec.vocab}"):
        wire_frames.decode(frame, spec, epoch=1, context=64, first=True)
    frame = wire_frames.encode(mb)
    del frame.starts[0].bias_values[1]
    with pytest.raises(wire_frames.FrameError, match="2 token ids but 1 values"):
        wire_frames.decode(frame, spec, epoch=1, context=64, first=True)


# --------------------------------------------------------------------------- through the gateway


def test_logit_bias_forces_and_forbids_tokens_through_the_gateway(stories):
    PROMPT = _prompt(stories)
    base = _ids(stories, PROMPT, 6)
    forbid = {str(base[0]): -100}
    forbidden = _ids(stories, PROMPT, 6, SamplingParams(logit_bias=((base[0], -100.0),)))
    assert forbidden[0] != base[0]
    assert _complete(stories, max_tokens=6, logit_bias=forbid)["choices"][0]["text"] == \
        stories.direct(PROMPT, 6, SamplingParams(logit_bias=((base[0], -100.0),)))[0]
    forced = _ids(stories, PROMPT, 5, SamplingParams(logit_bias=((300, 100.0),)))
    assert forced == [300] * 5
    one = _complete(stories, max_tokens=1, logit_bias={"300": 100})["choices"][0]["text"]
    assert _complete(stories, max_tokens=5, logit_bias={"300": 100})["choices"][0]["text"] == one * 5


@pytest.mark.parametrize("field", ["frequency_penalty", "presence_penalty"])
def test_penalties_change_a_repetitive_answer_through_the_gateway(stories, field):
    PROMPT = _prompt(stories)
    base = _ids(stories, PROMPT, 64)
    penalized = _ids(stories, PROMPT, 64, SamplingParams(**{field: 2.0}))
    assert max(Counter(penalized).values()) < max(Counter(base).values()), (base, penalized)
    text = _complete(stories, max_tokens=64, **{field: 2.0})["choices"][0]["text"]
    assert text == stories.direct(PROMPT, 64, SamplingParams(**{field: 2.0}))[0] != \
        stories.direct(PROMPT, 64)[0]
    assert _complete(stories, max_tokens=64, **{field: 0})["choices"][0]["text"] == stories.direct(PROMPT, 64)[0]


@pytest.mark.parametrize("body, param", [
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": "a lot"}, "frequency_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
])
def test_bad_penalties_and_biases_are_400(stories, body, param):
    with httpx.Client(base_url=stories.url, timeout=30) as http:
        _error(http.post("/v1/completions", json={"prompt": "x", **body}), 400, param=param)


# --------------------------------------------------------------------------- the whole schema

# honoured: each has a test of its effect (here or in test_gateway.py)
HONOURED = {"messages", "prompt", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
            "stop", "stream_options", "presence_penalty", "frequency_penalty", "logit_bias",
            "response_format", "logprobs", "top_logprobs",  # test_structured_outputs.py, test_logprobs.py
            "tools", "tool_choice", "parallel_tool_calls",  # test_tools.py
            "n"}  # test_choices.py
# honoured at their default value only (any other value is refused: the cases below)
DEFAULT_ONLY = {"modalities": ["text", "audio"], "echo": True, "best_of": 2, "suffix": "end"}
REFUSED_WHEN_SET = {"audio": {"voice": "alloy", "format": "wav"}, "functions": [{"name": "f"}],
                    "function_call": "auto", "prediction": {"type": "content", "content": "x"},
                    "web_search_options": {}, "moderation": {}, "verbosity": "low", "reasoning_effort": "low"}
NO_EFFECT = {"user": "u-1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
             "prompt_cache_key": "k", "prompt_cache_retention": "in-memory", "prompt_cache_options": {},
             "safety_identifier": "s-1"}


def _openai_fields(module) -> set[str]:
    return set(module.CompletionCreateParamsBase.__annotations__)


def test_every_openai_request_field_is_classified():
    from openai.types import completion_create_params as completions
    from openai.types.chat import completion_create_params as chat

    known = HONOURED | set(DEFAULT_ONLY) | set(REFUSED_WHEN_SET) | set(NO_EFFECT)
    # a field the openai package adds later fails here until it is honoured or refused
    assert _openai_fields(chat) - known == set() and _openai_fields(completions) - known == set()
    assert set(NO_EFFECT) == set(NO_EFFECT_FIELDS) and set(REFUSED_WHEN_SET) == set(UNSUPPORTED_FIELDS)
    # and the gateway's own list of what it reads agrees: no OpenAI field is logged as ignored
    assert ignored_fields(dict.fromkeys(known | {"stream", "top_k", "ignore_eos"})) == []


def test_a_field_no_one_here_knows_is_accepted_and_named_once_in_the_log(demo, caplog):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    with httpx.Client(base_url=demo.url, timeout=60, headers=_key(demo)) as http, \
            caplog.at_level("WARNING", logger="p2pllm.gateway.app"):
        plain = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        for _ in range(3):  # llama.cpp's min_p, and a typo of max_tokens
            reply = http.post("/v1/chat/completions", json={**body, "min_p": 0.1, "max_token": 1})
            assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == plain
    named = [r.getMessage() for r in caplog.records if "ignoring request fields" in r.getMessage()]
    assert len(named) == 1 and "max_token, min_p" in named[0], named


@pytest.mark.parametrize("field", sorted({**DEFAULT_ONLY, **REFUSED_WHEN_SET}))
def test_a_field_this_server_does_not_do_is_a_400_naming_it(demo, field):
    value = {**DEFAULT_ONLY, **REFUSED_WHEN_SET}[field]
    route = "/v1/completions" if field in ("echo", "best_of", "suffix") else "/v1/chat/completions"
    body = {"prompt": "x"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=demo.url, timeout=30) as http:
        _error(http.post(route, json={**body, field: value, "max_tokens": 2}, headers=_key(demo)), 400, param=field)


def test_bookkeeping_fields_are_accepted_and_change_nothing(demo):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}
    with httpx.Client(base_url=demo.url, timeout=60, headers=_key(demo)) as http:
        plain = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        tagged = http.post("/v1/chat/completions", json={**body, **NO_EFFECT})
    assert tagged.status_code == 200 and tagged.json()["choices"][0]["message"]["content"] == plain


def test_a_seed_gives_the_same_sampled_text_however_the_model_is_split():
    from conftest import shared_model
    from p2pllm.runtime.local import LocalPipeline

    path = shared_model("SmolLM2-135M-Instruct.Q4_1.gguf")
    sampling = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    texts = []
    for cuts in ([], [7, 19]):
        pipe = LocalPipeline(str(path), cuts)
        prompt = pipe.tokenizer.encode_chat([{"role": "user", "content": "Tell me about the sea."}])
        texts.append(pipe.generate(prompt, max_tokens=20, sampling=sampling).ids)
        assert texts[-1] != pipe.generate(prompt, max_tokens=20, sampling=SamplingParams(0.9, 0, 0.95, 99)).ids
    assert texts[0] == texts[1]


def test_choices_and_penalties_through_the_openai_client_on_a_live_cluster(smol_cluster):
    client = smol_cluster.client()
    ask = dict(model=smol_cluster.model, messages=[{"role": "user", "content": "List some fruits."}], max_tokens=24,
               temperature=0)
    plain = client.chat.completions.create(**ask).choices[0].message.content
    two = client.chat.completions.create(**ask, n=2)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].message.content == \
        two.choices[1].message.content  # greedy: both choices from the one copied prompt agree
    penalized = client.chat.completions.create(**ask, frequency_penalty=2.0, presence_penalty=1.0)
    assert penalized.choices[0].message.content != plain
