"""A server started with --api-key, on a checkpoint that has no chat template.

/v1 routes need 'Authorization: Bearer KEY' (else 401 in the error envelope); /health, /metrics
and /version stay open. A chat request to a model without a chat template is a 400, not a 500.
"""

from __future__ import annotations

import subprocess
import sys

import httpx
import openai
import pytest
from _server import REPO, assert_error_envelope, server_env, start_server

pytestmark = pytest.mark.timeout(120)  # start-up included

MODEL = "no-template"
KEY = "secret"
USER = [{"role": "user", "content": "Hello, how are you?"}]
CMPL = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": USER, "max_tokens": 2}


@pytest.fixture(scope="module")
def server(no_template_checkpoint):
    with start_server(no_template_checkpoint, "--served-model-name", MODEL,
                      "--api-key", KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.v1, api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


BEARER = {"Authorization": f"Bearer {KEY}"}
AUTH_CASES = [
    ("completions without key", "POST", "/v1/completions", CMPL, {}, 401),
    ("completions wrong key", "POST", "/v1/completions", CMPL,
     {"Authorization": "Bearer nope"}, 401),
    ("completions key without scheme", "POST", "/v1/completions", CMPL,
     {"Authorization": KEY}, 401),
    ("completions basic scheme", "POST", "/v1/completions", CMPL,
     {"Authorization": f"Basic {KEY}"}, 401),
    ("chat without key", "POST", "/v1/chat/completions", CHAT, {}, 401),
    ("chat wrong key", "POST", "/v1/chat/completions", CHAT,
     {"Authorization": "Bearer secret2"}, 401),
    ("models without key", "GET", "/v1/models", None, {}, 401),
    ("model without key", "GET", f"/v1/models/{MODEL}", None, {}, 401),
    ("unknown /v1 route without key", "POST", "/v1/nothing", CMPL, {}, 401),
    ("health is open", "GET", "/health", None, {}, 200),
    ("metrics are open", "GET", "/metrics", None, {}, 200),
    ("version is open", "GET", "/version", None, {}, 200),
    ("right key", "POST", "/v1/completions", CMPL, BEARER, 200),
    ("right key, lower-case scheme", "POST", "/v1/completions", CMPL,
     {"Authorization": f"bearer {KEY}"}, 200),
    ("no chat template", "POST", "/v1/chat/completions", CHAT, BEARER, 400),
    ("no chat template, streaming", "POST", "/v1/chat/completions", {**CHAT, "stream": True},
     BEARER, 400),
    ("tokenize messages without a template", "POST", "/tokenize", {"messages": USER}, BEARER,
     400),
    # Beyond /v1 too: only /health, /metrics and /version are open with a key set.
    ("tokenize without key", "POST", "/tokenize", {"prompt": "hi"}, {}, 401),
    ("legacy generate without key", "POST", "/generate", {"prompt": "hi"}, {}, 401),
]


@pytest.mark.parametrize("method, path, body, headers, status", [c[1:] for c in AUTH_CASES],
                         ids=[c[0] for c in AUTH_CASES])
def test_key_and_template_table(server, method, path, body, headers, status):
    r = httpx.request(method, f"{server.url}{path}", json=body, headers=headers, timeout=60)
    if status >= 400:
        err = assert_error_envelope(r, status)
        if status == 401:
            assert KEY not in err["message"]
    else:
        assert r.status_code == status, r.text


def test_the_sdk_with_the_key_works_and_without_it_is_refused(server, client):
    r = client.completions.create(model=MODEL, prompt="hi", max_tokens=3, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
    assert client.models.list().data[0].id == MODEL
    with openai.OpenAI(base_url=server.v1, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=MODEL, prompt="hi", max_tokens=1)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_chat_without_a_template_is_a_clear_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
    assert "template" in str(e.value).lower()


def test_a_request_chat_template_works_without_a_model_template(client, hf_tokenizer):
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2,
                                       extra_body={"chat_template": template})
    want = hf_tokenizer(f"user: {USER[0]['content']}\n", add_special_tokens=False).input_ids
    assert r.usage.prompt_tokens == len(want)


def _complete(server, *args, **env):
    return subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", "complete", "--url", server.url,
         "--max-tokens", "4", "--temperature", "0", *args, "Hello"],
        capture_output=True, text=True, encoding="utf-8", cwd=REPO,
        env=server_env(PYTHONIOENCODING="utf-8", **env), timeout=120)


def test_cli_client_sends_the_key_from_the_flag_or_the_environment(server, client):
    want = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4,
                                     temperature=0).choices[0].text
    p = _complete(server, "--api-key", KEY)
    assert p.returncode == 0 and p.stdout == want + "\n", p.stderr
    p = _complete(server, TOKENMILL_API_KEY=KEY)
    assert p.returncode == 0 and p.stdout == want + "\n", p.stderr
    p = _complete(server)
    assert p.returncode != 0 and "401" in p.stderr
