"""Bad requests, table-driven: each gets the right 4xx and OpenAI's error envelope
{"error": {"message", "type", "param", "code"}}, never a 500 or a traceback, and the server
stays healthy.

The server runs under a 2 GiB address-space limit: a request the server fails to bound (a huge
n) then ends in an error instead of eating the test machine's memory. (Not with a CUDA build of
torch: its libraries alone map more than that, and a CUDA context reserves far more.)
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from _server import assert_error_envelope, start_server

pytestmark = pytest.mark.timeout(120)  # start-up included

MODEL = "tiny"
GiB = 1 << 30
MAX_LEN = 512  # the tiny checkpoints' max_position_embeddings

CMPL = {"model": MODEL, "prompt": "hi", "max_tokens": 4}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
HUGE = 10**30  # past what an int64 holds
MEMORY_LIMIT = 2 * GiB if torch.version.cuda is None else None


@pytest.fixture(scope="module")
def server(tiny_llama):
    with start_server(tiny_llama, "--served-model-name", MODEL,
                      memory_limit=MEMORY_LIMIT) as srv:
        yield srv


def cmpl(**kw):
    return ("POST", "/v1/completions", {**CMPL, **kw})


def chat(**kw):
    return ("POST", "/v1/chat/completions", {**CHAT, **kw})


def raw(path: str, body: bytes):
    return ("POST", path, body)


def gen(**kw):
    return ("POST", "/generate", {"prompt": "hi", "max_tokens": 4, **kw})


# (id, (method, path, body), status). A dict body is sent as JSON; bytes are sent as they are.
CASES = [
    # --- out-of-range sampling values
    ("temperature<0", cmpl(temperature=-1), 400),
    ("chat temperature<0", chat(temperature=-0.5), 400),
    ("top_p=0", cmpl(top_p=0), 400),
    ("chat top_p>1", chat(top_p=1.5), 400),
    ("n=0", cmpl(n=0), 400),
    ("chat n<0", chat(n=-1), 400),
    ("max_tokens=0", cmpl(max_tokens=0), 400),
    ("chat max_tokens<0", chat(max_tokens=-5), 400),
    ("max_completion_tokens=0", chat(max_completion_tokens=0), 400),
    ("presence_penalty>2", cmpl(presence_penalty=3), 400),
    ("frequency_penalty<-2", chat(frequency_penalty=-3), 400),
    ("repetition_penalty=0", cmpl(repetition_penalty=0), 400),
    ("top_k<-1", cmpl(top_k=-5), 400),
    ("min_p>1", chat(min_p=2), 400),
    ("min_tokens>max_tokens", cmpl(min_tokens=10, max_tokens=4), 400),
    ("seed out of int64", cmpl(seed=2**70), 400),
    ("stop empty string", cmpl(stop=[""]), 400),
    ("logit_bias value", cmpl(logit_bias={"5": 500}), 400),
    ("logit_bias key not an id", cmpl(logit_bias={"abc": 1}), 400),
    ("logit_bias key out of vocab", chat(logit_bias={"99999": 5}), 400),
    ("logprobs>20", cmpl(logprobs=21), 400),
    ("logprobs<0", cmpl(logprobs=-1), 400),
    ("prompt_logprobs>20", cmpl(prompt_logprobs=21), 400),
    ("prompt_logprobs<0", cmpl(prompt_logprobs=-1), 400),
    ("top_logprobs without logprobs", chat(top_logprobs=2), 400),
    ("top_logprobs>20", chat(logprobs=True, top_logprobs=21), 400),
    ("suffix unsupported", cmpl(suffix="x"), 400),
    ("best_of unsupported", cmpl(best_of=3), 400),
    # --- wrong types for known fields
    ("temperature string", cmpl(temperature="hot"), 400),
    ("n string", cmpl(n="x"), 400),
    ("max_tokens string", chat(max_tokens="ten"), 400),
    ("max_tokens fractional", cmpl(max_tokens=1.5), 400),
    ("messages string", chat(messages="hi"), 400),
    ("stop number", cmpl(stop=5), 400),
    ("seed string", cmpl(seed="abc"), 400),
    ("priority string", cmpl(priority="high"), 400),
    ("stop_token_ids strings", cmpl(stop_token_ids=["a"]), 400),
    ("chat logprobs list", chat(logprobs=[1]), 400),
    ("content number", chat(messages=[{"role": "user", "content": 5}]), 400),
    ("message without role", chat(messages=[{"content": "hi"}]), 400),
    ("response_format string", chat(response_format="json"), 400),
    ("prompt dict", cmpl(prompt={"text": "hi"}), 400),
    # --- huge values
    ("max_tokens 1e12", cmpl(max_tokens=10**12), 400),
    ("chat max_tokens 1e12", chat(max_tokens=10**12), 400),
    ("top_k past int64", cmpl(top_k=HUGE), 400),
    ("priority past int64", cmpl(priority=HUGE), 400),
    ("stop_token_ids past int64", cmpl(stop_token_ids=[HUGE]), 400),
    ("logit_bias key past int64", cmpl(logit_bias={str(HUGE): 1}), 400),
    # --- streaming requests are validated before the stream starts (a 4xx, not an SSE frame)
    ("stream temperature<0", cmpl(stream=True, temperature=-1), 400),
    ("chat stream top_p=0", chat(stream=True, top_p=0), 400),
    ("stream prompt longer than context", cmpl(stream=True, prompt=[5] * (MAX_LEN + 1)), 400),
    ("chat stream unknown model", chat(stream=True, model="gpt-4"), 404),
    ("stream top_k past int64", cmpl(stream=True, top_k=HUGE), 400),
    ("chat stream priority past int64", chat(stream=True, priority=HUGE), 400),
    # --- context length
    ("prompt ids longer than context", cmpl(prompt=[5] * (MAX_LEN + 50)), 400),
    ("prompt text longer than context", cmpl(prompt="hello " * 2000), 400),
    ("chat prompt longer than context",
     chat(messages=[{"role": "user", "content": "hello " * 2000}]), 400),
    ("prompt exactly the context", cmpl(prompt=[5] * MAX_LEN, max_tokens=None), 400),
    ("max_tokens beyond context", cmpl(max_tokens=MAX_LEN), 400),
    ("chat max_tokens beyond context", chat(max_tokens=MAX_LEN), 400),
    # --- prompts and messages that are empty or invalid
    ("empty prompt", cmpl(prompt=""), 400),
    ("empty prompt list", cmpl(prompt=[]), 400),
    ("empty token list", cmpl(prompt=[[]]), 400),
    ("empty string in list", cmpl(prompt=["hi", ""]), 400),
    ("out-of-vocab token id", cmpl(prompt=[1, 999999]), 400),
    ("negative token id", cmpl(prompt=[[1, -1]]), 400),
    ("empty messages", chat(messages=[]), 400),
    ("bad role", chat(messages=[{"role": "wizard", "content": "hi"}]), 400),
    ("image content part", chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), 400),
    ("text part without text", chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": 5}]}]), 400),
    # --- bodies that are not JSON objects
    ("malformed JSON", raw("/v1/completions", b'{"prompt": "hi",'), 400),
    ("chat malformed JSON", raw("/v1/chat/completions", b'{"messages": [}'), 400),
    ("body is a list", raw("/v1/completions", b'[1, 2]'), 400),
    ("body is a string", raw("/v1/chat/completions", b'"hello"'), 400),
    ("empty body", raw("/v1/completions", b""), 400),
    ("invalid UTF-8", raw("/v1/completions", b'{"prompt": "\xff\xfe", "max_tokens": 2}'), 400),
    ("chat invalid UTF-8", raw("/v1/chat/completions",
                               b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}'), 400),
    # --- routes, methods, models
    ("unknown route", ("POST", "/v1/nothing", CMPL), 404),
    ("unknown GET route", ("GET", "/nothing", None), 404),
    ("GET completions", ("GET", "/v1/completions", None), 405),
    ("DELETE models", ("DELETE", "/v1/models", None), 405),
    ("unknown model", cmpl(model="gpt-4"), 404),
    ("chat unknown model", chat(model="gpt-4"), 404),
    ("retrieve unknown model", ("GET", "/v1/models/gpt-4", None), 404),
    # --- tokenize, detokenize, legacy generate
    ("tokenize neither prompt nor messages", ("POST", "/tokenize", {}), 400),
    ("tokenize unknown model", ("POST", "/tokenize", {"model": "x", "prompt": "hi"}), 404),
    ("detokenize out of vocab", ("POST", "/detokenize", {"tokens": [1, 999999]}), 400),
    ("detokenize strings", ("POST", "/detokenize", {"tokens": "abc"}), 400),
    ("generate malformed JSON", raw("/generate", b'{"prompt": '), 400),
    ("generate list body", raw("/generate", b'["hi"]'), 400),
    ("generate without prompt", ("POST", "/generate", {"max_tokens": 4}), 400),
    ("generate temperature<0", gen(temperature=-1), 400),
    ("generate max_tokens string", gen(max_tokens="x"), 400),
    ("generate n string", gen(n="x"), 400),
    ("generate prompt longer than context", gen(prompt="hello " * 2000), 400),
]


def _send(server, method, path, body) -> httpx.Response:
    url = f"{server.url}{path}"
    if isinstance(body, bytes):
        return httpx.request(method, url, content=body, timeout=60,
                             headers={"content-type": "application/json"})
    if body is None:
        return httpx.request(method, url, timeout=60)
    body = {k: v for k, v in body.items() if v is not None}
    return httpx.request(method, url, content=json.dumps(body), timeout=60,
                         headers={"content-type": "application/json"})


@pytest.mark.timeout(90)
@pytest.mark.parametrize("request_, status", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_gets_the_error_envelope(server, request_, status):
    assert len(CASES) >= 30
    r = _send(server, *request_)
    assert_error_envelope(r, status)


def test_a_request_for_an_unknown_model_names_the_model(server):
    r = _send(server, *cmpl(model="gpt-4"))
    err = assert_error_envelope(r, 404)
    assert "gpt-4" in err["message"] and err["param"] == "model"


def test_context_errors_say_how_long_the_context_is(server):
    err = assert_error_envelope(_send(server, *cmpl(max_tokens=MAX_LEN)), 400)
    assert str(MAX_LEN) in err["message"]


def assert_healthy(server) -> None:
    assert server.proc.poll() is None, "the server exited"
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    r = _send(server, *cmpl(max_tokens=2))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_the_server_is_healthy_after_all_the_bad_requests(server):
    assert_healthy(server)


# Typed wrongly for the legacy /generate route, which has no request model: each must be a 400
# before anything reaches the engine core (whose decoder rejects such a request and dies).
# NOTE: after the health check above, so a server that fails these fails them alone.
GENERATE_TYPES = [
    ("max_tokens fractional", {"max_tokens": 1.5}),
    ("max_tokens boolean", {"max_tokens": True}),
    ("n fractional", {"n": 1.5}),
    ("top_k fractional", {"top_k": 2.5}),
    ("stop_token_ids string", {"stop_token_ids": "ab"}),
    ("stop with a number", {"stop": ["a", 5]}),
    ("ignore_eos string", {"ignore_eos": "yes"}),
]


@pytest.mark.parametrize("fields", [c[1] for c in GENERATE_TYPES],
                         ids=[c[0] for c in GENERATE_TYPES])
def test_legacy_generate_checks_types_before_the_engine(server, fields):
    assert_error_envelope(_send(server, *gen(**fields)), 400)
    assert_healthy(server)


# NOTE: last in the module: a server that does not bound n loops (and allocates) until the
# memory limit stops it, and may not survive that.
@pytest.mark.timeout(120)
def test_a_huge_n_is_refused_at_once(server):
    for route in (cmpl, chat):
        r = _send(server, *route(n=10**9, max_tokens=1))
        assert_error_envelope(r, 400)
    assert_healthy(server)
