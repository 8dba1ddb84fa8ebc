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
from statistics import median

import httpx


SERVER_KEYS = ("duration", "completed", "failed", "output_throughput", "mean_ttft_ms",
               "mean_tpot_ms", "total_output_tokens")


def _requests(wl):
    from tokenmill.bench.serve import BenchRequest

    return [BenchRequest(p, len(p), o) for p, o in zip(wl.prompts, wl.output_lens)]


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
    from tokenmill.bench.serve import run_benchmark
    from tokenmill.bench.throughput import TokenmillRunner, make_workload

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
    report = {"command": "tokenmill bench server-vs-offline " + " ".join(sys.argv[3:]),
              "model": args.model or "random mid llama", "dtype": args.dtype,
              "num_prompts": args.num_prompts, "output_tokens": wl.num_output_tokens,
              "date": time.strftime("%Y-%m-%d")}
    # NOTE: fresh prompts in every run (the same for both paths within a run): repeated prompts
    # would be served from the prefix cache.
    wls = [wl] + [make_workload(args.num_prompts, vocab, tuple(args.input_len),
                                tuple(args.output_len), args.seed + i)
                  for i in range(1, args.runs)]
    warm = make_workload(4, vocab, tuple(args.input_len), (4, 4), args.seed - 1)
    offline = TokenmillRunner(model, args.dtype, max_num_seqs=args.max_num_seqs)
    offline.warm_up(warm)

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "tokenmill.cli", "serve", model, "--port", str(port),
           "--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs),
           "--disable-log-requests"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TOKENMILL_CHECK_INVARIANTS": "0"})
    offline_runs, server_runs = [], []
    try:
        _wait_healthy(url, proc)
        bench_args = argparse.Namespace(
            base_url=url, model=httpx.get(f"{url}/v1/models").json()["data"][0]["id"],
            endpoint="completions", ignore_eos=True, api_key=None, seed=args.seed,
            max_concurrency=None, request_rate=math.inf, timeout=600.0, no_progress=False)
        asyncio.run(run_benchmark(bench_args, _requests(warm)))
        # NOTE: alternate the two paths so that a noisy neighbour hits both alike.
        for w in wls:
            offline_runs.append(offline.run(w, progress=True))
            result, _ = asyncio.run(run_benchmark(bench_args, _requests(w)))
            server_runs.append({k: result[k] for k in SERVER_KEYS})
    finally:
        proc.terminate()
        proc.wait(60)
        if tmp is not None:
            tmp.cleanup()
    report["offline"] = {"output_tok_s": median(r["output_tok_s"] for r in offline_runs),
                         "runs": offline_runs}
    report["server"] = {"output_throughput": median(r["output_throughput"]
                                                    for r in server_runs),
                        "failed": sum(r["failed"] for r in server_runs), "runs": server_runs}
    report["server_over_offline"] = (report["server"]["output_throughput"]
                                     / report["offline"]["output_tok_s"])
    report["ratio_per_run"] = [s["output_throughput"] / o["output_tok_s"]
                               for o, s in zip(offline_runs, server_runs)]
    return report


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Model folder (default: random 'mid' llama).")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--runs", type=int, default=3, help="timed runs of each path (medians)")
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
