"""Everything around the two OpenAI endpoints: models and aliases, health, version, metrics,
tokenize/detokenize, the legacy /generate API, X-Request-Id, prefix-cache usage, and the
`tokenmill complete` / `tokenmill chat` terminal clients.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid

import httpx
import openai
import pytest
import requests
from _server import REPO, chat_prompt_ids, metric, server_env, start_server, wait_idle

import tokenmill

pytestmark = pytest.mark.timeout(120)  # start-up included

NAME, ALIAS = "tiny-llama", "tiny-alias"
PROMPT = "The quick brown fox"
USER = [{"role": "user", "content": "Hello, how are you?"}]
# Long enough to fill several KV blocks (16 tokens each), so a repeat hits the prefix cache.
LONG = " ".join(["Large language models predict the next token given the previous tokens."] * 8)


@pytest.fixture(scope="module")
def server(tiny_llama):
    with start_server(tiny_llama, "--served-model-name", NAME, ALIAS) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def unique_prompt() -> str:
    return f"{uuid.uuid4().hex[:8]} {PROMPT}"


# --------------------------------------------------------------------------- models, names
def test_models_lists_the_served_names_first_first(client, tiny_llama):
    models = client.models.list().data
    assert [m.id for m in models][0] == NAME
    assert {m.id for m in models} <= {NAME, ALIAS}
    m = models[0]
    assert m.object == "model" and m.owned_by
    assert m.model_extra["max_model_len"] == 512 and m.model_extra["root"] == tiny_llama
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


@pytest.mark.parametrize("name", [NAME, ALIAS, None])
def test_every_alias_is_served_and_the_first_is_reported(server, client, name):
    body = {"prompt": PROMPT, "max_tokens": 2}
    if name is not None:
        body["model"] = name
    r = httpx.post(f"{server.v1}/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == NAME
    r = client.chat.completions.create(model=name or NAME, messages=USER, max_tokens=2)
    assert r.model == NAME


def test_unknown_model_is_404(client):
    for call in (lambda: client.completions.create(model="gpt-4", prompt="hi", max_tokens=1),
                 lambda: client.chat.completions.create(model="gpt-4", messages=USER,
                                                        max_tokens=1)):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.status_code == 404
        assert e.value.body["type"] and e.value.body["message"]


# --------------------------------------------------------------------------- misc routes
def test_health_and_version(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    r = httpx.get(f"{server.url}/version")
    assert r.status_code == 200 and r.json() == {"version": tokenmill.__version__}


def test_tokenize_detokenize_round_trip_non_ascii(server, hf_tokenizer):
    text = "café 日本語 🙂"
    r = httpx.post(f"{server.url}/tokenize", json={"model": ALIAS, "prompt": text,
                                                    "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == hf_tokenizer(text).input_ids
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 512
    assert body["token_strs"] == hf_tokenizer.convert_ids_to_tokens(body["tokens"])
    r = httpx.post(f"{server.url}/detokenize", json={"model": NAME, "tokens": body["tokens"]})
    assert r.status_code == 200 and r.json() == {"prompt": text}


def test_tokenize_messages_counts_the_chat_prompt(server, client, hf_tokenizer):
    r = httpx.post(f"{server.url}/tokenize", json={"messages": USER})
    want = chat_prompt_ids(hf_tokenizer, USER, add_generation_prompt=True)
    assert r.status_code == 200 and r.json()["tokens"] == want
    usage = client.chat.completions.create(model=NAME, messages=USER, max_tokens=1).usage
    assert usage.prompt_tokens == r.json()["count"]


# --------------------------------------------------------------------------- request ids
def test_x_request_id_is_echoed_and_names_the_completion(client):
    rid = f"trace-{uuid.uuid4().hex[:12]}"
    raw = client.completions.with_raw_response.create(
        model=NAME, prompt=PROMPT, max_tokens=2, extra_headers={"X-Request-Id": rid})
    assert raw.headers["x-request-id"] == rid and rid in raw.parse().id
    raw = client.chat.completions.with_raw_response.create(
        model=NAME, messages=USER, max_tokens=2, extra_headers={"X-Request-Id": rid})
    assert raw.headers["x-request-id"] == rid and rid in raw.parse().id
    raw = client.completions.with_raw_response.create(model=NAME, prompt=PROMPT, max_tokens=2)
    assert raw.headers.get("x-request-id")  # a fresh one when the client sends none


def test_concurrent_requests_may_share_an_x_request_id(server):
    """A client id is a label (retries and proxies reuse them), not a key to collide on."""
    async def run():
        async with openai.AsyncOpenAI(base_url=server.v1, api_key="unused",
                                      max_retries=0, timeout=60) as ac:
            return await asyncio.gather(*[
                ac.completions.create(model=NAME, prompt=PROMPT, max_tokens=32,
                                      extra_body={"ignore_eos": True},
                                      extra_headers={"X-Request-Id": "shared-id"})
                for _ in range(3)])

    results = asyncio.run(run())
    assert [r.usage.completion_tokens for r in results] == [32, 32, 32]


# --------------------------------------------------------------------------- prefix cache
def test_repeated_long_prompt_reports_cached_tokens(server, client, hf_tokenizer):
    n_prompt = len(hf_tokenizer(LONG).input_ids)
    assert n_prompt > 64
    first = client.completions.create(model=NAME, prompt=LONG, max_tokens=2)
    before = server.metrics()
    again = client.completions.create(model=NAME, prompt=LONG, max_tokens=2)
    after = server.metrics()
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens == again.usage.prompt_tokens == n_prompt
    assert 0 < cached < n_prompt and cached % 16 == 0
    hits = metric(after, "tokenmill:prefix_cache_hits_total") \
        - metric(before, "tokenmill:prefix_cache_hits_total")
    assert hits == cached
    chunks = list(client.completions.create(model=NAME, prompt=LONG, max_tokens=2, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached
    messages = [{"role": "user", "content": LONG}]
    client.chat.completions.create(model=NAME, messages=messages, max_tokens=2)
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=2)
    assert r.usage.prompt_tokens_details.cached_tokens > 0


# --------------------------------------------------------------------------- metrics
METRIC_SAMPLES = [
    "tokenmill:num_requests_running", "tokenmill:kv_cache_usage_perc",
    "tokenmill:prompt_tokens_total", "tokenmill:generation_tokens_total",
    "tokenmill:request_success_total", "tokenmill:time_to_first_token_seconds_count",
    "tokenmill:e2e_request_latency_seconds_count", "tokenmill:request_queue_time_seconds_count",
    "tokenmill:inter_token_latency_seconds_count", "tokenmill:iteration_tokens_total_count",
    "tokenmill:prefix_cache_queries_total", "tokenmill:prefix_cache_hits_total",
    "tokenmill:num_preemptions_total",
]


def _delta(before, after, name, **labels):
    return metric(after, name, **labels) - metric(before, name, **labels)


def test_metrics_names_labels_and_exact_counter_moves(server, client, hf_tokenizer):
    prompt = unique_prompt()
    before = server.metrics()
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=16,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    after = wait_idle(server)
    r = httpx.get(f"{server.url}/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    for name in METRIC_SAMPLES:
        labels = after.get(name, {})
        assert labels, f"{name} is missing"
        assert all(dict(lab).get("model_name") == NAME for lab in labels), name
    usage = chunks[-1].usage
    assert usage.prompt_tokens == len(hf_tokenizer(prompt).input_ids)
    assert _delta(before, after, "tokenmill:prompt_tokens_total") == usage.prompt_tokens
    assert _delta(before, after, "tokenmill:generation_tokens_total") == 16
    assert _delta(before, after, "tokenmill:request_success_total",
                  finished_reason="length") == 1
    assert _delta(before, after, "tokenmill:request_success_total") == 1
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds"):
        assert _delta(before, after, f"tokenmill:{hist}_count") == 1, hist
    assert _delta(before, after, "tokenmill:inter_token_latency_seconds_count") == 15
    # Every computed token counted once: the prompt, then one per decode step.
    assert _delta(before, after, "tokenmill:iteration_tokens_total_sum") \
        == usage.prompt_tokens + 15
    assert _delta(before, after, "tokenmill:prefix_cache_queries_total") >= 0
    assert metric(after, "tokenmill:num_requests_running") == 0
    assert metric(after, "tokenmill:kv_cache_usage_perc") == 0


def test_latency_metrics_of_a_non_streaming_request_measure_tokens(server, client):
    """TTFT is the first token's time and ITL is per token, whether or not the client streams."""
    before = server.metrics()
    r = client.completions.create(model=NAME, prompt=unique_prompt(), max_tokens=64,
                                  temperature=0, extra_body={"ignore_eos": True})
    after = wait_idle(server)
    assert r.usage.completion_tokens == 64
    assert _delta(before, after, "tokenmill:inter_token_latency_seconds_count") == 63
    ttft = _delta(before, after, "tokenmill:time_to_first_token_seconds_sum")
    e2e = _delta(before, after, "tokenmill:e2e_request_latency_seconds_sum")
    assert ttft < e2e / 2, (ttft, e2e)


