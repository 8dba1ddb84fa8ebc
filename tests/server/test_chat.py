"""POST /v1/chat/completions on the real server, driven by the official openai SDK.

Prompt token counts are checked against transformers' own rendering of the chat template
(apply_chat_template(tokenize=True)) for every message shape and template option.
"""

from __future__ import annotations

import asyncio

import openai
import pytest
from _server import chat_prompt_ids, start_server

pytestmark = pytest.mark.timeout(120)  # start-up included

MODEL = "tiny-chat"
USER = [{"role": "user", "content": "Hello, how are you?"}]


@pytest.fixture(scope="module")
def server(tiny_llama):
    with start_server(tiny_llama, "--served-model-name", MODEL) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def chat(client, messages=USER, max_tokens=12, **kw):
    extra = kw.pop("extra_body", {})
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                          temperature=0, extra_body={"ignore_eos": True, **extra},
                                          **kw)


def test_greedy_chat_and_usage_equal_the_tokenizer(client, hf_tokenizer):
    r = chat(client)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    [c] = r.choices
    assert c.index == 0 and c.message.role == "assistant" and c.message.content
    assert c.finish_reason == "length"
    ids = chat_prompt_ids(hf_tokenizer, USER, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == len(ids) + 12
    assert chat(client).choices[0].message.content == c.message.content


def test_every_role_and_tool_calls_render_as_transformers_renders_them(client, hf_tokenizer):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather",
                                      "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
        {"role": "assistant", "content": "It is 21 degrees."},
        {"role": "user", "content": "Thanks!"},
    ]
    r = chat(client, messages, max_tokens=4)
    assert r.usage.prompt_tokens == len(chat_prompt_ids(hf_tokenizer, messages,
                                                        add_generation_prompt=True))
    assert r.usage.completion_tokens == 4


def test_text_parts_equal_string_content(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello, "},
                                          {"type": "text", "text": "how are you?"}]}]
    a, b = chat(client), chat(client, parts)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    assert a.choices[0].message.content == b.choices[0].message.content


def test_generation_prompt_and_continue_final_message(client, hf_tokenizer):
    r = chat(client, max_tokens=2, extra_body={"add_generation_prompt": False})
    assert r.usage.prompt_tokens == len(chat_prompt_ids(hf_tokenizer, USER,
                                                        add_generation_prompt=False))
    partial = USER + [{"role": "assistant", "content": "I am"}]
    r = chat(client, partial, max_tokens=2,
             extra_body={"add_generation_prompt": False, "continue_final_message": True})
    want = chat_prompt_ids(hf_tokenizer, partial, add_generation_prompt=False,
                           continue_final_message=True)
    assert r.usage.prompt_tokens == len(want)


def test_chat_template_kwargs_reach_the_template(client, hf_tokenizer):
    template = ("{{ greeting }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    r = chat(client, max_tokens=2, extra_body={"chat_template": template,
                                               "chat_template_kwargs": {"greeting": "Bonjour! "}})
    want = hf_tokenizer("Bonjour! " + USER[0]["content"], add_special_tokens=False).input_ids
    assert r.usage.prompt_tokens == len(want)


