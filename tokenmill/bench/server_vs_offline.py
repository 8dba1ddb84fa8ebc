"""Server overhead: the same workload through `tokenmill serve` (HTTP, streaming, all requests
at once) and through the offline `LLM.generate`, in one run; reports both and the ratio."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become healthy")


def run(args) -> dict:
    from tokenmill.bench.serve import BenchRequest, run_benchmark
    from tokenmill.bench.throughput import make_workload, run_tokenmill

    model, tmp = args.model, None
    if model is None:
        from tokenmill.testing.checkpoints import make_checkpoint

        tmp = tempfile.TemporaryDirectory()
        model = str(make_checkpoint(Path(tmp.name) / "mid", "llama", size="mid",
                                    dtype=args.dtype))
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model, local_files_only=True).vocab_size
    wl = make_workload(args.num_prompts, vocab, tuple(args.input_len), tuple(args.output_len),
                       args.seed)
    report = {"model": args.model or "random mid llama", "dtype": args.dtype,
              "num_prompts": args.num_prompts, "output_tokens": wl.num_output_tokens,
              "date": time.strftime("%Y-%m-%d")}
    report["offline"] = run_tokenmill(model, wl, args.dtype, args.max_num_seqs, profile=False)

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "tokenmill.cli", "serve", model, "--port", str(port),
           "--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs),
           "--disable-log-requests"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TOKENMILL_CHECK_INVARIANTS": "0"})
    try:
        _wait_healthy(url, proc)
        bench_args = argparse.Namespace(
            base_url=url, model=httpx.get(f"{url}/v1/models").json()["data"][0]["id"],
            endpoint="completions", ignore_eos=True, api_key=None, seed=args.seed,
            max_concurrency=None, request_rate=math.inf, timeout=600.0, no_progress=False)
        reqs = [BenchRequest(p, len(p), o) for p, o in zip(wl.prompts, wl.output_lens)]
        asyncio.run(run_benchmark(bench_args, reqs[:2]))  # warm-up
        result, _ = asyncio.run(run_benchmark(bench_args, reqs))
    finally:
        proc.terminate()
        proc.wait(60)
        if tmp is not None:
            tmp.cleanup()
    report["server"] = {k: result[k] for k in ("duration", "completed", "failed",
                                                "output_throughput", "mean_ttft_ms",
                                                "mean_tpot_ms", "total_output_tokens")}
    report["server_over_offline"] = (report["server"]["output_throughput"]
                                     / report["offline"]["output_tok_s"])
    return report


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Model folder (default: random 'mid' llama).")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, nargs=2, default=[16, 384])
    p.add_argument("--output-len", type=int, nargs=2, default=[16, 128])
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-file", default=None)


def run_from_args(args) -> int:
    report = run(args)
    print(json.dumps(report, indent=2))
    if args.result_file:
        Path(args.result_file).write_text(json.dumps(report, indent=2))
    return 0 if report["server"]["failed"] == 0 else 1
