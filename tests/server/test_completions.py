"""POST /v1/completions on the real server, driven by the official openai SDK (sync and async).

Everything runs greedy or seeded so that each assertion is exact: streaming equals
non-streaming, usage equals the transformers tokenizer's counts, and forcing a token with
logit_bias makes stops, EOS and special tokens deterministic.
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import openai
import pytest
from _server import start_server

pytestmark = pytest.mark.timeout(120)  # start-up included

MODEL = "tiny"
PROMPT = "The quick brown fox"
OTHER = "Paris is the capital of"


@pytest.fixture(scope="module")
def server(tiny_llama):
    with start_server(tiny_llama, "--served-model-name", MODEL) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture
def aclient(server):
    return openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)


def greedy(client, prompt=PROMPT, max_tokens=16, **kw):
    extra = kw.pop("extra_body", {})
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                     temperature=0, extra_body={"ignore_eos": True, **extra},
                                     **kw)


def tid(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == 1, (text, ids)
    return ids[0]


# --------------------------------------------------------------------------- basics, usage
def test_greedy_completion_and_usage_equal_the_tokenizer(client, hf_tokenizer):
    r = greedy(client, max_tokens=12, logprobs=0)
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    [c] = r.choices
    assert c.index == 0 and c.finish_reason == "length" and c.text
    assert r.usage.prompt_tokens == len(hf_tokenizer(PROMPT).input_ids)
    assert r.usage.completion_tokens == 12 == len(c.logprobs.tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert greedy(client, max_tokens=12).choices[0].text == c.text  # greedy is deterministic


def test_max_tokens_defaults_to_the_rest_of_the_context(client, server, hf_tokenizer):
    max_model_len = client.models.list().data[0].model_extra["max_model_len"]
    ids = (hf_tokenizer("Once upon a time, there was a little model. ").input_ids * 200)
    ids = ids[: max_model_len - 7]
    r = client.completions.create(model=MODEL, prompt=ids, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == 7
    assert r.choices[0].finish_reason == "length"


def test_every_prompt_form_gives_the_same_greedy_text(client, hf_tokenizer):
    ids = hf_tokenizer(PROMPT).input_ids
    texts = [greedy(client, prompt=p, max_tokens=8).choices[0].text
             for p in (PROMPT, [PROMPT], ids, [ids])]
    assert len(set(texts)) == 1, texts


def test_several_prompts_with_n_number_choices_prompt_major(client, hf_tokenizer):
    single = [greedy(client, prompt=p, max_tokens=6).choices[0].text for p in (PROMPT, OTHER)]
    ids = hf_tokenizer(OTHER).input_ids
    r = greedy(client, prompt=[PROMPT, OTHER], n=2, max_tokens=6)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [single[0], single[0], single[1], single[1]]
    assert r.usage.prompt_tokens == len(hf_tokenizer(PROMPT).input_ids) + len(ids)
    assert r.usage.completion_tokens == 4 * 6
    r = greedy(client, prompt=[hf_tokenizer(PROMPT).input_ids, ids], max_tokens=6)
    assert [c.text for c in r.choices] == single


# --------------------------------------------------------------------------- streaming
def test_stream_equals_non_stream_with_usage_last(client, hf_tokenizer):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                                      logprobs=1)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24,
                                            temperature=0, logprobs=1, stream=True,
                                            stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert all(ch.usage is None for ch in body)
    assert all(len(ch.choices) == 1 and ch.choices[0].index == 0 for ch in body)
    assert len({ch.id for ch in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    assert "".join(ch.choices[0].text for ch in body) == whole.choices[0].text
    reasons = [ch.choices[0].finish_reason for ch in body if ch.choices[0].finish_reason]
    assert reasons == [whole.choices[0].finish_reason]
    assert body[-1].choices[0].finish_reason is not None
    streamed_tokens = sum(len(ch.choices[0].logprobs.tokens) for ch in body)
    assert streamed_tokens == last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens \
        == len(hf_tokenizer(PROMPT).input_ids)
    assert last.usage.total_tokens == whole.usage.total_tokens


def test_stream_is_server_sent_events_ending_in_done(server):
    with httpx.stream("POST", f"{server.v1}/completions", timeout=60,
                      json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3,
                            "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[len("data: "):])["object"] == "text_completion"
               for e in events[:-1])


def test_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(greedy(client, max_tokens=4, stream=True))
    assert all(ch.choices and ch.usage is None for ch in chunks)


def test_async_streams_of_n_interleave_and_each_index_finishes_once(server, aclient):
    kw = dict(model=MODEL, prompt=[PROMPT, OTHER], n=2, max_tokens=10, temperature=0.9,
              seed=11, extra_body={"ignore_eos": True})

    async def run():
        async with aclient:
            whole = await aclient.completions.create(**kw)
            stream = await aclient.completions.create(**kw, stream=True)
            return whole, [ch async for ch in stream]

    whole, chunks = asyncio.run(run())
    order = [c.index for ch in chunks for c in ch.choices]
    assert set(order) == {0, 1, 2, 3}
    texts = {i: "" for i in range(4)}
    finishes = {i: [] for i in range(4)}
    first_finish = None
    for pos, c in enumerate(c for ch in chunks for c in ch.choices):
        texts[c.index] += c.text
        if c.finish_reason:
            finishes[c.index].append(c.finish_reason)
            first_finish = pos if first_finish is None else first_finish
    assert finishes == {i: ["length"] for i in range(4)}
    # Interleaved: every index has streamed something before the first one finishes.
    assert set(order[:first_finish + 1]) == {0, 1, 2, 3}
    # The same seeds give the same samples, streamed or not.
    assert [texts[i] for i in range(4)] == [c.text for c in whole.choices]
    assert len({c.text for c in whole.choices}) > 1  # seed + i per sample, not one seed


def test_stream_with_echo_starts_with_the_prompt(client):
    whole = greedy(client, max_tokens=5)
    chunks = list(greedy(client, max_tokens=5, echo=True, stream=True))
    assert chunks[0].choices[0].text.startswith(PROMPT)
    assert "".join(ch.choices[0].text for ch in chunks) == PROMPT + whole.choices[0].text


# --------------------------------------------------------------------------- logprobs, echo
def test_logprobs_top_k_and_offsets(client):
    r = greedy(client, max_tokens=10, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 10
    assert len(lp.text_offset) == 10 and lp.text_offset[0] == 0
    for a, b, tok in zip(lp.text_offset, lp.text_offset[1:], lp.tokens):
        assert b == a + len(tok)
    for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        # (a dict by text: tokens that decode alike, e.g. to U+FFFD, share one key)
        assert chosen <= 0 and 1 <= len(top) <= 4 and tok in top
        # greedy: no token is more likely than the chosen one
        assert chosen >= max(top.values()) - 1e-5


def test_echo_with_logprobs_covers_prompt_and_completion(client, hf_tokenizer):
    n_prompt = len(hf_tokenizer(PROMPT).input_ids)
    plain = greedy(client, max_tokens=4).choices[0].text
    r = greedy(client, max_tokens=4, echo=True, logprobs=1)
    c = r.choices[0]
    assert c.text == PROMPT + plain
    assert len(c.logprobs.tokens) == n_prompt + 4
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    assert all(isinstance(x, float) for x in c.logprobs.token_logprobs[1:])
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens == 4


def test_prompt_logprobs_extra(client, hf_tokenizer):
    r = greedy(client, max_tokens=2, extra_body={"prompt_logprobs": 2})
    plp = r.choices[0].model_extra.get("prompt_logprobs")
    assert plp is not None, "prompt_logprobs was asked for but not returned"
    assert len(plp) == len(hf_tokenizer(PROMPT).input_ids)
    assert plp[0] is None and all(p for p in plp[1:])


# --------------------------------------------------------------------------- stopping
def test_stop_strings_cut_the_text(client):
    base = greedy(client, max_tokens=32).choices[0].text
    words = [m for m in re.finditer(r"[A-Za-z]{3,}", base) if m.start() > 0]
    assert words, f"no stop candidate in {base!r}"
    stop = words[0].group()
    cut = base.find(stop)
    r = greedy(client, max_tokens=32, stop=stop).choices[0]
    assert (r.text, r.finish_reason, r.model_extra["stop_reason"]) == (base[:cut], "stop", stop)
    r = greedy(client, max_tokens=32, stop=["\x00never\x00", stop]).choices[0]
    assert r.text == base[:cut] and r.finish_reason == "stop"
    r = greedy(client, max_tokens=32, stop=stop,
               extra_body={"include_stop_str_in_output": True}).choices[0]
    assert r.text == base[:cut + len(stop)]
    streamed = "".join(ch.choices[0].text
                       for ch in greedy(client, max_tokens=32, stop=stop, stream=True))
    assert streamed == base[:cut]


def test_logit_bias_forces_a_token_and_stop_token_ids_stop_on_it(client, hf_tokenizer):
    hello = tid(hf_tokenizer, "Hello")
    r = greedy(client, max_tokens=5, logit_bias={str(hello): 100})
    assert r.choices[0].text == "Hello" * 5
    r = greedy(client, max_tokens=5, logit_bias={str(hello): 100},
               extra_body={"stop_token_ids": [hello], "ignore_eos": False})
    c = r.choices[0]
    assert (c.finish_reason, c.model_extra["stop_reason"]) == ("stop", hello)
    assert r.usage.completion_tokens == 1


def test_eos_min_tokens_and_ignore_eos(client, hf_tokenizer):
    eos = hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    bias = {str(eos): 100}
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, logit_bias=bias)
    r = client.completions.create(**kw)
    assert (r.choices[0].finish_reason, r.usage.completion_tokens, r.choices[0].text) \
        == ("stop", 1, "")
    r = client.completions.create(**kw, extra_body={"min_tokens": 4})
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("stop", 5)
    r = client.completions.create(**kw, extra_body={"ignore_eos": True})
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 10)


def test_skip_special_tokens(client, hf_tokenizer):
    start = hf_tokenizer.convert_tokens_to_ids("<|im_start|>")
    kw = dict(max_tokens=3, logit_bias={str(start): 100})
    assert greedy(client, **kw).choices[0].text == ""
    text = greedy(client, **kw, extra_body={"skip_special_tokens": False}).choices[0].text
    assert text.count("<|im_start|>") == 3


# --------------------------------------------------------------------------- sampling
def test_filters_that_keep_one_token_reduce_to_greedy(client):
    base = greedy(client, max_tokens=12).choices[0].text
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12,
                                      temperature=1.0, seed=3,
                                      extra_body={"ignore_eos": True, **extra})
        assert r.choices[0].text == base, extra
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0,
                                  top_p=1e-6, seed=3, extra_body={"ignore_eos": True})
    assert r.choices[0].text == base


def test_seed_reproducibility_and_n(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0,
              extra_body={"ignore_eos": True}, user="tester-1")
    a = client.completions.create(**kw, seed=1234).choices[0].text
    b = client.completions.create(**kw, seed=1234).choices[0].text
    c = client.completions.create(**kw, seed=4321).choices[0].text
    assert a == b and a != c
    r = client.completions.create(**kw, seed=5, n=3)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert len({ch.text for ch in r.choices}) > 1
    assert r.usage.completion_tokens == 3 * 16


def test_penalties_change_a_repetitive_greedy_output(client):
    base = greedy(client, max_tokens=48, logprobs=0)
    tokens = base.choices[0].logprobs.tokens
    assert len(set(tokens)) < len(tokens), "the greedy output should repeat some token"
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0},
               {"extra_body": {"repetition_penalty": 3.0}}):
        r = greedy(client, max_tokens=48, **kw)
        assert r.choices[0].text != base.choices[0].text, kw


def test_priority_and_other_extras_are_accepted(client):
    r = greedy(client, max_tokens=3, user="someone",
               extra_body={"priority": 5, "spaces_between_special_tokens": False})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