def test_tools_tool_choice_and_response_format_are_accepted(client, hf_tokenizer):
    tools = [{"type": "function",
              "function": {"name": "get_weather", "description": "Weather of a city",
                           "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}}]
    r = chat(client, max_tokens=3, tools=tools, tool_choice="auto")
    assert r.usage.prompt_tokens == len(chat_prompt_ids(hf_tokenizer, USER, tools=tools,
                                                        add_generation_prompt=True))
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")
    r = chat(client, max_tokens=3, response_format={"type": "json_object"})
    assert r.choices[0].message.role == "assistant"


def test_max_completion_tokens(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=5,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_logprobs_and_top_logprobs(client):
    r = chat(client, max_tokens=8, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 8
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.logprob <= 0 and item.bytes == list(item.token.encode())
        # greedy: the chosen token is the top one
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-5)
        assert [t.logprob for t in item.top_logprobs] == sorted(
            (t.logprob for t in item.top_logprobs), reverse=True)
    r = chat(client, max_tokens=3, logprobs=True)
    assert all(item.top_logprobs == [] for item in r.choices[0].logprobs.content)
    assert chat(client, max_tokens=3).choices[0].logprobs is None


def test_stream_equals_non_stream(client, hf_tokenizer):
    whole = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=24,
                                           temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, max_tokens=24,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert all(ch.usage is None and ch.object == "chat.completion.chunk" for ch in body)
    assert body[0].choices[0].delta.role == "assistant"
    assert all(ch.choices[0].delta.role is None for ch in body[1:])
    text = "".join(ch.choices[0].delta.content or "" for ch in body)
    assert text == whole.choices[0].message.content
    reasons = [ch.choices[0].finish_reason for ch in body if ch.choices[0].finish_reason]
    assert reasons == [whole.choices[0].finish_reason]
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens == len(
        chat_prompt_ids(hf_tokenizer, USER, add_generation_prompt=True))


def test_stream_logprobs_cover_every_token(client):
    chunks = list(chat(client, max_tokens=10, logprobs=True, top_logprobs=2, stream=True))
    items = [item for ch in chunks for c in ch.choices if c.logprobs
             for item in c.logprobs.content]
    whole = chat(client, max_tokens=10, logprobs=True, top_logprobs=2)
    assert [i.token for i in items] == [i.token for i in whole.choices[0].logprobs.content]


def test_async_n_streams_interleave_each_with_role_first_and_one_finish(server):
    kw = dict(model=MODEL, messages=USER, n=3, max_tokens=10, temperature=0.9, seed=7,
              extra_body={"ignore_eos": True})

    async def run():
        async with openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0,
                                      timeout=60) as ac:
            whole = await ac.chat.completions.create(**kw)
            stream = await ac.chat.completions.create(
                **kw, stream=True, stream_options={"include_usage": True})
            return whole, [ch async for ch in stream]

    whole, chunks = asyncio.run(run())
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    choices = [c for ch in chunks[:-1] for c in ch.choices]
    assert all(len(ch.choices) == 1 for ch in chunks[:-1])
    texts, finishes, seen = {}, {}, []
    for c in choices:
        if c.index not in texts:
            assert c.delta.role == "assistant", "the first chunk of a choice names the role"
            texts[c.index], finishes[c.index] = "", []
        else:
            assert c.delta.role is None
        texts[c.index] += c.delta.content or ""
        if c.finish_reason:
            finishes[c.index].append(c.finish_reason)
        seen.append(c.index)
    assert finishes == {0: ["length"], 1: ["length"], 2: ["length"]}
    first_finish = next(i for i, c in enumerate(choices) if c.finish_reason)
    assert set(seen[:first_finish]) == {0, 1, 2}
    assert [texts[i] for i in range(3)] == [c.message.content for c in whole.choices]
    assert len(set(texts.values())) > 1
    assert whole.usage.completion_tokens == 30


def test_sampling_fields_and_extras_are_applied(client, hf_tokenizer):
    base = chat(client, max_tokens=10).choices[0].message.content
    r = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=10, temperature=1.0, seed=1, top_p=0.9,
        extra_body={"top_k": 1, "ignore_eos": True, "min_p": 0.0, "repetition_penalty": 1.0,
                    "priority": 1})
    assert r.choices[0].message.content == base
    kw = dict(model=MODEL, messages=USER, max_tokens=10, temperature=1.0, user="u",
              extra_body={"ignore_eos": True})
    a = client.chat.completions.create(**kw, seed=99).choices[0].message.content
    b = client.chat.completions.create(**kw, seed=99).choices[0].message.content
    assert a == b
    eos = hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=10,
                                       temperature=0, logit_bias={str(eos): 100},
                                       extra_body={"min_tokens": 2})
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("stop", 3)
    r = chat(client, max_tokens=10, stop=["\x00"], presence_penalty=1.0, frequency_penalty=1.0,
             extra_body={"stop_token_ids": [eos], "skip_special_tokens": True,
                         "include_stop_str_in_output": False})
    assert r.usage.completion_tokens == 10