def test_finish_reasons_are_counted_by_label(server, client, hf_tokenizer):
    eos = hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    before = server.metrics()
    client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0,
                              logit_bias={str(eos): 100})
    after = wait_idle(server)
    assert _delta(before, after, "tokenmill:request_success_total", finished_reason="stop") == 1
    assert _delta(before, after, "tokenmill:request_success_total",
                  finished_reason="length") == 0


# --------------------------------------------------------------------------- legacy API
def test_legacy_generate_whole_and_streamed(server, client):
    fields = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}
    want = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    r = requests.post(f"{server.url}/generate", json={"prompt": PROMPT, **fields}, timeout=60)
    assert r.status_code == 200 and r.json() == {"text": [PROMPT + want]}
    # As vLLM's api_client / gradio examples read it: one JSON object per line, text so far.
    r = requests.post(f"{server.url}/generate", json={"prompt": PROMPT, "stream": True, **fields},
                      stream=True, timeout=60)
    assert r.status_code == 200
    frames = [json.loads(line.decode("utf-8"))
              for line in r.iter_lines(chunk_size=8192, decode_unicode=False, delimiter=b"\n")
              if line]
    texts = [f["text"][0] for f in frames]
    assert len(texts) >= 2 and texts[-1] == PROMPT + want
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    r = requests.post(f"{server.url}/generate",
                      json={"prompt": PROMPT, "n": 2, "max_tokens": 4, "temperature": 0},
                      timeout=60)
    assert r.status_code == 200 and len(r.json()["text"]) == 2


# --------------------------------------------------------------------------- CLI clients
def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenmill.cli", *args], input=stdin,
                          capture_output=True, text=True, encoding="utf-8", cwd=REPO,
                          env=server_env(PYTHONIOENCODING="utf-8"), timeout=120)


def test_cli_complete_prints_the_streamed_text(server, client):
    want = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8,
                                     temperature=0).choices[0].text
    p = _cli("complete", "--url", server.url, "--max-tokens", "8", "--temperature", "0", PROMPT)
    assert p.returncode == 0, p.stderr
    assert p.stdout == want + "\n"


def test_cli_chat_reads_stdin_and_prints_a_reply(server, client):
    want = client.chat.completions.create(model=NAME, messages=USER, max_tokens=8,
                                          temperature=0).choices[0].message.content
    p = _cli("chat", "--url", server.url, "--max-tokens", "8", "--temperature", "0",
             stdin=USER[0]["content"] + "\n")
    assert p.returncode == 0, p.stderr
    assert NAME in p.stdout and want in p.stdout
