"""`tokenmill bench serve`: load any OpenAI-compatible server over HTTP and measure it.

Requests go out on a Poisson schedule (or all at once with ``--request-rate inf``), at most
``--max-concurrency`` in flight, always streamed so TTFT and inter-token gaps are seen. The
summary's keys follow vLLM's ``bench serve`` (``request_throughput``, ``output_throughput``,
``mean_ttft_ms``, ``p99_ttft_ms``, ``mean_tpot_ms``, ``mean_itl_ms``, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
from tqdm.auto import tqdm

from tokenmill.bench.metrics import RequestRecord, summarize

_WORDS = ("the quick brown fox jumps over lazy dog while small cat watches from old red "
          "barn near river stone bridge under gray winter sky").split()


@dataclass
class BenchRequest:
    prompt: str | list[int]
    prompt_len: int
    output_len: int


# --------------------------------------------------------------------------- datasets
def _lengths(rng: random.Random, mean: int, ratio: float) -> int:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return rng.randint(lo, hi)


def _random_prompt(rng: random.Random, n: int, tokenizer, vocab: int, as_text: bool):
    ids = [rng.randrange(10, vocab) for _ in range(n)]
    if not as_text:
        return ids
    if tokenizer is not None:
        return tokenizer.decode(ids)
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def make_dataset(args, tokenizer=None) -> list[BenchRequest]:
    rng = random.Random(args.seed)
    vocab = len(tokenizer) if tokenizer is not None else args.vocab_size
    as_text = args.endpoint == "chat"
    reqs = []
    if args.dataset == "sharegpt":
        convs = json.loads(Path(args.dataset_path).read_text())
        rng.shuffle(convs)
        for conv in convs:
            turns = conv.get("conversations") or conv.get("messages") or []
            if len(turns) < 2:
                continue
            prompt, reply = turns[0].get("value") or turns[0].get("content"), \
                turns[1].get("value") or turns[1].get("content")
            plen = len(tokenizer.encode(prompt)) if tokenizer else len(prompt.split())
            olen = len(tokenizer.encode(reply)) if tokenizer else max(4, len(reply.split()))
            reqs.append(BenchRequest(prompt, plen, min(olen, args.random_output_len * 4)))
            if len(reqs) == args.num_prompts:
                break
        return reqs
    prefix = []
    if args.dataset == "shared-prefix":
        prefix = _random_prompt(rng, args.shared_prefix_len, tokenizer, vocab, as_text=False)
    for _ in range(args.num_prompts):
        n_in = _lengths(rng, args.random_input_len, args.random_range_ratio)
        n_out = _lengths(rng, args.random_output_len, args.random_range_ratio)
        ids = prefix + [rng.randrange(10, vocab) for _ in range(n_in)]
        prompt = ids
        if as_text:
            prompt = tokenizer.decode(ids) if tokenizer is not None else \
                " ".join(rng.choice(_WORDS) for _ in ids)
        reqs.append(BenchRequest(prompt, len(ids), n_out))
    return reqs


# --------------------------------------------------------------------------- one request
def _body(args, req: BenchRequest) -> tuple[str, dict]:
    common = {"model": args.model, "max_tokens": req.output_len, "stream": True,
              "temperature": 0.0, "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        common["ignore_eos"] = True
    if args.endpoint == "chat":
        return "/v1/chat/completions", {**common, "messages": [
            {"role": "user", "content": req.prompt}]}
    return "/v1/completions", {**common, "prompt": req.prompt}


async def send_one(session, args, req: BenchRequest) -> RequestRecord:
    route, body = _body(args, req)
    rec = RequestRecord(send_time=time.perf_counter(), prompt_tokens=req.prompt_len)
    chunks = 0
    try:
        async with session.post(args.base_url.rstrip("/") + route, json=body) as r:
            if r.status != 200:
                rec.error = f"HTTP {r.status}: {(await r.read())[:200]!r}"
                return rec
            buf = b""
            # NOTE: whole network reads, split into SSE events here: the client shares the
            # machine with the server under test, so it must cost as little CPU as it can.
            async for data in r.content.iter_any():
                now = time.perf_counter()
                buf += data
                *events, buf = buf.split(b"\n\n")
                for raw in events:
                    if not raw.startswith(b"data:"):
                        continue
                    payload = raw[5:].strip()
                    if payload == b"[DONE]":
                        break
                    event = json.loads(payload)
                    if "error" in event:
                        rec.error = str(event["error"])[:200]
                        return rec
                    for ch in event.get("choices") or ():
                        if ch.get("text") or (ch.get("delta") or {}).get("content"):
                            rec.chunk_times.append(now)
                            chunks += 1
                    usage = event.get("usage")
                    if usage:
                        rec.output_tokens = usage.get("completion_tokens", 0)
                        rec.prompt_tokens = usage.get("prompt_tokens", rec.prompt_tokens)
        rec.end_time = time.perf_counter()
        rec.output_tokens = rec.output_tokens or chunks
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as e:
        rec.error = f"{type(e).__name__}: {e}"
    return rec


# --------------------------------------------------------------------------- the run
async def run_benchmark(args, reqs: list[BenchRequest]) -> tuple[dict, list[RequestRecord]]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rng = random.Random(args.seed + 1)
    sem = asyncio.Semaphore(args.max_concurrency or len(reqs) or 1)
    bar = tqdm(total=len(reqs), desc="bench serve", unit="req", disable=args.no_progress)
    # NOTE: a connection per request. A kept-alive one can be closed by the server as it is
    # reused (llama.cpp's HTTP library closes each after a few requests or idle seconds), and
    # the request then fails with "Server disconnected" before the server sees it: about 1 in
    # 8 of llama-server's requests did, at every concurrency.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=args.timeout)) as session:
        async def guarded(req):
            async with sem:
                rec = await send_one(session, args, req)
            bar.update(1)
            return rec

        start = time.perf_counter()
        tasks = []
        for req in reqs:
            tasks.append(asyncio.create_task(guarded(req)))
            if math.isfinite(args.request_rate) and args.request_rate > 0:
                await asyncio.sleep(rng.expovariate(args.request_rate))
        records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return summarize(records, duration), records


def print_summary(result: dict) -> None:
    rows = [("Successful requests", result["completed"]), ("Failed requests", result["failed"]),
            ("Duration (s)", result["duration"]),
            ("Request throughput (req/s)", result["request_throughput"]),
            ("Output token throughput (tok/s)", result["output_throughput"]),
            ("Total token throughput (tok/s)", result["total_token_throughput"])]
    for m in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "p90", "p99"):
            rows.append((f"{stat.capitalize()} {m.upper()} (ms)", result[f"{stat}_{m}_ms"]))
    print("=" * 50)
    for name, value in rows:
        print(f"{name:<40}{value:>10.2f}" if isinstance(value, float) else
              f"{name:<40}{value:>10}")
    print("=" * 50)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="Model name (default: the server's first).")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--dataset", choices=["random", "shared-prefix", "sharegpt"],
                   default="random")
    p.add_argument("--dataset-path", default=None, help="sharegpt-style JSON file.")
    p.add_argument("--tokenizer", default=None,
                   help="Local tokenizer folder, to make text prompts of exact token lengths.")
    p.add_argument("--vocab-size", type=int, default=1000,
                   help="Random token ids are drawn below this when no tokenizer is given.")
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--shared-prefix-len", type=int, default=512)
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=math.inf)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--result-file", default=None, help="Write the JSON result here.")
    p.add_argument("--plot", default=None, help="Write a PNG of latency distributions here.")
    p.add_argument("--no-progress", action="store_true")


def served_model(base_url: str, api_key: str | None = None) -> str:
    """The first model name a server lists at /v1/models."""
    r = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=30,
                  headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    return r.json()["data"][0]["id"]


def client_args(base_url: str, model: str, *, seed: int = 0, max_concurrency: int | None = None,
                timeout: float = 600.0) -> argparse.Namespace:
    """What ``run_benchmark`` reads from the command line, for callers in Python: streamed
    completions of token-id prompts, ``ignore_eos``, all requests at once (at most
    ``max_concurrency`` in flight)."""
    return argparse.Namespace(base_url=base_url, model=model, endpoint="completions",
                              ignore_eos=True, api_key=None, seed=seed,
                              max_concurrency=max_concurrency, request_rate=math.inf,
                              timeout=timeout, no_progress=False)


def run_from_args(args) -> int:
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    if args.model is None:
        args.model = served_model(args.base_url, args.api_key)
    reqs = make_dataset(args, tokenizer)
    result, records = asyncio.run(run_benchmark(args, reqs))
    result.update({"base_url": args.base_url, "model": args.model, "endpoint": args.endpoint,
                   "dataset": args.dataset, "num_prompts": len(reqs),
                   "request_rate": args.request_rate, "max_concurrency": args.max_concurrency,
                   "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "ttfts": [r.ttft for r in records if r.ok],
                   "itls": [g for r in records if r.ok for g in r.itls],
                   "e2els": [r.e2el for r in records if r.ok],
                   "tpots": [t for r in records if r.ok and (t := r.tpot) is not None]})
    print_summary(result)
    if args.result_file:
        Path(args.result_file).write_text(json.dumps(result, indent=2))
    if args.plot:
        from tokenmill.bench.plot import plot_latencies

        plot_latencies([result], args.plot)
    return 0 if result["failed"] == 0 else 1
