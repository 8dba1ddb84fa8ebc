"""A server's life: many concurrent clients, clients that leave, then SIGTERM.

Nothing may stay running or hold KV blocks once clients finish or leave. "Idle" is read from
/metrics: tokenmill:num_requests_running == 0 and tokenmill:kv_cache_usage_perc == 0
(prefix-cached blocks that nobody holds count as free). Last, SIGTERM with requests in flight:
they finish in full, new ones are refused, and the process exits 0 within the grace period,
leaving no engine core process behind.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time

import httpx
import openai
import pytest
from _server import alive, launch, metric, stop, wait_for, wait_idle

pytestmark = pytest.mark.timeout(120)  # start-up included

MODEL = "tiny"
PROMPT = "The quick brown fox"
USER = [{"role": "user", "content": "Hello, how are you?"}]
GRACE_S = 20


@pytest.fixture(scope="module")
def server(tiny_llama):
    srv = launch(tiny_llama, "--served-model-name", MODEL,
                 "--shutdown-grace-period", str(GRACE_S))
    try:
        yield srv
    finally:
        stop(srv)
        srv.log_path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def running(srv) -> float:
    return metric(srv.metrics(), "tokenmill:num_requests_running")


def is_idle(metrics) -> bool:
    return (metric(metrics, "tokenmill:num_requests_running") == 0
            and metric(metrics, "tokenmill:kv_cache_usage_perc") == 0)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        return f"{pid}: {cmd[:200]}"
    except OSError:
        return str(pid)


def finished_count(srv) -> float:
    return metric(srv.metrics(), "tokenmill:request_success_total")


@pytest.mark.timeout(120)
def test_64_concurrent_streaming_clients_all_finish_then_idle(server):
    async def one(ac, i):
        kw = dict(model=MODEL, max_tokens=16, temperature=0.8, seed=i, stream=True,
                  stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        if i % 2:
            stream = await ac.chat.completions.create(messages=USER, **kw)
        else:
            stream = await ac.completions.create(prompt=f"{i} {PROMPT}", **kw)
        reasons, usage = [], None
        async for ch in stream:
            reasons += [c.finish_reason for c in ch.choices if c.finish_reason]
            usage = ch.usage or usage
        return reasons, usage

    async def run():
        async with openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0,
                                      timeout=90) as ac:
            return await asyncio.gather(*[one(ac, i) for i in range(64)])

    results = asyncio.run(run())
    assert [reasons for reasons, _ in results] == [["length"]] * 64
    assert [usage.completion_tokens for _, usage in results] == [16] * 64
    assert is_idle(wait_idle(server, timeout=2.0))


def _open_and_drop(server, client, kind: str):
    kw = dict(model=MODEL, temperature=0, stream=True, extra_body={"ignore_eos": True})
    if kind == "chat":
        stream = client.chat.completions.create(messages=USER, max_tokens=480, **kw)
    elif kind == "n":
        stream = client.completions.create(prompt=[PROMPT, "Hello"], n=2, max_tokens=480, **kw)
    else:
        stream = client.completions.create(prompt=PROMPT, max_tokens=480, **kw)
    it = iter(stream)
    next(it), next(it), next(it)
    assert running(server) >= 1, "the request should still be running"
    stream.close()


@pytest.mark.parametrize("kind", ["completion", "chat", "n"])
def test_a_client_that_leaves_mid_stream_is_aborted_within_a_second(server, client, kind):
    assert is_idle(wait_idle(server))
    done = finished_count(server)
    _open_and_drop(server, client, kind)
    t0 = time.monotonic()
    assert wait_for(lambda: is_idle(server.metrics()), timeout=1.0), \
        f"still busy {time.monotonic() - t0:.2f}s after the client left"
    assert finished_count(server) == done, "the request ran to the end instead of aborting"


def test_a_legacy_generate_stream_that_is_dropped_is_aborted(server):
    done = finished_count(server)
    with httpx.stream("POST", f"{server.url}/generate", timeout=60,
                      json={"prompt": PROMPT, "stream": True, "max_tokens": 480,
                            "ignore_eos": True}) as r:
        lines = r.iter_lines()
        next(lines), next(lines)
        assert running(server) >= 1
    assert wait_for(lambda: is_idle(server.metrics()), timeout=1.0)
    assert finished_count(server) == done


def test_many_clients_leaving_at_once_leave_nothing_behind(server):
    async def one(ac, i):
        stream = await ac.completions.create(model=MODEL, prompt=f"{i} {PROMPT}",
                                             max_tokens=480, stream=True,
                                             extra_body={"ignore_eos": True})
        n = 0
        async for _ in stream:
            n += 1
            if n == 2:
                break
        await stream.close()

    async def run():
        async with openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0,
                                      timeout=60) as ac:
            await asyncio.gather(*[one(ac, i) for i in range(16)])

    done = finished_count(server)
    asyncio.run(run())
    assert wait_for(lambda: is_idle(server.metrics()), timeout=1.0)
    assert finished_count(server) == done


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_a_non_streaming_client_that_times_out_is_aborted(server, route):
    # 32 samples x 480 tokens: seconds of work, so the 0.5 s client timeout comes first.
    body = {"model": MODEL, "n": 32, "max_tokens": 480, "ignore_eos": True}
    if route == "chat":
        body["messages"] = USER
    else:
        body["prompt"] = PROMPT
    done = finished_count(server)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.v1}/{'chat/completions' if route == 'chat' else 'completions'}",
                   json=body, timeout=0.5)
    assert wait_for(lambda: is_idle(server.metrics()), timeout=1.0), \
        "the abandoned request is still running"
    assert finished_count(server) == done, "the request ran to the end instead of aborting"


def test_server_still_serves_after_all_that(client, server):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
    assert r.usage.completion_tokens >= 1
    assert httpx.get(f"{server.url}/health").status_code == 200


# --------------------------------------------------------------------------- SIGTERM (last)
SIGTERM_MAX_TOKENS = 128


async def _refused(url: str) -> str:
    """A request after SIGTERM: 503 or a refused connection ('refused'); else what came back."""
    try:
        async with httpx.AsyncClient(timeout=10) as c:  # a new connection
            r = await c.post(f"{url}/v1/completions",
                             json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2})
    except httpx.TimeoutException:
        return "no answer in 10s"
    except httpx.TransportError:  # refused, or reset as the listening socket closes
        return "refused"
    return "refused" if r.status_code == 503 else f"{r.status_code} {r.text[:200]}"


@pytest.mark.timeout(120)
def test_sigterm_drains_in_flight_streams_then_exits_0(server):
    started = 0
    all_started = asyncio.Event()

    async def one(ac, i):
        nonlocal started
        kw = dict(model=MODEL, max_tokens=SIGTERM_MAX_TOKENS, temperature=0, stream=True,
                  stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        if i % 2:
            stream = await ac.chat.completions.create(messages=USER, **kw)
        else:
            stream = await ac.completions.create(prompt=f"{i} {PROMPT}", **kw)
        reasons, usage, first = [], None, True
        async for ch in stream:
            if first:
                first, started = False, started + 1
                if started == 4:
                    all_started.set()
            reasons += [c.finish_reason for c in ch.choices if c.finish_reason]
            usage = ch.usage or usage
        return reasons, usage.completion_tokens if usage else None

    async def run():
        async with openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0,
                                      timeout=60) as ac:
            tasks = [asyncio.create_task(one(ac, i)) for i in range(4)]
            await asyncio.wait_for(all_started.wait(), 30)
            server.proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            await asyncio.sleep(0.3)  # let the server notice
            refused = await _refused(server.url)
            results = await asyncio.gather(*tasks)
            return sent, refused, results

    assert metric(server.metrics(), "tokenmill:num_requests_running") == 0
    sent, refused, results = asyncio.run(run())
    assert results == [(["length"], SIGTERM_MAX_TOKENS)] * 4
    assert refused == "refused"
    rc = server.proc.wait(timeout=GRACE_S + 10)
    took = time.monotonic() - sent
    log = server.log()
    m = re.search(r"draining (\d+) in-flight", log)
    assert m and int(m.group(1)) >= 1, "SIGTERM came after the requests had finished"
    # Every way the exit can go wrong, reported together.
    # multiprocessing's resource tracker exits when it reads EOF from the gone server, a few
    # milliseconds later: a moment's grace, not a leak.
    wait_for(lambda: not any(alive(c) for c in server.children), 5.0)
    left = [_cmdline(pid) for pid, st in server.children if alive((pid, st))]
    problems = []
    if took >= GRACE_S:
        problems.append(f"exit took {took:.1f}s")
    if rc != 0:
        problems.append(f"exit code {rc} after SIGTERM")
    if left:
        problems.append(f"processes the server started outlived it: {left}")
    assert not problems, f"{problems}\n{log[-1500:]}"
